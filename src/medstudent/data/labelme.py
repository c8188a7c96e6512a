"""labelme JSON <-> masks.

Rasterisation uses PIL's ImageDraw exactly as labelme's own `shape_to_mask` does, so masks match what the
annotator saw. Mask -> polygons uses OpenCV contours (pixel-exact outer boundaries), so that predicted objects
can be opened and corrected in labelme.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from medstudent.atomic import write_text_atomic
from medstudent.data.io import MAX_IMAGE_PIXELS, read_regular_bytes
from medstudent.errors import DataError

SUPPORTED_SHAPES = ("polygon", "rectangle", "circle")
# Bounds on what one file may ask of the rasteriser. A hand-drawn (or mask_to_labelme) outline has hundreds
# to a few thousand vertices; PIL's polygon fill costs O(vertices x rows), so 200,000 vertices take seconds.
MAX_POINTS_PER_SHAPE = 20_000
MAX_POINTS_PER_FILE = 200_000
# No image is a billion pixels wide; the bound keeps squared distances exact enough in float64.
MAX_COORD = 1e9
# Circles up to this radius (and near the image) go through PIL, pixel-identical to labelme; PIL's cost
# explodes past ~1e5 px (1e6 px: ~50 s), so larger ones are filled row by row (_circle_spans), O(image).
PIL_MAX_RADIUS = 100_000
# Fill work per file, so a hostile annotation on a large image cannot take minutes: shapes may fill the image
# MAX_FILL_TIMES over (a full 4000x4000 fill costs PIL ~1 ms), and polygon edge crossings summed over rows
# may reach MAX_EDGE_CROSSINGS (~1e7 per second in PIL; a simple outline crosses each row twice, a random
# 20,000-point scribble ~10,000 times).
MAX_FILL_TIMES = 32
MAX_EDGE_CROSSINGS = 20_000_000
MAX_JSON_BYTES = 256 << 20  # imageData of a large JPEG is tens of MB; a quarter GB is no annotation

Coord = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COORD, le=MAX_COORD)]


def _whole(v: object) -> object:
    """64.0 (as some converters write it) is the size 64; 64.5, true, "64" and NaN stay errors."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Size = Annotated[StrictInt, BeforeValidator(_whole), Field(gt=0)]


class _Shape(BaseModel):
    """One labelme shape as labelme writes it; strict, so "12", true or [x, y, z] are errors, not guesses."""

    model_config = ConfigDict(strict=True, extra="allow")
    label: StrictStr = ""
    points: list[tuple[Coord, Coord]] = []
    shape_type: StrictStr | None = None


class _LabelmeDoc(BaseModel):
    """The labelme file schema (the fields we read); other keys (version, flags, ...) pass through."""

    model_config = ConfigDict(strict=True, extra="allow")
    shapes: list[_Shape]
    imagePath: StrictStr | None = None  # noqa: N815 - labelme's own key
    imageData: StrictStr | None = None  # noqa: N815
    imageHeight: Size | None = None  # noqa: N815
    imageWidth: Size | None = None  # noqa: N815


class LabelmeWarning(UserWarning):
    """A labelme file had something we could work around (skipped shape, clipped points)."""


@dataclass
class LabelmeShape:
    label: str
    points: np.ndarray  # (N, 2) float, x then y
    shape_type: str
    index: int


@dataclass
class LabelmeFile:
    path: Path
    image_path: str | None
    width: int | None
    height: int | None
    shapes: list[LabelmeShape]
    image_data: bytes | None = None
    skipped: list[str] = field(default_factory=list)


def _where(loc: tuple) -> str:
    """pydantic's error location as the user reads the file: shape 3 points[1][0], imageWidth."""
    if len(loc) >= 2 and loc[0] == "shapes" and isinstance(loc[1], int):
        rest = "".join(f"[{x}]" if isinstance(x, int) else f" {x}" for x in loc[2:])
        return f"shape {loc[1]}{rest}"
    return "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(loc))


def _parse(path: Path) -> _LabelmeDoc:
    """Validate the file against the labelme schema in one pass (pydantic's JSON parser: no RecursionError on
    deep nesting, no OverflowError on 1e400, NaN and Infinity refused)."""
    raw = read_regular_bytes(path, max_bytes=MAX_JSON_BYTES, what="annotation")
    try:
        return _LabelmeDoc.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise DataError(path, f"not valid JSON ({err['msg']})") from None
        if not err["loc"] and err["type"] in ("model_type", "missing"):
            raise DataError(path, "not a labelme file (no 'shapes' list)") from None
        if err["loc"] == ("shapes",):
            raise DataError(path, f"not a labelme file ('shapes' is not a list: {err['msg']})") from None
        n = len(e.errors())
        more = f" ({n} error(s) in all)" if n > 1 else ""
        raise DataError(path, f"{_where(err['loc'])}: {err['msg']}{more}") from None


def read_labelme(path: str | Path) -> LabelmeFile:
    """Parse a labelme JSON file; raises DataError naming the file (and shape) on malformed content."""
    path = Path(path)
    doc = _parse(path)
    shapes: list[LabelmeShape] = []
    skipped: list[str] = []
    total = 0
    for i, s in enumerate(doc.shapes):
        stype = s.shape_type or "polygon"  # labelme < 3 wrote no shape_type
        label = s.label
        if stype not in SUPPORTED_SHAPES:
            msg = f"{path}: shape {i} ('{label}') has shape_type '{stype}', skipped"
            warnings.warn(msg, LabelmeWarning, stacklevel=2)
            skipped.append(msg)
            continue
        n = len(s.points)
        total += n
        if n > MAX_POINTS_PER_SHAPE or total > MAX_POINTS_PER_FILE:
            raise DataError(
                path,
                f"shape {i} ('{label}') has {n} points ({total} so far in the file); at most "
                f"{MAX_POINTS_PER_SHAPE} per shape and {MAX_POINTS_PER_FILE} per file are read "
                "(simplify the outline, e.g. mask_to_labelme(..., tolerance=1))",
            )
        pts = np.array(s.points, dtype=np.float64).reshape(n, 2)
        need = 3 if stype == "polygon" else 2
        if n < need:
            raise DataError(path, f"shape {i} ('{label}') is a {stype} with {n} points, needs {need}")
        if stype != "polygon" and n != 2:
            raise DataError(path, f"shape {i} ('{label}') is a {stype} with {n} points, needs exactly 2")
        shapes.append(LabelmeShape(label, pts, stype, i))
    image_data = None
    if doc.imageData:
        try:
            image_data = base64.b64decode(doc.imageData, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(path, f"imageData is not valid base64 ({e})") from None
    return LabelmeFile(
        path=path,
        image_path=doc.imagePath,
        width=doc.imageWidth,
        height=doc.imageHeight,
        shapes=shapes,
        image_data=image_data,
        skipped=skipped,
    )


def out_of_bounds(shape: LabelmeShape, width: int, height: int, tol: float = 0.5) -> bool:
    """True when a point lies outside the image (by more than half a pixel, labelme's own rounding)."""
    p = shape.points
    return bool(
        (p[:, 0] < -tol).any()
        or (p[:, 1] < -tol).any()
        or (p[:, 0] > width - 1 + tol).any()
        or (p[:, 1] > height - 1 + tol).any()
    )


def _circle_spans(cx: float, cy: float, r: float, w: int, h: int) -> list[tuple[int, int, int]]:
    """(row, first x, last x) of the pixels whose centre lies within r of (cx, cy), clipped to a w x h image:
    O(h) whatever the radius (a 3e7 px radius took PIL's ellipse 35 s). (r-d)(r+d) keeps the span exact for
    huge r, where r*r - d*d would cancel catastrophically."""
    dy = np.abs(np.arange(h, dtype=np.float64) - cy)
    half = np.sqrt(np.clip((r - dy) * (r + dy), 0, None))
    x0 = np.maximum(np.ceil(np.clip(cx - half, -1, w)), 0).astype(np.int64)
    x1 = np.minimum(np.floor(np.clip(cx + half, -1, w)), w - 1).astype(np.int64)
    rows = np.flatnonzero((dy <= r) & (x0 <= x1))
    return [(int(y), int(x0[y]), int(x1[y])) for y in rows]


class _FillBudget:
    """What rasterising one file may cost; exceeding it is a DataError naming the shape."""

    def __init__(self, path: Path, w: int, h: int):
        self.path, self.w, self.h = path, w, h
        self.area = MAX_FILL_TIMES * w * h + 1_000_000
        self.crossings = float(MAX_EDGE_CROSSINGS)

    def fill(self, s: LabelmeShape, area: float) -> None:
        self.area -= area
        if self.area < 0:
            raise DataError(
                self.path,
                f"shape {s.index} ('{s.label}'): the shapes fill the {self.w}x{self.h} image more than "
                f"{MAX_FILL_TIMES} times over; refused rather than rasterised for minutes",
            )

    def rows(self, s: LabelmeShape, n: float, per_row: float = 1.0) -> None:
        self.crossings -= per_row * n
        if self.crossings < 0:
            what = (
                f"is a self-intersecting polygon (~{per_row:.0f} edge crossings per row over {n:.0f} rows)"
                if per_row > 2
                else f"takes the file past {MAX_EDGE_CROSSINGS} row operations (too many shapes)"
            )
            raise DataError(
                self.path, f"shape {s.index} ('{s.label}') {what}; refused rather than rasterised for minutes"
            )

    def polygon(self, s: LabelmeShape, pts: np.ndarray) -> None:
        """Charge a (clipped) polygon: its area, and its edge crossings estimated on up to 16 sample rows."""
        x, y = pts[:, 0], pts[:, 1]
        self.fill(s, 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))))
        lo, hi = float(y.min()), float(y.max())
        rows = math.floor(hi) - math.ceil(lo) + 1
        if rows <= 0 or len(pts) <= 8:
            return
        ys = np.linspace(lo, hi, num=min(16, rows))[:, None]
        y0, y1 = y[None, :], np.roll(y, -1)[None, :]
        self.rows(s, rows, per_row=float(((y0 <= ys) != (y1 <= ys)).sum(axis=1).mean()))


def labelme_to_mask(
    source: str | Path | LabelmeFile,
    image_size: tuple[int, int] | None = None,
    label_map: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Rasterise a labelme file into a uint8 class-id mask of shape (H, W).

    image_size: (width, height) of the real image (EXIF-oriented, as labelme stores it); checked against
    imageWidth/imageHeight in the JSON.
    label_map: label name -> class id. Default: every label is foreground (1). A label missing from a given
    map is an error, since a silently dropped label is a silently wrong mask.
    Later shapes paint over earlier ones, as in labelme.
    """
    lm = source if isinstance(source, LabelmeFile) else read_labelme(source)
    path = lm.path
    if image_size is not None:
        w, h = image_size
        if (lm.width is not None and lm.width != w) or (lm.height is not None and lm.height != h):
            raise DataError(
                path, f"imageWidth x imageHeight {lm.width}x{lm.height} does not match the image {w}x{h}"
            )
    else:
        if lm.width is None or lm.height is None:
            raise DataError(path, "no imageWidth/imageHeight and no image to take the size from")
        w, h = lm.width, lm.height
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(path, f"imageWidth x imageHeight {w}x{h} exceeds the {MAX_IMAGE_PIXELS} pixel limit")
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    budget = _FillBudget(path, w, h)
    for s in lm.shapes:
        if label_map is None:
            cls = 1
        elif s.label in label_map:
            cls = int(label_map[s.label])
        else:
            raise DataError(
                path,
                f"shape {s.index} has label '{s.label}' which is not in the label map {sorted(label_map)}",
            )
        if not 0 <= cls <= 255:
            raise DataError(path, f"label '{s.label}' maps to class {cls}; class ids are 0..255")
        if out_of_bounds(s, w, h):
            warnings.warn(
                f"{path}: shape {s.index} ('{s.label}') has points outside the {w}x{h} image, clipped",
                LabelmeWarning,
                stacklevel=2,
            )
        if s.shape_type == "circle":  # centre and a point on the circumference
            (cx, cy), (px, py) = s.points[0], s.points[1]
            r = math.hypot(px - cx, py - cy)
            near = -r - w <= cx <= 2 * w + r and -r - h <= cy <= 2 * h + r
            if r <= min(2 * max(w, h), PIL_MAX_RADIUS) and near:
                budget.fill(s, min(4 * r * r, w * h))
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=cls, fill=cls)  # labelme's own
            else:  # PIL's cost explodes with r (1e6 px: ~50 s), so big circles are filled row-span-wise
                budget.rows(s, h)
                spans = _circle_spans(cx, cy, r, w, h)
                budget.fill(s, sum(b - a + 1 for _, a, b in spans))
                for y, a, b in spans:
                    draw.line([(a, y), (b, y)], fill=cls)
            continue
        pts = s.points.copy()
        pts[:, 0] = pts[:, 0].clip(0, w - 1)
        pts[:, 1] = pts[:, 1].clip(0, h - 1)
        xy = [tuple(p) for p in pts]
        if s.shape_type == "polygon":
            budget.polygon(s, pts)
            draw.polygon(xy, outline=cls, fill=cls)
        else:  # rectangle: two opposite corners, in either order
            (x0, y0), (x1, y1) = xy[0], xy[1]
            budget.fill(s, (abs(x1 - x0) + 1) * (abs(y1 - y0) + 1))
            draw.rectangle([(min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))], outline=cls, fill=cls)
    return np.asarray(canvas, dtype=np.uint8)


def mask_to_polygons(
    mask: np.ndarray, min_area: int = 1, tolerance: float = 0.0
) -> list[tuple[int, np.ndarray]]:
    """Outer boundaries of every connected object, as (class id, (N, 2) x/y points) pairs.

    tolerance > 0 simplifies polygons (Douglas-Peucker, in pixels) so annotators get editable vertex counts.
    Objects of 1-2 pixels become tiny rectangles-as-polygons so labelme still accepts them (>= 3 points).
    """
    out: list[tuple[int, np.ndarray]] = []
    for cls in [int(c) for c in np.unique(mask) if c != 0]:
        binary = (mask == cls).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for c in contours:
            if cv2.contourArea(c) + len(c) < min_area:
                continue
            if tolerance > 0:
                c = cv2.approxPolyDP(c, tolerance, True)
            pts = c.reshape(-1, 2).astype(np.float64)
            if len(pts) < 3:
                x0, y0 = pts.min(0)
                x1, y1 = pts.max(0)
                pts = np.array([[x0, y0], [x1 + 1e-3, y0], [x1, y1 + 1e-3], [x0, y1]], dtype=np.float64)
            out.append((cls, pts))
    return out


def mask_to_labelme(
    mask: np.ndarray,
    image_path: str | Path,
    class_names: Mapping[int, str] | None = None,
    tolerance: float = 0.0,
    min_area: int = 1,
) -> dict:
    """A labelme 4.5.5-style document whose polygons outline the objects of `mask`."""
    names = dict(class_names or {1: "STAS"})
    shapes = [
        {
            "label": names.get(cls, f"class_{cls}"),
            "points": [[float(x), float(y)] for x, y in pts],
            "group_id": None,
            "shape_type": "polygon",
            "flags": {},
        }
        for cls, pts in mask_to_polygons(mask, min_area=min_area, tolerance=tolerance)
    ]
    return {
        "version": "4.5.5",
        "flags": {},
        "shapes": shapes,
        "imagePath": Path(image_path).name,
        "imageData": None,
        "imageHeight": int(mask.shape[0]),
        "imageWidth": int(mask.shape[1]),
    }


def write_labelme(path: str | Path, doc: dict) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2), fsync=False)  # one of many per-image files
