"""Benchmark: Noisy Student on ../shared/data/stas, the protocol of issue 5.

Teacher on 64 labeled images of fold 0's training set; pool = the rest of that training set with labels
hidden plus the 120 Unlabeled_Images; students chosen by fold 0's validation images; reported on the 64
held-out test images of the stas_cpu benchmark split (bench_out/stas_cpu/split.json, made by
benchmarks/stas_cpu.py, or made here with the same seed). Writes bench_out/selftrain_stas/result.json.

    .venv/bin/python benchmarks/selftrain_stas.py [--set key=value ...] [--resume]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stas"

RECIPE = [  # sized for ~40 minutes of a shared 2-core CPU
    "train.name=ns",
    "train.epochs=12",
    "train.max_minutes=null",
    "train.val_every=3",
    "predict.tta=none",
    "selftrain.labeled_count=64",
    "selftrain.unlabeled_fraction=0.35",
    "selftrain.threshold=0.9",
    "selftrain.min_confident_fraction=0.9",
    "selftrain.tta=flip",
    "selftrain.num_students=1",
    "selftrain.student_dropout=0.2",
    "selftrain.student_drop_path_rate=0.2",
    "selftrain.student_augment={autoaugment: 0.5, stain: 0.7}",
    "selftrain.student_overrides={train: {epochs: 8}}",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "selftrain_stas")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from medstudent.config import load_config
    from medstudent.data.layouts import open_segmentation
    from medstudent.data.splits import make_split, save_split
    from medstudent.rundir import RunDir
    from medstudent.selftrain import run_selftrain

    args.out.mkdir(parents=True, exist_ok=True)
    split_path = RunDir(ROOT / "bench_out" / "stas_cpu").split  # the stas_cpu benchmark's split
    if not split_path.is_file():
        split_path.parent.mkdir(parents=True, exist_ok=True)
        save_split(make_split(open_segmentation(DATA), test_fraction=64, n_folds=5, seed=0), split_path)
    cfg = load_config(
        "stas_cpu",
        [f"data.root={DATA}", f"data.split={split_path}", f"train.output_dir={args.out}", *RECIPE, *args.set],
    )
    start = time.time()
    summary = run_selftrain(cfg, resume=args.resume, progress=False, log=lambda m: print(m, flush=True))
    rounds = summary["rounds"]
    result = {
        "benchmark": "selftrain_stas",
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, no GPU",
        "command": "python benchmarks/selftrain_stas.py " + " ".join(f"--set {s}" for s in args.set),
        "recipe": RECIPE + args.set,
        "minutes": round((time.time() - start) / 60, 1),
        "rounds": rounds,
        "teacher_test_dice": rounds[0]["test_metric"],
        "students_test_dice": [r["test_metric"] for r in rounds[1:]],
        "gain": [round(r["test_metric"] - rounds[0]["test_metric"], 4) for r in rounds[1:]],
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
