"""Tiled pyramidal TIFFs written piece by piece with tifffile (test slides, probability maps, masks).

Levels are successive pages, each `downsample` times smaller, with resolution tags in centimetres: the
generic layout OpenSlide reads ("generic-tiff", with its um/px) and QuPath opens. Every tile of every level
comes from `render(x, y, w, h, ds)`, so a slide or a map of any size is written without being held whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from medstudent.atomic import atomic_path

Render = Callable[[int, int, int, int, int], np.ndarray]  # (x, y, w, h, ds) -> (h, w[, C]) uint8


def pyramid_levels(width: int, height: int, downsample: int = 4, min_side: int = 512) -> list[int]:
    """Downsample factors of the levels: 1, d, d^2, ... until the longer side is under `min_side`."""
    levels = [1]
    while max(width, height) / (levels[-1] * downsample) >= min_side:
        levels.append(levels[-1] * downsample)
    return levels


def write_pyramid(
    path: str | Path,
    width: int,
    height: int,
    render: Render,
    mpp: float | None,
    channels: int = 3,
    tile: int = 256,
    downsample: int = 4,
    min_side: int = 512,
    compression: str = "zlib",
) -> Path:
    """Write a (height, width[, channels]) uint8 image as a tiled pyramid at `mpp` um/px (level 0; None:
    no resolution tags). Written to a temp file and renamed, so a crash never leaves half a pyramid."""
    path = Path(path)
    photometric = "rgb" if channels == 3 else "minisblack"
    with atomic_path(path, fsync=False) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, ds in enumerate(pyramid_levels(width, height, downsample, min_side)):
            w, h = math.ceil(width / ds), math.ceil(height / ds)
            shape = (h, w, channels) if channels > 1 else (h, w)

            def tiles(w: int = w, h: int = h, ds: int = ds):
                for ty in range(0, h, tile):
                    for tx in range(0, w, tile):
                        block = np.zeros((tile, tile, channels) if channels > 1 else (tile, tile), np.uint8)
                        bw, bh = min(tile, w - tx), min(tile, h - ty)
                        block[:bh, :bw] = render(tx, ty, bw, bh, ds)
                        yield block

            res = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * ds)
                res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                tiles(),
                shape=shape,
                dtype=np.uint8,
                tile=(tile, tile),
                photometric=photometric,
                compression=compression,
                subfiletype=1 if k else 0,
                **res,
            )
    return path


def array_render(a: np.ndarray, mode: str = "mean") -> Render:
    """`render` over a 2-D or (H, W, C) uint8 array (a memmap is fine): levels by block mean ("mean",
    for probabilities and images) or by the block's maximum ("max", for masks: objects stay visible)."""

    def render(x: int, y: int, w: int, h: int, ds: int) -> np.ndarray:
        block = np.asarray(a[y * ds : (y + h) * ds, x * ds : (x + w) * ds])
        if ds == 1:
            return block
        bh, bw = block.shape[:2]
        ph, pw = h * ds - bh, w * ds - bw  # the last row/column of blocks may be partial: pad by edge
        if ph or pw:
            pad = ((0, ph), (0, pw)) + (((0, 0),) if block.ndim == 3 else ())
            block = np.pad(block, pad, mode="edge")
        blocks = block.reshape(h, ds, w, ds, *block.shape[2:])
        if mode == "max":
            return blocks.max(axis=(1, 3))
        return (blocks.mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)

    return render
