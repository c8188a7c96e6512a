"""Load trained runs and predict: one code path for segmentation and classification, used by `predict`,
`evaluate`, validation predictions, self-training pseudo labels and the export parity test.

Preprocessing goes through `data.preprocess.apply_eval_contract` (numpy), the same function the torch-free
ONNX runner uses, so both engines see identical inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medstudent.config import PostprocessConfig, RunConfig
from medstudent.data.preprocess import apply_eval_contract, restore_geometry, scaled_contract
from medstudent.data.transforms import eval_contract
from medstudent.errors import DataError
from medstudent.inference.tta import tta_mean
from medstudent.models import model_from_config, seg_out_channels
from medstudent.precision import resolve_precision


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
    import os

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


def _checkpoint_of(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / "checkpoints" / "best.ckpt", path / "checkpoints" / "last.ckpt"):
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
        folds = sorted(p.glob("fold_*")) if p.is_dir() and not (p / "checkpoints").is_dir() else []
        out += [f for f in folds if (f / "checkpoints").is_dir()] or [p]
    return out


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild the model from the checkpoint's own config (no pretrained download) and load its weights.

    The checkpoint is read with weights_only=True: checkpoints are data, never code. device: where the
    model runs ("auto" picks a GPU when there is one, see `resolve_device`); inputs follow the model.
    """
    path = Path(path)
    ckpt_path = _checkpoint_of(path)
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
    if cfg.train.channels_last:  # oneDNN convolutions are faster in NHWC (with bf16 ~1.4x over eager fp32)
        model = model.to(memory_format=torch.channels_last)
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    post = cfg.postprocess
    tuned = run_dir / "postprocess.json"
    if tuned.is_file():
        post = PostprocessConfig.model_validate(json.loads(tuned.read_text()))
    return Predictor(model, cfg, list(hp["class_names"]), ckpt_path, post)


def _memory_format(pred: Predictor, t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if pred.cfg.train.channels_last else t


def _autocast(precision: str, device: torch.device):
    """precision: "32", "bf16" or "auto" (bf16 where the device computes it natively)."""
    if resolve_precision(precision, device.type) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def predict_seg_probs(
    pred: Predictor,
    image: np.ndarray,
    tta: str = "none",
    precision: str = "32",
    tile: int | None = None,
    max_full_pixels: int | None = None,
    overlap: float | None = None,
    scales: list[float] | tuple[float, ...] | None = None,
) -> np.ndarray:
    """Class probabilities at the original image size: (H, W) foreground for binary, (C, H, W) otherwise.

    Images whose model-resolution size exceeds max_full_pixels go through MONAI's sliding window with
    Gaussian blending (tile x tile windows); others are predicted whole (padded to 32, cropped back).
    scales (default: the run's `predict.tta_scales`): multi-scale TTA, the `tta` passes at each multiple
    of the model resolution, averaged at the original size.
    """
    factors = list(pred.cfg.predict.tta_scales if scales is None else scales)
    if not factors:
        raise ValueError("scales: need at least one factor")
    total = None
    for f in factors:
        probs = _seg_probs_at(
            pred,
            image,
            scaled_contract(pred.contract, float(f)),
            tta,
            precision,
            tile,
            max_full_pixels,
            overlap,
        )
        total = probs if total is None else total + probs
    return total if len(factors) == 1 else total / len(factors)


def _seg_probs_at(
    pred: Predictor,
    image: np.ndarray,
    contract: dict,
    tta: str,
    precision: str,
    tile: int | None,
    max_full_pixels: int | None,
    overlap: float | None,
) -> np.ndarray:
    """`predict_seg_probs` at one resolution (the one `contract` names)."""
    from monai.inferers import sliding_window_inference

    p = pred.cfg.predict
    x_np, info = apply_eval_contract(image, contract)
    dev = pred.device
    x = torch.from_numpy(x_np)[None].to(dev)
    binary = pred.binary

    def net(t: torch.Tensor) -> torch.Tensor:
        with _autocast(precision, dev):
            logits = pred.model(_memory_format(pred, t))
        logits = logits.float()
        return torch.sigmoid(logits) if binary else torch.softmax(logits, 1)

    limit = max_full_pixels or p.max_full_pixels
    tile = tile or p.tile
    if tile or x.shape[-1] * x.shape[-2] > limit:
        size = int(tile or 512)
        size = max(32, size // 32 * 32)

        def runner(t: torch.Tensor) -> torch.Tensor:
            return sliding_window_inference(
                t,
                (size, size),
                2,
                net,
                overlap=overlap or p.overlap,
                mode="gaussian",
                padding_mode="constant",
            )
    else:
        runner = net
    probs = tta_mean(runner, x, tta)[0].cpu().numpy()  # (C, h, w) at model resolution
    probs = restore_geometry(probs, info)
    return probs[0] if binary else probs


@torch.no_grad()
def predict_cls_probs(
    pred: Predictor, image: np.ndarray, tta: str = "none", precision: str = "32"
) -> np.ndarray:
    """Softmax probabilities (C,); `flip` TTA averages the image and its horizontal mirror."""
    x_np, _ = apply_eval_contract(image, pred.contract)
    dev = pred.device
    x = torch.from_numpy(x_np)[None].to(dev)

    def net(t: torch.Tensor) -> torch.Tensor:
        with _autocast(precision, dev):
            return torch.softmax(pred.model(_memory_format(pred, t)).float(), 1)

    if tta == "none":
        return net(x)[0].cpu().numpy()
    return ((net(x) + net(torch.flip(x, dims=(-1,)))) / 2)[0].cpu().numpy()


def ensemble_probs(probs: list[np.ndarray], mode: str = "mean", threshold: float = 0.5) -> np.ndarray:
    """Combine member probabilities: `mean` averages; `vote` returns the fraction of members whose
    thresholded (binary) or argmax (multi-class, as one-hot) prediction is positive, so a final > 0.5
    threshold is a strict majority vote."""
    stack = np.stack(probs)
    if mode == "mean":
        return stack.mean(0)
    if mode != "vote":
        raise ValueError(f"unknown ensemble mode '{mode}' (mean, vote)")
    if stack.ndim == 3:  # binary foreground maps (M, H, W)
        return (stack > threshold).mean(0).astype(np.float32)
    c = stack.shape[1]
    onehot = np.eye(c, dtype=np.float32)[stack.argmax(1)]  # (M, ..., C)
    return np.moveaxis(onehot, -1, 1).mean(0)


def predict_probs(
    predictors: list[Predictor],
    image: np.ndarray,
    tta: str = "none",
    ensemble: str = "mean",
    precision: str = "32",
    **kw,
) -> np.ndarray:
    """Ensemble prediction of one image with every predictor (all of one task)."""
    task = predictors[0].task
    if any(p.task != task for p in predictors):
        raise DataError(None, "cannot ensemble segmentation and classification runs together")
    if task == "segmentation":
        members = [predict_seg_probs(p, image, tta, precision, **kw) for p in predictors]
        return ensemble_probs(members, ensemble, predictors[0].postprocess.threshold)
    members = [predict_cls_probs(p, image, tta, precision) for p in predictors]
    return ensemble_probs(members, ensemble)
