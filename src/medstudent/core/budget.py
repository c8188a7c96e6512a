"""Pick TTA passes and ensemble members to fit a time budget per image, from measured costs.

Engine-agnostic: `calibrate` measures, per member of any engine, a fixed cost (preprocessing, resizing
back) and the cost of one network pass (tiles included) on a real image through the same `core.inferer`
that predicts; the plan is then pure arithmetic (`choose_plan`), so it is tested without timing anything.

Rule: candidates are the TTA sets up to the requested one (none < flip < d4) times the k members with the
largest ensemble weights (k = 1..M) times the multi-scale sets (the first s of the requested scales, s =
1..S, when each scale was measured on its own). Estimated seconds per image = overhead (post-processing) +
the sum over the chosen members and scales of (fixed + cost of the passes). The passes cost passes x pass,
or, where the runner runs them side by side (`round_s` measured: `threads` single-threaded passes at once),
full rounds x round plus the remaining passes x pass (`passes_cost`, the rule of `pass_rounds`). Among the
plans that fit, the one with the most network passes in all (TTA views x scales x members) wins, ties going
to more members (ensembles usually gain more than extra TTA views), then to more scales, then to the
cheaper plan. When nothing fits, the cheapest plan is used and the plan says it does not fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medstudent.core.inferer import Engine, member_probs, prepare, tile_size
from medstudent.core.postprocess import postprocess as run_postprocess
from medstudent.core.tta import tta_passes

TTA_ORDER = ("none", "flip", "d4")


def pass_rounds(passes: int, threads: int) -> tuple[int, int]:
    """How an engine that runs passes side by side (the ONNX one) schedules `passes` independent network
    passes on `threads` cores: full rounds of `threads` concurrent single-threaded passes, then the rest
    one after another with all threads.
    Returns (rounds, rest); no rounds with fewer passes than threads or one thread."""
    if threads <= 1 or passes < threads:
        return 0, passes
    return divmod(passes, threads)


def passes_cost(cost: dict[str, float], passes: int) -> float:
    """Seconds for `passes` network passes of one member, from its measured costs."""
    if "round_s" not in cost:
        return passes * cost["pass_s"]
    rounds, rest = pass_rounds(passes, int(cost.get("threads", 1)))
    return rounds * cost["round_s"] + rest * cost["pass_s"]


@dataclass
class BudgetPlan:
    budget_s: float
    tta: str
    members: list[int]  # indices into the pipeline's members, by decreasing weight
    estimate_s: float
    fits: bool
    n_members: int
    costs: list[dict[str, Any]] = field(default_factory=list)
    overhead_s: float = 0.0
    scales: list[float] | None = None  # the multi-scale factors chosen (None: as requested, not planned)

    def summary(self) -> str:
        at = f" x scales {self.scales}" if self.scales else ""
        text = (
            f"budget {self.budget_s:.2f} s/image -> TTA {self.tta}{at}, {len(self.members)}/{self.n_members} "
            f"model(s) {self.members}, estimated {self.estimate_s:.2f} s/image"
        )
        return text if self.fits else text + " (even the cheapest plan exceeds the budget)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _member_cost(cost: dict[str, Any], passes: int, n_scales: int | None) -> float:
    """Seconds of one member for `passes` TTA passes at its first `n_scales` measured scales (None: the
    member's costs as a whole)."""
    if n_scales is None:
        return cost["fixed_s"] + passes_cost(cost, passes)
    return sum(c["fixed_s"] + passes_cost(c, passes) for c in cost["scales"][:n_scales])


def choose_plan(
    budget_s: float,
    costs: list[dict[str, Any]],
    *,
    task: str,
    max_tta: str,
    weights: list[float] | None = None,
    overhead_s: float = 0.0,
) -> BudgetPlan:
    """The plan for `budget_s` seconds per image; `costs[i]` = {"fixed_s", "pass_s"} of member i, plus
    {"round_s", "threads"} where its passes can run concurrently, and optionally "scales": the same per
    multi-scale factor ({"factor", "fixed_s", "pass_s", ...}), which lets the plan drop trailing scales."""
    if not costs:
        raise ValueError("choose_plan: no members")
    if budget_s <= 0:
        raise ValueError(f"the time budget must be positive, got {budget_s}")
    if max_tta not in TTA_ORDER:
        raise ValueError(f"unknown TTA '{max_tta}' (none, flip, d4)")
    weights = list(weights) if weights is not None else [1.0] * len(costs)
    order = sorted(range(len(costs)), key=lambda i: -weights[i])  # stable: earlier member first on ties
    ttas = TTA_ORDER[: TTA_ORDER.index(max_tta) + 1]
    per_scale = all("scales" in c for c in costs)
    n_scales = min(len(c["scales"]) for c in costs) if per_scale else 1
    best: tuple | None = None
    cheapest: tuple | None = None
    for tta in ttas:
        n = tta_passes(task, tta)
        for s in range(1, n_scales + 1):
            for k in range(1, len(order) + 1):
                chosen = order[:k]
                use = s if per_scale else None
                est = overhead_s + sum(_member_cost(costs[i], n, use) for i in chosen)
                cand = (tta, chosen, est, s)
                if cheapest is None or est < cheapest[2]:
                    cheapest = cand
                if est <= budget_s:
                    score = (k * n * s, k, s, -est)
                    if best is None or score > best[0]:
                        best = (score, cand)
    fits = best is not None
    tta, chosen, est, s = best[1] if best is not None else cheapest  # type: ignore[misc]
    scales = [float(c["factor"]) for c in costs[0]["scales"][:s]] if per_scale else None
    return BudgetPlan(
        budget_s=float(budget_s),
        tta=tta,
        members=list(chosen),
        estimate_s=float(est),
        fits=fits,
        n_members=len(costs),
        costs=[dict(c) for c in costs],
        overhead_s=float(overhead_s),
        scales=scales,
    )


# ------------------------------------------------------------------------------------------- measuring
def calibrate(
    engine: Engine,
    image: np.ndarray,
    budget_s: float,
    tta: str | None = None,
    tile: int | None = None,
    postprocess: bool = True,
    scales: list[float] | None = None,
) -> BudgetPlan:
    """Measure each member of `engine` on `image` (a warm-up run, then one timed run, through the same
    `core.inferer` steps that predict) and choose the plan. With multi-scale TTA one pass is one pass at
    every scale: the timings add up over the scales. An engine that runs whole-image passes side by side
    (`round_seconds`) is also timed for one such round."""
    spec = engine.spec
    factors = spec.scale_factors(scales)
    round_seconds = getattr(engine, "round_seconds", None)
    costs = []
    out = None
    for k in range(len(spec.members)):
        timing: dict[str, Any] = {}
        per_scale = []
        for f in factors:
            one: dict[str, Any] = {"factor": f}
            member_probs(engine, k, image, "none", tile, factor=f)  # warm-up: first runs allocate
            out = member_probs(engine, k, image, "none", tile, timing=one, factor=f)
            if round_seconds is not None and spec.task == "segmentation":
                x, _ = prepare(engine, k, image, f)
                if tile_size(engine, k, x, tile) is None:  # tiled passes run one after another
                    seconds, threads = round_seconds(k, x)
                    if threads > 1:
                        one["round_s"], one["threads"] = seconds, threads
            per_scale.append(one)
        for key in ("fixed_s", "pass_s", "round_s"):  # the member as a whole: its scales added up
            if all(key in one for one in per_scale):
                timing[key] = sum(one[key] for one in per_scale)
        if "round_s" in timing:
            timing["threads"] = per_scale[0]["threads"]
        if spec.task == "segmentation":
            timing["scales"] = per_scale
        costs.append(timing)
    overhead = 0.0
    post = spec.postprocess
    if postprocess and post is not None and out is not None and out.ndim == 2:
        t0 = time.perf_counter()
        run_postprocess(out, post)
        overhead = time.perf_counter() - t0
    return choose_plan(
        budget_s,
        costs,
        task=spec.task,
        max_tta=tta or spec.tta,
        weights=spec.member_weights(),
        overhead_s=overhead,
    )
