"""`medstudent data stats`: per-image and per-object lesion statistics, to CSV and plots.

STAS targets range from a few pixels to hundreds of thousands; the box plot uses a log axis to show that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from medstudent.atomic import atomic_path
from medstudent.data.layouts import SegmentationDataset, open_segmentation
from medstudent.errors import DataError


def object_table(mask: np.ndarray) -> list[dict]:
    """One row per connected object (8-connectivity) of every class: class, area, bbox, border flag."""
    rows = []
    h, w = mask.shape
    for cls in [int(c) for c in np.unique(mask) if c != 0]:
        labels, n = ndimage.label(mask == cls, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            ys, xs = sl
            rows.append(
                {
                    "class_id": cls,
                    "object": k,
                    "area_px": int(areas[k - 1]),
                    "bbox_x": xs.start,
                    "bbox_y": ys.start,
                    "bbox_w": xs.stop - xs.start,
                    "bbox_h": ys.stop - ys.start,
                    "touches_border": bool(xs.start == 0 or ys.start == 0 or xs.stop == w or ys.stop == h),
                }
            )
    return rows


def lesion_stats(
    ds: SegmentationDataset, skip_bad: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(per-image table, per-object table, skipped files)."""
    images, objects, skipped = [], [], []
    for i, it in enumerate(ds.items):
        try:
            img, mask = ds.load(i)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        objs = object_table(mask)
        fg = int((mask > 0).sum())
        images.append(
            {
                "id": it.id,
                "width": mask.shape[1],
                "height": mask.shape[0],
                "objects": len(objs),
                "foreground_px": fg,
                "area_fraction": fg / mask.size,
                "objects_touching_border": sum(o["touches_border"] for o in objs),
            }
        )
        objects += [{"id": it.id, **o, "area_fraction": o["area_px"] / mask.size} for o in objs]
    obj_cols = [
        "id",
        "class_id",
        "object",
        "area_px",
        "bbox_x",
        "bbox_y",
        "bbox_w",
        "bbox_h",
        "touches_border",
        "area_fraction",
    ]
    return pd.DataFrame(images), pd.DataFrame(objects, columns=obj_cols), skipped


def write_stats(
    root: str | Path, out: str | Path, skip_bad: bool = False, empty_if_missing: bool = False
) -> dict:
    """Write images.csv, objects.csv, objects_per_image.png, object_areas.png and return a summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = open_segmentation(root, empty_if_missing=empty_if_missing)
    if not empty_if_missing:
        ds.require_complete()
    per_image, per_object, skipped = lesion_stats(ds, skip_bad=skip_bad)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("images.csv", per_image), ("objects.csv", per_object)):
        with atomic_path(out / name, fsync=False) as tmp:
            table.to_csv(tmp, index=False)

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = per_image["objects"] if len(per_image) else pd.Series([0])
    ax.hist(counts, bins=np.arange(counts.max() + 2) - 0.5, color="#7b3294", edgecolor="white")
    ax.set(xlabel="objects per image", ylabel="images", title=f"{Path(root).name}: objects per image")
    fig.tight_layout()
    with atomic_path(out / "objects_per_image.png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if len(per_object):
        ax.boxplot([per_object["area_px"].to_numpy()], vert=True, whis=(0, 100), widths=0.5)
        ax.scatter(
            1 + np.random.default_rng(0).uniform(-0.15, 0.15, len(per_object)),
            per_object["area_px"],
            s=4,
            alpha=0.4,
            color="#c2a5cf",
        )
        ax.set_yscale("log")
    ax.set(
        ylabel="object area (pixels, log scale)",
        xticks=[1],
        xticklabels=["objects"],
        title=f"{len(per_object)} objects in {len(per_image)} images",
    )
    fig.tight_layout()
    with atomic_path(out / "object_areas.png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    area = per_object["area_px"] if len(per_object) else pd.Series([0])
    summary = {
        "images": len(per_image),
        "objects": len(per_object),
        "empty_images": int((per_image["objects"] == 0).sum()) if len(per_image) else 0,
        "mean_area_fraction": float(per_image["area_fraction"].mean()) if len(per_image) else 0.0,
        "object_area_min": int(area.min()),
        "object_area_median": float(area.median()),
        "object_area_max": int(area.max()),
        "objects_touching_border": int(per_object["touches_border"].sum()) if len(per_object) else 0,
        "skipped": skipped,
    }
    return summary
