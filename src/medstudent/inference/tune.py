"""`medstudent tune-postprocess`: validation probability maps of a run -> best post-processing, saved in the
run folder (postprocess.json), where `predict` picks it up. The tuned setting replaces the run's configured
one only when the search also wins leave-one-image-out (see `tune_postprocess`'s guard)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medstudent.data.layouts import open_dataset
from medstudent.data.splits import fold_ids, load_split
from medstudent.errors import DataError
from medstudent.evaluation.metrics import mean_dice
from medstudent.inference.postprocess import tune_postprocess
from medstudent.inference.predict import load_predictor, predict_seg_probs


def validation_maps(run: Path, tta: str | None = None, progress: Callable[[str], None] | None = None):
    """(probability maps, ground truths, ids) of the run's validation fold, at the original image size."""
    pred = load_predictor(run, device="auto")
    if pred.task != "segmentation":
        raise DataError(run, "post-processing is tuned for segmentation runs only")
    cfg = pred.cfg
    ds = open_dataset(cfg.data.root, label_map=cfg.data.label_map, empty_if_missing=cfg.data.empty_if_missing)
    split = load_split(Path(run) / "split.json", ds)
    _, val_ids, _ = fold_ids(split, cfg.data.fold)
    if not val_ids:
        raise DataError(
            run, "has no validation images (trained with fold all): tune post-processing on a fold run"
        )
    index = {i: n for n, i in enumerate(ds.ids())}
    probs, gts = [], []
    for n, vid in enumerate(val_ids):
        img, gt = ds.load(index[vid])
        probs.append(predict_seg_probs(pred, img, tta or cfg.predict.tta).astype(np.float32))
        gts.append(gt > 0)
        if progress and (n + 1) % 10 == 0:
            progress(f"validation maps {n + 1}/{len(val_ids)}")
    return probs, gts, val_ids, pred


def _save_val_predictions(folder: Path, probs: list[np.ndarray], ids: list[str]) -> None:
    """Validation probability maps (uint8 PNG, 0-255) in the run tree, as nnU-Net keeps its predictions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for p, i in zip(probs, ids, strict=True):
        p8 = np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(p8).save(folder / f"{Path(i).name}.png")


def tune_run(
    run: str | Path,
    tta: str | None = None,
    grid: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    run = Path(run)
    probs, gts, ids, pred = validation_maps(run, tta, progress)
    _save_val_predictions(run / "predictions" / "val", probs, ids)
    best, table = tune_postprocess(probs, gts, grid=grid, base=pred.cfg.postprocess)
    plain = mean_dice([p > 0.5 for p in probs], gts)
    path = run / "postprocess.json"
    path.write_text(json.dumps(best.model_dump(mode="json"), indent=1))
    table.to_csv(run / "postprocess_grid.csv", index=False)
    return {
        "images": len(ids),
        "dice_plain": float(plain),
        "dice_configured": table.attrs["configured"],  # the run's own post-processing (config.yaml)
        "dice_tuned": table.attrs["tuned"],  # the grid's best on all validation images (optimistic)
        "dice_held_out": table.attrs["held_out"],  # the search scored leave-one-image-out
        "adopted": table.attrs["adopted"],  # tuned setting written; else the configured one is kept
        "best": best.model_dump(mode="json"),
        "path": str(path),
    }
