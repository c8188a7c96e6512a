"""RunDir: the one owner of a run folder's file names."""

from __future__ import annotations

from pathlib import Path

from medstudent.rundir import RunDir


def test_run_folder_paths(tmp_path):
    rd = RunDir.of(tmp_path, "stas_cpu", 0)
    root = tmp_path / "stas_cpu" / "fold_0"
    assert rd.root == root and RunDir.fold_in(tmp_path / "stas_cpu", 0) == rd
    assert RunDir.of("runs", "x", "all").root == Path("runs/x/fold_all")
    assert (rd.config, rd.split, rd.metrics) == (
        root / "config.yaml",
        root / "split.json",
        root / "metrics.json",
    )
    assert (rd.best_ckpt, rd.last_ckpt) == (
        root / "checkpoints" / "best.ckpt",
        root / "checkpoints" / "last.ckpt",
    )
    assert (rd.postprocess, rd.oof, rd.curves) == (
        root / "postprocess.json",
        root / "oof.csv",
        root / "training_curves.png",
    )
    assert (rd.logs, rd.val_maps) == (root / "logs", root / "predictions" / "val")


def test_is_trained_needs_metrics_and_the_best_checkpoint(tmp_path):
    rd = RunDir(tmp_path)
    assert not rd.is_trained()
    rd.checkpoints.mkdir()
    rd.best_ckpt.write_bytes(b"")
    assert not rd.is_trained()  # training was interrupted before metrics.json
    rd.metrics.write_text("{}")
    assert rd.is_trained()
