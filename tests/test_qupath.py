"""data.qupath: exact mask <-> polygon round trips, QuPath-shaped GeoJSON, one-line errors on bad exports."""

from __future__ import annotations

import json
import time

import geojson
import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon

from medstudent.data.qupath import (
    QuPathWarning,
    features,
    mask_to_polygons,
    rasterize,
    read_annotations,
    write_geojson,
)
from medstudent.errors import DataError


def blobs(seed: int, shape=(60, 75), labels=(1, 2, 3)) -> np.ndarray:
    """Random smooth blobs of several labels, with holes punched in them."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    for v in labels:
        m[ndi.gaussian_filter(rng.random(shape), 2.0) > 0.53] = v
    m[ndi.gaussian_filter(rng.random(shape), 1.5) > 0.56] = 0  # holes
    return m


def ring_mask() -> np.ndarray:
    m = np.zeros((20, 20), np.uint8)
    m[3:15, 4:16] = 1
    m[7:10, 8:11] = 0  # a hole
    m[16, 16] = 2  # a lone pixel of another class
    m[17, 17] = 2  # touching it diagonally only
    return m


def as_items(polys: dict[int, list[Polygon]]) -> list[tuple[Polygon, int]]:
    return [(p, v) for v, ps in polys.items() for p in ps]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [1.0, 0.37, 4.0])
def test_round_trip_exact_same_and_finer_grid(seed, scale):
    m = blobs(seed)
    polys = mask_to_polygons(m, scale)
    h, w = m.shape
    assert np.array_equal(rasterize(as_items(polys), 0, 0, w, h, scale), m)
    fine = rasterize(as_items(polys), 0, 0, 2 * w, 2 * h, scale / 2)
    assert np.array_equal(fine, np.kron(m, np.ones((2, 2), np.uint8)))
    # a box inside the grid
    assert np.array_equal(rasterize(as_items(polys), 10, 7, 30, 20, scale), m[7:27, 10:40])


@pytest.mark.parametrize("seed", range(4))
def test_area_exact_valid_and_offset(seed):
    m = blobs(seed)
    scale, off = 2.5, (1000.0, 333.0)
    polys = mask_to_polygons(m, scale, offset=off)
    assert set(polys) == {v for v in np.unique(m) if v > 0}
    for v, ps in polys.items():
        assert all(isinstance(p, Polygon) and p.is_valid for p in ps)
        assert sum(p.area for p in ps) == pytest.approx((m == v).sum() * scale**2, rel=1e-12)
        x0, y0, _, _ = shapely.union_all(ps).bounds
        rows, cols = np.nonzero(m == v)
        assert (x0, y0) == (off[0] + cols.min() * scale, off[1] + rows.min() * scale)
    # drawn back on the grid that starts at the offset
    assert np.array_equal(rasterize(as_items(polys), 400, 133.2, m.shape[1], m.shape[0], scale), m)


def test_holes_are_interior_rings_and_diagonal_touch_splits():
    polys = mask_to_polygons(ring_mask(), 1.0)
    (ring,) = polys[1]
    assert len(ring.interiors) == 1 and Polygon(ring.interiors[0]).area == 9
    assert ring.area == 12 * 12 - 9
    assert ring.exterior.coords[0] == ring.exterior.coords[-1]
    assert len(ring.exterior.coords) == 5  # collinear vertices dropped: a square
    assert sorted(p.area for p in polys[2]) == [1, 1]  # a corner-only touch: two polygons


def test_bool_mask_empty_mask_and_simplify():
    m = ring_mask() == 1
    assert list(mask_to_polygons(m, 1.0)) == [1]
    assert mask_to_polygons(np.zeros((5, 5), np.uint8), 1.0) == {}
    disk = np.hypot(*np.mgrid[-40:40, -40:40]) < 30
    exact = mask_to_polygons(disk, 1.0)[1][0]
    simple = mask_to_polygons(disk, 1.0, simplify=1.0)[1][0]
    assert len(simple.exterior.coords) < len(exact.exterior.coords) / 2
    assert simple.area == pytest.approx(exact.area, rel=0.03)
    with pytest.raises(ValueError):
        mask_to_polygons(np.zeros((2, 2, 2), np.uint8), 1.0)


def test_large_mask_fast():
    rng = np.random.default_rng(0)
    m = np.zeros((5000, 5000), np.uint8)
    for _ in range(300):
        cy, cx, r = rng.integers(100, 4900, 2).tolist() + [int(rng.integers(10, 60))]
        yy, xx = np.ogrid[cy - r : cy + r, cx - r : cx + r]
        m[cy - r : cy + r, cx - r : cx + r][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 4)
    t = time.perf_counter()
    polys = mask_to_polygons(m, 1.0)
    assert time.perf_counter() - t < 10
    t = time.perf_counter()
    assert np.array_equal(rasterize(as_items(polys), 0, 0, 5000, 5000, 1.0), m)
    assert time.perf_counter() - t < 5


def test_features_qupath_shape_and_write(tmp_path):
    polys = mask_to_polygons(blobs(1), 2.0)
    fc = features(polys, {1: "Tumor", 2: "Stroma"}, {1: (200, 0, 0)})
    assert fc.is_valid
    ids = set()
    for f in fc["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in ("Tumor", "Stroma", "Class 3")
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["Area px^2"] > 0
        assert shapely.geometry.shape(f["geometry"]).is_valid
        ids.add(f["id"])
    assert len(ids) == len(fc["features"]) == sum(map(len, polys.values()))
    red = [f for f in fc["features"] if f["properties"]["classification"]["name"] == "Tumor"]
    assert red[0]["properties"]["classification"]["color"] == [200, 0, 0]
    det = features(polys, {}, None, object_type="detection", measurements=False)
    assert det["features"][0]["properties"].keys() == {"objectType", "classification"}
    path = tmp_path / "out.geojson"
    write_geojson(path, fc)
    text = path.read_text()
    assert "\n" not in text and ": " not in text  # compact
    assert geojson.loads(text).is_valid
    back = read_annotations(path, {"Tumor": 1, "Stroma": 2, "Class 3": 3})
    m = blobs(1)
    assert np.array_equal(rasterize(back, 0, 0, m.shape[1], m.shape[0], 2.0), m)


def test_read_legacy_and_unclassified(tmp_path):
    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": props}
        for props in (
            {"classification": {"name": "Tumor", "colorRGB": -3670016}},  # QuPath 0.2
            {"classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}},  # 0.4 derived class
            {},  # unclassified
            {"classification": None},
        )
    ]
    p = tmp_path / "legacy.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    assert [v for _, v in read_annotations(p, None)] == [1, 1, 1, 1]
    lm = {"Tumor": 1, "Tumor: Positive": 2, "Unclassified": 3}
    assert [v for _, v in read_annotations(p, lm)] == [1, 2, 3, 3]


def test_self_intersection_made_valid_and_points_skipped(tmp_path):
    bowtie = [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": bowtie}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[1, 1], [2, 2]]}},
    ]
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    with pytest.warns(QuPathWarning, match="2 feature"):
        items = read_annotations(p, None, bounds=(20, 20))
    assert len(items) == 1 and items[0][0].is_valid and items[0][0].area == pytest.approx(50)


def _fc(*geometries, props=None) -> dict:
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": g, "properties": props or {"classification": {"name": "Tumor"}}}
            for g in geometries
        ],
    }


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
BAD = {
    "not json": (b"{not json", "not JSON"),
    "not utf8": (b'{"type": "FeatureCollection", "features": [], "x": "\xff\xfe"}', "UTF-8"),
    "a list": (json.dumps([{"type": "Feature"}]).encode(), "Export as FeatureCollection"),
    "a feature": (json.dumps({"type": "Feature", "geometry": SQUARE}).encode(), "FeatureCollection"),
    "no features": (b'{"type": "FeatureCollection"}', "features"),
    "no geometry": (json.dumps(_fc(None)).encode(), "features[0] has no geometry"),
    "bad type": (json.dumps(_fc(SQUARE, {"type": "Circle"})).encode(), "features[1]"),
    "nan": (
        json.dumps(_fc({"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 0], [1, 1]]]})).encode(),
        "finite",
    ),
    "string coord": (
        json.dumps(_fc({"type": "Polygon", "coordinates": [[[0, 0], ["1", 0], [1, 1]]]})).encode(),
        "invalid position",
    ),
    "two points": (
        json.dumps(_fc({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]})).encode(),
        "at least 3",
    ),
    "empty coords": (json.dumps(_fc({"type": "Polygon", "coordinates": []})).encode(), "non-empty"),
    "outside": (
        json.dumps(
            _fc(SQUARE, {"type": "Polygon", "coordinates": [[[90, 90], [120, 90], [120, 95]]]})
        ).encode(),
        "features[1] spans",
    ),
    "unknown class": (
        json.dumps(_fc(SQUARE, props={"classification": {"name": "Necrosis"}})).encode(),
        "'Necrosis'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_exports_one_line_errors(tmp_path, case):
    data, needle = BAD[case]
    p = tmp_path / f"bad {case}.geojson"
    p.write_bytes(data)
    with pytest.raises(DataError) as e:
        read_annotations(p, {"Tumor": 1, "Stroma": 2}, bounds=(100, 100))
    msg = str(e.value)
    assert "\n" not in msg and p.name in msg and needle in msg, msg
    if case == "unknown class":
        assert "features[0]" in msg and "Stroma, Tumor" in msg


def test_bounds_tolerance_and_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "edge.geojson"
    g = {"type": "Polygon", "coordinates": [[[-0.5, 0], [100.8, 0], [100.8, 50], [-0.5, 50]]]}
    p.write_text(json.dumps(_fc(g)))
    assert len(read_annotations(p, None, bounds=(100, 100))) == 1  # within 1 px: QuPath's rounding
    monkeypatch.setattr("medstudent.data.qupath.MAX_GEOJSON_BYTES", 10)
    with pytest.raises(DataError, match="more than the 10"):
        read_annotations(p)
    with pytest.raises(DataError, match="not found"):
        read_annotations(tmp_path / "missing.geojson")
