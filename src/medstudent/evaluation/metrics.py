"""Segmentation and classification metrics, torch-free (also used by the ONNX runner).

Segmentation conventions (binary masks, anything > 0 is foreground), for each ratio whose denominator
is zero:

- empty prediction and empty ground truth: dice = iou = precision = recall = 1 (nothing to find, nothing
  wrongly found; the STAS competition scored such images 1);
- only one of them empty: the undefined ratio is 0, like the Dice of that image (precision of an empty
  prediction on a non-empty mask, recall of a non-empty prediction on an empty mask).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    roc_auc_score,
)

from medstudent.errors import DataError

# ---------------------------------------------------------------------------------------- segmentation


def _pair(pred: np.ndarray, gt: np.ndarray, i: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        where = f" (image {i})" if i is not None else ""
        raise DataError(None, f"prediction shape {pred.shape} differs from mask shape {gt.shape}{where}")
    return pred > 0, gt > 0


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def _scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, Any]:
    # Pixel counting by hand: sklearn's f1/precision on flattened masks is far slower and needs the
    # zero-division conventions patched anyway.
    pred_px, gt_px = tp + fp, tp + fn
    empty = pred_px == 0 and gt_px == 0
    return {
        "dice": _ratio(2 * tp, pred_px + gt_px, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, pred_px, empty),
        "recall": _ratio(tp, gt_px, empty),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "pred_px": pred_px,
        "gt_px": gt_px,
    }


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def seg_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """Dice, IoU, precision, recall and pixel counts of one binary prediction (module conventions)."""
    return _scores_from_counts(*_counts(*_pair(pred, gt)))


def _check_lists(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> None:
    if len(preds) != len(gts):
        raise DataError(None, f"{len(preds)} predictions but {len(gts)} masks")
    if len(preds) == 0:
        raise DataError(None, "no images to score")


def per_image_dice(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> np.ndarray:
    """Dice of each image (empty/empty = 1): the values behind `mean_dice` and its bootstrap CI."""
    _check_lists(preds, gts)
    pairs = enumerate(zip(preds, gts, strict=True))
    return np.array([_scores_from_counts(*_counts(*_pair(p, g, i)))["dice"] for i, (p, g) in pairs])


def mean_dice(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Mean of per-image Dice; an image with empty prediction and empty mask scores 1 (STAS scoring)."""
    return float(per_image_dice(preds, gts).mean())


def pooled_dice(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Dice of all pixels pooled over the images: big lesions weigh more, empty images add nothing."""
    _check_lists(preds, gts)
    tp = fp = fn = 0
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        a, b, c = _counts(*_pair(p, g, i))
        tp, fp, fn = tp + a, fp + b, fn + c
    return counts_dice(tp, fp, fn)


def counts_dice(tp: int, fp: int, fn: int) -> float:
    """Dice of pixel counts summed over images: `pooled_dice` without keeping every mask in memory."""
    return float(_scores_from_counts(tp, fp, fn)["dice"])


def _bootstrap_kwargs(seed: int) -> dict[str, Any]:
    # scipy >= 1.15 takes `rng`, older versions `random_state`; both accept a Generator.
    key = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"
    return {key: np.random.default_rng(seed)}


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[..., float] = np.mean,
    n: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of `stat` over `values`, e.g. per-image Dice; same seed, same CI.

    Percentile rather than scipy's default BCa: BCa fails (NaN) on degenerate samples such as all Dice = 1.
    Fewer than two values, or n <= 0, give (nan, nan).
    """
    values = np.asarray(values, dtype=float).ravel()
    if values.size < 2 or n <= 0:
        return float("nan"), float("nan")
    if np.all(values == values[0]):
        v = float(stat(values))
        return v, v  # every resample is the same
    res = sps.bootstrap(
        (values,),
        stat,
        n_resamples=n,
        confidence_level=1 - alpha,
        method="percentile",
        **_bootstrap_kwargs(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# -------------------------------------------------------------------------------------- classification


def _macro_f1_batched(y_true: np.ndarray, y_pred: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Macro-F1 of many resamples at once (leading dims = resamples), same definition as sklearn's
    `f1_score(average="macro", zero_division=0)`: mean over classes present in y_true or y_pred.

    Written out because sklearn spends milliseconds per call in input checks, which 1000 bootstrap resamples
    multiply into seconds; bincount confusion matrices for all resamples at once are cheap (tested equal to
    sklearn).
    """
    t = np.moveaxis(np.asarray(y_true), axis, -1)
    p = np.moveaxis(np.asarray(y_pred), axis, -1)
    batch = t.shape[:-1]
    t, p = t.reshape(-1, t.shape[-1]), p.reshape(-1, p.shape[-1])
    offset = np.arange(t.shape[0])[:, None] * (k * k)
    cm = np.bincount((offset + t * k + p).ravel(), minlength=t.shape[0] * k * k).reshape(-1, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true_n, pred_n = cm.sum(axis=2), cm.sum(axis=1)
    den = true_n + pred_n  # = 2TP + FP + FN
    f1 = np.divide(2 * tp, den, out=np.zeros(tp.shape), where=den > 0)
    present = den > 0
    return (f1.sum(axis=1) / present.sum(axis=1)).reshape(batch)


def _paired_ci(
    fn: Callable[..., np.ndarray], a: np.ndarray, b: np.ndarray, n: int, alpha: float, seed: int
) -> list[float]:
    """Percentile bootstrap CI of a vectorised statistic of paired samples (images keep their labels)."""
    if a.size < 2 or n <= 0:
        return [float("nan"), float("nan")]
    res = sps.bootstrap(
        (a, b),
        fn,
        paired=True,
        vectorized=True,
        n_resamples=n,
        batch=200,  # bounds memory to 200 x N resampled labels
        confidence_level=1 - alpha,
        method="percentile",
        **_bootstrap_kwargs(seed),
    )
    low, high = res.confidence_interval
    if np.isnan(low):  # every resample identical (e.g. all correct): scipy reports NaN, the CI is a point
        low = high = float(fn(a, b))
    return [float(low), float(high)]


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy, macro-F1, one-vs-rest AUC, per-class table and confusion matrices, as the OCT reference.

    `y_true`: (N,) class indices; `probs`: (N, K) class probabilities (the prediction is the argmax).
    Per class k (one-vs-rest): sensitivity = TP/(TP+FN), specificity = TN/(TN+FP),
    accuracy = (TP+TN)/N, precision = TP/(TP+FP), F1, AUC, support = TP+FN. A zero denominator gives NaN
    (e.g. sensitivity of a class absent from y_true). AUC of a class absent from y_true (or the only class
    present) is NaN and the macro AUC is the mean over the classes where it is defined; `notes` says which.
    Macro-F1 averages the classes present in y_true or the predictions (sklearn's default), so a class
    that is neither true nor predicted does not count as F1 = 0. 95% CIs (accuracy, macro-F1): percentile
    bootstrap over images with `n_boot` resamples (0 skips them). All values are plain floats, ints and
    lists (NaN is a float: `json.dumps` writes it as NaN).
    """
    y_true = np.asarray(y_true).ravel()
    probs = np.asarray(probs, dtype=float)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[0] != y_true.size:
        raise DataError(None, f"probs must be (N, K) with N = {y_true.size} labels, got shape {probs.shape}")
    if probs.shape[1] != k:
        raise DataError(None, f"probs has {probs.shape[1]} columns but {k} class names were given")
    if y_true.size == 0:
        raise DataError(None, "no samples to score")
    if not np.isfinite(probs).all():
        raise DataError(None, "probs contains NaN or inf")
    if np.issubdtype(y_true.dtype, np.floating) and np.all(np.mod(y_true, 1) == 0):
        y_true = y_true.astype(int)  # labels read back from a CSV as 0.0, 1.0, ...
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= k:
        raise DataError(None, f"y_true must hold class indices 0..{k - 1}")
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    notes: list[str] = []

    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # per class [[TN, FP], [FN, TP]]
    tn, fp, fn, tp = (mcm[:, i // 2, i % 2].astype(float) for i in range(4))
    n = float(y_true.size)

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

    sens, spec, prec = div(tp, tp + fn), div(tn, tn + fp), div(tp, tp + fp)
    f1 = div(2 * tp, 2 * tp + fp + fn)
    auc = np.full(k, np.nan)
    for c in labels:
        pos = y_true == c
        if pos.all() or not pos.any():
            notes.append(
                f"AUC of class '{class_names[c]}' undefined (no {'negatives' if pos.all() else 'positives'})"
            )
            continue
        auc[c] = roc_auc_score(pos, probs[:, c])
    auc_macro = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    cm_norm = confusion_matrix(y_true, y_pred, labels=labels, normalize="true")  # empty rows -> 0
    per_class = [
        {
            "class": class_names[c],
            "sensitivity": float(sens[c]),
            "specificity": float(spec[c]),
            "accuracy": float((tp[c] + tn[c]) / n),
            "precision": float(prec[c]),
            "f1": float(f1[c]),
            "auc": float(auc[c]),
            "support": int(tp[c] + fn[c]),
        }
        for c in labels
    ]
    return {
        "n": int(n),
        "class_names": list(class_names),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # accuracy is the mean of a 0/1 vector: a vectorised bootstrap, no sklearn call per resample
        "accuracy_ci95": list(bootstrap_ci((y_true == y_pred).astype(float), np.mean, n_boot, 0.05, seed)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "macro_f1_ci95": _paired_ci(
            lambda t, p, axis=-1: _macro_f1_batched(t, p, k, axis), y_true, y_pred, n_boot, 0.05, seed
        ),
        "auc_macro": auc_macro,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": cm_norm.astype(float).tolist(),
        "notes": notes,
    }
