"""The steps around the network, written once for every engine (in the spirit of MONAI's inferers).

An engine (`Engine`: the torch one in `inference.engine`, the ONNX one in `runner.onnx_runner`) only runs
its networks: a float32 batch in, probabilities out. Everything else happens here, from the engine's
`PipelineSpec`: preprocessing (`data.preprocess.apply_eval_contract`), whole-image or Gaussian-blended
sliding-window inference (`core.tiling`), the TTA views and their inverses (`core.tta`), the map back to
the original size, multi-scale averaging and the ensemble (`core.ensemble`). A new step is added here once
and both engines have it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from medstudent.core.contract import PipelineSpec
from medstudent.core.ensemble import combine
from medstudent.core.tiling import sliding_window
from medstudent.core.tta import forward_op, inverse_op, tta_ops, tta_passes
from medstudent.data.preprocess import apply_eval_contract, restore_geometry, scaled_contract
from medstudent.errors import DataError


@runtime_checkable
class Engine(Protocol):
    """What the core needs of an engine: its contract, where and how precisely it computes, and its
    networks as batch -> probabilities functions."""

    spec: PipelineSpec
    device: str  # "cpu", "cuda:0", ... (for reports)
    precision: str  # "32", "bf16", "int8", ...

    def run(self, member: int, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, K, H, W) or (B, K) of member `member` for a float32 (B, C, H, W) batch."""
        ...

    def run_passes(self, member: int, batches: list[np.ndarray]) -> list[np.ndarray]:
        """`run` over independent whole-image TTA passes; an engine may run them side by side."""
        ...


Prepared = tuple[np.ndarray, dict]


def prepare(engine: Engine, member: int, image: np.ndarray, factor: float = 1.0) -> Prepared:
    """Member `member`'s (CHW float32 input, geometry info) for `image` at `factor` times its resolution."""
    contract = scaled_contract(engine.spec.members[member].preprocess.as_dict(), factor)
    try:
        return apply_eval_contract(image, contract)
    except ValueError as e:
        raise DataError(None, f"cannot preprocess image ({e})") from e


def tile_size(engine: Engine, member: int, x: np.ndarray, tile: int | None = None) -> int | None:
    """The sliding-window size for the prepared input x (None: predicted whole)."""
    return engine.spec.members[member].sliding_window.tile_for(x.shape[-2], x.shape[-1], tile)


def member_probs(
    engine: Engine,
    member: int,
    image: np.ndarray,
    tta: str = "none",
    tile: int | None = None,
    prepared: Prepared | None = None,
    timing: dict[str, float] | None = None,
    factor: float = 1.0,
) -> np.ndarray:
    """One member's probabilities at the original size: (H, W) binary, (C, H, W) multi-class, (C,) cls.

    factor: segmentation at that multiple of the member's resolution (one scale of multi-scale TTA).
    timing: adds the fixed cost (preprocessing, map back) and the cost of one pass (`core.budget`).
    """
    spec = engine.spec
    t0 = time.perf_counter()
    x, info = prepared if prepared is not None else prepare(engine, member, image, factor)
    x = x[None]
    t1 = time.perf_counter()
    if spec.task == "classification":
        p = engine.run(member, x)
        if tta != "none":  # classification TTA: the image and its horizontal mirror
            p = (p + engine.run(member, np.ascontiguousarray(x[..., ::-1]))) / 2
        out = p[0]
        t2 = t3 = time.perf_counter()
    else:
        ops = tta_ops(tta)
        size = tile_size(engine, member, x, tile)
        views = [np.ascontiguousarray(forward_op(x, op)) for op in ops]
        if size is None:
            ys = engine.run_passes(member, views)
        else:  # tiled passes run one after another, their windows in batches
            win = spec.members[member].sliding_window

            def net(t: np.ndarray) -> np.ndarray:
                return engine.run(member, t)

            ys = [
                sliding_window(v, size, net, win.overlap, win.sw_batch_size, win.sigma_scale) for v in views
            ]
        total = inverse_op(ys[0], ops[0])
        for y, op in zip(ys[1:], ops[1:], strict=True):  # in TTA order, as a sequential sum
            total = total + inverse_op(y, op)
        probs = (total / len(ops))[0]
        t2 = time.perf_counter()
        probs = restore_geometry(np.ascontiguousarray(probs), info)
        out = probs[0] if spec.binary else probs
        t3 = time.perf_counter()
    if timing is not None:
        timing["fixed_s"] = timing.get("fixed_s", 0.0) + (t1 - t0) + (t3 - t2)
        timing["pass_s"] = timing.get("pass_s", 0.0) + (t2 - t1) / tta_passes(spec.task, tta)
    return out


def _input_key(engine: Engine, member: int, factor: float) -> str:
    return json.dumps([engine.spec.members[member].preprocess.as_dict(), factor], sort_keys=True)


def prepare_inputs(
    engine: Engine, image: np.ndarray, members: list[int] | None = None, scales: list[float] | None = None
) -> dict[str, Prepared]:
    """Every network input `predict_probs` needs for `image` (members with the same preprocessing share
    one per scale), so a reader thread can prepare the next image while the network runs."""
    spec = engine.spec
    idx = list(range(len(spec.members))) if members is None else list(members)
    cache: dict[str, Prepared] = {}
    for k in idx:
        for f in spec.scale_factors(scales):
            key = _input_key(engine, k, f)
            if key not in cache:
                cache[key] = prepare(engine, k, image, f)
    return cache


def predict_probs(
    engine: Engine,
    image: np.ndarray,
    tta: str | None = None,
    ensemble: str | None = None,
    members: list[int] | None = None,
    tile: int | None = None,
    scales: list[float] | None = None,
    prepared: dict[str, Prepared] | None = None,
) -> np.ndarray:
    """Ensemble probabilities of one uint8 image: (H, W) binary maps, (C, H, W) multi-class, (C,) cls.

    tta / ensemble / scales default to the contract's; members: indices of the members to use (a budget
    plan's), all by default. Members with the same preprocessing share one prepared input per scale;
    `prepared` (from `prepare_inputs`) supplies them ready-made.
    """
    spec = engine.spec
    tta = tta or spec.tta
    ensemble = ensemble or spec.ensemble.mode
    factors = spec.scale_factors(scales)
    idx = list(range(len(spec.members))) if members is None else list(members)
    cache: dict[str, Prepared] = dict(prepared) if prepared else {}
    outs = []
    for k in idx:
        total = None
        for f in factors:
            key = _input_key(engine, k, f)
            if key not in cache:
                cache[key] = prepare(engine, k, image, f)
            p = member_probs(engine, k, image, tta, tile, prepared=cache[key])
            total = p if total is None else total + p
        assert total is not None
        outs.append(total if len(factors) == 1 else total / len(factors))
    weights = spec.member_weights()
    return combine(outs, ensemble, [weights[k] for k in idx], spec.threshold())


def predictor(engine: Engine, **options) -> Callable[[np.ndarray], np.ndarray]:
    """`image -> probabilities` with fixed options (what the folder loop calls per image)."""
    return lambda image: predict_probs(engine, image, **options)
