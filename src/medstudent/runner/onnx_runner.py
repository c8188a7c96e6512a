"""The ONNX engine: an exported model folder (`medstudent export`) run by ONNX Runtime, without torch.

`pipeline.json` is read into the core's `PipelineSpec` (`core.contract.read_pipeline`: member files
confined to the folder, the float32 graphs checked against their sha256); each member becomes an ONNX
Runtime session. Everything around the network call is `core.inferer`'s, the same steps the torch engine
runs, so the two agree within float32 rounding. Nothing here may import torch (a test checks `sys.modules`
in a fresh interpreter).

Speed: one session per member with intra-op threads = usable cores, sequential execution and every ONNX
Runtime graph optimisation (constant folding, Conv+BN/activation fusion, NCHWc layouts on x86). The TTA
passes of an image are independent, and one pass does not use two cores fully, so with several cores the
whole-image passes run concurrently, one single-threaded session per core (`core.budget.pass_rounds`); a
pass left over runs alone with all threads (BENCHMARKS.md has the measurements).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from medstudent.core import inferer
from medstudent.core.budget import BudgetPlan, calibrate, pass_rounds
from medstudent.core.contract import PIPELINE_FILE, PipelineSpec, member_graph, read_pipeline
from medstudent.core.workflow import predict_images
from medstudent.errors import DataError

__all__ = ["OnnxPipeline", "predict_onnx_folder", "read_pipeline", "session_options", "usable_cores"]


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
    """One member's ONNX Runtime sessions."""

    file: Path
    session: ort.InferenceSession
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


class OnnxPipeline:
    """An exported model folder loaded for inference: the ONNX engine of `core.inferer`."""

    def __init__(
        self,
        model_dir: str | Path,
        threads: int | None = None,
        int8: bool | None = None,
        parallel_passes: bool = True,
    ):
        """threads: cores to use (default: all usable); int8: the int8 graphs (default: pipeline.json's
        choice); parallel_passes: run an image's whole-image TTA passes side by side, one core each."""
        model_dir = Path(model_dir)
        self.spec: PipelineSpec = read_pipeline(model_dir)
        self.dir = model_dir.parent if model_dir.is_file() else model_dir
        self.threads = int(threads or usable_cores())
        recorded = (getattr(self.spec, "int8", None) or {}).get("use", False)
        self.int8 = bool(recorded if int8 is None else int8)
        self.device = "cpu"
        self.precision = "int8" if self.int8 else "32"
        self.parallel_passes = bool(parallel_passes) and self.threads > 1
        self._pool: ThreadPoolExecutor | None = None
        so = session_options(self.threads)
        self.members: list[Member] = []
        for m in self.spec.members:
            file = member_graph(self.dir, m, self.int8, self.dir / PIPELINE_FILE)
            try:
                sess = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any load failure is a bad model file
                raise DataError(file, f"cannot load ONNX graph ({type(e).__name__}: {e})") from e
            _check_outputs(sess, self.spec, file)
            self.members.append(Member(file, sess))

    # ------------------------------------------------------------------------------------------- facts
    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @property
    def tta(self) -> str:
        return self.spec.tta

    @property
    def tta_scales(self) -> list[float]:
        return self.spec.scale_factors()

    @property
    def ensemble(self) -> str:
        return self.spec.ensemble.mode

    # ------------------------------------------------------------------------------------ the engine
    def run(self, member: int, batch: np.ndarray) -> np.ndarray:
        return _run(self.members[member].session, batch)

    def run_passes(self, member: int, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Full rounds of `threads` passes side by side on single-threaded sessions, the rest one after
        another with all threads (`pass_rounds`); outputs in input order."""
        m = self.members[member]
        rounds, _ = pass_rounds(len(batches), self.threads) if self.parallel_passes else (0, 0)
        side = batches[: rounds * self.threads]
        if side:
            m.open_solo()
        return self._map(m.run_solo, side) + [m.run(b) for b in batches[len(side) :]]

    def round_seconds(self, member: int, x: np.ndarray) -> tuple[float, int]:
        """(seconds, threads) of one round of `threads` single-threaded passes of `member` side by side on
        the prepared input x (C, H, W), after a warm-up round; (0, 1) when passes run one by one."""
        if not self.parallel_passes:
            return 0.0, 1
        m = self.members[member]
        m.open_solo()
        batch = [x[None]] * self.threads
        self._map(m.run_solo, batch)
        t0 = time.perf_counter()
        self._map(m.run_solo, batch)
        return time.perf_counter() - t0, self.threads

    def _map(self, fn: Callable, items: list) -> list:
        if not items:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="medstudent-pass")
        return list(self._pool.map(fn, items))

    # --------------------------------------------------------------------------- the core, for callers
    def member_probs(
        self, k: int, image: np.ndarray, tta: str = "none", tile: int | None = None, **kw
    ) -> np.ndarray:
        """`core.inferer.member_probs` with this engine."""
        return inferer.member_probs(self, k, image, tta, tile, **kw)

    def predict_probs(self, image: np.ndarray, **options) -> np.ndarray:
        """`core.inferer.predict_probs` with this engine (tta, ensemble, members, tile, scales)."""
        return inferer.predict_probs(self, image, **options)

    def scale_factors(self, scales: list[float] | None) -> list[float]:
        return self.spec.scale_factors(scales)

    def calibrate(self, image: np.ndarray, budget_s: float, **options) -> BudgetPlan:
        """`core.budget.calibrate` with this engine."""
        return calibrate(self, image, budget_s, **options)


def _check_outputs(session: ort.InferenceSession, spec: PipelineSpec, file: Path) -> None:
    """The graph's output channels must be what the contract reads: 1 for binary maps, one per class
    otherwise (a graph from another export, or an edited pipeline.json, is refused here, not mis-read)."""
    expected = 1 if spec.binary else len(spec.class_names)
    shape = session.get_outputs()[0].shape
    channels = shape[1] if len(shape) > 1 else None
    if isinstance(channels, int) and channels != expected:
        raise DataError(file, f"the graph gives {channels} channel(s), pipeline.json expects {expected}")


def predict_onnx_folder(
    model_dir: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    threads: int | None = None,
    int8: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`medstudent predict --engine onnx`: the same files as the torch path, from an exported model folder
    (`core.workflow.predict_images`'s options: tta, tta_scales, ensemble, budget_seconds, tile, ...)."""
    return predict_images(OnnxPipeline(model_dir, threads=threads, int8=int8), images, out, **options)
