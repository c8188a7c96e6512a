"""Augmentation and preprocessing pipelines (albumentations 2.x) for segmentation and classification.

Every pipeline takes numpy (`t(image=uint8 HxW[xC], mask=uint8 HxW)`) and returns torch tensors:
`image` float32 CHW normalised, `mask` uint8 HxW. Geometry is applied to image and mask together by
albumentations. The eval pipelines are deterministic and mirrored, torch-free, by
`preprocess.apply_eval_contract(img, eval_contract(cfg))` for the ONNX runner.

Custom pieces, each because albumentations 2.0.8 lacks it:
- `Rescale`: resize by a factor of the *incoming* size (A.Resize needs a fixed size; A.RandomScale
  truncates with int(), so 0.29 * 100 -> 28, which a numpy re-implementation would have to copy).
- `ShortSideAtLeast`: enlarge only when smaller (A.SmallestMaxSize also shrinks).
- `ToChannels`: mixed L/RGB/RGBA inputs to a fixed channel count.
- `SegTransform`: a per-epoch schedule for the AutoAugment-style policy probability.
- `randaugment_ops`: RandAugment (there is no A.RandAugment) as A.SomeOf(n=2) over albumentations ops.
- `WorkerSeededCompose`: 2.0.8 does not reseed inside DataLoader workers, so forked workers would
  repeat each other's augmentations (fixed upstream after 2.0.8).
"""

from __future__ import annotations

import math
import os
import random
import sys
import warnings
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from medstudent.config import AugmentConfig
from medstudent.data import preprocess as pp
from medstudent.data.preprocess import PAD_MULTIPLE, PAD_VALUE, pad_to_multiple, scaled_size
from medstudent.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Rescale",
    "SegTransform",
    "ShortSideAtLeast",
    "ToChannels",
    "WorkerSeededCompose",
    "cls_eval_transform",
    "cls_train_transform",
    "eval_contract",
    "normalize_params",
    "pad_to_multiple",
    "policy_schedule",
    "scaled_size",
    "seg_eval_transform",
    "seg_train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDAUGMENT_MAGNITUDE = 9 / 30  # timm's "rand-m9" on a 0..30 scale: mild enough for medical images


# ----------------------------------------------------------------------------------------- custom ops
class ToChannels(A.ImageOnlyTransform):
    """HxW / HxWx1 / RGB / RGBA uint8 -> HxWx`channels` (greyscale: luma, replicated)."""

    def __init__(self, channels: int = 3, grayscale: bool = False, p: float = 1.0):
        super().__init__(p=p)
        self.channels = channels
        self.grayscale = grayscale

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return pp.to_channels(img, self.channels, self.grayscale)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("channels", "grayscale")


class Rescale(A.DualTransform):
    """Resize by `scale` of the incoming size (or to a fixed `size` (h, w)); mask by nearest neighbour."""

    def __init__(self, scale: float = 1.0, size: tuple[int, int] | None = None, p: float = 1.0):
        super().__init__(p=p)
        self.scale = scale
        self.size = size

    def _target(self, hw: tuple[int, ...]) -> tuple[int, int]:
        return (int(self.size[0]), int(self.size[1])) if self.size else scaled_size(hw[0], hw[1], self.scale)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return pp.resize(img, self._target(img.shape))

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return pp.resize(mask, self._target(mask.shape), cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "size")


class ShortSideAtLeast(A.DualTransform):
    """Enlarge so the short side is >= size (so a centre crop of that size fits); never shrinks."""

    def __init__(self, size: int, p: float = 1.0):
        super().__init__(p=p)
        self.size = size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return pp.short_side_at_least(img, self.size)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        h, w = mask.shape[:2]
        if min(h, w) >= self.size:
            return mask
        hw = pp.short_side_at_least(np.zeros((h, w), np.uint8), self.size).shape[:2]
        return pp.resize(mask, hw, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


class WorkerSeededCompose(A.Compose):
    """A.Compose whose random state is reseeded from torch's per-worker seed inside DataLoader workers.

    albumentations 2.x keeps its own generators (not the global `random`), and 2.0.8 never reseeds them
    in a worker: forked workers would then draw identical augmentations. Inside a worker we seed from
    `get_worker_info().seed` (base seed + worker id, new each epoch unless workers persist), which is
    also reproducible under `seed_everything`. One shared generator pair is handed to all children
    (`set_random_state`), because `Compose(seed=s)` seeds every child with the same s, which would make
    e.g. the horizontal and the vertical flip decisions identical.
    """

    _worker_key: tuple[int, int] | None = None

    def reseed(self, seed: int) -> None:
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, *args: Any, force_apply: bool = False, **data: Any) -> dict[str, Any]:
        torch = sys.modules.get("torch")  # no torch imported -> certainly not in a DataLoader worker
        if torch is not None:
            info = torch.utils.data.get_worker_info()
            if info is not None and self._worker_key != (os.getpid(), info.seed):
                self._worker_key = (os.getpid(), info.seed)
                self.reseed(info.seed % 2**63)
        return super().__call__(*args, force_apply=force_apply, **data)


def _compose(transforms: list, seed: int | None) -> WorkerSeededCompose:
    t = WorkerSeededCompose(transforms)
    # seed None: draw from the global `random`, which seed_everything() seeds, so runs are repeatable
    t.reseed(random.getrandbits(63) if seed is None else seed)
    return t


# ------------------------------------------------------------------------------------------ helpers
def normalize_params(cfg: AugmentConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel in [0, 1] units."""
    if cfg.normalize == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return IMAGENET_MEAN, IMAGENET_STD


def _channel_params(cfg: AugmentConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = normalize_params(cfg)
    if channels == 3:
        return mean, std
    if channels == 1:  # a greyscale input to an RGB-pretrained stem: the channel-average statistics
        return (round(sum(mean) / 3, 6),), (round(sum(std) / 3, 6),)
    raise ConfigError(None, f"model.in_channels must be 1 or 3 for image inputs, got {channels}")


def _validate(cfg: AugmentConfig) -> None:
    """Out-of-range values would otherwise surface as an albumentations stack trace mid-epoch."""
    for name in (
        "crop_target_prob",
        "hflip",
        "vflip",
        "rot90",
        "stain",
        "autoaugment",
        "autoaugment_off_last",
        "randaugment",
        "noise",
    ):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(None, f"augment.{name} must be within [0, 1], got {v}")
    if cfg.scale <= 0:
        raise ConfigError(None, f"augment.scale must be > 0, got {cfg.scale}")
    for name in ("resize", "crop"):
        v = getattr(cfg, name)
        if v is not None and min(v) < 1:
            raise ConfigError(None, f"augment.{name} must be positive (height, width), got {v}")
    for name in ("center_crop", "image_size"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(None, f"augment.{name} must be a positive size, got {v}")
    if cfg.rotate < 0:
        raise ConfigError(None, f"augment.rotate must be >= 0 degrees, got {cfg.rotate}")


def _seg_geometry(cfg: AugmentConfig) -> list:
    """Rescale, then pad bottom/right to a multiple of 32 (image PAD_VALUE, mask 0)."""
    return [
        ToChannels(3),
        Rescale(cfg.scale, tuple(cfg.resize) if cfg.resize else None),
        A.PadIfNeeded(
            min_height=None,
            min_width=None,
            pad_height_divisor=PAD_MULTIPLE,
            pad_width_divisor=PAD_MULTIPLE,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=PAD_VALUE,
            fill_mask=0,
        ),
    ]


def _tail(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


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
    _validate(cfg)
    ts = _seg_geometry(cfg)
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
    ts += _tail(*normalize_params(cfg))
    return SegTransform(_compose(ts, seed), policy, cfg.autoaugment, cfg.autoaugment_off_last)


def seg_eval_transform(cfg: AugmentConfig) -> A.Compose:
    """Rescale by `scale` (or to `resize`) and pad bottom/right to a multiple of 32; no randomness."""
    _validate(cfg)
    return _compose(_seg_geometry(cfg) + _tail(*normalize_params(cfg)), seed=0)


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


def _cls_geometry(cfg: AugmentConfig, channels: int) -> list:
    ts: list = [ToChannels(channels, cfg.grayscale)]
    if cfg.center_crop:
        ts += [ShortSideAtLeast(cfg.center_crop), A.CenterCrop(cfg.center_crop, cfg.center_crop)]
    if cfg.image_size:
        # area when shrinking, linear when enlarging: the rule preprocess.resize applies
        ts.append(
            A.Resize(
                cfg.image_size, cfg.image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"
            )
        )
    return ts


def cls_train_transform(cfg: AugmentConfig, in_channels: int = 3, seed: int | None = None) -> A.Compose:
    """Channels -> [centre crop] -> [resize] -> hflip -> [rotate] -> [RandAugment] -> [noise].

    Only `hflip` of the flips: OCT B-scans have an up and a down, so `vflip` (and rot90) are
    segmentation-only.
    """
    _validate(cfg)
    mean, std = _channel_params(cfg, in_channels)
    ts = _cls_geometry(cfg, in_channels)
    if cfg.hflip > 0:
        ts.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.rotate > 0:
        ts.append(A.Rotate(limit=(-cfg.rotate, cfg.rotate), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
    if cfg.randaugment > 0:
        ops = randaugment_ops(in_channels, cfg.grayscale)
        ts.append(A.SomeOf(ops, n=2, replace=False, p=cfg.randaugment))
    if cfg.noise > 0:
        ts.append(A.GaussNoise(std_range=(0.02, 0.06), per_channel=not cfg.grayscale, p=cfg.noise))
    return _compose(ts + _tail(mean, std), seed)


def cls_eval_transform(cfg: AugmentConfig, in_channels: int = 3) -> A.Compose:
    """Channels -> [centre crop] -> [resize] -> normalise; no randomness."""
    _validate(cfg)
    return _compose(_cls_geometry(cfg, in_channels) + _tail(*_channel_params(cfg, in_channels)), seed=0)


# ----------------------------------------------------------------------------------------- contract
def eval_contract(
    cfg: AugmentConfig, task: Literal["segmentation", "classification"] | None = None, in_channels: int = 3
) -> dict[str, Any]:
    """JSON-serialisable facts of the eval transform, for `preprocess.apply_eval_contract`.

    task None: classification when any classification-only field (grayscale, center_crop, image_size)
    is set, else segmentation -- pass it explicitly when you know it (cfg.data.task).
    """
    _validate(cfg)
    if task is None:
        task = "classification" if (cfg.grayscale or cfg.center_crop or cfg.image_size) else "segmentation"
    seg = task == "segmentation"
    channels = 3 if seg else int(in_channels)
    mean, std = _channel_params(cfg, channels)
    return {
        "version": pp.CONTRACT_VERSION,
        "task": task,
        "scale": float(cfg.scale) if seg else 1.0,
        "resize": [int(v) for v in cfg.resize] if (seg and cfg.resize) else None,
        "pad_multiple": PAD_MULTIPLE if seg else 1,
        "pad_value": PAD_VALUE,
        "pad_position": "bottom_right",
        "grayscale": bool(cfg.grayscale) and not seg,
        "in_channels": channels,
        "center_crop": None if seg else cfg.center_crop,
        "image_size": None if seg else cfg.image_size,
        "interpolation": "area when shrinking, linear when enlarging",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "max_pixel_value": 255.0,
        "channel_order": "RGB",
        "layout": "CHW",
    }
