"""The data side of a training run: the fold's index lists (`prepare_data`), torch loaders, class weights."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from medstudent.config import RunConfig
from medstudent.data.layouts import ClassificationDataset, SegmentationDataset, open_labeled
from medstudent.data.splits import fold_ids, load_split, make_split
from medstudent.data.transforms import (
    cls_eval_transform,
    cls_train_transform,
    seg_eval_transform,
    seg_train_transform,
)
from medstudent.errors import ConfigError
from medstudent.training.data import ClsTorchDataset, SegTorchDataset


@dataclass
class Prepared:
    """The data side of a run: source data set, split and the index lists of one fold."""

    dataset: SegmentationDataset | ClassificationDataset
    split: dict
    train_idx: list[int]
    val_idx: list[int]
    test_idx: list[int]


def prepare_data(cfg: RunConfig, split_path: str | Path | None = None, fold: int | None = None) -> Prepared:
    d = cfg.data
    ds = open_labeled(d)
    split_path = split_path or d.split
    if split_path:
        split = load_split(split_path, ds)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            split = make_split(ds, d.test_fraction, d.n_folds, d.split_seed)
    k = d.fold if fold is None else fold
    train_ids, val_ids, test_ids = fold_ids(split, k)
    index = {i: n for n, i in enumerate(ds.ids())}
    return Prepared(
        ds, split, [index[i] for i in train_ids], [index[i] for i in val_ids], [index[i] for i in test_ids]
    )


def make_loaders(cfg: RunConfig, prep: Prepared, extra_train: torch.utils.data.Dataset | None = None):
    """Train and validation loaders of one fold (plus optional extra training data, e.g. pseudo labels)."""
    d, t = cfg.data, cfg.train
    ds = prep.dataset
    if d.task == "segmentation":
        train_ds = SegTorchDataset(
            ds, prep.train_idx, seg_train_transform(cfg.augment), cache=d.cache, skip_bad=d.skip_bad
        )
        val_ds = SegTorchDataset(
            ds, prep.val_idx, seg_eval_transform(cfg.augment), cache=d.cache, skip_bad=d.skip_bad
        )
        val_bs = 1  # images may differ in size; scoring is per image anyway
    else:
        in_ch = cfg.model.in_channels
        train_ds = ClsTorchDataset(
            ds,
            prep.train_idx,
            cls_train_transform(cfg.augment, in_ch),
            num_classes=ds.num_classes,
            cache=d.cache,
        )
        val_ds = ClsTorchDataset(
            ds,
            prep.val_idx,
            cls_eval_transform(cfg.augment, in_ch),
            num_classes=ds.num_classes,
            cache=d.cache,
        )
        val_bs = t.batch_size
    if extra_train is not None:
        # Extra samples (pseudo labels) get the very same training transform object, so the student's noise
        # and the epoch-decaying policy (EpochAwareTransforms) reach every sample.
        transform = train_ds.transform
        for part in _leaves(extra_train):
            part.transform = transform
        train_ds = torch.utils.data.ConcatDataset([train_ds, extra_train])
        train_ds.transform = transform  # type: ignore[attr-defined]
    sampler = None
    if t.balanced_sampling and d.task == "classification":
        labels = np.array([ds.items[i].label for i in prep.train_idx])
        freq = np.bincount(labels, minlength=ds.num_classes).astype(float)
        weights = 1.0 / freq[labels]
        sampler = WeightedRandomSampler(
            torch.as_tensor(weights),
            num_samples=len(labels),
            replacement=True,
            generator=torch.Generator().manual_seed(t.seed),
        )
    g = torch.Generator().manual_seed(t.seed)
    # Workers are re-created each epoch (not persistent) so the decaying augmentation policy reaches them.
    kw = {"num_workers": d.num_workers}
    train_loader = DataLoader(
        train_ds,
        batch_size=t.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        # a final batch of one sample would break BatchNorm in training mode ("expected more than 1 value
        # per channel"), so it is dropped even without train.drop_last
        drop_last=len(train_ds) > t.batch_size and (t.drop_last or len(train_ds) % t.batch_size == 1),
        generator=g,
        **kw,
    )
    val_loader = DataLoader(val_ds, batch_size=val_bs, shuffle=False, **kw)
    return train_loader, val_loader


def _leaves(ds: torch.utils.data.Dataset) -> list:
    if isinstance(ds, torch.utils.data.ConcatDataset):
        return [leaf for d in ds.datasets for leaf in _leaves(d)]
    return [ds]


def class_weights_for(cfg: RunConfig, prep: Prepared) -> list[float] | None:
    cw = cfg.loss.class_weights
    if cfg.data.task != "classification" or cw is None:
        return None
    n = prep.dataset.num_classes
    if cw == "balanced":
        labels = np.array([prep.dataset.items[i].label for i in prep.train_idx])
        freq = np.bincount(labels, minlength=n).astype(float)
        return (len(labels) / (n * np.maximum(freq, 1))).tolist()
    if len(cw) != n:
        raise ConfigError(None, f"loss.class_weights has {len(cw)} values for {n} classes")
    return list(cw)
