"""The data side of a training run: the fold's index lists (`prepare_data`), torch loaders, class weights."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

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
    if t.balanced_sampling and d.task == "classification":
        labels = np.array([ds.items[i].label for i in prep.train_idx])
        if extra_train is not None:  # pseudo-labelled samples are drawn too, balanced by their hard class
            extra = [int(p.target(i).argmax()) for p in _leaves(extra_train) for i in p.indices]
            labels = np.concatenate([labels, np.array(extra, dtype=labels.dtype)])
        freq = np.bincount(labels, minlength=ds.num_classes).astype(float)
        weights = 1.0 / freq[labels]
        sampler: EpochStart = EpochWeightedSampler(torch.as_tensor(weights), len(labels), seed=t.seed)
    else:
        sampler = EpochRandomSampler(train_ds, seed=t.seed)
    transform = train_ds.transform  # type: ignore[attr-defined]
    sampler.on_epoch.append(lambda epoch: seed_epoch(t.seed, epoch, transform))
    # Workers are re-created each epoch (not persistent) so the decaying augmentation policy reaches them.
    kw = {"num_workers": d.num_workers}
    train_loader = DataLoader(
        train_ds,
        batch_size=t.batch_size,
        sampler=sampler,
        # a final batch of one sample would break BatchNorm in training mode ("expected more than 1 value
        # per channel"), so it is dropped even without train.drop_last
        drop_last=len(train_ds) > t.batch_size and (t.drop_last or len(train_ds) % t.batch_size == 1),
        **kw,
    )
    val_loader = DataLoader(val_ds, batch_size=val_bs, shuffle=False, **kw)
    return train_loader, val_loader


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch of a run: a function of (seed, epoch) only, so a resumed run draws the
    same numbers in that epoch as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)[0] >> 1)


def seed_epoch(seed: int, epoch: int, transform: object | None = None) -> None:
    """Reseed everything random in a training epoch in this process: Python's, NumPy's and torch's global
    generators (dropout, stochastic depth) and the augmentation pipeline's own generators (albumentations
    keeps them apart from the global ones). DataLoader workers reseed their pipeline copies themselves
    (WorkerSeededCompose) from the worker seed."""
    s = epoch_seed(seed, epoch)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    compose = getattr(transform, "compose", transform)
    if hasattr(compose, "reseed"):
        compose.reseed(s)


class EpochStart:
    """A training sampler that starts every epoch from a state given by (seed, epoch) alone.

    Torch's samplers draw each epoch's order from a generator seeded once, so epoch k's order depends on
    the epochs drawn before it in the same process, and a run resumed at epoch k shuffles differently from
    an uninterrupted one (so do its augmentations and dropout). Here the order generator is reseeded per
    epoch and `on_epoch` hooks (global RNGs, augmentation: `seed_epoch`) run when the epoch's first index is
    drawn, i.e. before its first sample is loaded. That is the one point that comes before every batch:
    Lightning fetches the first batch of a session when it sets up the data, before `set_epoch` and before
    any epoch hook; hence `epoch_fn` (the trainer's epoch counter) is preferred to `set_epoch`'s value."""

    generator: torch.Generator

    def _init_epochs(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.epoch_fn: Callable[[], int] | None = None
        self.on_epoch: list[Callable[[int], None]] = []

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start (too late for a session's first batch, see above)."""
        self.epoch = int(epoch)

    def _begin_epoch(self) -> None:
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch) ^ 0x5EED)
        for hook in self.on_epoch:
            hook(epoch)


class EpochRandomSampler(EpochStart, RandomSampler):
    """Shuffling (a RandomSampler, so Lightning still swaps in a DistributedSampler for DDP) per epoch."""

    def __init__(self, data_source, seed: int):
        RandomSampler.__init__(self, data_source, generator=torch.Generator())
        self._init_epochs(seed)

    def __iter__(self) -> Iterator[int]:
        self._begin_epoch()
        yield from RandomSampler.__iter__(self)


class EpochWeightedSampler(EpochStart, WeightedRandomSampler):
    """Class-balanced sampling with replacement, reseeded per epoch like EpochRandomSampler."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int):
        WeightedRandomSampler.__init__(
            self, weights, num_samples, replacement=True, generator=torch.Generator()
        )
        self._init_epochs(seed)

    def __iter__(self) -> Iterator[int]:
        self._begin_epoch()
        yield from WeightedRandomSampler.__iter__(self)


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
