"""Benchmark: the stas_cpu recipe on ../shared/data/stas (64 images held out), as issue 3 asks.

Trains fold 0 of a split with 64 test images (validation fold for checkpoint choice and post-processing
tuning), then reports mean Dice on the 64 held-out images with and without TTA and post-processing, training
minutes, inference seconds per full-size image and peak RAM. Writes bench_out/stas_cpu/result.json.

    .venv/bin/python benchmarks/stas_cpu.py [--minutes 85] [--folds 5] [--out DIR] [--set key=value ...]
        [--d4] [--train-all]

--d4 also scores d4 TTA, and d4 at the preset's `predict.tta_scales` when it has more than one scale (the
other rows use one scale, so they stay comparable with earlier runs).

--train-all trains on all 256 non-test images (fold "all": no validation, the last weights are the model,
the configured post-processing is used untuned).

The held-out 64 images do not depend on --folds (the test part is drawn first, with the same seed).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stas"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=85)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "stas_cpu")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--folds", type=int, default=5, help="folds of the 256 non-test images (10: 230 train)")
    ap.add_argument("--d4", action="store_true", help="also score d4 TTA (8 passes per image)")
    ap.add_argument("--train-all", action="store_true", help="fold all: train on every non-test image")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from medstudent.config import load_config
    from medstudent.data.layouts import open_segmentation
    from medstudent.data.splits import make_split, save_split
    from medstudent.evaluation.postprocess_tuning import tune_run
    from medstudent.evaluation.scoring import seg_row, seg_summary
    from medstudent.inference.predict import load_predictor, predict_seg_probs
    from medstudent.rundir import RunDir
    from medstudent.training.train import train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ds = open_segmentation(DATA)
    split_path = RunDir(out).split
    if not split_path.is_file():
        save_split(make_split(ds, test_fraction=64, n_folds=args.folds, seed=0), split_path)
    cfg = load_config(
        "stas_cpu",
        [
            f"data.root={DATA}",
            f"data.split={split_path}",
            f"train.output_dir={out}",
            f"train.max_minutes={args.minutes}",
            *args.set,
        ],
    )
    fold = "all" if args.train_all else 0
    cfg.data.fold = fold  # so result.json's config names the fold that was trained
    rd = RunDir.of(out, cfg.train.name, fold)
    run = rd.root
    if not rd.metrics.is_file() or args.resume:
        if run.exists() and not args.resume:
            shutil.rmtree(run)
        t0 = time.time()
        train(cfg, fold=fold, resume=args.resume, progress=False)
        print(f"trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    if args.train_all:
        tune = {"best": None, "dice_plain": None, "dice_tuned": None}  # no validation images to tune on
    else:
        tune = tune_run(run, tta="flip")
        print(
            f"post-processing tuned on validation: {tune['dice_plain']:.4f} -> {tune['dice_tuned']:.4f}",
            flush=True,
        )
    pred = load_predictor(run)
    split = json.loads(split_path.read_text())
    index = {i: k for k, i in enumerate(ds.ids())}
    post = pred.postprocess
    scales = list(cfg.predict.tta_scales)  # the preset's (also for runs trained before the option existed)
    multi = args.d4 and scales != [1.0]
    gts, p_none, p_flip, p_d4, p_ms, secs, secs_ms = [], [], [], [], [], [], []
    for tid in split["test"]:
        img, gt = ds.load(index[tid])
        gts.append(gt > 0)
        t = time.perf_counter()
        p_none.append(predict_seg_probs(pred, img, "none", precision="auto", scales=[1.0]))
        secs.append(time.perf_counter() - t)
        p_flip.append(predict_seg_probs(pred, img, "flip", precision="auto", scales=[1.0]))
        if args.d4:
            p_d4.append(predict_seg_probs(pred, img, "d4", precision="auto", scales=[1.0]))
        if multi:
            t = time.perf_counter()
            p_ms.append(predict_seg_probs(pred, img, "d4", precision="auto", scales=scales))
            secs_ms.append(time.perf_counter() - t)

    def scores(probs: list[np.ndarray]) -> dict:
        """The one scorer's summary: mean_dice after the run's post-processing, mean_dice_raw at 0.5."""
        rows = [
            seg_row(str(k), g, prob=p, post=post)[0] for k, (p, g) in enumerate(zip(probs, gts, strict=True))
        ]
        return {**seg_summary(rows, n_boot=2000), "per_image_dice": [float(r["dice"]) for r in rows]}

    s_none, s_flip = scores(p_none), scores(p_flip)
    s_d4 = scores(p_d4) if args.d4 else {}
    s_ms = scores(p_ms) if multi else {}
    res = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "data": f"{DATA} (fold {fold} of a {args.folds}-fold split of 256 train, 64 held out)",
        "train": json.loads(rd.metrics.read_text()),
        "tuned_postprocess": tune["best"],
        "val_dice_plain": tune["dice_plain"],
        "val_dice_tuned": tune["dice_tuned"],
        "val_dice_configured": tune.get("dice_configured"),
        "val_dice_held_out": tune.get("dice_held_out"),
        "tuned_adopted": tune.get("adopted"),
        "test_mean_dice": {
            "no TTA, threshold 0.5": s_none["mean_dice_raw"],
            "flip TTA, threshold 0.5": s_flip["mean_dice_raw"],
            "no TTA + post-processing": s_none["mean_dice"],
            "flip TTA + post-processing": s_flip["mean_dice"],
        },
        **(
            {
                "test_mean_dice_d4_tta": s_d4["mean_dice_raw"],
                "test_mean_dice_d4_tta_post": s_d4["mean_dice"],
                "test_mean_dice_d4_tta_post_ci95": s_d4["mean_dice_ci95"],
                "test_per_image_dice_d4_tta_post": s_d4["per_image_dice"],
            }
            if args.d4
            else {}
        ),
        **(
            {
                "tta_scales": scales,
                "test_mean_dice_d4_scales": s_ms["mean_dice_raw"],
                "test_mean_dice_d4_scales_post": s_ms["mean_dice"],
                "test_mean_dice_d4_scales_post_ci95": s_ms["mean_dice_ci95"],
                "test_per_image_dice_d4_scales_post": s_ms["per_image_dice"],
                "test_pooled_dice_d4_scales_post": s_ms["pooled_dice"],
                "inference_s_per_image_d4_scales": float(np.mean(secs_ms)),
            }
            if multi
            else {}
        ),
        "test_pooled_dice_flip_post": s_flip["pooled_dice"],
        "inference_s_per_image_no_tta_auto_precision": float(np.mean(secs)),
        "peak_ram_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
