"""Rank helpers for multi-process runs (Lightning DDP, torchrun, SLURM): who am I, my share of the
images, and gathering per-rank results, so pseudo-labelling and prediction split their work across ranks.

Lightning launches training processes itself; prediction and pseudo-labelling outside a Trainer use the
process group Lightning left behind, or create one (gloo on CPU, NCCL on GPU) from torchrun's environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _dist():
    """torch.distributed, or None when unavailable. Without torch imported there can be no process group,
    so this does not import it (the ONNX runner and split tools stay torch-free)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def rank_world() -> tuple[int, int]:
    """(global rank, world size): from the process group when there is one, else from the launcher's
    environment (torchrun: RANK/WORLD_SIZE; Lightning: NODE_RANK/LOCAL_RANK; SLURM: SLURM_PROCID/NTASKS)."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if "RANK" in env:
        return int(env["RANK"]), world
    if "SLURM_PROCID" in env and "LOCAL_RANK" not in env:
        return int(env["SLURM_PROCID"]), world
    local = int(env.get("LOCAL_RANK", 0))
    per_node = int(env.get("LOCAL_WORLD_SIZE", world // max(1, int(env.get("NUM_NODES", 1)))))
    return int(env.get("NODE_RANK", 0)) * per_node + local, world


def is_main() -> bool:
    return rank_world()[0] == 0


def ensure_group() -> bool:
    """Join (or create) the default process group when the run has several ranks; False when single."""
    _, world = rank_world()
    if world <= 1:
        return False
    import torch

    dist = _dist()
    if dist is None:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return True


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: every world-th item starting at its rank (balanced, order-preserving)."""
    rank, world = rank_world()
    return list(items[rank::world])


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] when single-process)."""
    if not ensure_group():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if ensure_group():
        _dist().barrier()


def launch_local(n: int) -> int:
    """Run this very command as n local ranks (RANK/WORLD_SIZE set, CPU threads split between them) and
    wait for all; returns the worst exit status. For commands that shard by rank without a process group
    (`predict --devices N`); training is launched by Lightning instead."""
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n)}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, *sys.argv], env=env))
    return max(p.wait() for p in procs)
