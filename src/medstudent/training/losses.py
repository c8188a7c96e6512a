"""Losses for both tasks, with an ignore value (255) so self-training can leave unconfident pixels out.

Dice and focal terms come from MONAI; the ignore mask is applied by MONAI's MaskedDiceLoss and by weighting
the element-wise terms, so ignored pixels contribute exactly zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss, MaskedDiceLoss
from torch import nn

from medstudent.config import LossConfig
from medstudent.errors import ConfigError

IGNORE = 255


class SegmentationLoss(nn.Module):
    """Dice / focal / BCE (binary, one sigmoid channel) or Dice / CE (multi-class softmax).

    target: (B, H, W) long class ids with IGNORE for pixels that must not count.
    """

    def __init__(self, cfg: LossConfig, out_channels: int):
        super().__init__()
        self.cfg = cfg
        self.binary = out_channels == 1
        # batch=True: Dice over the whole batch, so the many STAS-free images do not each push a 0/0 Dice.
        kw = {"batch": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5}
        if self.binary:
            self.dice = MaskedDiceLoss(sigmoid=True, **kw)
        else:
            self.dice = MaskedDiceLoss(softmax=True, to_onehot_y=True, **kw)
        self.focal = FocalLoss(
            gamma=cfg.focal_gamma, use_softmax=not self.binary, reduction="none", to_onehot_y=not self.binary
        )
        if cfg.name in ("ce",) and self.binary:
            raise ConfigError(None, "loss.name 'ce' needs more than 2 classes; use bce or dice_bce")

    def _elementwise(self, kind: str, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
        if kind == "focal":
            t = target.unsqueeze(1).float() if self.binary else target.unsqueeze(1)
            per = self.focal(logits, t)  # (B, C, H, W)
            per = per.sum(1) if not self.binary else per[:, 0]
        elif self.binary:
            per = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
        else:
            per = F.cross_entropy(logits, target, reduction="none")
        return (per * valid).sum() / valid.sum().clamp_min(1.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = (target != IGNORE).float()
        target = torch.where(target == IGNORE, torch.zeros_like(target), target).long()
        name = self.cfg.name
        loss = logits.new_zeros(())
        if name in ("dice", "dice_focal", "dice_bce"):
            t = target.unsqueeze(1).float() if self.binary else target.unsqueeze(1)
            loss = loss + self.cfg.dice_weight * self.dice(logits, t, mask=valid.unsqueeze(1))
        if name in ("focal", "dice_focal"):
            loss = loss + self.cfg.other_weight * self._elementwise("focal", logits, target, valid)
        if name in ("bce", "dice_bce", "ce"):
            loss = loss + self.cfg.other_weight * self._elementwise("xent", logits, target, valid)
        return loss


class DeepSupervisionLoss(nn.Module):
    """Weighted sum over [main, aux1, aux2] logits (weights 1, 1/4, 1/16 by default, as the 0.911 system);
    auxiliary weights follow a cosine from their start value to 0 over training (`progress` in [0, 1])."""

    def __init__(self, base: nn.Module, weights: tuple[float, ...]):
        super().__init__()
        self.base = base
        self.weights = weights

    def aux_factor(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def forward(self, outputs, target: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        size = target.shape[-2:]
        total = self.weights[0] * self.base(outputs[0], target)
        f = self.aux_factor(progress)
        for w, out in zip(self.weights[1:], outputs[1:], strict=False):
            if w * f == 0:
                continue
            up = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
            total = total + w * f * self.base(up, target)
        return total


class ClassificationLoss(nn.Module):
    """Cross-entropy with optional class weights and label smoothing; accepts hard ids or soft targets."""

    def __init__(self, cfg: LossConfig, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.smoothing = cfg.label_smoothing
        self.register_buffer("weight", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.smoothing)
