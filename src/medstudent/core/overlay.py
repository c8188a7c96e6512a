"""Masks drawn over their images: the overlays `predict` writes and the galleries of reports use."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation
from skimage.segmentation import find_boundaries

from medstudent.errors import DataError

# Yellow, green and cyan stand out on H&E (eosin pink, haematoxylin purple, white air spaces); magenta,
# the usual choice, nearly vanishes on eosin.
PREDICTION_COLOR = (255, 221, 0)
TRUTH_COLOR = (0, 230, 64)
MISSED_COLOR = (0, 200, 255)


def rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 (uint8 or float in [0, 1]) -> HxWx3 uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        scale = 255.0 if img.size and float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img.astype(float)) * scale, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(None, f"image must be HxW or HxWx3, got shape {np.asarray(image).shape}")
    return img


def mask_for(mask: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[:, :, 0]
    if m.shape != tuple(shape[:2]):
        raise DataError(None, f"{what} shape {m.shape} does not match image {tuple(shape[:2])}")
    return m > 0


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = PREDICTION_COLOR,
    alpha: float = 0.4,
    contour: bool = True,
) -> np.ndarray:
    """Image with the mask tinted in `color` (alpha blend) and, optionally, its outline drawn opaque.

    The outline is 2 px thick (`find_boundaries(mode="thick")`) and thicker for images over 1200 px, so it
    stays visible when the PNG is viewed scaled down. Returns HxWx3 uint8.
    """
    img = rgb(image)
    m = mask_for(mask, img.shape, "mask")
    out = img.astype(np.float32)
    col = np.asarray(color, dtype=np.float32)
    if alpha > 0:
        out[m] = (1 - alpha) * out[m] + alpha * col
    if contour and m.any():
        edge = find_boundaries(m, mode="thick")
        extra = max(img.shape[:2]) // 1200
        if extra:
            edge = binary_dilation(edge, iterations=extra)
        out[edge] = col
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
