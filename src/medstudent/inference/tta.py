"""Test-time augmentation as a list of invertible dihedral transforms on (B, C, H, W) tensors or arrays.

`flip` = identity + horizontal + vertical flip; `d4` = all 8 rotations/reflections. Inputs are padded to a
multiple of 32, so rot90 keeps them valid for the network.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _lib(x):
    if isinstance(x, np.ndarray):
        return np.flip, lambda a, k: np.rot90(a, k, axes=(-2, -1))
    import torch

    return (lambda a, axis: torch.flip(a, dims=(axis,))), (lambda a, k: torch.rot90(a, k, dims=(-2, -1)))


def forward_op(x, op: tuple[int, bool, bool]):
    flip, rot = _lib(x)
    k, fw, fh = op
    if fw:
        x = flip(x, -1)
    if fh:
        x = flip(x, -2)
    return rot(x, k) if k else x


def inverse_op(y, op: tuple[int, bool, bool]):
    flip, rot = _lib(y)
    k, fw, fh = op
    if k:
        y = rot(y, -k)
    if fh:
        y = flip(y, -2)
    if fw:
        y = flip(y, -1)
    return y


def tta_mean(predict: Callable, x, name: str, spatial: bool = True):
    """Mean of `predict` over the TTA passes; spatial outputs are mapped back before averaging."""
    ops = tta_ops(name)
    total = None
    for op in ops:
        y = predict(forward_op(x, op))
        if spatial:
            y = inverse_op(y, op)
        total = y if total is None else total + y
    return total / len(ops)
