"""Classification end to end on synthetic OCT: learns above chance, predicts a CSV, evaluates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import shared_path
from medstudent.cli import app
from medstudent.config import load_config
from medstudent.data.layouts import open_classification
from medstudent.data.splits import save_split, split_from_folders
from medstudent.data.transforms import cls_eval_transform, cls_train_transform
from medstudent.training.data import ClsTorchDataset
from medstudent.training.train import train

runner = CliRunner()


def folder_split_cfg(root, tmp, *overrides: str):
    """The OCT data set at `root` with its train/val folders as the split, and oct_cpu with `overrides`."""
    ds = open_classification(root)
    save_split(split_from_folders(ds), tmp / "split.json")
    return ds, load_config("oct_cpu", [f"data.root={root}", f"data.split={tmp / 'split.json'}", *overrides])


@pytest.fixture(scope="module")
def oct_run(synth_oct_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("octrun")
    ds = open_classification(synth_oct_dir)
    save_split(split_from_folders(ds), tmp / "split.json")
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"data.split={tmp / 'split.json'}",
            "augment.image_size=64",
            "model.arch=resnet18",
            "model.pretrained=none",
            "train.epochs=6",
            "train.batch_size=8",
            "train.max_minutes=null",
            f"train.output_dir={tmp / 'runs'}",
            "train.name=oct_tiny",
            "optim.lr=0.003",
            "loss.label_smoothing=0",
        ],
    )
    return train(cfg, progress=False)


@pytest.mark.slow  # trains a model
def test_tiny_classifier_learns_above_chance(oct_run):
    m = json.loads((oct_run / "metrics.json").read_text())
    assert m["task"] == "classification" and m["metric"] == "val_acc"
    assert m["best_val_metric"] > 0.4  # 4 balanced classes: chance is 0.25
    log = pd.read_csv(oct_run / "logs" / "metrics.csv").dropna(subset=["train_loss"])
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]


@pytest.mark.slow  # trains a model
def test_predict_csv_and_evaluate(oct_run, synth_oct_dir, tmp_path):
    out = tmp_path / "pred"
    res = runner.invoke(
        app, ["predict", str(oct_run), "-i", str(synth_oct_dir / "test"), "-o", str(out), "--tta", "flip"]
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "predictions.csv")
    classes = ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert list(df.columns) == ["id", "path", *[f"p_{c}" for c in classes], "predicted", "confidence"]
    probs = df[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (df["predicted"] == [classes[i] for i in probs.argmax(1)]).all()
    ds = open_classification(synth_oct_dir)
    assert len(df) == len(ds.subset("test"))
    res = runner.invoke(app, ["evaluate", str(out), str(synth_oct_dir / "test"), "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    y = np.array([classes.index(p.split("/")[-2]) for p in df["path"]])
    assert s["accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
    assert [r["class"] for r in s["per_class"]] == classes
    for png in ("confusion_matrix.png", "confusion_matrix_normalized.png"):
        assert (tmp_path / "ev" / png).is_file()


def test_mixed_modes_and_sizes_batch_together(tmp_path):
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    shapes = [("A", (60, 80)), ("A", (50, 50, 3)), ("B", (90, 70)), ("B", (40, 64, 3))]  # L and RGB
    for k, (cls, shape) in enumerate(shapes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / cls / f"{cls}-{k}-1.jpeg")
    ds = open_classification(root)
    cfg = load_config("oct_cpu", ["augment.image_size=48"]).augment
    for in_ch in (1, 3):
        for t in (cls_train_transform(cfg, in_ch), cls_eval_transform(cfg, in_ch)):
            tds = ClsTorchDataset(ds, range(len(ds)), t, num_classes=2)
            batch = torch.utils.data.default_collate([tds[i] for i in range(len(tds))])
            assert batch["image"].shape == (4, in_ch, 48, 48)
            assert batch["target"].shape == (4, 2) and batch["label"].tolist() == [0, 0, 1, 1]


@pytest.mark.shared_data
def test_shared_oct_mixed_inputs_load_as_one_batch():
    root = shared_path("oct")
    ds = open_classification(root)
    cfg = load_config("oct_cpu").augment
    tds = ClsTorchDataset(
        ds, [ds.subset("train")[0], ds.subset("val")[0]], cls_eval_transform(cfg, 3), num_classes=4
    )
    batch = torch.utils.data.default_collate([tds[0], tds[1]])
    assert batch["image"].shape == (2, 3, 224, 224)


def test_class_weights_and_balanced_sampling(synth_oct_dir, tmp_path):
    from medstudent.training.loaders import class_weights_for, make_loaders, prepare_data

    ds = open_classification(synth_oct_dir)
    keep = [i for i, it in enumerate(ds.items) if it.subset == "train"]
    # make the training set imbalanced: drop most NORMAL images
    normal = ds.class_names.index("NORMAL")
    drop = [i for i in keep if ds.items[i].label == normal][2:]
    keep = [i for i in keep if i not in drop]
    split = split_from_folders(ds)
    split["folds"][0]["train"] = [ds.items[i].id for i in keep]
    save_split(split, tmp_path / "s.json")
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            f"data.split={tmp_path / 's.json'}",
            "loss.class_weights=balanced",
            "train.balanced_sampling=true",
            "augment.image_size=32",
            "train.batch_size=4",
        ],
    )
    prep = prepare_data(cfg)
    w = class_weights_for(cfg, prep)
    counts = np.bincount([ds.items[i].label for i in prep.train_idx], minlength=4)
    np.testing.assert_allclose(w, len(prep.train_idx) / (4 * counts))
    assert w[normal] == max(w)
    loader, _ = make_loaders(cfg, prep)
    torch.manual_seed(0)
    seen = np.bincount(np.concatenate([b["label"].numpy() for _ in range(8) for b in loader]), minlength=4)
    assert seen[normal] / seen.sum() > 2 * counts[normal] / counts.sum()  # sampler over-draws the rare class


def test_balanced_sampling_draws_pseudo_labelled_samples_too(synth_oct_dir, tmp_path):
    """With self-training's extra (pseudo-labelled) samples, the class-balanced sampler draws from the
    labelled and the pseudo-labelled images alike, balanced over both."""
    from medstudent.training.loaders import make_loaders, prepare_data

    ds, cfg = folder_split_cfg(
        synth_oct_dir, tmp_path, "train.balanced_sampling=true", "augment.image_size=32", "train.batch_size=4"
    )
    prep = prepare_data(cfg)
    normal = ds.class_names.index("NORMAL")
    pool = [i for i in prep.val_idx][:6]  # stand-ins for unlabelled images, all pseudo-labelled NORMAL
    extra = ClsTorchDataset(ds, pool, None, labels=dict.fromkeys(pool, normal), num_classes=4)
    loader, _ = make_loaders(cfg, prep, extra_train=extra)
    n_labelled = len(prep.train_idx)
    assert len(loader.sampler) == n_labelled + len(pool)
    drawn = np.array([k for _ in range(10) for k in loader.sampler])
    assert (drawn >= n_labelled).any()  # pseudo-labelled samples are drawn
    labels = [ds.items[i].label for i in prep.train_idx] + [normal] * len(pool)
    seen = np.bincount(np.array(labels)[drawn], minlength=4)
    assert seen.min() / seen.max() > 0.6  # balanced over both parts
