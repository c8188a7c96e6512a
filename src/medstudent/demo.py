"""`medstudent demo` / `make demo`: the whole pipeline on synthetic data, sized for a 2-core CPU.

STAS: synthesise a small labelme set -> train the CPU recipe briefly -> tune post-processing on validation ->
predict the held-out images with flip TTA + post-processing -> evaluate against the truth, beside the
trivial all-empty / all-foreground baselines -> HTML page with overlays.
OCT: synthesise OCT2017 folders -> train the CPU classifier -> predict -> per-class clinical metrics.
"""

from __future__ import annotations

import html
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.console import Console
from rich.table import Table

from medstudent.config import load_config
from medstudent.core.folder import collect_images, predict_folder
from medstudent.core.overlay import PREDICTION_COLOR, TRUTH_COLOR, overlay
from medstudent.data.io import read_image, read_mask
from medstudent.data.layouts import open_classification, open_segmentation
from medstudent.data.splits import make_split, save_split, split_from_folders
from medstudent.data.synth import synth_oct, synth_stas
from medstudent.errors import DataError
from medstudent.evaluation.evaluate import evaluate_classification, evaluate_segmentation, per_class_table
from medstudent.evaluation.metrics import mean_dice
from medstudent.evaluation.postprocess_tuning import tune_run
from medstudent.inference.predict import load_predictor, predict_probs
from medstudent.rundir import RunDir
from medstudent.training.train import train


def run_demo(
    task: str,
    out: Path,
    minutes: float | None = None,
    seed: int = 0,
    console: Console | None = None,
    small: bool = False,
) -> dict:
    console = console or Console()
    warnings.filterwarnings("ignore")
    if task == "stas":
        return _demo_stas(Path(out), minutes, seed, console, small)
    if task == "oct":
        return _demo_oct(Path(out), minutes, seed, console, small)

    raise DataError(None, f"demo: unknown task '{task}' (stas or oct)")


def _fresh(path: Path) -> None:

    if path.exists():
        shutil.rmtree(path)


def _demo_stas(out: Path, minutes: float | None, seed: int, console: Console, small: bool) -> dict:

    t0 = time.time()
    n, w, h = (16, 192, 128) if small else (56, 384, 224)
    data = out / "data"
    _fresh(out / "runs")
    console.rule("[bold]1. synthesise STAS data")
    synth_stas(data, n=n, seed=seed, width=w, height=h, n_unlabeled=0)
    ds = open_segmentation(data)
    split = make_split(ds, test_fraction=0.25, n_folds=4, seed=seed)
    save_split(split, out / "split.json")
    console.print(
        f"{len(ds)} images {w}x{h}: {len(split['folds'][0]['train'])} train, "
        f"{len(split['folds'][0]['val'])} validation, {len(split['test'])} test"
    )
    console.rule("[bold]2. train the CPU recipe (FPN + bundled EfficientNet-Lite0)")
    cfg = load_config(
        "stas_cpu",
        [
            f"data.root={data}",
            f"data.split={out / 'split.json'}",
            "augment.scale=1.0",
            "augment.crop=null",
            "augment.rot90=0.0",
            "augment.autoaugment=0.2",
            f"train.output_dir={out / 'runs'}",
            "train.name=demo",
            f"train.epochs={4 if small else 24}",
            f"train.max_minutes={minutes or (2 if small else 6)}",
            "train.fit_epochs_to_time=false",  # the demo's epochs do not depend on the machine's speed
            "train.batch_size=4",
            f"train.seed={seed}",
            "optim.lr=0.002",
            "postprocess.min_area=30",
        ],
    )
    run = train(cfg, progress=not small)
    metrics = json.loads(RunDir(run).metrics.read_text())
    console.print(
        f"trained {metrics['epochs']} epochs in {metrics['train_minutes']:.1f} min, best validation "
        f"Dice {metrics['best_val_metric']:.3f}"
    )
    console.rule("[bold]3. tune post-processing on validation, predict the test images with flip TTA")
    tune = tune_run(
        run, tta="flip", grid=None if not small else {"threshold": [0.4, 0.5], "min_area": [0, 30]}
    )
    verdict = "adopted" if tune["adopted"] else "not adopted, configured setting kept"
    console.print(
        f"validation mean Dice {tune['dice_configured']:.3f} (configured post-processing) -> "
        f"{tune['dice_tuned']:.3f} (best of the grid), {tune['dice_held_out']:.3f} scored leave-one-out: "
        f"{verdict} ({tune['best']})"
    )
    pred = load_predictor(run)
    test_dir = out / "test_images"
    _fresh(test_dir)
    test_dir.mkdir(parents=True)
    index = {i: k for k, i in enumerate(ds.ids())}
    gt_dir = out / "test_masks"
    _fresh(gt_dir)
    for tid in split["test"]:
        it = ds.items[index[tid]]
        Image.open(it.image).save(test_dir / it.image.name)
        img, mask = ds.load(index[tid])
        gt_dir.mkdir(exist_ok=True)
        Image.fromarray(mask * 255).save(gt_dir / f"{it.image.stem}.png")
    images = sorted(test_dir.glob("*.jpg"))
    results = {}
    for name, tta, post in (
        ("model, no TTA, no post-processing", "none", None),
        ("model + flip TTA + tuned post-processing", "flip", pred.postprocess),
    ):
        dest = out / ("pred_plain" if post is None else "pred")
        _fresh(dest)
        predict_folder(
            lambda im, tta=tta: predict_probs([pred], im, tta=tta),
            "segmentation",
            images,
            dest,
            pred.class_names,
            post=post,
            save_labelme=post is not None,
            save_probs=post is not None,
        )
        results[name] = evaluate_segmentation(dest, gt_dir, dest / "report")
    gts = [read_mask(p) > 0 for p in sorted(gt_dir.glob("*.png"))]
    results["baseline: all-empty masks"] = {"mean_dice": mean_dice([np.zeros_like(g) for g in gts], gts)}
    results["baseline: all-foreground masks"] = {"mean_dice": mean_dice([np.ones_like(g) for g in gts], gts)}
    table = Table(title=f"STAS demo: mean Dice on {len(gts)} held-out synthetic images", title_justify="left")
    table.add_column("predictor")
    table.add_column("mean Dice", justify="right")
    table.add_column("pooled Dice", justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['mean_dice']:.3f}", f"{r['pooled_dice']:.3f}" if "pooled_dice" in r else "-")
    console.print(table)
    page = _stas_html(out, images, gt_dir, out / "pred", results, read_image, read_mask, overlay)
    console.print(f"HTML report: {page}   ({(time.time() - t0) / 60:.1f} min in all)")
    summary = {"results": results, "train": metrics, "tune": tune, "html": str(page)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _stas_html(
    out: Path, images, gt_dir: Path, pred_dir: Path, results: dict, read_image, read_mask, overlay
) -> Path:

    per = pd.read_csv(pred_dir / "report" / "per_image.csv").set_index("id")
    (out / "html").mkdir(exist_ok=True)
    rows = []
    for p in images:
        img = read_image(p)
        gt = read_mask(gt_dir / f"{p.stem}.png")
        pm = read_mask(pred_dir / "masks" / f"{p.stem}.png")
        Image.fromarray(overlay(img, gt, color=TRUTH_COLOR)).save(out / "html" / f"{p.stem}_gt.png")
        Image.fromarray(overlay(img, pm, color=PREDICTION_COLOR)).save(out / "html" / f"{p.stem}_pred.png")
        d = per.loc[p.stem, "dice"] if p.stem in per.index else float("nan")
        rows.append(
            f"<tr><td>{html.escape(p.stem)}</td><td>{d:.3f}</td>"
            f"<td><img src='html/{p.stem}_gt.png'></td><td><img src='html/{p.stem}_pred.png'></td></tr>"
        )
    summary = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['mean_dice']:.3f}</td></tr>" for k, v in results.items()
    )
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>medstudent STAS demo</title><style>"
        "body{font-family:sans-serif;margin:2em} td{padding:4px 8px;vertical-align:top} img{max-width:420px}"
        "</style></head><body><h1>medstudent STAS demo</h1><h2>Mean Dice on held-out images</h2>"
        f"<table border=1>{summary}</table><h2>Test images</h2><p>green: ground truth, yellow: prediction "
        "(flip TTA + tuned post-processing); labelme JSON of predictions in pred/labelme/</p>"
        "<table border=1><tr><th>image</th><th>Dice</th><th>truth</th><th>prediction</th></tr>"
        f"{''.join(rows)}"
        "</table></body></html>"
    )
    return page


def _demo_oct(out: Path, minutes: float | None, seed: int, console: Console, small: bool) -> dict:

    t0 = time.time()
    data = out / "data"
    _fresh(out / "runs")
    console.rule("[bold]1. synthesise OCT data (OCT2017 layout)")
    synth_oct(data, n=16 if small else 60, seed=seed, size=128)
    ds = open_classification(data)
    split = split_from_folders(ds)
    save_split(split, out / "split.json")
    console.print(
        f"{len(ds)} B-scans, classes {ds.class_names}: {len(split['folds'][0]['train'])} train, "
        f"{len(split['folds'][0]['val'])} validation, {len(split['test'])} test"
    )
    console.rule("[bold]2. train the CPU classifier (bundled EfficientNet-Lite0)")
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={data}",
            f"data.split={out / 'split.json'}",
            "augment.image_size=128",
            f"train.output_dir={out / 'runs'}",
            "train.name=demo_oct",
            f"train.epochs={2 if small else 8}",
            f"train.max_minutes={minutes or (1.5 if small else 3.5)}",
            f"train.seed={seed}",
        ],
    )
    run = train(cfg, progress=not small)
    metrics = json.loads(RunDir(run).metrics.read_text())
    console.print(
        f"trained {metrics['epochs']} epochs in {metrics['train_minutes']:.1f} min, best validation "
        f"accuracy {metrics['best_val_metric']:.3f}"
    )
    console.rule("[bold]3. predict the test folder with flip TTA and evaluate")
    pred = load_predictor(run)
    dest = out / "pred"
    _fresh(dest)
    files = collect_images(data / "test")
    predict_folder(
        lambda im: predict_probs([pred], im, tta="flip"),
        "classification",
        files,
        dest,
        pred.class_names,
        root=data,
    )
    m = evaluate_classification(dest, data / "test", dest / "report")
    table = per_class_table(m, f"OCT demo: {m['n']} held-out synthetic B-scans (chance = 0.25)")
    console.print(table)
    console.print(
        f"accuracy {m['accuracy']:.3f} (95% CI {m['accuracy_ci95'][0]:.3f}-{m['accuracy_ci95'][1]:.3f}),"
        f" macro-F1 {m['macro_f1']:.3f}; report in {dest / 'report'} "
        f"({(time.time() - t0) / 60:.1f} min in all)"
    )
    summary = {"metrics": m, "train": metrics}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
