"""Lesion-level, size-stratified, boundary and per-class metrics on hand-made masks with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medstudent.errors import DataError
from medstudent.evaluation.evaluate import evaluate_segmentation
from medstudent.evaluation.lesions import (
    boundary_scores,
    detection_scores,
    match_lesions,
    per_class_scores,
    size_table,
)


def _square(mask: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
    mask[y : y + side, x : x + side] = True
    return mask


def test_lesions_are_matched_one_to_one_at_iou():
    gt = _square(_square(np.zeros((64, 64), bool), 5, 5, 10), 40, 40, 4)  # A (100 px), B (16 px)
    pred = _square(_square(np.zeros((64, 64), bool), 5, 5, 10), 20, 50, 6)  # A found, C spurious, B missed
    m = match_lesions(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert list(m["areas"]) == [100, 16] and list(m["detected"]) == [True, False]
    np.testing.assert_allclose(m["dice"], [1.0, 0.0])
    assert detection_scores(1, 1, 1) == {"lesion_precision": 0.5, "lesion_recall": 0.5, "lesion_f1": 0.5}
    assert detection_scores(0, 0, 0)["lesion_f1"] == 1.0  # nothing to find, nothing found
    # half overlap: IoU 50/150 < 0.5 is a miss and a false positive; the lesion's Dice is 0.5
    shifted = _square(np.zeros((64, 64), bool), 10, 5, 10)
    m = match_lesions(shifted, _square(np.zeros((64, 64), bool), 5, 5, 10))
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1) and m["dice"][0] == pytest.approx(0.5)
    assert match_lesions(shifted, _square(np.zeros((64, 64), bool), 5, 5, 10), iou=0.3)["tp"] == 1
    # two predictions touching one lesion: one matches, the other is a false positive
    gt = _square(np.zeros((32, 32), bool), 0, 0, 20)
    pred = _square(_square(np.zeros((32, 32), bool), 0, 0, 18), 0, 19, 1)  # 324 px + a 1-px sliver apart
    pred[0, 18] = False
    m = match_lesions(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def test_size_bins_pool_recall_and_dice_over_images():
    gt1 = _square(_square(np.zeros((300, 300), bool), 0, 0, 40), 100, 100, 120)  # 1,600 px and 14,400 px
    pred1 = _square(np.zeros((300, 300), bool), 100, 100, 120)
    gt2 = _square(np.zeros((300, 300), bool), 0, 0, 30)  # 900 px, found
    pred2 = gt2.copy()
    rows = size_table([match_lesions(pred1, gt1), match_lesions(pred2, gt2)], mpp=0.5)
    small, mid, big, huge = rows
    assert small["lesions"] == 2 and small["recall"] == 0.5 and small["mean_lesion_dice"] == 0.5
    assert mid["lesions"] == 0 and np.isnan(mid["recall"])
    assert big["lesions"] == 1 and big["recall"] == 1.0 and huge["lesions"] == 0
    assert small["area_px"] == "0-2000" and small["area_um2"] == "0-500"  # 2000 px x 0.25 um^2


def test_boundary_metrics_of_a_shifted_square():
    gt = _square(np.zeros((64, 64), bool), 20, 20, 20)
    same = boundary_scores(gt, gt)
    assert same["hd95_px"] == 0.0 and same["surface_dice"] == 1.0
    moved = boundary_scores(np.roll(gt, 3, axis=1), gt, tolerance_px=2)
    assert moved["hd95_px"] == pytest.approx(3.0) and 0 < moved["surface_dice"] < 1
    assert boundary_scores(np.roll(gt, 3, axis=1), gt, tolerance_px=3)["surface_dice"] == 1.0
    empty = np.zeros_like(gt)
    assert boundary_scores(empty, empty)["surface_dice"] == 1.0 and np.isnan(
        boundary_scores(empty, gt)["hd95_px"]
    )


def test_per_class_dice_of_label_maps():
    gt = np.zeros((10, 10), np.uint8)
    gt[:5] = 1
    gt[5:, :5] = 2
    pred = gt.copy()
    pred[5:, :5] = 1  # class 2 predicted as class 1
    s = per_class_scores(pred, gt, ["background", "tumour", "stroma", "absent"])
    assert s["dice_tumour"] == pytest.approx(2 * 50 / (75 + 50)) and s["dice_stroma"] == 0.0
    assert s["dice_absent"] == 1.0 and s["mean_class_dice"] == pytest.approx((0.8 + 0 + 1) / 3)
    assert s["iou_tumour"] == pytest.approx(50 / 75)


def test_evaluate_reports_lesions_sizes_and_boundaries(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred" / "masks", tmp_path / "gt"
    pred_dir.mkdir(parents=True)
    gt_dir.mkdir()
    gt = _square(_square(np.zeros((64, 64), bool), 5, 5, 10), 40, 40, 4)
    pred = _square(_square(np.zeros((64, 64), bool), 5, 5, 10), 20, 50, 6)
    for folder, mask in ((pred_dir, pred), (gt_dir, gt)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "a.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "b.png")  # empty / empty
    s = evaluate_segmentation(tmp_path / "pred", gt_dir, tmp_path / "report")
    assert (s["lesions_tp"], s["lesions_fp"], s["lesions_fn"]) == (1, 1, 1) and s["lesion_f1"] == 0.5
    assert s["hd95_images"] == 1 and s["mean_surface_dice"] < 1
    assert s["lesions_by_size"][0]["lesions"] == 2 and s["lesions_by_size"][0]["recall"] == 0.5
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["lesion_f1_ci95"][0] <= 0.5 <= saved["lesion_f1_ci95"][1]
    assert (tmp_path / "report" / "lesions_by_size.csv").is_file()


def test_evaluate_refuses_two_predicted_masks_of_one_image(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    empty = Image.fromarray(np.zeros((16, 16), np.uint8))
    for path in (pred_dir / "a.png", pred_dir / "a.tif", gt_dir / "a.png"):
        empty.save(path)
    with pytest.raises(DataError, match=r"a\.tif.*two predicted masks for 'a'"):
        evaluate_segmentation(pred_dir, gt_dir, tmp_path / "report")


def test_evaluate_scores_every_class_of_label_maps(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    gt = np.zeros((20, 20), np.uint8)
    gt[:10] = 1
    gt[10:, :10] = 2
    pred = gt.copy()
    pred[10:, :10] = 1  # class 2 predicted as class 1
    Image.fromarray(gt).save(gt_dir / "a.png")
    Image.fromarray(pred).save(pred_dir / "a.png")
    s = evaluate_segmentation(pred_dir, gt_dir, tmp_path / "report")
    assert s["mean_dice"] == 1.0  # the headline: foreground against background
    assert s["mean_dice_class_1"] == pytest.approx(2 * 200 / (300 + 200)) and s["mean_dice_class_2"] == 0.0
    assert s["mean_class_dice"] == pytest.approx((0.8 + 0.0) / 2)
    # binary 0/255 masks stay binary: no per-class columns
    Image.fromarray(gt.astype(bool).astype(np.uint8) * 255).save(gt_dir / "a.png")
    Image.fromarray(pred.astype(bool).astype(np.uint8) * 255).save(pred_dir / "a.png")
    assert "mean_class_dice" not in evaluate_segmentation(pred_dir, gt_dir, tmp_path / "report2")
