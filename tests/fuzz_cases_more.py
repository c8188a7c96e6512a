"""Hypothesis strategies for test_fuzz_data, continued: mask folders, ImageFolder classification, unlabeled
folders, split files and configs (fuzz_cases.py holds the Plan, the image files and labelme)."""

from __future__ import annotations

import io

import numpy as np
import yaml
from hypothesis import strategies as st
from PIL import Image

from bad_data import png_bytes, png_header_bomb
from fuzz_cases import DIR, FIFO, LOOP, Plan, _encode, _fs_mutation, dumps, image_file


# -------------------------------------------------------------------------------------------------- masks
@st.composite
def mask_file(draw, w: int, h: int) -> tuple[bytes, str, bool]:
    """(bytes, extension, known bad) of a mask for a 2-class (background/foreground) data set."""
    kind = draw(
        st.sampled_from(
            [
                "0/255",
                "0/255",
                "0/1",
                "0/1",
                "jpeg",
                "png_as_jpg",
                "rgb_bw",
                "bilevel",
                "ids",
                "palette",
                "16bit",
                "jpeg",
                "png_as_jpg",
                "wrong_size",
                "garbage",
                "bomb",
                "rgb_bw",
                "rgb_red",
                "bilevel",
                "float",
            ]
        )
    )
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : h // 2, w // 4 : w // 2] = 1
    if kind == "0/255":
        return png_bytes(m * 255), ".png", False
    if kind == "0/1":
        return png_bytes(m), ".png", False
    if kind == "ids":
        k = draw(st.integers(0, 60))
        return png_bytes(np.resize(np.arange(k + 1, dtype=np.uint8), (h, w))), ".png", k >= 2
    if kind in ("palette", "16bit"):
        v = draw(st.sampled_from([0, 1, 2, 5, 200, 255]))
        if kind == "palette":
            img = Image.new("P", (w, h))
            img.putpalette(list(range(256)) * 3)
            img.putdata((m * v).ravel().tolist())
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue(), ".png", v >= 2
        big = draw(st.sampled_from([1, 300]))  # 16-bit ids beyond 255 must not wrap or clip into "255"
        return png_bytes(m.astype(np.uint16) * v * big), ".png", v * big >= 2
    if kind == "jpeg":
        return _encode(m * 255, "JPEG", quality=90), ".jpg", False
    if kind == "png_as_jpg":
        return png_bytes(m), ".jpg", False
    if kind == "wrong_size":
        return png_bytes(np.zeros((h + 1, w), np.uint8)), ".png", True
    if kind == "garbage":
        return b"\x89PNG\r\n" + draw(st.binary(max_size=12)), ".png", True
    if kind == "bomb":
        return png_header_bomb(), ".png", True
    if kind == "rgb_bw":
        return png_bytes(np.dstack([m * 255] * 3)), ".png", False
    if kind == "rgb_red":
        return png_bytes(np.dstack([m * 255, m * 0, m * 0])), ".png", True
    if kind == "bilevel":
        buf = io.BytesIO()
        Image.fromarray(m.astype(bool)).save(buf, format="PNG")
        return buf.getvalue(), ".png", False
    f = m.astype(np.float32) * draw(st.sampled_from([1.0, 0.5]))
    return _encode(f, "TIFF"), ".tif", bool(f.max() % 1)


@st.composite
def mask_case(draw) -> Plan:
    files: list = []
    bad = False
    for i in range(draw(st.integers(1, 3))):
        w, h = draw(st.integers(8, 24)), draw(st.integers(8, 24))
        data, ext, ibad, _ = draw(image_file(w, h, exif=False))
        mdata, mext, mbad = draw(mask_file(w, h))
        files += [(f"images/s{i}{ext}", data), (f"masks/s{i}{mext}", mdata)]
        bad = bad or ibad or mbad
    extra = draw(st.sampled_from(["none"] * 10 + ["mask_collision", "orphan_mask", "mask_fifo", "mask_dir"]))
    if extra == "mask_collision":
        files.append(("masks/s0.BMP", _encode(np.zeros((8, 8), np.uint8), "BMP")))
    elif extra == "orphan_mask":
        files.append(("masks/zz.png", png_bytes(np.zeros((8, 8), np.uint8))))
    elif extra in ("mask_fifo", "mask_dir"):
        files += [
            ("images/x.png", png_bytes(np.zeros((8, 8, 3), np.uint8))),
            ("masks/x.png", FIFO if extra == "mask_fifo" else DIR),
        ]
    bad = _fs_mutation(draw, files, "images", "masks", ".png", "s0") or bad or extra != "none"
    return Plan(tuple(files), bad)


# ------------------------------------------------------------------------------ classification, unlabeled
def _bad_entry(draw, folder: str, files: list, collision_is_bad: bool = True) -> bool:
    m = draw(st.sampled_from(["none"] * 8 + ["bad_image", "collision", "dir", "loop", "fifo"]))
    at = f"{folder}/" if folder else ""
    if m == "bad_image":
        data, ext, _, _ = draw(image_file(8, 8, bad=True))
        files.append((f"{at}bad{ext}", data))
    elif m == "collision":
        files.append((f"{at}i0.BMP", _encode(np.zeros((8, 8, 3), np.uint8), "BMP")))
    elif m != "none":
        files.append((f"{at}odd.png", {"dir": DIR, "loop": LOOP, "fifo": FIFO}[m]))
    return m != "none" and (m != "collision" or collision_is_bad)


@st.composite
def classification_case(draw) -> Plan:
    classes = draw(
        st.lists(
            st.sampled_from(["A", "B", "CNV", "NORMAL", "[b]x", "é"]), min_size=2, max_size=3, unique=True
        )
    )
    subsets = draw(st.sampled_from([[""], ["train", "val"], ["train", "val", "test"]]))
    files: list = []
    bad = False
    for sub in subsets:
        for c in classes:
            folder = f"{sub}/{c}".lstrip("/")
            for i in range(draw(st.integers(1, 2))):
                data, ext, ibad, _ = draw(
                    image_file(draw(st.integers(8, 16)), draw(st.integers(8, 16)), one_bad_in=20)
                )
                files.append((f"{folder}/i{i}{ext}", data))
                bad = bad or ibad
    victim = f"{subsets[-1]}/{classes[0]}".lstrip("/")
    bad = _bad_entry(draw, victim, files) or bad
    return Plan(tuple(files), bad)


@st.composite
def unlabeled_case(draw) -> Plan:
    files: list = []
    bad = False
    for i in range(draw(st.integers(1, 3))):
        data, ext, ibad, _ = draw(
            image_file(draw(st.integers(8, 16)), draw(st.integers(8, 16)), one_bad_in=20)
        )
        files.append((f"i{i}{ext}", data))
        bad = bad or ibad
    bad = _bad_entry(draw, "", files, collision_is_bad=False) or bad  # ids are not paired here
    return Plan(tuple(files), bad)


# ------------------------------------------------------------------------------------ split files, configs
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4)),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def split_case(draw) -> tuple[bytes, bool]:
    ident = st.text(max_size=6)
    bad_ident = st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2))
    kind = draw(
        st.sampled_from(["valid"] * 3 + ["bad_ids", "bad_fold", "missing", "wrong_format", "junk", "raw"])
    )
    fold = st.fixed_dictionaries({"train": st.lists(ident, max_size=3), "val": st.lists(ident, max_size=3)})
    doc = {
        "format": "medstudent-split/1",
        "test": draw(st.lists(ident, max_size=3)),
        "folds": draw(st.lists(fold, min_size=1, max_size=3)),
    }
    if kind == "valid":
        return dumps(doc), False
    if kind == "bad_ids":
        where = draw(st.sampled_from(["test", "train", "val"]))
        target = doc["test"] if where == "test" else doc["folds"][0][where]
        target.append(draw(bad_ident))
        return dumps(doc), True
    if kind == "bad_fold":
        doc["folds"] = draw(
            st.one_of(
                st.just([]),
                st.lists(st.one_of(st.integers(), st.none(), st.text()), min_size=1, max_size=2),
                st.integers(),
                st.none(),
            )
        )
        return dumps(doc), True
    if kind == "missing":
        del doc[draw(st.sampled_from(["test", "folds", "format"]))]
        return dumps(doc), True
    if kind == "wrong_format":
        doc["format"] = draw(st.one_of(st.text(max_size=6), st.integers(), st.none()))
        return dumps(doc), True
    if kind == "junk":
        return dumps(draw(JSONISH)), True
    raw = draw(
        st.sampled_from([b"", b"[" * 100_000, b"\xff\xfe{", b'{"format": "medstudent-split/1", "test": ['])
    )
    return raw, True


@st.composite
def config_case(draw) -> tuple[bytes, bool]:
    from medstudent.config import RunConfig

    sections = {name: f.annotation for name, f in RunConfig.model_fields.items()}
    kind = draw(st.sampled_from(["sections"] * 4 + ["unknown", "not_mapping", "raw"]))
    if kind == "raw":
        raw = draw(
            st.sampled_from(
                [
                    b"a: " + b"[" * 3000,
                    b"\xff\xfe: 1",
                    b"key: [unclosed",
                    b"a: &a [1]\nb: *c",
                    b"data: &a {root: *a}",
                    b"\t- x",
                    b"{" * 3000,
                ]
            )
        )
        return raw, True
    if kind == "not_mapping":
        return yaml.safe_dump(
            draw(
                st.one_of(
                    st.lists(st.integers(), min_size=1, max_size=3),
                    st.integers(),
                    st.text(min_size=1, max_size=4).filter(str.strip),
                )
            )
        ).encode(), True
    doc: dict = {}
    for name in draw(st.lists(st.sampled_from(sorted(sections)), max_size=3, unique=True)):
        model = getattr(RunConfig.model_fields[name].annotation, "model_fields", {})
        keys = draw(st.lists(st.sampled_from(sorted(model) or ["x"]), max_size=3, unique=True))
        doc[name] = {k: draw(JSONISH) for k in keys}
    bad = False
    if kind == "unknown":
        doc[draw(st.sampled_from(["colour", "dataa", "model2"]))] = {"x": 1}
        bad = True
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass"), bad
