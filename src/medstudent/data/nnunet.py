"""nnU-Net v2 raw data sets, both ways: export a segmentation data set (and its split) so nnU-Net can train on
exactly medstudent's folds, and read an nnU-Net 2D data set as one more input layout.

Format (nnU-Net v2 documentation/dataset_format.md, imageio/natural_image_reader_writer.py): RGB natural
images are ONE png per case, `imagesTr/<case>_0000.png`, with channel_names {"0": "R", "1": "G", "2": "B"};
`labelsTr/<case>.png` holds uint8 class ids 0..K; `labels` in dataset.json maps name -> id, background 0.
`splits_final.json` (a list of {"train": [...], "val": [...]}) is what nnU-Net reads from its preprocessed
folder to fix the folds. nnU-Net ignores imagesTs/labelsTs; we write the split's test set there so the export
loses nothing and reads back to the same split.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from medstudent.atomic import write_text_atomic
from medstudent.data.io import is_folder, list_dir, read_regular_bytes
from medstudent.data.layouts import SegItem, SegmentationDataset
from medstudent.errors import DataError

DATASET_NAME_REGEX = r"^Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_.-]*$"
CLEAN_CASE_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
RGB_CHANNELS = {"0": "R", "1": "G", "2": "B"}
READABLE_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
MAX_JSON_BYTES = 64 << 20


# ----------------------------------------------------------------------------------------------- export
def case_id(stem: str) -> str:
    """An nnU-Net case identifier for an image stem: the stem itself when it is plain (letters, digits, '_',
    '-'), else its plain characters plus a hash of the full stem, so two stems that clean to one text still
    get two ids (and the same stem always gets the same id)."""
    if re.match(CLEAN_CASE_REGEX, stem):
        return stem
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_") or "case"
    return f"{clean}_x{hashlib.sha1(stem.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def case_ids(ds: SegmentationDataset) -> dict[str, str]:
    """medstudent id -> case id; a collision (a plain stem that equals another's hashed id, or one stem in
    two folders) is an error naming both, never a silently merged case."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for it in ds.items:
        case = case_id(Path(it.id).name)
        if case in seen:
            raise DataError(ds.root, f"images {seen[case]} and {it.id} both map to nnU-Net case '{case}'")
        seen[case] = it.id
        out[it.id] = case
    return out


def check_dataset_folder_name(out: Path) -> None:
    if not re.match(DATASET_NAME_REGEX, out.name):
        raise DataError(
            out, "an nnU-Net raw data set folder must be named DatasetNNN_Name (e.g. Dataset501_STAS)"
        )


def nnunet_labels(ds: SegmentationDataset) -> dict[str, int]:
    """dataset.json `labels`: the data set's class names by id; nnU-Net requires ids 0..K, background 0."""
    return {("background" if c == 0 else name): c for c, name in enumerate(ds.class_names)}


def _split_sets(ds: SegmentationDataset, split: dict | None) -> tuple[list[str], list[str]]:
    """(training ids, test ids); with a split every image must be in it, so no image is silently dropped."""
    if split is None:
        return ds.ids(), []
    named = set(split["test"]).union(*[set(f["train"]) | set(f["val"]) for f in split["folds"]])
    left_out = [i for i in ds.ids() if i not in named]
    if left_out:
        raise DataError(
            ds.root,
            f"{len(left_out)} image(s) are in no fold and not in the test set of the split, "
            f"e.g. {left_out[0]}; make a new split",
        )
    test = set(split["test"])
    return [i for i in ds.ids() if i not in test], [i for i in ds.ids() if i in test]


def export_nnunet(ds: SegmentationDataset, out: str | Path, split: dict | None = None) -> dict:
    """Write `out` (nnUNet_raw/DatasetNNN_Name) from a complete segmentation data set; with a medstudent split
    (checked by load_split against ds) also splits_final.json with exactly its folds. Returns a summary."""
    out = Path(out)
    check_dataset_folder_name(out)
    if out.exists() and (not is_folder(out) or list_dir(out)):
        raise DataError(out, "exists and is not empty; remove it or pick another folder")
    if ds.num_classes > 255:
        raise DataError(ds.root, f"{ds.num_classes} classes do not fit nnU-Net's uint8 PNG labels")
    cases = case_ids(ds)
    train_ids, test_ids = _split_sets(ds, split)
    index = {it.id: i for i, it in enumerate(ds.items)}
    # written beside `out` and renamed at the end: a bad image half-way leaves no half data set behind
    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        for sub, ids in (("Tr", train_ids), ("Ts", test_ids)):
            for mid in ids:
                img, mask = ds.load(index[mid])
                _write_png(work / f"images{sub}" / f"{cases[mid]}_0000.png", img)
                _write_png(work / f"labels{sub}" / f"{cases[mid]}.png", mask.astype(np.uint8))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    (work / "imagesTr").mkdir(parents=True, exist_ok=True)
    (work / "labelsTr").mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty, checked above
    work.rename(out)
    dataset_json = {
        "channel_names": RGB_CHANNELS,
        "labels": nnunet_labels(ds),
        "numTraining": len(train_ids),
        "file_ending": ".png",
        "name": out.name.split("_", 1)[1],
        "medstudent_ids": {cases[i]: i for i in ds.ids()},
    }
    write_text_atomic(out / "dataset.json", json.dumps(dataset_json, indent=1))
    summary = {"folder": str(out), "training": len(train_ids), "test": len(test_ids), "splits_final": None}
    if split is not None:
        folds = [
            {"train": [cases[i] for i in f["train"]], "val": [cases[i] for i in f["val"]]}
            for f in split["folds"]
        ]
        (out / "splits_final.json").write_text(json.dumps(folds, indent=1))
        summary["splits_final"] = str(out / "splits_final.json")
    return summary


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------------------- read
def is_nnunet_folder(root: Path) -> bool:
    return (root / "dataset.json").is_file() and is_folder(root / "imagesTr")


def _read_json(path: Path, what: str) -> object:
    raw = read_regular_bytes(path, MAX_JSON_BYTES, what=what)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(path, f"not valid JSON ({type(e).__name__}: {e})") from None


def read_dataset_json(root: Path) -> dict:
    """dataset.json, checked for what medstudent needs: 2D image file ending, RGB or one channel, plain
    labels 0..K with background 0 (nnU-Net's region labels have no class-id mask to train on here)."""
    path = root / "dataset.json"
    if not path.exists():
        raise DataError(path, "missing; an nnU-Net raw data set needs dataset.json")
    dj = _read_json(path, "dataset.json")
    if not isinstance(dj, dict):
        raise DataError(path, "is not a JSON object")
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in dj]
    if missing:
        raise DataError(path, f"has no {', '.join(missing)}")
    ending = dj["file_ending"]
    if ending not in READABLE_ENDINGS:
        raise DataError(
            path, f"file_ending {ending!r}: only 2D images ({', '.join(READABLE_ENDINGS)}) are read"
        )
    channels = dj["channel_names"]
    if not isinstance(channels, dict) or len(channels) not in (1, 3):
        raise DataError(path, f"channel_names {channels!r}: only one channel or RGB in one file are read")
    labels = dj["labels"]
    if not isinstance(labels, dict) or not all(type(v) is int for v in labels.values()):
        raise DataError(path, "labels must map names to integer ids (region labels are not supported)")
    ids = sorted(labels.values())
    if ids != list(range(len(ids))) or not 0 < len(ids) <= 255:
        raise DataError(path, f"labels must use the ids 0..K once each (background 0), got {ids}")
    return dj


def _cases(folder: Path, ending: str, suffix: str) -> dict[str, Path]:
    """case id -> file, for names ending in `suffix + ending` (suffix '_0000' for images, '' for labels)."""
    tail = suffix + ending
    return {p.name[: -len(tail)]: p for p in sorted(list_dir(folder)) if p.name.endswith(tail)}


def open_nnunet(root: str | Path) -> SegmentationDataset:
    """imagesTr + labelsTr (and imagesTs + labelsTs where a test image has its label) as a segmentation data
    set; item ids are the case identifiers, so splits_final.json converts to a medstudent split directly."""
    root = Path(root)
    dj = read_dataset_json(root)
    ending = dj["file_ending"]
    items: list[SegItem] = []
    seen: dict[str, Path] = {}
    for sub in ("Tr", "Ts"):
        img_dir, lab_dir = root / f"images{sub}", root / f"labels{sub}"
        if not is_folder(img_dir) or (sub == "Ts" and not is_folder(lab_dir)):
            continue
        images = _cases(img_dir, ending, "_0000")
        more = _cases(img_dir, ending, "_0001")
        if more:  # channels in separate files (MRI sequences...): reading _0000 alone would drop data
            first = next(iter(more.values()))
            raise DataError(first, "a second input channel file; only one image file per case is read")
        labels = _cases(lab_dir, ending, "") if is_folder(lab_dir) else {}
        for case, img in images.items():
            if case not in labels:
                if sub == "Ts":
                    continue  # an unlabeled test image: nnU-Net's usual imagesTs, nothing to train or score
                raise DataError(img, f"has no label {lab_dir.name}/{case}{ending}")
            if case in seen:
                raise DataError(img, f"case '{case}' is also {seen[case].relative_to(root)}")
            seen[case] = img
            items.append(SegItem(case, img, labels[case]))
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DataError(labels[orphans[0]], f"has no image {img_dir.name}/{orphans[0]}_0000{ending}")
    n_tr = sum(1 for it in items if it.image is not None and it.image.parent.name == "imagesTr")
    if type(dj.get("numTraining")) is int and dj["numTraining"] != n_tr:  # as nnU-Net's own check refuses
        raise DataError(
            root / "dataset.json", f"numTraining is {dj['numTraining']} but imagesTr has {n_tr} cases"
        )
    label_map = {name: c for name, c in dj["labels"].items() if c > 0}
    names = ["background"] * (max(dj["labels"].values()) + 1)
    for name, c in label_map.items():
        names[c] = name
    return SegmentationDataset(
        root=root, format="nnunet", items=items, label_map=label_map, class_names=names
    )


def nnunet_split(path: str | Path, ds: SegmentationDataset) -> dict:
    """A medstudent split from nnU-Net's splits_final.json: its folds as they are, the labelled imagesTs
    cases as the test set; every case it names must be in `ds` (open_nnunet of the same folder)."""
    path = Path(path)
    doc = _read_json(path, "splits_final.json")
    ok = (
        isinstance(doc, list)
        and doc
        and all(
            isinstance(f, dict)
            and all(
                isinstance(f.get(k), list) and all(isinstance(c, str) for c in f[k]) for k in ("train", "val")
            )
            for f in doc
        )
    )
    if not ok:
        raise DataError(path, 'not an nnU-Net splits_final.json (a list of {"train": [...], "val": [...]})')
    known = set(ds.ids())
    unknown = sorted({c for f in doc for c in (*f["train"], *f["val"])} - known)
    if unknown:
        raise DataError(path, f"names {len(unknown)} case(s) not in {ds.root}, e.g. {unknown[0]}")
    test = sorted(it.id for it in ds.items if it.image is not None and it.image.parent.name == "imagesTs")
    return {
        "format": "medstudent-split/1",
        "task": "segmentation",
        "root": str(Path(ds.root).resolve()),
        "seed": None,
        "test_fraction": None,
        "n_folds": len(doc),
        "stratify": "nnunet:splits_final.json",
        "grouped_by": None,
        "test": test,
        "folds": [{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in doc],
        "strata": None,
        "groups": None,
    }
