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

from bad_data import (
    check_error,
    labelme_doc,
    labelme_set,
    one_line_error,
    png_bytes,
    png_header_bomb,
    shape,
    write_json,
)
from medstudent.config import load_config
from medstudent.data.check import check_dataset
from medstudent.data.labelme import labelme_to_mask, read_labelme
from medstudent.data.layouts import open_dataset
from medstudent.data.splits import load_split
from medstudent.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::medstudent.data.labelme.LabelmeWarning")
TRI = [[1, 1], [10, 1], [10, 8]]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file types")
as_root = hasattr(os, "geteuid") and os.geteuid() == 0


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
