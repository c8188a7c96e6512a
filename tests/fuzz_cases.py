"""Hypothesis strategies for test_fuzz_data: malformed data sets in every layout, split files and configs.

A data-set case is a Plan: files (relative path -> bytes, or a special entry: a folder, a FIFO, a symlink
loop) plus `bad`, true when the generator *knows* the case is invalid (a bomb, a FIFO, a mask id beyond the
classes, strict-schema violations...), so acceptance of it is a failure. Cases not known to be bad may end
either way; then only the reading property applies. Images are 8-24 px so a case costs milliseconds.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from bad_data import bmp_header, jpeg_header_bomb, png_bytes, png_header_bomb, tiff_header_bomb

DIR, FIFO, LOOP = "<dir>", "<fifo>", "<loop>"


@dataclass(frozen=True)
class Plan:
    files: tuple[tuple[str, bytes | str], ...]
    bad: bool

    def build(self, root: Path) -> bool:
        root.mkdir(parents=True)
        for rel, content in self.files:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.exists() or p.is_symlink():  # two mutations chose one name: the first (bad) one stays
                continue
            if content == DIR:
                p.mkdir(exist_ok=True)
            elif content == FIFO and hasattr(os, "mkfifo"):
                os.mkfifo(p)
            elif content == LOOP and os.name == "posix":
                p.symlink_to(p.name)
            elif content in (FIFO, LOOP):  # Windows: no FIFOs, symlinks need privileges; still non-regular
                p.mkdir()
            else:
                p.write_bytes(content)  # type: ignore[arg-type]
        return self.bad


class Raw(str):
    """A JSON token json.dumps cannot write (NaN, 1e400, a 400-digit integer), spliced in verbatim."""


def dumps(obj) -> bytes:
    raws: list[str] = []

    def walk(o):
        if isinstance(o, Raw):
            raws.append(o)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, list):
            return [walk(x) for x in o]
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        return o

    text = json.dumps(walk(obj))
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', str(r), 1)
    return text.encode()


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


GOOD_IMAGE = ["png", "jpg", "bmp", "tif", "grey", "rgba", "png16", "palette"]
BAD_IMAGE = ["garbage", "empty", "bomb_png", "bomb_jpg", "bomb_tif", "neg_bmp", "grey_jpg"]


@st.composite
def image_file(
    draw, w: int, h: int, exif: bool = True, bad: bool = False, one_bad_in: int = 8
) -> tuple[bytes, str, bool, tuple[int, int]]:
    """(bytes, extension, known bad, oriented (w, h)); one in `one_bad_in` is bad (bad=True: always)."""
    kinds = GOOD_IMAGE + (["exif3", "exif6", "exif8"] if exif else ["exif3"])
    kind = draw(
        st.sampled_from(kinds)
        if not bad and not draw(st.sampled_from([False] * (one_bad_in - 1) + [True]))
        else st.sampled_from(BAD_IMAGE)
    )
    rgb = np.full((h, w, 3), draw(st.integers(0, 255)), np.uint8)
    if kind in ("png", "grey", "rgba", "palette", "png16"):
        arr = {
            "png": rgb,
            "grey": rgb[..., 0],
            "rgba": np.dstack([rgb, rgb[..., :1]]),
            "palette": rgb,
            "png16": (rgb[..., 0].astype(np.uint16) * 200),
        }[kind]
        img = Image.fromarray(arr)
        if kind == "palette":
            img = img.convert("P")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), ".png", False, (w, h)
    if kind in ("jpg", "bmp", "tif"):
        fmt = {"jpg": "JPEG", "bmp": "BMP", "tif": "TIFF"}[kind]
        return _encode(rgb, fmt), f".{kind}", False, (w, h)
    if kind.startswith("exif"):
        o = int(kind[-1])
        ex = Image.Exif()
        ex[0x0112] = o
        return _encode(rgb, "JPEG", exif=ex.tobytes()), ".jpg", False, ((w, h) if o == 3 else (h, w))
    data = {
        "garbage": b"not an image" + draw(st.binary(max_size=16)),
        "empty": b"",
        "bomb_png": png_header_bomb(),
        "bomb_jpg": jpeg_header_bomb(),
        "bomb_tif": tiff_header_bomb(),
        "neg_bmp": bmp_header(-30000, 30000),
        "grey_jpg": jpeg_header_bomb(20000, 20000),  # under the pixel limit, 631 bytes
    }[kind]
    ext = {"bomb_jpg": ".jpg", "bomb_tif": ".tif", "neg_bmp": ".bmp", "grey_jpg": ".jpg"}.get(kind, ".png")
    return data, ext, True, (w, h)


# ------------------------------------------------------------------------------------------------ labelme
def _coord(lo: float, hi: float):
    return st.one_of(st.integers(int(lo), int(hi)), st.floats(lo, hi, allow_nan=False))


BAD_POINT = st.one_of(
    st.lists(st.integers(0, 9), min_size=3, max_size=3),  # three columns
    st.lists(st.integers(0, 9), max_size=1),
    st.tuples(st.text(max_size=3), st.integers(0, 9)).map(list),  # strings
    st.tuples(st.booleans(), st.booleans()).map(list),
    st.just([[1, 2], [3, 4]]),  # nested
    st.integers(0, 9),  # flat
    st.none(),
    st.sampled_from([Raw("1e400"), Raw("NaN"), Raw("-Infinity"), Raw("1" + "0" * 400), 1e10]).map(
        lambda v: [v, 1]
    ),
)


@st.composite
def shape_obj(draw, w: int, h: int) -> tuple[object, bool]:
    kind = draw(
        st.sampled_from(
            ["polygon"] * 30
            + ["rectangle", "circle", "far_circle", "other_type", "bad_points", "few", "junk"]
            + ["bad_label", "many"]
        )
    )
    label = draw(st.sampled_from(["STAS", "STAS", "lesion", "[/]", "[b]x", "", "é"]))
    pt = st.tuples(_coord(-5, w + 5), _coord(-5, h + 5)).map(list)
    if kind == "junk":
        return draw(
            st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2))
        ), True
    if kind == "many":
        return {"label": label, "points": [[1.5, 1.5]] * 20_001, "shape_type": "polygon"}, True
    if kind in ("polygon", "rectangle", "circle"):
        n = draw(st.integers(3, 6)) if kind == "polygon" else 2
        pts = draw(st.lists(pt, min_size=n, max_size=n))
        stype = draw(st.sampled_from([kind, kind, None])) if kind == "polygon" else kind
        return {"label": label, "points": pts, "shape_type": stype, "group_id": None, "flags": {}}, False
    if kind == "far_circle":
        r = draw(st.sampled_from([1e3, 1e6, 3e7, 9e8]))
        cx, cy = draw(pt)
        off = draw(st.sampled_from([0.0, -1.0]))  # centre inside, or edge crossing the image
        return {
            "label": label,
            "points": [[cx + off * r, cy], [cx + off * r + r, cy]],
            "shape_type": "circle",
        }, False
    if kind == "other_type":
        stype = draw(st.sampled_from(["line", "point", "linestrip", "mask", ""]))
        return {"label": label, "points": draw(st.lists(pt, max_size=3)), "shape_type": stype}, False
    if kind == "bad_points":  # good pairs with one bad entry among them
        pts = draw(st.lists(pt, max_size=3))
        pts.insert(draw(st.integers(0, len(pts))), draw(BAD_POINT))
        return {
            "label": label,
            "points": pts,
            "shape_type": draw(st.sampled_from(["polygon", "circle"])),
        }, True
    if kind == "few":  # too few points, or a rectangle/circle with three
        stype = draw(st.sampled_from(["polygon", "rectangle", "circle"]))
        n = draw(st.sampled_from([0, 1, 2] if stype == "polygon" else [0, 1, 3]))
        return {
            "label": label,
            "points": draw(st.lists(pt, min_size=n, max_size=n)),
            "shape_type": stype,
        }, True
    bad_label = draw(st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2)))
    return {"label": bad_label, "points": draw(st.lists(pt, min_size=3, max_size=3))}, True


@st.composite
def dim(draw, true: int) -> tuple[object, bool]:
    v = draw(st.sampled_from(["true"] * 14 + ["missing", "wrong", "junk"]))
    if v == "true":
        return true, False
    if v == "missing":
        return None, False
    if v == "wrong":
        return true + draw(st.integers(1, 5)), True
    return draw(st.sampled_from(["abc", Raw("NaN"), [true], float(true) + 0.5, True, -1, 0, {}])), True


@st.composite
def labelme_json(draw, w: int, h: int) -> tuple[bytes, bool]:
    """A labelme file for a w x h image: a schema-level document (mostly) or raw broken bytes."""
    if draw(st.sampled_from([False] * 11 + [True])):  # sampled_from shrinks to the first
        raw = draw(st.sampled_from(["empty", "binary", "deep", "truncated", "not_object", "shapes_not_list"]))
        if raw == "deep":
            return b'{"shapes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", True
        if raw == "binary":
            return b"\xff\xfe" + draw(st.binary(max_size=20)), True
        if raw == "truncated":
            good = dumps({"shapes": [{"label": "a", "points": [[1, 1], [5, 1], [5, 5]]}]})
            return good[: draw(st.integers(0, len(good) - 1))], True
        if raw == "not_object":
            return dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text()))), True
        if raw == "shapes_not_list":
            return dumps(
                {
                    "shapes": draw(
                        st.one_of(st.none(), st.integers(), st.dictionaries(st.text(), st.integers()))
                    )
                }
            ), True
        return b"", True
    shapes = draw(st.lists(shape_obj(w, h), max_size=4))
    (wv, wbad), (hv, hbad) = draw(dim(w)), draw(dim(h))
    doc: dict = {"version": "5.2.1", "flags": {}, "shapes": [s for s, _ in shapes]}
    if wv is not None:
        doc["imageWidth"] = wv
    if hv is not None:
        doc["imageHeight"] = hv
    bad = wbad or hbad or any(b for _, b in shapes)
    data = draw(st.sampled_from(["none"] * 8 + ["garbage", "valid_b64", "int"]))
    if data == "garbage":
        doc["imageData"], bad = "@@not base64@@", True
    elif data == "valid_b64":
        doc["imageData"] = base64.b64encode(png_bytes(np.zeros((h, w, 3), np.uint8))).decode()
    elif data == "int":
        doc["imageData"], bad = 7, True
    doc["imagePath"] = draw(st.sampled_from(["a.png"] * 6 + [None, 3]))
    bad = bad or doc["imagePath"] == 3
    return dumps(doc), bad


def _fs_mutation(draw, files: list, img_dir: str, ann_dir: str, ann_ext: str, stem: str) -> bool:
    """Hostile file-system entries next to a data set; returns True (every one of them is an error)."""
    m = draw(
        st.sampled_from(
            ["none"] * 14
            + ["ann_dir", "ann_fifo", "ann_loop", "img_dir", "img_loop", "collision", "no_annotation"]
        )
    )

    def at(d: str, name: str) -> str:
        return f"{d}/{name}" if d else name

    png = png_bytes(np.zeros((8, 8, 3), np.uint8))
    if m == "none":
        return False
    if m in ("ann_dir", "ann_fifo", "ann_loop"):
        files += [
            (at(img_dir, "x.png"), png),
            (at(ann_dir, f"x{ann_ext}"), {"ann_dir": DIR, "ann_fifo": FIFO, "ann_loop": LOOP}[m]),
        ]
    elif m in ("img_dir", "img_loop"):
        files.append((at(img_dir, "y.png"), DIR if m == "img_dir" else LOOP))
    elif m == "collision":  # a second image with an existing stem
        files.append((at(img_dir, f"{stem}.BMP"), _encode(np.zeros((8, 8, 3), np.uint8), "BMP")))
    else:
        files.append((at(img_dir, "lonely.png"), png))
    return True


@st.composite
def labelme_case(draw) -> Plan:
    img_dir, ann_dir = draw(
        st.sampled_from([("Train_Images", "Train_Annotations"), ("images", "annotations"), ("", "")])
    )
    files: list = []
    bad = False
    for i in range(draw(st.integers(1, 3))):
        w, h = draw(st.integers(8, 24)), draw(st.integers(8, 24))
        data, ext, ibad, (ow, oh) = draw(image_file(w, h))
        text, jbad = draw(labelme_json(ow, oh))
        files += [(f"{img_dir}/s{i}{ext}".lstrip("/"), data), (f"{ann_dir}/s{i}.json".lstrip("/"), text)]
        bad = bad or ibad or jbad
    bad = _fs_mutation(draw, files, img_dir, ann_dir, ".json", "s0") or bad
    return Plan(tuple(files), bad)
