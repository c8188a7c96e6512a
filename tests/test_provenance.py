"""Reproducibility record: env.json of every run and export, the data fingerprint, MODEL_CARD.md of an export
built from what the run recorded."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from medstudent.cli import app
from medstudent.data.layouts import open_dataset
from medstudent.provenance import data_fingerprint, dataset_files, environment
from medstudent.rundir import RunDir
from medstudent.training.train import train
from test_training import tiny_cfg


def test_environment_names_versions_hardware_seed_and_precision():
    env = environment(seed=3, precision="bf16")
    assert env["seed"] == 3 and env["precision"] == "bf16" and env["cpu"] and env["python"].startswith("3.")
    assert env["versions"]["torch"] and env["versions"]["medstudent"]
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40


def test_data_fingerprint_follows_names_sizes_and_labels(synth_stas_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_stas_dir, data)
    fp = data_fingerprint(dataset_files(open_dataset(data)))
    assert fp == data_fingerprint(dataset_files(open_dataset(data)))  # stable
    assert fp["items"] == len(open_dataset(data).items)
    ann = sorted((data / "Train_Annotations").glob("*.json"))[0]
    doc = json.loads(ann.read_text())
    doc["shapes"] = doc["shapes"][:-1] if doc["shapes"] else doc["shapes"]
    doc["imagePath"] = doc["imagePath"] + " "  # a label edit that may keep the size: content is hashed
    ann.write_text(json.dumps(doc))
    assert data_fingerprint(dataset_files(open_dataset(data)))["sha256"] != fp["sha256"]


@pytest.mark.slow  # trains a tiny model
def test_runs_and_exports_record_env_and_a_model_card(synth_stas_dir, tmp_path):
    run = train(tiny_cfg(synth_stas_dir, tmp_path, "train.epochs=1", "train.name=prov"), progress=False)
    env = json.loads(RunDir(run).env.read_text())
    assert env["seed"] == 0 and env["precision"] == "32" and env["data_fingerprint"]["items"] > 0
    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["export", str(run), "-o", str(out)])
    assert res.exit_code == 0, res.output
    exported = json.loads((out / "env.json").read_text())
    assert exported["data_fingerprint"] == env["data_fingerprint"]
    card = (out / "MODEL_CARD.md").read_text()
    for needle in (
        "## Intended use",
        "classes: background, STAS",
        env["data_fingerprint"]["sha256"],
        "best validation val_dice",
        "TTA flip",
        "Trained on synthetic data",
        "Research use only",
        "not recorded",  # no data.mpp
        "Has GroupNorm",  # the tiny FPN's decoder: whole-slide regions and tiles can differ
    ):
        assert needle in card, needle
