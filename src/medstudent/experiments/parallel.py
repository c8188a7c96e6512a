"""Folds of a `medstudent cv` run side by side (--fold-parallel): one spawned process per fold."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use (as CUDA_VISIBLE_DEVICES names them), [] without CUDA."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA is no GPU
        n = 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def _init_worker(slots: Any) -> None:
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch touches CUDA in this fresh process


def run_parallel(
    job: Callable[..., dict[str, Any]], jobs: list[tuple], n: int
) -> Iterator[tuple[int, dict[str, Any] | None, BaseException | None]]:
    """Run `job(*args, threads)` for every args tuple of `jobs` (the fold index third) in `n` spawned
    processes, one GPU each (round robin) when GPUs are present, else the CPU cores shared out. `job` must
    be a module-level function: it is sent to the worker processes. Yields (fold, result, error)."""
    ctx = mp.get_context("spawn")
    gpus = visible_gpus()
    slots = ctx.Queue()
    for i in range(n):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // n)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(slots,)) as pool:
        futures = {pool.submit(job, *args, threads): args[2] for args in jobs}
        for fut in as_completed(futures):
            err = fut.exception()
            yield futures[fut], (None if err else fut.result()), err
