"""`medstudent cv`: train every fold of a split, score out-of-fold predictions, aggregate mean +- sd.

runs/<name>/
  split.json          the split every fold uses (copied from --split / data.split, or made when absent)
  cv_manifest.json    which folds are done, with their models and metrics: a rerun skips them
  fold_<k>/           the fold's run tree (as `medstudent train` writes it), plus
    oof.csv             per-image out-of-fold scores (segmentation) or probabilities (classification)
    predictions/val/    out-of-fold probability maps (segmentation, uint8 PNG)
  oof.csv             every fold's out-of-fold rows
  results.csv         per-fold metrics in the long format (dataset, method, fold, metrics...) for `compare`
  cv_summary.json     mean and sd (ddof 1) of each metric over the folds
  test/               with test=True: the fold models' ensemble on the split's test set
  test_results.csv    the test-set metrics in the long format (fold = "test")

A fold is trained by a *fold runner* (`run_method`): `train_fold` (supervised training) by default. Any
callable `(cfg, split_path, fold, fold_dir)` may replace it (e.g. Noisy Student); it returns the model
folder(s) to score (their ensemble is predicted on the validation fold) or, when it scored itself, a
mapping of metric name -> value. `resolve_fold_runner(cfg)` picks the runner for a configuration.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medstudent.atomic import atomic_path, remove_stale_temps, write_text_atomic
from medstudent.config import RunConfig
from medstudent.core.postprocess import for_ensemble
from medstudent.data.layouts import open_dataset
from medstudent.data.splits import fold_ids, load_split
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import primary_metric, write_results
from medstudent.evaluation.scoring import result_metrics, score_images, summarize_rows
from medstudent.experiments.manifest import (
    MANIFEST,
    folder_lock,
    load_manifest,
    resolve_split,
    save_manifest,
)
from medstudent.experiments.parallel import run_parallel
from medstudent.rundir import RunDir
from medstudent.selftrain.loop import selftrain_fold

__all__ = [
    "MANIFEST",
    "CVResult",
    "FOLD_RUNNERS",
    "FoldRunner",
    "resolve_fold_runner",
    "resolve_split",
    "run_cv",
    "score_models",
    "train_fold",
]

FoldOutcome = Path | str | Sequence[Path | str] | Mapping[str, float]
FoldRunner = Callable[[RunConfig, Path, int, Path], FoldOutcome]
FoldCallback = Callable[[int, dict[str, float]], None]


# ------------------------------------------------------------------------------------------ fold runners


def train_fold(
    cfg: RunConfig, split_path: Path, fold: int, fold_dir: Path, progress: bool = False
) -> list[Path]:
    """The default method: supervised training of one fold (each `ensemble:` member), returning the model
    folders. A member whose training ended (metrics.json) is kept; one with a last checkpoint resumes."""
    # deferred: imports torch and lightning
    from medstudent.training.train import ensemble_members, run_dir_for, train

    members = ensemble_members(cfg)
    runs = []
    for m in members:
        run_dir = fold_dir if len(members) == 1 else run_dir_for(m, fold)
        rd = RunDir(run_dir)
        if rd.is_trained():
            runs.append(run_dir)
            continue
        resume = rd.last_ckpt.is_file()
        ckpts = rd.checkpoints
        remove_stale_temps(ckpts)  # a kill during the first checkpoint write leaves only a temp file
        if not resume and ckpts.is_dir() and any(ckpts.iterdir()):
            raise DataError(
                run_dir, "holds checkpoints but no last.ckpt to resume from; delete it to retrain"
            )
        runs.append(
            train(m, fold=fold, split_path=split_path, resume=resume, progress=progress, run_dir=run_dir)
        )
    return runs


def resolve_fold_runner(cfg: RunConfig, progress: bool = False) -> FoldRunner:
    """The fold runner for a configuration: Noisy Student for a config with a `selftrain:` section (the
    runner registered as FOLD_RUNNERS["selftrain"], same signature as `train_fold`), else `train_fold`."""
    if cfg.selftrain is not None:
        runner = FOLD_RUNNERS.get("selftrain", selftrain_fold)
        if runner is None:  # never fall back to plain training: its scores would pass for Noisy Student's
            raise ConfigError(None, "selftrain: no Noisy Student fold runner is registered for cv/tune")
        return runner
    return functools.partial(train_fold, progress=progress)


# Extra methods by name, e.g. FOLD_RUNNERS["selftrain"] = selftrain_fold (a module-level function, so that
# --fold-parallel can send it to worker processes).
FOLD_RUNNERS: dict[str, FoldRunner] = {}


# ---------------------------------------------------------------------------------------------- scoring


def open_task_dataset(cfg: RunConfig):
    """cfg's labeled data set (segmentation or classification), opened as `train` opens it."""
    d = cfg.data
    return open_dataset(
        d.root, label_map=d.label_map, empty_if_missing=d.empty_if_missing, group_regex=d.group_regex
    )


def score_models(
    models: Sequence[Path], cfg: RunConfig, ids: Sequence[str], maps_dir: Path | None = None
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predict `ids` of cfg's data set with the ensemble of `models` and score them (`evaluation.scoring`).

    Segmentation: per-image Dice/IoU/precision/recall after the run's post-processing (tuned when the first
    model has a postprocess.json; a vote ensemble is cut at a strict majority) and dice_raw at 0.5; metrics
    mean_dice, mean_dice_raw, pooled_dice, mean_iou. Classification: per-image class probabilities; metrics
    accuracy, macro_f1, auc_macro. Both add n_images. Probability maps go to `maps_dir` (segmentation).
    """
    # deferred: imports torch
    from medstudent.inference.predict import load_predictor, predict_probs

    if not models:
        raise DataError(None, "no models to score")
    predictors = [load_predictor(m, device="auto") for m in models]
    first = predictors[0]
    ds = open_task_dataset(cfg)
    index = {i: n for n, i in enumerate(ds.ids())}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(cfg.data.root, f"lacks {len(missing)} image(s) of the split, e.g. {missing[0]}")
    tta, ens = cfg.predict.tta, cfg.predict.ensemble
    seg = first.task == "segmentation"

    def save_map(image_id: str, prob: np.ndarray) -> None:
        if maps_dir is not None:
            _save_map(maps_dir, image_id, prob if prob.ndim == 2 else 1 - prob[0])

    rows = score_images(
        ds,
        [index[i] for i in ids],
        lambda img: predict_probs(predictors, img, tta=tta, ensemble=ens),
        post=for_ensemble(first.postprocess, ens) if seg else None,
        class_names=first.class_names,
        on_prob=save_map if seg else None,
    )
    summary = summarize_rows(rows, first.task, first.class_names)
    return pd.DataFrame(rows), result_metrics(summary, first.task)


def _save_map(folder: Path, image_id: str, prob: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    p8 = np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    with atomic_path(folder / f"{Path(image_id).name}.png", fsync=False) as tmp:
        Image.fromarray(p8).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------- one fold


def _fold_job(
    cfg_doc: dict, split_path: str, fold: int, root: str, runner: FoldRunner, threads: int | None = None
) -> dict[str, Any]:
    """Train and score one fold (in this process or a worker process). Returns models and metrics."""
    cfg = RunConfig.model_validate(cfg_doc)
    cfg.data.fold = fold
    cfg.data.split = split_path
    if threads and not cfg.train.threads:
        cfg.train.threads = threads
    fold_dir = RunDir.fold_in(root, fold).root
    start = time.time()
    outcome = runner(cfg, Path(split_path), fold, fold_dir)
    if not is_main():  # DDP ranks > 0 only help training; rank 0 scores and records the fold
        return {"fold": fold, "models": [], "metrics": {}, "minutes": 0.0}
    if isinstance(outcome, Mapping):
        models: list[Path] = []
        metrics = {str(k): float(v) for k, v in outcome.items()}
    else:
        models = [Path(outcome)] if isinstance(outcome, str | Path) else [Path(m) for m in outcome]
        _, val_ids, _ = fold_ids(load_split(split_path), fold)
        rd = RunDir(fold_dir)
        table, metrics = score_models(models, cfg, val_ids, rd.val_maps)
        table.insert(0, "fold", fold)
        fold_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(rd.oof) as tmp:
            table.to_csv(tmp, index=False)
    return {
        "fold": fold,
        "models": [str(m) for m in models],
        "metrics": metrics,
        "minutes": round((time.time() - start) / 60, 3),
    }


# ------------------------------------------------------------------------------------------------- CV


@dataclass
class CVResult:
    root: Path
    folds: pd.DataFrame  # long-format rows (dataset, method, fold, metrics...)
    summary: dict[str, Any]
    test: dict[str, float] | None = None


def _relative(path: str | Path, root: Path) -> str:
    p = Path(path)
    try:
        return os.path.relpath(p.resolve(), root.resolve())
    except ValueError:  # another drive (Windows)
        return str(p)


def run_cv(
    cfg: RunConfig,
    n_folds: int | None = None,
    split_path: str | Path | None = None,
    folds: Sequence[int] | None = None,
    fold_parallel: int = 1,
    test: bool = False,
    run_method: FoldRunner | None = None,
    on_fold: FoldCallback | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    dataset: str | None = None,
    method: str | None = None,
    root: str | Path | None = None,
) -> CVResult | None:
    """Cross-validate `cfg`: every fold (or `folds`) of the split, resuming from the manifest.

    `run_method` trains one fold (default: `resolve_fold_runner(cfg)`); with fold_parallel > 1 it must be a
    module-level function (it is sent to worker processes). `on_fold(k, metrics)` is called for every fold,
    finished ones included (from the manifest): in fold order when running sequentially, so a tuning study
    can report intermediate values and prune by raising; as folds finish with fold_parallel > 1.
    """
    root = Path(root) if root else Path(cfg.train.output_dir) / cfg.train.name
    say = log or (lambda _msg: None)
    with folder_lock(root):
        split_file = resolve_split(cfg, root, split_path, n_folds)
        split = load_split(split_file)
        n = len(split["folds"])
        wanted = sorted(set(folds)) if folds is not None else list(range(n))
        if bad := [k for k in wanted if not 0 <= k < n]:
            raise ConfigError(split_file, f"has no fold {bad[0]} ({n} fold(s))")
        manifest = load_manifest(root, cfg)
        manifest["split"] = split_file.name
        manifest["n_folds"] = n
        task = split.get("task") or cfg.data.task
        manifest.setdefault("primary_metric", primary_metric(task))
        save_manifest(root, manifest)
        runner = run_method or resolve_fold_runner(cfg, progress=progress and fold_parallel <= 1)
        cfg_doc = cfg.model_dump(mode="json")

        def record(result: dict[str, Any]) -> None:
            k = result["fold"]
            manifest["folds"][str(k)] = {
                "status": "done",
                "models": [_relative(m, root) for m in result["models"]],
                "metrics": result["metrics"],
                "minutes": result["minutes"],
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            save_manifest(root, manifest)
            say(f"fold {k}: " + _metrics_line(result["metrics"]) + f" ({result['minutes']:.1f} min)")

        def done(k: int) -> bool:
            return manifest["folds"].get(str(k), {}).get("status") == "done"

        todo = [k for k in wanted if not done(k)]
        if len(todo) < len(wanted):
            say(f"skipping finished fold(s) {[k for k in wanted if done(k)]} (from {MANIFEST})")
        jobs = [(cfg_doc, str(split_file), k, str(root), runner) for k in todo]
        if fold_parallel > 1 and len(jobs) > 1:
            for k in wanted:
                if on_fold and done(k):
                    on_fold(k, manifest["folds"][str(k)]["metrics"])
            errors: list[BaseException] = []
            for k, result, err in run_parallel(_fold_job, jobs, min(fold_parallel, len(jobs))):
                if err is not None:
                    say(f"fold {k} failed: {err}")
                    errors.append(err)
                    continue
                assert result is not None
                record(result)
                if on_fold:
                    on_fold(k, result["metrics"])
            if errors:
                raise errors[0]
        else:
            for k in wanted:
                if not done(k):
                    record(_fold_job(cfg_doc, str(split_file), k, str(root), runner))
                if on_fold:
                    on_fold(k, manifest["folds"][str(k)]["metrics"])
        if not is_main():
            return None
        dataset = dataset or Path(cfg.data.root).resolve().name
        method = method or cfg.train.name
        return _aggregate(root, manifest, wanted, cfg, split, dataset, method, test, say)


def _metrics_line(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("n_"))


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    """mean, sd (ddof 1; None for one value) and the values of each metric."""
    out = {}
    for name, vals in values.items():
        arr = np.asarray(vals, float)
        sd = float(arr.std(ddof=1)) if arr.size > 1 else None
        out[name] = {"mean": float(arr.mean()), "sd": sd, "values": arr.tolist()}
    return out


def _aggregate(
    root: Path,
    manifest: dict,
    wanted: list[int],
    cfg: RunConfig,
    split: dict,
    dataset: str,
    method: str,
    test: bool,
    say: Callable[[str], None],
) -> CVResult:
    rows = []
    per_metric: dict[str, list[float]] = {}
    for k in wanted:
        metrics = manifest["folds"][str(k)]["metrics"]
        rows.append({"dataset": dataset, "method": method, "fold": k, **metrics})
        for name, v in metrics.items():
            if not name.startswith("n_") and v is not None and not math.isnan(float(v)):
                per_metric.setdefault(name, []).append(float(v))
    table = write_results(rows, root / "results.csv")
    oof = [RunDir.fold_in(root, k).oof for k in wanted]
    if any(p.is_file() for p in oof):
        with atomic_path(RunDir(root).oof) as tmp:
            pd.concat([pd.read_csv(p) for p in oof if p.is_file()], ignore_index=True).to_csv(
                tmp, index=False
            )
    summary = {
        "dataset": dataset,
        "method": method,
        "folds": wanted,
        "n_folds": len(split["folds"]),
        "primary_metric": manifest["primary_metric"],
        "metrics": summarize(per_metric),
    }
    write_text_atomic(root / "cv_summary.json", json.dumps(summary, indent=1))
    test_metrics = None
    if test:
        test_ids = list(split["test"])
        models = [root / m for k in wanted for m in manifest["folds"][str(k)]["models"]]
        if not test_ids:
            say("no test set in the split: nothing to ensemble")
        elif not models:
            say("the fold runner returned no models: no test-set ensemble")
        else:
            say(f"test set: ensemble of {len(models)} fold model(s) on {len(test_ids)} image(s)")
            tcfg = cfg.model_copy(deep=True)
            pred_table, test_metrics = score_models(models, tcfg, test_ids, root / "test" / "maps")
            (root / "test").mkdir(parents=True, exist_ok=True)
            with atomic_path(root / "test" / "predictions.csv") as tmp:
                pred_table.to_csv(tmp, index=False)
            write_text_atomic(RunDir(root / "test").metrics, json.dumps(test_metrics, indent=1))
            write_results(
                [{"dataset": dataset, "method": method, "fold": "test", **test_metrics}],
                root / "test_results.csv",
            )
    return CVResult(root, table, summary, test_metrics)
