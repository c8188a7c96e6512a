"""Post-processing of binary foreground probability maps into masks, applied by the core after either
engine (its grid search lives in `evaluation.postprocess_tuning`).

Order (each step off by default, see `PostprocessConfig`):
threshold or hysteresis -> closing -> fill holes -> fill border-open objects -> remove small objects.

Connectivity: hysteresis components and small-object removal use 4-connectivity, the defaults of the
scikit-image functions the reference STAS system is described with (`apply_hysteresis_threshold`,
`remove_small_objects`).
`fill_border_objects` groups 8-connected pixels into one object, the topological dual of the
4-connected background that `binary_fill_holes` uses (a diagonal step is a closed wall for both).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import closing as _grey_closing
from skimage.morphology import disk

from medstudent.config import PostprocessConfig
from medstudent.errors import DataError

_EIGHT = np.ones((3, 3), dtype=bool)


def as_prob(prob: np.ndarray) -> np.ndarray:
    """Reject what would silently give nonsense masks (logits, NaN, colour images)."""
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise DataError(None, f"probability map must be 2-D (HxW), got shape {prob.shape}")
    if prob.size and not np.isfinite(prob).all():
        raise DataError(None, "probability map contains NaN or inf")
    if prob.size and (prob.min() < -1e-6 or prob.max() > 1 + 1e-6):
        raise DataError(None, f"probability map outside [0, 1] ({prob.min():.3g}..{prob.max():.3g}); logits?")
    return prob


def as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(None, f"mask must be 2-D (HxW), got shape {mask.shape}")
    return mask > 0


def component_stats(prob: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of {prob > low} and each one's max probability (index 0 = background)."""
    labels, n = ndi.label(prob > low)
    cmax = np.zeros(n + 1, dtype=np.float64)
    fg = labels > 0
    # np.maximum.at: one pass, where ndi.maximum(prob, labels, index) is slow for many labels
    np.maximum.at(cmax, labels[fg], prob[fg])
    return labels, cmax


def hysteresis_keep(cmax: np.ndarray, drop: float, high: float) -> np.ndarray:
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
    prob = as_prob(prob)
    labels, cmax = component_stats(prob, min(low, high))
    return hysteresis_keep(cmax, drop, high)[labels]


def remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove 4-connected objects with fewer than `min_area` pixels (bool mask).

    label + bincount instead of `remove_small_objects`, whose size argument changed meaning across
    scikit-image versions (min_size "<" vs max_size "<="); here an object of exactly `min_area` stays.
    """
    mask = as_mask(mask)
    if min_area <= 0:
        return mask
    labels, _ = ndi.label(mask)
    keep = np.bincount(labels.ravel()) >= min_area
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background enclosed by foreground (4-connected background), bool mask."""
    return ndi.binary_fill_holes(as_mask(mask))


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing with a disk of `radius` px: bridges gaps narrower than ~2*radius.

    The disk is decomposed into crosses (faster; identical to `disk(radius)` for radius <= 12) and
    the image border is ignored (outside pixels neither erode nor dilate), so objects that touch the
    border are not eaten away.
    """
    mask = as_mask(mask)
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
    mask = as_mask(mask)
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
    prob = as_prob(prob)
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
