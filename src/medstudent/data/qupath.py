"""QuPath GeoJSON both ways: label masks to pixel-exact polygons (out), annotations back to masks (in).

Out: `mask_to_polygons` turns a label image into polygons whose edges follow pixel edges, in slide level-0
coordinates, so their area is exactly (pixel count) x scale^2; `features` wraps them as a FeatureCollection
QuPath 0.4+ imports (objectType, classification {name, color}); `write_geojson` writes it atomically.
In: `read_annotations` reads a QuPath export with one-line errors naming the file and the feature;
`rasterize` draws geometries on any grid, a pixel being inside when its centre is. Edges lie on pixel edges
and centres never do, so mask -> polygons -> rasterize on the same grid (or any grid 2^k finer) is exact.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from pathlib import Path

import geojson
import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

from medstudent.atomic import write_text_atomic
from medstudent.data.io import read_regular_bytes
from medstudent.errors import DataError

MAX_GEOJSON_BYTES = 512 * 1024 * 1024  # a whole-slide export with 100k cells is ~100 MB; more is refused
BOUNDS_TOLERANCE = 1.0  # level-0 px a polygon may stick out of the slide (QuPath's brush rounds outwards)
COORD_PRECISION = 9  # decimals kept in the written coordinates (level-0 px: far below a pixel)
UNCLASSIFIED = "Unclassified"
# QuPath-like default colours per label id (cycled): red, green, blue, yellow, magenta, cyan, orange, purple
PALETTE = [(200, 0, 0), (0, 160, 0), (0, 80, 220), (220, 200, 0), (200, 0, 200), (0, 180, 180), (240, 130, 0)]
PALETTE.append((120, 60, 200))
_AREA_TYPES = ("Polygon", "MultiPolygon")
_SKIPPED_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")


class QuPathWarning(UserWarning):
    """A GeoJSON feature was skipped (a point or a line has no area to draw)."""


# ---------------------------------------------------------------------------------------------- out


def _component_rectangles(m: np.ndarray) -> np.ndarray:
    """(n, 4) [x0, y0, x1, y1] integer rectangles tiling the True pixels of a 2-D bool array: the row runs,
    with identical runs of consecutive rows merged (a blob of R rows gives ~R boxes, a rectangle one)."""
    p = np.zeros((m.shape[0], m.shape[1] + 2), np.int8)
    p[:, 1:-1] = m
    rows, cols = np.nonzero(np.diff(p, axis=1))  # row-major: start, end, start, end ... within each row
    r, s, e = rows[0::2], cols[0::2], cols[1::2]
    order = np.lexsort((r, e, s))
    r, s, e = r[order], s[order], e[order]
    new = np.ones(len(r), bool)
    new[1:] = (s[1:] != s[:-1]) | (e[1:] != e[:-1]) | (r[1:] != r[:-1] + 1)
    first = np.flatnonzero(new)
    bottom = np.maximum.reduceat(r, first) + 1
    return np.stack([s[first], r[first], e[first], bottom], axis=1)


def mask_to_polygons(
    labels: np.ndarray, scale: float, offset: tuple[float, float] = (0.0, 0.0), simplify: float = 0.0
) -> dict[int, list[Polygon]]:
    """Polygons of every object of each label value > 0 of a 2-D label image, in level-0 coordinates.

    Pixel (r, c) covers [ox + c*scale, ox + (c+1)*scale) x [oy + r*scale, oy + (r+1)*scale). Objects are
    8-connected components; their polygons are the union of the pixels' squares, so edges follow pixel
    edges, holes are interior rings and the area is exactly count * scale^2. Where an object's parts meet
    only at a corner the union is a MultiPolygon; it is split into its Polygons (a list per label), since a
    QuPath annotation per piece is what a person would draw. Rather than tracing boundaries by hand, each
    component's rectangles are unioned by GEOS in integer pixel coordinates (exact arithmetic), then scaled.
    `simplify` > 0: Douglas-Peucker tolerance in pixels (areas then only approximate).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"mask_to_polygons expects a 2-D label image, got shape {labels.shape}")
    if labels.dtype == bool:
        values = [1] if labels.any() else []
        labels = labels.astype(np.uint8)
    elif labels.dtype.kind in "ui" and labels.size and labels.min() >= 0 and labels.max() < 1 << 16:
        values = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel())) if v > 0]
    else:
        values = [int(v) for v in np.unique(labels) if v > 0]
    ox, oy = float(offset[0]), float(offset[1])
    out: dict[int, list[Polygon]] = {}
    for v in values:
        comp, n = ndi.label(labels == v, structure=np.ones((3, 3), bool))
        polys: list[Polygon] = []
        for i, sl in enumerate(ndi.find_objects(comp), start=1):
            if sl is None:
                continue
            rect = _component_rectangles(comp[sl] == i)
            rect = rect + np.array([sl[1].start, sl[0].start, sl[1].start, sl[0].start])
            geom = shapely.union_all(shapely.box(rect[:, 0], rect[:, 1], rect[:, 2], rect[:, 3]))
            geom = geom.simplify(simplify, preserve_topology=True)  # 0 drops only collinear vertices
            geom = shapely.transform(geom, lambda c: c * scale + (ox, oy))
            polys.extend(orient(p, 1.0) for p in shapely.get_parts(geom) if isinstance(p, Polygon))
        out[v] = polys
    return out


def _rings(poly: Polygon) -> list[list[list[float]]]:
    return [np.asarray(r.coords, dtype=float)[:, :2].tolist() for r in (poly.exterior, *poly.interiors)]


def _to_geojson(geom: Polygon | MultiPolygon) -> geojson.Polygon | geojson.MultiPolygon:
    if isinstance(geom, Polygon):
        return geojson.Polygon(_rings(geom), precision=COORD_PRECISION)
    if isinstance(geom, MultiPolygon):
        return geojson.MultiPolygon([_rings(p) for p in geom.geoms], precision=COORD_PRECISION)
    raise ValueError(f"only Polygon and MultiPolygon are written, got {geom.geom_type}")


def features(
    polygons_by_label: dict[int, list[Polygon]],
    class_names: dict[int, str],
    colors: dict[int, tuple[int, int, int]] | None = None,
    object_type: str = "annotation",
    measurements: bool = True,
) -> geojson.FeatureCollection:
    """A FeatureCollection QuPath 0.4+ imports (File > Import objects, or drag and drop): one Feature per
    polygon with a uuid4 `id`, properties.objectType ("annotation" or "detection") and
    properties.classification {name, color [r, g, b]}; with `measurements`, {"Area px^2", "Perimeter px"}
    in level-0 px (the caller may add um^2). A label without a name is written as "Class <id>"."""
    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection', got {object_type!r}")
    out = []
    for label in sorted(polygons_by_label):
        name = class_names.get(label, f"Class {label}")
        color = (colors or {}).get(label, PALETTE[(label - 1) % len(PALETTE)])
        for geom in polygons_by_label[label]:
            props: dict = {
                "objectType": object_type,
                "classification": {"name": name, "color": [int(c) for c in color]},
            }
            if measurements:
                props["measurements"] = {"Area px^2": float(geom.area), "Perimeter px": float(geom.length)}
            out.append(geojson.Feature(id=str(uuid.uuid4()), geometry=_to_geojson(geom), properties=props))
    return geojson.FeatureCollection(out)


def write_geojson(path: str | Path, collection: geojson.FeatureCollection) -> None:
    """Validate (the `geojson` package's checks) and write compact JSON atomically: a killed export never
    leaves half a file for QuPath to choke on."""
    if not collection.is_valid:
        raise ValueError(f"invalid GeoJSON: {collection.errors()}")
    write_text_atomic(path, json.dumps(collection, separators=(",", ":"), allow_nan=False))


# ----------------------------------------------------------------------------------------------- in


def _class_name(props: dict) -> str | None:
    """QuPath 0.3+ {"name", "color"}, 0.4 derived classes {"names": [...]}, 0.2 {"name", "colorRGB"}, or a
    bare string; None when unclassified."""
    cls = props.get("classification")
    if cls is None:
        return None
    if isinstance(cls, str):
        return cls or None
    if isinstance(cls, dict):
        if isinstance(cls.get("names"), list) and cls["names"]:
            return ": ".join(str(n) for n in cls["names"])
        name = cls.get("name")
        return str(name) if name not in (None, "") else None
    return None


def _ring(path: Path, where: str, ring: object) -> list[tuple[float, float]]:
    if not isinstance(ring, list):
        raise DataError(path, f"{where}: a ring must be a list of [x, y] positions")
    pts = []
    for p in ring:
        ok = isinstance(p, list) and len(p) >= 2
        ok = ok and all(isinstance(c, int | float) and not isinstance(c, bool) for c in p[:2])
        if not ok or not (math.isfinite(p[0]) and math.isfinite(p[1])):
            raise DataError(path, f"{where}: invalid position {json.dumps(p)[:60]} (need two finite numbers)")
        pts.append((float(p[0]), float(p[1])))
    if len(set(pts)) < 3:
        raise DataError(path, f"{where}: a ring has {len(set(pts))} distinct points, at least 3 are needed")
    return pts


def _polygon(path: Path, where: str, coords: object) -> Polygon:
    if not isinstance(coords, list) or not coords:
        raise DataError(path, f"{where}: polygon coordinates must be a non-empty list of rings")
    rings = [_ring(path, where, r) for r in coords]
    return Polygon(rings[0], rings[1:])


def _geometry(path: Path, where: str, geom: dict) -> shapely.Geometry | None:
    """The area of a GeoJSON geometry (made valid), or None for a point or line."""
    gtype, coords = geom.get("type"), geom.get("coordinates")
    if gtype in _SKIPPED_TYPES:
        return None
    if gtype == "Polygon":
        g = _polygon(path, where, coords)
    elif gtype == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            raise DataError(path, f"{where}: MultiPolygon coordinates must be a non-empty list of polygons")
        g = MultiPolygon([_polygon(path, where, c) for c in coords])
    elif gtype == "GeometryCollection" and isinstance(geom.get("geometries"), list):
        parts = [_geometry(path, where, m) for m in geom["geometries"] if isinstance(m, dict)]
        g = shapely.union_all([p for p in parts if p is not None])
    else:
        raise DataError(path, f"{where}: geometry type {str(gtype)[:40]!r} is not Polygon or MultiPolygon")
    if not g.is_valid:  # self-intersections (a lasso crossing itself), touching rings, ...
        g = shapely.make_valid(g)
    polys = [p for p in shapely.get_parts(g) if isinstance(p, Polygon | MultiPolygon) and p.area > 0]
    if not polys and g.geom_type == "GeometryCollection":  # make_valid may nest collections
        polys = [p for p in shapely.get_parts(shapely.get_parts(g)) if isinstance(p, Polygon) and p.area > 0]
    return shapely.union_all(polys) if polys else shapely.Polygon()


def read_annotations(
    path: str | Path,
    label_map: dict[str, int] | None = None,
    bounds: tuple[int, int] | None = None,
) -> list[tuple[shapely.Geometry, int]]:
    """(geometry, class id) for every area annotation of a QuPath GeoJSON export (FeatureCollection).

    Class names come from properties.classification; label_map None maps every class (and unclassified)
    to 1, as data.label_map's default does. With a label_map, an unclassified feature needs an
    "Unclassified" entry. bounds = the slide's level-0 (width, height): a polygon outside it (by more
    than BOUNDS_TOLERANCE px) is an error, typically an export from another image. Points and lines are
    skipped with one QuPathWarning giving their count; every other problem is a one-line DataError naming
    the file and the feature as features[i] (0-based).
    """
    path = Path(path)
    raw = read_regular_bytes(path, MAX_GEOJSON_BYTES, "GeoJSON file")
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(path, "is not UTF-8 text (a GeoJSON export is UTF-8 JSON)") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"is not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise DataError(path, "is not JSON this reader accepts (nested too deeply)") from None
    hint = 'in QuPath choose "Export as FeatureCollection" when exporting objects as GeoJSON'
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        found = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise DataError(path, f"top level is {str(found)[:40]!r}, not a FeatureCollection; {hint}")
    feats = doc.get("features")
    if not isinstance(feats, list):
        raise DataError(path, "FeatureCollection has no 'features' list")
    out: list[tuple[shapely.Geometry, int]] = []
    skipped = 0
    for i, f in enumerate(feats):
        where = f"features[{i}]"
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise DataError(path, f"{where} is not a GeoJSON Feature")
        geom = f.get("geometry")
        if not isinstance(geom, dict):
            raise DataError(path, f"{where} has no geometry")
        g = _geometry(path, where, geom)
        if g is None:
            skipped += 1
            continue
        if g.is_empty:
            skipped += 1  # zero area (all points on a line): nothing to draw
            continue
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        name = _class_name(props)
        value = _class_id(path, where, name, label_map)
        if bounds is not None:
            x0, y0, x1, y1 = g.bounds
            t = BOUNDS_TOLERANCE
            if x0 < -t or y0 < -t or x1 > bounds[0] + t or y1 > bounds[1] + t:
                raise DataError(
                    path,
                    f"{where} spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, outside the slide "
                    f"(level 0: {bounds[0]}x{bounds[1]} px); was it exported from another image?",
                )
        out.append((g, value))
    if skipped:
        warnings.warn(
            f"{path}: {skipped} feature(s) without area (points, lines) skipped", QuPathWarning, stacklevel=2
        )
    return out


def _class_id(path: Path, where: str, name: str | None, label_map: dict[str, int] | None) -> int:
    if label_map is None:
        return 1
    key = UNCLASSIFIED if name is None else name
    if key not in label_map:
        known = ", ".join(sorted(label_map)) or "none"
        what = "is unclassified" if name is None else f"has class {name[:60]!r}"
        raise DataError(path, f"{where} {what}, which data.label_map does not name (known: {known})")
    return int(label_map[key])


# ------------------------------------------------------------------------------------------ raster


def _edges(geom: shapely.Geometry) -> np.ndarray:
    """(n, 4) [x0, y0, x1, y1] segments of all rings (exteriors and holes) of a polygonal geometry."""
    polys = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon)]
    if not polys:
        return np.zeros((0, 4))
    rings = shapely.get_rings(np.asarray(polys, dtype=object))
    coords, idx = shapely.get_coordinates(rings, return_index=True)
    same = idx[1:] == idx[:-1]
    return np.hstack([coords[:-1][same], coords[1:][same]])


def rasterize(
    geoms_with_values: list[tuple[shapely.Geometry, int]], x: int, y: int, w: int, h: int, mpp_scale: float
) -> np.ndarray:
    """(h, w) uint8: each geometry's value where it covers a pixel centre (later ones on top), in the box
    (x, y, w, h) of the grid whose pixel is `mpp_scale` level-0 px.

    An even-odd scanline fill over all rings at once (holes clear themselves, and the rings of a valid
    polygon never cross): per row, the crossings of the row's centre line with the edges, sorted and
    paired. It costs O(edges + crossings), unlike a point-in-polygon test per pixel of the bounding box.
    A centre exactly on an edge follows the half-open rule (left and top edges in, right and bottom out).
    """
    out = np.zeros((h, w), np.uint8)
    s = float(mpp_scale)
    for geom, value in geoms_with_values:
        if not 0 <= value <= 255:
            raise ValueError(f"class id {value} does not fit a uint8 mask")
        if geom.is_empty:
            continue
        bx0, by0, bx1, by1 = geom.bounds
        if bx1 / s <= x or by1 / s <= y or bx0 / s >= x + w or by0 / s >= y + h:
            continue
        e = _edges(geom)
        gx0, gy0, gx1, gy1 = e[:, 0] / s - x, e[:, 1] / s - y, e[:, 2] / s - x, e[:, 3] / s - y
        keep = gy0 != gy1  # horizontal edges never cross a centre line
        gx0, gy0, gx1, gy1 = gx0[keep], gy0[keep], gx1[keep], gy1[keep]
        # rows r whose centre r + 0.5 is in [min y, max y)
        r0 = np.clip(np.ceil(np.minimum(gy0, gy1) - 0.5), 0, h).astype(np.int64)
        r1 = np.clip(np.ceil(np.maximum(gy0, gy1) - 0.5), 0, h).astype(np.int64)
        count = np.maximum(r1 - r0, 0)
        total = int(count.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(count)), count)
        rows = r0[edge] + np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        yc = rows + 0.5
        xc = gx0[edge] + (yc - gy0[edge]) * (gx1[edge] - gx0[edge]) / (gy1[edge] - gy0[edge])
        order = np.lexsort((xc, rows))
        rows, xc = rows[order], xc[order]
        row, xa, xb = rows[0::2], xc[0::2], xc[1::2]
        c0 = np.clip(np.ceil(xa - 0.5), 0, w).astype(np.int64)
        c1 = np.clip(np.ceil(xb - 0.5), 0, w).astype(np.int64)
        span = c1 > c0
        row, c0, c1 = row[span], c0[span], c1[span]
        if not len(row):
            continue
        # the fill runs over the geometry's window only (a full-box array per geometry is O(boxes x objects))
        ra, rb, ca, cb = row.min(), row.max() + 1, c0.min(), c1.max()
        diff = np.zeros((rb - ra, cb - ca + 1), np.int32)
        np.add.at(diff, (row - ra, c0 - ca), 1)
        np.add.at(diff, (row - ra, c1 - ca), -1)
        window = out[ra:rb, ca:cb]
        window[np.cumsum(diff, axis=1)[:, :-1] > 0] = value
    return out
