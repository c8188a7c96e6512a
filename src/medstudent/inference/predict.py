"""Predict with trained runs from Python: the torch engine over `core.inferer`, one call per image.

Used by `evaluate`, validation predictions, cross-validation scoring, self-training pseudo labels, the
benchmarks and the engine-parity tests. The run-loading names of `inference.runs` are re-exported here
because this is the torch engine's public entry point.
"""

from __future__ import annotations

import numpy as np

from medstudent.core.inferer import predict_probs as core_predict_probs
from medstudent.inference.engine import TorchEngine
from medstudent.inference.runs import Predictor, checkpoint_of, expand_runs, load_predictor, resolve_device

__all__ = [
    "Predictor",
    "checkpoint_of",
    "expand_runs",
    "load_predictor",
    "predict_cls_probs",
    "predict_probs",
    "predict_seg_probs",
    "resolve_device",
]


def predict_probs(
    predictors: list[Predictor],
    image: np.ndarray,
    tta: str = "none",
    ensemble: str = "mean",
    precision: str = "32",
    tile: int | None = None,
    scales: list[float] | tuple[float, ...] | None = None,
) -> np.ndarray:
    """Ensemble prediction of one image with every predictor (all of one task, equal weights): (H, W)
    binary maps, (C, H, W) multi-class, (C,) classification. scales (default: the first run's
    `predict.tta_scales`): multi-scale TTA, the `tta` passes at each multiple of the model resolution,
    averaged at the original size. Images over `predict.max_full_pixels` at model resolution (or with
    `tile`) are predicted window by window with Gaussian blending."""
    engine = TorchEngine(predictors, precision)
    return core_predict_probs(
        engine, image, tta=tta, ensemble=ensemble, tile=tile, scales=list(scales) if scales else None
    )


def predict_seg_probs(
    pred: Predictor,
    image: np.ndarray,
    tta: str = "none",
    precision: str = "32",
    tile: int | None = None,
    scales: list[float] | tuple[float, ...] | None = None,
) -> np.ndarray:
    """One segmentation run's probabilities at the original image size ((H, W) binary, (C, H, W))."""
    return predict_probs([pred], image, tta, "mean", precision, tile, scales)


def predict_cls_probs(
    pred: Predictor, image: np.ndarray, tta: str = "none", precision: str = "32"
) -> np.ndarray:
    """One classification run's softmax probabilities (C,); any TTA but none adds the horizontal mirror."""
    return predict_probs([pred], image, tta, "mean", precision)
