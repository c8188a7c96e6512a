"""Drawing primitives shared by the synthetic STAS and OCT generators: smooth noise, blobs, disks."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Roughly zero-mean, unit-std noise with features about `scale` pixels wide (bicubic upsampling)."""
    if scale <= 2:
        return rng.standard_normal((h, w), dtype=np.float32)
    gh, gw = max(2, math.ceil(h / scale) + 1), max(2, math.ceil(w / scale) + 1)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    small = (small - small.mean()) / (small.std() + 1e-6)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float map (used for fields computed at half resolution to save time)."""
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))


def unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.01, None)
    return v / np.linalg.norm(v)


def blob_polygons(
    rng: np.random.Generator,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    irregular: float,
    n_vert: int = 12,
) -> np.ndarray:
    """(N, n_vert, 2) outlines of irregular rotated ellipses: nuclei and cells are never perfect circles."""
    n = len(cx)
    phi = np.linspace(0, 2 * np.pi, n_vert, endpoint=False)[None, :]
    theta = rng.uniform(0, np.pi, (n, 1))
    a2, a3 = rng.uniform(-1, 1, (n, 1)), rng.uniform(-0.7, 0.7, (n, 1))
    p2, p3 = rng.uniform(0, 2 * np.pi, (n, 1)), rng.uniform(0, 2 * np.pi, (n, 1))
    wobble = 1 + irregular * (a2 * np.cos(2 * phi + p2) + a3 * np.cos(3 * phi + p3))
    ex = rx[:, None] * wobble * np.cos(phi)
    ey = ry[:, None] * wobble * np.sin(phi)
    px = cx[:, None] + ex * np.cos(theta) - ey * np.sin(theta)
    py = cy[:, None] + ex * np.sin(theta) + ey * np.cos(theta)
    return np.stack([px, py], axis=-1)


def draw_polys(draw: ImageDraw.ImageDraw, polys: np.ndarray, values: np.ndarray | float) -> None:
    if not len(polys):
        return
    vals = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(polys),))
    if draw.mode != "F":
        vals = vals.round().astype(int)
    for poly, v in zip(polys.reshape(len(polys), -1).tolist(), vals.tolist(), strict=True):
        draw.polygon(poly, fill=v)  # flat [x0, y0, x1, y1, ...]


def disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r
