"""Which layers of a segmentation network make each output pixel depend on the whole input.

A network built from convolutions, BatchNorm with its running statistics, and pooling of bounded size is
local: a pixel's prediction depends only on its receptive field, so a whole slide cut into regions gets
the same answer as one image would. GroupNorm and InstanceNorm normalise over the whole feature map;
squeeze-excitation, global-context and global pooling branches (DeepLabV3's ASPP image pooling, PSPNet)
average it; self-attention mixes it: the prediction at one pixel then shifts with everything else in the
input, glass included (BENCHMARKS.md, whole slides: smp's FPN decoder agrees with per-tile predictions at
Dice 0.83, a UNet at 0.90-0.97). There is no library call for this; the layer types are recognised by
name, so encoders from timm and smp and decoders from smp are covered without importing each class. The
list is of known types: a layer that pools inside a plain function of an unknown class goes unseen.
"""

from __future__ import annotations

from torch import nn

# class names, not classes: timm's and smp's versions live in many modules and change between releases
WHOLE_INPUT_TYPES = frozenset(
    {
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "GlobalResponseNorm",  # ConvNeXt-V2
        "AdaptiveAvgPool2d",
        "AdaptiveMaxPool2d",
        "SqueezeExcite",  # timm efficientnet / mobilenetv3 blocks
        "SqueezeExciteCl",
        "SEModule",  # timm resnets, regnets
        "EffectiveSEModule",
        "EcaModule",
        "CecaModule",
        "CbamModule",
        "LightCbamModule",
        "GatherExcite",
        "GlobalContext",
        "SelectiveKernelAttn",
        "SplitAttn",  # ResNeSt
        "ASPPPooling",  # smp DeepLabV3(+)
        "SCSEModule",  # smp decoder attention
    }
)
ATTENTION_SUFFIXES = ("Attention", "Attn")  # self-attention (SegFormer's mit_b*, ViTs) mixes the whole input


def _whole_input_name(m: nn.Module) -> str | None:
    name = type(m).__name__
    if name in WHOLE_INPUT_TYPES:
        return name
    # smp's decoder `Attention` is a wrapper judged by what it holds (SCSEModule or Identity)
    if name.endswith(ATTENTION_SUFFIXES) and not isinstance(getattr(m, "attention", None), nn.Module):
        return name
    if getattr(m, "_has_se", False):  # smp's own efficientnet-b* blocks pool inside forward()
        return "SqueezeExcite"
    return None


def whole_input_layers(model: nn.Module) -> list[str]:
    """Sorted names of the known layer types in `model` whose output depends on the whole input; []
    when it has none of them."""
    return sorted({n for m in model.modules() if (n := _whole_input_name(m)) is not None})
