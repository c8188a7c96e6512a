"""benchmarks/gpu_check.sh --dry-run: the GPU check runs to its end on the CPU (tiny model, synthetic
data), so the day a GPU is lent it works the first time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains a tiny model twice (the run and the DDP step)
def test_gpu_check_dry_run_reports_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    # the interpreter running the tests, whatever venv it belongs to
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "gpu_check: OK" in proc.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["dry_run"] and figures["epochs"] == 1 and figures["train_images"] > 0
    assert figures["train_images_per_s"] > 0 and figures["predict_images_per_s"] > 0
    assert figures["test_images"] == 4 and 0 <= figures["mean_dice"] <= 1
    lo, hi = figures["mean_dice_ci95"]
    assert lo <= figures["mean_dice"] <= hi
    assert figures["ddp_ok"], figures["ddp_error"]
    assert figures["parity_ok"] and figures["parity_max_abs_diff"] == 0.0  # CPU against itself
    assert (tmp_path / "runs" / "ddp_step" / "fold_all" / "checkpoints" / "last.ckpt").is_file()


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1 and "no CUDA GPU here" in proc.stderr
