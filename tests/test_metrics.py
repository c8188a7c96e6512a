"""Metrics against hand-computed values, and smoke tests of the report figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medstudent.errors import DataError
from medstudent.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    mean_dice,
    pooled_dice,
    seg_scores,
)
from medstudent.evaluation.report import (
    TILE_PX,
    cls_gallery_png,
    confusion_matrix_png,
    overlay,
    seg_gallery_png,
)
from medstudent.training.curves import curve_panels, training_curves_png

# ---------------------------------------------------------------------------------------- segmentation


def test_seg_scores_2x2_toy():
    s = seg_scores(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]]))
    assert (s["tp"], s["fp"], s["fn"], s["pred_px"], s["gt_px"]) == (1, 1, 1, 2, 2)
    assert s["dice"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)
    s = seg_scores(np.array([[1, 1], [1, 0]]), np.array([[1, 0], [0, 0]]))
    assert s["dice"] == pytest.approx(2 / 4) and s["precision"] == pytest.approx(1 / 3) and s["recall"] == 1.0


def test_seg_scores_empty_conventions():
    z = np.zeros((3, 3), np.uint8)
    one = z.copy()
    one[1, 1] = 255  # any value > 0 is foreground
    assert {k: seg_scores(z, z)[k] for k in ("dice", "iou", "precision", "recall")} == dict.fromkeys(
        ("dice", "iou", "precision", "recall"), 1.0
    )
    s = seg_scores(z, one)  # empty prediction, lesion present
    assert s["dice"] == 0.0 and s["iou"] == 0.0 and s["precision"] == 0.0 and s["recall"] == 0.0
    s = seg_scores(one, z)  # false alarm on an empty image
    assert s["dice"] == 0.0 and s["precision"] == 0.0 and s["recall"] == 0.0
    with pytest.raises(DataError):
        seg_scores(z, np.zeros((2, 3)))


def test_mean_vs_pooled_dice():
    big_gt = np.zeros((20, 20), bool)
    big_gt[:10, :10] = True  # 100 px, predicted perfectly
    small_gt = np.zeros((20, 20), bool)
    small_gt[0:2, 0:2] = True  # 4 px, missed
    empty = np.zeros((20, 20), bool)
    preds, gts = [big_gt, empty, empty], [big_gt, small_gt, empty]
    assert mean_dice(preds, gts) == pytest.approx((1 + 0 + 1) / 3)  # empty/empty scores 1
    assert pooled_dice(preds, gts) == pytest.approx(200 / 204)  # the big lesion dominates
    assert pooled_dice([empty], [empty]) == 1.0
    with pytest.raises(DataError):
        mean_dice(preds, gts[:2])


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    v = np.random.default_rng(0).random(40)
    lo, hi = bootstrap_ci(v, n=500, seed=3)
    assert lo < v.mean() < hi and hi - lo < 0.5
    assert bootstrap_ci(v, n=500, seed=3) == (lo, hi)
    assert bootstrap_ci(v, n=500, seed=4) != (lo, hi)
    lo90, hi90 = bootstrap_ci(v, n=500, alpha=0.1, seed=3)
    assert lo <= lo90 and hi90 <= hi
    assert bootstrap_ci(v, stat=np.median, n=200)[0] <= np.median(v)
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_ci(np.array([0.5]))))


# -------------------------------------------------------------------------------------- classification

# rows: true class, columns: predicted class; N = 17
CM = np.array([[5, 1, 0], [2, 3, 1], [0, 1, 4]])


def _from_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(t, p) for t in range(3) for p in range(3) for _ in range(cm[t, p])]
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    probs = np.full((len(pairs), 3), 0.1)
    probs[np.arange(len(pairs)), y_pred] = 0.8
    return y_true, probs


def test_classification_per_class_against_hand_computed_confusion_matrix():
    y, probs = _from_cm(CM)
    r = classification_metrics(y, probs, ["a", "b", "c"], n_boot=200)
    assert r["confusion_matrix"] == CM.tolist()
    assert r["accuracy"] == pytest.approx(12 / 17)
    # one-vs-rest by hand: (TP, FN, FP, TN) = a (5, 1, 2, 9), b (3, 3, 2, 9), c (4, 1, 1, 11)
    expect = {
        "a": {
            "sensitivity": 5 / 6,
            "specificity": 9 / 11,
            "accuracy": 14 / 17,
            "precision": 5 / 7,
            "support": 6,
        },
        "b": {
            "sensitivity": 3 / 6,
            "specificity": 9 / 11,
            "accuracy": 12 / 17,
            "precision": 3 / 5,
            "support": 6,
        },
        "c": {
            "sensitivity": 4 / 5,
            "specificity": 11 / 12,
            "accuracy": 15 / 17,
            "precision": 4 / 5,
            "support": 5,
        },
    }
    for row in r["per_class"]:
        for key, value in expect[row["class"]].items():
            assert row[key] == pytest.approx(value), (row["class"], key)
    assert r["macro_f1"] == pytest.approx((10 / 13 + 6 / 11 + 8 / 10) / 3)
    np.testing.assert_allclose(r["confusion_matrix_normalized"], CM / CM.sum(axis=1, keepdims=True))
    lo, hi = r["accuracy_ci95"]
    assert lo < r["accuracy"] < hi
    lo, hi = r["macro_f1_ci95"]
    assert lo < r["macro_f1"] < hi
    assert classification_metrics(y, probs, ["a", "b", "c"], n_boot=200) == r  # seeded
    json.dumps(r)  # JSON-serialisable


def test_bootstrap_macro_f1_equals_sklearn():
    from sklearn.metrics import f1_score

    from medstudent.evaluation.metrics import _macro_f1_batched

    rng = np.random.default_rng(0)
    for k in (2, 4):
        t, p = rng.integers(0, k, (20, 15)), rng.integers(0, k - 1, (20, 15))  # class k-1 never predicted
        ref = [f1_score(t[i], p[i], average="macro", zero_division=0) for i in range(20)]
        np.testing.assert_allclose(_macro_f1_batched(t, p, k), ref)


def test_classification_auc_perfect_and_absent_class():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = rng.random((8, 4)) * 0.2
    probs[np.arange(8), y] += 0.8  # each class's own probability beats every other image's
    r = classification_metrics(y, probs, list("wxyz"), n_boot=50)
    assert r["auc_macro"] == 1.0 and all(row["auc"] == 1.0 for row in r["per_class"])
    assert r["accuracy"] == 1.0 and r["notes"] == []
    # class "z" absent from y_true: its AUC and sensitivity are NaN, with a note; the rest still scored
    r = classification_metrics(y[:6], probs[:6], list("wxyz"), n_boot=50)
    z = r["per_class"][3]
    assert np.isnan(z["auc"]) and np.isnan(z["sensitivity"]) and z["support"] == 0
    assert any("'z'" in n for n in r["notes"])
    assert r["auc_macro"] == 1.0
    with pytest.raises(DataError):
        classification_metrics(y, probs[:, :3], list("wxyz"))
    with pytest.raises(DataError):
        classification_metrics(y + 1, probs, list("wxyz"))


# ---------------------------------------------------------------------------------------------- report


def _png_size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_confusion_matrix_png(tmp_path):
    w, h = _png_size(confusion_matrix_png(CM, ["a", "b", "c"], tmp_path / "cm.png", normalize=False))
    assert 300 < w < 1500 and 300 < h < 1500
    _png_size(confusion_matrix_png(CM, ["a", "b", "c"], tmp_path / "sub" / "cm_norm.png", normalize=True))
    with pytest.raises(DataError):
        confusion_matrix_png(CM, ["a", "b"], tmp_path / "bad.png", normalize=False)


def test_overlay_colours_mask_and_outline():
    img = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 10:40] = True
    out = overlay(img, mask, color=(255, 0, 255), alpha=0.5, contour=True)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (100, 100, 100)  # outside untouched
    assert tuple(out[20, 25]) == (178, 50, 178)  # inside blended (rounded)
    assert tuple(out[10, 25]) == (255, 0, 255)  # outline opaque
    assert tuple(overlay(img[:, :, 0], mask, alpha=0.0, contour=False)[20, 25]) == (100, 100, 100)
    with pytest.raises(DataError):
        overlay(img, mask[:10])


def test_galleries_downscale_big_images(tmp_path):
    yy, xx = np.mgrid[0:942, 0:1716]
    big = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)  # compresses fast
    gt = np.zeros((942, 1716), bool)
    gt[200:500, 300:900] = True
    pred = np.roll(gt, 80, axis=1)
    items = [{"id": f"img{i}", "image": big, "gt": gt, "pred": pred, "dice": 0.1 * i} for i in range(3)]
    w, h = _png_size(seg_gallery_png(items, tmp_path / "worst.png", "worst 3"))
    assert w == 3 * TILE_PX and h < 600
    w, _ = _png_size(seg_gallery_png([], tmp_path / "none.png", "empty"))
    assert w == TILE_PX
    oct_img = big[:200, :200, 0]  # greyscale, like OCT
    cls_items = [{"id": "o1", "image": oct_img, "true": "DME", "pred": "CNV", "confidence": 0.97}] * 6
    w, h = _png_size(cls_gallery_png(cls_items, tmp_path / "cls.png", "most confidently wrong"))
    assert w == 5 * TILE_PX and h > TILE_PX  # two rows


def test_training_curves_png(tmp_path):
    csv = tmp_path / "version_0" / "metrics.csv"
    csv.parent.mkdir()
    rows = ["epoch,step,train_loss_step,train_loss_epoch,val_loss,val_dice,lr-AdamW"]
    for e in range(4):
        rows += [f"{e},{e * 10 + s},{1 / (e + 1) + 0.01 * s},,,,{1e-3 / (e + 1)}" for s in range(3)]
        rows += [
            f"{e},{e * 10 + 9},,{1 / (e + 1)},,,",
            f"{e},{e * 10 + 9},,,{1.2 / (e + 1)},{0.5 + 0.1 * e},",
        ]
    csv.write_text("\n".join(rows) + "\n")
    w, h = _png_size(training_curves_png(csv, tmp_path / "curves.png"))
    assert w == 1500 and h == 380  # three panels: loss, metric, learning rate
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,step,train_loss\n0,0,\n")
    _png_size(training_curves_png(empty, tmp_path / "empty.png"))  # a note, not a failed run
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,0.5\n")
    with pytest.raises(DataError):
        training_curves_png(bad, tmp_path / "x.png")
    with pytest.raises(DataError):
        training_curves_png(tmp_path / "missing.csv", tmp_path / "x.png")


def test_curve_panels_are_titled_by_what_they_plot():
    # a validated fold: the validation metric has its own panel, apart from the augmentation policy
    fold = curve_panels(
        ["train_loss", "val_loss", "val_dice", "val_metric", "aug_policy_prob", "lr", "lr-AdamW"]
    )
    assert fold == {
        "loss": ["train_loss", "val_loss"],
        "validation metric": ["val_dice", "val_metric"],
        "augmentation policy probability": ["aug_policy_prob"],
        "learning rate": ["lr", "lr-AdamW"],
    }
    # --fold all: no validation, so no "metric" panel holding the augmentation probability
    every = curve_panels(["train_loss", "aug_policy_prob", "lr"])
    assert list(every) == ["loss", "augmentation policy probability", "learning rate"]
    assert curve_panels(["train_loss", "grad_norm"])["grad_norm"] == ["grad_norm"]
