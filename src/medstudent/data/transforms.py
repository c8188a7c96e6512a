"""Augmentation and preprocessing pipelines (albumentations 2.x) for segmentation and classification.

Every pipeline takes numpy (`t(image=uint8 HxW[xC], mask=uint8 HxW)`) and returns torch tensors:
`image` float32 CHW normalised, `mask` uint8 HxW. Geometry is applied to image and mask together by
albumentations. The eval pipelines are deterministic and mirrored, torch-free, by
`preprocess.apply_eval_contract(img, eval_contract(cfg))` for the ONNX runner.

This module holds the eval pipelines and their contract; the training pipelines live in `augment`, the
building blocks both use (custom ops, geometry, normalisation) in `transform_ops`. Every public name of
the three is importable from here.
"""

from __future__ import annotations

from typing import Any, Literal

import albumentations as A

from medstudent.config import AugmentConfig
from medstudent.data import preprocess as pp
from medstudent.data.augment import (
    RANDAUGMENT_MAGNITUDE,
    SegTransform,
    cls_train_transform,
    policy_schedule,
    randaugment_ops,
    seg_policy_ops,
    seg_train_transform,
)
from medstudent.data.preprocess import PAD_MULTIPLE, PAD_VALUE, pad_to_multiple, scaled_size
from medstudent.data.transform_ops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Rescale,
    ShortSideAtLeast,
    ToChannels,
    WorkerSeededCompose,
    channel_params,
    cls_geometry,
    compose,
    normalize_params,
    normalize_to_tensor,
    seg_geometry,
    validate_augment,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDAUGMENT_MAGNITUDE",
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
    "randaugment_ops",
    "scaled_size",
    "seg_eval_transform",
    "seg_policy_ops",
    "seg_train_transform",
]


def seg_eval_transform(cfg: AugmentConfig) -> A.Compose:
    """Rescale by `scale` (or to `resize`) and pad bottom/right to a multiple of 32; no randomness."""
    validate_augment(cfg)
    return compose(seg_geometry(cfg) + normalize_to_tensor(*normalize_params(cfg)), seed=0)


def cls_eval_transform(cfg: AugmentConfig, in_channels: int = 3) -> A.Compose:
    """Channels -> [centre crop] -> [resize] -> normalise; no randomness."""
    validate_augment(cfg)
    return compose(
        cls_geometry(cfg, in_channels) + normalize_to_tensor(*channel_params(cfg, in_channels)), seed=0
    )


# ----------------------------------------------------------------------------------------- contract
def eval_contract(
    cfg: AugmentConfig, task: Literal["segmentation", "classification"] | None = None, in_channels: int = 3
) -> dict[str, Any]:
    """JSON-serialisable facts of the eval transform, for `preprocess.apply_eval_contract`.

    task None: classification when any classification-only field (grayscale, center_crop, image_size)
    is set, else segmentation -- pass it explicitly when you know it (cfg.data.task).
    """
    validate_augment(cfg)
    if task is None:
        task = "classification" if (cfg.grayscale or cfg.center_crop or cfg.image_size) else "segmentation"
    seg = task == "segmentation"
    channels = 3 if seg else int(in_channels)
    mean, std = channel_params(cfg, channels)
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
