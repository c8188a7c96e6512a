"""Split files: a fixed test set plus k folds over the rest, saved as JSON that every later command accepts.

Segmentation is stratified by bins of lesion-area fraction (empty images form their own bin, the rest are
quantile bins; 7 bins in all by default, as the 0.911 STAS system did). Classification is stratified by class
and grouped by patient (sklearn's StratifiedGroupKFold), so no patient straddles train/val/test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

from medstudent.atomic import write_text_atomic
from medstudent.data.io import read_regular_bytes
from medstudent.data.layouts import ClassificationDataset, SegmentationDataset
from medstudent.data.monai_datalist import datalist_split
from medstudent.data.nnunet import nnunet_split
from medstudent.errors import DataError

SPLIT_FORMAT = "medstudent-split/1"
MAX_SPLIT_BYTES = 64 << 20  # a million ids is ~30 MB


class _Fold(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    train: list[StrictStr]
    val: list[StrictStr]


class _SplitDoc(BaseModel):
    """The parts of a split file that fold_ids and the trainers read; the rest is provenance."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: StrictStr | None = None
    test: list[StrictStr]
    folds: list[_Fold]


def area_fractions(ds: SegmentationDataset) -> np.ndarray:
    fr = np.zeros(len(ds))
    for i in range(len(ds)):
        _, mask = ds.load(i)
        fr[i] = (mask > 0).mean()
    return fr


def area_bins(fractions: np.ndarray, n_bins: int = 7) -> np.ndarray:
    """Bin 0 = empty masks, bins 1.. = quantiles of the non-empty area fractions (log-spread objects)."""
    fractions = np.asarray(fractions, float)
    bins = np.zeros(len(fractions), int)
    nz = fractions > 0
    k = n_bins - 1 if (~nz).any() else n_bins
    if nz.sum() and k > 0:
        edges = np.quantile(fractions[nz], np.linspace(0, 1, k + 1)[1:-1])
        bins[nz] = np.searchsorted(edges, fractions[nz], side="right") + (1 if (~nz).any() else 0)
    return bins


def _merge_rare(strata: np.ndarray, min_count: int, max_strata: int | None = None) -> np.ndarray:
    """Fold the smallest stratum into its nearest neighbour bin until every stratum has min_count members
    (and there are at most max_strata), so stratified splitters work on small data sets."""
    strata = strata.copy()
    while True:
        values, counts = np.unique(strata, return_counts=True)
        if len(values) <= 1 or (
            counts.min() >= min_count and (max_strata is None or len(values) <= max_strata)
        ):
            return strata
        v = values[counts.argmin()]
        others = values[values != v]
        strata[strata == v] = others[np.abs(others - v).argmin()]


def _n_test(n: int, test_fraction: float) -> int:
    if test_fraction <= 0:
        return 0
    return int(test_fraction) if test_fraction >= 1 else max(1, round(n * test_fraction))


def make_split(
    ds: SegmentationDataset | ClassificationDataset,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
    n_bins: int = 7,
    fractions: np.ndarray | None = None,
) -> dict:
    """Build a split. test_fraction < 1 is a fraction of the images, >= 1 an image count."""
    ids = np.array(ds.ids())
    n = len(ids)
    if n_folds < 2:
        raise DataError(ds.root, f"n_folds must be at least 2, got {n_folds}")
    if isinstance(ds, ClassificationDataset):
        strata = ds.labels()
        groups = np.array([it.group if it.group is not None else f"__{it.id}" for it in ds.items])
        stratify = "class"
    else:
        fr = area_fractions(ds) if fractions is None else np.asarray(fractions)
        strata = area_bins(fr, n_bins)
        groups = None
        stratify = f"area_fraction_bins:{n_bins}"
    n_test = _n_test(n, test_fraction)
    if n - n_test < n_folds:
        raise DataError(ds.root, f"{n} images cannot make a test set of {n_test} and {n_folds} folds")
    idx = np.arange(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn's "least populated class" note on tiny sets
        if n_test == 0:
            test_idx = np.array([], int)
        elif groups is not None:
            splitter = StratifiedGroupKFold(
                n_splits=max(2, round(n / n_test)), shuffle=True, random_state=seed
            )
            _, test_idx = next(splitter.split(idx, strata, groups))
        else:
            s = _merge_rare(strata, 2, max_strata=min(n_test, n - n_test))
            sss = StratifiedShuffleSplit(n_splits=1, test_size=n_test, random_state=seed)
            _, test_idx = next(sss.split(idx, s))
        rest = np.setdiff1d(idx, test_idx)
        if groups is not None:
            kf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            fold_iter = kf.split(rest, strata[rest], groups[rest])
        else:
            kf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            fold_iter = kf.split(rest, _merge_rare(strata[rest], n_folds))
        folds = [
            {"train": sorted(ids[rest[tr]].tolist()), "val": sorted(ids[rest[va]].tolist())}
            for tr, va in fold_iter
        ]
    return {
        "format": SPLIT_FORMAT,
        "task": ds.task,
        "root": str(Path(ds.root).resolve()),
        "seed": seed,
        "test_fraction": test_fraction,
        "n_folds": n_folds,
        "stratify": stratify,
        "grouped_by": "patient" if groups is not None else None,
        "test": sorted(ids[test_idx].tolist()),
        "folds": folds,
        "strata": {str(i): int(s) for i, s in zip(ids, strata, strict=True)},
        "groups": {str(i): str(g) for i, g in zip(ids, groups, strict=True)} if groups is not None else None,
    }


def split_from_folders(ds: ClassificationDataset) -> dict:
    """Use the data set's own train/val/test folders as fold 0 and the test set (e.g. OCT2017's)."""
    subsets = {s: sorted(it.id for it in ds.items if it.subset == s) for s in ("train", "val", "test")}
    if not subsets["train"] or not subsets["val"]:
        raise DataError(ds.root, "--from-folders needs train/ and val/ folders")
    return {
        "format": SPLIT_FORMAT,
        "task": ds.task,
        "root": str(Path(ds.root).resolve()),
        "seed": None,
        "test_fraction": None,
        "n_folds": 1,
        "stratify": "folders",
        "grouped_by": None,
        "test": subsets["test"],
        "folds": [{"train": subsets["train"], "val": subsets["val"]}],
        "strata": None,
        "groups": None,
    }


def save_split(split: dict, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(split, indent=1))


def load_split(path: str | Path, ds: SegmentationDataset | ClassificationDataset | None = None) -> dict:
    """Read a split file; with `ds`, check that every id it names exists in the data set. With an nnU-Net
    data set, its splits_final.json is accepted too (converted by data.nnunet.nnunet_split), and a MONAI
    datalist with "fold" keys (data.monai_datalist.datalist_split)."""
    path = Path(path)
    raw = read_regular_bytes(path, MAX_SPLIT_BYTES, what="split file")
    try:
        split = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(path, f"not valid JSON ({type(e).__name__}: {e})") from None
    if isinstance(split, dict) and "training" in split and "format" not in split:  # a MONAI datalist
        split = datalist_split(path)
        if split is None:
            raise DataError(path, "a MONAI datalist whose training entries have no 'fold': no split in it")
    if isinstance(split, list):  # nnU-Net's splits_final.json: its case ids only mean something in its folder
        if isinstance(ds, SegmentationDataset) and ds.format == "nnunet":
            return nnunet_split(path, ds)
        raise DataError(
            path,
            "not a medstudent split file (a list, as nnU-Net's splits_final.json; convert one with "
            "`medstudent data split NNUNET_DIR --from-nnunet FILE`)",
        )
    fmt = split.get("format") if isinstance(split, dict) else None
    if fmt != SPLIT_FORMAT:
        raise DataError(path, f"not a medstudent split file (format {fmt!r})")
    try:
        _SplitDoc.model_validate(split)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise DataError(path, f"malformed split file: {loc}: {err['msg']}") from None
    if not split["folds"]:
        raise DataError(path, "malformed split file: no folds")
    if ds is not None:
        known = set(ds.ids())
        named = set(split["test"]).union(*[set(f["train"]) | set(f["val"]) for f in split["folds"]])
        missing = sorted(named - known)
        if missing:
            raise DataError(path, f"names {len(missing)} image(s) not in {ds.root}, e.g. {missing[0]}")
    return split


def fold_ids(split: dict, fold: int | str) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) ids of one fold. Fold "all" trains on every non-test image and validates on none
    (nnU-Net's fold "all": the final model once cross-validation has chosen the recipe)."""
    if fold == "all":
        seen: dict[str, None] = {}
        for f in split["folds"]:
            seen.update(dict.fromkeys([*f["train"], *f["val"]]))
        return list(seen), [], list(split["test"])
    if not isinstance(fold, int) or not 0 <= fold < len(split["folds"]):
        raise DataError(None, f"fold {fold} does not exist; the split has {len(split['folds'])} fold(s)")
    f = split["folds"][fold]
    return list(f["train"]), list(f["val"]), list(split["test"])
