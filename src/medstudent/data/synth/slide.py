"""Test slides made by the project: pyramidal TIFFs written with tifffile (no slide is ever downloaded).

A `Canvas` is a white slide with RGB islands pasted at level-0 positions (synthetic STAS fields, or real
tiles in benchmarks). `write_pyramid_tiff` streams it tile by tile into a generic tiled pyramidal TIFF
(`data.pyramid`), which OpenSlide reads with its um/px, so a 40,000 px slide is written without holding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medstudent.data.pyramid import write_pyramid
from medstudent.data.synth.stas import render_stas


@dataclass
class Island:
    x: int  # level-0 position of the top-left corner
    y: int
    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray | None = None  # (h, w) uint8 ground truth, when known

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.image.shape[1], self.image.shape[0]


@dataclass
class Canvas:
    """A white slide of width x height level-0 pixels with islands on it."""

    width: int
    height: int
    islands: list[Island] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def _scaled(self, i: int, ds: int) -> np.ndarray:
        key = (i, ds)
        if key not in self._cache:
            img = self.islands[i].image
            if ds == 1:
                self._cache[key] = img
            else:
                h, w = img.shape[:2]
                size = (max(1, round(w / ds)), max(1, round(h / ds)))
                self._cache[key] = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
        return self._cache[key]

    def render(self, x: int, y: int, w: int, h: int, ds: int = 1) -> np.ndarray:
        """(h, w, 3) uint8 of the box (x, y, w, h) in the grid `ds` times coarser than level 0."""
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        for i, isl in enumerate(self.islands):
            src = self._scaled(i, ds)
            ix, iy = round(isl.x / ds), round(isl.y / ds)
            x0, y0 = max(x, ix), max(y, iy)
            x1, y1 = min(x + w, ix + src.shape[1]), min(y + h, iy + src.shape[0])
            if x0 < x1 and y0 < y1:
                out[y0 - y : y1 - y, x0 - x : x1 - x] = src[y0 - iy : y1 - iy, x0 - ix : x1 - ix]
        return out

    def truth(self, ds: int = 1) -> np.ndarray:
        """The islands' masks on the whole slide, `ds` times coarser than level 0 (uint8)."""
        h, w = math.ceil(self.height / ds), math.ceil(self.width / ds)
        out = np.zeros((h, w), dtype=np.uint8)
        for isl in self.islands:
            if isl.mask is None:
                continue
            m = isl.mask[::ds, ::ds]
            ix, iy = math.ceil(isl.x / ds), math.ceil(isl.y / ds)
            hh, ww = min(m.shape[0], h - iy), min(m.shape[1], w - ix)
            out[iy : iy + hh, ix : ix + ww] = np.maximum(out[iy : iy + hh, ix : ix + ww], m[:hh, :ww])
        return out


def write_pyramid_tiff(
    path: str | Path,
    canvas: Canvas,
    mpp: float,
    tile: int = 256,
    with_resolution: bool = True,
    downsample: int = 4,
) -> Path:
    """Write `canvas` as a tiled pyramidal TIFF at `mpp` um/px (level 0), each level `downsample` times
    coarser (4 as SVS; 2 as MRXS and many OME-TIFFs). with_resolution=False leaves out the resolution
    tags (a slide without um/px, for the error path)."""
    return write_pyramid(
        path,
        canvas.width,
        canvas.height,
        canvas.render,
        mpp if with_resolution else None,
        tile=tile,
        downsample=downsample,
    )


def synthetic_stas_canvas(
    width: int,
    height: int,
    n_islands: int,
    seed: int = 0,
    island: tuple[int, int] = (512, 288),
    gap: int = 64,
) -> Canvas:
    """A white slide with `n_islands` synthetic STAS fields (with their masks) on a grid with gaps."""
    rng = np.random.default_rng(seed)
    canvas = Canvas(width, height)
    iw, ih = island
    cols = max(1, (width - gap) // (iw + gap))
    for i in range(n_islands):
        r, c = divmod(i, cols)
        x, y = gap + c * (iw + gap), gap + r * (ih + gap)
        if x + iw > width or y + ih > height:
            raise ValueError(f"{n_islands} islands of {iw}x{ih} do not fit a {width}x{height} slide")
        img, mask = render_stas(np.random.default_rng([seed, i]), iw, ih, with_stas=bool(rng.random() < 0.8))
        canvas.islands.append(Island(x, y, img, mask))
    return canvas
