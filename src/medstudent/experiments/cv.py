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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medstudent.config import RunConfig
from medstudent.data.splits import fold_ids, load_split, save_split
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import primary_metric, write_results

MANIFEST = "cv_manifest.json"
MANIFEST_FORMAT = "medstudent-cv/1"
# Settings that change how a fold runs, not what it computes: they may differ between a run and its resume.
RUNTIME_KEYS = (
    "data.fold",
    "data.split",
    "data.num_workers",
    "train.threads",
    "train.devices",
    "train.num_nodes",
    "train.strategy",
    "train.accelerator",
    "search",
)

FoldOutcome = Path | str | Sequence[Path | str] | Mapping[str, float]
FoldRunner = Callable[[RunConfig, Path, int, Path], FoldOutcome]
FoldCallback = Callable[[int, dict[str, float]], None]


# ------------------------------------------------------------------------------------------ fold runners


def train_fold(
    cfg: RunConfig, split_path: Path, fold: int, fold_dir: Path, progress: bool = False
) -> list[Path]:
    """The default method: supervised training of one fold (each `ensemble:` member), returning the model
    folders. A member whose training ended (metrics.json) is kept; one with a last checkpoint resumes."""
    from medstudent.training.train import ensemble_members, run_dir_for, train

    members = ensemble_members(cfg)
    runs = []
    for m in members:
        run_dir = fold_dir if len(members) == 1 else run_dir_for(m, fold)
        ckpts = run_dir / "checkpoints"
        if (run_dir / "metrics.json").is_file() and (ckpts / "best.ckpt").is_file():
            runs.append(run_dir)
            continue
        resume = (ckpts / "last.ckpt").is_file()
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
        from medstudent.selftrain.loop import selftrain_fold

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
    from medstudent.data.layouts import open_dataset

    d = cfg.data
    return open_dataset(
        d.root, label_map=d.label_map, empty_if_missing=d.empty_if_missing, group_regex=d.group_regex
    )


def score_models(
    models: Sequence[Path], cfg: RunConfig, ids: Sequence[str], maps_dir: Path | None = None
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predict `ids` of cfg's data set with the ensemble of `models` and score them.

    Segmentation: per-image Dice/IoU/precision/recall after the run's post-processing; metrics mean_dice,
    pooled_dice, mean_iou. Classification: per-image class probabilities; metrics accuracy, macro_f1,
    auc_macro. Both add n_images. Probability maps go to `maps_dir` (segmentation) when given.
    """
    from medstudent.evaluation.metrics import classification_metrics, seg_scores
    from medstudent.inference.postprocess import postprocess
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
    rows: list[dict[str, Any]] = []
    if first.task == "segmentation":
        post = first.postprocess
        if ens == "vote":
            post = post.model_copy(update={"threshold": 0.5, "hysteresis": False})  # strict majority
        tp = fp = fn = 0
        for i in ids:
            img, gt = ds.load(index[i])
            prob = predict_probs(predictors, img, tta=tta, ensemble=ens)
            mask = postprocess(prob, post) if prob.ndim == 2 else prob.argmax(0)
            s = seg_scores(mask, gt > 0)
            tp, fp, fn = tp + s["tp"], fp + s["fp"], fn + s["fn"]
            keys = ("dice", "iou", "precision", "recall", "gt_px", "pred_px")
            rows.append({"id": i, **{k: s[k] for k in keys}})
            if maps_dir is not None:
                _save_map(maps_dir, i, prob if prob.ndim == 2 else 1 - prob[0])
        table = pd.DataFrame(rows)
        den = 2 * tp + fp + fn
        metrics = {
            "mean_dice": float(table["dice"].mean()),
            "pooled_dice": 1.0 if den == 0 else 2 * tp / den,
            "mean_iou": float(table["iou"].mean()),
            "n_images": len(ids),
        }
        return table, metrics
    names = first.class_names
    probs, labels = [], []
    for i in ids:
        p = predict_probs(predictors, ds.load_image(index[i]), tta=tta, ensemble=ens)
        probs.append(p)
        labels.append(ds.items[index[i]].label)
        rows.append(
            {
                "id": i,
                "label": ds.class_names[labels[-1]],
                **{f"p_{c}": float(v) for c, v in zip(names, p, strict=True)},
                "predicted": names[int(np.argmax(p))],
            }
        )
    m = classification_metrics(np.array(labels), np.stack(probs), names, n_boot=0)
    metrics = {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "auc_macro": m["auc_macro"],
        "n_images": len(ids),
    }
    return pd.DataFrame(rows), metrics


def _save_map(folder: Path, image_id: str, prob: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    p8 = np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(p8).save(folder / f"{Path(image_id).name}.png")


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
    fold_dir = Path(root) / f"fold_{fold}"
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
        table, metrics = score_models(models, cfg, val_ids, fold_dir / "predictions" / "val")
        table.insert(0, "fold", fold)
        fold_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(fold_dir / "oof.csv", index=False)
    return {
        "fold": fold,
        "models": [str(m) for m in models],
        "metrics": metrics,
        "minutes": round((time.time() - start) / 60, 3),
    }


# -------------------------------------------------------------------------------------- split, manifest


def _split_content(split: dict) -> tuple:
    return (split["test"], split["folds"])


def new_split(cfg: RunConfig, n_folds: int | None = None) -> dict:
    """A split of cfg's data set made as `medstudent train` makes one (without importing the trainer)."""
    from medstudent.data.layouts import open_labeled
    from medstudent.data.splits import make_split

    d = cfg.data
    ds = open_labeled(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_split(ds, d.test_fraction, n_folds or d.n_folds, d.split_seed)


def resolve_split(cfg: RunConfig, root: Path, split_path: str | Path | None, n_folds: int | None) -> Path:
    """The split of this CV folder, <root>/split.json: copied from `split_path` / data.split, kept from an
    earlier run, or made (with `n_folds` folds) from the data set. Returns its path."""
    target = root / "split.json"
    src = Path(split_path) if split_path else (Path(cfg.data.split) if cfg.data.split else None)
    if src is not None and src.resolve() != target.resolve():
        split = load_split(src)
        if target.is_file() and _split_content(load_split(target)) != _split_content(split):
            raise DataError(target, f"differs from {src}: this CV folder was made with another split")
    elif target.is_file():
        src, split = target, load_split(target)
    else:
        split, src = new_split(cfg, n_folds), None
    if n_folds is not None and len(split["folds"]) != n_folds:
        raise ConfigError(src or target, f"has {len(split['folds'])} fold(s), but {n_folds} were asked for")
    if is_main() and (src is None or src.resolve() != target.resolve()):
        save_split(split, target)
    return target


def _fingerprint(cfg: RunConfig) -> dict:
    doc = cfg.model_dump(mode="json")
    for key in RUNTIME_KEYS:
        *path, last = key.split(".")
        node = doc
        for p in path:
            node = node.get(p) or {}
        node.pop(last, None)
    return doc


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def load_manifest(root: Path, cfg: RunConfig | None = None) -> dict:
    """The CV manifest of `root` (a new one when absent); with `cfg`, check it was made for that config."""
    path = root / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "config": _fingerprint(cfg) if cfg else None, "folds": {}}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e}); delete it to start the CV over") from e
    if doc.get("format") != MANIFEST_FORMAT:
        raise DataError(path, f"not a medstudent CV manifest (format {doc.get('format')!r})")
    if cfg is not None and doc.get("config") is not None:
        changed = _diff(doc["config"], _fingerprint(cfg))
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise ConfigError(
                path,
                f"was written for another configuration ({', '.join(changed[:5])}{more} differ); "
                "choose another train.name, or delete the folder to start over",
            )
    return doc


def _save_manifest(root: Path, doc: dict) -> None:
    if not is_main():
        return
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(root / MANIFEST)


@contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """One CV process per folder: a second one fails at once instead of training the same folds."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    if not is_main():  # DDP ranks > 0 rerun the command beside rank 0, which holds the lock
        yield
        return
    with open(root / ".cv.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(root, "another `medstudent cv` is working in this folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ parallelism


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use (as CUDA_VISIBLE_DEVICES names them), [] without CUDA."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA is no GPU
        n = 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def _init_worker(slots: Any) -> None:
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch touches CUDA in this fresh process


def _run_parallel(
    jobs: list[tuple], n: int
) -> Iterator[tuple[int, dict[str, Any] | None, BaseException | None]]:
    """Run fold jobs in `n` spawned processes, one GPU each (round robin) when GPUs are present."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    gpus = visible_gpus()
    slots = ctx.Queue()
    for i in range(n):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // n)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(slots,)) as pool:
        futures = {pool.submit(_fold_job, *job, threads): job[2] for job in jobs}
        for fut in as_completed(futures):
            err = fut.exception()
            yield futures[fut], (None if err else fut.result()), err


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
        manifest["split"] = "split.json"
        manifest["n_folds"] = n
        task = split.get("task") or cfg.data.task
        manifest.setdefault("primary_metric", primary_metric(task))
        _save_manifest(root, manifest)
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
            _save_manifest(root, manifest)
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
            for k, result, err in _run_parallel(jobs, min(fold_parallel, len(jobs))):
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
    oof = [root / f"fold_{k}" / "oof.csv" for k in wanted]
    if any(p.is_file() for p in oof):
        pd.concat([pd.read_csv(p) for p in oof if p.is_file()], ignore_index=True).to_csv(
            root / "oof.csv", index=False
        )
    summary = {
        "dataset": dataset,
        "method": method,
        "folds": wanted,
        "n_folds": len(split["folds"]),
        "primary_metric": manifest["primary_metric"],
        "metrics": summarize(per_metric),
    }
    (root / "cv_summary.json").write_text(json.dumps(summary, indent=1))
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
            pred_table.to_csv(root / "test" / "predictions.csv", index=False)
            (root / "test" / "metrics.json").write_text(json.dumps(test_metrics, indent=1))
            write_results(
                [{"dataset": dataset, "method": method, "fold": "test", **test_metrics}],
                root / "test_results.csv",
            )
    return CVResult(root, table, summary, test_metrics)
