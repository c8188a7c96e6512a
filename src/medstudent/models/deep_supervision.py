"""Deep supervision for smp Unet / UnetPlusPlus: auxiliary logits from the two decoder levels before the last.

The 0.911 STAS system (UNet-EfficientNet-B3) supervised the last three decoder levels. smp 0.6 has no such
option, so the decoder is left untouched and forward hooks on its blocks pick up the intermediate feature
maps; 1x1 heads turn them into logits at their own (1/2, 1/4) resolution. Training code weights the losses
(1, 1/4, 1/16 with a cosine decay of the aux weights) and resizes targets; this module is the model side only.

In eval mode the wrapper returns the main logits tensor alone, so inference, TTA and ONNX export see the same
interface as a plain model. The wrapped smp model is `model.net`, for code that wants it without aux heads.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import SegmentationHead
from torch import Tensor, nn

from medstudent.errors import ConfigError

_ATTR = "_ds_output"


def _keep_output(module: nn.Module, args: Any, output: Tensor) -> None:
    """Forward hook: remember a decoder block's output, only while training (eval and export stay stateless).

    The tensor is stored on the block itself (not on the wrapper) so that module replicas (DataParallel)
    each keep their own.
    """
    if module.training:
        module.__dict__[_ATTR] = output


def aux_block_names(net: nn.Module) -> list[str]:
    """Decoder blocks one and two levels before the last (1/2 and 1/4 of the input resolution)."""
    if isinstance(net, smp.UnetPlusPlus):
        depth = net.decoder.depth  # blocks x_{row}_{column}; row 0 is the full-depth path, x_0_{depth} last
        return [f"decoder.blocks.x_0_{depth - 1}", f"decoder.blocks.x_0_{depth - 2}"]
    if isinstance(net, smp.Unet):
        n = len(net.decoder.blocks)
        return [f"decoder.blocks.{n - 2}", f"decoder.blocks.{n - 3}"]
    raise ConfigError(
        None, f"model.deep_supervision: only for unet and unetplusplus, not {type(net).__name__.lower()}"
    )


class HeadDropout(nn.Sequential):
    """An smp segmentation head with spatial dropout in front.

    It subclasses the head's Sequential, and the dropout is functional, so that the state-dict keys
    (segmentation_head.0.weight, ...) are the same with and without dropout: checkpoints of a teacher
    (no dropout) and a noised student load into each other.
    """

    def __init__(self, head: nn.Sequential, p: float):
        super().__init__(*head)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(nn.functional.dropout2d(x, self.p, self.training))

    def extra_repr(self) -> str:
        return f"dropout2d_p={self.p}"


class DeepSupervisionModel(nn.Module):
    """Train mode: `[main, aux1, aux2]` logits at 1, 1/2 and 1/4 resolution. Eval mode: `main` only."""

    def __init__(self, net: nn.Module, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.tap_names = aux_block_names(net)
        self.net = net
        heads = []
        for name in self.tap_names:
            block = net.get_submodule(name)
            channels = block.conv2[0].out_channels  # Conv2dReLU = (conv, norm, act) in both decoders
            head: nn.Sequential = SegmentationHead(channels, out_channels, kernel_size=1)
            heads.append(HeadDropout(head, dropout) if dropout > 0 else head)
            block.register_forward_hook(_keep_output)
        self.aux_heads = nn.ModuleList(heads)

    @property
    def encoder(self) -> nn.Module:
        """The smp encoder, e.g. for freezing it."""
        return self.net.encoder

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        main = self.net(x)
        if not self.training:
            return main
        outputs = [main]
        for name, head in zip(self.tap_names, self.aux_heads, strict=True):
            feature = self.net.get_submodule(name).__dict__.pop(_ATTR, None)
            if feature is None:  # hooks only record in train mode; a half-switched model lands here
                raise RuntimeError(
                    f"deep supervision: no output captured from {name} (is the decoder in eval mode?)"
                )
            outputs.append(head(feature))
        return outputs
