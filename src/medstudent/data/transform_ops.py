"""Building blocks shared by the training (`augment`) and eval (`transforms`) pipelines: the custom
albumentations ops, the resize/pad geometry, normalisation and the config checks.

Custom ops, each because albumentations 2.0.8 lacks it:
- `Rescale`: resize by a factor of the *incoming* size (A.Resize needs a fixed size; A.RandomScale
  truncates with int(), so 0.29 * 100 -> 28, which a numpy re-implementation would have to copy).
- `ShortSideAtLeast`: enlarge only when smaller (A.SmallestMaxSize also shrinks).
- `ToChannels`: mixed L/RGB/RGBA inputs to a fixed channel count.
- `WorkerSeededCompose`: 2.0.8 does not reseed inside DataLoader workers, so forked workers would
  repeat each other's augmentations (fixed upstream after 2.0.8).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from medstudent.config import AugmentConfig
from medstudent.data import preprocess as pp
from medstudent.data.preprocess import PAD_MULTIPLE, PAD_VALUE, scaled_size
from medstudent.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def compose(transforms: list, seed: int | None) -> WorkerSeededCompose:
    t = WorkerSeededCompose(transforms)
    # seed None: draw from the global `random`, which seed_everything() seeds, so runs are repeatable
    t.reseed(random.getrandbits(63) if seed is None else seed)
    return t


def normalize_params(cfg: AugmentConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel in [0, 1] units."""
    if cfg.normalize == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return IMAGENET_MEAN, IMAGENET_STD


def channel_params(cfg: AugmentConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = normalize_params(cfg)
    if channels == 3:
        return mean, std
    if channels == 1:  # a greyscale input to an RGB-pretrained stem: the channel-average statistics
        return (round(sum(mean) / 3, 6),), (round(sum(std) / 3, 6),)
    raise ConfigError(None, f"model.in_channels must be 1 or 3 for image inputs, got {channels}")


def validate_augment(cfg: AugmentConfig) -> None:
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
        "intensity",
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
    if cfg.resized_crop_scale is not None:
        lo, hi = cfg.resized_crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(None, f"augment.resized_crop_scale needs 0 < low <= high <= 1, got {(lo, hi)}")
        if not cfg.image_size:
            raise ConfigError(None, "augment.resized_crop_scale needs augment.image_size (its output size)")
    lo, hi = cfg.resized_crop_ratio
    if not 0 < lo <= hi:
        raise ConfigError(None, f"augment.resized_crop_ratio must be 0 < low <= high, got {(lo, hi)}")


def seg_geometry(cfg: AugmentConfig) -> list:
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


def normalize_to_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def cls_geometry(cfg: AugmentConfig, channels: int, train: bool = False) -> list:
    """Channels -> [centre crop] -> [resize]; in training with resized_crop_scale the resize is a random
    resized crop."""
    ts: list = [ToChannels(channels, cfg.grayscale)]
    if cfg.center_crop:
        ts += [ShortSideAtLeast(cfg.center_crop), A.CenterCrop(cfg.center_crop, cfg.center_crop)]
    if train and cfg.image_size and cfg.resized_crop_scale is not None:
        ts.append(
            A.RandomResizedCrop(
                size=(cfg.image_size, cfg.image_size),
                scale=tuple(cfg.resized_crop_scale),
                ratio=tuple(cfg.resized_crop_ratio),
                interpolation=cv2.INTER_LINEAR,
                area_for_downscale="image",
                p=1.0,
            )
        )
    elif cfg.image_size:
        # area when shrinking, linear when enlarging: the rule preprocess.resize applies
        ts.append(
            A.Resize(
                cfg.image_size, cfg.image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"
            )
        )
    return ts
