"""One slide in, its outputs out: `predict_slide`.

Outputs in `out` (see README "Whole slides"): `prob.tif` (probability pyramid, uint8 0-255, at the map's
um/px), `mask.tif` (0/255, or class ids for multi-class models), `objects.geojson` (QuPath-importable
polygons in full-resolution slide coordinates), `tissue.png`, `overlay.png` (thumbnail with the objects
outlined) and `summary.json`. The working maps are memmaps in `out` and are removed at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from medstudent.atomic import write_text_atomic
from medstudent.core.inferer import Engine
from medstudent.core.overlay import overlay
from medstudent.data.pyramid import array_render, write_pyramid
from medstudent.data.qupath import features, mask_to_polygons, write_geojson
from medstudent.data.slide import Slide
from medstudent.data.tissue import THUMBNAIL_MPP, tissue_mask
from medstudent.errors import DataError
from medstudent.slides.outputs import class_color, island_mask, islands, object_stats, scaled_postprocess
from medstudent.slides.stream import (
    MARGIN,
    OUT_FACTOR,
    REGION,
    open_map,
    predict_regions,
    slide_grid,
    tissue_regions,
)

OVERLAY_SIDE = 2048  # longest side of overlay.png (pixels)


def _png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)


def _overlay(slide: Slide, mask: np.ndarray, out_mpp: float) -> np.ndarray:
    """A thumbnail of at most OVERLAY_SIDE px with the objects outlined."""
    w0, h0 = slide.dimensions
    mpp = max(out_mpp, max(w0, h0) * slide.mpp / OVERLAY_SIDE)
    thumb = slide.thumbnail(mpp)
    ds = max(1, math.floor(mpp / out_mpp))
    oh, ow = mask.shape[:2]
    small = array_render(mask, "max")(0, 0, math.ceil(ow / ds), math.ceil(oh / ds), ds)
    small = cv2.resize(small, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)
    return overlay(thumb, small > 0, alpha=0.25)


def predict_slide(
    engine: Engine,
    slide_path: str | Path,
    out: str | Path,
    *,
    slide_mpp: float | None = None,
    model_mpp: float | None = None,
    tta: str | None = None,
    tile: int | None = None,
    scales: list[float] | None = None,
    postprocess: bool = True,
    tissue: bool = True,
    region: int = REGION,
    margin: int = MARGIN,
    out_factor: int = OUT_FACTOR,
    prefetch: int = 2,
    on_region: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Predict one slide with `engine` and write its outputs into `out`; returns the summary.

    slide_mpp: the slide's um/px when its metadata has none; model_mpp: the model's when its run did not
    record `data.mpp`. tissue=False predicts every region (no tissue detection). out_factor: the maps are
    written at 1/out_factor of the network's resolution."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = engine.spec
    with Slide(slide_path, mpp=slide_mpp) as slide:
        grid = slide_grid(engine, slide, model_mpp, region=region, margin=margin, out_factor=out_factor)
        thumb_mpp = max(THUMBNAIL_MPP, slide.mpp)
        tissue_map = None
        tissue_mm2 = slide.area_mm2
        if tissue:
            tissue_map = tissue_mask(slide.thumbnail(thumb_mpp), thumb_mpp)
            _png(out / "tissue.png", tissue_map.astype(np.uint8) * 255)
            tissue_mm2 = float(tissue_map.sum()) * (thumb_mpp / 1000) ** 2
            if not tissue_map.any():
                why = "no tissue found (saturation threshold); --no-tissue skips detection"
                raise DataError(slide.path, why)
        boxes = tissue_regions(grid, tissue_map, thumb_mpp)
        channels = 1 if spec.binary else len(spec.class_names)
        prob = open_map(out / "prob.npy", grid, channels)
        stats = predict_regions(
            engine, slide, grid, boxes, prob, tta=tta, tile=tile, scales=scales, prefetch=prefetch,
            on_region=on_region,
        )  # fmt: skip
        cfg = spec.postprocess if postprocess and spec.postprocess is not None else None
        cfg = scaled_postprocess(cfg, grid.model_mpp, grid.out_mpp) if cfg is not None else None
        mask = open_map(out / "mask.npy", grid, 1)
        scale = grid.out_mpp / slide.mpp  # level-0 pixels per map pixel
        polygons: dict[int, list] = {}
        areas: list[float] = []
        for isl in islands(grid, boxes):
            m = island_mask(prob, isl, cfg, spec.binary)
            view = mask[isl.y : isl.y + isl.h, isl.x : isl.x + isl.w]
            view[isl.owned] = m[isl.owned]
            areas += object_stats(m, grid.out_mpp)
            for label, polys in mask_to_polygons(m, scale, (isl.x * scale, isl.y * scale)).items():
                polygons.setdefault(int(label), []).extend(polys)
        names = {k: spec.class_names[k] for k in range(1, len(spec.class_names))}
        collection = features(polygons, names, {k: class_color(k) for k in names})
        for f in collection["features"]:  # QuPath shows measurements per object; add the area in um^2
            m = f["properties"]["measurements"]
            m["Area um^2"] = round(m["Area px^2"] * slide.mpp**2, 3)
        write_geojson(out / "objects.geojson", collection)
        fg = prob if spec.binary else _foreground(prob)
        write_pyramid(out / "prob.tif", *grid.out_size, array_render(fg, "mean"), grid.out_mpp, channels=1)
        shown = mask if not spec.binary else _times255(mask)
        write_pyramid(out / "mask.tif", *grid.out_size, array_render(shown, "max"), grid.out_mpp, channels=1)
        _png(out / "overlay.png", _overlay(slide, mask, grid.out_mpp))
        seconds = time.perf_counter() - t0
        summary = {
            "slide": str(slide.path),
            "slide_mpp": slide.mpp,
            "slide_mpp_source": slide.mpp_source,
            "slide_size": list(slide.dimensions),
            "model_mpp": grid.model_mpp,
            "map_mpp": grid.out_mpp,
            "map_size": list(grid.out_size),
            "tissue_area_mm2": round(tissue_mm2, 4),
            "regions": stats.regions,
            "regions_total": len(grid.regions()),
            "object_count": len(areas),
            "object_area_mm2": round(sum(areas) / 1e6, 6),
            "largest_object_mm2": round(max(areas, default=0.0) / 1e6, 6),
            "min_area_um2": (cfg.min_area * grid.out_mpp**2) if cfg is not None else 0.0,
            "seconds": round(seconds, 3),
            "read_seconds": round(stats.read_s, 3),
            "read_mpp": grid.model_mpp / stats.read_scale,  # the network's when a level is there
            "whole_input_layers": spec.whole_input_layers(),
            "predict_seconds": round(stats.predict_s, 3),
            "regions_per_s": round(stats.regions / stats.seconds, 4) if stats.seconds > 0 else None,
            "region_px": grid.region,
            "engine": {"device": engine.device, "precision": engine.precision},
            "tta": tta or spec.tta,
        }
    del prob, mask  # close the memmaps before their files go
    for name in ("prob.npy", "mask.npy"):
        (out / name).unlink(missing_ok=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _foreground(prob: np.ndarray):
    """Multi-class maps: 1 - p(background) per pixel, computed block by block by the pyramid writer."""

    class Foreground:
        shape = prob.shape[:2]

        def __getitem__(self, key):
            return 255 - np.asarray(prob[key])[..., 0]

    return Foreground()


def _times255(mask: np.ndarray):
    class Scaled:
        shape = mask.shape

        def __getitem__(self, key):
            return np.asarray(mask[key]) * np.uint8(255)

    return Scaled()
