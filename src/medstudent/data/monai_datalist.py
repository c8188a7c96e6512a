"""A MONAI decathlon-style datalist read back: as `data export-monai` writes it, or any such file.

The document is `{"training": [{"image", "label", "fold"?}, ...], "test": [...]?, "labels": {...}?}`. Paths
are resolved as `monai.data.load_decathlon_datalist` does: joined to `base_dir` (default: the datalist's own
folder), so absolute paths stay as they are. Every defect is a one-line `DataError` naming the datalist and
the reason (the entry's list and index for a bad entry or a missing file). `open_monai_datalist` gives a
segmentation data set (training and labelled test entries) and `datalist_split` the split its `fold` keys
and `test` list describe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medstudent.data.io import read_regular_bytes
from medstudent.data.layouts import SegItem, SegmentationDataset
from medstudent.errors import DataError

MAX_DATALIST_BYTES = 64 << 20
SHAPE = 'a MONAI datalist is {"training": [{"image": ..., "label": ...}, ...], "test": [...]}'


def _path(path: Path, base: Path, key: str, where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(
            path, f"{where} '{key}' must be one file path (a non-empty string), got {value!r:.60}"
        )
    resolved = Path(os.path.normpath(os.path.join(base, value)))  # as MONAI's _append_paths
    if not resolved.is_file():
        raise DataError(path, f"{where} {key} file {resolved} not found")
    return resolved


def _entry(path: Path, base: Path, raw: Any, where: str, need_label: bool) -> dict:
    if isinstance(raw, str) and not need_label:  # the Decathlon's own test list: bare image paths
        raw = {"image": raw}
    if not isinstance(raw, dict):
        raise DataError(path, f"{where} is a {type(raw).__name__}, not an object with 'image' and 'label'")
    if "image" not in raw:
        raise DataError(path, f"{where} has no 'image'")
    if need_label and "label" not in raw:
        raise DataError(path, f"{where} has no 'label'")
    entry = dict(raw)
    entry["image"] = _path(path, base, "image", where, raw["image"])
    if "label" in raw:
        entry["label"] = _path(path, base, "label", where, raw["label"])
    fold = raw.get("fold")
    if fold is not None and (type(fold) is not int or fold < 0):
        raise DataError(path, f"{where} has fold {fold!r:.30}; folds are integers 0, 1, ...")
    return entry


def read_datalist(path: str | Path, base_dir: str | Path | None = None) -> dict:
    """The datalist with every image/label an existing absolute-or-resolved Path: {"training": [...],
    "test": [...], "labels": {...} or None}. Raises a one-line DataError for any defect."""
    path = Path(path)
    raw = read_regular_bytes(path, MAX_DATALIST_BYTES, what="datalist")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(path, f"not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise DataError(path, f"the top level is a JSON {type(doc).__name__}, not an object; {SHAPE}")
    if "training" not in doc:
        raise DataError(path, f"has no 'training' list; {SHAPE}")
    for key in ("training", "test"):
        if not isinstance(doc.get(key, []), list):
            raise DataError(path, f"'{key}' is a {type(doc[key]).__name__}, not a list; {SHAPE}")
    base = Path(base_dir) if base_dir is not None else path.parent
    out: dict = {"labels": doc.get("labels") if isinstance(doc.get("labels"), dict) else None}
    for key in ("training", "test"):
        out[key] = [
            _entry(path, base, e, f"{key} entry {i}", need_label=key == "training")
            for i, e in enumerate(doc.get(key) or [])
        ]
    return out


def _class_names(path: Path, labels: dict | None) -> list[str]:
    if not labels:
        return ["background", "foreground"]
    try:
        ids = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise DataError(
            path, f"'labels' keys must be class ids (0, 1, ...), got {sorted(labels)[:3]}"
        ) from None
    return [ids.get(c, "background" if c == 0 else f"class_{c}") for c in range(max(ids) + 1)]


def _ids(doc: dict, base: Path) -> list[str]:
    """Each labelled entry's id: its "id" when it has one (export-monai writes them), else its image path
    relative to the datalist's folder without the extension."""
    out = []
    for e in (*doc["training"], *(e for e in doc["test"] if "label" in e)):
        mid = e.get("id")
        if not isinstance(mid, str) or not mid:
            rel = Path(os.path.relpath(e["image"], base))
            mid = rel.with_suffix("").as_posix()
        out.append(mid)
    return out


def open_monai_datalist(path: str | Path, base_dir: str | Path | None = None) -> SegmentationDataset:
    """The datalist's training entries and labelled test entries as a segmentation data set of image and
    mask files (root: the datalist file)."""
    path = Path(path)
    doc = read_datalist(path, base_dir)
    ids = _ids(doc, path.parent)
    dup = next((i for k, i in enumerate(ids) if i in ids[:k]), None)
    if dup is not None:
        raise DataError(path, f"two entries have the id '{dup}'")
    labelled = [*doc["training"], *(e for e in doc["test"] if "label" in e)]
    items = [SegItem(mid, e["image"], e["label"]) for mid, e in zip(ids, labelled, strict=True)]
    return SegmentationDataset(
        root=path, format="masks", items=items, class_names=_class_names(path, doc["labels"])
    )


def datalist_split(path: str | Path, base_dir: str | Path | None = None) -> dict | None:
    """The medstudent split the datalist describes (a fold's validation images: the entries with that
    "fold"; the test set: the labelled test entries), or None when its training entries have no folds."""
    path = Path(path)
    doc = read_datalist(path, base_dir)
    ids = _ids(doc, path.parent)
    n_train = len(doc["training"])
    folds = [e.get("fold") for e in doc["training"]]
    if not folds or all(f is None for f in folds):
        return None
    if None in folds:
        raise DataError(path, f"training entry {folds.index(None)} has no 'fold' but others do")
    k = max(folds) + 1  # type: ignore[type-var]
    val = [sorted(i for i, f in zip(ids, folds, strict=False) if f == j) for j in range(k)]
    if empty := [j for j in range(k) if not val[j]]:
        raise DataError(path, f"fold {empty[0]} has no training entry (folds run 0..{k - 1})")
    train_ids = set(ids[:n_train])
    return {
        "format": "medstudent-split/1",
        "task": "segmentation",
        "root": str(path.resolve()),
        "seed": None,
        "test_fraction": None,
        "n_folds": k,
        "stratify": "monai:fold",
        "grouped_by": None,
        "test": sorted(ids[n_train:]),
        "folds": [{"train": sorted(train_ids - set(v)), "val": v} for v in val],
        "strata": None,
        "groups": None,
    }
