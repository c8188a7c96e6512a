"""Benchmark: Noisy Student for OCT classification (issue 5, classification part).

Teacher on 25% of the training images (stratified by class), the other 75% form the pool with their labels
hidden; two noised students, each taught by the previous round (no gate: both are always trained); every
round is scored on held-out images and its pseudo labels on the hidden labels (precision).

- oct_shared: `oct_cpu.yaml` (bundled EfficientNet-Lite0, 224 px) on ../shared/data/oct: train/ (80 images,
  20 labeled) -> held out: val/ (32 native greyscale images, 8 per class);
- synth_oct: `synth_oct(n=60 per class, size 128, difficulty 0.5)`, the same recipe at 128 px: train/
  (~70% of the patients) -> held out: val/ + test/ pooled.

The held-out images are the run's `val` set, but nothing is chosen on them: validation runs only after the
last epoch (train.val_every = train.epochs, so the last checkpoint is kept) and the student gate is off.
Writes bench_out/selftrain_oct/result.json (and the runs under bench_out/selftrain_oct/<data set>/).

    .venv/bin/python benchmarks/selftrain_oct.py [--only oct_shared|synth_oct] [--set key=value ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import platform
import time
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "oct"

RECIPE = [
    "train.max_minutes=null",  # a fixed number of epochs, not a time budget
    "train.val_every={epochs}",  # score the held-out images after the last epoch only
    "train.threads=1",
    "selftrain.unlabeled=none",  # the pool is the training images with hidden labels
    "selftrain.labeled_fraction=0.25",
    "selftrain.threshold=0.6",
    "selftrain.balance=true",
    "selftrain.soft=false",
    "selftrain.tta=flip",
    "selftrain.num_students=2",
    "selftrain.ensemble_size=1",
    "selftrain.stop_when_worse=false",
    "selftrain.student_dropout=0.3",
    "selftrain.student_drop_path_rate=0.2",
    "selftrain.student_augment={randaugment: 0.5}",
]
PER_DATASET = {
    "oct_shared": [],  # oct_cpu.yaml as it is: 224 px, 15 epochs
    "synth_oct": ["augment.image_size=128"],
}


def held_out_split(ds, held_out: set[str]) -> dict:
    """One fold: train = the `train` subset, val = the held-out subsets; no test set."""
    from medstudent.data.splits import split_from_folders

    split = split_from_folders(ds)
    train = sorted(it.id for it in ds.items if it.subset == "train")
    val = sorted(it.id for it in ds.items if it.subset in held_out)
    split["folds"] = [{"train": train, "val": val}]
    split["test"] = []
    split["stratify"] = f"folders: train -> {'+'.join(sorted(held_out))}"
    return split


def unique_precision(pseudo_csv: Path) -> float | None:
    """Pseudo-label precision over distinct images: the library's `pseudo_precision` is computed over the
    class-balanced rows, where an image duplicated by balancing counts once per copy."""
    import pandas as pd

    if not pseudo_csv.is_file():
        return None
    df = pd.read_csv(pseudo_csv).drop_duplicates("id")
    df = df[df["hidden_label"].notna()] if "hidden_label" in df else df.iloc[:0]
    return round(float((df["label"] == df["hidden_label"]).mean()), 4) if len(df) else None


def run_one(name: str, root: Path, split_path: Path, out: Path, args) -> dict:
    from medstudent.config import load_config
    from medstudent.selftrain import run_selftrain

    epochs = load_config("oct_cpu").train.epochs if args.epochs is None else args.epochs
    over = [
        f"data.root={root}",
        f"data.split={split_path}",
        f"train.output_dir={out}",
        f"train.name={name}",
        f"train.epochs={epochs}",
        *[s.replace("{epochs}", str(epochs)) for s in RECIPE],
        *PER_DATASET[name],
        *args.set,
    ]
    cfg = load_config("oct_cpu", over)
    resume = (out / name / "selftrain.json").is_file()
    start = time.time()
    summary = run_selftrain(
        cfg, resume=resume, progress=False, log=lambda m: print(f"[{name}] {m}", flush=True)
    )
    rounds = []
    for r in summary["rounds"]:
        stats_file = out / name / f"round_{r['round']}" / "pseudo" / "stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        unique = unique_precision(stats_file.with_name("pseudo.csv"))
        rounds.append({
            "round": r["round"],
            "role": r["role"],
            "held_out_accuracy": r["val_metric"],
            "pseudo_precision": r["pseudo_quality"],  # over the class-balanced training rows
            "pseudo_precision_unique": unique,  # over the distinct pseudo-labelled images
            "pseudo_predicted": r["pseudo_predicted"],
            "pseudo_kept_for_training": r["pseudo_kept"],
            "pseudo_kept_unique": stats.get("kept_unique"),
            "pseudo_kept_per_class": stats.get("kept_per_class"),
            "minutes": r["minutes"],
        })  # fmt: skip
    plan = json.loads((out / name / "plan.json").read_text())
    teacher = rounds[0]["held_out_accuracy"]
    return {
        "data": str(root),
        "labeled": len(plan["labeled"]),
        "hidden_pool": len(plan["hidden"]),
        "held_out": len(json.loads(split_path.read_text())["folds"][0]["val"]),
        "epochs": epochs,
        "minutes": round((time.time() - start) / 60, 1),
        "rounds": rounds,
        "teacher_accuracy": teacher,
        "student_accuracy": [r["held_out_accuracy"] for r in rounds[1:]],
        "gain_over_teacher": [round(r["held_out_accuracy"] - teacher, 4) for r in rounds[1:]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "selftrain_oct")
    ap.add_argument("--only", choices=["oct_shared", "synth_oct"], default=None)
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every round (default: the preset's)")
    ap.add_argument("--synth-n", type=int, default=60, help="synthetic images per class")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from medstudent.data.layouts import open_classification
    from medstudent.data.splits import save_split
    from medstudent.data.synth import synth_oct

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result.update({
        "benchmark": "selftrain_oct",
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU (shared with other jobs)",
        "command": "python benchmarks/selftrain_oct.py "
        + " ".join([*(["--only", args.only] if args.only else []), *(f"--set {s}" for s in args.set)]),
        "recipe": ["oct_cpu.yaml", *RECIPE, *args.set],
        "per_dataset": PER_DATASET,
    })  # fmt: skip
    result.setdefault("datasets", {})
    todo = [args.only] if args.only else ["oct_shared", "synth_oct"]
    for name in todo:
        if name == "oct_shared":
            root, held_out = DATA, {"val"}
        else:
            root, held_out = out / "data" / "synth_oct", {"val", "test"}
            if not root.is_dir():
                synth_oct(root, n=args.synth_n, seed=5, size=128, difficulty=0.5)
        split_path = out / f"split_{name}.json"
        if not split_path.is_file():
            save_split(held_out_split(open_classification(root), held_out), split_path)
        result["datasets"][name] = run_one(name, root, split_path, out, args)
        result_file.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
