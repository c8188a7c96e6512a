"""`medstudent train`: one entry for both tasks, writing the nnU-Net-style run tree

runs/<name>/fold_<k>/
  config.yaml           the resolved configuration (what was really run)
  split.json            the split used (copied, so the run folder is self-contained)
  checkpoints/          best.ckpt (by val_metric) and last.ckpt (for --resume)
  logs/                 CSV and TensorBoard logs
  metrics.json          best validation metric, epochs, minutes, sizes
  training_curves.png
  postprocess.json      tuned post-processing (medstudent tune-postprocess), used by predict
  predictions/val/      validation probability maps written by tune-postprocess
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, WeightedRandomSampler

from medstudent.config import RunConfig, save_config
from medstudent.data.layouts import ClassificationDataset, SegmentationDataset, open_labeled
from medstudent.data.splits import fold_ids, load_split, make_split, save_split
from medstudent.data.transforms import (
    cls_eval_transform,
    cls_train_transform,
    seg_eval_transform,
    seg_train_transform,
)
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError
from medstudent.models import check_model_config
from medstudent.precision import accelerator_device_type, resolve_precision
from medstudent.training.data import ClsTorchDataset, SegTorchDataset
from medstudent.training.module import TaskModule


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


def run_dir_for(cfg: RunConfig, fold: int) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.name / f"fold_{fold}"


class EpochAwareTransforms(Callback):
    """Tells epoch-dependent augmentation (the decaying AutoAugment-style policy) which epoch it is."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        ds = getattr(loader, "dataset", None)
        t = getattr(ds, "transform", None)
        if hasattr(t, "set_epoch"):
            t.set_epoch(trainer.current_epoch, trainer.max_epochs or 1)
            pl_module.log(
                "aug_policy_prob",
                float(getattr(t, "policy_prob", 0.0)),
                on_epoch=True,
                on_step=False,
                batch_size=1,
            )


_clock = time.monotonic  # module-level so a test can drive FitEpochsToTime with a fake clock


def epochs_that_fit(elapsed_s: float, epochs_done: int, budget_s: float, epochs: int, val_every: int) -> int:
    """Epochs that end inside `budget_s` at the pace so far (never fewer than done, never more than
    configured), rounded down to a validated epoch so the last epoch also picks the best checkpoint."""
    per_epoch = elapsed_s / max(1, epochs_done)
    fit = int(budget_s // max(per_epoch, 1e-9))
    if fit >= epochs:
        return epochs
    if val_every > 1 and fit >= val_every:
        fit -= fit % val_every
    return max(epochs_done, fit)


class FitEpochsToTime(Callback):
    """With `train.max_minutes`, Lightning stops at the time limit wherever the schedule is; on a slower
    machine that cuts the cosine (and the augmentation decay) off early. After the first validated epoch
    this measures the pace and lowers max_epochs and the LR schedule's horizon once, so both end in time.
    Lightning has no such option (its Timer only stops); the plan is saved in checkpoints for --resume."""

    def __init__(self, max_minutes: float, val_every: int, margin: float = 0.97):
        self.budget_s = max_minutes * 60 * margin  # margin: checkpoint writes and the last validation
        self.val_every = max(1, val_every)
        self.planned: int | None = None
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = _clock()
        if self.planned is not None:  # resumed: keep the plan made before
            trainer.fit_loop.max_epochs = self.planned

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.planned is not None or done != self.val_every:
            return
        epochs = int(trainer.max_epochs or 1)
        elapsed = _clock() - self.start
        fit = epochs_that_fit(elapsed, done, self.budget_s, epochs, self.val_every)
        self.planned = int(trainer.strategy.broadcast(fit, src=0))  # every rank must stop at the same epoch
        if self.planned >= epochs:
            return
        trainer.fit_loop.max_epochs = self.planned  # the LR schedule reads trainer.max_epochs at every step
        if trainer.is_global_zero:
            logging.getLogger("medstudent").warning(
                "train: %d of %d epochs fit in train.max_minutes at this pace (%.1f min per epoch); "
                "the run and its LR schedule now end at epoch %d",
                self.planned,
                epochs,
                elapsed / 60 / done,
                self.planned,
            )

    def state_dict(self) -> dict:
        return {"planned": self.planned}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned = state_dict.get("planned")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's tensors (sorted keys): equal digests mean identical weights."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankReport(Callback):
    """Multi-process runs: each rank writes logs/ranks/rank_<r>.json with the training images it saw and a
    digest of its final weights, so a user can check every rank worked and the replicas stayed in sync."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.seen: list[int] = []
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.seen += [int(i) for i in batch["index"]]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size <= 1:
            return
        out = self.run_dir / "logs" / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.batches,
            "samples": len(self.seen),
            "indices": sorted(set(self.seen)),
            "weights_sha256": state_digest(pl_module.model.state_dict()),
        }
        (out / f"rank_{trainer.global_rank}.json").write_text(json.dumps(report))


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


def _precision(cfg: RunConfig) -> str:
    """Lightning's precision flag; `auto` becomes bf16 only where the hardware runs it natively."""
    t = cfg.train
    chosen = resolve_precision(t.precision, accelerator_device_type(t.accelerator))
    return {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}[chosen]


def build_trainer(
    cfg: RunConfig, run_dir: Path, progress: bool = True, monitor: str = "val_metric"
) -> L.Trainer:
    t = cfg.train
    several = t.num_nodes > 1 or str(t.devices) not in ("1", "auto")
    if cfg.optim.freeze_epochs > 0 and several and "find_unused" not in t.strategy:
        # DDP registers the parameters that need gradients once, when it wraps the model
        raise ConfigError(
            None,
            "optim.freeze_epochs: unfreezing during a multi-process run needs "
            "train.strategy=ddp_find_unused_parameters_true",
        )
    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # last.ckpt from its own callback: Lightning 2.6 refreshes `save_last` only in epochs where the best
    # improved, which would make --resume restart from a stale epoch.
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    callbacks: list[Callback] = [
        ckpt,
        last,
        EpochAwareTransforms(),
        LearningRateMonitor(logging_interval="epoch"),
        RankReport(run_dir),
    ]
    if t.max_minutes and t.fit_epochs_to_time:
        callbacks.append(FitEpochsToTime(t.max_minutes, t.val_every))
    if t.ema > 0:
        # Lightning's callback validates with the averaged weights and writes them as the checkpoints'
        # state_dict (the training weights ride along for --resume), so predict needs no change.
        callbacks.append(EMAWeightAveraging(decay=t.ema))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    loggers = [
        CSVLogger(run_dir, name="logs", version=""),
        TensorBoardLogger(run_dir, name="logs", version="tb"),
    ]
    return L.Trainer(
        max_epochs=t.epochs,
        max_time={"minutes": t.max_minutes} if t.max_minutes else None,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=_precision(cfg),
        accumulate_grad_batches=t.accumulate,
        deterministic="warn" if t.deterministic else False,
        check_val_every_n_epoch=t.val_every,
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_train_batches=t.limit_train_batches,
        default_root_dir=run_dir,
    )


def train(
    cfg: RunConfig,
    fold: int | None = None,
    split_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    extra_train: torch.utils.data.Dataset | None = None,
    run_dir: Path | None = None,
    prepared: Prepared | None = None,
    init_from: Path | None = None,
) -> Path:
    """Train one fold; returns the run folder. `resume` continues from checkpoints/last.ckpt.

    `prepared` replaces the data preparation (self-training passes its labeled subset of the fold);
    `init_from` starts from all weights of another checkpoint of the same model (student from teacher)."""
    fold = cfg.data.fold if fold is None else fold
    cfg = cfg.model_copy(deep=True)
    cfg.data.fold = fold
    t = cfg.train
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no banner/tips
    torch.set_num_threads(t.threads or max(1, os.cpu_count() or 1))
    L.seed_everything(t.seed, workers=True, verbose=False)
    check_model_config(cfg.model, cfg.data.task)
    prep = prepared or prepare_data(cfg, split_path, fold)
    run_dir = Path(run_dir) if run_dir else run_dir_for(cfg, fold)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise DataError(last, "cannot resume: no last checkpoint in this run folder")
    main = is_main()  # other ranks (DDP) rerun this function; only rank 0 checks and writes the run folder
    if (
        main
        and not resume
        and (run_dir / "checkpoints").exists()
        and any((run_dir / "checkpoints").iterdir())
    ):
        raise DataError(
            run_dir, "already holds checkpoints; pass --resume to continue or choose another name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.data.split = str(run_dir / "split.json")
    if main:
        save_split(prep.split, run_dir / "split.json")
        save_config(cfg, run_dir / "config.yaml")
    train_loader, val_loader = make_loaders(cfg, prep, extra_train)
    steps = max(1, len(train_loader) // max(1, t.accumulate))
    module = TaskModule(
        cfg.model_dump(mode="json"),
        prep.dataset.num_classes,
        prep.dataset.class_names,
        class_weights_for(cfg, prep),
        steps_per_epoch=steps,
    )
    if init_from is not None and not resume:
        _init_weights(module, Path(init_from))
    trainer = build_trainer(cfg, run_dir, progress=progress)
    csv_log = run_dir / "logs" / "metrics.csv"
    earlier = csv_log.read_text() if resume and csv_log.is_file() else None  # CSVLogger truncates on reuse
    start = time.time()
    # fold "all" has no validation images: no validation loop, and the last weights are the run's best
    val = val_loader if prep.val_idx else None
    trainer.fit(module, train_loader, val, ckpt_path=str(last) if resume else None)
    if earlier is not None and trainer.global_rank == 0:
        _merge_logs(csv_log, earlier)
    minutes = (time.time() - start) / 60
    if trainer.global_rank == 0:
        finish_run(run_dir, trainer, prep, minutes)
    return run_dir


def _init_weights(module: TaskModule, ckpt_path: Path) -> None:
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a bad input file
        raise DataError(ckpt_path, f"cannot read checkpoint to start from ({type(e).__name__}: {e})") from e
    model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    try:
        module.model.load_state_dict(model_state)
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise DataError(ckpt_path, f"does not fit this model (other architecture/encoder?): {reason}") from e


def _merge_logs(csv_log: Path, earlier: str) -> None:
    """Put the epochs logged before a resume back in front of the resumed run's rows."""
    import io

    import pandas as pd

    before = pd.read_csv(io.StringIO(earlier))
    after = pd.read_csv(csv_log) if csv_log.is_file() else before.iloc[:0]
    if "epoch" in after and after["epoch"].notna().any():
        before = before[before["epoch"] < after["epoch"].min()]
    pd.concat([before, after], ignore_index=True).to_csv(csv_log, index=False)


def finish_run(run_dir: Path, trainer: L.Trainer, prep: Prepared, minutes: float) -> dict:
    """metrics.json and the training-curve plot."""
    from medstudent.evaluation.report import training_curves_png

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_score if ckpt_cb is not None else None
    previous = {}
    if (run_dir / "metrics.json").is_file():
        previous = json.loads((run_dir / "metrics.json").read_text())
    metrics = {
        "task": prep.dataset.task,
        "best_val_metric": float(best) if best is not None else None,
        "metric": "val_dice" if prep.dataset.task == "segmentation" else "val_acc",
        "epochs": int(trainer.current_epoch),
        "train_minutes": round(minutes + previous.get("train_minutes", 0.0), 3),  # summed over resumes
        "n_train": len(prep.train_idx),
        "n_val": len(prep.val_idx),
        "n_test": len(prep.test_idx),
        "class_names": prep.dataset.class_names,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    csv = run_dir / "logs" / "metrics.csv"
    if csv.is_file():
        training_curves_png(csv, run_dir / "training_curves.png")
    best_path = run_dir / "checkpoints" / "best.ckpt"
    if not best_path.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file():
        shutil.copy(run_dir / "checkpoints" / "last.ckpt", best_path)  # no validation ran: last is best
    return metrics


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ensemble_members(cfg: RunConfig) -> list[RunConfig]:
    """One config per `ensemble:` member (named <train.name>-<member>), or [cfg] when there is none."""
    if not cfg.ensemble:
        return [cfg]
    base = cfg.model_dump(mode="json")
    base.pop("ensemble")
    members = []
    for k, m in enumerate(cfg.ensemble):
        m = dict(m)
        name = str(m.pop("name", f"m{k}"))
        doc = _deep_merge(base, m)
        doc["train"]["name"] = f"{cfg.train.name}-{name}"
        members.append(RunConfig.model_validate(doc))
    return members
