"""Export trained runs to ONNX plus `pipeline.json`, the whole inference contract for the torch-free runner.

One graph per model (`member_<k>.onnx`, input `input` NCHW float32 with dynamic batch, height and width,
output `probs`: the sigmoid / softmax is inside the graph, so the runner gets probabilities exactly as the
PyTorch predictor computes them). `pipeline.json` holds everything else `medstudent.runner` needs to
reproduce `inference.predict.predict_probs` + `inference.folder.predict_folder` without torch: each member's
preprocessing contract (`data.transforms.eval_contract`), the sliding-window rule (tile, overlap, when to
tile), the TTA set, ensemble mode and weights, the post-processing, class names and the versions it was
exported with.

The legacy TorchScript-based exporter (`dynamo=False`) is used: it gives dynamic H/W for smp/timm models
in one call, while the dynamo exporter needs onnxscript and symbolic shape constraints per architecture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medstudent.errors import DataError
from medstudent.inference.predict import Predictor, expand_runs, load_predictor
from medstudent.inference.tta import TTA_SETS

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "medstudent-onnx-pipeline"
PIPELINE_VERSION = 1
MIN_OPSET = 17
SIGMA_SCALE = 0.125  # MONAI's default Gaussian window sigma (fraction of the tile), as predict_seg_probs
SW_BATCH_SIZE = 2  # windows per forward pass, as predict_seg_probs


class _Probabilities(nn.Module):
    """The model followed by its output activation, so the graph returns probabilities."""

    def __init__(self, model: nn.Module, activation: str):
        super().__init__()
        self.model = model
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x).float()
        return torch.sigmoid(y) if self.activation == "sigmoid" else torch.softmax(y, 1)


def _activation(pred: Predictor) -> str:
    return "sigmoid" if pred.binary else "softmax"


def _versions(opset: int) -> dict[str, str | int]:
    import onnx
    import onnxruntime

    import medstudent

    out: dict[str, str | int] = {
        "medstudent": medstudent.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
    }
    for mod in ("timm", "segmentation_models_pytorch"):
        with contextlib.suppress(ImportError):  # both are dependencies
            out[mod] = __import__(mod).__version__
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _example_input(pred: Predictor) -> torch.Tensor:
    c = pred.contract
    if pred.task == "segmentation":
        return torch.zeros(1, 3, 64, 96)
    s = int(c.get("image_size") or c.get("center_crop") or 64)
    return torch.zeros(1, int(c["in_channels"]), s, s)


@contextlib.contextmanager
def _sums_as_adds(model: nn.Module):
    """Trace smp FPN's merge (`torch.stack(features).sum(0)`) as a chain of additions.

    The stack exports as Unsqueeze + Concat + ReduceSum, which copies four full-resolution feature maps
    into one tensor first (about 8% of ONNX Runtime's time for FPN-Lite0 at 864x480); the additions give
    the same sum without the copy. Only the export sees this; the module is restored afterwards.
    """
    from segmentation_models_pytorch.decoders.fpn.decoder import MergeBlock

    def add_chain(x: list[torch.Tensor]) -> torch.Tensor:
        out = x[0]
        for t in x[1:]:
            out = out + t
        return out

    blocks = [m for m in model.modules() if isinstance(m, MergeBlock) and m.policy == "add"]
    for m in blocks:
        m.forward = add_chain  # an instance attribute shadows the class method
    try:
        yield
    finally:
        for m in blocks:
            del m.forward


def export_model(pred: Predictor, path: str | Path, opset: int = MIN_OPSET) -> Path:
    """Write one predictor's model (with its output activation) as an ONNX graph with dynamic B/H/W."""
    if opset < MIN_OPSET:
        raise DataError(path, f"opset {opset} is too old; {MIN_OPSET} or newer is needed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _Probabilities(pred.model, _activation(pred)).eval()
    dyn = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings(), _sums_as_adds(net):
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks in smp/timm
        torch.onnx.export(
            net,
            (_example_input(pred),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["probs"],
            dynamic_axes={"input": dyn, "probs": dyn},
            do_constant_folding=True,
        )
    return path


def check_export(pred: Predictor, path: str | Path, shapes: list[tuple[int, int]] | None = None) -> float:
    """Largest |probability difference| between the graph (ONNX Runtime) and the torch model on random
    inputs of a few sizes (segmentation: also odd multiples of 32, to prove height/width are dynamic)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net = _Probabilities(pred.model, _activation(pred)).eval()
    c = pred.contract
    if shapes is None:
        if pred.task == "segmentation":
            shapes = [(64, 96), (160, 128)]
        else:
            s = int(c.get("image_size") or c.get("center_crop") or 64)
            shapes = [(s, s)]
    channels = int(c["in_channels"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for h, w in shapes:
        x = rng.standard_normal((1, channels, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        got = sess.run(None, {"input": x})[0]
        if got.shape != ref.shape:
            raise DataError(
                path, f"exported graph gives shape {got.shape} for input {x.shape}, torch {ref.shape}"
            )
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


INT8_MODES = ("none", "dynamic", "static")
INT8_METHODS = {
    "dynamic": "onnxruntime quantize_dynamic, uint8 weights",
    "static": (
        "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations (MinMax over the "
        "calibration images); segmentation: the decoder's convolutions only; the encoder, the head and "
        "the normalisation, resizing and additions between the convolutions stay float32"
    ),
}
CALIBRATION_IMAGES = 16


@contextlib.contextmanager
def _quiet_quantizer():
    logging.disable(logging.WARNING)  # it logs advice and per-tensor warnings on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime dynamic int8 quantisation (weights uint8, activations quantised on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    return Path(dst)


def quantize_int8_static(src: str | Path, dst: str | Path, inputs: list[np.ndarray], task: str) -> Path:
    """ONNX Runtime static int8 quantisation (QDQ) calibrated on `inputs` (preprocessed CHW arrays).

    Segmentation quantises only the decoder's convolutions: on the stas_cpu model (FPN + Lite0) quantising
    everything moved the masks far from float32 (agreement Dice 0.95, 8 test images) while the decoder,
    which holds about two thirds of the time at 864x480, kept 0.994. Quantising the GroupNorm, resize and
    add nodes between the decoder's convolutions as well was no faster (each needs a float32 round trip
    around the normalisation) and rounds more, so those stay float32 and each int8 convolution
    (QLinearConv after ONNX Runtime's QDQ fusion) reads and writes uint8 through one Quantize /
    Dequantize pair. The head stays float32 too: its output are the logits, and 8-bit logits moved
    probabilities near the threshold by up to 0.12 for a convolution that costs almost nothing.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not inputs:
        raise DataError(None, "int8 static: no calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"input": np.ascontiguousarray(x[None], dtype=np.float32)}

    dst = Path(dst)
    pre = dst.with_suffix(".pre.onnx")
    with _quiet_quantizer():
        # symbolic shape inference cannot follow the dynamic-size Resize chain of the decoders; ONNX's
        # own inference plus ORT's graph optimisations (BatchNorm folding) are what the quantiser needs
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        nodes = [n.name for n in onnx.load(str(pre)).graph.node]
        keep = [n for n in nodes if task == "segmentation" and not _in_decoder(n)]
        try:
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep,
                **({"op_types_to_quantize": ["Conv"]} if task == "segmentation" else {}),
            )
        finally:
            pre.unlink(missing_ok=True)
    return dst


def _in_decoder(node_name: str) -> bool:
    """Node names of the exported graph follow the torch module path (/model/decoder/..., /model/net/...)."""
    return "/decoder/" in node_name


def calibration_inputs(pred: Predictor, folder: str | Path, n: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """The first `n` images of `folder` (sorted), preprocessed by the run's eval contract."""
    from medstudent.data.io import list_images, read_image
    from medstudent.data.preprocess import apply_eval_contract

    files = list_images(Path(folder))[:n]
    if not files:
        raise DataError(folder, "int8 static: no images to calibrate on")
    return [apply_eval_contract(read_image(f), pred.contract)[0] for f in files]


def _member_entry(pred: Predictor, file: str, weight: float, check: float | None) -> dict[str, Any]:
    p = pred.cfg.predict
    return {
        "file": file,
        "weight": float(weight),
        "source": str(pred.source),
        "arch": pred.cfg.model.arch,
        "encoder": pred.cfg.model.encoder,
        "activation": _activation(pred),
        "preprocess": pred.contract,
        "sliding_window": {
            # predict_seg_probs: tile when a tile is set or the padded input has more than
            # max_full_pixels pixels; tile size rounded down to a multiple of 32 (default 512)
            "tile": p.tile,
            "default_tile": 512,
            "max_full_pixels": int(p.max_full_pixels),
            "overlap": float(p.overlap),
            "mode": "gaussian",
            "sigma_scale": SIGMA_SCALE,
            "padding": "constant 0 (normalised), centred, when the input is smaller than the tile",
            "sw_batch_size": SW_BATCH_SIZE,
        },
        "export_max_abs_diff": check,
    }


def export_runs(
    runs: list[str | Path],
    out: str | Path,
    *,
    tta: str | None = None,
    ensemble: str | None = None,
    weights: list[float] | None = None,
    opset: int = MIN_OPSET,
    tta_scales: list[float] | None = None,
    int8: bool | str = False,
    calibrate: str | Path | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export run folders / checkpoints / run roots (all folds = an ensemble) to `out`; returns the pipeline.

    tta / ensemble / tta_scales default to the first run's `predict.tta` / `predict.ensemble` /
    `predict.tta_scales`; weights (one per member,
    default equal) are stored normalised. int8 ("dynamic" or True, or "static" with a `calibrate` folder of
    images) also writes `member_<k>.int8.onnx` and records them with `"use": false`: switch them on only
    after checking accuracy (see BENCHMARKS.md).
    """
    mode = {True: "dynamic", False: "none"}.get(int8, int8) if isinstance(int8, bool) else str(int8)
    if mode not in INT8_MODES:
        raise DataError(None, f"export: unknown int8 mode '{int8}' ({', '.join(INT8_MODES)})")
    if mode == "static" and calibrate is None:
        raise DataError(None, "export: int8 static needs calibration images (--calibrate FOLDER)")
    say = progress or (lambda _msg: None)
    out = Path(out)
    paths = expand_runs(list(runs))
    if not paths:
        raise DataError(None, "export: no runs given")
    preds = [load_predictor(p) for p in paths]
    first = preds[0]
    if any(p.task != first.task for p in preds):
        raise DataError(None, "cannot export segmentation and classification runs as one ensemble")
    if any(p.class_names != first.class_names for p in preds):
        raise DataError(paths[1], f"class names differ from {paths[0]}'s; cannot ensemble")
    tta = tta or first.cfg.predict.tta
    if tta not in TTA_SETS:
        raise DataError(None, f"unknown TTA '{tta}' (none, flip, d4)")
    ensemble = ensemble or first.cfg.predict.ensemble
    if ensemble not in ("mean", "vote"):
        raise DataError(None, f"unknown ensemble mode '{ensemble}' (mean, vote)")
    w = np.ones(len(preds)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(preds),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DataError(None, f"export: need {len(preds)} non-negative weight(s), got {weights}")
    w = w / w.sum()
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for k, (pred, path) in enumerate(zip(preds, paths, strict=True)):
        t0 = time.perf_counter()
        file = f"member_{k}.onnx"
        export_model(pred, out / file, opset)
        diff = check_export(pred, out / file) if check else None
        entry = _member_entry(pred, file, float(w[k]), diff)
        entry["sha256"] = _sha256(out / file)
        if mode == "dynamic":
            entry["int8_file"] = quantize_int8(out / file, out / f"member_{k}.int8.onnx").name
        elif mode == "static":
            inputs = calibration_inputs(pred, calibrate)  # type: ignore[arg-type]
            q = quantize_int8_static(out / file, out / f"member_{k}.int8.onnx", inputs, pred.task)
            entry["int8_file"] = q.name
        members.append(entry)
        say(f"exported {path} -> {out / file} in {time.perf_counter() - t0:.1f} s (max |diff| {diff})")
    spec: dict[str, Any] = {
        "format": PIPELINE_FORMAT,
        "format_version": PIPELINE_VERSION,
        "task": first.task,
        "class_names": first.class_names,
        "binary": bool(first.binary),
        "input": {
            "name": "input",
            "dtype": "float32",
            "layout": "NCHW",
            "dynamic": ["batch", "height", "width"],
        },
        "output": {"name": "probs", "meaning": "sigmoid (binary) or softmax over axis 1, float32"},
        "tta": tta,
        "tta_scales": [float(f) for f in (tta_scales or first.cfg.predict.tta_scales)],
        "tta_scales_note": "segmentation: the tta passes at each multiple of the contract's resolution "
        "(scale or resize), mean of the maps at the original size",
        "tta_sets": {k: [list(op) for op in v] for k, v in TTA_SETS.items()},
        "tta_note": (
            "segmentation: ops (quarter turns, flip width, flip height), flips first; the inverse maps each "
            "output back before the mean. classification: any set other than none = image + horizontal mirror"
        ),
        "ensemble": {"mode": ensemble, "weights": [float(v) for v in w]},
        "postprocess": first.postprocess.model_dump(mode="json") if first.task == "segmentation" else None,
        "postprocess_note": "applied to binary maps; with vote ensembles threshold 0.5 and no hysteresis",
        "members": members,
        "int8": {
            "available": mode != "none",
            "use": False,
            "method": INT8_METHODS.get(mode),
            "calibration": str(calibrate) if mode == "static" else None,
        },
        "versions": _versions(opset),
        "exported": {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
    }
    (out / PIPELINE_FILE).write_text(json.dumps(spec, indent=1))
    return spec


# ------------------------------------------------------------------------------ torch engine under a budget
def torch_member_costs(
    predictors: list[Predictor],
    image: np.ndarray,
    precision: str = "32",
    tile: int | None = None,
    scales: list[float] | None = None,
) -> list[dict[str, float]]:
    """Seconds of one un-augmented prediction of `image` per predictor (after a warm-up run), for
    `runner.budget.choose_plan`; preprocessing is counted in the pass (a slight over-estimate with TTA).
    With multi-scale TTA (`scales`, default each run's) one pass is one pass at every scale."""
    from medstudent.inference.predict import predict_cls_probs, predict_seg_probs

    costs = []
    for p in predictors:

        def once(p: Predictor = p) -> None:
            if p.task == "segmentation":
                predict_seg_probs(p, image, "none", precision, tile=tile, scales=scales)
            else:
                predict_cls_probs(p, image, "none", precision)

        once()
        t0 = time.perf_counter()
        once()
        costs.append({"fixed_s": 0.0, "pass_s": time.perf_counter() - t0})
    return costs


def plan_torch_budget(
    predictors: list[Predictor],
    files: list[Path],
    budget_s: float,
    tta: str,
    precision: str = "32",
    tile: int | None = None,
    scales: list[float] | None = None,
):
    """`predict --engine torch --budget-seconds`: measure on the first readable image, choose the plan
    (`runner.budget.choose_plan`, equal weights). None when no image can be read."""
    from medstudent.data.io import read_image
    from medstudent.runner.budget import choose_plan

    for f in files:
        try:
            img = read_image(f)
        except DataError:
            continue
        costs = torch_member_costs(predictors, img, precision, tile, scales)
        return choose_plan(budget_s, costs, task=predictors[0].task, max_tta=tta)
    return None


def parse_weights(text: str | None) -> list[float] | None:
    """'1,2,1' -> [1.0, 2.0, 1.0] (the CLI's --weights)."""
    if text is None or not text.strip():
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise DataError(None, f"--weights expects comma-separated numbers, got '{text}'") from e
