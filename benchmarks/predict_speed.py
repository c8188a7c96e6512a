"""Benchmark: Dice vs seconds per image of STAS prediction (issue 22: default prediction within 2 s).

    .venv/bin/python benchmarks/predict_speed.py --run RUN --onnx EXPORT [--images 32] [--budget 2.0]

RUN: a stas_cpu run whose split.json holds out 64 images; EXPORT: its `medstudent export --int8 dynamic`
folder. On the first `--images` held-out images (full size, 1716x942) it times every combination of engine
(torch with bf16 where native; ONNX Runtime int8), TTA set (none, flip, d4) and scales (1x; 1x + 1.25x), from
the decoded image to the post-processed mask, and scores the masks (mean Dice, empty/empty = 1). Then the
default `predict` path with a time budget (`core.workflow.predict_images(..., budget_seconds=B)`: the plan
measured on the first image, outputs written) is timed end to end per image for both engines. Writes
bench_out/predict_speed/result.json and benchmarks/figures/dice_vs_seconds.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stas"
OUT = ROOT / "bench_out" / "predict_speed"
FIGURE = ROOT / "benchmarks" / "figures" / "dice_vs_seconds.png"
TTAS = ("none", "flip", "d4")
SCALES = ([1.0], [1.0, 1.25])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from PIL import Image

    from medstudent.core.inferer import predict_probs
    from medstudent.core.postprocess import postprocess
    from medstudent.core.workflow import predict_images
    from medstudent.data.io import read_mask
    from medstudent.data.layouts import open_segmentation
    from medstudent.evaluation.scoring import seg_row, seg_summary
    from medstudent.inference.engine import load_engine
    from medstudent.runner import OnnxPipeline

    ds = open_segmentation(DATA)
    index = {i: k for k, i in enumerate(ds.ids())}
    test = json.loads((args.run / "split.json").read_text())["test"][: args.images]
    items = [ds.load(index[t]) for t in test]
    engines = {
        "torch": load_engine([args.run], device="cpu", precision="auto"),
        "onnx-int8": OnnxPipeline(args.onnx, int8=True),
    }
    rows = []
    for name, engine in engines.items():
        post = engine.spec.postprocess
        predict_probs(engine, items[0][0], tta="none", scales=[1.0])  # warm-up
        for tta in TTAS:
            for scales in SCALES:
                secs, masks = [], []
                for img, _ in items:
                    t = time.perf_counter()
                    masks.append(postprocess(predict_probs(engine, img, tta=tta, scales=scales), post))
                    secs.append(time.perf_counter() - t)
                pairs = enumerate(zip(masks, items, strict=True))
                scored = [seg_row(str(k), gt > 0, mask=m)[0] for k, (m, (_, gt)) in pairs]
                s = seg_summary(scored, n_boot=1000)
                row = {
                    "engine": name,
                    "precision": engine.precision,
                    "tta": tta,
                    "scales": scales,
                    "seconds_per_image": float(np.mean(secs)),
                    "mean_dice": s["mean_dice"],
                    "ci": s.get("mean_dice_ci95"),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    defaults = []
    for name, engine in engines.items():
        folder = OUT / f"images_{args.images}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for t, (img, _) in zip(test, items, strict=True):
                Image.fromarray(img).save(folder / f"{Path(t).name}.png")
        out = OUT / f"default_{name}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        summary = predict_images(engine, folder, out, budget_seconds=args.budget, save_overlays=True)
        per_image = (time.perf_counter() - t) / len(items)
        scored = [
            seg_row(str(k), gt > 0, mask=read_mask(out / "masks" / f"{Path(t).name}.png") > 0)[0]
            for k, (t, (_, gt)) in enumerate(zip(test, items, strict=True))
        ]
        s = seg_summary(scored, n_boot=1000)
        defaults.append(
            {
                "engine": name,
                "budget_seconds": args.budget,
                "plan": summary["plan"],
                "tta": summary["tta"],
                "tta_scales": summary["tta_scales"],
                "seconds_per_image_end_to_end": per_image,
                "mean_dice": s["mean_dice"],
                "ci": s.get("mean_dice_ci95"),
            }
        )
        print(json.dumps(defaults[-1]), flush=True)
    result = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "run": str(args.run),
        "images": len(items),
        "rows": rows,
        "defaults": defaults,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=1))
    plot(rows, defaults)


def plot(rows: list[dict], defaults: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, marker in (("torch", "o"), ("onnx-int8", "s")):
        mine = [r for r in rows if r["engine"] == name]
        xs, ys = [r["seconds_per_image"] for r in mine], [r["mean_dice"] for r in mine]
        ax.scatter(xs, ys, marker=marker, label=name)
        for r in mine:
            label = f"{r['tta']}{'x2' if len(r['scales']) > 1 else ''}"
            ax.annotate(label, (r["seconds_per_image"], r["mean_dice"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    for d in defaults:
        ax.scatter([d["seconds_per_image_end_to_end"]], [d["mean_dice"]], marker="*", s=120,
                   label=f"default predict, {d['engine']} (end to end)")  # fmt: skip
    ax.axvline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("seconds per 1716x942 image (2 CPU cores)")
    ax.set_ylabel("mean Dice (held-out shared STAS)")
    ax.set_title("STAS prediction: Dice vs time (TTA set; x2 = scales 1 and 1.25)")
    ax.legend(fontsize=7)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)


if __name__ == "__main__":
    main()
