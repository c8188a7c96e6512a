"""Benchmark: does `oct_cpu` hold on images from another source? (issue 22, item 3)

The shared OCT images come from two sources with no patient in common: `train/` (80 images of 42 patients,
resized to 320x320 RGB by their publisher) and `val/` (32 of 25 patients, native greyscale, 512 or 768 x 496).
Protocols, each run under named recipe variants and seeds:
- `rgb2native`: train on the 80, test on the 32;
- `native2rgb`: train on the 32, test on the 80;
- `cv`: patient-grouped, class-stratified 5-fold CV over all 112; out-of-fold accuracy overall and per source.
Every model is trained with fold "all" of its training images (no checkpoint choice: the last weights, as a
user's `--fold all` run) and predicted with the preset's TTA. Accuracy with a bootstrap 95% CI over images.
Results: OUT/results.jsonl (one line per protocol x variant x seed; a rerun skips lines already there) and a
summary table printed at the end.

    .venv/bin/python benchmarks/oct_cross_source.py [--protocols rgb2native native2rgb cv]
        [--variants preset robust ...] [--seeds 0 1] [--out bench_out/oct_cross_source]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "oct"

# Recipe variants: overrides of oct_cpu.yaml. "crop": random resized crops whose aspect spans the native
# widths squashed into a square (512 to 768 px wide at 496 high); "intensity": brightness, contrast, gamma.
VARIANTS: dict[str, list[str]] = {
    "preset": [],
    "crop": ["augment.resized_crop_scale=[0.6,1.0]", "augment.resized_crop_ratio=[0.65,1.55]"],
    "intensity": ["augment.intensity=0.8"],
    "robust": [
        "augment.resized_crop_scale=[0.6,1.0]",
        "augment.resized_crop_ratio=[0.65,1.55]",
        "augment.intensity=0.8",
    ],
    "robust_lite1": [
        "augment.resized_crop_scale=[0.6,1.0]",
        "augment.resized_crop_ratio=[0.65,1.55]",
        "augment.intensity=0.8",
        "model.arch=efficientnet_lite1",
        "model.pretrained=efficientnet_lite1.bundled",
    ],
}


def _split(train_ids: list[str], test_ids: list[str], ds) -> dict:
    """A split file whose fold "all" trains on `train_ids` and whose test part is `test_ids`."""
    from medstudent.data.splits import SPLIT_FORMAT

    return {
        "format": SPLIT_FORMAT,
        "task": "classification",
        "root": str(Path(ds.root).resolve()),
        "seed": None,
        "test_fraction": None,
        "n_folds": 2,
        "stratify": "class",
        "grouped_by": None,
        "test": sorted(test_ids),
        # fold "all" is the union of both halves; the halves themselves are never trained on alone
        "folds": [
            {"train": sorted(train_ids[::2]), "val": sorted(train_ids[1::2])},
            {"train": sorted(train_ids[1::2]), "val": sorted(train_ids[::2])},
        ],
        "strata": None,
        "groups": None,
    }


def _train_and_predict(ds, train_ids, test_ids, overrides, out: Path) -> tuple[np.ndarray, float]:
    """Train fold "all" on train_ids with `overrides`, return test probabilities (N, C) and minutes."""
    from medstudent.config import load_config
    from medstudent.data.io import read_image
    from medstudent.data.splits import save_split
    from medstudent.inference.predict import load_predictor, predict_probs
    from medstudent.rundir import RunDir
    from medstudent.training.train import train

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    split_path = RunDir(out).split
    save_split(_split(train_ids, test_ids, ds), split_path)
    cfg = load_config(
        "oct_cpu",
        [f"data.root={ds.root}", f"data.split={split_path}", f"train.output_dir={out}", *overrides],
    )
    t0 = time.time()
    run = train(cfg, fold="all", progress=False)
    minutes = (time.time() - t0) / 60
    pred = load_predictor(run)
    by_id = {it.id: it for it in ds.items}
    probs = np.stack(
        [predict_probs([pred], read_image(by_id[i].image), tta=cfg.predict.tta) for i in test_ids]
    )
    return probs, minutes


def _accuracy(y: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    from medstudent.evaluation.metrics import classification_metrics

    m = classification_metrics(y, probs, names, n_boot=2000)
    return {
        "n": int(len(y)),
        "accuracy": m["accuracy"],
        "accuracy_ci95": m["accuracy_ci95"],
        "macro_f1": m["macro_f1"],
        "sensitivity": {r["class"]: r["sensitivity"] for r in m["per_class"]},
        "confusion_matrix": m["confusion_matrix"],
    }


def run_protocol(ds, protocol: str, overrides: list[str], seed: int, out: Path) -> dict:
    items = ds.items
    ids = [it.id for it in items]
    labels = {it.id: it.label for it in items}
    source = {it.id: "rgb" if it.subset == "train" else "native" for it in items}
    sets = {s: [i for i in ids if source[i] == s] for s in ("rgb", "native")}
    overrides = [*overrides, f"train.seed={seed}"]
    if protocol in ("rgb2native", "native2rgb"):
        tr, te = ("rgb", "native") if protocol == "rgb2native" else ("native", "rgb")
        probs, minutes = _train_and_predict(ds, sets[tr], sets[te], overrides, out / "run")
        y = np.array([labels[i] for i in sets[te]])
        return {**_accuracy(y, probs, ds.class_names), "train_minutes": round(minutes, 2)}
    if protocol != "cv":
        raise SystemExit(f"unknown protocol {protocol!r}")
    from medstudent.data.splits import make_split

    split = make_split(ds, test_fraction=0, n_folds=5, seed=seed)
    oof_ids: list[str] = []
    oof_probs: list[np.ndarray] = []
    minutes = 0.0
    for k, fold in enumerate(split["folds"]):
        probs, m = _train_and_predict(ds, fold["train"], fold["val"], overrides, out / f"fold_{k}")
        oof_ids += fold["val"]
        oof_probs.append(probs)
        minutes += m
    probs = np.concatenate(oof_probs)
    y = np.array([labels[i] for i in oof_ids])
    res = {**_accuracy(y, probs, ds.class_names), "train_minutes": round(minutes, 2)}
    for s in ("rgb", "native"):
        keep = np.array([source[i] == s for i in oof_ids])
        res[f"by_source_{s}"] = _accuracy(y[keep], probs[keep], ds.class_names)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocols", nargs="+", default=["rgb2native", "native2rgb"])
    ap.add_argument("--variants", nargs="+", default=["preset", "robust"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "oct_cross_source")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from medstudent.data.layouts import open_classification

    ds = open_classification(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["protocol"], r["variant"], r["seed"]))
    for protocol in args.protocols:
        for variant in args.variants:
            for seed in args.seeds:
                if (protocol, variant, seed) in done:
                    continue
                t0 = time.time()
                res = run_protocol(ds, protocol, VARIANTS[variant] + args.set, seed, args.out / "work")
                row = {"protocol": protocol, "variant": variant, "seed": seed, **res}
                row["wall_minutes"] = round((time.time() - t0) / 60, 2)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{protocol:11s} {variant:13s} seed {seed}: accuracy {res['accuracy']:.3f} "
                    f"[{res['accuracy_ci95'][0]:.2f}, {res['accuracy_ci95'][1]:.2f}]"
                    + "".join(
                        f", {s} {res[f'by_source_{s}']['accuracy']:.3f}"
                        for s in ("rgb", "native")
                        if f"by_source_{s}" in res
                    ),
                    flush=True,
                )
    shutil.rmtree(args.out / "work", ignore_errors=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    print("\nprotocol    variant        seeds  mean accuracy  (each seed [95% CI])")
    for key in sorted({(r["protocol"], r["variant"]) for r in rows}):
        mine = [r for r in rows if (r["protocol"], r["variant"]) == key]
        each = ", ".join(
            f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.2f}, {r['accuracy_ci95'][1]:.2f}]" for r in mine
        )
        mean = np.mean([r["accuracy"] for r in mine])
        print(f"{key[0]:11s} {key[1]:13s} {len(mine):5d}  {mean:.3f}          ({each})")


if __name__ == "__main__":
    main()
