"""One scorer per task: every entry point that writes `mean_dice` or `accuracy` computes it here.

`medstudent evaluate` (written masks), `cv` (out-of-fold and test-set ensembles) and self-training's gate
(`score_round`) used to score segmentation three ways: after the tuned post-processing, at a plain 0.5
threshold, and on masks, while `compare` read all three as one `mean_dice`. The rule now:

- `mean_dice` is always after the run's configured post-processing (the tuned postprocess.json when the
  run has one; a mask written by `predict` already is);
- `mean_dice_raw` is the same at threshold 0.5 (argmax for multi-class maps), written wherever the
  probabilities are at hand.

Per-image rows carry the pixel counts, so a summary can be computed from rows alone (e.g. rows gathered
from several ranks): mean Dice over images (empty/empty = 1), pooled Dice, IoU, precision, recall and a
bootstrap CI, with the conventions of `evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from medstudent.config import PostprocessConfig
from medstudent.core.postprocess import postprocess
from medstudent.data.layouts import ClassificationDataset, SegmentationDataset
from medstudent.errors import DataError
from medstudent.evaluation.metrics import bootstrap_ci, classification_metrics, counts_dice, seg_scores

SEG_ROW_KEYS = ("dice", "iou", "precision", "recall", "tp", "fp", "fn", "pred_px", "gt_px")
# The scalar metrics a results table (results.csv, cv manifest, selftrain.json) records per task.
RESULT_METRICS = {
    "segmentation": ("mean_dice", "mean_dice_raw", "pooled_dice", "mean_iou", "n_images"),
    "classification": ("accuracy", "macro_f1", "auc_macro", "n_images"),
}

# ---------------------------------------------------------------------------------------- segmentation


def raw_mask(prob: np.ndarray) -> np.ndarray:
    """Foreground at threshold 0.5 (HxW probabilities) or where the argmax is not background (CxHxW)."""
    prob = np.asarray(prob)
    return prob > 0.5 if prob.ndim == 2 else prob.argmax(0) > 0


def seg_mask(prob: np.ndarray, post: PostprocessConfig | None) -> np.ndarray:
    """The mask a run predicts: `post` applied to a binary probability map (None: threshold 0.5);
    multi-class maps are the argmax's foreground (post-processing is defined for binary maps only)."""
    prob = np.asarray(prob)
    if prob.ndim == 2 and post is not None:
        return postprocess(prob, post) > 0
    return raw_mask(prob)


def seg_row(
    image_id: str,
    gt: np.ndarray,
    *,
    prob: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    post: PostprocessConfig | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Scores of one image, from its probability map `prob` (post-processed with `post`; the row adds
    `dice_raw`) or from an already-made `mask`. Returns the row and the scored mask."""
    if (prob is None) == (mask is None):
        raise ValueError("seg_row takes a probability map or a mask, not both")
    truth = np.asarray(gt) > 0
    pred = seg_mask(prob, post) if prob is not None else np.asarray(mask) > 0
    s = seg_scores(pred, truth)
    row: dict[str, Any] = {"id": image_id, **{k: s[k] for k in SEG_ROW_KEYS}}
    if prob is not None:
        row["dice_raw"] = seg_scores(raw_mask(prob), truth)["dice"]
    return row, pred


def seg_summary(rows: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean Dice (with its bootstrap CI over images; n_boot 0 gives NaNs), mean_dice_raw when every row
    has it, pixel-pooled Dice, mean IoU/precision/recall and the count of images with an empty truth."""
    if not rows:
        raise DataError(None, "no images to score")
    dice = np.array([float(r["dice"]) for r in rows])
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    out: dict[str, Any] = {"n_images": len(rows), "mean_dice": float(dice.mean())}
    if all("dice_raw" in r for r in rows):
        out["mean_dice_raw"] = float(np.mean([float(r["dice_raw"]) for r in rows]))
    out.update(
        {
            "mean_dice_ci95": list(bootstrap_ci(dice, np.mean, n_boot, 0.05, seed)),
            "pooled_dice": counts_dice(tp, fp, fn),
            "mean_iou": float(np.mean([float(r["iou"]) for r in rows])),
            "mean_precision": float(np.mean([float(r["precision"]) for r in rows])),
            "mean_recall": float(np.mean([float(r["recall"]) for r in rows])),
            "empty_gt_images": sum(int(r["gt_px"]) == 0 for r in rows),
        }
    )
    return out


# -------------------------------------------------------------------------------------- classification


def cls_row(image_id: str, label: str, prob: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """One image: its true class name, the probability of every class (p_<class>) and the argmax."""
    p = np.asarray(prob, float)
    return {
        "id": image_id,
        "label": label,
        **{f"p_{c}": float(v) for c, v in zip(class_names, p, strict=True)},
        "predicted": class_names[int(np.argmax(p))],
    }


def cls_summary(
    labels: Sequence[int], probs: np.ndarray, class_names: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """`classification_metrics` (accuracy, macro-F1, AUC, per-class table, CIs) plus n_images."""
    m = classification_metrics(np.asarray(labels), np.asarray(probs, float), list(class_names), n_boot, seed)
    return {**m, "n_images": int(m["n"])}


def cls_summary_from_rows(
    rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """`cls_summary` of `cls_row` rows (the true class by name, probabilities from the p_ columns)."""
    unknown = sorted({str(r["label"]) for r in rows} - set(class_names))
    if unknown:
        raise DataError(
            None, f"true class(es) {unknown} are not among the model's classes {list(class_names)}"
        )
    labels = [list(class_names).index(str(r["label"])) for r in rows]
    probs = np.array([[float(r[f"p_{c}"]) for c in class_names] for r in rows])
    return cls_summary(labels, probs, class_names, n_boot, seed)


# ------------------------------------------------------------------------------------ predict and score


def score_images(
    ds: SegmentationDataset | ClassificationDataset,
    indices: Sequence[int],
    predict: Callable[[np.ndarray], np.ndarray],
    post: PostprocessConfig | None = None,
    class_names: Sequence[str] | None = None,
    on_prob: Callable[[str, np.ndarray], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for the data set's images `indices`, predicted by `predict` (image -> probabilities).

    Segmentation: `seg_row` with `post` (and dice_raw). Classification: `cls_row` with the model's
    `class_names` (default: the data set's). `on_prob(id, probabilities)` sees every prediction (e.g. to
    save the probability maps)."""
    ids = ds.ids()
    rows: list[dict[str, Any]] = []
    for i in indices:
        if isinstance(ds, SegmentationDataset):
            img, gt = ds.load(i)
            prob = predict(img)
            rows.append(seg_row(ids[i], gt, prob=prob, post=post)[0])
        else:
            prob = predict(ds.load_image(i))
            names = list(class_names or ds.class_names)
            rows.append(cls_row(ids[i], ds.class_names[ds.items[i].label], prob, names))
        if on_prob is not None:
            on_prob(ids[i], prob)
    return rows


def summarize_rows(
    rows: Sequence[Mapping[str, Any]],
    task: str,
    class_names: Sequence[str] | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """The task's summary of `score_images` rows (no bootstrap by default: results tables hold no CI)."""
    if task == "segmentation":
        return seg_summary(rows, n_boot, seed)
    if class_names is None:
        raise ValueError("classification rows need the model's class names")
    return cls_summary_from_rows(rows, class_names, n_boot, seed)


def result_metrics(summary: Mapping[str, Any], task: str) -> dict[str, float]:
    """The scalar metrics of a summary that results tables record (RESULT_METRICS), in that order."""
    return {k: summary[k] for k in RESULT_METRICS[task] if k in summary}
