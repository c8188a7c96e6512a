"""Eval-time preprocessing in plain numpy/OpenCV, driven by a JSON "contract".

The torch-free ONNX runner must feed a model exactly what `seg_eval_transform` / `cls_eval_transform`
fed it during validation. Those transforms are built with albumentations; this module re-implements
them from the facts in `transforms.eval_contract(cfg)` so that the runner needs neither torch nor
albumentations. The few primitives both sides need (sizes, channel handling, interpolation choice)
live here and are imported by `transforms.py`, so the two implementations cannot drift apart.
Only numpy, Pillow and cv2 may be imported here.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

PAD_MULTIPLE = 32
PAD_VALUE = 0  # image padding (mask padding is always 0 = background)
CONTRACT_VERSION = 1


def pad_to_multiple(h: int, w: int, k: int = PAD_MULTIPLE) -> tuple[int, int]:
    """Smallest (H, W) >= (h, w) divisible by k: encoders downsample 5 times, so k = 32."""
    return -(-int(h) // k) * k, -(-int(w) // k) * k


def scaled_size(h: int, w: int, scale: float, k: int = PAD_MULTIPLE) -> tuple[int, int]:
    """(h, w) after the scale factor, before padding; rounds half up (942 * 0.5 -> 471).

    Round-half-up, not `int()`: 0.29 * 100 is 28.999..., and truncation would lose a pixel. `k` does not
    change the result (the size before padding does not depend on the pad multiple); it is accepted so
    that calls mirror `pad_to_multiple`.
    """
    del k  # the size before padding does not depend on the pad multiple
    return max(1, int(np.floor(h * scale + 0.5))), max(1, int(np.floor(w * scale + 0.5)))


def scaled_contract(contract: dict[str, Any], factor: float) -> dict[str, Any]:
    """A segmentation contract that predicts at `factor` times its model resolution (multi-scale TTA):
    `scale` multiplied, or a fixed `resize` multiplied and rounded to whole pixels."""
    if factor == 1.0 or contract.get("task") != "segmentation":
        return contract
    out = dict(contract)
    if out.get("resize"):
        out["resize"] = [max(1, int(np.floor(v * factor + 0.5))) for v in out["resize"]]
    else:
        out["scale"] = float(out["scale"]) * factor
    return out


def resize_interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """INTER_AREA when shrinking (no aliasing of nuclei/speckle), INTER_LINEAR when enlarging."""
    return cv2.INTER_AREA if dst_hw[0] < src_hw[0] or dst_hw[1] < src_hw[1] else cv2.INTER_LINEAR


def resize(img: np.ndarray, hw: tuple[int, int], interpolation: int | None = None) -> np.ndarray:
    """cv2.resize that takes (h, w), keeps a trailing channel axis of size 1 and skips no-op resizes."""
    h, w = int(hw[0]), int(hw[1])
    if img.shape[:2] == (h, w):
        return img
    if interpolation is None:
        interpolation = resize_interpolation(img.shape[:2], (h, w))
    out = cv2.resize(img, (w, h), interpolation=interpolation)
    if img.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def to_channels(img: np.ndarray, channels: int = 3, grayscale: bool = False) -> np.ndarray:
    """HxWxC uint8 with C = channels, whatever came in (HxW, HxWx1, RGB, RGBA).

    grayscale: colour images are reduced to luma first (ITU-R 601, as PIL's "L"), then replicated, so
    an OCT scan stored as RGB and one stored as L give the same tensor.
    """
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 4:  # drop alpha
        img = img[..., :3]
    if img.shape[2] == 3 and (grayscale or channels == 1):
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[..., None]
    if img.shape[2] == channels:
        return np.ascontiguousarray(img)
    if img.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(img, channels, axis=2))
    raise ValueError(f"cannot turn a {img.shape[2]}-channel image into {channels} channels")


def short_side_at_least(img: np.ndarray, size: int) -> np.ndarray:
    """Enlarge (never shrink) so the short side is >= size, keeping the aspect ratio (for centre crops)."""
    h, w = img.shape[:2]
    if min(h, w) >= size:
        return img
    s = size / min(h, w)
    if h <= w:
        nh, nw = size, max(size, int(np.floor(w * s + 0.5)))
    else:
        nh, nw = max(size, int(np.floor(h * s + 0.5))), size
    return resize(img, (nh, nw), cv2.INTER_LINEAR)


def center_crop_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of a centred crop, with albumentations' rounding ((h - ch) // 2)."""
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return y0, x0, y0 + ch, x0 + cw


def normalize(img: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 HxWxC -> float32 CxHxW, (x / 255 - mean) / std per channel.

    Channel by channel straight into the CHW output (x * 1/(255 std) - mean/std): one pass per channel
    instead of a float copy, two in-place passes and a transposing copy; it runs in the slide reader
    thread, whose work competes with the network's (BENCHMARKS.md, whole slides)."""
    c = img.shape[2]
    scale = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    offset = -np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    out = np.empty((c, img.shape[0], img.shape[1]), dtype=np.float32)
    for k in range(c):
        np.multiply(img[..., k], scale[k], out=out[k], dtype=np.float32)
        out[k] += offset[k]
    return out


def apply_eval_contract(img: np.ndarray, contract: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess one uint8 image as the eval transform would: returns (CHW float32, info).

    info holds the sizes needed to map a prediction back: `orig_size` (h, w), `resized_size` (the
    valid region at model resolution, top-left), `input_size` (what the model saw), and for
    classification `crop_box` (in the image after `short_side_at_least`).
    """
    channels = int(contract.get("in_channels", 3))
    img = to_channels(np.asarray(img), channels, bool(contract.get("grayscale", False)))
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    h, w = img.shape[:2]
    info: dict[str, Any] = {"orig_size": [h, w]}
    if contract["task"] == "segmentation":
        size = contract.get("resize")
        target = (int(size[0]), int(size[1])) if size else scaled_size(h, w, float(contract["scale"]))
        img = resize(img, target)
        info["resized_size"] = list(target)
        k = int(contract["pad_multiple"])
        ph, pw = pad_to_multiple(*target, k)
        if (ph, pw) != target:
            img = cv2.copyMakeBorder(
                img,
                0,
                ph - target[0],
                0,
                pw - target[1],
                cv2.BORDER_CONSTANT,
                value=[contract.get("pad_value", PAD_VALUE)] * 4,
            )
            if img.ndim == 2:
                img = img[..., None]
    else:
        crop = contract.get("center_crop")
        if crop:
            img = short_side_at_least(img, int(crop))
            box = center_crop_box(img.shape[0], img.shape[1], int(crop), int(crop))
            img = img[box[0] : box[2], box[1] : box[3]]
            info["crop_box"] = list(box)
        size = contract.get("image_size")
        if size:
            img = resize(img, (int(size), int(size)))
        info["resized_size"] = [img.shape[0], img.shape[1]]
    info["input_size"] = [img.shape[0], img.shape[1]]
    return normalize(img, tuple(contract["mean"]), tuple(contract["std"])), info


def restore_geometry(
    pred: np.ndarray, info: dict[str, Any], interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Undo padding and scaling of a segmentation output: (H, W) or (C, H, W) at model resolution ->
    the same at the original image size. Use INTER_LINEAR for probabilities, INTER_NEAREST for labels."""
    rh, rw = info["resized_size"]
    oh, ow = info["orig_size"]
    chw = pred.ndim == 3
    arr = pred[..., :rh, :rw]
    if chw:
        arr = arr.transpose(1, 2, 0)
    arr = np.ascontiguousarray(arr)
    if arr.shape[:2] != (oh, ow):
        arr = resize(arr, (oh, ow), interpolation)
    return arr.transpose(2, 0, 1) if chw else arr
