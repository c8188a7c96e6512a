"""Streaming whole-slide inference: regions with context margins, read ahead by a thread, predicted by
the core, written at a reduced resolution into a file-backed map.

The slide is cut, at the model's um/px, into square regions of `region` px with a `margin` of context on
every side. Only regions that touch tissue are read. A reader thread keeps `prefetch` regions ahead of
the network (OpenSlide handles are thread-safe and release the GIL while decoding), so reading overlaps
compute. Each region goes through `core.inferer.predict_probs` - preprocessing, the Gaussian-blended
sliding window when the region or `tile` asks for it, TTA, scales, the ensemble - exactly as an image
given to `medstudent predict`, so both engines and every option work on slides unchanged. The margin is
cut off and the rest averaged down by `out_factor` into a uint8 memmap (0-255 probabilities): peak memory
is a few regions in flight, whatever the slide's size.

When the slide's pyramid has a level at the network's own um/px (the model's um/px divided by its `scale`
< 1, e.g. level 1 of a 40x slide for a model trained at 0.5 um/px on half-size inputs), regions are read from
that level as they are instead of reading the finer level and resizing twice (slide -> model um/px ->
network): the scanner already downsampled those pixels, and the reader thread, which competes with the
network for the same cores, decodes 4x to 16x fewer pixels.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medstudent.core.contract import PipelineSpec
from medstudent.core.inferer import Engine, predict_probs, prepare_inputs
from medstudent.data.slide import MPP_TOLERANCE, Slide
from medstudent.errors import DataError

REGION = 2048  # region side at the model's um/px (pixels), before the margins
MARGIN = 256  # context on each side; predictions there are cut off
OUT_FACTOR = 4  # the maps are written at 1/4 of the network's resolution


@dataclass(frozen=True)
class SlideGrid:
    """Where the model reads and where the maps are written, all derived from um/px."""

    model_mpp: float  # um/px of the images the model was trained on (its input before `scale`)
    net_scale: float  # the contract's `scale`: the network sees model_mpp / net_scale
    out_factor: int  # map pixels per network pixel (1/out_factor resolution)
    width: int  # slide size at model_mpp
    height: int
    region: int  # region side (model pixels), a multiple of `step`
    margin: int

    @property
    def step(self) -> int:
        """Model pixels per map pixel (an integer: the regions tile the map exactly)."""
        return max(1, round(self.out_factor / self.net_scale))

    @property
    def out_mpp(self) -> float:
        return self.model_mpp * self.step

    @property
    def out_size(self) -> tuple[int, int]:
        return math.ceil(self.width / self.step), math.ceil(self.height / self.step)

    def regions(self) -> list[tuple[int, int]]:
        """Top-left corners (model pixels) of the regions, row by row."""
        return [(x, y) for y in range(0, self.height, self.region) for x in range(0, self.width, self.region)]


def slide_grid(
    engine: Engine,
    slide: Slide,
    model_mpp: float | None = None,
    region: int = REGION,
    margin: int = MARGIN,
    out_factor: int = OUT_FACTOR,
) -> SlideGrid:
    """The grid for `slide` and `engine`: model_mpp from the argument, else the contract's (`data.mpp`)."""
    spec = engine.spec
    if spec.task != "segmentation":
        raise DataError(slide.path, "predict-slide needs a segmentation model (this one classifies)")
    mpp = model_mpp or spec.mpp
    if mpp is None:
        raise DataError(slide.path, "the model records no um/px (train with data.mpp=...); pass --model-mpp")
    pre = spec.members[0].preprocess
    if any(m.preprocess.resize for m in spec.members):
        raise DataError(slide.path, "the model resizes images to a fixed size; slides need a fixed um/px")
    step = max(1, round(out_factor / pre.scale))
    region = max(step, region // step * step)
    margin = math.ceil(margin / step) * step
    width, height = slide.size_at(mpp)
    return SlideGrid(float(mpp), float(pre.scale), out_factor, width, height, region, margin)


def tissue_regions(grid: SlideGrid, tissue: np.ndarray | None, tissue_mpp: float) -> list[tuple[int, int]]:
    """The regions (with their margins) that touch tissue; all of them without a tissue mask."""
    if tissue is None:
        return grid.regions()
    f = grid.model_mpp / tissue_mpp  # tissue pixels per model pixel
    out = []
    th, tw = tissue.shape
    for x, y in grid.regions():
        x0, y0 = max(0, math.floor((x - grid.margin) * f)), max(0, math.floor((y - grid.margin) * f))
        x1 = min(tw, math.ceil((x + grid.region + grid.margin) * f))
        y1 = min(th, math.ceil((y + grid.region + grid.margin) * f))
        if x0 < x1 and y0 < y1 and tissue[y0:y1, x0:x1].any():
            out.append((x, y))
    return out


def read_scale(slide: Slide, grid: SlideGrid, spec: PipelineSpec) -> float:
    """grid.net_scale when regions can be read at the network's um/px straight from a pyramid level (one
    within MPP_TOLERANCE, with the region, margin and map step whole pixels there), else 1.0 (read at the
    model's um/px; the contract resizes). Only for networks that see fewer pixels than the model's um/px
    has (scale < 1), and only when every member of an ensemble works at that scale: a member at a finer
    scale would otherwise get upsampled pixels."""
    s = grid.net_scale
    if s >= 1.0 or any(m.preprocess.scale != s for m in spec.members):
        return 1.0
    net_mpp = grid.model_mpp / s
    level_mpp = slide.mpp * slide.level_downsamples[slide.level_for(net_mpp)]
    whole = all(abs(v * s - round(v * s)) < 1e-9 for v in (grid.region, grid.margin, grid.step))
    return s if whole and abs(level_mpp / net_mpp - 1) < MPP_TOLERANCE else 1.0


def _read_ahead(
    slide: Slide,
    grid: SlideGrid,
    boxes: list[tuple[int, int]],
    prefetch: int,
    prepare: Callable[[np.ndarray], Any] | None = None,
    scale: float = 1.0,
) -> Iterator[tuple[tuple[int, int], tuple[np.ndarray, Any], float]]:
    """(box, (region image with margins, its prepared network inputs), seconds spent reading and preparing)
    in order, `prefetch` regions ahead of the caller. scale: read at that multiple of the model's
    resolution (`read_scale`)."""
    side = round((grid.region + 2 * grid.margin) * scale)

    def read(box: tuple[int, int]) -> tuple[tuple[np.ndarray, Any], float]:
        t = time.perf_counter()
        x, y = round((box[0] - grid.margin) * scale), round((box[1] - grid.margin) * scale)
        img = slide.read(x, y, side, side, grid.model_mpp / scale)
        ready = prepare(img) if prepare is not None else None
        return (img, ready), time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-reader") as pool:
        pending: deque = deque()
        it = iter(boxes)
        for box in it:
            pending.append((box, pool.submit(read, box)))
            if len(pending) >= prefetch:
                break
        while pending:
            box, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            img, seconds = fut.result()
            yield box, img, seconds


def _to_map(probs: np.ndarray, grid: SlideGrid, w: int, h: int, scale: float = 1.0) -> np.ndarray:
    """Region probabilities at `scale` x model resolution (margins included) -> uint8 map block
    (h, w[, K])."""
    m, step = round(grid.margin * scale), round(grid.step * scale)
    arr = probs[..., m : m + h * step, m : m + w * step]
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    small = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA) if step > 1 else arr
    return np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)


@dataclass
class StreamStats:
    regions: int = 0
    regions_total: int = 0
    read_s: float = 0.0
    predict_s: float = 0.0
    seconds: float = 0.0
    read_scale: float = 1.0  # `read_scale`: 1.0, or the network's scale when read from its own level


def predict_regions(
    engine: Engine,
    slide: Slide,
    grid: SlideGrid,
    boxes: list[tuple[int, int]],
    out_map: np.ndarray,
    *,
    tta: str | None = None,
    tile: int | None = None,
    scales: list[float] | None = None,
    prefetch: int = 2,
    on_region: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> StreamStats:
    """Predict `boxes` of `slide` into `out_map` ((H, W) or (H, W, K) uint8, at grid.out_size).

    Binary models write the foreground probability; multi-class ones all K class probabilities."""
    stats = StreamStats(regions_total=len(boxes))
    t0 = time.perf_counter()
    ow, oh = grid.out_size
    rs = read_scale(slide, grid, engine.spec)
    stats.read_scale = rs
    # an image read at rs x the model's resolution needs the contract's resize divided by rs
    factors = [f / rs for f in engine.spec.scale_factors(scales)]

    def ready(img: np.ndarray) -> dict:  # resizing and normalising happen in the reader thread too
        return prepare_inputs(engine, img, scales=factors)

    regions = _read_ahead(slide, grid, boxes, max(1, prefetch), ready, scale=rs)
    for n, (box, (img, prepared), read_s) in enumerate(regions, 1):
        if stop is not None and stop.is_set():
            break
        t = time.perf_counter()
        probs = predict_probs(engine, img, tta=tta, tile=tile, scales=factors, prepared=prepared)
        mx, my = box[0] // grid.step, box[1] // grid.step
        w, h = min(grid.region // grid.step, ow - mx), min(grid.region // grid.step, oh - my)
        out_map[my : my + h, mx : mx + w] = _to_map(probs, grid, w, h, rs)
        stats.predict_s += time.perf_counter() - t
        stats.read_s += read_s
        stats.regions = n
        if on_region is not None:
            on_region(n, len(boxes))
    stats.seconds = time.perf_counter() - t0
    return stats


def open_map(path: Path, grid: SlideGrid, channels: int) -> np.ndarray:
    """A zeroed uint8 map on disk (np.memmap): pages go to the file, not to the process's heap."""
    ow, oh = grid.out_size
    shape = (oh, ow) if channels == 1 else (oh, ow, channels)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
