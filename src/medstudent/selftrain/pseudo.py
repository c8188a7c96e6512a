"""Pseudo-label selection for Noisy Student, as plain numpy so it can be tested on hand-made tables.

Classification: keep images whose teacher confidence (max softmax) reaches the threshold; hard (argmax) or
soft (the probability vector) targets; optional class balancing of the kept images as the reference
project's `balance_data` did (large classes down-sampled, small classes duplicated, to one common size).

Segmentation: per-pixel labels from the teacher's probability map; pixels whose confidence is below the
threshold become IGNORE (255) so the student's loss skips them rather than learning them as background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255  # same value as training.losses.IGNORE (kept here so this module stays torch-free)


@dataclass
class ClsPseudo:
    """Kept pseudo labels: `rows` index the probability table (duplicates allowed after balancing)."""

    rows: np.ndarray  # (K,) row indices into the probability table
    targets: np.ndarray  # (K,) int class ids (hard) or (K, C) float probabilities (soft)
    confidence: np.ndarray  # (K,) teacher confidence of each kept row
    kept_per_class: dict[int, int]  # before balancing
    balanced_per_class: dict[int, int]  # after balancing (equal to kept_per_class without balancing)


def balance_indices(labels: np.ndarray, rng: np.random.Generator, target: int | None = None) -> np.ndarray:
    """Positions into `labels` giving every present class `target` members: classes above it are
    down-sampled without replacement, classes below it are duplicated (all members, then a random rest).

    The default target is the mean class size of the classes present (rounded), the reference's choice of a
    size between the rare and the common classes; classes with no member stay empty.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        return np.zeros(0, int)
    target = int(round(counts.mean())) if target is None else int(target)
    out: list[np.ndarray] = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) >= target:
            out.append(np.sort(rng.choice(members, target, replace=False)))
        else:
            reps, rest = divmod(target, len(members))
            out.append(
                np.concatenate([np.tile(members, reps), np.sort(rng.choice(members, rest, replace=False))])
            )
    return np.concatenate(out)


def select_cls_pseudo(
    probs: np.ndarray,
    threshold: float,
    soft: bool = False,
    balance: bool = False,
    seed: int = 0,
) -> ClsPseudo:
    """Choose pseudo labels from an (N, C) table of teacher probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"expected an (N, C) probability table, got shape {probs.shape}")
    conf = probs.max(1)
    hard = probs.argmax(1)
    rows = np.flatnonzero(conf >= threshold)
    kept = {int(c): int((hard[rows] == c).sum()) for c in range(probs.shape[1])}
    if balance and len(rows):
        rows = rows[balance_indices(hard[rows], np.random.default_rng(seed))]
    balanced = {int(c): int((hard[rows] == c).sum()) for c in range(probs.shape[1])}
    targets = probs[rows].astype(np.float32) if soft else hard[rows]
    return ClsPseudo(rows, targets, conf[rows], kept, balanced)


def seg_pseudo_mask(
    prob: np.ndarray, threshold: float, hard: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Pseudo mask (uint8 class ids, IGNORE where the teacher is unsure) and its confident-pixel fraction.

    prob: (H, W) foreground probability (binary) or (C, H, W) class probabilities. Confidence is the
    probability of the predicted class (max(p, 1 - p) for binary). `hard` optionally replaces the argmax
    labels (e.g. post-processed masks); the ignore region still comes from the confidence.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim == 2:
        conf = np.maximum(prob, 1.0 - prob)
        labels = (prob > 0.5).astype(np.uint8)
    elif prob.ndim == 3:
        conf = prob.max(0)
        labels = prob.argmax(0).astype(np.uint8)
    else:
        raise ValueError(f"expected (H, W) or (C, H, W) probabilities, got shape {prob.shape}")
    if hard is not None:
        labels = np.asarray(hard).astype(np.uint8)
    confident = conf >= threshold
    mask = np.where(confident, labels, IGNORE).astype(np.uint8)
    return mask, float(confident.mean())


def pseudo_mask_agreement(mask: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """How good a pseudo mask is against the hidden ground truth: accuracy of its confident pixels and the
    Dice of its foreground (ignored pixels count as background), 1.0 when both are empty."""
    valid = mask != IGNORE
    truth = np.asarray(truth) > 0
    fg = (mask > 0) & valid
    acc = float((fg[valid] == truth[valid]).mean()) if valid.any() else float("nan")
    inter, total = int((fg & truth).sum()), int(fg.sum() + truth.sum())
    return {"pixel_precision": acc, "dice": 1.0 if total == 0 else 2 * inter / total}
