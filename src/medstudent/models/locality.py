"""Which layers of a segmentation network make each output pixel depend on the whole input.

A network built from convolutions, BatchNorm with its running statistics, and pooling of bounded size is
local: a pixel's prediction depends only on its receptive field, so a whole slide cut into regions gets
the same answer as one image would. GroupNorm and InstanceNorm normalise over the whole feature map,
squeeze-excitation and global pooling branches (DeepLabV3's ASPP image pooling, PSPNet) average it: the
prediction at one pixel then shifts with everything else in the input, glass included (BENCHMARKS.md,
whole slides: smp's FPN decoder agrees with per-tile predictions at Dice 0.83, a UNet at 0.90-0.97).
There is no library call for this; the layer types are listed here by name, so encoders from timm and
decoders from smp are recognised without importing each class.
"""

from __future__ import annotations

from torch import nn

# class names, not classes: timm's and smp's versions live in many modules and change between releases
WHOLE_INPUT_TYPES = (
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "AdaptiveAvgPool2d",
    "AdaptiveMaxPool2d",
    "SqueezeExcite",  # timm efficientnet / mobilenetv3 blocks
    "SEModule",  # timm resnets, regnets
    "EffectiveSEModule",
    "EcaModule",
    "CbamModule",
    "ASPPPooling",  # smp DeepLabV3(+)
    "SCSEModule",  # smp decoder attention
)


def whole_input_layers(model: nn.Module) -> list[str]:
    """Sorted names of the layer types in `model` whose output depends on the whole input; [] when it
    is local."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in WHOLE_INPUT_TYPES})
