"""The on-disk layouts users arrive with, behind one `open_dataset` call.

- labelme: images + labelme JSON (`Train_Images/` + `Train_Annotations/` as in the STAS competition,
  `images/` + `annotations/`, or JSON beside the images as labelme saves them);
- masks: `images/` + `masks/` with the same stem;
- classification: OCT2017 / ImageFolder (`[train|val|test/]<CLASS>/*.jpeg`);
- unlabeled: a flat folder of images;
- nnunet: an nnU-Net v2 raw 2D data set (dataset.json + imagesTr/ + labelsTr/; see data/nnunet.py);
- monai: a MONAI datalist .json (images + label masks, `data export-monai`'s; see data/monai_datalist.py).
Item ids are paths relative to the root without extension, stable across machines, so split files name them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medstudent.data.io import IMAGE_EXTS, is_folder, list_dir, list_images, os_reason, read_image, read_mask
from medstudent.data.labelme import labelme_to_mask, read_labelme
from medstudent.errors import ConfigError, DataError

Layout = Literal["labelme", "masks", "classification", "unlabeled", "nnunet", "monai"]

IMAGE_DIRS = ("Train_Images", "images", "Images", "imgs")
ANNOTATION_DIRS = ("Train_Annotations", "annotations", "Annotations", "labelme", "json")
MASK_DIRS = ("masks", "Masks", "labels", "Train_Masks", "gt")
UNLABELED_DIRS = ("Unlabeled_Images", "unlabeled", "Unlabeled")
SUBSETS = ("train", "val", "test")
# Kermany OCT2017 names: CNV-1016042-1.jpeg -> patient 1016042
KERMANY_GROUP_REGEX = r"^[A-Za-z]+-(\d+)-\d+$"


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if is_folder(root / n):
            return root / n
    return None


def _image_subdirs(folder: Path) -> list[Path]:
    """Sub-folders holding images; an unreadable one is a DataError naming it, not a silently lost class."""
    return sorted(
        d
        for d in list_dir(folder)
        if is_folder(d) and any(p.suffix.lower() in IMAGE_EXTS for p in list_dir(d))
    )


def _json_files(folder: Path) -> list[Path]:
    """*.json entries, FIFOs and folders included: read_labelme refuses those by name."""
    return [p for p in list_dir(folder) if p.suffix == ".json"]


def _by_stem(paths: list[Path], root: Path, what: str) -> dict[str, Path]:
    """Files keyed by stem; two files with one stem (a.jpg + a.png, a.jpg + a.JPG) would silently drop one
    from the pairing, so that is an error listing both."""
    out: dict[str, Path] = {}
    for p in paths:
        if p.stem in out:
            a, b = out[p.stem].relative_to(root), p.relative_to(root)
            raise DataError(p, f"{what} {a} and {b} share the stem '{p.stem}'; rename or remove one")
        out[p.stem] = p
    return out


def detect_layout(root: str | Path) -> Layout:
    """Guess the layout of `root`; raises DataError when it matches none."""
    root = Path(root)
    if root.suffix.lower() == ".json" and root.is_file():
        return "monai"
    if not is_folder(root):
        raise DataError(root, "not a folder")
    if is_folder(root / "imagesTr"):
        if not (root / "dataset.json").is_file():
            raise DataError(root / "dataset.json", "missing; an nnU-Net raw data set (imagesTr/) needs it")
        return "nnunet"
    img_dir = _first_dir(root, IMAGE_DIRS)
    if img_dir is not None:
        if _first_dir(root, MASK_DIRS) is not None:
            return "masks"
        if _first_dir(root, ANNOTATION_DIRS) is not None or _json_files(img_dir):
            return "labelme"
    if _json_files(root):
        return "labelme"
    subsets = [root / s for s in SUBSETS if is_folder(root / s)]
    if subsets and any(_image_subdirs(s) for s in subsets):
        return "classification"
    if len(_image_subdirs(root)) >= 2 and not list_images(root):
        return "classification"
    if list_images(root) or _first_dir(root, UNLABELED_DIRS) is not None:
        return "unlabeled"
    raise DataError(
        root,
        "no known layout (expected Train_Images/+Train_Annotations/, images/+masks/, "
        "[train|val|test/]<CLASS>/ image folders, dataset.json+imagesTr/ (nnU-Net), or a folder of images)",
    )


def _rel_id(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


@dataclass
class SegItem:
    id: str
    image: Path | None  # None when a labelme JSON embeds the image (imageData) and no file exists
    annotation: Path | None  # JSON or mask file; None = empty mask (only when the user allowed it)


@dataclass
class SegmentationDataset:
    """Paired images and annotations. Pairing problems are recorded, not raised, so `data check` can list
    them all; `require_complete()` raises for commands that must not silently drop data."""

    root: Path
    format: Literal["labelme", "masks", "nnunet"]
    items: list[SegItem]
    images_without_annotation: list[Path] = field(default_factory=list)
    annotations_without_image: list[Path] = field(default_factory=list)
    unlabeled: list[Path] = field(default_factory=list)
    label_map: dict[str, int] | None = None
    class_names: list[str] = field(default_factory=lambda: ["background", "STAS"])
    task: str = "segmentation"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def require_complete(self) -> None:
        if self.images_without_annotation:
            n = len(self.images_without_annotation)
            raise DataError(
                self.images_without_annotation[0],
                f"has no annotation ({n} image(s) in all); pass --empty-if-missing if an image "
                "without annotation means an empty mask",
            )

    def load_image(self, i: int) -> np.ndarray:
        it = self.items[i]
        if it.image is not None:
            return read_image(it.image)
        lm = read_labelme(it.annotation)  # type: ignore[arg-type]
        return read_image(it.annotation, data=lm.image_data)  # type: ignore[arg-type]

    def load_mask(self, i: int, image_size: tuple[int, int]) -> np.ndarray:
        """Class-id mask for item i; image_size=(width, height) of its image, checked against the mask."""
        it = self.items[i]
        w, h = image_size
        if it.annotation is None:
            return np.zeros((h, w), np.uint8)
        if self.format == "labelme":
            mask = labelme_to_mask(it.annotation, image_size=image_size, label_map=self.label_map)
        else:
            mask = read_mask(it.annotation)
            if mask.shape != (h, w):
                raise DataError(
                    it.annotation, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}"
                )
        top = int(mask.max(initial=0))
        if top >= self.num_classes:
            raise DataError(
                it.annotation,
                f"mask value {top} is no class: {self.num_classes} classes ({', '.join(self.class_names)}) "
                f"use ids 0..{self.num_classes - 1}; "
                + (
                    "dataset.json declares no such label"
                    if self.format == "nnunet"
                    else "declare more classes with data.label_map"
                ),
            )
        return mask

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img = self.load_image(i)
        return img, self.load_mask(i, (img.shape[1], img.shape[0]))

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ClsItem:
    id: str
    image: Path
    label: int
    subset: str | None  # train / val / test folder it came from, None for a plain ImageFolder
    group: str | None  # patient id when the name follows the group regex


@dataclass
class ClassificationDataset:
    root: Path
    class_names: list[str]
    items: list[ClsItem]
    task: str = "classification"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)

    def subset(self, name: str) -> list[int]:
        return [i for i, it in enumerate(self.items) if it.subset == name]

    def load_image(self, i: int, mode: str = "RGB") -> np.ndarray:
        return read_image(self.items[i].image, mode=mode)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class UnlabeledDataset:
    root: Path
    images: list[Path]
    task: str = "unlabeled"

    def ids(self) -> list[str]:
        return [_rel_id(self.root, p) for p in self.images]

    def load_image(self, i: int, mode: str = "RGB") -> np.ndarray:
        return read_image(self.images[i], mode=mode)

    def __len__(self) -> int:
        return len(self.images)


def open_segmentation(
    root: str | Path, label_map: Mapping[str, int] | None = None, empty_if_missing: bool = False
) -> SegmentationDataset:
    """Pair images with labelme JSON or mask files by stem. An nnU-Net folder (or a MONAI datalist) brings its
    own pairing and labels (dataset.json is authoritative: label_map and empty_if_missing do not apply)."""
    root = Path(root)
    layout = detect_layout(root)
    if layout in ("nnunet", "monai"):
        # deferred: data.nnunet and data.monai_datalist build on this module's SegmentationDataset (a cycle)
        from medstudent.data import monai_datalist, nnunet

        return nnunet.open_nnunet(root) if layout == "nnunet" else monai_datalist.open_monai_datalist(root)
    if layout not in ("labelme", "masks"):
        raise DataError(root, f"is a {layout} folder, not a segmentation data set")
    img_dir = _first_dir(root, IMAGE_DIRS) or root
    if layout == "masks":
        ann_dir = _first_dir(root, MASK_DIRS)
        anns = _by_stem(list_images(ann_dir), root, "masks")  # type: ignore[arg-type]
    else:
        ann_dir = _first_dir(root, ANNOTATION_DIRS) or img_dir
        anns = _by_stem(_json_files(ann_dir), root, "annotations")
    images = _by_stem(list_images(img_dir), root, "images")
    items: list[SegItem] = []
    missing_ann: list[Path] = []
    for stem, img in images.items():
        if stem in anns:
            items.append(SegItem(_rel_id(root, img), img, anns[stem]))
        elif empty_if_missing:
            items.append(SegItem(_rel_id(root, img), img, None))
        else:
            missing_ann.append(img)
    orphans: list[Path] = []
    for stem, ann in anns.items():
        if stem in images:
            continue
        if layout == "labelme" and _embeds_image(ann):
            items.append(SegItem(_rel_id(root, ann), None, ann))
        else:
            orphans.append(ann)
    items.sort(key=lambda it: it.id)
    unl_dir = _first_dir(root, UNLABELED_DIRS)
    if label_map:
        bad = {k: v for k, v in label_map.items() if not isinstance(v, int) or not 0 <= v <= 254}
        if bad:
            raise ConfigError(None, f"label_map ids must be 0..254 (255 means 'ignore'), got {bad}")
        ncls = max(label_map.values()) + 1
        names = ["background"] + [f"class_{c}" for c in range(1, ncls)]
        for name, c in label_map.items():
            names[c] = name
    else:
        names = ["background", _default_foreground_name(items, layout)]
    return SegmentationDataset(
        root=root,
        format=layout,  # type: ignore[arg-type]
        items=items,
        images_without_annotation=missing_ann,
        annotations_without_image=orphans,
        unlabeled=list_images(unl_dir) if unl_dir else [],
        label_map=dict(label_map) if label_map else None,
        class_names=names,
    )


def _embeds_image(ann: Path) -> bool:
    try:
        return read_labelme(ann).image_data is not None
    except DataError:
        return False


def _default_foreground_name(items: list[SegItem], layout: str) -> str:
    """The label the annotators used when there is exactly one (e.g. 'STAS'), else 'foreground'."""
    if layout != "labelme":
        return "foreground"
    labels: set[str] = set()
    for it in items[:50]:
        if it.annotation is not None:
            try:
                labels |= {s.label for s in read_labelme(it.annotation).shapes}
            except DataError:
                continue
    return labels.pop() if len(labels) == 1 else "foreground"


def patient_group(name: str, group_regex: str | None = KERMANY_GROUP_REGEX) -> str | None:
    """Patient id from a file stem: the regex's first group (or whole match); None when it does not match."""
    m = re.search(group_regex, name) if group_regex else None
    return None if not m else (m.group(1) if m.groups() else m.group(0))


def open_classification(
    root: str | Path, group_regex: str | None = KERMANY_GROUP_REGEX
) -> ClassificationDataset:
    """OCT2017 / ImageFolder layout; class names are folder names in sorted order, united across subsets."""
    root = Path(root)
    subsets = [root / s for s in SUBSETS if is_folder(root / s)]
    parents: list[tuple[str | None, Path]] = [(s.name, s) for s in subsets] or [(None, root)]
    class_dirs = {d.name for _, parent in parents for d in _image_subdirs(parent)}
    if not class_dirs:
        raise DataError(root, "no class folders with images found")
    class_names = sorted(class_dirs)
    index = {c: i for i, c in enumerate(class_names)}
    items = [
        ClsItem(_rel_id(root, img), img, index[d.name], subset, patient_group(img.stem, group_regex))
        for subset, parent in parents
        for d in _image_subdirs(parent)
        for img in _by_stem(list_images(d), root, "images").values()  # ids must name one file
    ]
    return ClassificationDataset(root=root, class_names=class_names, items=items)


def open_unlabeled(root: str | Path) -> UnlabeledDataset:
    root = Path(root)
    folder = root if list_images(root) else (_first_dir(root, UNLABELED_DIRS) or root)
    images = list_images(folder)
    if not images:
        raise DataError(root, "no images (jpg, jpeg, png, tif, bmp) found")
    return UnlabeledDataset(root=root, images=images)


def open_dataset(
    root: str | Path,
    label_map: Mapping[str, int] | None = None,
    empty_if_missing: bool = False,
    group_regex: str | None = KERMANY_GROUP_REGEX,
) -> SegmentationDataset | ClassificationDataset | UnlabeledDataset:
    """Open any supported layout (detected). An OS failure while listing (EACCES, ELOOP, EIO) is a DataError
    naming the path, never a traceback."""
    try:
        layout = detect_layout(root)
        if layout in ("labelme", "masks", "nnunet", "monai"):
            return open_segmentation(root, label_map=label_map, empty_if_missing=empty_if_missing)
        if layout == "classification":
            return open_classification(root, group_regex=group_regex)
        return open_unlabeled(root)
    except OSError as e:
        raise DataError(e.filename or root, f"cannot read ({os_reason(e)})") from None


def open_labeled(data) -> SegmentationDataset | ClassificationDataset:
    """The labeled data set a run config's `data:` section names (config.DataConfig), checked against its
    task: what train, cv and selftrain start from (torch-free, so split tools stay light)."""
    d = data
    ds = open_dataset(
        d.root, label_map=d.label_map, empty_if_missing=d.empty_if_missing, group_regex=d.group_regex
    )
    if isinstance(ds, SegmentationDataset):
        if d.task != "segmentation":
            raise ConfigError(d.root, f"is a segmentation data set but data.task is '{d.task}'")
        if not d.empty_if_missing:
            ds.require_complete()
    elif isinstance(ds, ClassificationDataset):
        if d.task != "classification":
            raise ConfigError(d.root, f"is a classification data set but data.task is '{d.task}'")
    else:
        raise DataError(d.root, "is a folder of unlabeled images; training needs labels")
    if len(ds) == 0:
        raise DataError(d.root, "has no labeled images")
    return ds
