"""The folder state of a `medstudent cv` run: its split (split.json) and its manifest (cv_manifest.json).

The manifest records which folds are done, with their models and metrics, and a fingerprint of the
configuration that made them: a rerun skips finished folds and refuses a changed configuration. One process
works in a folder at a time (`folder_lock`).
"""

from __future__ import annotations

import fcntl
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medstudent.atomic import write_text_atomic
from medstudent.config import RunConfig
from medstudent.data.layouts import open_labeled
from medstudent.data.splits import load_split, make_split, save_split
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError
from medstudent.rundir import RunDir

MANIFEST = "cv_manifest.json"
MANIFEST_FORMAT = "medstudent-cv/1"
# Settings that change how a fold runs, not what it computes: they may differ between a run and its resume.
RUNTIME_KEYS = (
    "data.fold",
    "data.split",
    "data.num_workers",
    "train.threads",
    "train.devices",
    "train.num_nodes",
    "train.strategy",
    "train.accelerator",
    "search",
)


def _split_content(split: dict) -> tuple:
    return (split["test"], split["folds"])


def new_split(cfg: RunConfig, n_folds: int | None = None) -> dict:
    """A split of cfg's data set made as `medstudent train` makes one (without importing the trainer)."""
    d = cfg.data
    ds = open_labeled(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_split(ds, d.test_fraction, n_folds or d.n_folds, d.split_seed)


def resolve_split(cfg: RunConfig, root: Path, split_path: str | Path | None, n_folds: int | None) -> Path:
    """The split of this CV folder, <root>/split.json: copied from `split_path` / data.split, kept from an
    earlier run, or made (with `n_folds` folds) from the data set. Returns its path."""
    target = RunDir(root).split
    src = Path(split_path) if split_path else (Path(cfg.data.split) if cfg.data.split else None)
    if src is not None and src.resolve() != target.resolve():
        split = load_split(src)
        if target.is_file() and _split_content(load_split(target)) != _split_content(split):
            raise DataError(target, f"differs from {src}: this CV folder was made with another split")
    elif target.is_file():
        src, split = target, load_split(target)
    else:
        split, src = new_split(cfg, n_folds), None
    if n_folds is not None and len(split["folds"]) != n_folds:
        raise ConfigError(src or target, f"has {len(split['folds'])} fold(s), but {n_folds} were asked for")
    if is_main() and (src is None or src.resolve() != target.resolve()):
        save_split(split, target)
    return target


def _fingerprint(cfg: RunConfig) -> dict:
    doc = cfg.model_dump(mode="json")
    for key in RUNTIME_KEYS:
        *path, last = key.split(".")
        node = doc
        for p in path:
            node = node.get(p) or {}
        node.pop(last, None)
    return doc


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def load_manifest(root: Path, cfg: RunConfig | None = None) -> dict:
    """The CV manifest of `root` (a new one when absent); with `cfg`, check it was made for that config."""
    path = root / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "config": _fingerprint(cfg) if cfg else None, "folds": {}}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e}); delete it to start the CV over") from e
    if doc.get("format") != MANIFEST_FORMAT:
        raise DataError(path, f"not a medstudent CV manifest (format {doc.get('format')!r})")
    if cfg is not None and doc.get("config") is not None:
        changed = _diff(doc["config"], _fingerprint(cfg))
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise ConfigError(
                path,
                f"was written for another configuration ({', '.join(changed[:5])}{more} differ); "
                "choose another train.name, or delete the folder to start over",
            )
    return doc


def save_manifest(root: Path, doc: dict) -> None:
    if not is_main():
        return
    write_text_atomic(root / MANIFEST, json.dumps(doc, indent=1))


@contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """One CV process per folder: a second one fails at once instead of training the same folds."""
    root.mkdir(parents=True, exist_ok=True)
    if not is_main():  # DDP ranks > 0 rerun the command beside rank 0, which holds the lock
        yield
        return
    with open(root / ".cv.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(root, "another `medstudent cv` is working in this folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
