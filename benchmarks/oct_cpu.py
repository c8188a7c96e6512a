"""Benchmark: oct_cpu on the shared OCT images (issue 4).

Trains `oct_cpu.yaml` on ../shared/data/oct/train (80 images; validation = a patient-grouped fifth of them
for checkpoint choice) and evaluates on ../shared/data/oct/val (32 native greyscale images of the official
validation split): accuracy with bootstrap CI, per-class table, confusion matrix, training minutes.
Writes bench_out/oct_cpu/{result.json, report/}.

    .venv/bin/python benchmarks/oct_cpu.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "oct"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "oct_cpu")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from medstudent.config import load_config
    from medstudent.core.folder import collect_images, predict_folder
    from medstudent.data.layouts import open_classification
    from medstudent.data.splits import make_split, save_split
    from medstudent.evaluation.evaluate import evaluate_classification
    from medstudent.inference.predict import load_predictor, predict_probs
    from medstudent.rundir import RunDir
    from medstudent.training.train import train

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_ds = open_classification(DATA / "train")
    # 80 training images: 4 folds, grouped by patient; fold 0's validation picks the checkpoint.
    split_path = RunDir(out).split
    save_split(make_split(train_ds, test_fraction=0, n_folds=4, seed=0), split_path)
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={DATA / 'train'}",
            f"data.split={split_path}",
            f"train.output_dir={out}",
            *args.set,
        ],
    )
    t0 = time.time()
    run = train(cfg, progress=False)
    minutes = (time.time() - t0) / 60
    pred = load_predictor(run)
    files = collect_images(DATA / "val")
    dest = out / "pred"
    t1 = time.time()
    predict_folder(
        lambda im: predict_probs([pred], im, tta=cfg.predict.tta),
        "classification",
        files,
        dest,
        pred.class_names,
        root=DATA / "val",
    )
    secs = (time.time() - t1) / len(files)
    m = evaluate_classification(dest, DATA / "val", out / "report")
    res = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "data": f"train {DATA / 'train'} (80), test {DATA / 'val'} (32)",
        "train_minutes_wall": round(minutes, 2),
        "train": json.loads(RunDir(run).metrics.read_text()),
        "test_accuracy": m["accuracy"],
        "test_accuracy_ci95": m["accuracy_ci95"],
        "macro_f1": m["macro_f1"],
        "auc_macro": m["auc_macro"],
        "per_class": m["per_class"],
        "confusion_matrix": m["confusion_matrix"],
        "inference_s_per_image": secs,
        "tta": cfg.predict.tta,
    }
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
