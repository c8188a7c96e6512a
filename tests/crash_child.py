"""A `medstudent` command run in a child process that kills itself (SIGKILL, no cleanup) at a chosen
point, for the crash-safety tests (test_crash.py):

CRASH_AT_SAVE=<name>:<n>  dies half-way through writing the n-th save of checkpoint <name> (temp file
                          partly written, the rename never happens)
CRASH_AT_STEP=<k>[:<n>]   dies at the start of training step k (global step), i.e. mid-epoch, the n-th
                          time a trainer of this process reaches it (cv: n=2 is the second fold)
CRASH_AT_CALL=<mod>:<fn>:<n>  dies on the n-th call of function <fn> of module <mod>
"""

from __future__ import annotations

import importlib
import io
import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_save(spec: str) -> None:
    import torch

    name, n = spec.rsplit(":", 1)
    real_save, seen = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike) and os.path.basename(f).startswith(f".{name}."):
            seen[0] += 1
            if seen[0] == int(n):
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                with open(f, "wb") as fh:
                    fh.write(buf.getvalue()[: buf.tell() // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _kill_at_step(spec: str) -> None:
    from medstudent.training.module import TaskModule

    k, _, n = spec.partition(":")
    real_step, seen = TaskModule.training_step, [0]

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == int(k):
            seen[0] += 1
            if seen[0] == int(n or 1):
                _die()
        return real_step(self, batch, batch_idx)

    TaskModule.training_step = training_step


def _kill_at_call(spec: str) -> None:
    mod_name, fn_name, n = spec.split(":")
    mod = importlib.import_module(mod_name)
    real, seen = getattr(mod, fn_name), [0]

    def wrapper(*args, **kwargs):
        seen[0] += 1
        if seen[0] == int(n):
            _die()
        return real(*args, **kwargs)

    setattr(mod, fn_name, wrapper)


if __name__ == "__main__":
    if spec := os.environ.get("CRASH_AT_SAVE"):
        _kill_at_save(spec)
    if step := os.environ.get("CRASH_AT_STEP"):
        _kill_at_step(step)
    if spec := os.environ.get("CRASH_AT_CALL"):
        _kill_at_call(spec)
    from medstudent.cli import app

    app(sys.argv[1:])
