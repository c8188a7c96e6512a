"""nnU-Net v2 and MONAI interop: `data export-nnunet`, `data export-monai`, and nnU-Net raw folders read back
as an input layout (with splits_final.json as a split)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import shared_path
from medstudent.cli import app
from medstudent.data.io import read_image, read_mask
from medstudent.data.layouts import SegItem, detect_layout, open_dataset
from medstudent.data.nnunet import case_id, case_ids, export_nnunet
from medstudent.data.splits import load_split, make_split, save_split
from medstudent.errors import DataError

runner = CliRunner()


def run(*args: object, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def stas_split(synth_stas_dir, tmp_path_factory):
    ds = open_dataset(synth_stas_dir)
    split = make_split(ds, test_fraction=4, n_folds=3, seed=0)
    path = tmp_path_factory.mktemp("split") / "split.json"
    save_split(split, path)
    return ds, split, path


@pytest.fixture(scope="module")
def nnunet_export(stas_split, tmp_path_factory):
    ds, split, split_path = stas_split
    out = tmp_path_factory.mktemp("raw") / "Dataset501_STAS"
    run("data", "export-nnunet", ds.root, "-o", out, "--split", split_path)
    return out


def test_export_nnunet_layout(stas_split, nnunet_export):
    ds, split, _ = stas_split
    out = nnunet_export
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dj["labels"] == {"background": 0, "STAS": 1}
    assert dj["file_ending"] == ".png" and dj["numTraining"] == len(ds) - 4
    names = lambda sub: sorted(p.name for p in (out / sub).iterdir())  # noqa: E731
    cases = case_ids(ds)
    train = [i for i in ds.ids() if i not in split["test"]]
    assert names("imagesTr") == sorted(f"{cases[i]}_0000.png" for i in train)
    assert names("labelsTr") == sorted(f"{cases[i]}.png" for i in train)
    assert names("imagesTs") == sorted(f"{cases[i]}_0000.png" for i in split["test"])
    folds = json.loads((out / "splits_final.json").read_text())
    assert folds == [
        {"train": [cases[i] for i in f["train"]], "val": [cases[i] for i in f["val"]]} for f in split["folds"]
    ]
    i = ds.ids().index(train[0])
    img, mask = ds.load(i)
    lab = np.asarray(Image.open(out / "labelsTr" / f"{cases[train[0]]}.png"))
    assert lab.dtype == np.uint8 and np.array_equal(lab, mask)  # class ids, not 0/255
    assert np.array_equal(np.asarray(Image.open(out / "imagesTr" / f"{cases[train[0]]}_0000.png")), img)


def test_nnunet_round_trip(stas_split, nnunet_export):
    ds, split, _ = stas_split
    assert detect_layout(nnunet_export) == "nnunet"
    back = open_dataset(nnunet_export)
    cases = case_ids(ds)
    assert sorted(back.ids()) == sorted(cases.values())
    assert back.class_names == ["background", "STAS"]
    index = {it.id: i for i, it in enumerate(back.items)}
    for i, mid in enumerate(ds.ids()):
        img, mask = ds.load(i)
        img2, mask2 = back.load(index[cases[mid]])
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2), mid
    sp = load_split(nnunet_export / "splits_final.json", back)
    assert sp["test"] == sorted(cases[i] for i in split["test"])
    assert sp["folds"] == [
        {"train": sorted(cases[i] for i in f["train"]), "val": sorted(cases[i] for i in f["val"])}
        for f in split["folds"]
    ]


def test_data_split_from_nnunet(stas_split, nnunet_export, tmp_path):
    ds, split, _ = stas_split
    out = tmp_path / "s.json"
    run("data", "split", nnunet_export, "--from-nnunet", nnunet_export / "splits_final.json", "-o", out)
    sp = load_split(out, open_dataset(nnunet_export))  # a plain medstudent split now: every command reads it
    cases = case_ids(ds)
    assert sp["test"] == sorted(cases[i] for i in split["test"]) and len(sp["folds"]) == 3
    res = run("data", "split", ds.root, "--from-nnunet", nnunet_export / "splits_final.json", code=1)
    assert "needs an nnU-Net raw data set folder" in res.output


def test_export_nnunet_without_split(synth_stas_dir, tmp_path):
    out = tmp_path / "Dataset002_All"
    run("data", "export-nnunet", synth_stas_dir, "-o", out)
    assert len(list((out / "imagesTr").iterdir())) == 16 and not (out / "imagesTs").exists()
    assert not (out / "splits_final.json").exists()


@pytest.mark.parametrize("name", ["STAS", "Dataset1_STAS", "Dataset001", "Dataset001_"])
def test_export_nnunet_refuses_bad_folder_name(synth_stas_dir, tmp_path, name):
    res = run("data", "export-nnunet", synth_stas_dir, "-o", tmp_path / name, code=1)
    assert "DatasetNNN_Name" in res.output and len(res.output.strip().splitlines()) == 1


def test_export_nnunet_refuses_non_empty_folder_and_classification(synth_stas_dir, synth_oct_dir, tmp_path):
    out = tmp_path / "Dataset003_X"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert "not empty" in run("data", "export-nnunet", synth_stas_dir, "-o", out, code=1).output
    res = run("data", "export-nnunet", synth_oct_dir, "-o", tmp_path / "Dataset004_Y", code=1)
    assert "not a segmentation data set" in res.output


def test_export_nnunet_bad_image_leaves_nothing(synth_stas_dir, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synth_stas_dir, root)
    bad = sorted((root / "Train_Images").glob("*.jpg"))[3]
    bad.write_bytes(b"not a jpeg")
    res = run("data", "export-nnunet", root, "-o", tmp_path / "raw" / "Dataset005_Bad", code=1)
    assert bad.name in res.output and len(res.output.strip().splitlines()) == 1
    assert list((tmp_path / "raw").iterdir()) == []


def test_case_ids_are_valid_and_distinct(synth_stas_dir):
    assert case_id("00000001") == "00000001" and case_id("img-1_a") == "img-1_a"
    odd = [case_id(s) for s in ("a b", "a.b", "a-b", "a b ", "ü", "_x")]
    assert len(set(odd)) == len(odd)
    assert all(c[0].isalnum() and all(ch.isalnum() or ch in "_-" for ch in c) for c in odd)
    ds = open_dataset(synth_stas_dir)
    ds.items = [SegItem("x/a", None, None), SegItem("y/a", None, None)]
    with pytest.raises(DataError, match="both map to nnU-Net case 'a'"):
        case_ids(ds)


def _tiny_nnunet(root: Path, labels: dict | None = None, mask_value: int = 1) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in ("c1", "c2"):
        Image.fromarray(np.full((8, 10, 3), 60, np.uint8)).save(root / "imagesTr" / f"{case}_0000.png")
        m = np.zeros((8, 10), np.uint8)
        m[2:4, 2:5] = mask_value
        Image.fromarray(m).save(root / "labelsTr" / f"{case}.png")
    dj = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": labels or {"background": 0, "tumour": 1},
        "numTraining": 2,
        "file_ending": ".png",
    }
    (root / "dataset.json").write_text(json.dumps(dj))
    return root


def test_read_foreign_nnunet_folder(tmp_path):
    root = _tiny_nnunet(tmp_path / "Dataset010_T", {"background": 0, "a": 1, "b": 2}, mask_value=2)
    ds = open_dataset(root)
    assert ds.ids() == ["c1", "c2"] and ds.class_names == ["background", "a", "b"]
    assert ds.load(0)[1].max() == 2
    (root / "splits_final.json").write_text(json.dumps([{"train": ["c1"], "val": ["c2"]}] * 2))
    sp = load_split(root / "splits_final.json", ds)
    assert sp["test"] == [] and sp["folds"][1] == {"train": ["c1"], "val": ["c2"]}


def test_nnunet_bad_input_is_one_line_naming_the_file(tmp_path):
    root = _tiny_nnunet(tmp_path / "a", mask_value=3)  # label 3 is not in dataset.json
    with pytest.raises(DataError, match=r"c1\.png: mask value 3 is no class.*dataset.json"):
        open_dataset(root).load(0)
    (root / "labelsTr" / "c2.png").unlink()
    with pytest.raises(DataError, match=r"c2_0000\.png: has no label labelsTr/c2\.png"):
        open_dataset(root)
    (root / "dataset.json").unlink()
    res = run("data", "check", root, code=1)
    assert "dataset.json: missing" in res.output and len(res.output.strip().splitlines()) == 1
    root = _tiny_nnunet(tmp_path / "b")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {}}))
    with pytest.raises(DataError, match="dataset.json: has no file_ending"):
        open_dataset(root)
    root = _tiny_nnunet(tmp_path / "d")
    (root / "dataset.json").write_text(
        (root / "dataset.json").read_text().replace('"numTraining": 2', '"numTraining": 3')
    )
    with pytest.raises(DataError, match="dataset.json: numTraining is 3 but imagesTr has 2 cases"):
        open_dataset(root)
    root = _tiny_nnunet(tmp_path / "c")
    shutil.copy(root / "imagesTr" / "c1_0000.png", root / "imagesTr" / "c1_0001.png")
    with pytest.raises(DataError, match=r"c1_0001\.png: a second input channel"):
        open_dataset(root)
    (root / "splits_final.json").write_text("[]")
    with pytest.raises(DataError, match="not a medstudent split file.*--from-nnunet"):
        load_split(root / "splits_final.json")


def _verify_script(folder: Path) -> str:
    return (
        "from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity\n"
        f"verify_dataset_integrity({str(folder)!r}, num_processes=1)\n"
    )


def test_nnunet_verify_dataset_integrity(nnunet_export):
    """nnU-Net's own check on the export: in this interpreter when nnunetv2 is installed, else in the one
    MEDSTUDENT_NNUNET_PYTHON names (a throwaway venv: nnunetv2 pulls a full torch); skipped without both."""
    try:
        import nnunetv2  # noqa: F401  (optional: only this test needs it)

        python = sys.executable
    except ImportError:
        python = os.environ.get("MEDSTUDENT_NNUNET_PYTHON")
        if not python:
            pytest.skip("nnunetv2 not importable and MEDSTUDENT_NNUNET_PYTHON not set")
    res = subprocess.run(
        [python, "-c", _verify_script(nnunet_export)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify_dataset_integrity Done" in res.stdout


def test_export_monai_datalist(stas_split, tmp_path):
    monai_data = pytest.importorskip("monai.data")
    ds, split, split_path = stas_split
    out = tmp_path / "dl" / "datalist.json"
    run("data", "export-monai", ds.root, "-o", out, "--split", split_path)
    training = monai_data.load_decathlon_datalist(str(out), data_list_key="training")
    test = monai_data.load_decathlon_datalist(str(out), data_list_key="test")
    assert len(training) == len(ds) - 4 and len(test) == 4
    val_fold = {i: k for k, f in enumerate(split["folds"]) for i in f["val"]}
    index = {mid: i for i, mid in enumerate(ds.ids())}
    for e in training + test:
        assert Path(e["image"]).is_file() and Path(e["label"]).is_file()
        img, mask = ds.load(index[e["id"]])
        assert np.array_equal(read_mask(e["label"]), mask)
        assert np.array_equal(read_image(e["image"]), img)
        assert e.get("fold") == val_fold.get(e["id"])
    assert sorted(e["id"] for e in test) == split["test"]
    assert "exists" in run("data", "export-monai", ds.root, "-o", out, code=1).output


def test_export_monai_without_split_keeps_paths_relative(synth_stas_dir, tmp_path):
    out = tmp_path / "datalist.json"
    run("data", "export-monai", synth_stas_dir, "-o", out)
    doc = json.loads(out.read_text())
    assert len(doc["training"]) == 16 and doc["test"] == []
    assert all("fold" not in e and not Path(e["label"]).is_absolute() for e in doc["training"])


def test_export_monai_writes_exif_rotated_images_upright(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 wide x 10 high, shown 10 wide x 20 high
    Image.fromarray(np.full((10, 20, 3), 90, np.uint8)).save(root / "images" / "a.jpg", exif=exif)
    mask = np.zeros((20, 10), np.uint8)
    mask[:5] = 1
    Image.fromarray(mask * 255).save(root / "masks" / "a.png")
    out = tmp_path / "datalist.json"
    run("data", "export-monai", root, "-o", out)
    (entry,) = json.loads(out.read_text())["training"]
    assert entry["image"] == "datalist_images/a.png"
    raw = np.asarray(Image.open(tmp_path / entry["image"]))  # as a reader that ignores EXIF sees it
    assert raw.shape[:2] == read_mask(tmp_path / entry["label"]).shape == (20, 10)


@pytest.mark.shared_data
def test_real_stas_nnunet_round_trip(tmp_path):
    """A dozen real STAS images (labelme polygons) through export-nnunet and back: identical pixels."""
    src = shared_path("stas")
    root = tmp_path / "stas"
    for sub, ext in (("Train_Images", ".jpg"), ("Train_Annotations", ".json")):
        (root / sub).mkdir(parents=True)
        for p in sorted((src / sub).glob(f"*{ext}"))[:12]:
            shutil.copy(p, root / sub / p.name)
    ds = open_dataset(root)
    assert len(ds) == 12
    split = make_split(ds, test_fraction=2, n_folds=2, seed=0)
    out = tmp_path / "Dataset501_STAS"
    export_nnunet(ds, out, split)
    back = open_dataset(out)
    cases = case_ids(ds)
    index = {it.id: i for i, it in enumerate(back.items)}
    for i, mid in enumerate(ds.ids()):
        img, mask = ds.load(i)
        img2, mask2 = back.load(index[cases[mid]])
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2), mid
    assert load_split(out / "splits_final.json", back)["test"] == sorted(cases[i] for i in split["test"])
