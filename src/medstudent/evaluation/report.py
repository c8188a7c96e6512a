"""Report figures: confusion matrices, worst-case galleries and overlays (training curves: training.curves).

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas), never through pyplot's global state,
so this works headless, in threads, and without a display backend. Gallery tiles are downscaled to at most
`TILE_PX` pixels wide before plotting, which keeps PNGs of 1716x942 images small.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay

from medstudent.core.overlay import MISSED_COLOR, PREDICTION_COLOR, TRUTH_COLOR, mask_for, overlay, rgb
from medstudent.errors import DataError
from medstudent.figures import DPI, new_figure, save_figure

TILE_PX = 480  # gallery tile width in pixels (<= 600 as asked for reports)


def _downscale(img: np.ndarray, masks: list[np.ndarray], width: int = TILE_PX) -> tuple[np.ndarray, list]:
    h, w = img.shape[:2]
    if w <= width:
        return img, masks
    size = (width, max(1, round(h * width / w)))
    small = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
    return small, [
        np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
        for m in masks
    ]


def _grid(n: int, aspect: float, title: str, max_cols: int = 5) -> tuple[Figure, list]:
    """Figure with n tiles (at least one, to say "no items"), tiles TILE_PX wide."""
    n = max(n, 1)
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    tile_w = TILE_PX / DPI
    fig = new_figure(cols * tile_w, rows * (tile_w * aspect + 0.45) + 0.5, layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig, axes


def _aspect(items: list[dict]) -> float:
    shapes = [np.asarray(it["image"]).shape[:2] for it in items]
    return max((h / w for h, w in shapes if w), default=1.0)


def seg_gallery_png(items: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Tiles of images titled "id  Dice": ground truth outlined green, prediction yellow; missed pixels (false
    negatives) filled cyan, false-positive pixels filled yellow, so each kind of error shows on H&E.

    `items`: dicts with "id", "image" (HxWx3 uint8), "gt", "pred" (masks) and "dice"; shown in the given
    order (pass them worst first for a worst-10 gallery).
    """
    fig, axes = _grid(
        len(items),
        _aspect(items),
        f"{title}\ngreen: truth  yellow: predicted  cyan: missed",
    )
    if not items:
        axes[0].text(0.5, 0.5, "no items", ha="center", va="center")
    for ax, it in zip(axes, items, strict=False):
        img = rgb(it["image"])
        gt = mask_for(it["gt"], img.shape, f"gt of {it['id']}")
        pred = mask_for(it["pred"], img.shape, f"pred of {it['id']}")
        small, (gt_s, pred_s) = _downscale(img, [gt, pred])
        shown = overlay(small, gt_s & ~pred_s, MISSED_COLOR, alpha=0.45, contour=False)
        shown = overlay(shown, pred_s & ~gt_s, PREDICTION_COLOR, alpha=0.45, contour=False)
        shown = overlay(overlay(shown, gt_s, TRUTH_COLOR, alpha=0.0), pred_s, PREDICTION_COLOR, alpha=0.0)
        ax.imshow(shown)
        ax.set_title(f"{it['id']}  Dice {float(it['dice']):.3f}", fontsize=9)
    return save_figure(fig, path)


def cls_gallery_png(items: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Tiles of (mis)classified images titled with id, true and predicted class and confidence.

    `items`: dicts with "id", "image", "true", "pred" (class names) and "confidence" (the predicted class's
    probability); pass the most confidently wrong first. Wrong predictions get a red title.
    """
    fig, axes = _grid(len(items), _aspect(items), title)
    if not items:
        axes[0].text(0.5, 0.5, "no items", ha="center", va="center")
    for ax, it in zip(axes, items, strict=False):
        small, _ = _downscale(rgb(it["image"]), [])
        ax.imshow(small)
        wrong = str(it["true"]) != str(it["pred"])
        ax.set_title(
            f"{it['id']}\ntrue {it['true']} -> {it['pred']} ({float(it['confidence']):.2f})",
            fontsize=9,
            color="red" if wrong else "black",
        )
    return save_figure(fig, path)


def confusion_matrix_png(cm: np.ndarray, class_names: list[str], path: str | Path, normalize: bool) -> Path:
    """One confusion matrix per file (rows: true class, columns: predicted class).

    normalize=False: colours and numbers are counts. normalize=True: colours are row-normalised fractions
    (per-class recall on the diagonal) and each cell reads "fraction (count)", so one file shows both;
    call it twice for two files. Uses sklearn's `ConfusionMatrixDisplay` for the layout.
    """
    cm = np.asarray(cm)
    k = len(class_names)
    if cm.shape != (k, k):
        raise DataError(None, f"confusion matrix shape {cm.shape} does not match {k} class names")
    counts = cm.astype(int) if np.allclose(cm, np.round(cm)) else cm
    if normalize:
        rows = cm.sum(axis=1, keepdims=True).astype(float)
        values = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    else:
        values = counts
    side = max(4.0, 1.0 + 0.9 * k)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    disp = ConfusionMatrixDisplay(values, display_labels=list(class_names))
    disp.plot(
        ax=ax, cmap="Blues", values_format=".2f" if normalize else "d", colorbar=True, xticks_rotation=45
    )
    if normalize:
        disp.im_.set_clim(0, 1)
        for (i, j), text in np.ndenumerate(disp.text_):
            text.set_text(f"{values[i, j]:.2f}\n({counts[i, j]})")
    ax.set_title("row-normalised (count)" if normalize else "counts")
    fig.tight_layout()
    return save_figure(fig, path)
