"""GPU readiness check: one script for the day a GPU is lent (`benchmarks/gpu_check.sh`).

On one GPU (H100/H200 class), sized to finish in about 8 minutes:
1. trains a full-resolution STAS recipe (UNet over the largest bundled ImageNet encoder, EfficientNet-Lite0;
   the reference presets stas_unet_b3 / stas_deeplab_ensemble need hub weights, unreachable offline) for a
   fixed few minutes with bf16 (`precision: auto`), on the 256 non-test shared STAS images;
2. predicts the 64 held-out images on the GPU and scores them with the one scorer (mean Dice after the
   run's post-processing, with its bootstrap CI);
3. reports training and prediction images/s and peak GPU memory;
4. runs one DDP step on one GPU (`--strategy ddp --devices 1`, a subprocess, as a multi-GPU job would);
5. checks `predict --device cuda` against the CPU: float32 probabilities of the same images within 1e-3.
Figures go to stdout and to `$OUT/gpu_check.json` (or `--out`).

`--dry-run` runs every step on the CPU with a tiny model on synthetic data in a minute or two, so the test
suite proves the script works end to end before any GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medstudent.config import load_config
from medstudent.data.layouts import open_segmentation
from medstudent.data.splits import make_split, save_split
from medstudent.data.synth import synth_stas
from medstudent.evaluation.scoring import seg_row, seg_summary
from medstudent.inference.predict import load_predictor, predict_probs
from medstudent.rundir import RunDir
from medstudent.training.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stas"
PARITY_ATOL = 1e-3

# the GPU recipe: stas_cpu's augmentation and loss at full resolution, UNet, bigger crops and batches
GPU_RECIPE = [
    "model.arch=unet",
    "augment.scale=1.0",
    "augment.crop=[768,768]",
    "train.batch_size=16",
    "train.precision=auto",
    "train.fit_epochs_to_time=true",
    "train.epochs=40",
    "train.val_every=2",
    "data.num_workers=8",
]
# the dry run: a tiny untrained-encoder FPN on small synthetic tiles, one CPU epoch
DRY_RECIPE = [
    "model.arch=fpn",
    "model.encoder=mobilenetv3_small_050",
    "model.pretrained=none",
    "augment.scale=1.0",
    "augment.crop=null",
    "augment.autoaugment=0",
    "augment.stain=0",
    "train.batch_size=4",
    "train.precision=32",
    "train.epochs=1",
    "train.ema=0",
    "train.max_minutes=null",
    "train.accelerator=cpu",
    "predict.tta_scales=[1.0]",
]


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def prepare_data(dry: bool, out: Path) -> tuple[Path, Path, int]:
    """(data root, split file, held-out count): the shared STAS images with 64 held out (the split of
    benchmarks/stas_cpu.py), or 16 synthetic tiles with 4 held out for the dry run."""
    if dry:
        root = synth_stas(out / "data", n=16, seed=1, width=256, height=160, n_unlabeled=0)
        n_test = 4
    else:
        if not DATA.is_dir():
            raise SystemExit(f"error: {DATA}: shared STAS data not found (run with --dry-run without it)")
        root, n_test = DATA, 64
    split = out / "split.json"
    if not split.is_file():
        save_split(make_split(open_segmentation(root), test_fraction=n_test, n_folds=5, seed=0), split)
    return root, split, n_test


def train_step(cfg_overrides: list[str], dry: bool) -> tuple[Path, dict]:
    """Train fold "all" (every non-test image); returns the run folder and its training figures."""
    cfg = load_config("stas_cpu", cfg_overrides)
    cfg.data.fold = "all"
    t0 = time.perf_counter()
    run = train(cfg, fold="all", progress=False)
    seconds = time.perf_counter() - t0
    metrics = json.loads(RunDir(run).metrics.read_text())
    n_train = metrics.get("n_train") or metrics.get("train_images") or 0
    epochs = int(metrics.get("epochs") or 0)
    return run, {
        "train_seconds": round(seconds, 1),
        "epochs": epochs,
        "train_images": n_train,
        "train_images_per_s": round(epochs * n_train / seconds, 2) if n_train else None,
    }


def predict_step(run: Path, root: Path, split: Path, device: str) -> dict:
    """Predict the held-out images on `device` (the run's TTA and scales) and score them."""
    ds = open_segmentation(root)
    index = {i: k for k, i in enumerate(ds.ids())}
    test_ids = json.loads(split.read_text())["test"]
    pred = load_predictor(run, device=device)
    rows, seconds = [], 0.0
    for tid in test_ids:
        img, gt = ds.load(index[tid])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prob = predict_probs([pred], img, tta=pred.cfg.predict.tta, precision="auto")
        seconds += time.perf_counter() - t0
        rows.append(seg_row(tid, gt > 0, prob=prob, post=pred.postprocess)[0])
    summary = seg_summary(rows, n_boot=1000)
    return {
        "test_images": len(test_ids),
        "mean_dice": round(float(summary["mean_dice"]), 4),
        "mean_dice_ci95": [round(float(v), 4) for v in summary["mean_dice_ci95"]],
        "mean_dice_raw": round(float(summary.get("mean_dice_raw", float("nan"))), 4),
        "predict_images_per_s": round(len(test_ids) / seconds, 3) if seconds else None,
        "tta": pred.cfg.predict.tta,
        "tta_scales": list(pred.cfg.predict.tta_scales),
    }


def ddp_step(overrides: list[str], out: Path, dry: bool) -> dict:
    """One short training under the DDP strategy on one device, in a fresh process (as a job would)."""
    args = ["train", "stas_cpu", "--fold", "all", "--strategy", "ddp", "--devices", "1", "--quiet"]
    sets = [*overrides, "train.name=ddp_step", "train.epochs=1", "train.limit_train_batches=2"]
    sets += ["train.max_minutes=null", "train.fit_epochs_to_time=false"]
    cmd = [sys.executable, "-c", "from medstudent.cli import app; app()", *args]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    ok = proc.returncode == 0 and RunDir.of(out / "runs", "ddp_step", "all").last_ckpt.is_file()
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if not ok else []
    return {"ddp_ok": ok, "ddp_seconds": round(time.perf_counter() - t0, 1), "ddp_error": tail}


def parity_step(run: Path, root: Path, split: Path, device: str) -> dict:
    """Largest |probability difference| between `device` and the CPU, float32, on two held-out images."""
    ds = open_segmentation(root)
    index = {i: k for k, i in enumerate(ds.ids())}
    ids = json.loads(split.read_text())["test"][:2]
    on_dev, on_cpu = load_predictor(run, device=device), load_predictor(run, device="cpu")
    worst = 0.0
    for tid in ids:
        img, _ = ds.load(index[tid])
        a = predict_probs([on_dev], img, tta="flip", precision="32")
        b = predict_probs([on_cpu], img, tta="flip", precision="32")
        worst = max(worst, float(np.abs(a - b).max()))
    return {"parity_device": device, "parity_max_abs_diff": worst, "parity_ok": worst <= PARITY_ATOL}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny model, synthetic data, CPU: proves the script"
    )
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget on the GPU")
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench_out" / "gpu_check")
    )
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA GPU here (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if dry else "cuda"
    t_all = time.perf_counter()
    root, split, _ = prepare_data(dry, out)
    base = [
        f"data.root={root}",
        f"data.split={split}",
        f"train.output_dir={out / 'runs'}",
        "train.name=gpu_check",
    ]
    recipe = DRY_RECIPE if dry else [*GPU_RECIPE, f"train.max_minutes={args.minutes}"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run, figures = train_step([*base, *recipe], dry)
    figures["train_peak_gpu_mb"] = (
        round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    )
    print(f"trained {figures['epochs']} epoch(s) in {figures['train_seconds']} s", flush=True)
    figures.update(predict_step(run, root, split, device))
    print(f"held-out mean Dice {figures['mean_dice']} (95% CI {figures['mean_dice_ci95']})", flush=True)
    figures.update(ddp_step([*base, *recipe], out, dry))
    figures.update(parity_step(run, root, split, device))
    figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    figures.update(
        {
            "dry_run": dry,
            "date": str(date.today()),
            "gpu": gpu_name(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "total_seconds": round(time.perf_counter() - t_all, 1),
        }
    )
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    for key, value in figures.items():
        print(f"{key}: {value}")
    ok = figures["ddp_ok"] and figures["parity_ok"]
    print("gpu_check: OK" if ok else "gpu_check: FAILED (see ddp_ok / parity_ok)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
