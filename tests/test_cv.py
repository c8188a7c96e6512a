"""`medstudent cv`: every fold, out-of-fold predictions, results table, resume after interruption."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import TINY_SEG
from medstudent.cli import app
from medstudent.config import load_config
from medstudent.data.splits import load_split
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import KEY_COLUMNS, read_results, write_results
from medstudent.experiments.cv import MANIFEST, run_cv, train_fold

runner = CliRunner()
TINY = [
    *TINY_SEG,
    "augment.scale=0.5",
    "train.limit_train_batches=2",
    "data.test_fraction=4",
    "data.n_folds=2",
    "postprocess.min_area=0",
    "postprocess.fill_holes=false",
    "predict.tta=none",
    "train.threads=1",  # robust on a busy 2-core machine (OpenMP threads spin against other processes)
]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny(root, tmp_path, *extra):
    return load_config(
        "stas_cpu", [f"data.root={root}", f"train.output_dir={tmp_path / 'runs'}", *TINY, *extra]
    )


@pytest.mark.slow  # trains a model
def test_folds_resume_after_interruption(synth_stas_dir, tmp_path):
    from medstudent.training.train import train

    extra = ("train.epochs=2", "train.name=cvres", "train.limit_train_batches=1")
    cfg = tiny(synth_stas_dir, tmp_path, *extra)
    root = tmp_path / "runs" / "cvres"
    calls: list[int] = []

    def interrupted(cfg, split, fold, fold_dir):
        calls.append(fold)
        if fold == 1:  # one of two epochs trained, then the machine "goes down"
            short = cfg.model_copy(deep=True)
            short.train.epochs = 1
            train(short, fold=1, split_path=split, progress=False, run_dir=fold_dir)
            (fold_dir / "metrics.json").unlink()  # written only when a training ends
            raise KeyboardInterrupt
        return train_fold(cfg, split, fold, fold_dir)

    with pytest.raises(KeyboardInterrupt):
        run_cv(cfg, n_folds=2, run_method=interrupted)
    manifest = json.loads((root / MANIFEST).read_text())
    assert list(manifest["folds"]) == ["0"] and manifest["folds"]["0"]["status"] == "done"
    assert (root / "fold_1" / "checkpoints" / "last.ckpt").is_file()
    best0 = root / "fold_0" / "checkpoints" / "best.ckpt"
    stamp = best0.stat().st_mtime_ns

    again: list[int] = []

    def counting(cfg, split, fold, fold_dir):
        again.append(fold)
        return train_fold(cfg, split, fold, fold_dir)

    res = run_cv(cfg, n_folds=2, run_method=counting, test=True)
    assert calls == [0, 1] and again == [1]  # fold 0 skipped, fold 1 resumed
    assert best0.stat().st_mtime_ns == stamp
    m1 = json.loads((root / "fold_1" / "metrics.json").read_text())
    assert m1["epochs"] == 2  # continued from the epoch-1 checkpoint
    log = pd.read_csv(root / "fold_1" / "logs" / "metrics.csv").dropna(subset=["train_loss"])
    assert sorted(log["epoch"].unique().tolist()) == [0, 1]

    # results in the long format, summary = mean/sd of the fold rows
    table = read_results(root / "results.csv")
    assert list(table.columns[:3]) == list(KEY_COLUMNS)
    assert table["fold"].tolist() == [0, 1] and set(table["method"]) == {"cvres"}
    assert table["dataset"].iloc[0] == synth_stas_dir.name
    assert table["mean_dice"].between(0, 1).all() and (table["n_images"] == 6).all()
    s = json.loads((root / "cv_summary.json").read_text())["metrics"]["mean_dice"]
    assert s["mean"] == pytest.approx(table["mean_dice"].mean())
    assert s["sd"] == pytest.approx(table["mean_dice"].std(ddof=1))
    assert res.summary["metrics"]["mean_dice"]["mean"] == pytest.approx(s["mean"])

    # out-of-fold predictions cover every non-test image exactly once
    split = load_split(root / "split.json")
    oof = pd.read_csv(root / "oof.csv")
    val_ids = sorted(i for f in split["folds"] for i in f["val"])
    assert sorted(oof["id"]) == val_ids and not set(oof["id"]) & set(split["test"])
    per_fold = oof.groupby("fold")["dice"].mean()
    assert per_fold.tolist() == pytest.approx(table["mean_dice"].tolist())
    assert len(list((root / "fold_0" / "predictions" / "val").glob("*.png"))) == 6

    # the fold models' ensemble on the test set
    test_pred = pd.read_csv(root / "test" / "predictions.csv")
    assert sorted(test_pred["id"]) == sorted(split["test"])
    tr = read_results(root / "test_results.csv")
    assert tr["fold"].tolist() == ["test"] and tr["mean_dice"].iloc[0] == pytest.approx(res.test["mean_dice"])

    # a third run has nothing left to train
    def never(*_args):
        raise AssertionError("a finished fold was trained again")

    assert run_cv(cfg, run_method=never).folds["mean_dice"].tolist() == table["mean_dice"].tolist()
    # another configuration under the same name is refused (it would mix two experiments)
    with pytest.raises(ConfigError, match=r"cv_manifest\.json: .*optim\.lr"):
        run_cv(tiny(synth_stas_dir, tmp_path, *extra, "optim.lr=0.1"))


@pytest.mark.slow  # trains a model
def test_cv_cli_and_split_mismatch_error(synth_stas_dir, tmp_path):
    args = [f"--set={o}" for o in TINY] + [
        f"--set=data.root={synth_stas_dir}",
        f"--set=train.output_dir={tmp_path / 'runs'}",
        "--set=train.name=cli",
        "--set=train.epochs=1",
        "--set=train.limit_train_batches=1",
    ]
    res = runner.invoke(app, ["cv", "stas_cpu", "--folds", "2", "--quiet", "--method", "base", *args])
    assert res.exit_code == 0, res.output
    root = tmp_path / "runs" / "cli"
    manifest = json.loads((root / MANIFEST).read_text())
    assert {k: v["status"] for k, v in manifest["folds"].items()} == {"0": "done", "1": "done"}
    assert manifest["folds"]["1"]["models"] == ["fold_1"]
    table = read_results(root / "results.csv")
    assert table["method"].tolist() == ["base", "base"] and "mean +- sd" in res.output
    # the CV folder's split has 2 folds: asking for 3 is a one-line error naming the file
    res = runner.invoke(app, ["cv", "stas_cpu", "--folds", "3", "--quiet", *args])
    assert res.exit_code == 1
    assert "split.json: has 2 fold(s), but 3 were asked for" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def fake_fold(cfg, split, fold, fold_dir):
    """A self-scoring fold runner for worker processes (module level: it is pickled by reference)."""
    import os

    return {"mean_dice": 0.5 + fold / 10, "pid": os.getpid(), "threads": cfg.train.threads or 0}


@pytest.mark.slow  # trains a model
def test_fold_parallel_runs_each_fold_in_a_worker_process(synth_stas_dir, tmp_path):
    import os

    cfg = tiny(synth_stas_dir, tmp_path, "train.name=par", "data.n_folds=3", "train.threads=null")
    res = run_cv(cfg, fold_parallel=2, run_method=fake_fold)
    pids = set(res.folds["pid"])
    assert len(res.folds) == 3 and os.getpid() not in pids and 1 <= len(pids) <= 2
    assert (res.folds["threads"] == max(1, (os.cpu_count() or 1) // 2)).all()  # CPU cores shared out
    assert res.summary["metrics"]["mean_dice"]["mean"] == pytest.approx(0.6)


def test_cv_classification_with_self_scored_method(synth_oct_dir, tmp_path):
    """A fold runner may score itself (returns metrics, e.g. a method with its own evaluation)."""
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"train.output_dir={tmp_path / 'runs'}",
            "train.name=octcv",
            "data.n_folds=2",
        ],
    )
    seen = []

    def scored(cfg, split, fold, fold_dir):
        seen.append((fold, cfg.data.fold, cfg.data.split))
        return {"accuracy": 0.5 + fold / 10, "n_images": 3}

    res = run_cv(cfg, run_method=scored, dataset="oct", method="fake")
    assert [s[:2] for s in seen] == [(0, 0), (1, 1)] and seen[0][2].endswith("split.json")
    assert res.summary["primary_metric"] == "accuracy"
    assert res.summary["metrics"]["accuracy"]["mean"] == pytest.approx(0.55)
    assert res.folds[["dataset", "method"]].drop_duplicates().values.tolist() == [["oct", "fake"]]
    assert not (res.root / "oof.csv").exists()  # the method wrote no out-of-fold table


@pytest.mark.slow  # trains a model
def test_cv_scores_classification_models(synth_oct_dir, tmp_path):
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"train.output_dir={tmp_path / 'runs'}",
            "train.name=octreal",
            "data.n_folds=2",
            "model.arch=resnet18",
            "model.pretrained=none",
            "augment.image_size=32",
            "train.epochs=1",
            "train.limit_train_batches=2",
            "train.max_minutes=null",
            "train.threads=1",
            "predict.tta=none",
        ],
    )
    res = run_cv(cfg, folds=[0])
    oof = pd.read_csv(res.root / "oof.csv")
    split = load_split(res.root / "split.json")
    assert sorted(oof["id"]) == sorted(split["folds"][0]["val"])
    probs = oof[[c for c in oof.columns if c.startswith("p_")]]
    assert probs.shape[1] == 4 and probs.sum(axis=1).round(4).eq(1).all()
    acc = (oof["label"] == oof["predicted"]).mean()
    assert res.folds["accuracy"].iloc[0] == pytest.approx(acc)


def test_write_results_merges_on_keys(tmp_path):
    path = tmp_path / "r.csv"
    write_results([{"dataset": "a", "method": "m", "fold": 0, "acc": 0.5}], path)
    df = write_results(
        [
            {"dataset": "a", "method": "m", "fold": 0, "acc": 0.7},
            {"dataset": "a", "method": "m", "fold": 1, "acc": 0.6, "extra": "x"},
        ],
        path,
        merge=True,
    )
    assert df["acc"].tolist() == [0.7, 0.6] and list(df.columns) == [
        "dataset",
        "method",
        "fold",
        "acc",
        "extra",
    ]
    with pytest.raises(DataError, match=r"lacks column\(s\) \['fold'\]"):
        write_results([{"dataset": "a", "method": "m"}], path)
    with pytest.raises(DataError, match="results file not found"):
        read_results(tmp_path / "none.csv")
