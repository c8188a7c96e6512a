"""`medstudent train`: one entry for both tasks, writing the nnU-Net-style run tree that `rundir.RunDir`
describes (config, split, checkpoints, logs, metrics, curves, env.json).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from medstudent.atomic import atomic_path, remove_stale_temps, write_text_atomic
from medstudent.config import RunConfig, save_config
from medstudent.data.splits import save_split
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError
from medstudent.models import check_model_config
from medstudent.precision import accelerator_device_type, resolve_precision
from medstudent.provenance import data_fingerprint, dataset_files, write_env
from medstudent.rundir import RunDir
from medstudent.training.callbacks import EpochAwareTransforms, FitEpochsToTime, RankReport
from medstudent.training.checkpoint_io import AtomicCheckpointIO
from medstudent.training.curves import training_curves_png
from medstudent.training.loaders import EpochStart, Prepared, class_weights_for, make_loaders, prepare_data
from medstudent.training.module import TaskModule

__all__ = ["Prepared", "ensemble_members", "prepare_data", "run_dir_for", "train"]


def run_dir_for(cfg: RunConfig, fold: int | str) -> Path:
    """runs/<train.name>/fold_<k> under train.output_dir."""
    return RunDir.of(cfg.train.output_dir, cfg.train.name, fold).root


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
    rd = RunDir(run_dir)
    ckpt = ModelCheckpoint(
        dirpath=rd.checkpoints,
        filename=rd.best_ckpt.stem,
        monitor=monitor,
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # last.ckpt from its own callback: Lightning 2.6 refreshes `save_last` only in epochs where the best
    # improved, which would make --resume restart from a stale epoch.
    last = ModelCheckpoint(
        dirpath=rd.checkpoints,
        filename=rd.last_ckpt.stem,
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
        plugins=[AtomicCheckpointIO()],
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
    rd = RunDir(run_dir)
    last = rd.last_ckpt
    if resume and not last.is_file():
        raise DataError(last, "cannot resume: no last checkpoint in this run folder")
    main = is_main()  # other ranks (DDP) rerun this function; only rank 0 checks and writes the run folder
    if main:
        remove_stale_temps(rd.checkpoints)  # what a run killed while saving a checkpoint left behind
    if main and not resume and rd.checkpoints.exists() and any(rd.checkpoints.iterdir()):
        raise DataError(
            run_dir, "already holds checkpoints; pass --resume to continue or choose another name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.data.split = str(rd.split)
    if main:
        save_split(prep.split, rd.split)
        save_config(cfg, rd.config)
        fingerprint = data_fingerprint(dataset_files(prep.dataset))
        write_env(rd.env, cfg.train.seed, cfg.train.precision, fingerprint)
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
    _follow_trainer_epochs(train_loader, trainer)
    csv_log = rd.logs / "metrics.csv"
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


def _follow_trainer_epochs(loader: torch.utils.data.DataLoader, trainer: L.Trainer) -> None:
    """Let the training sampler start each epoch (seeds, augmentation policy) from the trainer's epoch
    counter, which a resumed run restores before it loads its first batch (see EpochStart)."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochStart):
        return
    sampler.epoch_fn = lambda: trainer.fit_loop.epoch_progress.current.processed
    transform = getattr(loader.dataset, "transform", None)
    if hasattr(transform, "set_epoch"):
        sampler.on_epoch.insert(0, lambda epoch: transform.set_epoch(epoch, trainer.max_epochs or 1))


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
    before = pd.read_csv(io.StringIO(earlier))
    after = pd.read_csv(csv_log) if csv_log.is_file() else before.iloc[:0]
    if "epoch" in after and after["epoch"].notna().any():
        before = before[before["epoch"] < after["epoch"].min()]
    with atomic_path(csv_log) as tmp:
        pd.concat([before, after], ignore_index=True).to_csv(tmp, index=False)


def finish_run(run_dir: Path, trainer: L.Trainer, prep: Prepared, minutes: float) -> dict:
    """metrics.json and the training-curve plot."""
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_score if ckpt_cb is not None else None
    rd = RunDir(run_dir)
    previous = {}
    if rd.metrics.is_file():
        previous = json.loads(rd.metrics.read_text())
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
    write_text_atomic(rd.metrics, json.dumps(metrics, indent=1))  # cv and ensembles read it as 'done'
    csv = rd.logs / "metrics.csv"
    if csv.is_file():
        training_curves_png(csv, rd.curves)
    if not rd.best_ckpt.is_file() and rd.last_ckpt.is_file():
        with atomic_path(rd.best_ckpt) as tmp:  # no validation ran: last is best
            shutil.copyfile(rd.last_ckpt, tmp)
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
