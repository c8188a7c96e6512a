"""Property-based fuzzing of the slide inputs (issue 19's bad input, in issue 20's manner): QuPath GeoJSON
(random JSON, and random damage to a valid export) and slide files (random bytes, damaged pyramidal TIFFs).

Property: each case ends in a result or in a DataError (ConfigError included) whose message is one line and
names the file; never another exception. Accepted annotations are valid shapely geometries with class ids
from the label map. Derandomised, so every run tries the same cases.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medstudent.data.qupath import features, mask_to_polygons, read_annotations, write_geojson
from medstudent.data.slide import Slide
from medstudent.data.synth.slide import Canvas, Island, write_pyramid_tiff
from medstudent.errors import DataError


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
KEYS = ["type", "features", "geometry", "coordinates", "properties", "classification", "name", "objectType"]


def valid_export(tmp: Path) -> dict:
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 5:30] = 1
    mask[10:14, 10:14] = 0
    mask[25:35, 40:55] = 2
    doc = features(mask_to_polygons(mask, 4.0), {1: "STAS", 2: "Other"})
    write_geojson(tmp / "ok.geojson", doc)
    return json.loads((tmp / "ok.geojson").read_text())


def damage(doc: object, path: list, value: object) -> object:
    """`doc` with the node at `path` (keys / indices, followed while they exist) replaced by `value`."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict) and doc:
        key = head if head in doc else sorted(doc)[hash(str(head)) % len(doc)]
        return {**doc, key: damage(doc[key], rest, value)}
    if isinstance(doc, list) and doc:
        i = head % len(doc) if isinstance(head, int) else 0
        return [*doc[:i], damage(doc[i], rest, value), *doc[i + 1 :]]
    return value


def check(path: Path, label_map: dict | None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = read_annotations(path, label_map, bounds=(400, 400))
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and path.name in msg, msg
        return
    allowed = set((label_map or {"x": 1}).values())
    for geom, value in out:
        assert geom.is_valid and not geom.is_empty and value in allowed


@fuzz(200)
@given(doc=JSON)
def test_random_json_as_geojson(tmp_path, doc):
    path = tmp_path / "random.geojson"
    path.write_text(json.dumps(doc, allow_nan=True))
    check(path, None)


@fuzz(300)
@given(
    where=st.lists(st.sampled_from(KEYS) | st.integers(0, 5), min_size=1, max_size=7),
    value=JSON,
    label_map=st.sampled_from([None, {"STAS": 1, "Other": 2}, {"STAS": 1}]),
)
def test_damaged_qupath_exports(tmp_path, where, value, label_map):
    doc = damage(valid_export(tmp_path), where, value)
    path = tmp_path / "damaged.geojson"
    path.write_text(json.dumps(doc, allow_nan=True))
    check(path, label_map)


@pytest.fixture(scope="module")
def good_slide(tmp_path_factory) -> bytes:
    img = np.full((300, 400, 3), (200, 120, 160), np.uint8)
    path = write_pyramid_tiff(
        tmp_path_factory.mktemp("s") / "ok.tif", Canvas(700, 600, [Island(50, 50, img)]), 0.5
    )
    return path.read_bytes()


@fuzz(100)
@given(
    cut=st.integers(0, 10_000),
    flips=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=20),
    suffix=st.sampled_from([".tif", ".svs", ".ndpi"]),
)
def test_damaged_slide_files(tmp_path, good_slide, cut, flips, suffix):
    data = bytearray(good_slide[: len(good_slide) - cut] if cut < len(good_slide) else good_slide[:8])
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    path = tmp_path / f"case{suffix}"
    path.write_bytes(bytes(data))
    try:
        with Slide(path, mpp=0.5) as s:
            w, h = s.size_at(2.0)
            out = s.read(0, 0, min(w, 64), min(h, 64), 2.0)
            assert out.dtype == np.uint8 and out.shape[2] == 3
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and path.name in msg, msg
