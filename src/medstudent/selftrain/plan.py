"""The self-training plan of a fold: which training images keep their labels, which form the pool.

Saved to plan.json the first time and read back afterwards, so a resumed run uses the very same images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medstudent.atomic import write_text_atomic
from medstudent.config import RunConfig, SelfTrainConfig
from medstudent.data.layouts import (
    ClassificationDataset,
    SegmentationDataset,
    UnlabeledDataset,
    open_unlabeled,
)
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError


@dataclass
class PoolItem:
    """One image of the unlabeled pool: from the labeled set with its label hidden, or truly unlabeled."""

    id: str
    source: str  # "hidden" | "unlabeled"
    index: int  # index into the labeled data set or the unlabeled data set


@dataclass
class Plan:
    prep: Any  # training.loaders.Prepared restricted to the labeled subset (a type that imports torch)
    pool: list[PoolItem]
    unlabeled: UnlabeledDataset | None

    @property
    def dataset(self) -> SegmentationDataset | ClassificationDataset:
        return self.prep.dataset


def _labeled_subset(ds, train_idx: list[int], st: SelfTrainConfig, seed: int) -> list[int]:
    """Which training images keep their labels: `labeled_count` or `labeled_fraction` of them, stratified
    by class for classification (at least one image per class present), random for segmentation."""
    n = len(train_idx)
    want = st.labeled_count if st.labeled_count is not None else int(round(st.labeled_fraction * n))
    want = min(n, max(1, want))
    if want >= n:
        return list(train_idx)
    rng = np.random.default_rng(seed)
    if isinstance(ds, ClassificationDataset):
        labels = np.array([ds.items[i].label for i in train_idx])
        keep: list[int] = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = max(1, int(round(want * len(members) / n)))
            keep += rng.choice(members, min(k, len(members)), replace=False).tolist()
        return sorted(train_idx[j] for j in keep)
    return sorted(np.asarray(train_idx)[rng.choice(n, want, replace=False)].tolist())


def _open_pool_unlabeled(cfg: RunConfig, ds) -> UnlabeledDataset | None:
    st = cfg.selftrain
    assert st is not None
    if st.unlabeled in ("none", ""):
        return None
    if st.unlabeled:
        return open_unlabeled(st.unlabeled)
    extra = getattr(ds, "unlabeled", None)  # a segmentation data set's Unlabeled_Images folder
    return UnlabeledDataset(root=ds.root, images=list(extra)) if extra else None


def _wait_for(path: Path, seconds: float = 600) -> None:
    """Ranks > 0 wait for a file rank 0 writes (they may start before it does under torchrun)."""
    end = time.time() + seconds
    while not path.is_file():
        if time.time() > end:
            raise DataError(path, f"rank 0 did not write it within {seconds:.0f} s")
        time.sleep(1)


def make_plan(cfg: RunConfig, root: Path, split_path: str | Path | None = None) -> Plan:
    """Labeled subset, hidden-label pool and unlabeled pool of the configured fold; saved to plan.json the
    first time and read back afterwards, so a resumed run uses the very same images."""
    # deferred: imports torch
    from medstudent.training.loaders import Prepared, prepare_data

    st = cfg.selftrain
    assert st is not None
    full = prepare_data(cfg, split_path, cfg.data.fold)
    ds = full.dataset
    ids = ds.ids()
    unl = _open_pool_unlabeled(cfg, ds)
    plan_file = root / "plan.json"
    if not is_main():
        _wait_for(plan_file)
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        index = {i: n for n, i in enumerate(ids)}
        try:
            labeled = [index[i] for i in saved["labeled"]]
            hidden = [index[i] for i in saved["hidden"]]
        except KeyError as e:
            raise DataError(plan_file, f"names image {e} that is not in {ds.root}") from None
        unl_ids = saved["unlabeled"]
        if unl is not None:
            uindex = {i: n for n, i in enumerate(unl.ids())}
            missing = [i for i in unl_ids if i not in uindex]
            if missing:
                raise DataError(plan_file, f"names unlabeled image {missing[0]} that is no longer there")
            unl_idx = [uindex[i] for i in unl_ids]
        elif unl_ids:
            raise DataError(plan_file, "names unlabeled images but no unlabeled folder is configured")
        else:
            unl_idx = []
    else:
        labeled = _labeled_subset(ds, full.train_idx, st, cfg.train.seed)
        hidden = sorted(set(full.train_idx) - set(labeled))
        unl_idx = list(range(len(unl))) if unl is not None else []
        write_text_atomic(
            plan_file,
            json.dumps(
                {
                    "labeled": [ids[i] for i in labeled],
                    "hidden": [ids[i] for i in hidden],
                    "unlabeled": [unl.ids()[i] for i in unl_idx] if unl is not None else [],
                },
                indent=1,
            ),
        )
    pool = [PoolItem(ids[i], "hidden", i) for i in hidden]
    if unl is not None:
        pool += [PoolItem("unlabeled/" + unl.ids()[i], "unlabeled", i) for i in unl_idx]
    if not pool:
        raise ConfigError(
            None,
            "self-training needs unlabeled images: set selftrain.labeled_fraction < 1, "
            "selftrain.labeled_count, or selftrain.unlabeled to a folder of images",
        )
    split = json.loads(json.dumps(full.split))
    fold = split["folds"][cfg.data.fold]
    fold["train"] = [ids[i] for i in labeled]
    fold["hidden"] = [ids[i] for i in hidden]  # labels withheld from training; scored as pseudo labels
    prep = Prepared(ds, split, labeled, full.val_idx, full.test_idx)
    return Plan(prep, pool, unl)


def load_pool_image(plan: Plan, item: PoolItem) -> np.ndarray:
    if item.source == "hidden":
        return plan.dataset.load_image(item.index)
    assert plan.unlabeled is not None
    return plan.unlabeled.load_image(item.index)
