"""Training-time augmentation: the segmentation policy (AutoAugment-style, decaying per epoch) and the
classification pipeline with RandAugment.

Custom pieces, each because albumentations 2.0.8 lacks it:
- `SegTransform`: a per-epoch schedule for the AutoAugment-style policy probability.
- `randaugment_ops`: RandAugment (there is no A.RandAugment) as A.SomeOf(n=2) over albumentations ops.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import albumentations as A
import cv2

from medstudent.config import AugmentConfig
from medstudent.data.preprocess import PAD_VALUE
from medstudent.data.transform_ops import (
    channel_params,
    cls_geometry,
    compose,
    normalize_params,
    normalize_to_tensor,
    seg_geometry,
    validate_augment,
)

RANDAUGMENT_MAGNITUDE = 9 / 30  # timm's "rand-m9" on a 0..30 scale: mild enough for medical images


# ------------------------------------------------------------------------------------- segmentation
def policy_schedule(p0: float, epoch: int, max_epochs: int, off_last: float) -> float:
    """Policy probability at `epoch` (0-based): cosine decay from p0 at epoch 0 towards 0, and exactly 0
    in the last ceil(off_last * max_epochs) epochs -- strong augmentation early, clean images at the end
    (as the 0.911 STAS system trained)."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    n_off = math.ceil(max_epochs * off_last - 1e-9) if off_last > 0 else 0
    n_on = max_epochs - n_off
    epoch = max(0, int(epoch))
    if epoch >= n_on:
        return 0.0
    return float(p0 * 0.5 * (1.0 + math.cos(math.pi * epoch / n_on)))


def seg_policy_ops() -> list:
    """AutoAugment-style ops for H&E: colour changes plus mild geometry (the mask follows geometry).
    Reflect borders, so rotated-in corners look like tissue and are labelled consistently."""
    border = {"border_mode": cv2.BORDER_REFLECT_101}
    return [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10, p=1.0),
        A.RandomGamma(gamma_limit=(80, 120), p=1.0),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=1.0),
                A.Sharpen(alpha=(0.1, 0.3), lightness=(0.9, 1.0), p=1.0),
            ],
            p=1.0,
        ),
        A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=1.0),
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            rotate=(-15, 15),
            shear=(-5, 5),
            **border,
            p=1.0,
        ),
        A.ElasticTransform(alpha=30, sigma=6, approximate=True, **border, p=1.0),
    ]


def _target_crop(cfg: AugmentConfig) -> list:
    """Random crop that contains a target with probability >= crop_target_prob.

    A.CropNonEmptyMaskIfExists picks a random foreground pixel and a crop containing it at a random
    offset (uniform random crop when the mask is empty); it has no probability knob of its own, so it
    is mixed with a plain RandomCrop in A.OneOf with weights (q, 1 - q). It raises when the crop is
    larger than the image, hence the PadIfNeeded in front.
    """
    ch, cw = int(cfg.crop[0]), int(cfg.crop[1])
    q = cfg.crop_target_prob
    ops: list = [
        A.PadIfNeeded(
            min_height=ch,
            min_width=cw,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=PAD_VALUE,
            fill_mask=0,
        )
    ]
    if q <= 0:
        ops.append(A.RandomCrop(ch, cw, p=1.0))
    elif q >= 1:
        ops.append(A.CropNonEmptyMaskIfExists(ch, cw, p=1.0))
    else:
        ops.append(A.OneOf([A.CropNonEmptyMaskIfExists(ch, cw, p=q), A.RandomCrop(ch, cw, p=1 - q)], p=1.0))
    return ops


def _square_output(cfg: AugmentConfig) -> bool:
    if cfg.crop:
        return cfg.crop[0] == cfg.crop[1]
    return bool(cfg.resize) and cfg.resize[0] == cfg.resize[1]


class SegTransform:
    """Segmentation train pipeline whose policy probability follows `policy_schedule` per epoch.

    Call `set_epoch(epoch, max_epochs)` at each epoch start. Picklable; DataLoader workers see the new
    probability when they are re-created each epoch (the default), not with persistent_workers=True.
    """

    def __init__(
        self, compose: A.Compose, policy: A.BaseCompose | None, initial_prob: float, off_last: float
    ):
        self.compose = compose
        self.policy = policy  # the same object as inside `compose` (pickle keeps the shared reference)
        self.initial_prob = float(initial_prob)
        self.off_last = float(off_last)
        self.epoch = 0
        self._set_prob(self.initial_prob if policy is not None else 0.0)

    def _set_prob(self, p: float) -> None:
        self._prob = float(p)
        if self.policy is not None:
            self.policy.p = self._prob

    @property
    def policy_prob(self) -> float:
        return self._prob

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        self.epoch = int(epoch)
        if self.policy is not None:
            self._set_prob(policy_schedule(self.initial_prob, epoch, max_epochs, self.off_last))

    def __call__(self, **data: Any) -> dict[str, Any]:
        return self.compose(**data)

    def __repr__(self) -> str:
        return f"SegTransform(epoch={self.epoch}, policy_prob={self._prob:.3f}, {self.compose!r})"


def seg_train_transform(cfg: AugmentConfig, seed: int | None = None) -> SegTransform:
    """Rescale -> pad/32 -> [target-biased crop] -> flips -> [rot90] -> [H&E stain] -> [policy] -> [noise]."""
    validate_augment(cfg)
    ts = seg_geometry(cfg)
    if cfg.crop:
        ts += _target_crop(cfg)
    if cfg.hflip > 0:
        ts.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ts.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rot90 > 0:
        if _square_output(cfg):
            ts.append(A.RandomRotate90(p=cfg.rot90))
        else:  # a 90-degree turn of a non-square sample would change its shape and break batching
            warnings.warn(
                "augment.rot90 ignored: needs a square crop or resize (flips already give 180)", stacklevel=2
            )
    if cfg.stain > 0:
        # Preset stain matrices, not per-image Macenko/Vahadane: those crash ("No tissue pixels") or turn a
        # white tile black in 2.0.8; random_preset is finite and white-preserving on empty tiles.
        ts.append(
            A.HEStain(
                method="random_preset",
                intensity_scale_range=(0.8, 1.2),
                intensity_shift_range=(-0.1, 0.1),
                augment_background=False,
                p=cfg.stain,
            )
        )
    policy = None
    if cfg.autoaugment > 0:
        policy = A.SomeOf(seg_policy_ops(), n=2, replace=False, p=cfg.autoaugment)  # a 2-op sub-policy
        ts.append(policy)
    if cfg.noise > 0:
        ts.append(A.GaussNoise(std_range=(0.02, 0.06), p=cfg.noise))
    ts += normalize_to_tensor(*normalize_params(cfg))
    return SegTransform(compose(ts, seed), policy, cfg.autoaugment, cfg.autoaugment_off_last)


# ----------------------------------------------------------------------------------- classification
def randaugment_ops(channels: int, grayscale: bool, m: float = RANDAUGMENT_MAGNITUDE) -> list:
    """RandAugment's op list at magnitude m in [0, 1] (albumentations has no RandAugment).
    Colour-only ops are left out for greyscale inputs, where they would do nothing (or fail on 1 channel)."""
    ops = [
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Solarize(threshold_range=(1 - m, 1 - m), p=1.0),
        A.Posterize(num_bits=8 - max(1, round(4 * m)), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0.0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.9 * m, p=1.0),
        A.Sharpen(alpha=(0.5 * m, m), lightness=(1.0, 1.0), p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, p=1.0),
    ]
    if channels == 3 and not grayscale:
        saturation = (1 - 0.9 * m, 1 + 0.9 * m)
        ops.append(A.ColorJitter(brightness=0, contrast=0, saturation=saturation, hue=0, p=1.0))
    return ops


def cls_train_transform(cfg: AugmentConfig, in_channels: int = 3, seed: int | None = None) -> A.Compose:
    """Channels -> [centre crop] -> [resize or random resized crop] -> hflip -> [rotate] -> [intensity]
    -> [RandAugment] -> [noise].

    Only `hflip` of the flips: OCT B-scans have an up and a down, so `vflip` (and rot90) are
    segmentation-only.
    """
    validate_augment(cfg)
    mean, std = channel_params(cfg, in_channels)
    ts = cls_geometry(cfg, in_channels, train=True)
    if cfg.hflip > 0:
        ts.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.rotate > 0:
        ts.append(A.Rotate(limit=(-cfg.rotate, cfg.rotate), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
    if cfg.intensity > 0:
        ts.append(
            A.Sequential(
                [
                    A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
                    A.RandomGamma(gamma_limit=(70, 150), p=1.0),
                ],
                p=cfg.intensity,
            )
        )
    if cfg.randaugment > 0:
        ops = randaugment_ops(in_channels, cfg.grayscale)
        ts.append(A.SomeOf(ops, n=2, replace=False, p=cfg.randaugment))
    if cfg.noise > 0:
        ts.append(A.GaussNoise(std_range=(0.02, 0.06), per_channel=not cfg.grayscale, p=cfg.noise))
    return compose(ts + normalize_to_tensor(mean, std), seed)
