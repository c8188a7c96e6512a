"""Object-level and boundary metrics of segmentation: how many lesions were found, how well small ones are
found, how far the boundaries are; per-class Dice/IoU for label maps.

Lesions are 8-connected components (scipy.ndimage.label). A predicted and a true lesion match when their
IoU is at least `iou` (0.5 by default); matching is one-to-one, best IoU first (with IoU >= 0.5 a component
overlaps at most one partner that much, so greedy is exact). Per image: TP = matched true lesions, FN = the
other true lesions, FP = the other predicted ones; precision/recall/F1 with empty/empty = 1. A true lesion's
Dice is against the predicted components that touch it, so a lesion found too small or too large scores
between 0 and 1. Boundary metrics are MONAI's (`monai.metrics`): the 95th-percentile Hausdorff distance
and the normalised surface Dice at a tolerance in pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

EIGHT = np.ones((3, 3), dtype=bool)
SIZE_BINS_PX = (0, 2_000, 10_000, 50_000, float("inf"))  # the bins issue 22 reports STAS errors in


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndi.label(np.asarray(mask) > 0, structure=EIGHT)
    return labels, int(n)


def match_lesions(pred: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> dict[str, Any]:
    """Match the lesions of two binary masks. Returns tp/fp/fn counts and, per true lesion, its area (px),
    whether it was detected and its Dice against the predicted components touching it."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and truth {gt.shape} differ in shape")
    pl, n_p = _components(pred)
    gl, n_g = _components(gt)
    pair = np.bincount(gl.ravel() * (n_p + 1) + pl.ravel(), minlength=(n_g + 1) * (n_p + 1))
    inter = pair.reshape(n_g + 1, n_p + 1)  # [true id, pred id] overlap in pixels (0 = background)
    g_area, p_area = inter.sum(1), inter.sum(0)
    union = g_area[1:, None] + p_area[None, 1:] - inter[1:, 1:]
    ious = np.where(union > 0, inter[1:, 1:] / np.maximum(union, 1), 0.0)
    detected = np.zeros(n_g, dtype=bool)
    used = np.zeros(n_p, dtype=bool)
    for flat in np.argsort(-ious, axis=None):
        gi, pi = divmod(int(flat), max(n_p, 1))
        if n_p == 0 or ious[gi, pi] < iou:
            break
        if not detected[gi] and not used[pi]:
            detected[gi] = used[pi] = True
    touching = inter[1:, 1:] > 0
    touched_area = touching.astype(np.int64) @ p_area[1:]
    overlap = inter[1:, 1:].sum(1)
    dice = 2 * overlap / np.maximum(g_area[1:] + touched_area, 1)
    tp = int(detected.sum())
    return {
        "tp": tp,
        "fp": int(n_p - used.sum()),
        "fn": int(n_g - tp),
        "areas": g_area[1:].astype(np.int64),
        "detected": detected,
        "dice": dice.astype(np.float64),
    }


def detection_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Lesion precision, recall and F1; 1 when there is nothing to find and nothing was predicted."""
    if tp + fp + fn == 0:
        return {"lesion_precision": 1.0, "lesion_recall": 1.0, "lesion_f1": 1.0}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return {"lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1}


def boundary_scores(pred: np.ndarray, gt: np.ndarray, tolerance_px: float = 2.0) -> dict[str, float]:
    """95th-percentile Hausdorff distance (px) and normalised surface Dice at `tolerance_px`, by MONAI.
    An image where either mask is empty has no boundary distance (NaN); both empty: surface Dice 1."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    if not p.any() and not g.any():
        return {"hd95_px": float("nan"), "surface_dice": 1.0}
    if not p.any() or not g.any():
        return {"hd95_px": float("nan"), "surface_dice": 0.0}
    import torch  # deferred: monai and torch import slowly; only boundary metrics need them
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    def onehot(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(onehot(p), onehot(g), include_background=False, percentile=95)
        nsd = compute_surface_dice(onehot(p), onehot(g), class_thresholds=[float(tolerance_px)])
    return {"hd95_px": float(hd.item()), "surface_dice": float(nsd.item())}


def per_class_scores(pred: np.ndarray, gt: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Dice and IoU of every foreground class of two label maps (ids = class index), and their means.
    A class absent from both maps scores 1 (nothing to find, nothing predicted)."""
    out: dict[str, float] = {}
    dices, ious = [], []
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        p, g = pred == k, gt == k
        inter, total = int((p & g).sum()), int(p.sum() + g.sum())
        dice = 1.0 if total == 0 else 2 * inter / total
        iou = 1.0 if total == 0 else inter / (total - inter)
        out[f"dice_{name}"], out[f"iou_{name}"] = dice, iou
        dices.append(dice)
        ious.append(iou)
    out["mean_class_dice"] = float(np.mean(dices)) if dices else float("nan")
    out["mean_class_iou"] = float(np.mean(ious)) if ious else float("nan")
    return out


def size_table(
    matches: Sequence[dict[str, Any]],
    bins_px: Sequence[float] = SIZE_BINS_PX,
    mpp: float | None = None,
) -> list[dict[str, Any]]:
    """Lesion recall and mean lesion Dice per size bin of the true lesions, pooled over images. With the
    slide's micrometres per pixel (`mpp`) each bin also gives its range in um^2."""
    areas = np.concatenate([m["areas"] for m in matches]) if matches else np.zeros(0)
    found = np.concatenate([m["detected"] for m in matches]) if matches else np.zeros(0, bool)
    dice = np.concatenate([m["dice"] for m in matches]) if matches else np.zeros(0)
    rows = []
    for lo, hi in zip(bins_px[:-1], bins_px[1:], strict=True):
        sel = (areas >= lo) & (areas < hi)
        n = int(sel.sum())
        row: dict[str, Any] = {
            "area_px": f"{int(lo)}-{'inf' if hi == float('inf') else int(hi)}",
            "lesions": n,
            "recall": float(found[sel].mean()) if n else float("nan"),
            "mean_lesion_dice": float(dice[sel].mean()) if n else float("nan"),
        }
        if mpp:
            row["area_um2"] = f"{lo * mpp**2:.0f}-{'inf' if hi == float('inf') else f'{hi * mpp**2:.0f}'}"
        rows.append(row)
    return rows
