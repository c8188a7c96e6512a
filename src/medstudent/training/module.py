"""One LightningModule for both tasks: the model, its loss, optimiser, schedule and validation metric.

The validation metric is logged as `val_metric` (mean Dice over images for segmentation, with empty/empty = 1
as the STAS competition scored; accuracy for classification) so checkpointing and early stopping do not care
which task they serve.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from medstudent.config import RunConfig
from medstudent.data.preprocess import scaled_size
from medstudent.models import backbone_module, model_from_config, seg_out_channels
from medstudent.training.losses import ClassificationLoss, DeepSupervisionLoss, SegmentationLoss
from medstudent.training.optim import build_optimizer, build_scheduler


def dice_per_image(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Binary Dice per image for (B, H, W) 0/1 tensors; 1.0 where both are empty."""
    inter = (pred & gt).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + gt.flatten(1).sum(1).float()
    return torch.where(total == 0, torch.ones_like(total), 2 * inter / total.clamp_min(1))


class TaskModule(L.LightningModule):
    def __init__(
        self,
        config: dict,
        num_classes: int,
        class_names: list[str],
        class_weights: list[float] | None = None,
        steps_per_epoch: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = RunConfig.model_validate(config)
        self.task = self.cfg.data.task
        self.num_classes = num_classes
        self.class_names = class_names
        self.model = model_from_config(self.cfg.model, num_classes)
        if self.task == "segmentation":
            self.out_channels = seg_out_channels(num_classes)
            self.criterion = DeepSupervisionLoss(
                SegmentationLoss(self.cfg.loss, self.out_channels), self.cfg.loss.deep_supervision_weights
            )
        else:
            w = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
            self.criterion = ClassificationLoss(self.cfg.loss, w)
        self.steps_per_epoch = steps_per_epoch
        self.memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        # not registered as a sub-module (object.__setattr__): it is a view, its tensors are saved once
        object.__setattr__(self, "_backbone", backbone_module(self.model))
        if self.backbone_frozen:  # frozen from the start: DDP must see these as never trained
            for p in self._backbone.parameters():
                p.requires_grad_(False)
        self._val: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities: sigmoid of the single binary channel, softmax otherwise."""
        if self.task == "segmentation" and self.out_channels == 1:
            return torch.sigmoid(logits.float())
        return torch.softmax(logits.float(), dim=1)

    @property
    def progress(self) -> float:
        if self.trainer is None or not self.trainer.max_epochs:
            return 0.0
        return float(self.current_epoch) / float(self.trainer.max_epochs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch["image"])
        if self.task == "segmentation":
            loss = self.criterion(out, batch["mask"], progress=self.progress)
        else:
            loss = self.criterion(out, batch["target"])
        bs = batch["image"].shape[0]
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True
        )
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        bs = batch["image"].shape[0]
        if self.task == "segmentation":
            self.log(
                "val_loss",
                self.criterion(logits, batch["mask"]),
                on_epoch=True,
                batch_size=bs,
                sync_dist=True,
            )
            probs = self.probabilities(logits)
            pred = probs[:, 0] > 0.5 if self.out_channels == 1 else probs.argmax(1) > 0
            gt = (batch["mask"] > 0) & (batch["mask"] != 255)
            # Score only the valid (unpadded) region of each image.
            for b in range(bs):
                h, w = self.valid_hw(batch["orig_hw"][b])
                self._val.append(float(dice_per_image(pred[b : b + 1, :h, :w], gt[b : b + 1, :h, :w])[0]))
        else:
            self.log(
                "val_loss",
                F.cross_entropy(logits.float(), batch["label"]),
                on_epoch=True,
                batch_size=bs,
                sync_dist=True,
            )
            pred = logits.argmax(1)
            self._val += (pred == batch["label"]).float().tolist()

    def valid_hw(self, orig_hw: torch.Tensor) -> tuple[int, int]:
        a = self.cfg.augment
        if a.resize:
            return int(a.resize[0]), int(a.resize[1])
        return scaled_size(int(orig_hw[0]), int(orig_hw[1]), a.scale)

    def on_validation_epoch_end(self) -> None:
        value = float(np.mean(self._val)) if self._val else 0.0
        name = "val_dice" if self.task == "segmentation" else "val_acc"
        metric = torch.tensor(value, device=self.device)
        self.log(name, metric, prog_bar=True, sync_dist=True)
        self.log("val_metric", metric, sync_dist=True)

    # --- backbone LR and freezing (optim.backbone_lr_scale / optim.freeze_epochs)
    @property
    def backbone_frozen(self) -> bool:
        o = self.cfg.optim
        return o.backbone_lr_scale == 0 or self.current_epoch < o.freeze_epochs

    def train(self, mode: bool = True):  # type: ignore[override]
        """As nn.Module.train, but a frozen backbone stays in eval mode (BatchNorm statistics and stochastic
        depth off), however often Lightning switches between training and validation."""
        super().train(mode)
        if mode and getattr(self, "_backbone", None) is not None and self.backbone_frozen:
            self._backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        frozen = self.backbone_frozen
        for p in self._backbone.parameters():
            p.requires_grad_(not frozen)
        self.train()

    def configure_optimizers(self):
        o = self.cfg.optim
        # While frozen (freeze_epochs) the backbone has no gradients, so the optimiser skips it until then.
        if o.backbone_lr_scale == 1:
            groups: list[dict] = [{"params": list(self.model.parameters()), "lr": o.lr}]  # one group, as ever
        else:
            backbone = {id(p) for p in self._backbone.parameters()}
            groups = [{"params": [p for p in self.model.parameters() if id(p) not in backbone], "lr": o.lr}]
            if o.backbone_lr_scale > 0:
                groups.append({"params": list(self._backbone.parameters()), "lr": o.lr * o.backbone_lr_scale})
        opt = build_optimizer(groups, self.cfg.optim)
        sched = build_scheduler(opt, self.cfg.optim, self.steps_per_epoch, self._schedule_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _schedule_epochs(self) -> int:
        """The LR schedule's horizon, read at every step: the trainer's max_epochs, which FitEpochsToTime may
        lower during training (the configured epochs when no trainer is attached)."""
        return self._trainer.max_epochs if self._trainer is not None else self.cfg.train.epochs
