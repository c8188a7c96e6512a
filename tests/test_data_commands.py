"""`medstudent data check|stats|split` and `synth`, on synthetic data and on ../shared/data when present."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import shared_path
from medstudent.cli import app
from medstudent.data.layouts import open_classification, open_segmentation
from medstudent.data.splits import area_bins, fold_ids, load_split, make_split
from medstudent.errors import DataError

runner = CliRunner()


def run(*args: str, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


def test_check_synthetic_stas_json(synth_stas_dir):
    res = run("data", "check", synth_stas_dir, "--json")
    rep = json.loads(res.stdout)
    assert rep["layout"] == "labelme" and rep["ok"]
    assert rep["counts"]["pairs"] == 16 and rep["counts"]["unlabeled_images"] == 4
    assert rep["counts"]["empty_masks"] >= 1 and rep["errors"] == []


def test_check_finds_problems_and_fails(synth_stas_dir, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synth_stas_dir, root)
    imgs = sorted((root / "Train_Images").glob("*.jpg"))
    shutil.copy(imgs[0], root / "Train_Images" / "dup.jpg")  # duplicate content, no annotation
    (root / "Train_Images" / imgs[1].name).write_bytes(b"garbage")  # corrupt
    anns = sorted((root / "Train_Annotations").glob("*.json"))
    shutil.copy(anns[2], root / "Train_Annotations" / "lonely.json")  # annotation without image
    doc = json.loads(anns[3].read_text())
    doc["shapes"].append(
        {"label": "STAS", "points": [[-10, -10], [20, -10], [20, 20]], "shape_type": "polygon"}
    )
    anns[3].write_text(json.dumps(doc))
    res = run("data", "check", root, "--json", code=1)
    rep = json.loads(res.stdout)
    assert not rep["ok"]
    assert any("dup.jpg" in " ".join(d) for d in rep["duplicates"])
    assert any(imgs[1].name in e and "cannot read image" in e for e in rep["errors"])
    assert any("dup.jpg: image has no annotation" in e for e in rep["errors"])
    assert any("lonely.json: annotation has no image" in e for e in rep["errors"])
    assert any(anns[3].name in o for o in rep["out_of_bounds"])
    # --skip-bad moves the unreadable file to `skipped`
    rep2 = json.loads(run("data", "check", root, "--json", "--skip-bad", code=1).stdout)
    assert any(imgs[1].name in s for s in rep2["skipped"])
    assert not any(imgs[1].name in e and "cannot read" in e for e in rep2["errors"])
    # the rich table output runs too and names the error count
    assert "error(s)" in run("data", "check", root, code=1).output


def test_check_classification_and_unlabeled(synth_oct_dir, synth_stas_dir):
    rep = json.loads(run("data", "check", synth_oct_dir, "--json").stdout)
    assert rep["layout"] == "classification"
    assert list(rep["classes"]) == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert set(rep["modes"]) == {"L", "RGB"} and len(rep["sizes"]) >= 2
    rep = json.loads(run("data", "check", synth_stas_dir / "Unlabeled_Images", "--json").stdout)
    assert rep["layout"] == "unlabeled" and rep["counts"]["images"] == 4


def test_cli_bad_path_is_one_line(tmp_path):
    res = runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing: not a folder" in lines[0]


def test_stats_outputs(synth_stas_dir, tmp_path):
    out = tmp_path / "stats"
    run("data", "stats", synth_stas_dir, "-o", out)
    images = pd.read_csv(out / "images.csv")
    objects = pd.read_csv(out / "objects.csv")
    assert len(images) == 16
    assert {"objects", "foreground_px", "area_fraction", "objects_touching_border"} <= set(images.columns)
    assert {"area_px", "touches_border", "area_fraction"} <= set(objects.columns)
    assert images["objects"].sum() == len(objects)
    for png in ("objects_per_image.png", "object_areas.png"):
        assert Image.open(out / png).size[0] > 100


def test_split_segmentation_reproducible_and_stratified(synth_stas_dir, tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    run("data", "split", synth_stas_dir, "-o", a, "--folds", "3", "--test", "0.25", "--seed", "3")
    run("data", "split", synth_stas_dir, "-o", b, "--folds", "3", "--test", "0.25", "--seed", "3")
    run("data", "split", synth_stas_dir, "-o", c, "--folds", "3", "--test", "0.25", "--seed", "4")
    sa, sb, sc = (json.loads(p.read_text()) for p in (a, b, c))
    assert sa == sb and sa["test"] != sc["test"] or sa["folds"] != sc["folds"]
    ds = open_segmentation(synth_stas_dir)
    split = load_split(a, ds)
    assert len(split["test"]) == 4 and len(split["folds"]) == 3
    vals = [set(f["val"]) for f in split["folds"]]
    assert set().union(*vals) | set(split["test"]) == set(ds.ids())
    assert all(not (v & set(split["test"])) for v in vals)
    tr, va, te = fold_ids(split, 1)
    assert not set(tr) & set(va)
    with pytest.raises(DataError, match="fold 7 does not exist"):
        fold_ids(split, 7)


def test_area_bins_empty_bin_and_quantiles():
    fr = np.array([0, 0, 0.001, 0.002, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    b = area_bins(fr, 7)
    assert (b[:2] == 0).all() and (b[2:] >= 1).all() and b.max() == 6
    assert (np.diff(b[2:]) >= 0).all()


def test_split_classification_grouped_by_patient(synth_oct_dir):
    ds = open_classification(synth_oct_dir)
    split = make_split(ds, test_fraction=0.2, n_folds=3, seed=0)
    group = {it.id: it.group for it in ds.items}
    test_groups = {group[i] for i in split["test"]}
    for f in split["folds"]:
        tr, va = {group[i] for i in f["train"]}, {group[i] for i in f["val"]}
        assert not (tr & va) and not (tr & test_groups) and not (va & test_groups)
    labels = {it.id: it.label for it in ds.items}
    assert len({labels[i] for i in split["test"]}) == 4  # stratified: every class in test
    assert make_split(ds, 0.2, 3, seed=0) == split


def test_split_from_folders(synth_oct_dir, tmp_path):
    out = tmp_path / "s.json"
    run("data", "split", synth_oct_dir, "-o", out, "--from-folders")
    s = json.loads(out.read_text())
    assert all(i.startswith("train/") for i in s["folds"][0]["train"])
    assert all(i.startswith("val/") for i in s["folds"][0]["val"])
    assert all(i.startswith("test/") for i in s["test"])


def test_split_bad_file_errors(tmp_path, synth_stas_dir):
    p = tmp_path / "x.json"
    p.write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a medstudent split file"):
        load_split(p)
    good = tmp_path / "g.json"
    run("data", "split", synth_stas_dir, "-o", good, "--folds", "2")
    s = json.loads(good.read_text())
    s["test"].append("Train_Images/ghost")
    good.write_text(json.dumps(s))
    with pytest.raises(DataError, match="names 1 image\\(s\\) not in .* e.g. Train_Images/ghost"):
        load_split(good, open_segmentation(synth_stas_dir))


def test_synth_cli(tmp_path):
    run("synth", "stas", tmp_path / "s", "--n", "3", "--width", "128", "--height", "96", "--n-unlabeled", "1")
    assert len(list((tmp_path / "s" / "Train_Images").glob("*.jpg"))) == 3
    run("synth", "oct", tmp_path / "o", "--n", "8", "--size", "64")
    assert (tmp_path / "o" / "train").is_dir()
    res = runner.invoke(app, ["synth", "mri", str(tmp_path / "x")])
    assert res.exit_code == 1 and "unknown task 'mri'" in res.output


# ---------------------------------------------- real data (skipped when ../shared is absent)
@pytest.mark.slow  # reads every real STAS image
@pytest.mark.shared_data
def test_shared_stas_check_and_area_statistics(tmp_path):
    root = shared_path("stas")
    rep = json.loads(run("data", "check", root, "--json").stdout)
    assert rep["layout"] == "labelme" and rep["ok"], rep["errors"][:3]
    assert rep["counts"]["pairs"] == 320 and rep["counts"]["unlabeled_images"] == 120
    assert rep["sizes"] == {"1716x942": 440}
    out = tmp_path / "stats"
    run("data", "stats", root, "-o", out)
    images = pd.read_csv(out / "images.csv")
    objects = pd.read_csv(out / "objects.csv")
    assert images["area_fraction"].mean() == pytest.approx(0.016, abs=0.005)  # README: about 1.6%
    assert objects["area_px"].min() < 100 and objects["area_px"].max() > 200_000
    assert objects["touches_border"].any()


@pytest.mark.shared_data
def test_shared_oct_check_and_patient_split(tmp_path):
    root = shared_path("oct")
    rep = json.loads(run("data", "check", root, "--json").stdout)
    assert rep["ok"] and list(rep["classes"]) == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert rep["counts"]["images"] == 112 and set(rep["modes"]) >= {"L"}
    out = tmp_path / "split.json"
    run("data", "split", root, "-o", out, "--folds", "3", "--test", "0.2")
    split = json.loads(out.read_text())
    ds = open_classification(root)
    group = {it.id: it.group for it in ds.items}
    test_groups = {group[i] for i in split["test"]}
    for f in split["folds"]:
        assert not ({group[i] for i in f["train"]} & ({group[i] for i in f["val"]} | test_groups))


@pytest.mark.slow  # reads every real STAS annotation
@pytest.mark.shared_data
def test_shared_stas_split_64_held_out(tmp_path):
    root = shared_path("stas")
    out = tmp_path / "split.json"
    run("data", "split", root, "-o", out, "--test", "64", "--folds", "5")
    split = json.loads(out.read_text())
    assert len(split["test"]) == 64 and len(split["folds"]) == 5
    bins = split["strata"]
    test_bins = np.bincount([bins[i] for i in split["test"]], minlength=7)
    all_bins = np.bincount(list(bins.values()), minlength=7)
    assert np.abs(test_bins / 64 - all_bins / 320).max() < 0.05  # stratified by area bin
