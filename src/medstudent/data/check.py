"""`medstudent data check`: read every file of a data set and report what is wrong before training starts
(the role of nnU-Net's --verify_dataset_integrity)."""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medstudent.data.io import file_hash, image_info, os_reason
from medstudent.data.labelme import LabelmeWarning, out_of_bounds, read_labelme
from medstudent.data.layouts import (
    ClassificationDataset,
    SegmentationDataset,
    UnlabeledDataset,
    detect_layout,
    open_dataset,
)
from medstudent.errors import DataError


@dataclass
class CheckReport:
    root: str
    layout: str
    counts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    modes: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # class -> images (classification) / objects
    empty_masks: list[str] = field(default_factory=list)
    images_without_annotation: list[str] = field(default_factory=list)
    annotations_without_image: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    out_of_bounds: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def check_dataset(
    root: str | Path,
    skip_bad: bool = False,
    empty_if_missing: bool = False,
    label_map: dict[str, int] | None = None,
) -> CheckReport:
    """Read every file of the data set at `root`.

    Errors (exit non-zero): unreadable images, malformed annotations, size mismatches, images without
    annotation (unless empty_if_missing), annotations without image. With skip_bad, unreadable files are
    listed under `skipped` instead of `errors`. Duplicates, empty masks and out-of-bounds polygons are
    reported but are not errors.
    """
    root = Path(root)
    try:
        return _check(root, skip_bad, empty_if_missing, label_map)
    except OSError as e:  # the safety net: every OS failure the readers did not name themselves
        raise DataError(e.filename or root, f"cannot read ({os_reason(e)})") from None


def _check(
    root: Path, skip_bad: bool, empty_if_missing: bool, label_map: dict[str, int] | None
) -> CheckReport:
    rep = CheckReport(root=str(root), layout=detect_layout(root))
    ds = open_dataset(root, label_map=label_map, empty_if_missing=empty_if_missing)
    hashes: dict[str, list[str]] = defaultdict(list)
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()

    def bad(e: DataError) -> None:
        (rep.skipped if skip_bad else rep.errors).append(str(e))

    def read_info(path: Path) -> tuple[int, int] | None:
        try:
            w, h, mode = image_info(path)
        except DataError as e:
            bad(e)
            return None
        try:
            digest = file_hash(path)
        except DataError as e:
            bad(e)
            return None
        sizes[f"{w}x{h}"] += 1
        modes[mode] += 1
        hashes[digest].append(str(path.relative_to(root)))
        return w, h

    if isinstance(ds, SegmentationDataset):
        _check_segmentation(ds, rep, read_info, bad)
    elif isinstance(ds, ClassificationDataset):
        rep.counts = {"images": len(ds)}
        for subset in sorted({it.subset or "all" for it in ds.items}):
            rep.counts[f"images_{subset}"] = sum((it.subset or "all") == subset for it in ds.items)
        per_class = Counter(ds.class_names[it.label] for it in ds.items)
        rep.classes = {c: per_class[c] for c in ds.class_names}
        groups = {it.group for it in ds.items if it.group is not None}
        rep.counts["patients"] = len(groups)
        for it in ds.items:
            read_info(it.image)
    elif isinstance(ds, UnlabeledDataset):
        rep.counts = {"images": len(ds)}
        for p in ds.images:
            read_info(p)
    rep.sizes = dict(sizes.most_common())
    rep.modes = dict(modes.most_common())
    rep.duplicates = [sorted(v) for v in hashes.values() if len(v) > 1]
    return rep


def _check_segmentation(ds: SegmentationDataset, rep: CheckReport, read_info, bad) -> None:
    rep.counts = {"pairs": len(ds), "unlabeled_images": len(ds.unlabeled)}
    rep.images_without_annotation = [str(p) for p in ds.images_without_annotation]
    rep.annotations_without_image = [str(p) for p in ds.annotations_without_image]
    rep.errors += [  # via DataError: one line even when a file name holds a newline
        str(DataError(p, "image has no annotation (use --empty-if-missing if that means an empty mask)"))
        for p in ds.images_without_annotation
    ]
    rep.errors += [str(DataError(p, "annotation has no image")) for p in ds.annotations_without_image]
    objects: Counter[str] = Counter()
    for i, it in enumerate(ds.items):
        if it.image is not None:
            size = read_info(it.image)
            if size is None:
                continue
        else:
            try:
                size = tuple(ds.load_image(i).shape[1::-1])  # embedded imageData
            except DataError as e:
                bad(e)
                continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LabelmeWarning)
                if ds.format == "labelme" and it.annotation is not None:
                    lm = read_labelme(it.annotation)
                    for s in lm.shapes:
                        objects[s.label] += 1
                        if out_of_bounds(s, *size):
                            rep.out_of_bounds.append(f"{it.annotation}: shape {s.index} ('{s.label}')")
                mask = ds.load_mask(i, size)  # type: ignore[arg-type]  # the reader training uses
            rep.warnings += [
                str(w.message)
                for w in caught
                if issubclass(w.category, LabelmeWarning) and "outside" not in str(w.message)
            ]
        except DataError as e:
            bad(e)
            continue
        if not mask.any():
            rep.empty_masks.append(it.id)
    rep.counts["empty_masks"] = len(rep.empty_masks)
    rep.classes = dict(objects) if objects else {ds.class_names[1]: len(ds) - len(rep.empty_masks)}
    for p in [*ds.images_without_annotation, *ds.unlabeled]:
        read_info(p)
