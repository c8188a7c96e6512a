"""Combining the members of an ensemble: a (weighted) mean of probabilities, or a (weighted) vote."""

from __future__ import annotations

import numpy as np

from medstudent.errors import DataError


def combine(
    probs: list[np.ndarray], mode: str = "mean", weights: list[float] | None = None, threshold: float = 0.5
) -> np.ndarray:
    """Combine member probabilities: `mean` averages; `vote` returns the (weighted) fraction of members
    whose thresholded (binary maps) or argmax (multi-class maps, classification) prediction is positive,
    so a final > 0.5 threshold is a strict majority vote. Weights are normalised; equal weights take the
    plain mean (bit-identical to an unweighted ensemble)."""
    if mode == "mean" and len(probs) == 1:
        return probs[0]  # the mean of one map, without copying a full-size stack
    stack = np.stack(probs)
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).astype(np.float32)
    equal = bool(np.allclose(w, w[0]))
    if mode == "mean":
        return stack.mean(0) if equal else np.tensordot(w, stack, axes=1)
    if mode != "vote":
        raise DataError(None, f"unknown ensemble mode '{mode}' (mean, vote)")
    if stack.ndim == 3:  # binary foreground maps (M, H, W)
        votes = (stack > threshold).astype(np.float32)
    else:
        c = stack.shape[1]
        votes = np.moveaxis(np.eye(c, dtype=np.float32)[stack.argmax(1)], -1, 1)
    return votes.mean(0).astype(np.float32) if equal else np.tensordot(w, votes, axes=1)
