"""`medstudent predict` for any engine: options checked, an optional time-budget plan, the folder loop.

The CLI loads an engine (torch runs or an exported ONNX folder) and calls `predict_images`; nothing about
prediction is written per engine beyond running its networks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medstudent.core.budget import BudgetPlan, calibrate
from medstudent.core.contract import check_choices
from medstudent.core.folder import collect_images, predict_folder
from medstudent.core.inferer import Engine, predictor
from medstudent.core.postprocess import for_ensemble
from medstudent.data.io import read_image
from medstudent.errors import DataError


def first_readable(files: list[Path]):
    """The first image of `files` that can be read (for measuring), or None."""
    for f in files:
        try:
            return read_image(f)
        except DataError:
            continue
    return None


def predict_images(
    engine: Engine,
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
    on_image: Callable[[int, int, Path], None] | None = None,
) -> dict[str, Any]:
    """Predict an image, a folder or a data set root with `engine` and write the outputs under `out`.

    tta / tta_scales / ensemble default to the engine's contract. budget_seconds (default: the contract's;
    0: none): measure the members on the first readable image and pick the TTA passes, scales and members
    that fit (`core.budget`); the choice is returned under "plan". Returns `predict_folder`'s summary plus
    "tta", "tta_scales", "ensemble", "members" and "plan".
    """
    spec = engine.spec
    images = Path(images)
    files = collect_images(images)
    tta = tta or spec.tta
    ensemble = ensemble or spec.ensemble.mode
    check_choices(tta, ensemble)
    members = list(range(len(spec.members)))
    plan: BudgetPlan | None = None
    if budget_seconds is None:
        budget_seconds = spec.budget_seconds  # the run's predict.budget_seconds (0 on the CLI: none)
    if budget_seconds:
        sample = first_readable(files)
        if sample is not None:
            plan = calibrate(
                engine, sample, budget_seconds, tta=tta, tile=tile, postprocess=postprocess, scales=tta_scales
            )
            tta, members = plan.tta, plan.members
            tta_scales = plan.scales or tta_scales
    post = for_ensemble(spec.postprocess, ensemble) if postprocess and spec.postprocess else None
    summary = predict_folder(
        predictor(engine, tta=tta, ensemble=ensemble, members=members, tile=tile, scales=tta_scales),
        spec.task,
        files,
        out,
        spec.class_names,
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
            "tta_scales": spec.scale_factors(tta_scales),
            "ensemble": ensemble,
            "members": members,
            "plan": plan.to_dict() if plan else None,
        }
    )
    return summary
