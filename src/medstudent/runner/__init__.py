"""Torch-free deployment runner: exported ONNX graphs + pipeline.json -> the same outputs as `predict`.

Imports numpy, Pillow, OpenCV (via `data.preprocess`), scipy/scikit-image (post-processing) and
onnxruntime only; never torch, MONAI, timm or albumentations.
"""

from medstudent.runner.budget import BudgetPlan, choose_plan, pass_rounds, passes_cost, tta_passes
from medstudent.runner.onnx_runner import OnnxPipeline, combine, predict_onnx_folder, read_pipeline
from medstudent.runner.tiling import gaussian_importance, sliding_window

__all__ = [
    "BudgetPlan",
    "OnnxPipeline",
    "choose_plan",
    "combine",
    "gaussian_importance",
    "pass_rounds",
    "passes_cost",
    "predict_onnx_folder",
    "read_pipeline",
    "sliding_window",
    "tta_passes",
]
