"""Post-processing of binary foreground probability maps into masks, and a grid search to tune it.

Torch-free on purpose: the same code serves the PyTorch predictor and a plain ONNX runner.

Order (each step off by default, see `PostprocessConfig`):
threshold or hysteresis -> closing -> fill holes -> fill border-open objects -> remove small objects.

Connectivity: hysteresis components and small-object removal use 4-connectivity, the defaults of the
scikit-image functions the reference STAS system is described with (`apply_hysteresis_threshold`,
`remove_small_objects`).
`fill_border_objects` groups 8-connected pixels into one object, the topological dual of the
4-connected background that `binary_fill_holes` uses (a diagonal step is a closed wall for both).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.morphology import closing as _grey_closing
from skimage.morphology import disk

from medstudent.config import PostprocessConfig
from medstudent.errors import ConfigError, DataError

_EIGHT = np.ones((3, 3), dtype=bool)

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


def _as_prob(prob: np.ndarray) -> np.ndarray:
    """Reject what would silently give nonsense masks (logits, NaN, colour images)."""
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise DataError(None, f"probability map must be 2-D (HxW), got shape {prob.shape}")
    if prob.size and not np.isfinite(prob).all():
        raise DataError(None, "probability map contains NaN or inf")
    if prob.size and (prob.min() < -1e-6 or prob.max() > 1 + 1e-6):
        raise DataError(None, f"probability map outside [0, 1] ({prob.min():.3g}..{prob.max():.3g}); logits?")
    return prob


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(None, f"mask must be 2-D (HxW), got shape {mask.shape}")
    return mask > 0


def _component_stats(prob: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of {prob > low} and each one's max probability (index 0 = background)."""
    labels, n = ndi.label(prob > low)
    cmax = np.zeros(n + 1, dtype=np.float64)
    fg = labels > 0
    # np.maximum.at is ~10x faster than ndi.maximum(prob, labels, index) for many labels.
    np.maximum.at(cmax, labels[fg], prob[fg])
    return labels, cmax


def _hysteresis_keep(cmax: np.ndarray, drop: float, high: float) -> np.ndarray:
    keep = (cmax > high) & (cmax >= drop)
    keep[0] = False
    return keep


def hysteresis(prob: np.ndarray, drop: float, high: float, low: float) -> np.ndarray:
    """Hysteresis threshold with a drop rule, as the 0.911 STAS system defined it (bool mask).

    Exact semantics: take the 4-connected components of ``{prob > low}``; keep a component iff
    its maximum probability is ``> high`` (it contains a seed pixel) **and** ``>= drop`` (objects that
    never get confident are dropped whole). ``low`` is clipped to ``high`` as scikit-image does.
    The first rule is `skimage.filters.apply_hysteresis_threshold(prob, low, high)` (tested equal); it
    is done here in one labelling pass because the drop rule needs the same components' maxima, and
    `tune_postprocess` reuses them for every (high, drop) pair. ``drop <= high`` makes the rule a no-op.
    """
    prob = _as_prob(prob)
    labels, cmax = _component_stats(prob, min(low, high))
    return _hysteresis_keep(cmax, drop, high)[labels]


def remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove 4-connected objects with fewer than `min_area` pixels (bool mask).

    label + bincount instead of `remove_small_objects`, whose size argument changed meaning across
    scikit-image versions (min_size "<" vs max_size "<="); here an object of exactly `min_area` stays.
    """
    mask = _as_mask(mask)
    if min_area <= 0:
        return mask
    labels, _ = ndi.label(mask)
    keep = np.bincount(labels.ravel()) >= min_area
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background enclosed by foreground (4-connected background), bool mask."""
    return ndi.binary_fill_holes(_as_mask(mask))


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing with a disk of `radius` px: bridges gaps narrower than ~2*radius.

    The disk is decomposed into crosses (~5x faster; identical to `disk(radius)` for radius <= 12) and
    the image border is ignored (outside pixels neither erode nor dilate), so objects that touch the
    border are not eaten away.
    """
    mask = _as_mask(mask)
    if radius <= 0 or not mask.any():
        return mask
    return _grey_closing(mask, disk(radius, decomposition="crosses"), mode="ignore")


def _border_spans(mask: np.ndarray) -> np.ndarray | None:
    """Padded copy of `mask` whose 1-px frame is set along each object's contact span on each side.

    For every 8-connected object and every image side it touches, the frame is set from its first to its
    last contact on that side. Returns None when no span bridges a gap (nothing to fill).
    """
    h, w = mask.shape
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return None
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    sides = (
        (labels[0, :], padded[0, 1:-1]),
        (labels[-1, :], padded[-1, 1:-1]),
        (labels[:, 0], padded[1:-1, 0]),
        (labels[:, -1], padded[1:-1, -1]),
    )
    bridged = False
    for line, frame in sides:  # frame is a view into padded
        pos = np.flatnonzero(line)
        if pos.size == 0:
            continue
        for lab in np.unique(line[pos]):
            at = pos[line[pos] == lab]
            lo, hi = at[0], at[-1]
            frame[lo : hi + 1] = True
            bridged |= bool((line[lo : hi + 1] != lab).any())
    return padded if bridged else None


def fill_border_objects(mask: np.ndarray) -> np.ndarray:
    """Fill concavities that an object leaves open at the image border (bool mask).

    `binary_fill_holes` cannot fill a hole that touches the image border (e.g. a ring cut by the image
    edge). Rule: for each 8-connected object and each image side it touches, the border segment from its
    first to its last contact on that side is treated as closed (a 1-px frame of 1s outside the image);
    background that this closes off *and that touches the image border* is filled. So:

    - a C-shaped object opening onto one side is filled; ordinary interior holes are left to `fill_holes`;
    - background between two *different* objects is never closed (each object closes only its own span);
    - an object that cuts off a corner or spans the image side to side closes nothing: which side is
      "inside" is ambiguous there (contacts on different sides are not joined round a corner).
    """
    mask = _as_mask(mask)
    padded = _border_spans(mask)
    if padded is None:
        return mask
    added = ndi.binary_fill_holes(padded)[1:-1, 1:-1] & ~mask
    labels, n = ndi.label(added)  # 4-connected: the background connectivity of binary_fill_holes
    if n == 0:
        return mask
    on_border = np.zeros(n + 1, dtype=bool)
    for line in (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]):
        on_border[line] = True
    on_border[0] = False
    return mask | on_border[labels]


def for_ensemble(cfg: PostprocessConfig, ensemble: str) -> PostprocessConfig:
    """The post-processing for an ensemble mode: a vote map (fraction of members) is cut at 0.5 without
    hysteresis, i.e. a strict majority; mean probabilities keep the tuned setting."""
    if ensemble == "vote":
        return cfg.model_copy(update={"threshold": 0.5, "hysteresis": False})
    return cfg


def postprocess(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Probability map (HxW float in [0, 1]) -> uint8 0/1 mask, steps in the module's order."""
    prob = _as_prob(prob)
    mask = hysteresis(prob, cfg.drop, cfg.high, cfg.low) if cfg.hysteresis else prob > cfg.threshold
    if cfg.closing > 0:
        mask = closing(mask, cfg.closing)
    if cfg.fill_holes:
        mask = fill_holes(mask)
    if cfg.fill_border:
        mask = fill_border_objects(mask)
    if cfg.min_area > 0:
        mask = remove_small(mask, cfg.min_area)
    return mask.astype(np.uint8)


# ----------------------------------------------------------------------------------------------- tuning


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
        return _hysteresis_keep(cmax, b["drop"], b["high"])
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
        p, m = _as_prob(p), _as_mask(m)
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
            labels, cmax = _component_stats(p, lv)
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
                labels, cmax = _component_stats(p, _level(b))
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
