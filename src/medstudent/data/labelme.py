"""labelme JSON <-> masks.

Rasterisation uses PIL's ImageDraw exactly as labelme's own `shape_to_mask` does, so masks match what the
annotator saw. Mask -> polygons uses OpenCV contours (pixel-exact outer boundaries), so that predicted objects
can be opened and corrected in labelme.
"""

from __future__ import annotations

import base64
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from medstudent.errors import DataError

SUPPORTED_SHAPES = ("polygon", "rectangle", "circle")


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


def read_labelme(path: str | Path) -> LabelmeFile:
    """Parse a labelme JSON file; raises DataError naming the file (and shape) on malformed content."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DataError(path, "not a labelme file (no 'shapes' list)")
    shapes: list[LabelmeShape] = []
    skipped: list[str] = []
    for i, s in enumerate(doc["shapes"]):
        stype = s.get("shape_type") or "polygon"  # labelme < 3 wrote no shape_type
        label = str(s.get("label", ""))
        if stype not in SUPPORTED_SHAPES:
            msg = f"{path}: shape {i} ('{label}') has shape_type '{stype}', skipped"
            warnings.warn(msg, LabelmeWarning, stacklevel=2)
            skipped.append(msg)
            continue
        try:
            pts = np.asarray(s.get("points", []), dtype=np.float64).reshape(-1, 2)
        except (ValueError, TypeError) as e:
            raise DataError(path, f"shape {i} ('{label}') has malformed points ({e})") from e
        if not np.isfinite(pts).all():
            raise DataError(path, f"shape {i} ('{label}') has non-finite coordinates")
        need = 3 if stype == "polygon" else 2
        if len(pts) < need:
            raise DataError(path, f"shape {i} ('{label}') is a {stype} with {len(pts)} points, needs {need}")
        shapes.append(LabelmeShape(label, pts, stype, i))
    image_data = None
    if doc.get("imageData"):
        try:
            image_data = base64.b64decode(doc["imageData"])
        except (ValueError, TypeError) as e:
            raise DataError(path, f"imageData is not valid base64 ({e})") from e
    h, w = doc.get("imageHeight"), doc.get("imageWidth")
    return LabelmeFile(
        path=path,
        image_path=doc.get("imagePath"),
        width=int(w) if w is not None else None,
        height=int(h) if h is not None else None,
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


def labelme_to_mask(
    source: str | Path | LabelmeFile,
    image_size: tuple[int, int] | None = None,
    label_map: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Rasterise a labelme file into a uint8 class-id mask of shape (H, W).

    image_size: (width, height) of the real image; checked against imageWidth/imageHeight in the JSON.
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
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
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
        if out_of_bounds(s, w, h):
            warnings.warn(
                f"{path}: shape {s.index} ('{s.label}') has points outside the {w}x{h} image, clipped",
                LabelmeWarning,
                stacklevel=2,
            )
        pts = s.points.copy()
        pts[:, 0] = pts[:, 0].clip(0, w - 1)
        pts[:, 1] = pts[:, 1].clip(0, h - 1)
        xy = [tuple(p) for p in pts]
        if s.shape_type == "polygon":
            draw.polygon(xy, outline=cls, fill=cls)
        elif s.shape_type == "rectangle":  # two opposite corners, in either order
            (x0, y0), (x1, y1) = xy[0], xy[1]
            draw.rectangle([(min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))], outline=cls, fill=cls)
        else:  # circle: centre and a point on the circumference
            (cx, cy), (px, py) = s.points[0], s.points[1]
            r = math.hypot(px - cx, py - cy)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=cls, fill=cls)
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
