"""The one model factory: smp segmentation models over any timm encoder, or timm classifiers.

Output convention for segmentation (see `seg_out_channels`): binary tasks (num_classes == 2, background +
foreground) get ONE logit channel, read with a sigmoid; tasks with more classes get num_classes channels,
read with a softmax. Logits are at input resolution; H and W must be multiples of 32 (PAN: at least 128).
Classifiers always have num_classes logits.

Nothing is downloaded unless `pretrained` asks for the hub (see `medstudent.models.pretrained`).
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import timm
from torch import Tensor, nn

from medstudent.config import ModelConfig
from medstudent.errors import ConfigError
from medstudent.models.deep_supervision import DeepSupervisionModel, HeadDropout
from medstudent.models.pretrained import (
    BUNDLED,
    PretrainedSpec,
    check_bundled_fits,
    load_state_dict_into,
    parse_pretrained,
    pretrained_state_dict,
    read_state_dict,
)

SEG_ARCHS: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "fpn": smp.FPN,
    "pan": smp.PAN,
}
DECODER_ACTIVATIONS: dict[str, type[nn.Module] | None] = {"relu": None, "mish": nn.Mish}
_OFFLINE_HINT = f"offline? use a local weights file or '{BUNDLED}'"


def seg_out_channels(num_classes: int) -> int:
    """Logit channels of a segmentation model: 1 for binary (sigmoid), else num_classes (softmax)."""
    if num_classes < 2:
        raise ConfigError(None, f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def resolve_encoder(encoder: str) -> tuple[str, str]:
    """("timm", name) for a timm model ("tu-" prefix optional), ("smp", name) for smp's native encoders.

    timm wins when both know a name (resnet18): its weights are the ones the pretrained registry can load.
    """
    name = encoder.strip()
    bare = name[3:] if name.startswith("tu-") else name
    if timm.is_model(bare):
        return "timm", bare
    if not name.startswith("tu-") and name in smp.encoders.get_encoder_names():
        return "smp", name
    raise ConfigError(None, f"model.encoder: unknown timm encoder '{bare}' (see timm.list_models())")


def create_model(
    arch: str,
    *,
    num_classes: int,
    encoder: str = "efficientnet_lite0",
    pretrained: str | None = None,
    in_channels: int = 3,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    decoder_activation: str = "relu",
    deep_supervision: bool = False,
) -> nn.Module:
    """Build a segmentation model (`arch` in SEG_ARCHS) or a timm classifier (any other timm name).

    Segmentation: smp `arch` over the timm encoder `encoder`; output (B, seg_out_channels(num_classes), H, W)
    logits — ONE channel for binary (num_classes == 2, sigmoid), num_classes channels otherwise (softmax).
    `dropout` is spatial dropout before the segmentation head (FPN: smp's own decoder dropout),
    `drop_path_rate` is the timm encoder's stochastic depth, `decoder_activation` "mish" swaps the decoder's
    ReLUs for Mish, `deep_supervision` (unet, unetplusplus) wraps the model in `DeepSupervisionModel`.

    Classification: `timm.create_model(arch, num_classes, in_chans, drop_rate=dropout, drop_path_rate)`.

    The model carries `task` ("segmentation" / "classification") and `num_classes`.
    """
    key = arch.strip().lower()
    if decoder_activation not in DECODER_ACTIVATIONS:
        raise ConfigError(
            None,
            f"model.decoder_activation: unknown '{decoder_activation}' "
            f"(one of {', '.join(DECODER_ACTIVATIONS)})",
        )
    common: dict[str, Any] = {
        "num_classes": num_classes,
        "pretrained": pretrained,
        "in_channels": in_channels,
        "dropout": dropout,
        "drop_path_rate": drop_path_rate,
        "decoder_activation": decoder_activation,
        "deep_supervision": deep_supervision,
    }
    if key in SEG_ARCHS:
        model = _create_segmentation(key, encoder=encoder, **common)
        model.task = "segmentation"
    else:
        model = _create_classifier(arch.strip(), **common)
        model.task = "classification"
    model.num_classes = num_classes
    return model


def model_from_config(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """`create_model` from the `model:` section of a run config."""
    return create_model(
        cfg.arch,
        num_classes=num_classes,
        encoder=cfg.encoder,
        pretrained=cfg.pretrained,
        in_channels=cfg.in_channels,
        dropout=cfg.dropout,
        drop_path_rate=cfg.drop_path_rate,
        decoder_activation=cfg.decoder_activation,
        deep_supervision=cfg.deep_supervision,
    )


def _build(fn: Any, spec: PretrainedSpec, what: str, **kwargs: Any) -> nn.Module:
    """Call a constructor, turning its failures into one-line ConfigErrors (hub: most likely offline)."""
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # timm/smp/hub raise many unrelated types; the message is what the user needs
        reason = f"{type(e).__name__}: {e}"[:300]
        if spec.kind == "hub":
            raise ConfigError(
                None, f"model.pretrained: could not get hub weights for {what} ({reason}); {_OFFLINE_HINT}"
            ) from e
        raise ConfigError(None, f"model: cannot build {what} ({reason})") from e


def _create_segmentation(
    arch: str,
    *,
    num_classes: int,
    encoder: str,
    pretrained: str | None,
    in_channels: int,
    dropout: float,
    drop_path_rate: float,
    decoder_activation: str,
    deep_supervision: bool,
) -> nn.Module:
    cls = SEG_ARCHS[arch]
    out_channels = seg_out_channels(num_classes)
    if deep_supervision and arch not in ("unet", "unetplusplus"):
        raise ConfigError(None, f"model.deep_supervision: only for unet and unetplusplus, not {arch}")
    source, enc_name = resolve_encoder(encoder)
    kwargs: dict[str, Any] = {"in_channels": in_channels, "classes": out_channels}
    if arch == "fpn":
        kwargs["decoder_dropout"] = dropout  # smp's FPN has its own Dropout2d before the head (default 0.2)
    what = f"{arch} with encoder '{enc_name}'"
    spec = parse_pretrained(pretrained)
    if source == "timm":
        sd = pretrained_state_dict(spec, enc_name)  # read (and checked) before the model is built
        kwargs.update(encoder_name=f"tu-{enc_name}", encoder_weights=True if spec.kind == "hub" else None)
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate  # smp passes extra kwargs on to timm.create_model
        model = _build(cls, spec, what, **kwargs)
        if sd is not None:
            load_state_dict_into(model.encoder.model, sd, enc_name, spec.origin)
    else:
        model = _create_smp_native(cls, enc_name, spec, drop_path_rate, what, kwargs)
    if dropout > 0 and arch != "fpn":
        model.segmentation_head = HeadDropout(model.segmentation_head, dropout)
    if arch == "fpn" and getattr(model.decoder.merge, "policy", None) == "add":
        model.decoder.merge = AddMerge()
    _set_decoder_activation(model, arch, decoder_activation)
    if deep_supervision:
        model = DeepSupervisionModel(model, out_channels, dropout)
    return model


class AddMerge(nn.Module):
    """smp's FPN `MergeBlock("add")` as chained additions. smp computes `torch.stack(x).sum(dim=0)`: on
    channels-last maps (how the torch engine and training run) that copies the four maps, reduces along a
    strided dimension and returns a non-channels-last tensor, many times slower on a CPU than the additions
    (measured in BENCHMARKS.md). Parameter-free, the same sum (float32: the same values), so checkpoints and
    exports are unchanged."""

    policy = "add"

    def forward(self, x: list[Tensor]) -> Tensor:
        out = x[0]
        for t in x[1:]:
            out = out + t
        return out


def _create_smp_native(
    cls: type[nn.Module],
    enc_name: str,
    spec: PretrainedSpec,
    drop_path_rate: float,
    what: str,
    kwargs: dict[str, Any],
) -> nn.Module:
    """smp's own (non-timm) encoders, e.g. "efficientnet-b3" or "mit_b0": smp's weights or a local file."""
    if drop_path_rate > 0:
        raise ConfigError(None, f"model.drop_path_rate: needs a timm encoder, smp's '{enc_name}' ignores it")
    if spec.kind == "bundled":
        check_bundled_fits(spec, enc_name)  # smp's own encoders are never timm's Lite models: always fails
    weights = "imagenet" if spec.kind == "hub" else None
    model = _build(cls, spec, what, encoder_name=enc_name, encoder_weights=weights, **kwargs)
    if spec.kind == "file":
        assert spec.path is not None
        sd = {
            k.removeprefix("encoder."): v
            for k, v in read_state_dict(spec.path).items()
            if not k.startswith(("decoder.", "segmentation_head.", "classification_head."))
        }
        try:
            model.encoder.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(
                spec.path, f"model.pretrained: weights do not fit smp encoder '{enc_name}' ({str(e)[:300]})"
            ) from e
    return model


def _set_decoder_activation(model: nn.Module, arch: str, activation: str) -> None:
    """smp 0.6 hard-codes nn.ReLU in every decoder: swap those modules (decoder only, the encoder keeps the
    activation its weights were trained with). Parameter-free, so checkpoints stay compatible."""
    new = DECODER_ACTIVATIONS[activation]
    if new is None:
        return
    replaced = 0
    for parent in model.decoder.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, new())
                replaced += 1
    if not replaced:
        raise ConfigError(
            None, f"model.decoder_activation: the {arch} decoder has no ReLU to replace by {activation}"
        )


def _create_classifier(
    arch: str,
    *,
    num_classes: int,
    pretrained: str | None,
    in_channels: int,
    dropout: float,
    drop_path_rate: float,
    decoder_activation: str,
    deep_supervision: bool,
) -> nn.Module:
    name = arch[3:] if arch.startswith("tu-") else arch
    if not timm.is_model(name):
        raise ConfigError(
            None,
            f"model.arch: unknown architecture '{arch}' (segmentation: {', '.join(SEG_ARCHS)}; "
            "or a timm classifier, see timm.list_models())",
        )
    if deep_supervision:
        raise ConfigError(
            None, f"model.deep_supervision: only for segmentation (unet, unetplusplus), not '{arch}'"
        )
    if decoder_activation != "relu":
        raise ConfigError(None, f"model.decoder_activation: only for segmentation archs, not '{arch}'")
    spec = parse_pretrained(pretrained)
    sd = pretrained_state_dict(spec, name)
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_chans": in_channels,
        "pretrained": spec.kind == "hub",
    }
    if dropout > 0:
        kwargs["drop_rate"] = dropout
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    model = _build(timm.create_model, spec, f"timm '{name}'", model_name=name, **kwargs)
    new_head = False
    if sd is not None:
        new_head = bool(load_state_dict_into(model, sd, name, spec.origin))
    elif spec.kind == "hub":  # timm replaced the head when the class count differs from the weights'
        new_head = num_classes != model.pretrained_cfg.get("num_classes", num_classes)
    if new_head:
        _init_new_head(model)
    return model


def _init_new_head(model: nn.Module) -> None:
    """Start a fine-tuned classifier's new head near zero (normal, std 0.01; bias 0).

    timm's EfficientNet init draws a Linear head from U(-1/sqrt(out), 1/sqrt(out)): right for 1000 classes,
    but for 4 classes (+-0.5 on 1280 features) the first logits have a standard deviation of ~4.5 and the
    first loss is ~7 instead of ln 4, and with few images the pretrained features are wrecked before the
    head is usable (BENCHMARKS.md, OCT).
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def check_model_config(cfg: ModelConfig, task: str) -> None:
    """Fail fast (before any data is read) on an architecture or encoder that does not exist, or one that
    does not fit the task."""
    arch = cfg.arch.lower()
    if task == "segmentation":
        if arch not in SEG_ARCHS:
            raise ConfigError(
                None, f"model.arch: '{cfg.arch}' is not a segmentation architecture ({', '.join(SEG_ARCHS)})"
            )
        resolve_encoder(cfg.encoder)
    elif arch in SEG_ARCHS or not timm.is_model(cfg.arch[3:] if cfg.arch.startswith("tu-") else cfg.arch):
        raise ConfigError(None, f"model.arch: '{cfg.arch}' is not a timm classifier (see timm.list_models())")


def backbone_module(model: nn.Module) -> nn.Module:
    """The pretrained part of a model built by `create_model`: the smp encoder of a segmentation model
    (inside a `DeepSupervisionModel` too), or a timm classifier minus its classifier head.

    Used for a separate backbone learning rate and for freezing (`optim.backbone_lr_scale`,
    `optim.freeze_epochs`): the usual levers when a pretrained model is fine-tuned on very few images.
    """
    net = model.net if isinstance(model, DeepSupervisionModel) else model
    if getattr(model, "task", None) == "segmentation" or hasattr(net, "encoder"):
        return net.encoder
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ConfigError(None, f"{type(model).__name__}: no classifier head to tell apart from its backbone")
    return _Without(model, head)


class _Without(nn.Module):
    """A view of `model` without `head` (which may sit deep inside it): parameters() and train()/eval()
    reach every module that neither is part of the head nor contains it (so a root module that applies the
    head's dropout keeps the head's mode)."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        head_mods = {id(m) for m in head.modules()}
        head_params = {id(p) for p in head.parameters()}
        holders = {id(m) for m in model.modules() if any(id(c) in head_mods for c in m.modules())}
        # Plain lists, not registered: the view must not own (and so re-save) the model's tensors.
        self._params = [p for p in model.parameters() if id(p) not in head_params]
        self._mods = [m for m in model.modules() if id(m) not in head_mods and id(m) not in holders]

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        yield from self._params

    def train(self, mode: bool = True):  # type: ignore[override]
        for m in self._mods:
            m.training = mode
        return self
