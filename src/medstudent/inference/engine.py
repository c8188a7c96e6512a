"""The torch engine: trained runs as networks for `core.inferer` (GPU or CPU, autocast, channels-last).

Only the network call is torch here: a float32 numpy batch goes to the model's device (NHWC when the run
trains channels-last), through the model under autocast, and comes back as float32 probabilities. Every
step around it (preprocessing, tiles, TTA, scales, ensemble) is the core's, shared with the ONNX engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medstudent.core.contract import EnsembleSpec, MemberSpec, PipelineSpec, PreprocessSpec, WindowSpec
from medstudent.errors import DataError
from medstudent.inference.runs import Predictor, expand_runs, load_predictor, resolve_device
from medstudent.models.locality import whole_input_layers
from medstudent.precision import resolve_precision


def member_spec(pred: Predictor, weight: float = 1.0) -> MemberSpec:
    """A run's part of the contract: its eval preprocessing and its sliding-window rule."""
    p = pred.cfg.predict
    return MemberSpec(
        preprocess=PreprocessSpec.model_validate(pred.contract),
        sliding_window=WindowSpec(
            tile=p.tile, max_full_pixels=int(p.max_full_pixels), overlap=float(p.overlap)
        ),
        weight=float(weight),
        source=str(pred.source),
        whole_input_layers=whole_input_layers(pred.model) if pred.task == "segmentation" else None,
    )


def pipeline_spec(
    predictors: Sequence[Predictor],
    tta: str | None = None,
    ensemble: str | None = None,
    weights: Sequence[float] | None = None,
    tta_scales: Sequence[float] | None = None,
) -> PipelineSpec:
    """The contract of runs used together (an ensemble): tta / ensemble / scales default to the first
    run's `predict` section; weights (default equal) are stored normalised."""
    first = predictors[0]
    if any(p.task != first.task for p in predictors):
        raise DataError(None, "cannot ensemble segmentation and classification runs together")
    if any(p.class_names != first.class_names for p in predictors):
        raise DataError(predictors[1].source, f"class names differ from {first.source}'s; cannot ensemble")
    w = np.ones(len(predictors)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(predictors),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DataError(None, f"need {len(predictors)} non-negative weight(s), got {list(weights or [])}")
    w = w / w.sum()
    seg = first.task == "segmentation"
    mpps = {p.cfg.data.mpp for p in predictors} - {None}
    if len(mpps) > 1:
        raise DataError(None, f"the runs were trained at different um/px ({sorted(mpps)}); cannot ensemble")
    return PipelineSpec(
        task=first.task,
        class_names=first.class_names,
        binary=bool(first.binary),
        tta=tta or first.cfg.predict.tta,
        tta_scales=[float(f) for f in (tta_scales or first.cfg.predict.tta_scales)],
        ensemble=EnsembleSpec(mode=ensemble or first.cfg.predict.ensemble, weights=[float(v) for v in w]),
        postprocess=first.postprocess if seg else None,
        mpp=mpps.pop() if mpps else None,
        budget_seconds=first.cfg.predict.budget_seconds,
        members=[member_spec(p, float(v)) for p, v in zip(predictors, w, strict=True)],
    )


def _autocast(precision: str, device: torch.device):
    """precision: "32", "bf16" or "auto" (bf16 where the device computes it natively)."""
    if resolve_precision(precision, device.type) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class TorchEngine:
    """Loaded runs (`inference.runs.load_predictor`) behind the core's `Engine` protocol."""

    def __init__(
        self, predictors: Sequence[Predictor], precision: str = "32", spec: PipelineSpec | None = None
    ):
        if precision not in ("32", "bf16", "auto"):
            raise DataError(None, f"--precision must be 32, bf16 or auto, got '{precision}'")
        self.predictors = list(predictors)
        self.spec = spec or pipeline_spec(self.predictors)
        self.precision = precision
        self.device = str(self.predictors[0].device)

    @torch.no_grad()
    def run(self, member: int, batch: np.ndarray) -> np.ndarray:
        pred = self.predictors[member]
        dev = pred.device
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(dev)
        if pred.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.precision, dev):
            logits = pred.model(x)
        logits = logits.float()
        probs = torch.sigmoid(logits) if pred.binary else torch.softmax(logits, 1)
        return probs.cpu().numpy()

    def run_passes(self, member: int, batches: list[np.ndarray]) -> list[np.ndarray]:
        return [self.run(member, b) for b in batches]


def load_engine(runs: Sequence[str | Path], device: str = "auto", precision: str = "32") -> TorchEngine:
    """Run folders, checkpoints or run roots (all folds: an ensemble) as one torch engine on `device`."""
    dev = resolve_device(device)
    return TorchEngine([load_predictor(p, device=dev) for p in expand_runs(list(runs))], precision)
