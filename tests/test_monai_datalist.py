"""A MONAI datalist read back: export-monai -> read_datalist / open_dataset / load_split round trip, and every
malformed datalist refused with a one-line DataError naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medstudent.data.layouts import SegmentationDataset, detect_layout, open_dataset
from medstudent.data.monai_datalist import datalist_split, read_datalist
from medstudent.data.monai_export import export_monai
from medstudent.data.splits import fold_ids, load_split, make_split
from medstudent.errors import DataError


@pytest.fixture(scope="module")
def exported(synth_stas_dir, tmp_path_factory):
    ds = open_dataset(synth_stas_dir)
    split = make_split(ds, test_fraction=4, n_folds=3, seed=0)
    out = tmp_path_factory.mktemp("dl") / "datalist.json"
    export_monai(ds, out, split)
    return ds, split, out


def test_round_trip_export_then_read(exported, tmp_path):
    ds, split, out = exported
    doc = read_datalist(out)
    assert len(doc["training"]) == len(ds) - 4 and len(doc["test"]) == 4
    assert all(e["image"].is_absolute() and e["label"].is_file() for e in doc["training"] + doc["test"])
    assert detect_layout(out) == "monai"
    back = open_dataset(out)
    assert isinstance(back, SegmentationDataset) and sorted(back.ids()) == sorted(ds.ids())
    assert back.class_names == ds.class_names
    index = {mid: i for i, mid in enumerate(ds.ids())}
    for i, mid in enumerate(back.ids()[:5] + back.ids()[-2:]):  # training and test entries
        img, mask = back.load(back.ids().index(mid))
        ref_img, ref_mask = ds.load(index[mid])
        assert np.array_equal(img, ref_img) and np.array_equal(mask, ref_mask), (i, mid)
    # the fold keys and the test list are the split that was exported
    got = load_split(out, back)
    assert got["test"] == sorted(split["test"]) and got["n_folds"] == 3
    for k in range(3):
        assert [sorted(x) for x in fold_ids(got, k)] == [sorted(x) for x in fold_ids(split, k)]
    # paths are relative to the datalist's folder: moved away from the images, the first one is named
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(out.parent, moved)
    with pytest.raises(
        DataError, match=r"datalist.json: training entry 0 image file .*00000000.jpg not found"
    ):
        open_dataset(moved / out.name)


def test_read_matches_monai(exported):
    monai_data = pytest.importorskip("monai.data")
    _, _, out = exported
    ref = monai_data.load_decathlon_datalist(str(out), data_list_key="training")
    mine = read_datalist(out)["training"]
    assert [(str(e["image"]), str(e["label"])) for e in mine] == [(e["image"], e["label"]) for e in ref]


def _files(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / name)
    return tmp_path


def test_base_dir_absolute_paths_and_bare_test_paths(tmp_path):
    root = _files(tmp_path)
    (root / "lists").mkdir()
    dl = root / "lists" / "d.json"
    absolute = str(root / "img" / "b.png")
    dl.write_text(
        json.dumps({"training": [{"image": "img/a.png", "label": absolute}], "test": ["img/b.png"]})
    )
    with pytest.raises(DataError, match="not found"):  # relative to the datalist's folder by default
        read_datalist(dl)
    doc = read_datalist(dl, base_dir=root)
    assert doc["training"][0]["image"] == root / "img" / "a.png"
    assert str(doc["training"][0]["label"]) == absolute and doc["test"] == [{"image": root / "img" / "b.png"}]
    assert datalist_split(dl, base_dir=root) is None  # no folds


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{oops", "not JSON"),
        ("[1, 2]", "top level is a JSON list, not an object"),
        ('{"test": []}', "has no 'training' list"),
        ('{"training": {"image": "img/a.png"}}', "'training' is a dict, not a list"),
        (
            '{"training": [{"image": "img/a.png", "label": "img/a.png"}, {"label": "img/a.png"}]}',
            "training entry 1 has no 'image'",
        ),
        ('{"training": [{"image": "img/a.png"}]}', "training entry 0 has no 'label'"),
        ('{"training": [{"image": "img/a.png", "label": "img/gone.png"}]}', "training entry 0 label file"),
        (
            '{"training": [{"image": 3, "label": "img/a.png"}]}',
            "training entry 0 'image' must be one file path",
        ),
        ('{"training": [{"image": "img/a.png", "label": "img/b.png", "fold": "x"}]}', "fold 'x'"),
        ('{"training": [], "test": [{"image": "img/missing.png"}]}', "test entry 0 image file"),
    ],
)
def test_bad_datalist_is_one_line_naming_the_file(tmp_path, text, reason):
    root = _files(tmp_path)
    dl = root / "datalist.json"
    dl.write_text(text)
    for read in (read_datalist, open_dataset):
        with pytest.raises(DataError) as e:
            read(dl)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(dl)) and reason in msg, msg
    if "not found" in msg:  # the missing file is named
        assert "gone.png" in msg or "missing.png" in msg


def test_split_needs_every_fold(tmp_path):
    root = _files(tmp_path)
    dl = root / "datalist.json"
    entries = [
        {"image": "img/a.png", "label": "img/a.png", "fold": 0},
        {"image": "img/b.png", "label": "img/b.png"},
    ]
    dl.write_text(json.dumps({"training": entries}))
    with pytest.raises(DataError, match="training entry 1 has no 'fold'"):
        datalist_split(dl)
    entries[1]["fold"] = 2
    dl.write_text(json.dumps({"training": entries}))
    with pytest.raises(DataError, match="fold 1 has no training entry"):
        load_split(dl)
    entries[1]["fold"] = 1
    dl.write_text(json.dumps({"training": entries}))
    assert fold_ids(load_split(dl, open_dataset(dl)), 1) == (["img/a"], ["img/b"], [])
