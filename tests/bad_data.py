"""Builders of hostile files shared by the bad-input corpus and the fuzz suite (issue 20): header-only
decompression bombs for every image format we read, and tiny data sets in each layout."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medstudent.data.check import check_dataset
from medstudent.errors import DataError


def png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 8x8 PNG whose IHDR claims width x height (CRC fixed), as a hostile 7.7 KB file would."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_header_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """An 8x8 baseline JPEG whose SOF0 frame header claims width x height."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_header(width: int, height: int) -> bytes:
    """A 2x2 24-bit BMP whose info header claims width x height (negative or huge)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """An uncompressed 4x4 TIFF whose ImageWidth/ImageLength tags claim width x height."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for k in range(n):
        off = ifd + 2 + 12 * k
        tag, typ = struct.unpack_from("<HH", data, off)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if typ == 3:  # SHORT
                struct.pack_into("<H", data, off + 8, value)
            else:  # LONG
                struct.pack_into("<I", data, off + 8, value)
    return bytes(data)


def labelme_doc(shapes: list, w: int = 16, h: int = 12, image_data: str | None = None) -> dict:
    return {
        "version": "4.5.5",
        "flags": {},
        "shapes": shapes,
        "imagePath": "a.png",
        "imageData": image_data,
        "imageHeight": h,
        "imageWidth": w,
    }


def shape(points, shape_type: str = "polygon", label: str = "STAS") -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": shape_type, "flags": {}}


def labelme_set(root: Path, anns: dict[str, str | bytes | dict], w: int = 16, h: int = 12) -> Path:
    """Train_Images/<stem>.png (w x h, grey) + Train_Annotations/<stem>.json with the given content."""
    (root / "Train_Images").mkdir(parents=True, exist_ok=True)
    (root / "Train_Annotations").mkdir(exist_ok=True)
    for stem, content in anns.items():
        (root / "Train_Images" / f"{stem}.png").write_bytes(png_bytes(np.full((h, w, 3), 90, np.uint8)))
        p = root / "Train_Annotations" / f"{stem}.json"
        if isinstance(content, dict):
            p.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return root


def mask_set(root: Path, masks: dict[str, bytes], w: int = 16, h: int = 12) -> Path:
    """images/<stem>.png + masks/<name> (name includes the extension) with the given bytes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for name, content in masks.items():
        stem = Path(name).stem
        (root / "images" / f"{stem}.png").write_bytes(png_bytes(np.full((h, w, 3), 90, np.uint8)))
        (root / "masks" / name).write_bytes(content)
    return root


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
