"""Readers for the three layouts, and every error path of the foundation issue."""

from __future__ import annotations

import base64
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medstudent.data.io import read_image, read_mask
from medstudent.data.labelme import (
    LabelmeWarning,
    labelme_to_mask,
    mask_to_labelme,
    read_labelme,
    write_labelme,
)
from medstudent.data.layouts import detect_layout, open_classification, open_dataset, open_segmentation
from medstudent.errors import DataError


def _doc(shapes, w=64, h=48, image_data=None):
    return {
        "version": "4.5.5",
        "flags": {},
        "shapes": shapes,
        "imagePath": "a.jpg",
        "imageData": image_data,
        "imageHeight": h,
        "imageWidth": w,
    }


def _shape(points, shape_type="polygon", label="STAS"):
    return {"label": label, "points": points, "group_id": None, "shape_type": shape_type, "flags": {}}


def _write(tmp_path: Path, doc: dict, name="a.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_polygon_rectangle_circle_rasterise(tmp_path):
    doc = _doc(
        [
            _shape([[2, 2], [12, 2], [12, 12], [2, 12]]),
            _shape([[40, 30], [30, 20]], "rectangle"),  # corners in reverse order
            _shape([[50, 10], [54, 10]], "circle"),
        ]
    )
    m = labelme_to_mask(_write(tmp_path, doc), image_size=(64, 48))
    assert m.shape == (48, 64) and m.dtype == np.uint8
    assert m[7, 7] == 1 and m[25, 35] == 1 and m[10, 50] == 1
    assert m[0, 0] == 0 and m[40, 5] == 0
    assert m[2:13, 2:13].sum() == 121  # PIL fills outline + interior, as labelme does
    assert m[6:15, 46:55].sum() == pytest.approx(np.pi * 16, rel=0.35)


def test_label_map_multiclass_and_unknown_label(tmp_path):
    doc = _doc(
        [_shape([[2, 2], [12, 2], [12, 12]], label="a"), _shape([[30, 30], [40, 30], [40, 40]], label="b")]
    )
    p = _write(tmp_path, doc)
    m = labelme_to_mask(p, label_map={"a": 1, "b": 2})
    assert set(np.unique(m)) == {0, 1, 2}
    assert set(np.unique(labelme_to_mask(p))) == {0, 1}  # default: every label is foreground
    with pytest.raises(DataError, match=r"a\.json: shape 1 has label 'b' which is not in the label map"):
        labelme_to_mask(p, label_map={"a": 1})


def test_other_shape_types_skipped_with_warning(tmp_path):
    doc = _doc([_shape([[1, 1], [5, 5]], "line"), _shape([[2, 2], [12, 2], [12, 12]])])
    p = _write(tmp_path, doc)
    with pytest.warns(LabelmeWarning, match="shape 0 .* 'line', skipped"):
        m = labelme_to_mask(p)
    assert m.sum() > 0


def test_size_mismatch_error(tmp_path):
    p = _write(tmp_path, _doc([_shape([[2, 2], [12, 2], [12, 12]])], w=64, h=48))
    with pytest.raises(
        DataError, match=r"a\.json: imageWidth x imageHeight 64x48 does not match the image 65x48"
    ):
        labelme_to_mask(p, image_size=(65, 48))


def test_out_of_bounds_points_clipped_with_warning(tmp_path):
    p = _write(tmp_path, _doc([_shape([[-5, -5], [80, 0], [80, 60], [0, 60]])]))
    with pytest.warns(LabelmeWarning, match="outside the 64x48 image, clipped"):
        m = labelme_to_mask(p, image_size=(64, 48))
    assert m.all()


def test_too_few_points_names_file_and_shape(tmp_path):
    p = _write(tmp_path, _doc([_shape([[2, 2], [12, 2], [12, 12]]), _shape([[1, 1], [3, 3]])]))
    with pytest.raises(DataError) as e:
        read_labelme(p)
    assert str(e.value) == f"{p}: shape 1 ('STAS') is a polygon with 2 points, needs 3"
    assert "\n" not in str(e.value)


def test_invalid_json_and_not_labelme(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        read_labelme(bad)
    other = _write(tmp_path, {"foo": 1}, "other.json")
    with pytest.raises(DataError, match="not a labelme file"):
        read_labelme(other)


def test_embedded_image_data_is_used_when_image_file_missing(tmp_path):
    root = tmp_path / "ds"
    (root / "Train_Images").mkdir(parents=True)
    (root / "Train_Annotations").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(buf, format="PNG")
    doc = _doc([_shape([[2, 2], [12, 2], [12, 12]])], image_data=base64.b64encode(buf.getvalue()).decode())
    _write(root / "Train_Annotations", doc, "emb.json")
    ds = open_segmentation(root)
    assert [it.id for it in ds.items] == ["Train_Annotations/emb"] and ds.items[0].image is None
    img, mask = ds.load(0)
    assert img.shape == (48, 64, 3) and int(img[0, 0, 0]) == 200 and mask.sum() > 0


def test_polygon_round_trip_iou(tmp_path):
    rng = np.random.default_rng(0)
    from skimage.draw import ellipse, polygon

    mask = np.zeros((200, 300), np.uint8)
    rr, cc = ellipse(60, 80, 40, 25, shape=mask.shape, rotation=0.5)
    mask[rr, cc] = 1
    rr, cc = polygon([120, 190, 150, 170], [150, 160, 260, 290], shape=mask.shape)
    mask[rr, cc] = 1
    mask[0:30, 270:300] = 1  # touching the border
    for _ in range(5):  # small blobs
        y, x = rng.integers(10, 190), rng.integers(10, 290)
        mask[y : y + 6, x : x + 5] = 1
    doc = mask_to_labelme(mask, "img.jpg")
    p = tmp_path / "rt.json"
    write_labelme(p, doc)
    back = labelme_to_mask(p, image_size=(300, 200))
    iou = np.logical_and(back, mask).sum() / np.logical_or(back, mask).sum()
    assert iou >= 0.98, iou
    assert len(doc["shapes"]) >= 7


def test_mask_folder_formats(tmp_path):
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    base = np.zeros((40, 50), np.uint8)
    base[10:20, 10:30] = 1
    img = np.full((40, 50, 3), 128, np.uint8)
    for stem in ("a", "b", "c", "d"):
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
    Image.fromarray(base * 255).save(root / "masks" / "a.png")  # 0/255
    Image.fromarray(base).save(root / "masks" / "b.png")  # 0/1
    pal = Image.fromarray(base * 2, mode="L").convert("P")  # palette index 2
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    Image.fromarray(base * 2).convert("P").save(root / "masks" / "c.png")
    Image.fromarray(base * 255).save(root / "masks" / "d.jpg", quality=70)  # lossy JPEG mask
    assert detect_layout(root) == "masks"
    with pytest.raises(DataError, match=r"c\.png: mask value 2 is no class: 2 classes"):
        open_segmentation(root).load(2)  # palette index 2 in a 2-class set: a wrong mask, not a class
    ds = open_segmentation(root, label_map={"lesion": 1, "other": 2})
    assert len(ds) == 4
    _, ma = ds.load(0)
    _, mb = ds.load(1)
    _, mc = ds.load(2)
    _, md = ds.load(3)
    assert (ma == base).all() and (mb == base).all() and (mc == base * 2).all()
    assert (md == base).mean() > 0.99 and set(np.unique(md)) <= {0, 1}


def test_mask_size_mismatch_error(tmp_path):
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((41, 50), np.uint8)).save(root / "masks" / "a.png")
    ds = open_segmentation(root)
    with pytest.raises(DataError, match=r"a\.png: mask is 50x41 but its image is 50x40"):
        ds.load(0)


def test_corrupt_image_one_line_error(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError) as e:
        read_image(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: cannot read image") and "\n" not in msg
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_strange_mask_values_rejected(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(np.arange(0, 200, dtype=np.uint8).reshape(10, 20)).save(p)
    with pytest.raises(DataError, match="neither 0/255 nor small class ids"):
        read_mask(p)


def test_missing_annotation_policy(tmp_path):
    root = tmp_path / "lm"
    (root / "Train_Images").mkdir(parents=True)
    (root / "Train_Annotations").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "Train_Images" / f"{stem}.jpg")
    _write(root / "Train_Annotations", _doc([_shape([[2, 2], [12, 2], [12, 12]])]), "a.json")
    _write(root / "Train_Annotations", _doc([_shape([[2, 2], [12, 2], [12, 12]])]), "orphan.json")
    ds = open_segmentation(root)
    assert ds.ids() == ["Train_Images/a"]
    assert [p.name for p in ds.images_without_annotation] == ["b.jpg"]
    assert [p.name for p in ds.annotations_without_image] == ["orphan.json"]
    with pytest.raises(DataError, match=r"b\.jpg: has no annotation .*--empty-if-missing"):
        ds.require_complete()
    ds2 = open_segmentation(root, empty_if_missing=True)
    assert ds2.ids() == ["Train_Images/a", "Train_Images/b"]
    assert ds2.load(1)[1].sum() == 0


def test_classification_layout_mixed_modes_and_groups(tmp_path):
    root = tmp_path / "oct"
    for subset in ("train", "val"):
        for cls in ("NORMAL", "CNV"):
            d = root / subset / cls
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((30, 40), np.uint8)).save(d / f"{cls}-1234-1.jpeg")  # L
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(d / f"{cls}-99-2.jpeg")  # RGB
    assert detect_layout(root) == "classification"
    ds = open_classification(root)
    assert ds.class_names == ["CNV", "NORMAL"]  # sorted folder names
    assert len(ds) == 8 and {it.subset for it in ds.items} == {"train", "val"}
    assert {it.group for it in ds.items} == {"1234", "99"}
    assert ds.load_image(0).shape[-1] == 3 and ds.load_image(0, mode="L").ndim == 2
    ds2 = open_classification(root, group_regex=r"-(\d)\d*-")
    assert {it.group for it in ds2.items} == {"1", "9"}


def test_unlabeled_folder_all_extensions(tmp_path):
    for ext in ("jpg", "jpeg", "png", "tif", "bmp"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"x.{ext}")
    (tmp_path / "notes.txt").write_text("x")
    ds = open_dataset(tmp_path)
    assert ds.task == "unlabeled" and len(ds) == 5


def test_unknown_layout_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no known layout"):
        detect_layout(tmp_path)


def test_no_warnings_for_clean_file(tmp_path):
    p = _write(tmp_path, _doc([_shape([[2, 2], [12, 2], [12, 12]])]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labelme_to_mask(p, image_size=(64, 48))
