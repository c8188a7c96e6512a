"""Noisy Student: pseudo-label selection on hand-made tables, the ignore mask in the loss, and small
self-training runs (segmentation and classification) that finish, summarise and resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CLS, TINY_SEG
from medstudent.cli import app
from medstudent.config import LossConfig, load_config
from medstudent.data.layouts import open_classification
from medstudent.data.splits import save_split, split_from_folders
from medstudent.errors import ConfigError, DataError
from medstudent.selftrain import loop as st_loop
from medstudent.selftrain import run_selftrain, student_config
from medstudent.selftrain.pseudo import (
    IGNORE,
    balance_indices,
    pseudo_mask_agreement,
    seg_pseudo_mask,
    select_cls_pseudo,
)
from medstudent.training.losses import SegmentationLoss

runner = CliRunner()

PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # 0: class 0, confident
        [0.80, 0.10, 0.10],  # 1: class 0, confident
        [0.75, 0.20, 0.05],  # 2: class 0, confident
        [0.10, 0.85, 0.05],  # 3: class 1, confident
        [0.40, 0.35, 0.25],  # 4: unsure
        [0.30, 0.10, 0.60],  # 5: class 2, below 0.7
        [0.05, 0.05, 0.90],  # 6: class 2, confident
    ]
)


def test_threshold_and_hard_labels():
    sel = select_cls_pseudo(PROBS, threshold=0.7)
    assert sel.rows.tolist() == [0, 1, 2, 3, 6]
    assert sel.targets.tolist() == [0, 0, 0, 1, 2]
    assert sel.kept_per_class == {0: 3, 1: 1, 2: 1}
    assert np.allclose(sel.confidence, [0.9, 0.8, 0.75, 0.85, 0.9])
    assert select_cls_pseudo(PROBS, threshold=0.95).rows.size == 0


def test_soft_labels_keep_the_probability_vectors():
    sel = select_cls_pseudo(PROBS, threshold=0.55, soft=True)
    assert sel.rows.tolist() == [0, 1, 2, 3, 5, 6]
    assert sel.targets.shape == (6, 3)
    assert np.allclose(sel.targets, PROBS[[0, 1, 2, 3, 5, 6]])


def test_balancing_downsamples_large_and_duplicates_small_classes():
    sel = select_cls_pseudo(PROBS, threshold=0.7, balance=True, seed=3)
    # kept 3/1/1 -> mean class size 5/3 rounds to 2: class 0 down to 2, classes 1 and 2 duplicated to 2
    assert sel.balanced_per_class == {0: 2, 1: 2, 2: 2}
    assert sel.kept_per_class == {0: 3, 1: 1, 2: 1}
    rows = sel.rows.tolist()
    assert rows.count(3) == 2 and rows.count(6) == 2
    assert len({r for r in rows if r in (0, 1, 2)}) == 2  # two distinct class-0 images, no duplicate
    assert sel.targets.tolist().count(0) == 2


def test_balance_indices_explicit_target():
    labels = np.array([0] * 10 + [1] * 3 + [2])
    idx = balance_indices(labels, np.random.default_rng(0), target=4)
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [4, 4, 4]
    assert set(idx[labels[idx] == 1]) == {10, 11, 12}  # all small-class members used before repeats
    assert balance_indices(np.array([], int), np.random.default_rng(0)).size == 0


def test_seg_pseudo_mask_ignores_unsure_pixels():
    prob = np.array([[0.95, 0.6, 0.5], [0.05, 0.35, 0.2]], np.float32)
    mask, frac = seg_pseudo_mask(prob, threshold=0.8)
    assert mask.tolist() == [[1, IGNORE, IGNORE], [0, IGNORE, 0]]
    assert frac == pytest.approx(3 / 6)
    multi = np.stack([1 - prob, prob * 0.5, prob * 0.5])  # 3 classes
    mask3, _ = seg_pseudo_mask(multi, threshold=0.8)
    assert mask3[1, 0] == 0 and (mask3[0] == IGNORE).all()
    hard = np.array([[0, 0, 0], [1, 1, 1]])
    mask_h, _ = seg_pseudo_mask(prob, threshold=0.8, hard=hard)
    assert mask_h.tolist() == [[0, IGNORE, IGNORE], [1, IGNORE, 1]]
    agree = pseudo_mask_agreement(mask, np.array([[1, 1, 0], [0, 0, 0]]))
    assert agree["pixel_precision"] == 1.0 and agree["dice"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("loss", ["dice_focal", "dice_bce", "bce"])
def test_ignored_pixels_get_zero_gradient(loss):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8))
    target[:, :4] = IGNORE
    crit = SegmentationLoss(LossConfig(name=loss), out_channels=1)
    crit(logits, target).backward()
    g = logits.grad[:, 0]
    assert torch.all(g[:, :4] == 0)
    assert torch.any(g[:, 4:] != 0)


def test_student_config_adds_noise_and_larger_encoder(synth_stas_dir, tmp_path):
    cfg = load_config(
        "stas_cpu",
        [
            f"data.root={synth_stas_dir}",
            "selftrain.student_encoder=[efficientnet_lite0,efficientnet_lite1]",
            "selftrain.student_augment={randaugment: 0.5}",
            "selftrain.student_overrides={train: {epochs: 3}}",
        ],
    )
    s1, s2 = student_config(cfg, 1), student_config(cfg, 2)
    assert s1.model.encoder == "efficientnet_lite0" and s2.model.encoder == "efficientnet_lite1"
    assert s1.model.dropout == 0.2 and s1.model.drop_path_rate == 0.2
    assert s1.augment.randaugment == 0.5 and s1.train.epochs == 3
    with pytest.raises(ConfigError):
        student_config(
            cfg.model_copy(
                update={"selftrain": cfg.selftrain.model_copy(update={"student_overrides": {"x": 1}})}
            ),
            1,
        )


SEG = [
    *TINY_SEG,
    "train.epochs=2",
    "optim.lr=0.003",
    "data.test_fraction=4",
    "data.n_folds=3",
    "predict.tta=none",
    "selftrain.labeled_fraction=0.5",
    "selftrain.threshold=0.6",
    "selftrain.min_confident_fraction=0.5",
    "selftrain.unlabeled_fraction=0.5",
    "selftrain.stop_when_worse=false",
    "selftrain.num_students=2",
    "selftrain.student_dropout=0.1",
    "selftrain.student_drop_path_rate=0.1",
]


@pytest.mark.slow  # trains a model
def test_segmentation_selftrain_two_rounds_then_resume(synth_stas_dir, tmp_path, monkeypatch):
    cfg = load_config("stas_cpu", [f"data.root={synth_stas_dir}", f"train.output_dir={tmp_path}", *SEG])
    real = st_loop.make_pseudo_labels
    calls = []

    def interrupted(*a, **k):  # the run is stopped while making round 2's pseudo labels
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(st_loop, "make_pseudo_labels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_selftrain(cfg, progress=False, log=lambda m: None)
    root = tmp_path / cfg.train.name
    state = json.loads((root / "selftrain.json").read_text())
    assert state["rounds"]["1"]["gate"] == "accepted" and "val_metric" not in state["rounds"].get("2", {})
    r1_ckpt = root / "round_1" / "checkpoints" / "best.ckpt"
    r0_ckpt = root / "round_0" / "checkpoints" / "best.ckpt"
    stamps = (r0_ckpt.stat().st_mtime_ns, r1_ckpt.stat().st_mtime_ns)

    with pytest.raises(DataError, match="--resume"):
        run_selftrain(cfg, progress=False, log=lambda m: None)
    monkeypatch.setattr(st_loop, "make_pseudo_labels", real)
    summary = run_selftrain(cfg, resume=True, progress=False, log=lambda m: None)

    assert (r0_ckpt.stat().st_mtime_ns, r1_ckpt.stat().st_mtime_ns) == stamps  # finished rounds not redone
    assert [r["role"] for r in summary["rounds"]] == ["teacher", "student_1", "student_2"]
    plan = json.loads((root / "plan.json").read_text())
    split = json.loads((root / "split.json").read_text())
    fold = split["folds"][0]
    assert fold["train"] == plan["labeled"] and fold["hidden"] == plan["hidden"]
    assert not set(plan["labeled"]) & set(plan["hidden"]) and plan["unlabeled"]
    for r in (1, 2):
        pseudo = pd.read_csv(root / f"round_{r}" / "pseudo" / "pseudo.csv")
        stats = json.loads((root / f"round_{r}" / "pseudo" / "stats.json").read_text())
        assert (
            stats["predicted"] == len(pseudo) == round(0.5 * (len(plan["hidden"]) + len(plan["unlabeled"])))
        )
        hidden = pseudo[pseudo["source"] == "hidden"]
        assert hidden["dice"].between(0, 1).all() and hidden["pixel_precision"].between(0, 1).all()
        for name in pseudo.loc[pseudo["kept"] == 1, "mask"]:
            m = np.asarray(
                __import__("PIL.Image").Image.open(root / f"round_{r}" / "pseudo" / "masks" / name)
            )
            assert set(np.unique(m)) <= {0, 1, IGNORE}
    r1 = set(pd.read_csv(root / "round_1" / "pseudo" / "pseudo.csv")["id"])
    r2 = set(pd.read_csv(root / "round_2" / "pseudo" / "pseudo.csv")["id"])
    assert not r1 & r2  # a fresh subset of the pool each round
    table = pd.read_csv(root / "summary.csv")
    assert table["round"].tolist() == [0, 1, 2] and table["val_metric"].between(0, 1).all()
    results = pd.read_csv(root / "results.csv")
    # the primary metric first, then the scorer's other columns (as `cv` writes them)
    assert list(results.columns) == [
        "dataset", "method", "fold", "mean_dice", "mean_dice_raw", "pooled_dice", "mean_iou", "n_images"
    ]  # fmt: skip
    assert results["mean_dice_raw"].between(0, 1).all() and (results["n_images"] == len(fold["val"])).all()
    assert results["method"].tolist() == ["teacher", "student_1", "student_2"]
    assert results["mean_dice"].tolist() == table["val_metric"].tolist()
    assert pd.read_csv(root / "test_results.csv")["mean_dice"].tolist() == table["test_metric"].tolist()
    cfg2 = json.loads(
        json.dumps(__import__("yaml").safe_load((root / "round_2" / "config.yaml").read_text()))
    )
    assert cfg2["model"]["dropout"] == 0.1 and cfg2["model"]["drop_path_rate"] == 0.1


@pytest.mark.slow  # trains a model
def test_gate_stops_when_the_student_is_not_better(synth_stas_dir, tmp_path, monkeypatch):
    cfg = load_config(
        "stas_cpu",
        [
            f"data.root={synth_stas_dir}",
            f"train.output_dir={tmp_path}",
            *SEG,
            "selftrain.stop_when_worse=true",
        ],
    )
    scores = iter([0.8, 0.7, 0.6, 0.5])  # teacher val/test, then student 1 val/test
    monkeypatch.setattr(st_loop, "score_round", lambda *a, **k: {"mean_dice": next(scores)})
    logs: list[str] = []
    summary = run_selftrain(cfg, progress=False, log=logs.append)
    assert [r["gate"] for r in summary["rounds"]] == ["teacher", "rejected"]
    assert summary["best_round"] == 0
    assert any("did not beat its teacher" in m for m in logs)
    assert not (tmp_path / cfg.train.name / "round_2").exists()


@pytest.mark.slow  # trains a model
def test_classification_selftrain_cli_with_hidden_labels(synth_oct_dir, tmp_path):
    ds = open_classification(synth_oct_dir)
    save_split(split_from_folders(ds), tmp_path / "split.json")
    args = [
        f"data.root={synth_oct_dir}",
        f"data.split={tmp_path / 'split.json'}",
        "augment.image_size=64",
        "model.arch=resnet10t",
        "model.pretrained=none",
        "train.epochs=3",
        "train.batch_size=8",
        "train.max_minutes=null",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.name=ns",
        "optim.lr=0.003",
        "selftrain.labeled_fraction=0.5",
        "selftrain.threshold=0.0",  # a 3-epoch teacher is unsure; selection itself is tested above
        "selftrain.num_students=1",
        "selftrain.ensemble_size=2",
        "selftrain.soft=true",
        "selftrain.tta=none",
    ]
    res = runner.invoke(app, ["selftrain", "oct_cpu", "--quiet", *sum([["--set", a] for a in args], [])])
    assert res.exit_code == 0, res.output
    assert "best round" in res.output
    root = tmp_path / "runs" / "ns"
    for m in (0, 1):
        assert (root / "round_0" / f"member_{m}" / "checkpoints" / "best.ckpt").is_file()
        assert (root / "round_1" / f"member_{m}" / "checkpoints" / "best.ckpt").is_file()
    stats = json.loads((root / "round_1" / "pseudo" / "stats.json").read_text())
    assert stats["task"] == "classification" and stats["scored_against_hidden"] > 0
    assert 0 <= stats["pseudo_precision"] <= 1
    assert len(set(stats["balanced_per_class"].values()) - {0}) <= 1  # balanced: one size per present class
    pseudo = pd.read_csv(root / "round_1" / "pseudo" / "pseudo.csv")
    probs = pseudo[[c for c in pseudo.columns if c.startswith("p_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert np.allclose(pseudo["confidence"], probs.max(1), atol=1e-4)
    assert stats["kept"] == pseudo["id"].nunique() and stats["training_rows"] == len(pseudo)
    distinct = pseudo.drop_duplicates("id").dropna(subset=["hidden_label"])
    assert stats["pseudo_precision"] == pytest.approx(
        (distinct["label"] == distinct["hidden_label"]).mean(), abs=1e-5
    )
    plan = json.loads((root / "plan.json").read_text())
    n_train = len(json.loads((tmp_path / "split.json").read_text())["folds"][0]["train"])
    assert len(plan["labeled"]) + len(plan["hidden"]) == n_train
    assert 0 < len(plan["labeled"]) < n_train


def test_selftrain_without_a_pool_is_a_clear_error(synth_oct_dir, tmp_path):
    ds = open_classification(synth_oct_dir)
    save_split(split_from_folders(ds), tmp_path / "split.json")
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"data.split={tmp_path / 'split.json'}",
            f"train.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(ConfigError, match="unlabeled"):
        run_selftrain(cfg, progress=False, log=lambda m: None)


@pytest.mark.slow  # trains a model
def test_cv_runs_noisy_student_per_fold(synth_oct_dir, tmp_path):
    """`medstudent cv` on a config with a selftrain section cross-validates Noisy Student: each fold is a
    self-training run and the fold is scored with its best round's models."""
    from medstudent.experiments.cv import run_cv

    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"train.output_dir={tmp_path / 'runs'}",
            "train.name=nscv",
            "data.n_folds=2",
            *TINY_CLS,
            "predict.tta=none",
            "selftrain.labeled_fraction=0.5",
            "selftrain.threshold=0.0",
            "selftrain.num_students=1",
            "selftrain.stop_when_worse=false",
            "selftrain.tta=none",
        ],
    )
    res = run_cv(cfg)
    for k in (0, 1):
        fold = res.root / f"fold_{k}"
        state = json.loads((fold / "selftrain.json").read_text())
        assert state["best_round"] == 1 and (fold / "round_1" / "checkpoints" / "best.ckpt").is_file()
        own = pd.read_csv(fold / "results.csv")  # the fold's own teacher-vs-student table
        assert own["method"].tolist() == ["teacher", "student_1"]
    assert len(res.folds) == 2 and res.folds["accuracy"].between(0, 1).all()
