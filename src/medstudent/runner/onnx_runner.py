"""Torch-free inference from an exported model folder (`medstudent export`): ONNX Runtime + numpy.

Reproduces `inference.predict.predict_probs` step by step: `data.preprocess.apply_eval_contract` (the same
function the torch predictor calls), whole-image or Gaussian-blended sliding-window inference
(`runner.tiling`, the numpy twin of MONAI's), TTA with the numpy ops of `inference.tta`,
`restore_geometry`, the ensemble mean or vote, then `inference.folder.predict_folder` for the outputs.
Nothing here may import torch (a test checks `sys.modules` in a fresh interpreter).

Speed: one session per member with intra-op threads = usable cores, sequential execution and every ONNX
Runtime graph optimisation (constant folding, Conv+BN/activation fusion, NCHWc layouts on x86). The TTA
passes of an image are independent, and one pass does not use two cores fully (stas_cpu graph at 864x480,
fp32: 0.53 s on one core, 0.28-0.33 s on two; two single-threaded passes side by side: 0.27 s per pass),
so with several cores the passes run concurrently, one single-threaded session per core
(`runner.budget.pass_rounds`); a pass left over runs alone with all threads. Flip TTA gained 2-9%.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from medstudent.config import PostprocessConfig
from medstudent.data.preprocess import apply_eval_contract, restore_geometry, scaled_contract
from medstudent.errors import DataError
from medstudent.inference.tta import TTA_SETS, forward_op, inverse_op, tta_ops
from medstudent.runner.budget import BudgetPlan, choose_plan, pass_rounds, tta_passes
from medstudent.runner.tiling import sliding_window

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "medstudent-onnx-pipeline"
SUPPORTED_VERSIONS = (1,)


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or usable_cores())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return so


@dataclass
class Member:
    file: Path
    session: ort.InferenceSession
    contract: dict[str, Any]
    window: dict[str, Any]
    weight: float
    solo: ort.InferenceSession | None = None  # one intra-op thread, for passes run side by side

    def run(self, x: np.ndarray) -> np.ndarray:
        return _run(self.session, x)

    def open_solo(self) -> ort.InferenceSession:
        """The single-threaded session, created on first use (from the calling thread, not a worker)."""
        if self.solo is None:
            self.solo = ort.InferenceSession(
                str(self.file), session_options(1), providers=["CPUExecutionProvider"]
            )
        return self.solo

    def run_solo(self, x: np.ndarray) -> np.ndarray:
        return _run(self.open_solo(), x)


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]


def read_pipeline(model_dir: str | Path) -> dict[str, Any]:
    """Parse and check `model_dir/pipeline.json` (DataError naming the file on any problem)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise DataError(model_dir, "no such exported model folder")
    path = model_dir if model_dir.is_file() else model_dir / PIPELINE_FILE
    if not path.is_file():
        raise DataError(path, "missing: not an exported model folder (make one with `medstudent export`)")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != PIPELINE_FORMAT:
        raise DataError(path, f"not a medstudent pipeline (format is not '{PIPELINE_FORMAT}')")
    if spec.get("format_version") not in SUPPORTED_VERSIONS:
        raise DataError(path, f"pipeline format_version {spec.get('format_version')} is not supported")
    for key in ("task", "class_names", "members", "tta", "ensemble"):
        if key not in spec:
            raise DataError(path, f"pipeline has no '{key}'")
    if not spec["members"]:
        raise DataError(path, "pipeline lists no models")
    return spec


class OnnxPipeline:
    """An exported model folder loaded for inference."""

    def __init__(
        self,
        model_dir: str | Path,
        threads: int | None = None,
        int8: bool | None = None,
        parallel_passes: bool = True,
    ):
        """threads: cores to use (default: all usable); int8: the int8 graphs (default: pipeline.json's
        choice); parallel_passes: run an image's TTA passes side by side, one core each."""
        model_dir = Path(model_dir)
        self.spec = read_pipeline(model_dir)
        self.dir = model_dir.parent if model_dir.is_file() else model_dir
        self.threads = int(threads or usable_cores())
        use_int8 = self.spec.get("int8", {}).get("use", False) if int8 is None else int8
        self.int8 = bool(use_int8)
        self.parallel_passes = bool(parallel_passes) and self.threads > 1
        self._pool: ThreadPoolExecutor | None = None
        so = session_options(self.threads)
        self.members: list[Member] = []
        for m in self.spec["members"]:
            name = m.get("int8_file") if self.int8 else m.get("file")
            if not name:
                raise DataError(self.dir / PIPELINE_FILE, "int8 requested but the export has no int8 graphs")
            file = self.dir / name
            if not file.is_file():
                raise DataError(file, "missing (listed in pipeline.json)")
            try:
                sess = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any load failure is a bad model file
                raise DataError(file, f"cannot load ONNX graph ({type(e).__name__}: {e})") from e
            self.members.append(Member(file, sess, m["preprocess"], m["sliding_window"], float(m["weight"])))

    # ------------------------------------------------------------------------------------------- facts
    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    @property
    def binary(self) -> bool:
        return bool(self.spec.get("binary", False))

    @property
    def tta(self) -> str:
        return self.spec["tta"]

    @property
    def tta_scales(self) -> list[float]:
        """Multi-scale TTA factors (pipelines exported before they existed: one scale)."""
        return [float(f) for f in self.spec.get("tta_scales") or [1.0]]

    def _prepared(self, k: int, image: np.ndarray, factor: float, cache: dict) -> tuple[np.ndarray, dict]:
        """Member k's input at `factor` times its resolution, shared by members with the same contract."""
        contract = scaled_contract(self.members[k].contract, factor)  # classification: unchanged
        key = json.dumps(contract, sort_keys=True)
        if key not in cache:
            try:
                cache[key] = apply_eval_contract(image, contract)
            except ValueError as e:
                raise DataError(None, f"cannot preprocess image ({e})") from e
        return cache[key]

    @property
    def ensemble(self) -> str:
        return self.spec["ensemble"]["mode"]

    @property
    def postprocess(self) -> PostprocessConfig | None:
        pp = self.spec.get("postprocess")
        return PostprocessConfig.model_validate(pp) if pp else None

    # ------------------------------------------------------------------------------------------ inference
    def _tile_size(self, member: Member, x: np.ndarray, tile: int | None) -> int | None:
        """predict_seg_probs's rule: tile when asked to, or when the input exceeds max_full_pixels."""
        win = member.window
        tile = tile or win.get("tile")
        if tile or x.shape[-1] * x.shape[-2] > int(win["max_full_pixels"]):
            size = int(tile or win.get("default_tile", 512))
            return max(32, size // 32 * 32)
        return None

    def member_probs(
        self,
        k: int,
        image: np.ndarray,
        tta: str = "none",
        tile: int | None = None,
        prepared: tuple[np.ndarray, dict] | None = None,
        timing: dict[str, float] | None = None,
        factor: float = 1.0,
    ) -> np.ndarray:
        """One member's probabilities at the original size: (H, W) binary, (C, H, W) multi-class, (C,) cls.
        factor: segmentation at that multiple of the member's resolution (one scale of multi-scale TTA)."""
        m = self.members[k]
        t0 = time.perf_counter()
        x, info = (
            prepared
            if prepared is not None
            else apply_eval_contract(image, scaled_contract(m.contract, factor))
        )
        x = x[None]
        t1 = time.perf_counter()
        if self.task == "classification":
            p = m.run(x)
            if tta != "none":
                p = (p + m.run(x[..., ::-1])) / 2
            out = p[0]
            t2 = t3 = time.perf_counter()
        else:
            size = self._tile_size(m, x, tile)
            win = m.window
            if size is None:
                net: Callable[[np.ndarray], np.ndarray] = m.run
            else:

                def net(t: np.ndarray, size: int = size) -> np.ndarray:
                    return sliding_window(
                        t,
                        size,
                        m.run,
                        overlap=float(win["overlap"]),
                        sw_batch_size=int(win.get("sw_batch_size", 2)),
                        sigma_scale=float(win.get("sigma_scale", 0.125)),
                    )

            ops = tta_ops(tta)

            def one(op: tuple[int, bool, bool], run: Callable[[np.ndarray], np.ndarray] = net) -> np.ndarray:
                return inverse_op(run(np.ascontiguousarray(forward_op(x, op))), op)

            rounds, _ = pass_rounds(len(ops), self.threads) if self.parallel_passes else (0, 0)
            side = ops[: rounds * self.threads] if size is None else []  # tiled passes stay sequential
            if side:
                m.open_solo()
            ys = self._map(lambda op: one(op, m.run_solo), side) + [one(op) for op in ops[len(side) :]]
            total = ys[0]
            for y in ys[1:]:  # in TTA order, as the sequential sum
                total = total + y
            probs = (total / len(ops))[0]
            t2 = time.perf_counter()
            probs = restore_geometry(np.ascontiguousarray(probs), info)
            out = probs[0] if self.binary else probs
            t3 = time.perf_counter()
        if timing is not None:
            timing["fixed_s"] = timing.get("fixed_s", 0.0) + (t1 - t0) + (t3 - t2)
            timing["pass_s"] = timing.get("pass_s", 0.0) + (t2 - t1) / tta_passes(self.task, tta)
        return out

    def _map(self, fn: Callable, items: list) -> list:
        if not items:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="medstudent-pass")
        return list(self._pool.map(fn, items))

    def round_seconds(self, k: int, x: np.ndarray) -> float:
        """Seconds for one round of `threads` single-threaded passes of member k side by side on the
        prepared input `x` (C, H, W), after a warm-up round."""
        m = self.members[k]
        m.open_solo()
        batch = [x[None]] * self.threads
        self._map(m.run_solo, batch)
        t0 = time.perf_counter()
        self._map(m.run_solo, batch)
        return time.perf_counter() - t0

    def predict_probs(
        self,
        image: np.ndarray,
        tta: str | None = None,
        ensemble: str | None = None,
        members: list[int] | None = None,
        tile: int | None = None,
        scales: list[float] | None = None,
    ) -> np.ndarray:
        """Ensemble probabilities of one uint8 image, as `inference.predict.predict_probs` returns them.
        scales: multi-scale TTA factors (segmentation; default the pipeline's `tta_scales`)."""
        tta = tta or self.tta
        ensemble = ensemble or self.ensemble
        factors = self.scale_factors(scales)
        idx = list(range(len(self.members))) if members is None else list(members)
        cache: dict[str, tuple[np.ndarray, dict]] = {}
        outs = []
        for k in idx:
            total = None
            for f in factors:
                p = self.member_probs(k, image, tta, tile, prepared=self._prepared(k, image, f, cache))
                total = p if total is None else total + p
            outs.append(total if len(factors) == 1 else total / len(factors))
        weights = [self.members[k].weight for k in idx]
        threshold = self.postprocess.threshold if self.postprocess is not None else 0.5
        return combine(outs, ensemble, weights, threshold)

    def scale_factors(self, scales: list[float] | None) -> list[float]:
        """The multi-scale TTA factors to use: `scales`, else the pipeline's; classification: one scale."""
        if self.task != "segmentation":
            return [1.0]
        return [float(f) for f in scales] if scales else self.tta_scales

    def calibrate(
        self,
        image: np.ndarray,
        budget_s: float,
        tta: str | None = None,
        tile: int | None = None,
        postprocess: bool = True,
        scales: list[float] | None = None,
    ) -> BudgetPlan:
        """Measure each member on `image` (a warm-up run, then one timed run) and choose the plan.
        With multi-scale TTA one pass is one pass at every scale: the timings add up over the scales."""
        costs = []
        out = None
        factors = self.scale_factors(scales)
        for k in range(len(self.members)):
            timing: dict[str, float] = {}
            for f in factors:
                self.member_probs(k, image, "none", tile, factor=f)  # warm-up: first runs allocate
                out = self.member_probs(k, image, "none", tile, timing=timing, factor=f)
                if not (self.parallel_passes and self.task == "segmentation"):
                    continue
                x, _ = apply_eval_contract(image, scaled_contract(self.members[k].contract, f))
                if self._tile_size(self.members[k], x, tile) is None:  # tiled passes stay sequential
                    timing["round_s"] = timing.get("round_s", 0.0) + self.round_seconds(k, x)
                    timing["threads"] = self.threads
            costs.append(timing)
        overhead = 0.0
        post = self.postprocess
        if postprocess and post is not None and out is not None and out.ndim == 2:
            from medstudent.inference.postprocess import postprocess as run_post

            t0 = time.perf_counter()
            run_post(out, post)
            overhead = time.perf_counter() - t0
        return choose_plan(
            budget_s,
            costs,
            task=self.task,
            max_tta=tta or self.tta,
            weights=[m.weight for m in self.members],
            overhead_s=overhead,
        )


def combine(
    probs: list[np.ndarray], mode: str = "mean", weights: list[float] | None = None, threshold: float = 0.5
) -> np.ndarray:
    """`inference.predict.ensemble_probs` with optional member weights (normalised; equal = the same)."""
    if mode == "mean" and len(probs) == 1:
        return probs[0]  # the mean of one map, without copying a full-size stack
    stack = np.stack(probs)
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).astype(np.float32)
    equal = bool(np.allclose(w, w[0]))
    if mode == "mean":
        return stack.mean(0) if equal else np.tensordot(w, stack, axes=1)
    if mode != "vote":
        raise DataError(None, f"unknown ensemble mode '{mode}' (mean, vote)")
    if stack.ndim == 3:  # binary foreground maps (M, H, W)
        votes = (stack > threshold).astype(np.float32)
    else:
        c = stack.shape[1]
        votes = np.moveaxis(np.eye(c, dtype=np.float32)[stack.argmax(1)], -1, 1)
    return votes.mean(0).astype(np.float32) if equal else np.tensordot(w, votes, axes=1)


def predict_onnx_folder(
    model_dir: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    tta: str | None = None,
    tta_scales: list[float] | None = None,
    ensemble: str | None = None,
    budget_seconds: float | None = None,
    tile: int | None = None,
    postprocess: bool = True,
    save_probs: bool = False,
    save_labelme: bool = False,
    save_overlays: bool = True,
    threads: int | None = None,
    int8: bool | None = None,
    on_image: Callable[[int, int, Path], None] | None = None,
) -> dict[str, Any]:
    """`medstudent predict --engine onnx`: the same files as the torch path, from an exported model folder.

    budget_seconds: measure the members on the first readable image and pick the TTA passes / members that
    fit (see `runner.budget`); the choice is returned under "plan". Returns predict_folder's summary plus
    "tta", "ensemble", "members" and "plan".
    """
    from medstudent.data.io import read_image
    from medstudent.inference.folder import collect_images, predict_folder

    pipe = OnnxPipeline(model_dir, threads=threads, int8=int8)
    images = Path(images)
    files = collect_images(images)
    tta = tta or pipe.tta
    ensemble = ensemble or pipe.ensemble
    if tta not in TTA_SETS:
        raise DataError(None, f"unknown TTA '{tta}' (none, flip, d4)")
    if ensemble not in ("mean", "vote"):
        raise DataError(None, f"unknown ensemble mode '{ensemble}' (mean, vote)")
    members = list(range(len(pipe.members)))
    plan = None
    if budget_seconds is not None:
        sample = None
        for f in files:
            try:
                sample = read_image(f)
                break
            except DataError:
                continue
        if sample is not None:
            plan = pipe.calibrate(
                sample, budget_seconds, tta=tta, tile=tile, postprocess=postprocess, scales=tta_scales
            )
            tta, members = plan.tta, plan.members
    from medstudent.inference.postprocess import for_ensemble

    post = for_ensemble(pipe.postprocess, ensemble) if postprocess else None
    summary = predict_folder(
        lambda img: pipe.predict_probs(
            img, tta=tta, ensemble=ensemble, members=members, tile=tile, scales=tta_scales
        ),
        pipe.task,
        files,
        out,
        pipe.class_names,
        post=post,
        save_probs=save_probs,
        save_labelme=save_labelme,
        save_overlays=save_overlays,
        root=images if images.is_dir() else None,
        on_image=on_image,
    )
    summary.update(
        {
            "tta": tta,
            "tta_scales": pipe.scale_factors(tta_scales),
            "ensemble": ensemble,
            "members": members,
            "plan": plan.to_dict() if plan else None,
        }
    )
    return summary
