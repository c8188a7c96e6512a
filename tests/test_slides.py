"""Whole slides (issue 19) on project-made pyramidal TIFFs and a pointwise engine with known answers: reading
by um/px, tissue detection, streaming prediction, post-processing in um, QuPath GeoJSON, cohorts with a
manifest (rerun, kill, bad slide, ranks). The engines' own networks are covered in test_export.py."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import geojson
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from shapely.geometry import shape

from medstudent.config import PostprocessConfig
from medstudent.core.contract import MemberSpec, PipelineSpec, PreprocessSpec
from medstudent.data.slide import Slide, list_slides
from medstudent.data.synth.slide import Canvas, Island, synthetic_stas_canvas, write_pyramid_tiff
from medstudent.data.tissue import tissue_mask
from medstudent.errors import DataError
from medstudent.slides.cohort import MANIFEST, predict_cohort, read_manifest
from medstudent.slides.outputs import scaled_postprocess
from medstudent.slides.predict import predict_slide

MPP = 0.5


class DarkEngine:
    """'Network': foreground where the normalised pixel is dark. Pointwise, so the right answer is known:
    the dark blobs drawn on the islands."""

    device, precision = "cpu", "32"

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.pixels = 0

    def run(self, member: int, batch: np.ndarray) -> np.ndarray:
        self.pixels += batch.shape[0] * batch.shape[2] * batch.shape[3]
        z = -20.0 * batch.mean(1, keepdims=True)  # mean over channels < 0: darker than mid-grey
        return (1 / (1 + np.exp(-z))).astype(np.float32)

    def run_passes(self, member: int, batches: list[np.ndarray]) -> list[np.ndarray]:
        return [self.run(member, b) for b in batches]


def dark_spec(scale: float = 0.5, mpp: float | None = MPP, min_area: int = 0) -> PipelineSpec:
    pre = PreprocessSpec(task="segmentation", scale=scale, pad_multiple=32, mean=[0.5] * 3, std=[0.5] * 3)
    return PipelineSpec(
        task="segmentation",
        class_names=["background", "blob"],
        binary=True,
        mpp=mpp,
        postprocess=PostprocessConfig(threshold=0.5, min_area=min_area),
        members=[MemberSpec(preprocess=pre)],
    )


def blob_island(rng: np.random.Generator, x: int, y: int, w: int = 640, h: int = 448) -> Island:
    """Pink tissue with dark round blobs (one with a hole) and their mask."""
    img = Image.new("RGB", (w, h), (230, 170, 200))
    mask = Image.new("L", (w, h), 0)
    d, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for k in range(4):
        cx, cy, r = int(rng.integers(90, w - 90)), int(rng.integers(90, h - 90)), int(rng.integers(30, 70))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(60, 20, 90))
        dm.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        if k == 0:  # a ring: the hole must survive as an interior ring
            d.ellipse([cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2], fill=(230, 170, 200))
            dm.ellipse([cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2], fill=0)
    return Island(x, y, np.asarray(img), np.asarray(mask))


def blob_slide(path: Path, seed: int = 0, size=(6400, 4800), at=((320, 320), (4096, 3200), (2300, 1900))):
    rng = np.random.default_rng(seed)
    canvas = Canvas(*size, [blob_island(rng, x, y) for x, y in at])
    write_pyramid_tiff(path, canvas, MPP)
    return canvas


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * float((a & b).sum()) / s


@pytest.fixture(scope="module")
def slide_a(tmp_path_factory) -> tuple[Path, Canvas]:
    path = tmp_path_factory.mktemp("slides") / "case_a.tif"
    return path, blob_slide(path)


def test_slide_read_by_mpp_and_errors(tmp_path):
    canvas = synthetic_stas_canvas(3000, 2000, 4, seed=3)
    path = write_pyramid_tiff(tmp_path / "s.tif", canvas, MPP)
    isl = canvas.islands[2]
    with Slide(path) as s:
        assert (s.mpp, s.mpp_source, s.dimensions) == (MPP, "metadata", (3000, 2000))
        assert s.level_downsamples == (1.0, 4.0)
        assert s.level_for(0.5) == 0 and s.level_for(1.99) == 0 and s.level_for(2.0) == 1
        h, w = isl.image.shape[:2]
        assert np.array_equal(s.read(isl.x, isl.y, w, h, MPP), isl.image)  # the level itself: exact
        half = s.read(isl.x // 2, isl.y // 2, w // 2, h // 2, 2 * MPP)
        ref = np.asarray(Image.fromarray(isl.image).resize((w // 2, h // 2), Image.Resampling.BILINEAR))
        assert np.abs(half.astype(int) - ref.astype(int)).mean() < 4
        assert (s.read(-100, -100, 50, 50, MPP) == 255).all()  # outside the slide: white glass
        assert s.size_at(8.0) == (188, 125)
    bare = write_pyramid_tiff(tmp_path / "bare.tif", canvas, MPP, with_resolution=False)
    with pytest.raises(DataError, match="no um/px in its metadata; pass --mpp") as e:
        Slide(bare)
    assert "bare.tif" in str(e.value) and "\n" not in str(e.value)
    with Slide(bare, mpp=0.25) as s:
        assert (s.mpp, s.mpp_source) == (0.25, "--mpp")
    (tmp_path / "junk.svs").write_bytes(b"II*\x00" + os.urandom(3000))
    (tmp_path / "text.tif").write_text("not a slide")
    for bad in ("junk.svs", "text.tif", "missing.svs"):
        with pytest.raises(DataError) as e:
            Slide(tmp_path / bad, mpp=0.5)
        assert bad in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in list_slides([tmp_path])] == ["bare.tif", "junk.svs", "s.tif", "text.tif"]


def test_tissue_mask_finds_islands_not_glass():
    canvas = synthetic_stas_canvas(3000, 2000, 3, seed=1)
    thumb = canvas.render(0, 0, 188, 125, 16)  # 8 um/px
    mask = tissue_mask(thumb, 8.0)
    truth = np.zeros(mask.shape, bool)
    for isl in canvas.islands:
        truth[isl.y // 16 : (isl.y + 288) // 16, isl.x // 16 : (isl.x + 512) // 16] = True
    assert dice(mask, truth) > 0.85
    assert not tissue_mask(np.full((100, 100, 3), 250, np.uint8)).any()


def test_predict_slide_outputs(slide_a, tmp_path):
    path, canvas = slide_a
    engine = DarkEngine(dark_spec())
    s = predict_slide(engine, path, tmp_path / "out", region=1024, margin=128)
    out = tmp_path / "out"
    # map at 1/4 of network resolution: 0.5 um/px / 0.5 scale * 4 = 4 um/px, 8 slide pixels per map pixel
    assert s["map_mpp"] == 4.0 and s["map_size"] == [800, 600]
    mask = tifffile.imread(out / "mask.tif")
    truth = canvas.truth(1)
    truth8 = truth.reshape(600, 8, 800, 8).mean(axis=(1, 3)) > 0.5
    assert mask.shape == (600, 800) and set(np.unique(mask)) == {0, 255}
    assert dice(mask, truth8) > 0.97
    # background regions are never predicted: 48 regions of 1024 px, tissue touches few of them
    assert s["regions"] < s["regions_total"] / 2
    assert engine.pixels <= s["regions"] * (1280 // 2) ** 2
    # GeoJSON: a valid FeatureCollection, QuPath properties, holes kept, areas = mask pixels
    doc = json.loads((out / "objects.geojson").read_text())
    fc = geojson.loads(json.dumps(doc))
    assert fc.is_valid and doc["type"] == "FeatureCollection"
    geoms = [shape(f["geometry"]) for f in doc["features"]]
    n_objects = ndi.label(mask > 0, structure=np.ones((3, 3)))[1]
    assert all(g.is_valid for g in geoms) and len(geoms) == s["object_count"] == n_objects >= 5
    assert any(len(g.interiors) for g in geoms if g.geom_type == "Polygon")
    props = doc["features"][0]["properties"]
    assert props["objectType"] == "annotation" and props["classification"]["name"] == "blob"
    assert sum(g.area for g in geoms) == pytest.approx((mask > 0).sum() * 64)  # level-0 px^2
    assert s["object_area_mm2"] == pytest.approx((mask > 0).sum() * 16 / 1e6, rel=1e-6)
    # pyramids OpenSlide (and QuPath) read with their um/px; the work maps are gone
    for name in ("prob.tif", "mask.tif"):
        with openslide.OpenSlide(str(out / name)) as o:
            assert float(o.properties["openslide.mpp-x"]) == pytest.approx(4.0)
    assert not list(out.glob("*.npy"))
    assert Image.open(out / "overlay.png").size[0] <= 2048 and (out / "tissue.png").is_file()
    assert s["tissue_area_mm2"] > 0 and s["seconds"] > 0


def test_regions_are_read_from_a_level_at_the_network_resolution(tmp_path):
    """A pyramid with a level at the network's um/px (0.5 um/px / scale 0.5 = 1.0: level 1 of a 2x
    pyramid) is read there, not at 0.5 and resized: the network gets inputs of the same size and the
    masks agree with the 4x pyramid's (no level at 1.0) and with the truth."""
    rng = np.random.default_rng(0)
    canvas = Canvas(3200, 2400, [blob_island(rng, 320, 320), blob_island(rng, 1900, 1500)])
    truth8 = canvas.truth(1).reshape(300, 8, 400, 8).mean(axis=(1, 3)) > 0.5
    for scales in ([1.0], [0.75, 1.0, 1.25]):  # multi-scale TTA: the same inputs at every scale
        masks, pixels = {}, {}
        for ds, read_mpp in ((4, 0.5), (2, 1.0)):
            path = tmp_path / f"ds{ds}.tif"
            if not path.is_file():
                write_pyramid_tiff(path, canvas, MPP, downsample=ds)
            engine = DarkEngine(dark_spec())
            out = tmp_path / f"out{ds}_{len(scales)}"
            s = predict_slide(engine, path, out, region=1024, margin=128, scales=scales)
            assert s["read_mpp"] == read_mpp
            masks[ds], pixels[ds] = tifffile.imread(out / "mask.tif"), engine.pixels
        assert pixels[2] == pixels[4] > 0  # the same network inputs (1280 / 2 px regions), however read
        assert dice(masks[2], masks[4]) > 0.98 and dice(masks[2], truth8) > 0.97
    # an ensemble with a member at full resolution is read at the model's um/px (no upsampled pixels)
    two = dark_spec()
    full = two.members[0].model_copy(update={"preprocess": dark_spec(scale=1.0).members[0].preprocess})
    two = two.model_copy(update={"members": [two.members[0], full]})
    s = predict_slide(DarkEngine(two), tmp_path / "ds2.tif", tmp_path / "ens", region=1024, margin=128)
    assert s["read_mpp"] == 0.5


def test_min_area_is_in_square_micrometres(slide_a, tmp_path):
    cfg = scaled_postprocess(PostprocessConfig(min_area=200, closing=3), model_mpp=0.5, out_mpp=4.0)
    assert (cfg.min_area, cfg.closing, cfg.fill_border) == (4, 1, False)  # 200 px of 0.25 um^2 = 50 um^2
    path, _ = slide_a
    small = predict_slide(DarkEngine(dark_spec(min_area=0)), path, tmp_path / "a", region=1024, margin=128)
    half_largest_um2 = small["largest_object_mm2"] * 1e6 / 2
    min_area = round(half_largest_um2 / MPP**2)  # pixels of the training images (0.25 um^2 each)
    engine = DarkEngine(dark_spec(min_area=min_area))
    big = predict_slide(engine, path, tmp_path / "b", region=1024, margin=128)
    assert big["min_area_um2"] == pytest.approx(half_largest_um2, rel=0.01)
    assert 0 < big["object_count"] < small["object_count"]
    assert big["largest_object_mm2"] == small["largest_object_mm2"]


def test_contract_errors(slide_a, tmp_path):
    path, _ = slide_a
    with pytest.raises(DataError, match="pass --model-mpp"):
        predict_slide(DarkEngine(dark_spec(mpp=None)), path, tmp_path / "x")
    s = predict_slide(DarkEngine(dark_spec(mpp=None)), path, tmp_path / "y", model_mpp=1.0, region=1024)
    assert s["model_mpp"] == 1.0 and s["map_mpp"] == 8.0
    blank = tmp_path / "blank.tif"
    write_pyramid_tiff(blank, Canvas(2000, 2000), MPP)
    with pytest.raises(DataError, match="no tissue found") as e:
        predict_slide(DarkEngine(dark_spec()), blank, tmp_path / "z")
    assert "blank.tif" in str(e.value)


def test_cohort_manifest_skip_resume_and_ranks(tmp_path, monkeypatch):
    slides = tmp_path / "slides"
    slides.mkdir()
    blob_slide(slides / "a.tif", seed=1, size=(3000, 2400), at=((300, 300),))
    blob_slide(slides / "b.tif", seed=2, size=(3000, 2400), at=((1500, 1200),))
    (slides / "c.svs").write_bytes(b"broken")
    out = tmp_path / "out"
    files = list_slides([slides])
    engine = DarkEngine(dark_spec())
    with pytest.warns(UserWarning, match="c.svs"):
        r = predict_cohort(engine, files, out, region=1024, margin=128)
    assert (r["predicted"], r["already_done"], len(r["skipped"])) == (2, 0, 1)
    assert "c.svs" in (out / "skipped.txt").read_text()
    index = (out / "index.html").read_text()
    assert index.count("<img ") == 2 and "c.svs" in index
    assert (out / "slides.csv").read_text().count("\n") == 3
    # a rerun does nothing for finished slides
    engine.pixels = 0
    with pytest.warns(UserWarning):
        r = predict_cohort(engine, files, out, region=1024, margin=128)
    assert (r["predicted"], r["already_done"]) == (0, 2) and engine.pixels == 0
    # a killed run: b was half written and its manifest line cut off; a changed slide is redone too
    (out / "b").rename(out / "b.partial")
    lines = (out / MANIFEST).read_text().splitlines()
    kept = "\n".join(line for line in lines if '"b"' not in line)
    (out / MANIFEST).write_text(kept + '\n{"stem": "b", "sta')
    os.utime(slides / "a.tif", ns=(1, 1))
    with pytest.warns(UserWarning):
        r = predict_cohort(engine, files, out, region=1024, margin=128)
    assert (r["predicted"], r["already_done"]) == (2, 0)
    assert not (out / "b.partial").exists() and (out / "b" / "summary.json").is_file()
    assert read_manifest(out)["b"]["status"] == "done"
    # an unforeseen failure on one slide is named and skipped like a bad slide; the others still run
    import medstudent.slides.cohort as cohort

    real = cohort.predict_slide

    def flaky(engine, slide, out, **kw):
        if Path(slide).name == "a.tif":
            raise RuntimeError("boom\nsecond line")
        return real(engine, slide, out, **kw)

    monkeypatch.setattr(cohort, "predict_slide", flaky)
    with pytest.warns(UserWarning, match="a.tif"):
        r = predict_cohort(engine, files, tmp_path / "flaky", region=1024, margin=128)
    assert r["predicted"] == 1 and any(
        "a.tif: unexpected error (RuntimeError: boom second line)" in x for x in r["skipped"]
    )
    monkeypatch.setattr(cohort, "predict_slide", real)
    # ranks: rank 1 of 2 takes every second slide (b)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = predict_cohort(DarkEngine(dark_spec()), files, tmp_path / "ranked", region=1024, margin=128)
    ranked = tmp_path / "ranked"
    assert r["slides"] == 1 and (ranked / "b").is_dir() and not (ranked / "a").exists()


def test_round_trip_predict_slide_geojson_from_slides(slide_a, tmp_path):
    """predict-slide -> objects.geojson -> `data from-slides` -> masks reproduces the predicted mask, on the
    map's grid and on a grid twice as fine (Dice >= 0.99 per tile)."""
    from typer.testing import CliRunner

    from medstudent.cli import app
    from medstudent.data.io import read_mask
    from medstudent.data.layouts import open_dataset

    path, _ = slide_a
    predict_slide(DarkEngine(dark_spec()), path, tmp_path / "pred", region=1024, margin=128)
    predicted = tifffile.imread(tmp_path / "pred" / "mask.tif") > 0  # at 4 um/px
    anno = tmp_path / "anno"
    anno.mkdir()
    (anno / f"{path.stem}.geojson").write_text((tmp_path / "pred" / "objects.geojson").read_text())
    for mpp, up in ((4.0, 1), (2.0, 2)):
        out = tmp_path / f"tiles_{mpp}"
        args = ["data", "from-slides", str(path), str(anno), "-o", str(out), "--mpp", str(mpp)]
        res = CliRunner().invoke(app, [*args, "--tile", "64"])
        assert res.exit_code == 0, res.output
        truth = np.kron(predicted, np.ones((up, up), dtype=bool))
        with open(out / "tiles.csv") as f:
            rows = list(csv.DictReader(f))
        assert sum(r["kind"] == "positive" for r in rows) >= 5
        for r in rows:
            x, y = int(r["x"]), int(r["y"])
            mask = read_mask(out / "masks" / Path(r["image"]).with_suffix(".png").name) > 0
            ref = np.zeros((64, 64), dtype=bool)
            crop = truth[y : y + 64, x : x + 64]
            ref[: crop.shape[0], : crop.shape[1]] = crop
            assert dice(mask, ref) >= 0.99, (mpp, r["image"])
        assert len(open_dataset(out).items) == len(rows)


class ThreeClassEngine(DarkEngine):
    """Background (light), tissue (pink, mid) and dark blobs as three softmax classes."""

    def run(self, member: int, batch: np.ndarray) -> np.ndarray:
        m = batch.mean(1, keepdims=True)  # normalised: white 1, pink ~0.6, dark blobs ~-0.5
        logits = np.concatenate([20 * (m - 0.8), -20 * np.abs(m - 0.55), -20 * m], axis=1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)


def test_multi_class_slide_gives_one_class_per_object(slide_a, tmp_path):
    path, canvas = slide_a
    pre = dark_spec().members[0]
    spec = PipelineSpec(task="segmentation", class_names=["glass", "tissue", "blob"], mpp=MPP, members=[pre])
    s = predict_slide(ThreeClassEngine(spec), path, tmp_path / "mc", region=1024, margin=128)
    labels = tifffile.imread(tmp_path / "mc" / "mask.tif")
    assert set(np.unique(labels)) == {0, 1, 2}
    truth = canvas.truth(1).reshape(600, 8, 800, 8).mean(axis=(1, 3)) > 0.5
    assert dice(labels == 2, truth) > 0.95
    doc = json.loads((tmp_path / "mc" / "objects.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in doc["features"]}
    blobs = [f for f in doc["features"] if f["properties"]["classification"]["name"] == "blob"]
    assert names == {"tissue", "blob"} and len(blobs) >= 5 and s["object_count"] >= 3


@pytest.mark.shared_data
def test_real_stas_tiles_stitched_round_trip(tmp_path):
    """Four real shared STAS tiles on white: tissue is found on real H&E, and their expert masks go through
    QuPath GeoJSON and `data from-slides` unchanged."""
    from conftest import shared_path
    from medstudent.data.from_slides import extract_tiles
    from medstudent.data.layouts import open_segmentation
    from medstudent.data.qupath import features, mask_to_polygons, write_geojson

    ds = open_segmentation(shared_path("stas"))
    canvas = Canvas(2 * 1716 + 3 * 200, 2 * 942 + 3 * 200)
    for k in range(4):
        img, gt = ds.load(k * 7)
        r, c = divmod(k, 2)
        canvas.islands.append(
            Island(200 + c * (1716 + 200), 200 + r * (942 + 200), img, (gt > 0).astype(np.uint8))
        )
    slide = write_pyramid_tiff(tmp_path / "real.tif", canvas, MPP)
    with Slide(slide) as s:
        tissue = tissue_mask(s.thumbnail(8.0), 8.0)
    for isl in canvas.islands:  # every tile is (mostly) tissue, the glass between them is not
        x0, y0 = isl.x // 16, isl.y // 16
        assert tissue[y0 : y0 + 942 // 16, x0 : x0 + 1716 // 16].mean() > 0.7
    assert tissue[: 200 // 16, :].mean() < 0.05
    truth = canvas.truth(1)
    anno = tmp_path / "anno"
    anno.mkdir()
    write_geojson(anno / "real.geojson", features(mask_to_polygons(truth, 1.0), {1: "STAS"}))
    out = tmp_path / "tiles"
    summary = extract_tiles([slide], anno, out, mpp=MPP, tile=256, negatives=0.5)
    assert summary["positive_tiles"] > 0
    with open(out / "tiles.csv") as f:
        for r in csv.DictReader(f):
            x, y = int(r["x"]), int(r["y"])
            mask = np.asarray(Image.open(out / "masks" / Path(r["image"]).with_suffix(".png").name)) > 0
            ref = np.zeros((256, 256), bool)
            crop = truth[y : y + 256, x : x + 256] > 0
            ref[: crop.shape[0], : crop.shape[1]] = crop
            assert np.array_equal(mask, ref), r["image"]


def test_cli_bad_slide_arguments_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from medstudent.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["predict-slide", str(tmp_path), "-s", str(tmp_path / "nope.svs"), "-o", "x"])
    assert res.exit_code == 1 and "nope.svs: no such slide file or folder" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["predict-slide", str(tmp_path), "-s", str(tmp_path / "empty"), "-o", "x"])
    assert res.exit_code == 1 and "no slides found" in res.output
    res = runner.invoke(app, ["data", "from-slides", str(tmp_path / "a.svs"), "-o", "x", "--mpp", "0.5"])
    assert res.exit_code == 1 and "then the annotations" in res.output
    args = ["data", "from-slides", str(tmp_path / "a.svs"), str(tmp_path), "-o", "x", "--mpp", "0.5"]
    res = runner.invoke(app, [*args, "--label-map", "{bad"])
    assert res.exit_code == 1 and "--label-map is not JSON" in res.output
