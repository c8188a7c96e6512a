"""data.from_slides on small synthetic pyramidal TIFFs with GeoJSON written from the canvas truth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from medstudent.data.from_slides import extract_tiles
from medstudent.data.io import read_image, read_mask
from medstudent.data.layouts import open_dataset
from medstudent.data.qupath import features, mask_to_polygons, write_geojson
from medstudent.data.synth.slide import synthetic_stas_canvas, write_pyramid_tiff
from medstudent.errors import DataError

MPP = 0.5
TILE = 128


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict:
    """Two slides (s1, s2) with their truth, and a folder of their GeoJSON (class 'STAS')."""
    d = tmp_path_factory.mktemp("slides")
    out: dict = {"dir": d, "ann": d / "ann"}
    for name, seed in (("s1", 1), ("s2", 2)):
        canvas = synthetic_stas_canvas(1800, 800, 4, seed=seed)
        write_pyramid_tiff(d / f"{name}.tif", canvas, MPP)
        truth = canvas.truth()
        assert truth.any()
        write_geojson(out["ann"] / f"{name}.geojson", features(mask_to_polygons(truth, 1.0), {1: "STAS"}))
        out[name] = truth
        out[f"{name}_islands"] = [isl.box for isl in canvas.islands]
    return out


def rows(out: Path) -> list[dict]:
    with open(out / "tiles.csv", newline="") as f:
        return list(csv.DictReader(f))


def overlap(a: tuple, b: tuple) -> int:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def crop(truth: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    exp = np.zeros((size, size), np.uint8)
    sub = truth[y : y + size, x : x + size]
    exp[: sub.shape[0], : sub.shape[1]] = sub
    return exp


def test_tiles_equal_truth_negatives_on_tissue(slides, tmp_path):
    out = tmp_path / "ds"
    res = extract_tiles([slides["dir"] / "s1.tif"], slides["ann"], out, mpp=MPP, tile=TILE)
    assert res["slides"] == 1 and res["skipped"] == []
    assert res["positive_tiles"] > 0 and res["negative_tiles"] == res["positive_tiles"]
    assert res["tiles"] == res["positive_tiles"] + res["negative_tiles"]
    truth = slides["s1"]
    covered = np.zeros_like(truth)
    for r in rows(out):
        x, y = int(r["x"]), int(r["y"])
        assert x % TILE == 0 and y % TILE == 0
        mask = read_mask(out / "masks" / Path(r["image"]).name)
        assert np.array_equal(mask, crop(truth, x, y, TILE))  # exact: mpp is the slide's
        assert int(r["positive_pixels"]) == mask.sum()
        if r["kind"] == "negative":
            assert mask.sum() == 0
            assert read_image(out / r["image"]).shape == (TILE, TILE, 3)
            on_island = max(overlap((x, y, TILE, TILE), box) for box in slides["s1_islands"])
            assert on_island >= 0.5 * TILE * TILE  # the synthetic tissue is the islands
        else:
            covered[y : y + TILE, x : x + TILE] = 1
    assert covered[truth > 0].all()  # every annotated pixel is in a positive tile
    ds = open_dataset(out)
    assert len(ds) == res["tiles"] and ds.format == "masks"
    img, mask = ds.load(0)
    assert img.shape == (TILE, TILE, 3) and mask.shape == (TILE, TILE) and mask.max() <= 1
    assert json.loads((out / "label_map.json").read_text()) == {"foreground": 1}
    assert (out / "skipped.txt").read_text() == ""
    assert not list(out.glob(".staging-*"))


def test_coarser_mpp_samples_pixel_centres(slides, tmp_path):
    out = tmp_path / "ds"
    res = extract_tiles([slides["dir"] / "s1.tif"], slides["ann"], out, mpp=2 * MPP, tile=64, negatives=0)
    assert res["negative_tiles"] == 0 and res["positive_tiles"] > 0
    # a 1 um pixel's centre is the corner of four 0.5 um pixels: the half-open rule takes the lower right
    coarse = slides["s1"][1::2, 1::2]
    for r in rows(out):
        mask = read_mask(out / "masks" / Path(r["image"]).name)
        assert np.array_equal(mask, crop(coarse, int(r["x"]), int(r["y"]), 64))


def test_one_file_for_one_slide_and_multiclass(slides, tmp_path):
    truth = slides["s2"]
    comp, n = ndi.label(truth, structure=np.ones((3, 3)))
    assert n >= 2
    half = np.where(comp % 2 == 0, truth * 2, truth).astype(np.uint8)  # every other object is class 2
    ann = tmp_path / "one.geojson"
    write_geojson(ann, features(mask_to_polygons(half, 1.0), {1: "STAS", 2: "Other"}))
    out = tmp_path / "ds"
    lm = {"STAS": 1, "Other": 2}
    extract_tiles([slides["dir"] / "s2.tif"], ann, out, mpp=MPP, tile=TILE, label_map=lm, negatives=0.5)
    for r in rows(out):
        mask = read_mask(out / "masks" / Path(r["image"]).name)
        assert np.array_equal(mask, crop(half, int(r["x"]), int(r["y"]), TILE))
    assert json.loads((out / "label_map.json").read_text()) == lm
    ds = open_dataset(out, label_map=lm)
    assert ds.class_names == ["background", "STAS", "Other"]
    assert max(ds.load(i)[1].max() for i in range(len(ds))) == 2
    with pytest.raises(DataError, match="one annotation file but 2 slides"):
        extract_tiles([slides["dir"] / "s1.tif", slides["dir"] / "s2.tif"], ann, out, mpp=MPP, tile=TILE)


def test_bad_slide_skipped_and_error_without_skip(slides, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    ann = tmp_path / "ann"
    ann.mkdir()
    for n in ("bad", "s1"):
        (ann / f"{n}.geojson").write_bytes((slides["ann"] / "s1.geojson").read_bytes())
    good = slides["dir"] / "s1.tif"
    out = tmp_path / "ds"
    with pytest.raises(DataError) as e:
        extract_tiles([bad, good], ann, out, mpp=MPP, tile=TILE)
    assert "bad.tif" in str(e.value) and "\n" not in str(e.value)
    res = extract_tiles([bad, good], ann, out, mpp=MPP, tile=TILE, skip_bad=True)
    assert res["slides"] == 1 and len(res["skipped"]) == 1
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and "bad.tif" in skipped[0]
    names = {Path(r["image"]).name for r in rows(out)}
    assert names and all(n.startswith("s1_x") for n in names)
    assert (
        {p.name for p in (out / "images").iterdir()} == names == {p.name for p in (out / "masks").iterdir()}
    )


def test_bad_geojson_missing_file_and_unknown_class(slides, tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "s1.json").write_text('{"type": "Feature"}')  # not exported as a FeatureCollection
    s1, s2 = slides["dir"] / "s1.tif", slides["dir"] / "s2.tif"
    res = extract_tiles([s1, s2], ann, tmp_path / "ds", mpp=MPP, tile=TILE, skip_bad=True)
    assert res["slides"] == 0 and res["tiles"] == 0
    text = (tmp_path / "ds" / "skipped.txt").read_text()
    assert "s1.json" in text and "FeatureCollection" in text and "s2.tif" in text  # s2: no annotation file
    with pytest.raises(DataError, match="no annotation file s2.geojson"):
        extract_tiles([s2], ann, tmp_path / "ds2", mpp=MPP, tile=TILE)
    with pytest.raises(DataError) as e:
        extract_tiles([s1], slides["ann"], tmp_path / "ds3", mpp=MPP, tile=TILE, label_map={"Tumor": 1})
    msg = str(e.value)
    assert "s1.geojson" in msg and "'STAS'" in msg and "Tumor" in msg and "\n" not in msg


def test_rerun_replaces_consistently(slides, tmp_path):
    out = tmp_path / "ds"
    s1, s2 = slides["dir"] / "s1.tif", slides["dir"] / "s2.tif"
    extract_tiles([s1, s2], slides["ann"], out, mpp=MPP, tile=TILE, seed=0)
    before = {r["image"] for r in rows(out) if r["slide"] == "s2.tif"}
    res = extract_tiles([s1], slides["ann"], out, mpp=MPP, tile=TILE, seed=1, negatives=3.0)
    after = rows(out)
    assert {r["image"] for r in after if r["slide"] == "s2.tif"} == before  # the other slide kept
    assert sum(r["slide"] == "s1.tif" for r in after) == res["tiles"]
    names = {Path(r["image"]).name for r in after}
    assert (
        {p.name for p in (out / "images").iterdir()} == names == {p.name for p in (out / "masks").iterdir()}
    )
    assert len(open_dataset(out)) == len(after)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mpp": 0}, "--mpp"),
        ({"tile": 3}, "--tile"),
        ({"negatives": -1.0}, "negatives"),
        ({"label_map": {"STAS": 255}}, "label_map ids"),
    ],
)
def test_bad_arguments(slides, tmp_path, kwargs, needle):
    args = {"mpp": MPP, "tile": TILE} | kwargs
    with pytest.raises(DataError, match=needle):
        extract_tiles([slides["dir"] / "s1.tif"], slides["ann"], tmp_path / "ds", **args)
