"""Atomic file writes: a temp file in the target's own folder, flushed to disk, then `os.replace`d.

A process killed mid-write (SIGKILL, OOM killer, a pre-empted node) leaves either the previous file or the
new one, never a truncated one that --resume, a manifest reader or a prediction table would then trust.
The temp file sits next to the target (same file system, so the rename is atomic; Lightning's own fsspec
transaction writes to /tmp and *copies* across devices). Temp names start with `.` and end with `.tmp`, so
globs such as `*.ckpt` or `*.png` never see them; `remove_stale_temps` sweeps those a kill left behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "atomic_path", "remove_stale_temps", "write_bytes_atomic", "write_text_atomic"]

TEMP_SUFFIX = ".tmp"
# mkstemp makes 0600 files; an output file should get the mode an ordinary open() gives (0666 less the
# umask), or colleagues on a shared cluster cannot read predictions and reports. The umask is read once at
# import (os.umask is the only way to read it and it changes process state, so not per call in threads).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path` for any writer (torch.save, PIL, pandas); on success it replaces
    `path` in one rename, on an exception it is removed and `path` is left as it was.

    The temp name is `.<name>.<random>.tmp`: writers that choose a format from the suffix (PIL) must be
    given it explicitly (`format="PNG"`). `fsync=False` for the many per-image outputs (masks, maps,
    overlays): still atomic against a killed process, only not flushed against a power cut, which would
    cost milliseconds per file on a large prediction folder (more on network storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """`Path.write_bytes`, atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8", fsync: bool = True) -> None:
    """`Path.write_text`, atomically."""
    write_bytes_atomic(path, text.encode(encoding), fsync=fsync)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files that a killed writer left in `folder` (not recursive); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


def _fsync(path: Path) -> None:
    """Data on disk before the rename: otherwise a power loss can persist the rename but not the bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
