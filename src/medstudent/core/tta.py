"""Test-time augmentation as a list of invertible dihedral transforms on (B, C, H, W) numpy arrays.

`flip` = identity + horizontal + vertical flip; `d4` = all 8 rotations/reflections. Inputs are padded to a
multiple of 32, so rot90 keeps them valid for the network. Every engine runs these numpy ops around its
network call (`core.inferer`), so the views and their inverses are written once.
"""

from __future__ import annotations

import numpy as np

# (k rot90 quarter-turns, flip last axis) pairs, applied as flip then rotate; inverse undoes in reverse order
_D4 = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
TTA_SETS: dict[str, list[tuple[int, bool, bool]]] = {
    "none": [(0, False, False)],
    "flip": [(0, False, False), (0, True, False), (0, False, True)],
    "d4": [(k, f, False) for k, f in _D4],
}


def tta_ops(name: str) -> list[tuple[int, bool, bool]]:
    """(quarter turns, flip width axis, flip height axis) for each pass."""
    try:
        return TTA_SETS[name]
    except KeyError as e:
        raise ValueError(f"unknown TTA '{name}' (none, flip, d4)") from e


def forward_op(x: np.ndarray, op: tuple[int, bool, bool]) -> np.ndarray:
    """The TTA view `op` of x (flips first, then quarter turns over the last two axes); a strided view."""
    k, fw, fh = op
    if fw:
        x = np.flip(x, -1)
    if fh:
        x = np.flip(x, -2)
    return np.rot90(x, k, axes=(-2, -1)) if k else x


def inverse_op(y: np.ndarray, op: tuple[int, bool, bool]) -> np.ndarray:
    """Map an output of the view `op` back onto the input's geometry (the steps of `forward_op` reversed)."""
    k, fw, fh = op
    if k:
        y = np.rot90(y, -k, axes=(-2, -1))
    if fh:
        y = np.flip(y, -2)
    if fw:
        y = np.flip(y, -1)
    return y


def tta_passes(task: str, tta: str) -> int:
    """Network passes per member: segmentation runs every op of the set; classification runs the image
    alone (none) or with its horizontal mirror (any other set)."""
    ops = tta_ops(tta)
    if task == "classification":
        return 1 if tta == "none" else 2
    return len(ops)
