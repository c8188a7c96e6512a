"""Whole-slide images read at a physical resolution (micrometres per pixel), through OpenSlide.

Everything above this module speaks um/px, never level indices: `Slide.read(x, y, w, h, mpp)` returns the
box (x, y, w, h) of the slide's pixel grid at `mpp`, read from the finest level that is not coarser than
`mpp` and resized down to it (a level that matches exactly is read as is). Vendor formats (SVS, NDPI, MRXS,
SCN, ...) and generic pyramidal TIFF go through `openslide.open_slide` (the library comes in the
`openslide-bin` wheel); it falls back to Pillow for a plain image, which then needs `--mpp`.

Every failure is a `DataError` naming the slide and the reason, so a cohort can skip one slide and go on.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from medstudent.errors import DataError

# Suffixes taken for slides when a folder is given (OpenSlide's formats, plus plain TIFF).
SLIDE_EXTS = {".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".tif", ".tiff"}
MPP_TOLERANCE = 1e-3  # a level within 0.1% of the requested um/px is read without resizing
MAX_READ_PIXELS = 4096 * 4096  # one read_region call at most (the thumbnail reads in blocks)


def _metadata_mpp(handle: openslide.AbstractSlide) -> float | None:
    """Level-0 um/px from OpenSlide's properties, or None when absent or implausible."""
    props = handle.properties
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            values.append(float(props[key]))
        except (KeyError, ValueError, TypeError):
            return None
    if not all(math.isfinite(v) and 0.01 <= v <= 1000 for v in values):
        return None
    return float(np.mean(values))  # anisotropic pixels are rare on scanners; the mean is within their spread


class Slide:
    """An open slide with its level-0 um/px. Use as a context manager (closes the OpenSlide handle)."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "no such slide file")
        try:
            self._handle = openslide.open_slide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise DataError(self.path, "not a slide OpenSlide can read (unsupported or corrupt)") from None
        except (openslide.OpenSlideError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(self.path, f"cannot open slide ({type(e).__name__}: {e})") from None
        found = _metadata_mpp(self._handle)
        if found is None and mpp is None:
            self.close()
            raise DataError(self.path, "the slide has no um/px in its metadata; pass --mpp")
        if found is None and not (mpp is not None and math.isfinite(mpp) and mpp > 0):
            self.close()
            raise DataError(self.path, f"--mpp must be a positive number of um/px, got {mpp}")
        self.mpp: float = float(found if found is not None else mpp)  # type: ignore[arg-type]
        self.mpp_source = "metadata" if found is not None else "--mpp"
        self.dimensions: tuple[int, int] = tuple(self._handle.dimensions)  # type: ignore[assignment]
        self.level_downsamples: tuple[float, ...] = tuple(self._handle.level_downsamples)
        if min(self.dimensions) < 1:
            self.close()
            raise DataError(self.path, f"the slide is empty ({self.dimensions[0]}x{self.dimensions[1]} px)")

    # -- lifetime
    def close(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- geometry
    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the slide's pixel grid at `mpp` um/px."""
        f = self.mpp / mpp
        return max(1, round(self.dimensions[0] * f)), max(1, round(self.dimensions[1] * f))

    def level_for(self, mpp: float) -> int:
        """The coarsest level whose um/px is not coarser than `mpp` (so reads only ever downsample)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if self.mpp * ds <= mpp * (1 + MPP_TOLERANCE):
                best = i if ds >= self.level_downsamples[best] else best
        return best

    @property
    def area_mm2(self) -> float:
        return self.dimensions[0] * self.dimensions[1] * (self.mpp / 1000) ** 2

    # -- pixels
    def read(self, x: int, y: int, w: int, h: int, mpp: float) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the box at (x, y) in the slide's grid at `mpp`; outside the slide and
        transparent (unscanned) areas are white, as on glass."""
        if w < 1 or h < 1:
            raise ValueError(f"empty read box {w}x{h}")
        if self._handle is None:
            raise DataError(self.path, "slide is closed")
        f = mpp / self.mpp  # level-0 pixels per output pixel
        level = self.level_for(mpp)
        ds = self.level_downsamples[level]
        # the box in level pixels (floats), then the whole pixels that cover it
        lx0, ly0 = x * f / ds, y * f / ds
        lx1, ly1 = (x + w) * f / ds, (y + h) * f / ds
        ix0, iy0 = math.floor(lx0), math.floor(ly0)
        iw, ih = max(1, math.ceil(lx1) - ix0), max(1, math.ceil(ly1) - iy0)
        if iw * ih > MAX_READ_PIXELS * 4:
            raise ValueError(f"read of {iw}x{ih} level pixels is too large; read in blocks")
        try:
            region = self._handle.read_region((round(ix0 * ds), round(iy0 * ds)), level, (iw, ih))
        except (openslide.OpenSlideError, OSError, ValueError) as e:
            why = f"cannot read region at level {level} ({type(e).__name__}: {e})"
            raise DataError(self.path, why) from None
        rgba = np.asarray(region, dtype=np.uint8)
        rgb = _on_white(rgba)
        exact = abs(f / ds - 1) < MPP_TOLERANCE and lx0 == ix0 and ly0 == iy0
        if exact:
            return np.ascontiguousarray(rgb[:h, :w]) if rgb.shape[:2] != (h, w) else rgb
        img = Image.fromarray(rgb).resize(
            (w, h), Image.Resampling.BILINEAR, box=(lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        )
        return np.asarray(img, dtype=np.uint8)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at `mpp` (a coarse resolution), read in blocks so no single read is huge."""
        w, h = self.size_at(mpp)
        f = mpp / self.mpp / self.level_downsamples[self.level_for(mpp)]
        block = max(64, int(math.sqrt(MAX_READ_PIXELS) / max(f, 1.0)))
        out = np.empty((h, w, 3), dtype=np.uint8)
        for by in range(0, h, block):
            for bx in range(0, w, block):
                bw, bh = min(block, w - bx), min(block, h - by)
                out[by : by + bh, bx : bx + bw] = self.read(bx, by, bw, bh, mpp)
        return out


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGBA region composited on white (OpenSlide returns un-premultiplied RGBA)."""
    if rgba.ndim == 2:
        return np.repeat(rgba[..., None], 3, axis=2)
    rgb = np.ascontiguousarray(rgba[..., :3])
    if rgba.shape[2] == 3:
        return rgb
    alpha = rgba[..., 3]
    clear = alpha < 255
    if not clear.any():  # the usual case inside a slide: opaque
        return rgb
    a = alpha[clear].astype(np.float32)[:, None] / 255.0
    rgb[clear] = np.clip(rgb[clear] * a + 255.0 * (1 - a) + 0.5, 0, 255).astype(np.uint8)
    return rgb


def list_slides(sources: list[str | Path]) -> list[Path]:
    """Slides from files and folders (a folder: its files with a slide suffix, sorted); a missing path is
    a one-line error."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_EXTS))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(p, "no such slide file or folder")
    if not out:
        raise DataError(Path(sources[0]) if sources else None, "no slides found")
    return out
