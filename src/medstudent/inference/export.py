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

from medstudent.atomic import write_text_atomic
from medstudent.core.contract import TTA_SETS, check_choices, sha256_of, write_pipeline
from medstudent.data.io import list_images, read_image
from medstudent.data.preprocess import apply_eval_contract
from medstudent.errors import DataError
from medstudent.inference.engine import pipeline_spec
from medstudent.inference.model_card import model_card, read_json, run_dir_of
from medstudent.inference.runs import Predictor, expand_runs, load_predictor
from medstudent.provenance import write_env

MIN_OPSET = 17


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
    into one tensor first (a measurable share of ONNX Runtime's time, BENCHMARKS.md); the additions give
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
    which holds most of the time at 864x480 (BENCHMARKS.md), kept 0.994. Quantising the GroupNorm, resize and
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
    files = list_images(Path(folder))[:n]
    if not files:
        raise DataError(folder, "int8 static: no images to calibrate on")
    return [apply_eval_contract(read_image(f), pred.contract)[0] for f in files]


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
    spec = pipeline_spec(preds, tta, ensemble, weights, tta_scales)
    check_choices(spec.tta, spec.ensemble.mode)
    out.mkdir(parents=True, exist_ok=True)
    for k, (pred, path, member) in enumerate(zip(preds, paths, spec.members, strict=True)):
        t0 = time.perf_counter()
        file = f"member_{k}.onnx"
        export_model(pred, out / file, opset)
        diff = check_export(pred, out / file) if check else None
        member.file, member.sha256 = file, sha256_of(out / file)
        if mode == "dynamic":
            member.int8_file = quantize_int8(out / file, out / f"member_{k}.int8.onnx").name
        elif mode == "static":
            inputs = calibration_inputs(pred, calibrate)  # type: ignore[arg-type]
            member.int8_file = quantize_int8_static(
                out / file, out / f"member_{k}.int8.onnx", inputs, pred.task
            ).name
        # facts for people reading pipeline.json (extra keys: the engines do not read them)
        extra = {"arch": pred.cfg.model.arch, "encoder": pred.cfg.model.encoder, "export_max_abs_diff": diff}
        for key, value in {**extra, "activation": _activation(pred)}.items():
            setattr(member, key, value)
        member.sliding_window.padding = (
            "constant 0 (normalised), centred, when the input is smaller than the tile"
        )
        say(f"exported {path} -> {out / file} in {time.perf_counter() - t0:.1f} s (max |diff| {diff})")
    notes = {
        "input": {
            "name": "input",
            "dtype": "float32",
            "layout": "NCHW",
            "dynamic": ["batch", "height", "width"],
        },
        "output": {"name": "probs", "meaning": "sigmoid (binary) or softmax over axis 1, float32"},
        "tta_scales_note": "segmentation: the tta passes at each multiple of the contract's resolution "
        "(scale or resize), mean of the maps at the original size",
        "tta_sets": {k: [list(op) for op in v] for k, v in TTA_SETS.items()},
        "tta_note": (
            "segmentation: ops (quarter turns, flip width, flip height), flips first; the inverse maps each "
            "output back before the mean. classification: any set other than none = image + horizontal mirror"
        ),
        "postprocess_note": "applied to binary maps; with vote ensembles threshold 0.5 and no hysteresis",
        "int8": {
            "available": mode != "none",
            "use": False,
            "method": INT8_METHODS.get(mode),
            "calibration": str(calibrate) if mode == "static" else None,
        },
        "versions": _versions(opset),
        "exported": {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
    }
    for key, value in notes.items():
        setattr(spec, key, value)
    write_pipeline(spec, out)
    first_env = read_json(run_dir_of(preds[0]).env)
    write_env(out / "env.json", preds[0].cfg.train.seed, None, first_env.get("data_fingerprint"))
    write_text_atomic(out / "MODEL_CARD.md", model_card(spec, preds))
    return spec.model_dump(mode="json")


def parse_weights(text: str | None) -> list[float] | None:
    """'1,2,1' -> [1.0, 2.0, 1.0] (the CLI's --weights)."""
    if text is None or not text.strip():
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise DataError(None, f"--weights expects comma-separated numbers, got '{text}'") from e
