"""Optimisers (AdamW, Adam, SGD, AdaBelief from pytorch_optimizer) and one per-step LR schedule:
linear warmup, then cosine to min_lr_ratio, or step decay (StepLR semantics, counted in epochs)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pytorch_optimizer import AdaBelief

from medstudent.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    return AdaBelief(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """LR multiplier at optimiser step `step` (pure function, so it is testable and resumable)."""
    steps_per_epoch = max(1, steps_per_epoch)
    total = max(1, steps_per_epoch * epochs)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.scheduler == "cosine":
        t = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if cfg.scheduler == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // max(1, cfg.step_size))
    return 1.0


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int | Callable[[], int]
):
    """`epochs` may be a callable, read at every step: a time budget can shorten the schedule mid-run."""
    total = epochs if callable(epochs) else (lambda: epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch, total()))
