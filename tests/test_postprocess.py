"""Post-processing steps on hand-made masks and probability maps, and the tuner on a synthetic case."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold

from medstudent.config import PostprocessConfig
from medstudent.core.postprocess import (
    closing,
    fill_border_objects,
    fill_holes,
    hysteresis,
    postprocess,
    remove_small,
)
from medstudent.errors import DataError
from medstudent.evaluation.metrics import mean_dice
from medstudent.evaluation.postprocess_tuning import tune_postprocess


def _blobs_prob() -> np.ndarray:
    """Three regions on 0: A = weak (0.4) halo around a strong (0.9) seed, B = weak isolated (0.4),
    C = seeded but never confident (max 0.55)."""
    p = np.zeros((20, 30), dtype=np.float32)
    p[2:9, 2:9] = 0.4
    p[4:6, 4:6] = 0.9  # A's seed
    p[2:9, 12:18] = 0.4  # B
    p[12:18, 2:9] = 0.4
    p[14, 5] = 0.55  # C's seed: > high but < drop
    return p


def test_hysteresis_keeps_weak_region_connected_to_seed_and_drops_isolated():
    m = hysteresis(_blobs_prob(), drop=0.0, high=0.5, low=0.3)
    assert m[2:9, 2:9].all()  # A kept whole, weak halo included
    assert not m[2:9, 12:18].any()  # B has no seed
    assert m[12:18, 2:9].all()  # C has a seed and no drop rule
    assert m.sum() == 49 + 42


def test_hysteresis_drop_removes_object_that_never_gets_confident():
    m = hysteresis(_blobs_prob(), drop=0.6, high=0.5, low=0.3)
    assert m[2:9, 2:9].all()  # max 0.9 >= 0.6
    assert not m[12:18, 2:9].any()  # max 0.55 < 0.6: dropped whole
    assert m.sum() == 49
    # `drop` is ">=": an object whose max equals drop stays
    assert hysteresis(_blobs_prob(), drop=0.55, high=0.5, low=0.3)[14, 5]


def test_hysteresis_equals_skimage_when_drop_is_off():
    rng = np.random.default_rng(3)
    p = ndi.gaussian_filter(rng.random((60, 80)), 2)
    p = ((p - p.min()) / (p.max() - p.min())).astype(np.float32)
    for low, high in [(0.3, 0.6), (0.5, 0.7), (0.45, 0.45)]:
        np.testing.assert_array_equal(hysteresis(p, 0.0, high, low), apply_hysteresis_threshold(p, low, high))


def test_closing_bridges_one_pixel_gap_and_keeps_border_objects():
    m = np.zeros((11, 20), dtype=np.uint8)
    m[4:7, 2:9] = 1
    m[4:7, 10:17] = 1  # column 9 is a 1-px gap
    assert not m[5, 9]
    c = closing(m, 1)  # a cross: bridges the middle row, the gap's corners stay (rounded)
    assert c[5, 9] and ndi.label(c)[1] == 1
    assert c.sum() == m.sum() + 1  # nothing else changes
    edge = np.zeros((8, 8), bool)
    edge[:, :3] = True  # touches three image sides
    np.testing.assert_array_equal(closing(edge, 3), edge)  # the border does not erode it
    np.testing.assert_array_equal(closing(m, 0), m > 0)


def test_fill_holes():
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[3:6, 3:6] = False
    f = fill_holes(m)
    assert f[1:8, 1:8].all() and f.sum() == 49


def test_remove_small_area_boundary():
    m = np.zeros((10, 20), bool)
    m[1:3, 1:6] = True  # 10 px
    m[5:8, 10:13] = True  # 9 px
    m[0, 19] = True  # 1 px
    np.testing.assert_array_equal(remove_small(m, 10), m & (np.arange(20)[None, :] < 6))  # exactly 10 stays
    assert remove_small(m, 9).sum() == 19
    assert remove_small(m, 11).sum() == 0
    np.testing.assert_array_equal(remove_small(m, 0), m)
    # 4-connectivity: two diagonal pixels are two 1-px objects
    d = np.zeros((4, 4), bool)
    d[1, 1] = d[2, 2] = True
    assert remove_small(d, 2).sum() == 0


def _c_open_top() -> np.ndarray:
    """A C-shaped object whose opening (columns 6..13) lies on the top image border."""
    m = np.zeros((20, 20), bool)
    m[0:12, 3:6] = True  # left arm, touches the top
    m[0:12, 14:17] = True  # right arm, touches the top
    m[12:15, 3:17] = True  # bottom bar
    return m


def test_fill_border_fills_object_open_at_the_border():
    m = _c_open_top()
    assert not fill_holes(m)[5, 10]  # binary_fill_holes cannot: the pocket touches the border
    f = fill_border_objects(m)
    assert f[0:12, 6:14].all()  # the pocket, including its border row
    assert f.sum() == m.sum() + 12 * 8
    assert not f[15:, :].any() and not f[:, :3].any() and not f[:, 17:].any()  # outside stays empty


def test_fill_border_does_not_fill_between_separate_objects():
    m = np.zeros((20, 20), bool)
    m[0:12, 3:6] = True  # two separate bars hanging from the top
    m[0:12, 14:17] = True
    np.testing.assert_array_equal(fill_border_objects(m), m)
    # nor a corner cut off by one object (inside/outside ambiguous), nor a band across the image
    corner = np.zeros((20, 20), bool)
    for i in range(10):
        corner[i, 9 - i : 11 - i] = True  # a diagonal band from top (col 9) to left (row 9)
    np.testing.assert_array_equal(fill_border_objects(corner), corner)
    band = np.zeros((20, 20), bool)
    band[8:11, :] = True
    np.testing.assert_array_equal(fill_border_objects(band), band)


def test_fill_border_leaves_interior_holes_to_fill_holes():
    m = _c_open_top()
    m[13, 10] = False  # an ordinary hole in the bottom bar
    f = fill_border_objects(m)
    assert not f[13, 10]  # not this step's job
    assert f[0:12, 6:14].all()
    assert fill_border_objects(fill_holes(m))[13, 10]


def test_postprocess_order_and_defaults():
    p = np.zeros((30, 30), dtype=np.float32)
    p[5:20, 5:20] = 0.8
    p[10:14, 10:14] = 0.2  # a hole
    p[25, 25] = 0.9  # a speck
    out = postprocess(p, PostprocessConfig())
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(out, (p > 0.5).astype(np.uint8))  # all steps off by default
    cfg = PostprocessConfig(fill_holes=True, min_area=5)
    out = postprocess(p, cfg)
    assert out[5:20, 5:20].all() and out.sum() == 225
    with pytest.raises(DataError):
        postprocess(p * 10 - 5, cfg)  # logits are refused
    with pytest.raises(DataError):
        postprocess(np.zeros((4, 4, 3), np.float32), cfg)


def _synthetic_case(n: int = 6, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Square lesions at 0.9 (their truth) plus confident 1-4 px noise specks that only min_area removes."""
    rng = np.random.default_rng(seed)
    probs, gts = [], []
    for i in range(n):
        gt = np.zeros((64, 96), bool)
        if i % 3:  # some images have no lesion (empty/empty must score 1)
            y, x = rng.integers(5, 35), rng.integers(5, 60)
            gt[y : y + 20, x : x + 25] = True
        p = np.where(gt, 0.9, 0.05).astype(np.float32)
        for _ in range(8):
            y, x = rng.integers(0, 62), rng.integers(0, 94)
            p[y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = 0.95
        probs.append(p)
        gts.append(gt)
    return probs, gts


def test_tune_postprocess_finds_min_area_for_noise_specks():
    probs, gts = _synthetic_case()
    grid = {
        "threshold": [0.3, 0.5],
        "min_area": [0, 10, 1000],
        "closing": [0, 2],
        "fill_holes": [False, True],
    }
    best, df = tune_postprocess(probs, gts, grid=grid)
    assert df.attrs["adopted"] and df.attrs["held_out"] > df.attrs["configured"]  # the guard lets it pass
    assert best.min_area == 10 and not best.hysteresis
    assert best.closing == 0 and best.fill_holes is False  # ties go to the simpler setting
    assert df["mean_dice"].iloc[0] == pytest.approx(1.0)
    # the table's Dice is the Dice of the real pipeline
    assert mean_dice([postprocess(p, best) for p in probs], gts) == pytest.approx(df["mean_dice"].iloc[0])
    no_filter = df[(df.min_area == 0) & (df.closing == 0) & ~df.fill_holes & (df.threshold == 0.5)]
    assert mean_dice([p > 0.5 for p in probs], gts) == pytest.approx(no_filter["mean_dice"].iloc[0])
    assert len(df) == 2 * 3 + 2 * 3 * 3  # stage 1: 2 thresholds x 3 areas; stage 2: top 2 x 3 chains x 3


def test_tune_postprocess_hysteresis_rows_match_pipeline():
    probs, gts = _synthetic_case(seed=1)
    for p in probs:  # weak halo around lesions that only hysteresis (low 0.3) recovers
        p[(p < 0.1) & (np.roll(p, 1, axis=0) > 0.8)] = 0.4
    gts = [g | np.roll(g, 1, axis=0) for g in gts]
    grid = {
        "hysteresis": [False, True],
        "threshold": [0.5],
        "high": [0.5],
        "low": [0.3],
        "drop": [0.5, 0.99],
        "min_area": [0, 10],
    }
    best, df = tune_postprocess(probs, gts, grid=grid)
    assert best.hysteresis and best.low == 0.3 and best.min_area == 10 and best.drop == 0.5
    for _, row in df.iterrows():
        cfg = best.model_copy(update={"hysteresis": bool(row.hysteresis), "min_area": int(row.min_area)})
        if row.hysteresis:
            cfg = cfg.model_copy(update={"drop": float(row["drop"])})
        else:
            cfg = cfg.model_copy(update={"threshold": float(row.threshold)})
        assert mean_dice([postprocess(p, cfg) for p in probs], gts) == pytest.approx(row.mean_dice)


def test_tune_postprocess_rejects_bad_input():
    probs, gts = _synthetic_case(n=2)
    with pytest.raises(DataError):
        tune_postprocess(probs, gts[:1])
    with pytest.raises(DataError):
        tune_postprocess(probs, gts, grid={"thresh": [0.5]})


def test_tune_postprocess_guard_keeps_the_configured_setting_when_tuning_does_not_generalise():
    # Three images, each a 400 px lesion at p=0.9 plus 100-200 px at an intermediate probability that is
    # lesion in some images and not in others, so the best threshold on all images does not carry over.
    def case(extra_px: int, p_extra: float, is_lesion: bool) -> tuple[np.ndarray, np.ndarray]:
        gt = np.zeros((40, 60), bool)
        gt[:20, :20] = True
        p = np.where(gt, 0.9, 0.05).astype(np.float32)
        extra = np.zeros_like(gt)
        extra[30 : 30 + extra_px // 20, 30:50] = True
        p[extra] = p_extra
        return p, gt | extra if is_lesion else gt

    a, b, c = case(200, 0.4, True), case(100, 0.4, False), case(100, 0.6, True)
    probs, gts = [a[0], b[0], c[0]], [a[1], b[1], c[1]]
    base = PostprocessConfig(threshold=0.5)
    best, df = tune_postprocess(probs, gts, grid={"threshold": [0.3, 0.5, 0.7]}, base=base)
    # on all three, 0.3 wins (0.963 vs 0.933 for 0.5); left out, A gets 0.5 (0.8) and B gets 0.3 (0.889)
    assert df.attrs["tuned"] == pytest.approx((1 + 800 / 900 + 1) / 3)
    assert df.attrs["configured"] == pytest.approx((0.8 + 1 + 1) / 3)
    assert df.attrs["held_out"] == pytest.approx((0.8 + 800 / 900 + 1) / 3)
    assert not df.attrs["adopted"] and best == base
    best2, df2 = tune_postprocess(probs, gts, grid={"threshold": [0.3, 0.5, 0.7]}, base=base, guard=False)
    assert best2.threshold == 0.3 and df2.attrs["adopted"]
