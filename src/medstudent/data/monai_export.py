"""A MONAI decathlon-style datalist (`monai.data.load_decathlon_datalist`) for a segmentation data set.

labelme data has no mask files, so masks are rendered to PNG (uint8 class ids, what medstudent reads) in a
folder next to the datalist; images stay where they are (an image embedded in a labelme JSON, or one with an
EXIF rotation, is written out as PNG too). Paths are relative to the datalist's folder, which is MONAI's
default base_dir, so the folder can move.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from medstudent.atomic import write_text_atomic
from medstudent.data.layouts import SegmentationDataset
from medstudent.data.nnunet import case_ids
from medstudent.errors import DataError

ORIENTATION = 0x0112  # the EXIF tag


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _rotated(path: Path) -> bool:
    """medstudent reads (and masks are drawn on) images in their EXIF orientation; MONAI's readers ignore the
    tag, so such an image is written out upright or it would not line up with its mask."""
    with Image.open(path) as im:
        return im.getexif().get(ORIENTATION, 1) != 1


def export_monai(ds: SegmentationDataset, out: str | Path, split: dict | None = None) -> dict:
    """Write the datalist `out` (JSON) and `<out stem>_masks/`. With a split, `training` holds every non-test
    image with "fold" = the fold where it validates, and `test` the split's test images (with their label);
    without one, every image is in `training` without a fold. Returns a summary."""
    out = Path(out)
    if out.suffix != ".json":
        raise DataError(out, "the datalist must be a .json file")
    mask_dir = out.parent / f"{out.stem}_masks"
    if mask_dir.exists():
        raise DataError(mask_dir, "exists; remove it or pick another datalist name")
    base = out.parent
    cases = case_ids(ds)  # file-name-safe and collision-free, as for nnU-Net
    val_fold: dict[str, int] = {}
    test: set[str] = set()
    if split is not None:
        test = set(split["test"])
        for k, f in enumerate(split["folds"]):
            val_fold.update(dict.fromkeys(f["val"], k))
        left_out = [i for i in ds.ids() if i not in test and i not in val_fold]
        if left_out:
            raise DataError(
                ds.root,
                f"{len(left_out)} image(s) validate in no fold and are not in the test set of the "
                f"split, e.g. {left_out[0]}; make a new split",
            )
    training: list[dict] = []
    testing: list[dict] = []
    for i, it in enumerate(ds.items):
        img, mask = ds.load(i)
        image = it.image
        if image is None or _rotated(image):  # embedded in its labelme JSON, or turned by its EXIF tag
            image = out.parent / f"{out.stem}_images" / f"{cases[it.id]}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(image)
        label = mask_dir / f"{cases[it.id]}.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8)).save(label)
        entry = {"image": _rel(image, base), "label": _rel(label, base), "id": it.id}
        if it.id in test:
            testing.append(entry)
        else:
            training.append(entry | ({"fold": val_fold[it.id]} if split is not None else {}))
    doc = {
        "name": Path(ds.root).name,
        "labels": {str(c): name for c, name in enumerate(ds.class_names)},
        "numTraining": len(training),
        "numTest": len(testing),
        "training": training,
        "test": testing,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(doc, indent=1))
    return {"datalist": str(out), "masks": str(mask_dir), "training": len(training), "test": len(testing)}
