"""Trained runs loaded for inference: a run folder, a checkpoint or a run root (all folds) -> `Predictor`s.

Checkpoints are data (read with weights_only=True); the model is rebuilt from the checkpoint's own config,
without any pretrained download, and the run's tuned post-processing (postprocess.json) is picked up.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medstudent.config import PostprocessConfig, RunConfig
from medstudent.data.transforms import eval_contract
from medstudent.errors import DataError
from medstudent.models import model_from_config, seg_out_channels
from medstudent.rundir import RunDir


@dataclass
class Predictor:
    """A trained model ready for inference, with what is needed to pre- and post-process for it."""

    model: nn.Module
    cfg: RunConfig
    class_names: list[str]
    source: Path
    postprocess: PostprocessConfig

    @property
    def task(self) -> str:
        return self.cfg.data.task

    @property
    def contract(self) -> dict:
        return eval_contract(self.cfg.augment, task=self.task, in_channels=self.cfg.model.in_channels)

    @property
    def binary(self) -> bool:
        return self.task == "segmentation" and seg_out_channels(len(self.class_names)) == 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' = a CUDA GPU when there is one (under several local ranks: LOCAL_RANK's), else the CPU;
    or an explicit 'cpu', 'cuda', 'cuda:1'. A GPU that is not there is a one-line error."""

    name = (device or "auto").strip().lower()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DataError(None, f"unknown device '{device}' (auto, cpu, cuda, cuda:N)") from e
    if dev.type not in ("cpu", "cuda"):
        raise DataError(None, f"unsupported device '{device}' (auto, cpu, cuda, cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(None, f"device '{device}': CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DataError(None, f"device '{device}': only {torch.cuda.device_count()} GPU(s) here")
    return dev


def checkpoint_of(path: Path) -> Path:
    """The checkpoint of a run folder (best, else last) or the file itself."""
    if path.is_file():
        return path
    run = RunDir(path)
    for cand in (run.best_ckpt, run.last_ckpt):
        if cand.is_file():
            return cand
    raise DataError(
        path, "no checkpoint found (expected a .ckpt file or a run folder with checkpoints/best.ckpt)"
    )


def expand_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders, checkpoint files, or a run root holding fold_* folders (all folds: an ensemble)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(p, "no such run folder or checkpoint")
        folds = sorted(p.glob("fold_*")) if p.is_dir() and not RunDir(p).checkpoints.is_dir() else []
        out += [f for f in folds if RunDir(f).checkpoints.is_dir()] or [p]
    return out


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild the model from the checkpoint's own config (no pretrained download) and load its weights.

    The checkpoint is read with weights_only=True: checkpoints are data, never code. device: where the
    model runs ("auto" picks a GPU when there is one, see `resolve_device`); inputs follow the model.
    """
    path = Path(path)
    ckpt_path = checkpoint_of(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/format failure is a bad input file
        raise DataError(ckpt_path, f"cannot read checkpoint ({type(e).__name__}: {e})") from e
    hp = ckpt.get("hyper_parameters") or {}
    if "config" not in hp or "state_dict" not in ckpt:
        raise DataError(ckpt_path, "not a medstudent checkpoint (no config or state_dict)")
    cfg = RunConfig.model_validate(hp["config"])
    cfg.model.pretrained = None  # weights come from the checkpoint
    model = model_from_config(cfg.model, int(hp["num_classes"]))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval().to(device if isinstance(device, torch.device) else resolve_device(device))
    if cfg.train.channels_last:  # oneDNN convolutions are faster in NHWC (BENCHMARKS.md)
        model = model.to(memory_format=torch.channels_last)
    run_dir = RunDir(ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent)
    post = cfg.postprocess
    tuned = run_dir.postprocess
    if tuned.is_file():
        post = PostprocessConfig.model_validate(json.loads(tuned.read_text()))
    return Predictor(model, cfg, list(hp["class_names"]), ckpt_path, post)
