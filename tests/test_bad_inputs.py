"""Issue 20's corpus of nasty inputs as named regression tests: each ends in a one-line DataError naming the
file (or a correct result), never a traceback, a hang or a wrong "OK"."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bad_data import (
    bmp_header,
    jpeg_header_bomb,
    labelme_doc,
    labelme_set,
    mask_set,
    png_bytes,
    png_header_bomb,
    shape,
    tiff_header_bomb,
)
from medstudent.cli import app
from medstudent.config import load_config
from medstudent.data.check import check_dataset
from medstudent.data.io import read_image, read_mask
from medstudent.data.labelme import labelme_to_mask, read_labelme
from medstudent.data.layouts import open_dataset
from medstudent.data.splits import load_split
from medstudent.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore::medstudent.data.labelme.LabelmeWarning")
TRI = [[1, 1], [10, 1], [10, 8]]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file types")
as_root = hasattr(os, "geteuid") and os.geteuid() == 0


def one_line_error(fn, name: str, match: str = "") -> DataError:
    """fn() raises a DataError whose one-line message names `name` (and contains `match`)."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and name in msg and match in msg, msg
    return e.value


def check_error(root: Path, name: str, match: str = "") -> None:
    """`data check` (the API under the CLI) reports an error line naming `name`; it does not pass as OK."""
    rep = check_dataset(root)
    assert not rep.ok
    hits = [e for e in rep.errors if name in e and match in e]
    assert hits, rep.errors
    assert all("\n" not in e for e in rep.errors)


def write_json(tmp_path: Path, text: str, name: str = "a.json") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------- labelme JSON
@pytest.mark.parametrize(
    "shapes_json, match",
    [
        ("[null]", "shape 0"),
        ('[{"label": "a", "points": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}]', "shape 0 points"),
        ('[{"label": "a", "points": [1, 2, 3, 4, 5, 6]}]', "shape 0 points"),
        ('[{"label": "a", "points": [[[1, 2]], [[3, 4]], [[5, 6]]]}]', "shape 0 points"),
        ('[{"label": "a", "points": [["1", "2"], ["3", "4"], ["5", "6"]]}]', "shape 0 points"),
        ('[{"label": "a", "points": [[true, false], [true, true], [false, true]]}]', "shape 0 points"),
        ('[{"label": "a", "points": [[1e400, 2], [3, 4], [5, 6]]}]', "finite"),
        ('[{"label": "a", "points": [[1' + "0" * 400 + ", 2], [3, 4], [5, 6]]}]", "shape 0 points"),
        ('[{"label": "a", "points": [[NaN, 2], [3, 4], [5, 6]]}]', "finite"),
        ('[{"label": 7, "points": [[1, 2], [3, 4], [5, 6]]}]', "shape 0 label"),
        ('[{"label": "a", "points": [[1, 2], [3, 4], [5, 6]], "shape_type": ["polygon"]}]', "shape_type"),
        ('[{"label": "a", "points": [[1, 2], [3, 4], [5, 6]]}, 5]', "shape 1"),
    ],
)
def test_malformed_shapes_are_one_line_errors(tmp_path, shapes_json, match):
    p = write_json(tmp_path, '{"shapes": ' + shapes_json + ', "imageWidth": 16, "imageHeight": 12}')
    one_line_error(lambda: read_labelme(p), "a.json", match)


@pytest.mark.parametrize("value", ['"abc"', "NaN", "[16]", "16.5", "-3", "0", "true", "{}"])
def test_image_width_must_be_a_positive_int(tmp_path, value):
    p = write_json(tmp_path, '{"shapes": [], "imageWidth": ' + value + ', "imageHeight": 12}')
    one_line_error(lambda: read_labelme(p), "a.json", "imageWidth")


def test_whole_float_image_size_is_accepted(tmp_path):
    p = write_json(tmp_path, '{"shapes": [], "imageWidth": 16.0, "imageHeight": 12}')
    assert read_labelme(p).width == 16


def test_deep_nesting_is_invalid_json_not_recursion_error(tmp_path):
    p = write_json(tmp_path, '{"shapes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    one_line_error(lambda: read_labelme(p), "a.json", "not valid JSON")


@pytest.mark.parametrize("content", ["[]", "null", '"x"', '{"shapes": {}}', '{"shapes": null}', "\ufeff{"])
def test_not_a_labelme_document(tmp_path, content):
    p = write_json(tmp_path, content)
    one_line_error(lambda: read_labelme(p), "a.json")


def test_image_data_not_base64_and_bomb_image_data(tmp_path):
    p = write_json(tmp_path, json.dumps(labelme_doc([], image_data="@@not base64@@")))
    one_line_error(lambda: read_labelme(p), "a.json", "not valid base64")
    bomb = base64.b64encode(png_header_bomb()).decode()
    root = tmp_path / "emb"
    (root / "Train_Images").mkdir(parents=True)
    (root / "Train_Annotations").mkdir()
    (root / "Train_Annotations" / "e.json").write_text(json.dumps(labelme_doc([], image_data=bomb)))
    ds = open_dataset(root)
    one_line_error(lambda: ds.load(0), "e.json", "too large")
    check_error(root, "e.json", "too large")


def test_far_circle_is_fast_and_right(tmp_path):
    """Edge 1e6-3e7 px away: PIL took ~35 s per circle; the mask is the whole image (centre inside)."""
    shapes = [shape([[8, 6], [8 + r, 6]], "circle") for r in (1e6, 3e7)]
    p = write_json(tmp_path, json.dumps(labelme_doc(shapes)))
    t = time.perf_counter()
    m = labelme_to_mask(p, image_size=(16, 12))
    assert time.perf_counter() - t < 2.0
    assert m.all()
    # a huge circle whose edge crosses the image: everything left of x = 5.5 (pixel centres) is inside
    r = 3e7
    far = write_json(tmp_path, json.dumps(labelme_doc([shape([[5.5 - r, 6], [5.5, 6]], "circle")])), "f.json")
    t = time.perf_counter()
    m = labelme_to_mask(far, image_size=(16, 12))
    assert time.perf_counter() - t < 2.0
    assert m[:, :6].all() and not m[:, 6:].any()
    # a small circle far outside the image draws nothing, quickly
    out = write_json(
        tmp_path, json.dumps(labelme_doc([shape([[3e7, 3e7], [3e7 + 5, 3e7]], "circle")])), "o.json"
    )
    assert not labelme_to_mask(out, image_size=(16, 12)).any()


def test_small_circle_still_rasterised_like_labelme(tmp_path):
    p = write_json(tmp_path, json.dumps(labelme_doc([shape([[8, 6], [11, 6]], "circle")])))
    m = labelme_to_mask(p, image_size=(16, 12))
    assert m[6, 8] == 1 and m[6, 11] == 1 and m[0, 0] == 0 and 20 <= m.sum() <= 45


def test_200k_point_polygon_is_a_clear_error(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 12, (200_000, 2)).round(2).tolist()
    p = write_json(tmp_path, json.dumps(labelme_doc([shape(pts)])))
    t = time.perf_counter()
    one_line_error(lambda: read_labelme(p), "a.json", "200000 points")
    assert time.perf_counter() - t < 5.0


@pytest.mark.parametrize(
    "name, shapes, match",
    [
        (
            "scribble",
            [shape(np.random.default_rng(0).uniform(0, 4000, (20_000, 2)).round(1).tolist())],
            "self-intersecting polygon",
        ),
        ("full_rectangles", [shape([[0, 0], [3999, 3999]], "rectangle")] * 5000, "more than 32 times over"),
        ("outside_circles", [shape([[3e7, 3e7], [3e7 + 5, 3e7]], "circle")] * 60_000, "row operations"),
    ],
)
def test_rasterising_work_is_bounded(tmp_path, name, shapes, match):
    """Within the point caps, a hostile file on a large image could still cost minutes of PIL time."""
    p = write_json(tmp_path, json.dumps(labelme_doc(shapes, w=4000, h=4000)), f"{name}.json")
    t = time.perf_counter()
    one_line_error(lambda: labelme_to_mask(p, image_size=(4000, 4000)), f"{name}.json", match)
    assert time.perf_counter() - t < 5.0


def test_many_ordinary_lesions_on_a_large_image_still_rasterise(tmp_path):
    rng = np.random.default_rng(0)
    ring = np.linspace(0, 2 * np.pi, 300, endpoint=False)
    shapes = [
        shape(np.c_[x + 30 * np.cos(ring), y + 30 * np.sin(ring)].tolist())
        for x, y in rng.uniform(100, 3900, (60, 2))
    ]
    shapes.append(
        shape(
            np.c_[
                2000 + 1999 * np.cos(np.linspace(0, 6.28, 20_000)),
                2000 + 1999 * np.sin(np.linspace(0, 6.28, 20_000)),
            ].tolist()
        )
    )
    p = write_json(tmp_path, json.dumps(labelme_doc(shapes, w=4000, h=4000)))
    m = labelme_to_mask(p, image_size=(4000, 4000))
    assert m.mean() > 0.7


def _finishes(fn, seconds: float = 10.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return within `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@posix_only
def test_fifo_named_json_does_not_block(tmp_path):
    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape(TRI)])})
    (root / "Train_Images" / "x.png").write_bytes(png_bytes(np.zeros((12, 16, 3), np.uint8)))
    os.mkfifo(root / "Train_Annotations" / "x.json")
    rep = _finishes(lambda: check_dataset(root))
    assert not rep.ok and any("x.json: is a FIFO, not a regular" in e for e in rep.errors), rep.errors
    os.mkfifo(tmp_path / "split.json")
    one_line_error(lambda: _finishes(lambda: load_split(tmp_path / "split.json")), "split.json", "FIFO")
    os.mkfifo(tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match="cfg.yaml"):
        _finishes(lambda: load_config(tmp_path / "cfg.yaml"))


def test_directory_named_json_and_png(tmp_path):
    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape(TRI)])})
    (root / "Train_Images" / "x.png").write_bytes(png_bytes(np.zeros((12, 16, 3), np.uint8)))
    (root / "Train_Annotations" / "x.json").mkdir()
    (root / "Train_Images" / "d.png").mkdir()
    (root / "Train_Annotations" / "d.json").write_text(json.dumps(labelme_doc([shape(TRI)])))
    check_error(root, "x.json", "is a folder, not a regular")
    check_error(root, "d.png", "is a folder")


@posix_only
def test_symlink_loop(tmp_path):
    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape(TRI)])})
    (root / "Train_Images" / "x.png").write_bytes(png_bytes(np.zeros((12, 16, 3), np.uint8)))
    (root / "Train_Annotations" / "x.json").symlink_to("x.json")
    check_error(root, "x.json", "symbolic links")
    (root / "Train_Images" / "loop.png").symlink_to("loop.png")
    (root / "Train_Annotations" / "loop.json").write_text(json.dumps(labelme_doc([shape(TRI)])))
    check_error(root, "loop.png", "symbolic links")


@pytest.mark.skipif(as_root or not hasattr(os, "geteuid"), reason="root (or Windows) can read anything")
def test_unreadable_file_and_folder(tmp_path):
    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape(TRI)]), "b": labelme_doc([shape(TRI)])})
    (root / "Train_Annotations" / "b.json").chmod(0)
    (root / "Train_Images" / "a.png").chmod(0)
    try:
        check_error(root, "b.json", "Permission denied")
        check_error(root, "a.png", "Permission denied")
    finally:
        (root / "Train_Annotations" / "b.json").chmod(0o644)
        (root / "Train_Images" / "a.png").chmod(0o644)
    cls = tmp_path / "cls"
    for c in ("A", "B"):
        (cls / c).mkdir(parents=True)
        (cls / c / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (cls / "B").chmod(0)
    try:
        one_line_error(lambda: check_dataset(cls), "B", "Permission denied")
    finally:
        (cls / "B").chmod(0o755)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """The same EACCES paths as above, simulated so they are exercised when the suite runs as root."""
    import builtins

    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape(TRI)]), "b": labelme_doc([shape(TRI)])})
    cls = tmp_path / "cls"
    for c in ("A", "B"):
        (cls / c).mkdir(parents=True)
        (cls / c / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    real_open, real_iterdir = builtins.open, Path.iterdir
    locked = {root / "Train_Annotations" / "b.json", root / "Train_Images" / "a.png"}

    def fake_open(file, *args, **kwargs):
        if isinstance(file, str | Path) and Path(file) in locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def fake_iterdir(self):
        if self == cls / "B":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(Path, "iterdir", fake_iterdir)
    check_error(root, "b.json", "Permission denied")
    check_error(root, "a.png", "Permission denied")
    one_line_error(lambda: check_dataset(cls), "B", "Permission denied")


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
