"""Multi-process training (DDP over gloo on CPU) and rank sharding of prediction work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medstudent.distributed import gather, rank_world, shard
from medstudent.training.callbacks import state_digest

BIN = Path(sys.executable).parent


def test_rank_world_reads_launcher_environments(monkeypatch):
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "NODE_RANK",
        "LOCAL_WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(k, raising=False)
    assert rank_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert rank_world() == (3, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rank_world() == (3, 4)  # Lightning's launcher: node 1, local rank 1 of 2
    assert shard(list(range(10))) == [3, 7]
    for k in ("WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert rank_world() == (2, 3) and shard("abcdefg") == ["c", "f"]


def test_gather_single_process_is_identity():
    assert gather({"a": 1}) == [{"a": 1}]


@pytest.mark.slow  # trains a model
def test_ddp_two_cpu_processes_train_in_sync(synth_stas_dir, tmp_path):
    """Two gloo ranks train a few steps: both saw different images, and the checkpoint rank 0 saved holds the
    weights rank 1 ended with."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [
        str(BIN / "medstudent"), "train", "stas_cpu", "--quiet", "--devices", "2", "--strategy", "ddp",
        "--set", f"data.root={synth_stas_dir}", "--set", f"train.output_dir={tmp_path}",
        "--set", "train.name=ddp", "--set", "train.accelerator=cpu", "--set", "train.threads=1",
        "--set", "model.encoder=mobilenetv3_small_050", "--set", "model.pretrained=none",
        "--set", "augment.scale=1.0", "--set", "augment.crop=[64,64]", "--set", "train.batch_size=2",
        "--set", "train.epochs=2", "--set", "train.precision=32", "--set", "train.max_minutes=null",
        "--set", "data.test_fraction=4", "--set", "data.n_folds=3",
    ]  # fmt: skip
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "ddp" / "fold_0"
    reports = [json.loads((run / "logs" / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert all(r["batches"] > 0 for r in reports)
    n_train = json.loads((run / "metrics.json").read_text())["n_train"]
    seen = [set(r["indices"]) for r in reports]
    assert seen[0] and seen[1] and seen[0] != seen[1]  # DistributedSampler gave the ranks different images
    assert len(seen[0] | seen[1]) == n_train
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert state_digest(state) == reports[1]["weights_sha256"] == reports[0]["weights_sha256"]


@pytest.mark.slow  # starts two Python processes
def test_predict_folder_shards_images_across_ranks(tmp_path):
    """torchrun-style environment, 2 ranks at once: each predicts every other image, rank 0 merges one CSV."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(7):
        Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(src / f"img_{i}.png")
    code = (
        "import os, numpy as np; from medstudent.core.folder import collect_images, predict_folder;"
        "files = collect_images({!r});"
        "predict_folder(lambda im: np.array([1 - im.mean() / 255, im.mean() / 255]), 'classification',"
        " files, {!r}, ['dark', 'bright'], root={!r}, on_image=lambda n, t, p: print(p.name, flush=True))"
    ).format(str(src), str(tmp_path / "out"), str(src))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    seen = [set(p.communicate(timeout=120)[0].split()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 7
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table["id"].tolist() == [f"img_{i}.png" for i in range(7)]
    assert (table["predicted"] == ["dark"] * 5 + ["bright"] * 2).all()
    assert not list((tmp_path / "out").glob(".rank_*"))


@pytest.mark.slow  # trains a model
def test_predict_devices_two_processes_matches_single(synth_oct_dir, tmp_path):
    """`predict --devices 2` starts two ranks that share the images; the merged CSV equals one process's."""
    import pandas as pd
    from typer.testing import CliRunner

    from conftest import TINY_CLS
    from medstudent.cli import app
    from medstudent.config import load_config
    from medstudent.training.train import train

    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"train.output_dir={tmp_path}",
            "train.name=p2",
            *TINY_CLS,
        ],
    )
    run = train(cfg, progress=False)
    images = synth_oct_dir / "test"
    single = CliRunner().invoke(app, ["predict", str(run), "-i", str(images), "-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    args = [str(BIN / "medstudent"), "predict", str(run), "-i", str(images), "-o", str(tmp_path / "two")]
    res = subprocess.run([*args, "--devices", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a = pd.read_csv(tmp_path / "one" / "predictions.csv")
    b = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert len(a) == len(list(images.rglob("*.jpeg"))) > 2
    assert a["id"].tolist() == b["id"].tolist()
    probs = [c for c in a.columns if c.startswith("p_")]
    assert (a[probs] - b[probs]).abs().to_numpy().max() < 1e-5
