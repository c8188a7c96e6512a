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
        (out / f"rank_{trainer.global_rank}.json").write_text(json.dumps(report))
