"""From a slide's probability map to its outputs: mask, objects (QuPath GeoJSON), pyramids, overlay.

Post-processing runs in slide coordinates, island by island: the predicted regions are grouped into
8-connected groups (`islands`) and each group is post-processed on its own crop, so memory follows the
largest piece of tissue, not the slide. The run's settings were tuned in pixels of its training images;
here they are converted through um/px (`scaled_postprocess`): a minimum area is an area in um^2, a
closing radius a length in um. Filling objects open to the image border is for tiles cut out of a slide;
a slide has no such border, so it is off here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medstudent.config import PostprocessConfig
from medstudent.core.postprocess import postprocess, remove_small
from medstudent.slides.stream import SlideGrid

# QuPath colours per class id (class 1: the prediction colour of the overlays, yellow on H&E)
CLASS_COLORS = [(255, 221, 0), (0, 200, 255), (255, 96, 0), (0, 230, 64), (160, 64, 255), (255, 0, 128)]


def class_color(label: int) -> tuple[int, int, int]:
    return CLASS_COLORS[(label - 1) % len(CLASS_COLORS)]


def scaled_postprocess(cfg: PostprocessConfig, model_mpp: float, out_mpp: float) -> PostprocessConfig:
    """The run's post-processing for maps at out_mpp: areas and radii kept in um^2 and um."""
    f = model_mpp / out_mpp  # map pixels per model pixel (< 1)
    return cfg.model_copy(
        update={
            "min_area": math.ceil(cfg.min_area * f * f) if cfg.min_area else 0,
            "closing": max(1, round(cfg.closing * f)) if cfg.closing else 0,
            "fill_border": False,
        }
    )


@dataclass
class Island:
    """A group of predicted regions: its bounding box in map pixels and which map pixels it owns."""

    x: int
    y: int
    w: int
    h: int
    owned: np.ndarray  # (h, w) bool: the pixels of the group's regions


def islands(grid: SlideGrid, boxes: list[tuple[int, int]]) -> list[Island]:
    """8-connected groups of the predicted regions, in map pixels."""
    if not boxes:
        return []
    r = grid.region
    cols, rows = math.ceil(grid.width / r), math.ceil(grid.height / r)
    cells = np.zeros((rows, cols), dtype=bool)
    for x, y in boxes:
        cells[y // r, x // r] = True
    labels, n = ndi.label(cells, structure=np.ones((3, 3)))
    ow, oh = grid.out_size
    cell = r // grid.step  # map pixels per region
    out = []
    for sl, k in zip(ndi.find_objects(labels), range(1, n + 1), strict=True):
        x0, y0 = sl[1].start * cell, sl[0].start * cell
        x1, y1 = min(ow, sl[1].stop * cell), min(oh, sl[0].stop * cell)
        own = np.kron(labels[sl] == k, np.ones((cell, cell), dtype=bool))[: y1 - y0, : x1 - x0]
        out.append(Island(x0, y0, x1 - x0, y1 - y0, own))
    return out


def island_mask(prob: np.ndarray, island: Island, cfg: PostprocessConfig | None, binary: bool) -> np.ndarray:
    """uint8 labels of one island's crop of the map: 0/1 for binary models, class ids otherwise."""
    crop = np.asarray(prob[island.y : island.y + island.h, island.x : island.x + island.w])
    if binary:
        p = crop.astype(np.float32) / 255.0
        p[~island.owned] = 0
        mask = postprocess(p, cfg) if cfg is not None else (p > 0.5).astype(np.uint8)
        return mask * island.owned
    labels = crop.argmax(axis=2).astype(np.uint8)
    labels[~island.owned] = 0
    if cfg is not None and cfg.min_area > 0:  # multi-class: each class's small objects are dropped
        for k in np.unique(labels[labels > 0]):
            keep = remove_small(labels == k, cfg.min_area)
            labels[(labels == k) & ~keep] = 0
    return labels


def object_stats(mask_crop: np.ndarray, out_mpp: float) -> list[float]:
    """Areas (um^2) of the 8-connected objects of a label crop (any class)."""
    labels, n = ndi.label(mask_crop > 0, structure=np.ones((3, 3)))
    if not n:
        return []
    return [float(a) * out_mpp * out_mpp for a in np.bincount(labels.ravel())[1:]]
