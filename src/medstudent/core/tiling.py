"""Gaussian-blended sliding-window inference in numpy, numerically the same as MONAI's
`sliding_window_inference(..., mode="gaussian", padding_mode="constant")` that `predict_seg_probs` uses.

Hand-written on purpose: the ONNX runner must run without torch, and MONAI imports torch. The rules copied
(MONAI 1.3-1.6): an input smaller than the tile is zero-padded around the centre (half before, the rest
after) and cropped back; window starts step by int(tile * (1 - overlap)) (the whole tile when it equals the
image side) and the last window is shifted back inside the image; each window's output is weighted by a
separable Gaussian (sigma = sigma_scale * tile, float32, clamped below at max(its minimum, 1e-3)) and the sum
is divided by the summed weights. Windows go through the network `sw_batch_size` at a time, in MONAI's order
(height-major).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def gaussian_importance(size: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """(h, w) float32 weight map, as `monai.data.utils.compute_importance_map(mode="gaussian")`."""
    out: np.ndarray | None = None
    for n in size:
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:n]
        sigma = n * sigma_scale
        g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
        out = g if out is None else out[:, None] * g[None, :]
    assert out is not None
    floor = max(float(out.min()), 1e-3)
    return np.maximum(out, np.float32(floor)).astype(np.float32)


def window_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Window start offsets along one axis of length `size` >= `tile` (MONAI's dense_patch_slices)."""
    interval = tile if tile == size else max(int(tile * (1 - overlap)), 1)
    num = int(math.ceil(float(size) / interval))
    n_win = next((d + 1 for d in range(num) if d * interval + tile >= size), 1)
    return [i * interval - max(i * interval + tile - size, 0) for i in range(n_win)]


def sliding_window(
    x: np.ndarray,
    tile: int,
    predict: Callable[[np.ndarray], np.ndarray],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Predict a (1, C, H, W) float32 array window by window; returns (1, K, H, W) float32.

    `predict` maps (B, C, tile, tile) to (B, K, tile, tile).
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"sliding_window expects one (1, C, H, W) image, got {x.shape}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    h0, w0 = x.shape[-2:]
    dh, dw = max(tile - h0, 0), max(tile - w0, 0)
    pads = ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2))
    if dh or dw:
        x = np.pad(x, ((0, 0), (0, 0), *pads), mode="constant", constant_values=0)
    h, w = x.shape[-2:]
    boxes = [(y, xx) for y in window_starts(h, tile, overlap) for xx in window_starts(w, tile, overlap)]
    weight = gaussian_importance((tile, tile), sigma_scale)
    out: np.ndarray | None = None
    count = np.zeros((h, w), dtype=np.float32)
    for y, xx in boxes:
        count[y : y + tile, xx : xx + tile] += weight
    for i in range(0, len(boxes), sw_batch_size):
        batch = boxes[i : i + sw_batch_size]
        win = np.ascontiguousarray(
            np.concatenate([x[:, :, y : y + tile, xx : xx + tile] for y, xx in batch], axis=0)
        )
        pred = np.asarray(predict(win), dtype=np.float32)
        if out is None:
            out = np.zeros((1, pred.shape[1], h, w), dtype=np.float32)
        for p, (y, xx) in zip(pred, batch, strict=True):
            out[0, :, y : y + tile, xx : xx + tile] += p * weight
    assert out is not None
    out /= count
    return out[:, :, pads[0][0] : pads[0][0] + h0, pads[1][0] : pads[1][0] + w0]
