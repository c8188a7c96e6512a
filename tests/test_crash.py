"""Crash safety: runs killed with SIGKILL (mid-epoch, mid-checkpoint-write) resume with --resume to the
same weights as an uninterrupted run; files are replaced atomically (medstudent.atomic)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY_SEG
from medstudent.atomic import atomic_path, remove_stale_temps, write_text_atomic
from medstudent.training.callbacks import state_digest

CHILD = Path(__file__).with_name("crash_child.py")
TINY = [
    *TINY_SEG,
    "augment.scale=1.0",
    "data.test_fraction=4",
    "data.n_folds=3",
    "train.threads=1",
    "data.num_workers=0",
]


def _cli(tmp_path: Path, root: Path, name: str, *extra: str) -> list[str]:
    sets = [f"data.root={root}", f"train.output_dir={tmp_path / 'runs'}", f"train.name={name}", *TINY, *extra]
    return [a for s in sets for a in ("--set", s)]


def _run(args: list[str], crash: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(crash or {})}
    return subprocess.run(
        [sys.executable, str(CHILD), *args], env=env, capture_output=True, text=True, timeout=600
    )


def _killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def _digest(ckpt: Path) -> str:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return state_digest(state)


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    write_text_atomic(target, "new", fsync=False)  # per-image outputs: atomic, not flushed
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]
    (tmp_path / ".a.json.x1.tmp").write_text("stale")  # what a SIGKILL leaves
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".a.json.x1.tmp"]


def test_atomic_files_get_the_mode_of_ordinary_files(tmp_path):
    """Not mkstemp's 0600: predictions and reports stay readable to the group, as with open()."""
    (tmp_path / "plain.txt").write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    mode = (tmp_path / "atomic.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 and mode & 0o044


@pytest.mark.slow  # trains a model
def test_kill_during_checkpoint_write_keeps_last_loadable(synth_stas_dir, tmp_path):
    args = _cli(tmp_path, synth_stas_dir, "ckw", "train.epochs=2")
    proc = _run(["train", "stas_cpu", *args, "--quiet"], {"CRASH_AT_SAVE": "last.ckpt:2"})
    assert _killed(proc), proc.stderr[-2000:]
    ckpts = tmp_path / "runs" / "ckw" / "fold_0" / "checkpoints"
    assert any(p.name.startswith(".last.ckpt.") for p in ckpts.iterdir())  # the half-written temp file
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0  # the first epoch's checkpoint, intact
    proc = _run(["train", "stas_cpu", *args, "--quiet", "--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # temp swept on resume


@pytest.mark.slow  # trains a model three times
def test_kill_mid_epoch_then_resume_gives_identical_weights(synth_stas_dir, tmp_path):
    # 8 training images in batches of 4: two steps per epoch; step 3 is the second of epoch 1
    whole = _run(["train", "stas_cpu", *_cli(tmp_path, synth_stas_dir, "whole", "train.epochs=3"), "--quiet"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    args = ["train", "stas_cpu", *_cli(tmp_path, synth_stas_dir, "killed", "train.epochs=3"), "--quiet"]
    proc = _run(args, {"CRASH_AT_STEP": "3"})
    assert _killed(proc), proc.stderr[-2000:]
    killed = tmp_path / "runs" / "killed" / "fold_0" / "checkpoints"
    assert torch.load(killed / "last.ckpt", weights_only=True)["epoch"] == 0
    proc = _run([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = tmp_path / "runs" / "whole" / "fold_0" / "checkpoints"
    for name in ("last.ckpt", "best.ckpt"):
        assert _digest(killed / name) == _digest(done / name), name


@pytest.mark.slow  # cross-validates twice
def test_cv_killed_in_a_fold_resumes_to_identical_folds(synth_stas_dir, tmp_path):
    # 2 folds of 6 training images in batches of 4 and 2: step 3 is mid epoch 1; its second occurrence
    # in the process is fold 1's (fold 0 is finished and in the manifest by then)
    def cv(name: str) -> list[str]:
        sets = [*_cli(tmp_path, synth_stas_dir, name, "train.epochs=2", "augment.scale=0.5")]
        sets += ["--set", "predict.tta=none", "--set", "postprocess.min_area=0"]
        return ["cv", "stas_cpu", "--folds", "2", *sets, "--quiet", "--dataset", "d", "--method", "m"]

    whole = _run(cv("whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = _run(cv("killed"), {"CRASH_AT_STEP": "3:2"})
    assert _killed(proc), proc.stderr[-2000:]
    killed = tmp_path / "runs" / "killed"
    assert (killed / "fold_1" / "checkpoints" / "last.ckpt").is_file()
    assert not (killed / "fold_1" / "metrics.json").exists()
    proc = _run(cv("killed"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping finished fold(s) [0]" in proc.stdout + proc.stderr
    done = tmp_path / "runs" / "whole"
    for fold in ("fold_0", "fold_1"):
        for name in ("last.ckpt", "best.ckpt"):
            ckpt = f"{fold}/checkpoints/{name}"
            assert _digest(killed / ckpt) == _digest(done / ckpt), ckpt
    a, b = (pd.read_csv(r / "results.csv").drop(columns=["minutes"], errors="ignore") for r in (killed, done))
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow  # self-trains twice
def test_selftrain_killed_while_pseudo_labelling_resumes_to_identical_student(synth_stas_dir, tmp_path):
    selftrain = [
        "train.epochs=2",
        "predict.tta=none",
        "selftrain.labeled_fraction=0.5",
        "selftrain.threshold=0.6",
        "selftrain.min_confident_fraction=0.5",
        "selftrain.unlabeled_fraction=0.5",
        "selftrain.stop_when_worse=false",
        "selftrain.num_students=1",
        "selftrain.student_dropout=0.1",
    ]

    def cmd(name: str) -> list[str]:
        return ["selftrain", "stas_cpu", *_cli(tmp_path, synth_stas_dir, name, *selftrain), "--quiet"]

    whole = _run(cmd("whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    # dies on the second pool image, after the first pseudo mask was written
    proc = _run(cmd("killed"), {"CRASH_AT_CALL": "medstudent.selftrain.pseudo_io:_seg_row:2"})
    assert _killed(proc), proc.stderr[-2000:]
    killed, done = tmp_path / "runs" / "killed", tmp_path / "runs" / "whole"
    pseudo = killed / "round_1" / "pseudo"
    assert not (pseudo / "stats.json").exists() and not (killed / "round_1" / "checkpoints").exists()
    proc = _run([*cmd("killed"), "--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    pd.testing.assert_frame_equal(
        pd.read_csv(pseudo / "pseudo.csv"), pd.read_csv(done / pseudo.relative_to(killed) / "pseudo.csv")
    )
    for rel in (
        "round_0/checkpoints/last.ckpt",
        "round_1/checkpoints/last.ckpt",
        "round_1/checkpoints/best.ckpt",
    ):
        assert _digest(killed / rel) == _digest(done / rel), rel
