"""Lightning callbacks of a training run: the epoch-aware augmentation policy, fitting the epochs (and the LR
schedule) to a time budget, and the per-rank report of multi-process runs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from medstudent.atomic import write_text_atomic
from medstudent.rundir import RunDir


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


def epochs_that_fit(
    elapsed_s: float,
    epochs_done: int,
    budget_s: float,
    epochs: int,
    val_every: int,
    recent_s_per_epoch: float | None = None,
) -> int:
    """Epochs that end inside `budget_s`: the ones done plus those the time left holds at the recent pace
    (`recent_s_per_epoch`, else the mean so far); never fewer than done, never more than configured,
    rounded down to a validated epoch so the last epoch also picks the best checkpoint."""
    per_epoch = recent_s_per_epoch or elapsed_s / max(1, epochs_done)
    fit = epochs_done + int(max(0.0, budget_s - elapsed_s) // max(per_epoch, 1e-9))
    if fit >= epochs:
        return epochs
    if val_every > 1 and fit >= val_every:
        fit -= fit % val_every
    return max(epochs_done, fit)


class FitEpochsToTime(Callback):
    """With `train.max_minutes`, Lightning stops at the time limit wherever the schedule is; on a slower
    machine that cuts the cosine (and the augmentation decay) off early. At every validated epoch this
    measures the pace of the last validation interval and sets max_epochs (the LR schedule's horizon) to
    what the time left holds, so both end in time even when the machine slows down half-way (a shared
    CPU); the horizon only moves between the epochs done and the configured number. Lightning has no such
    option (its Timer only stops); the plan and the time spent are saved in checkpoints for --resume.

    Re-planning rather than driving the schedule by elapsed time: the schedule stays a function of the
    epoch (deterministic, resumable to identical weights), and the horizon changes only at validated
    epochs, where a checkpoint is written."""

    def __init__(self, max_minutes: float, val_every: int, margin: float = 0.97):
        self.budget_s = max_minutes * 60 * margin  # margin: checkpoint writes and the last validation
        self.val_every = max(1, val_every)
        self.planned: int | None = None
        self.spent_s = 0.0  # training time of earlier sessions (a resumed run) plus this one, per plan
        self.start = 0.0
        self.before_s = 0.0
        self.last_plan_s: float | None = None
        self.configured = 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not at train start: a resumed run loads its first batch (augmentation policy decaying to
        # max_epochs) before on_train_start, but after callbacks got their state back
        self.configured = int(trainer.fit_loop.max_epochs or 1)  # the config's, before any plan
        if self.planned is not None:  # resumed: keep the plan made before
            trainer.fit_loop.max_epochs = self.planned

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = _clock()
        self.before_s = self.spent_s

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done % self.val_every:
            return
        elapsed = self.before_s + _clock() - self.start
        recent = None if self.last_plan_s is None else (elapsed - self.last_plan_s) / self.val_every
        self.last_plan_s, self.spent_s = elapsed, elapsed
        configured = self.configured
        fit = epochs_that_fit(elapsed, done, self.budget_s, configured, self.val_every, recent)
        fit = int(trainer.strategy.broadcast(fit, src=0))  # every rank must stop at the same epoch
        before, self.planned = trainer.fit_loop.max_epochs, fit
        if fit == before:
            return
        trainer.fit_loop.max_epochs = fit  # the LR schedule reads trainer.max_epochs at every step
        if trainer.is_global_zero:
            logging.getLogger("medstudent").warning(
                "train: %d of %d epochs fit in train.max_minutes at this pace (%.1f min per epoch); "
                "the run and its LR schedule now end at epoch %d",
                fit,
                configured,
                (recent or elapsed / done) / 60,
                fit,
            )

    def state_dict(self) -> dict:
        return {"planned": self.planned, "spent_s": self.spent_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned = state_dict.get("planned")
        self.spent_s = float(state_dict.get("spent_s", 0.0))


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
        out = RunDir(self.run_dir).logs / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.batches,
            "samples": len(self.seen),
            "indices": sorted(set(self.seen)),
            "weights_sha256": state_digest(pl_module.model.state_dict()),
        }
        write_text_atomic(out / f"rank_{trainer.global_rank}.json", json.dumps(report))
