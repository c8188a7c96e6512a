"""Issue 20's corpus, continued: images (header bombs), masks (ids, collisions), EXIF orientation, CLI
printing of user text, split files and configs (labelme JSON and file types: test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bad_data import (
    bmp_header,
    check_error,
    jpeg_header_bomb,
    labelme_doc,
    labelme_set,
    mask_set,
    one_line_error,
    png_bytes,
    png_header_bomb,
    shape,
    tiff_header_bomb,
    write_json,
)
from medstudent.cli import app
from medstudent.config import load_config
from medstudent.data.check import check_dataset
from medstudent.data.io import read_image, read_mask
from medstudent.data.layouts import open_dataset
from medstudent.data.splits import load_split
from medstudent.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::medstudent.data.labelme.LabelmeWarning")
TRI = [[1, 1], [10, 1], [10, 8]]


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "name, data, match",
    [
        ("bomb.png", png_header_bomb(), "too large"),
        ("bomb.jpg", jpeg_header_bomb(), "too large"),
        ("bomb.tif", tiff_header_bomb(), "too large"),
        ("neg.bmp", bmp_header(-30000, 30000), ""),
        ("huge.bmp", bmp_header(30000, 30000), ""),
        ("empty.png", b"", "cannot read image"),
        # under Pillow's pixel limit, but JPEG "decodes" the missing data as grey: 6 s and 10 GB before
        ("grey.jpg", jpeg_header_bomb(20000, 20000), "image too large for its file"),
        ("tall.png", png_header_bomb(1, 400_000_000), "image too large for its file"),
    ],
)
def test_header_bombs_and_broken_headers(tmp_path, name, data, match):
    p = tmp_path / name
    p.write_bytes(data)
    assert len(data) < 8000  # a few KB that claim 30000 x 30000 pixels
    t = time.perf_counter()
    one_line_error(lambda: read_image(p), name, match)
    one_line_error(lambda: read_mask(p), name, match)
    assert time.perf_counter() - t < 5.0


def test_bomb_in_every_reader(tmp_path):
    """Segmentation image, mask, classification image and unlabeled image: all a DataError in `data check`."""
    seg = mask_set(tmp_path / "seg", {"a.png": png_bytes(np.zeros((12, 16), np.uint8))})
    (seg / "images" / "a.png").write_bytes(png_header_bomb())
    check_error(seg, "a.png", "too large")
    seg2 = mask_set(tmp_path / "seg2", {"a.png": png_header_bomb()})
    check_error(seg2, "masks/a.png", "too large")
    cls = tmp_path / "cls"
    for c in ("A", "B"):
        (cls / c).mkdir(parents=True)
        (cls / c / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (cls / "B" / "bomb.jpg").write_bytes(jpeg_header_bomb())
    check_error(cls, "bomb.jpg", "too large")
    unl = tmp_path / "unl"
    unl.mkdir()
    (unl / "bomb.tif").write_bytes(tiff_header_bomb())
    check_error(unl, "bomb.tif", "too large")


# ----------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize(
    "values, top",
    [((0, 1, 2), 2), (tuple(range(51)), 50)],
)
def test_mask_ids_beyond_the_classes(tmp_path, values, top):
    m = np.resize(np.array(values, np.uint8), (12, 16))
    root = mask_set(tmp_path / "m", {"a.png": png_bytes(m)})
    check_error(root, "a.png", f"mask value {top} is no class")
    one_line_error(lambda: open_dataset(root).load(0), "a.png", "is no class")


def test_palette_mask_index_200(tmp_path):
    m = np.zeros((12, 16), np.uint8)
    m[2:5, 2:5] = 200
    img = Image.fromarray(m, mode="L").convert("P")
    img.putpalette([0, 0, 0] * 200 + [255, 0, 0] + [0, 0, 0] * 55)
    buf = Image.new("P", (16, 12))
    buf.putpalette(img.getpalette())
    buf.putdata(m.ravel().tolist())
    root = mask_set(tmp_path / "m", {"a.png": b""})
    buf.save(root / "masks" / "a.png")
    check_error(root, "a.png", "mask value 200 is no class")


def test_png_mask_named_jpg_keeps_its_ids(tmp_path):
    m = np.zeros((12, 16), np.uint8)
    m[3:9, 4:12] = 1
    root = mask_set(tmp_path / "m", {"a.jpg": png_bytes(m)})
    _, mask = open_dataset(root).load(0)
    assert (mask == m).all()
    assert check_dataset(root).ok


@pytest.mark.parametrize(
    "images, masks, a, b",
    [
        (["a.jpg", "a.png"], ["a.png"], "a.jpg", "a.png"),
        (["a.jpg", "a.JPG"], ["a.png"], "a.JPG", "a.jpg"),
        (["a.png"], ["a.png", "a.jpg"], "a.jpg", "a.png"),
    ],
)
def test_stem_collisions_are_refused(tmp_path, images, masks, a, b):
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in images:
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "images" / n, format="PNG")
    for n in masks:
        Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "masks" / n, format="PNG")
    e = one_line_error(lambda: check_dataset(root), "share the stem 'a'")
    assert a in str(e) and b in str(e)


# ------------------------------------------------------------------------------------------------ EXIF
@pytest.mark.parametrize("orientation, corner", [(3, (-1, -1)), (6, (-1, 0)), (8, (0, -1))])
def test_exif_orientation_mask_lands_where_drawn(tmp_path, orientation, corner):
    """The raw pixels carry a bright patch in the corner that the EXIF orientation moves to the visual
    top-left; labelme (and the annotator) saw the oriented image and drew the top-left square there."""
    raw = np.zeros((24, 40, 3), np.uint8)  # stored 40 x 24
    ys = slice(None, 6) if corner[0] == 0 else slice(-6, None)
    xs = slice(None, 6) if corner[1] == 0 else slice(-6, None)
    raw[ys, xs] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    root = tmp_path / "lm"
    (root / "Train_Images").mkdir(parents=True)
    (root / "Train_Annotations").mkdir()
    Image.fromarray(raw).save(root / "Train_Images" / "a.jpg", exif=exif.tobytes(), quality=95)
    w, h = (40, 24) if orientation == 3 else (24, 40)  # labelme stores the oriented size
    doc = labelme_doc([shape([[0, 0], [4, 4]], "rectangle")], w=w, h=h)
    (root / "Train_Annotations" / "a.json").write_text(json.dumps(doc))
    assert check_dataset(root).ok
    img, mask = open_dataset(root).load(0)
    assert img.shape == (h, w, 3) and mask.shape == (h, w)
    assert img[:4, :4].mean() > 200 and img[-4:, -4:].mean() < 50  # the patch is at the visual top-left
    assert mask[:5, :5].all() and mask.sum() == 25


# ------------------------------------------------------------------------------------ CLI printing
runner = CliRunner()


@pytest.mark.parametrize("label", ["[/]", "[b]bold[/b]", "x[/red]y", ":cross_mark:"])
def test_markup_in_labels_and_names_is_printed_literally(tmp_path, label):
    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape(TRI, label=label)])})
    name = f"n{label}.png".replace("/", "_")
    (root / "Train_Images" / name).write_bytes(png_bytes(np.zeros((12, 16, 3), np.uint8)))
    (root / "Train_Annotations" / "z.json").write_text(json.dumps(labelme_doc([shape(TRI[:2], label=label)])))
    (root / "Train_Images" / "z.png").write_bytes(png_bytes(np.zeros((12, 16, 3), np.uint8)))
    res = runner.invoke(app, ["data", "check", str(root)])
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert f"{name}: image has no annotation" in res.output  # the exact file name
    assert f"shape 0 ('{label}') is a polygon with 2 points" in res.output
    # the one-line error path (one_line_errors) prints the name literally too
    missing = tmp_path / f"no{label}".replace("/", "_")
    res = runner.invoke(app, ["data", "check", str(missing)])
    assert res.exit_code == 1 and f"{missing}: not a folder" in res.output


def test_lone_surrogate_label_and_file_name(tmp_path):
    root = labelme_set(
        tmp_path / "ds", {"a": '{"shapes": [{"label": "\\udc80", "points": [[1, 1], [2, 2]]}]}'}
    )
    res = runner.invoke(app, ["data", "check", str(root)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "a.json" in res.output
    if sys.platform != "win32":
        odd = root / "Train_Images" / os.fsdecode(b"\xff.png")
        odd.write_bytes(png_bytes(np.zeros((12, 16, 3), np.uint8)))
        res = runner.invoke(app, ["data", "check", str(root)])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert "\\udcff.png: image has no annotation" in res.output


# ------------------------------------------------------------------------------ split files, configs
@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", "not a medstudent split file"),
        ('{"format": "medstudent-split/1"}', "test"),
        ('{"format": "medstudent-split/1", "test": [], "folds": [1]}', "folds.0"),
        ('{"format": "medstudent-split/1", "test": [[1]], "folds": [{"train": [], "val": []}]}', "test.0"),
        ('{"format": "medstudent-split/1", "test": [], "folds": []}', "no folds"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_malformed_split_files(tmp_path, content, match):
    p = write_json(tmp_path, content, "split.json")
    one_line_error(lambda: load_split(p), "split.json", match)


@pytest.mark.parametrize(
    "content, match",
    [
        ("- 1\n- 2\n", "mapping"),
        ("data: [1, 2]\n", "data"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", ""),
        ("train: {epochs: .nan}\n", "train.epochs"),
        ("\udc80: 1\n", ""),
        ("data: &a {root: *a}\n", ""),
    ],
)
def test_malformed_configs(tmp_path, content, match):
    p = tmp_path / "cfg.yaml"
    p.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "cfg.yaml" in str(e.value) and match in str(e.value) and "\n" not in str(e.value)
