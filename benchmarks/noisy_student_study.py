"""Benchmark: the Noisy Student study in miniature (issue 6): baseline vs Noisy Student vs ensemble Noisy
Student, 10-fold cross-validation on small offline classification data sets, then `medstudent compare`.

Data sets (written once as ImageFolder trees under <out>/data/<name>/<CLASS>/<image>.png):

- digits_0-4, digits_5-9, digits_3589, digits_all: scikit-learn's 8x8 digits (the reference study's split
  MNIST), upscaled to 32x32, disjoint samples of the 1797 images (160 images each);
- synth_oct_easy, synth_oct_hard: `synth_oct` at difficulty 0.3 / 0.7, 4 classes, 64x64 (160 images each);
- oct_shared: ../shared/data/oct train + val pooled (112 images, 4 classes), resized to 64x64 greyscale.

Protocol per data set and fold (folds stratified by class; OCT folds grouped by patient):
the fold's training images are split into a labeled 25% (stratified; the "teacher factor") and a pool whose
labels are hidden; `run_selftrain` runs twice with one student round and no gate:

- ensemble_size=1: round 0 (the teacher) = `baseline`, round 1 (the noised student) = `noisy_student`;
- ensemble_size=2: round 1 (two noised students trained on the two-teacher ensemble's pseudo labels,
  scored as a mean-probability ensemble) = `ensemble_ns`; its round 0 is kept as `ensemble_baseline` in
  results_all.csv (not part of the three-method comparison).

The score is the fold's validation accuracy. Validation runs only after the last epoch
(train.val_every = train.epochs), so the checkpoint is the last one and the validation images choose nothing.
Results go to <out>/results.csv (long format: dataset, method, fold, accuracy, ...), one dataset x fold at a
time, so an interrupted run continues where it stopped; then `medstudent compare` writes <out>/compare/.

    .venv/bin/python benchmarks/noisy_student_study.py --quick  # 2 data sets x 2 folds: bench_out/study_quick
    .venv/bin/python benchmarks/noisy_student_study.py          # the full study: bench_out/study
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spinning OpenMP threads

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_OCT = ROOT.parent / "shared" / "data" / "oct"
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")

DATASETS = [
    "digits_0-4",
    "digits_5-9",
    "digits_3589",
    "digits_all",
    "synth_oct_easy",
    "synth_oct_hard",
    "oct_shared",
]
QUICK_DATASETS = ["digits_3589", "synth_oct_hard"]
METHODS = ("baseline", "noisy_student", "ensemble_ns")

# Shared by every data set; sized so one training takes seconds on one CPU thread.
RECIPE = [
    "data.task=classification",
    "data.test_fraction=0",
    "data.n_folds=10",
    "data.cache=true",
    "model.arch=test_resnet",  # timm test ResNet, 0.37 M parameters: ~10x faster than resnet10t here
    "model.pretrained=none",
    "model.dropout=0",
    "model.drop_path_rate=0",
    "augment.grayscale=true",
    "augment.normalize=half",
    "augment.rotate=10",
    "loss.name=ce",
    "loss.label_smoothing=0.1",
    "optim.name=adamw",
    "optim.lr=0.003",
    "optim.warmup_epochs=1",
    "optim.scheduler=cosine",
    "train.epochs={epochs}",
    "train.val_every={epochs}",  # validate after the last epoch only: the last checkpoint is scored
    "train.batch_size=16",
    "train.max_minutes=null",
    "train.threads=1",
    "train.deterministic=true",
    "predict.tta=none",
    "selftrain.unlabeled=none",  # the pool is the fold's training images with hidden labels
    "selftrain.labeled_fraction=0.25",
    "selftrain.unlabeled_fraction=1.0",
    "selftrain.threshold=0.6",
    "selftrain.balance=true",
    "selftrain.soft=false",
    "selftrain.tta=none",
    "selftrain.num_students=1",
    "selftrain.stop_when_worse=false",
    "selftrain.student_dropout=0.3",
    "selftrain.student_drop_path_rate=0.1",
    "selftrain.student_augment={randaugment: 0.5, noise: 0.3}",
    # the student gets the teacher's recipe (same epochs over labeled + pseudo-labelled images) plus noise
    "selftrain.student_overrides={train: {epochs: {student_epochs}, val_every: {student_epochs}}}",
]


def recipe(epochs: int, student_epochs: int) -> list[str]:
    return [
        s.replace("{epochs}", str(epochs)).replace("{student_epochs}", str(student_epochs)) for s in RECIPE
    ]


PER_DATASET = {  # digits must not be mirrored; OCT B-scans may be (left/right eye)
    "digits": ["augment.image_size=32", "augment.hflip=0", "augment.vflip=0", "data.group_regex=null"],
    "oct": ["augment.image_size=64", "augment.hflip=0.5", "augment.vflip=0"],  # grouped by patient id
}


# ------------------------------------------------------------------------------------------------ data


def _save_png(arr: np.ndarray, path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8)).convert("L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    im.save(path)


def write_digits(data: Path, seed: int = 0) -> None:
    """Four disjoint 160-image subsets of sklearn's digits (8x8, 0..16) as 32x32 PNGs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round()
    rng = np.random.default_rng(seed)
    free = {c: list(rng.permutation(np.flatnonzero(d.target == c))) for c in range(10)}
    plan = [
        ("digits_0-4", range(5), 32),
        ("digits_5-9", range(5, 10), 32),
        ("digits_3589", (3, 5, 8, 9), 40),
        ("digits_all", range(10), 16),
    ]
    for name, classes, per_class in plan:
        root = data / name
        done = root / ".done"
        for c in classes:  # draw in any case so the subsets stay disjoint
            take, free[c] = free[c][:per_class], free[c][per_class:]
            if len(take) < per_class:
                raise RuntimeError(f"digits: class {c} ran out of images for {name}")
            if done.is_file():
                continue
            for i in take:
                _save_png(images[i], root / f"d{c}" / f"digit{c}_{i:04d}.png", 32)
        done.touch()


def write_synth_oct(data: Path, name: str, difficulty: float, n: int, seed: int) -> None:
    """synth_oct's train/val/test pooled in one ImageFolder tree, 64x64 greyscale; names keep the patient."""
    from medstudent.data.synth import synth_oct

    root = data / name
    if (root / ".done").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        synth_oct(tmp, n=n, seed=seed, size=64, difficulty=difficulty)
        for p in sorted(Path(tmp).glob("*/*/*.jpeg")):
            _save_png(np.asarray(Image.open(p).convert("L")), root / p.parent.name / f"{p.stem}.png", 64)
    (root / ".done").touch()


def write_shared_oct(data: Path) -> None:
    root = data / "oct_shared"
    if (root / ".done").is_file():
        return
    if not SHARED_OCT.is_dir():
        raise SystemExit(f"the shared OCT images are not at {SHARED_OCT}")
    for p in sorted(SHARED_OCT.glob("*/*/*.jpeg")):  # train/ and val/ pooled
        _save_png(np.asarray(Image.open(p).convert("L")), root / p.parent.name / f"{p.stem}.png", 64)
    (root / ".done").touch()


def build_data(data: Path, names: list[str], synth_n: int) -> None:
    if any(n.startswith("digits") for n in names):
        write_digits(data)
    if "synth_oct_easy" in names:
        write_synth_oct(data, "synth_oct_easy", 0.3, synth_n, seed=11)
    if "synth_oct_hard" in names:
        write_synth_oct(data, "synth_oct_hard", 0.7, synth_n, seed=12)
    if "oct_shared" in names:
        write_shared_oct(data)


def kind(name: str) -> str:
    return "digits" if name.startswith("digits") else "oct"


def make_splits(out: Path, data: Path, names: list[str]) -> dict[str, Path]:
    from medstudent.data.layouts import KERMANY_GROUP_REGEX, open_classification
    from medstudent.data.splits import make_split, save_split

    paths = {}
    for name in names:
        path = out / "splits" / f"{name}.json"
        if not path.is_file():
            regex = None if kind(name) == "digits" else KERMANY_GROUP_REGEX
            ds = open_classification(data / name, group_regex=regex)
            save_split(make_split(ds, test_fraction=0, n_folds=10, seed=0), path)
        paths[name] = path
    return paths


# --------------------------------------------------------------------------------------------- running


def _done_keys(csv_path: Path) -> set[tuple[str, int]]:
    if not csv_path.is_file():
        return set()
    import pandas as pd

    df = pd.read_csv(csv_path)
    return {(str(d), int(f)) for d, f in zip(df["dataset"], df["fold"], strict=True)}


def _selftrain(cfg, split: Path, log_file) -> dict:
    from medstudent.selftrain import run_selftrain

    root = Path(cfg.train.output_dir) / cfg.train.name
    resume = (root / "selftrain.json").is_file()

    def log(msg: str) -> None:
        log_file.write(msg + "\n")
        log_file.flush()

    return run_selftrain(cfg, split, resume=resume, progress=False, log=log)


def _round(summary: dict, r: int) -> dict | None:
    rows = [x for x in summary["rounds"] if x["round"] == r]
    return rows[0] if rows else None


def run_fold(name: str, fold: int, split: Path, data: Path, out: Path, args) -> list[dict]:
    from medstudent.config import load_config

    fold_dir = out / "runs" / name / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    base = [
        *recipe(args.epochs, args.student_epochs),
        *PER_DATASET[kind(name)],
        f"data.root={data / name}",
        f"data.split={split}",
        f"data.fold={fold}",
        f"train.output_dir={fold_dir}",
        *args.set,
    ]
    t0 = time.time()
    summaries = {}
    with open(fold_dir / "log.txt", "a") as log_file:
        for ens in (1, 2):
            cfg = load_config("oct_cpu", [*base, f"train.name=ens{ens}", f"selftrain.ensemble_size={ens}"])
            summaries[ens] = _selftrain(cfg, split, log_file)
    minutes = (time.time() - t0) / 60
    rows = []

    def add(method: str, rec: dict | None, fallback: dict | None = None) -> None:
        note = ""
        if rec is None or rec.get("val_metric") is None:  # no pseudo label passed: the teacher stays
            rec, note = fallback, "no pseudo labels kept; teacher score"
        assert rec is not None
        rows.append({
            "dataset": name,
            "method": method,
            "fold": fold,
            "accuracy": rec["val_metric"],
            "pseudo_precision": rec.get("pseudo_quality"),
            "pseudo_kept": rec.get("pseudo_kept"),
            "members": rec.get("members"),
            "fold_minutes": round(minutes, 2),
            "note": note,
        })  # fmt: skip

    t1, t2 = _round(summaries[1], 0), _round(summaries[2], 0)
    add("baseline", t1)
    add("noisy_student", _round(summaries[1], 1), t1)
    add("ensemble_ns", _round(summaries[2], 1), t2)
    add("ensemble_baseline", t2)
    if not args.keep_checkpoints:  # ~10 MB per checkpoint x 2 x 6 trainings per fold
        for ckpt in fold_dir.rglob("*.ckpt"):
            ckpt.unlink()
        for tb in fold_dir.rglob("logs/tb"):
            shutil.rmtree(tb, ignore_errors=True)
    return rows


def run_compare(out: Path) -> str:
    exe = Path(sys.executable).with_name("medstudent")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "medstudent.cli"]
    cmd += [
        "compare",
        str(out / "results.csv"),
        "--metric",
        "accuracy",
        "--fold-col",
        "fold",
        "--out",
        str(out / "compare"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = res.stdout + res.stderr
    print(text, flush=True)
    return text


def unique_precision(out: Path) -> dict:
    """Mean pseudo-label precision over distinct images per data set and method, from the pseudo.csv files
    (`pseudo_precision` of the library counts an image once per copy made by class balancing)."""
    import pandas as pd

    acc: dict = {}
    for csv in sorted((out / "runs").glob("*/fold_*/ens*/round_1/pseudo/pseudo.csv")):
        name, method = (
            csv.parents[4].name,
            ("noisy_student" if csv.parents[2].name == "ens1" else "ensemble_ns"),
        )
        df = pd.read_csv(csv).drop_duplicates("id")
        df = df[df["hidden_label"].notna()]
        if len(df):
            acc.setdefault(name, {}).setdefault(method, []).append(
                float((df["label"] == df["hidden_label"]).mean())
            )
    return {d: {m: round(float(np.mean(v)), 4) for m, v in ms.items()} for d, ms in acc.items()}


def summarise(out: Path, names: list[str], folds: list[int], minutes: float, args) -> dict:
    import pandas as pd

    df = pd.read_csv(out / "results_all.csv")
    means = df.pivot_table(index="dataset", columns="method", values="accuracy", aggfunc="mean")
    stds = df.pivot_table(index="dataset", columns="method", values="accuracy", aggfunc="std")
    ns = df[df["method"].isin(["noisy_student", "ensemble_ns"])]
    precision = ns.pivot_table(index="dataset", columns="method", values="pseudo_precision", aggfunc="mean")
    kept = ns.pivot_table(index="dataset", columns="method", values="pseudo_kept", aggfunc="mean")
    comp_file = out / "compare" / "compare.json"
    comp = json.loads(comp_file.read_text()) if comp_file.is_file() else None
    result = {
        "benchmark": "noisy_student_study",
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU (shared with other jobs)",
        "command": "python benchmarks/noisy_student_study.py " + " ".join(sys.argv[1:]),
        "datasets": names,
        "folds": folds,
        "epochs": {"teacher": args.epochs, "student": args.student_epochs},
        "recipe": recipe(args.epochs, args.student_epochs) + args.set,
        "per_dataset": PER_DATASET,
        "minutes_this_invocation": round(minutes, 1),
        "minutes_sum_of_folds": round(
            float(df.drop_duplicates(["dataset", "fold"])["fold_minutes"].sum()), 1
        ),
        "mean_accuracy": json.loads(means.round(4).to_json(orient="index")),
        "std_accuracy": json.loads(stds.round(4).to_json(orient="index")),
        "mean_pseudo_precision": json.loads(precision.round(4).to_json(orient="index")),
        "mean_pseudo_kept": json.loads(kept.round(1).to_json(orient="index")),
        "mean_pseudo_precision_unique": unique_precision(out),
        "compare": comp,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 data sets x 2 folds into bench_out/study_quick")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--datasets", nargs="*", default=None, help=f"subset of {DATASETS}")
    ap.add_argument("--folds", type=int, default=None, help="first N of the 10 folds (default all)")
    ap.add_argument("--epochs", type=int, default=14, help="teacher epochs")
    ap.add_argument("--student-epochs", type=int, default=14)
    ap.add_argument("--synth-n", type=int, default=40, help="synthetic OCT images per class")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="only run compare and write result.json")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args()
    out = args.out or ROOT / "bench_out" / ("study_quick" if args.quick else "study")
    names = args.datasets or (QUICK_DATASETS if args.quick else DATASETS)
    folds = list(range(args.folds or (2 if args.quick else 10)))
    warnings.filterwarnings("ignore")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)
    from medstudent.evaluation.results import write_results

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    build_data(data, names, args.synth_n)
    splits = make_splits(out, data, names)
    done = _done_keys(out / "results_all.csv")
    for name in [] if args.report_only else names:
        for fold in folds:
            if (name, fold) in done:
                continue
            t0 = time.time()
            rows = run_fold(name, fold, splits[name], data, out, args)
            write_results(rows, out / "results_all.csv", merge=True)
            write_results([r for r in rows if r["method"] in METHODS], out / "results.csv", merge=True)
            acc = ", ".join(f"{r['method']} {r['accuracy']:.3f}" for r in rows)
            print(f"{name} fold {fold}: {acc} ({(time.time() - t0) / 60:.1f} min)", flush=True)
    run_compare(out)
    res = summarise(out, names, folds, (time.time() - start) / 60, args)
    print(json.dumps({k: res[k] for k in ("mean_accuracy", "mean_pseudo_precision")}, indent=1))
    print(f"{(time.time() - start) / 60:.1f} min; results -> {out / 'results.csv'}", flush=True)


if __name__ == "__main__":
    main()
