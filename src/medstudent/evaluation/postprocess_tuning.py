"""`medstudent tune-postprocess`: validation probability maps of a run -> best post-processing, saved in the
run folder (postprocess.json), where `predict` picks it up. The tuned setting replaces the run's configured
one only when the search also wins leave-one-image-out (see `tune_postprocess`'s guard)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.config import PostprocessConfig
from medstudent.core.postprocess import (
    as_mask,
    as_prob,
    closing,
    component_stats,
    fill_border_objects,
    fill_holes,
    hysteresis_keep,
    postprocess,
)
from medstudent.data.layouts import open_dataset
from medstudent.data.splits import fold_ids, load_split
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.metrics import mean_dice
from medstudent.inference.predict import load_predictor, predict_seg_probs
from medstudent.rundir import RunDir

# A modest default grid: stage 1 (binarisation x min_area) is exact and cheap whatever its size;
# stage 2 (morphology, 12 chains) costs ~0.5 s per 864x480 map and candidate; see `tune_postprocess`.
DEFAULT_GRID: dict[str, list] = {
    "hysteresis": [False, True],
    "threshold": [0.3, 0.4, 0.5, 0.6, 0.7],
    "high": [0.3, 0.4, 0.5, 0.6, 0.7],
    "low": [0.2, 0.3, 0.4],
    "drop": [0.5, 0.6, 0.7, 0.8, 0.9],
    "min_area": [0, 100, 500, 2000],
    "closing": [0, 3, 5],
    "fill_holes": [False, True],
    "fill_border": [False, True],
}


# ------------------------------------------------------------------------------------------ the search


def _counts(labels: np.ndarray, n: int, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-object area and overlap with the ground truth (index 0 = background)."""
    return np.bincount(labels.ravel(), minlength=n + 1), np.bincount(labels[gt], minlength=n + 1)


def _dice_by_min_area(
    keep: np.ndarray, area: np.ndarray, tp: np.ndarray, gt_px: int, min_areas: Sequence[int]
) -> np.ndarray:
    """Dice of the kept objects after removing those < each min_area, from per-object counts only.

    Matches `evaluation.metrics.seg_scores` (empty pred and empty gt -> 1) without building masks.
    """
    out = np.empty(len(min_areas))
    for i, ma in enumerate(min_areas):
        k = keep & (area >= ma)
        out[i] = _dice_from_counts(int(tp[k].sum()), int(area[k].sum()), gt_px)
    return out


def _binarisations(g: dict[str, list]) -> list[dict[str, Any]]:
    """Distinct binarisation settings; irrelevant parameters are NaN so each row reads unambiguously."""
    nan = float("nan")
    out: list[dict[str, Any]] = []
    for hyst in g["hysteresis"]:
        if not hyst:
            out += [
                {"hysteresis": False, "threshold": t, "high": nan, "low": nan, "drop": nan}
                for t in g["threshold"]
            ]
        else:
            out += [
                {"hysteresis": True, "threshold": nan, "high": h, "low": lo, "drop": d}
                for h, lo, d in itertools.product(g["high"], g["low"], g["drop"])
                if lo <= h
            ]
    return out


def _level(b: dict[str, Any]) -> float:
    return b["low"] if b["hysteresis"] else b["threshold"]


def _keep(b: dict[str, Any], cmax: np.ndarray) -> np.ndarray:
    if b["hysteresis"]:
        return hysteresis_keep(cmax, b["drop"], b["high"])
    keep = np.ones(cmax.size, dtype=bool)  # every component of {prob > threshold}
    keep[0] = False
    return keep


def tune_postprocess(
    probs: list[np.ndarray],
    gts: list[np.ndarray],
    grid: dict[str, list] | None = None,
    base: PostprocessConfig | None = None,
    *,
    top_k: int = 2,
    guard: bool = True,
    verbose: bool = False,
) -> tuple[PostprocessConfig, pd.DataFrame]:
    """Grid search of post-processing that maximises mean Dice (empty/empty = 1) on validation maps.

    Keys of `grid` are `PostprocessConfig` fields; a key left out keeps `base`'s value (the whole default
    grid, `DEFAULT_GRID`, when `grid` is None). `min_area` is in pixels of the maps given.

    Two stages, because morphology is the only costly step:

    1. every binarisation (plain thresholds, and hysteresis (high, low, drop) with low <= high) x every
       min_area, with no morphology. Exact and cheap: the components of {prob > level} are labelled once
       per image and level, and each setting is a filter on their (max prob, area, overlap) counts.
    2. for the `top_k` best binarisations of stage 1: every closing x fill_holes x fill_border x min_area.
       Each morphology chain is built once per map and all min_area values are scored from one labelling.

    So it is a coarse-to-fine search: a binarisation that only wins with morphology but ranks below
    `top_k` without it is not tried with morphology. Default grid (300 stage-1 + top_k x 44 stage-2
    settings), 64 maps of 864x480: ~1 min on one busy core (stage 1 ~6 s); time grows with pixel count.
    Returns the best config (ties -> the earlier, simpler setting) and every tried setting with its mean
    Dice (best first; the `stage` column says where it was tried).

    `guard`: the best of hundreds of settings on a few dozen images is optimistic (a 26-image STAS fold
    rose 0.786 -> 0.820 with a setting that lowered test Dice). So the whole search is also scored
    leave-one-image-out: each image gets the setting that is best on the others. `base` is kept unless that
    held-out mean Dice beats `base`'s own. Stage 2's candidates were ranked on all images, so the held-out
    figure is still slightly optimistic. `df.attrs` holds "configured", "tuned", "held_out" (mean Dice)
    and "adopted".
    """
    base = base or PostprocessConfig()
    g = _resolve_grid(grid, base)
    if len(probs) != len(gts):
        raise DataError(None, f"tune_postprocess: {len(probs)} probability maps but {len(gts)} masks")
    if not probs:
        raise DataError(None, "tune_postprocess: no validation maps")
    pairs = []
    for i, (p, m) in enumerate(zip(probs, gts, strict=True)):
        p, m = as_prob(p), as_mask(m)
        if p.shape != m.shape:
            raise DataError(None, f"tune_postprocess: map {i} has shape {p.shape} but its mask {m.shape}")
        pairs.append((p, m, int(m.sum())))
    t0 = time.perf_counter()
    min_areas = g["min_area"]
    bins = _binarisations(g)
    if not bins:
        raise ConfigError(None, "tune_postprocess: the grid gives no binarisation (need low <= high)")

    # Stage 1: dice[binarisation, min_area, image]
    dice1 = np.empty((len(bins), len(min_areas), len(pairs)))
    levels = sorted({_level(b) for b in bins})
    for j, (p, m, gpx) in enumerate(pairs):
        for lv in levels:
            labels, cmax = component_stats(p, lv)
            area, tp = _counts(labels, cmax.size - 1, m)
            for i, b in enumerate(bins):
                if _level(b) == lv:
                    dice1[i, :, j] = _dice_by_min_area(_keep(b, cmax), area, tp, gpx, min_areas)
    plain = (0, False, False)  # the chain without morphology
    morphs = list(itertools.product(g["closing"], g["fill_holes"], g["fill_border"]))
    rows, per_image = [], []  # per_image[r]: the Dice of every image under rows[r]
    if plain in morphs:  # else stage 1 only ranks the binarisations
        for i, b in enumerate(bins):
            for k, ma in enumerate(min_areas):
                rows.append(_row(1, b, plain, ma, dice1[i, k]))
                per_image.append(dice1[i, k])
    if verbose:
        print(f"tune_postprocess: stage 1, {len(rows)} settings in {time.perf_counter() - t0:.1f} s")

    # Stage 2: the top_k binarisations (by their best min_area) with every morphology chain.
    if morphs != [plain]:
        best_per_bin = dice1.mean(axis=2).max(axis=1)
        for i in np.argsort(-np.round(best_per_bin, 12), kind="stable")[: max(1, top_k)]:
            b = bins[i]
            dice2 = np.empty((len(morphs), len(min_areas), len(pairs)))
            for j, (p, m, gpx) in enumerate(pairs):
                labels, cmax = component_stats(p, _level(b))
                mask0 = _keep(b, cmax)[labels]
                # Build each chain prefix once: closing -> fill holes -> fill border, as `postprocess`.
                for r in g["closing"]:
                    m_c = closing(mask0, r)
                    for fh in g["fill_holes"]:
                        m_h = fill_holes(m_c) if fh else m_c
                        for fb in g["fill_border"]:
                            if (r, fh, fb) == plain:
                                continue  # scored in stage 1
                            m_b = fill_border_objects(m_h) if fb else m_h
                            lab, n = ndi.label(m_b)
                            keep = np.ones(n + 1, dtype=bool)
                            keep[0] = False
                            q = morphs.index((r, fh, fb))
                            dice2[q, :, j] = _dice_by_min_area(keep, *_counts(lab, n, m), gpx, min_areas)
            for q, mo in enumerate(morphs):
                if mo != plain:
                    for k, ma in enumerate(min_areas):
                        rows.append(_row(2, b, mo, ma, dice2[q, k]))
                        per_image.append(dice2[q, k])
            if verbose:
                print(f"tune_postprocess: stage 2, candidate {b} done at {time.perf_counter() - t0:.1f} s")

    df = pd.DataFrame(rows)
    order = np.argsort(-np.round(df["mean_dice"].to_numpy(), 12), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    configured = np.array([_dice(postprocess(p, base), m) for p, m, _ in pairs])
    held_out = _leave_one_out(np.stack(per_image)[order])
    adopted = not guard or held_out.mean() > configured.mean()
    df.attrs.update(
        configured=float(configured.mean()),
        tuned=float(df["mean_dice"].iloc[0]),
        held_out=float(held_out.mean()),
        adopted=bool(adopted),
    )
    if not adopted:
        return base.model_copy(), df
    best = df.iloc[0]
    hyst = bool(best["hysteresis"])
    update: dict[str, Any] = {
        "hysteresis": hyst,
        "closing": int(best["closing"]),
        "fill_holes": bool(best["fill_holes"]),
        "fill_border": bool(best["fill_border"]),
        "min_area": int(best["min_area"]),
    }
    update.update({k: float(best[k]) for k in (("high", "low", "drop") if hyst else ("threshold",))})
    return base.model_copy(update=update), df


def _dice_from_counts(tp: int, pred_px: int, gt_px: int) -> float:
    """Dice with empty/empty = 1, as `evaluation.metrics.seg_scores` (kept here: no sklearn import)."""
    return 1.0 if pred_px + gt_px == 0 else 2.0 * tp / (pred_px + gt_px)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return _dice_from_counts(int((pred & gt).sum()), int(pred.sum()), int(gt.sum()))


def _leave_one_out(dice: np.ndarray) -> np.ndarray:
    """dice[setting, image] (settings in rank order) -> each image's Dice under the setting that is best
    on all the other images (ties -> the earlier setting, as in the ranking). One image: its own best."""
    if dice.shape[1] < 2:
        return dice[0]
    others = np.round(dice.sum(axis=1, keepdims=True) - dice, 12)  # [setting, left-out image]
    pick = np.argmax(others, axis=0)
    return dice[pick, np.arange(dice.shape[1])]


def _row(stage: int, b: dict[str, Any], morph: tuple, min_area: int, dice: np.ndarray) -> dict[str, Any]:
    r, fh, fb = morph
    return {
        "stage": stage,
        **b,
        "closing": r,
        "fill_holes": fh,
        "fill_border": fb,
        "min_area": min_area,
        "mean_dice": float(dice.mean()),
    }


def _resolve_grid(grid: dict[str, list] | None, base: PostprocessConfig) -> dict[str, list]:
    if grid is None:
        return _typed(DEFAULT_GRID)
    fields = set(PostprocessConfig.model_fields)
    unknown = sorted(set(grid) - fields)
    if unknown:
        raise ConfigError(None, f"tune_postprocess: unknown grid key(s) {unknown}; known: {sorted(fields)}")
    out = {}
    for k in fields:
        vals = list(dict.fromkeys(grid[k])) if k in grid else [getattr(base, k)]
        if not vals:
            raise ConfigError(None, f"tune_postprocess: grid key '{k}' has no values")
        out[k] = vals
    return _typed(out)


def _typed(g: dict[str, list]) -> dict[str, list]:
    """Cast grid values to the config's types (YAML may give 3.0 for a radius or 1 for true)."""
    ints, bools = ("closing", "min_area"), ("hysteresis", "fill_holes", "fill_border")
    return {
        k: list(dict.fromkeys(int(x) if k in ints else bool(x) if k in bools else float(x) for x in v))
        for k, v in g.items()
    }


# ------------------------------------------------------------------------------------- a run's folder
def validation_maps(run: Path, tta: str | None = None, progress: Callable[[str], None] | None = None):
    """(probability maps, ground truths, ids) of the run's validation fold, at the original image size."""
    pred = load_predictor(run, device="auto")
    if pred.task != "segmentation":
        raise DataError(run, "post-processing is tuned for segmentation runs only")
    cfg = pred.cfg
    ds = open_dataset(cfg.data.root, label_map=cfg.data.label_map, empty_if_missing=cfg.data.empty_if_missing)
    split = load_split(RunDir(run).split, ds)
    _, val_ids, _ = fold_ids(split, cfg.data.fold)
    if not val_ids:
        raise DataError(
            run, "has no validation images (trained with fold all): tune post-processing on a fold run"
        )
    index = {i: n for n, i in enumerate(ds.ids())}
    probs, gts = [], []
    for n, vid in enumerate(val_ids):
        img, gt = ds.load(index[vid])
        probs.append(predict_seg_probs(pred, img, tta or cfg.predict.tta).astype(np.float32))
        gts.append(gt > 0)
        if progress and (n + 1) % 10 == 0:
            progress(f"validation maps {n + 1}/{len(val_ids)}")
    return probs, gts, val_ids, pred


def _save_val_predictions(folder: Path, probs: list[np.ndarray], ids: list[str]) -> None:
    """Validation probability maps (uint8 PNG, 0-255) in the run tree, as nnU-Net keeps its predictions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for p, i in zip(probs, ids, strict=True):
        p8 = np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)
        with atomic_path(folder / f"{Path(i).name}.png", fsync=False) as tmp:
            Image.fromarray(p8).save(tmp, format="PNG")


def tune_run(
    run: str | Path,
    tta: str | None = None,
    grid: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    run = Path(run)
    probs, gts, ids, pred = validation_maps(run, tta, progress)
    _save_val_predictions(RunDir(run).val_maps, probs, ids)
    best, table = tune_postprocess(probs, gts, grid=grid, base=pred.cfg.postprocess)
    plain = mean_dice([p > 0.5 for p in probs], gts)
    path = RunDir(run).postprocess
    write_text_atomic(path, json.dumps(best.model_dump(mode="json"), indent=1))
    with atomic_path(run / "postprocess_grid.csv") as tmp:
        table.to_csv(tmp, index=False)
    return {
        "images": len(ids),
        "dice_plain": float(plain),
        "dice_configured": table.attrs["configured"],  # the run's own post-processing (config.yaml)
        "dice_tuned": table.attrs["tuned"],  # the grid's best on all validation images (optimistic)
        "dice_held_out": table.attrs["held_out"],  # the search scored leave-one-image-out
        "adopted": table.attrs["adopted"],  # tuned setting written; else the configured one is kept
        "best": best.model_dump(mode="json"),
        "path": str(path),
    }
