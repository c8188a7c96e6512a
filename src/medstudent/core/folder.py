"""Predict a whole folder and write what users open next: competition-format masks (PNG 0/255 at the original
size), optional probability maps, labelme JSON of the predicted objects (to correct in labelme), overlays;
for classification a CSV of per-class probabilities. One bad image is reported and skipped, never fatal."""

from __future__ import annotations

import csv
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.core.overlay import overlay
from medstudent.core.postprocess import postprocess
from medstudent.data.io import list_images, read_image, write_mask_png
from medstudent.data.labelme import mask_to_labelme, write_labelme
from medstudent.data.layouts import IMAGE_DIRS, UNLABELED_DIRS
from medstudent.distributed import rank_world
from medstudent.errors import DataError


def collect_images(source: str | Path) -> list[Path]:
    """A single image, a flat folder, or a data set root (its image folder / class folders)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(source, "no such image or folder")
    imgs = list_images(source)
    if imgs:
        return imgs
    for name in (*IMAGE_DIRS, *UNLABELED_DIRS):
        if (source / name).is_dir():
            return list_images(source / name)
    nested = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
    )
    if not nested:
        raise DataError(source, "contains no images")
    return nested


def output_stems(images: list[Path]) -> list[str]:
    """The file stem each image's outputs are written under: its own stem, unless two inputs share it
    (`a.jpg` + `a.png`, or one name in two class folders). Those are named by their path below the
    deepest folder they share, '/' and the extension's dot as '_' (`CNV/a.jpeg` -> `CNV_a_jpeg`), so no
    output overwrites another."""
    counts: dict[str, int] = {}
    for p in images:
        counts[p.stem.lower()] = counts.get(p.stem.lower(), 0) + 1
    clashing = [p for p in images if counts[p.stem.lower()] > 1]
    if not clashing:
        return [p.stem for p in images]
    common = Path(os.path.commonpath([str(p.parent.resolve()) for p in clashing]))
    renamed = {
        p: str(p.resolve().relative_to(common)).replace(os.sep, "_").replace(".", "_") for p in clashing
    }
    return [renamed.get(p, p.stem) for p in images]


def predict_folder(
    predict: Callable[[np.ndarray], np.ndarray],
    task: str,
    images: list[Path],
    out: str | Path,
    class_names: list[str],
    post=None,
    save_probs: bool = False,
    save_labelme: bool = False,
    save_overlays: bool = True,
    root: Path | None = None,  # classification ids are paths relative to this
    on_image: Callable[[int, int, Path], None] | None = None,
) -> dict:
    """Run `predict(image) -> probs` over images and write outputs under `out`. Returns a summary with the
    skipped files (path: reason)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_world()
    n_all = len(images)
    stems = output_stems(images)[rank::world]
    images = images[rank::world]  # several ranks (torchrun / srun / --devices): every world-th image each
    skipped: list[str] = []
    rows: list[dict] = []
    for n, (path, stem) in enumerate(zip(images, stems, strict=True)):
        if on_image:
            on_image(n, len(images), path)
        try:
            img = read_image(path)
            probs = predict(img)
        except DataError as e:
            skipped.append(str(e))
            warnings.warn(f"skipped: {e}", stacklevel=2)
            continue
        if task == "segmentation":
            if probs.ndim == 2:
                mask = postprocess(probs, post) if post is not None else (probs > 0.5).astype(np.uint8)
            else:
                mask = probs.argmax(0).astype(np.uint8)
            write_mask_png(out / "masks" / f"{stem}.png", mask)
            if save_probs:
                (out / "probs").mkdir(exist_ok=True)
                p8 = np.clip(np.round((probs if probs.ndim == 2 else probs.max(0)) * 255), 0, 255)
                with atomic_path(out / "probs" / f"{stem}.png", fsync=False) as tmp:
                    Image.fromarray(p8.astype(np.uint8)).save(tmp, format="PNG")
            if save_labelme:
                names = dict(enumerate(class_names))
                doc = mask_to_labelme(mask, path, class_names=names, tolerance=1.0)
                doc["imagePath"] = os.path.relpath(path.resolve(), (out / "labelme").resolve())
                write_labelme(out / "labelme" / f"{stem}.json", doc)
            if save_overlays:
                (out / "overlays").mkdir(exist_ok=True)
                with atomic_path(out / "overlays" / f"{stem}.png", fsync=False) as tmp:
                    Image.fromarray(overlay(img, mask)).save(tmp, format="PNG")
            rows.append({"id": stem, "foreground_px": int((mask > 0).sum())})
        else:
            row = {"id": str(path.relative_to(root)) if root else path.name, "path": str(path)}
            row.update({f"p_{c}": float(p) for c, p in zip(class_names, probs, strict=True)})
            row["predicted"] = class_names[int(np.argmax(probs))]
            row["confidence"] = float(np.max(probs))
            rows.append(row)
    if world > 1:
        merged = _merge_ranks(out, rank, world, rows, skipped)
        if merged is None:  # ranks > 0: rank 0 writes the tables
            return {"images": len(images), "predicted": len(rows), "skipped": skipped, "rank": rank}
        rows, skipped = merged
    if task == "classification" and rows:
        with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if skipped:
        write_text_atomic(out / "skipped.txt", "\n".join(skipped) + "\n")
    return {"images": n_all, "predicted": len(rows), "skipped": skipped}


def _merge_ranks(
    out: Path, rank: int, world: int, rows: list[dict], skipped: list[str], timeout: float = 6 * 3600
) -> tuple[list[dict], list[str]] | None:
    """Gather the ranks' rows through files (no process group needed, so the torch-free ONNX path works
    too): every rank writes its part; rank 0 waits for all parts, merges them in image order, removes them."""
    part = out / f".rank_{rank}.json"
    write_text_atomic(part, json.dumps({"rows": rows, "skipped": skipped}))
    if rank != 0:
        return None
    parts = [out / f".rank_{r}.json" for r in range(world)]
    end = time.time() + timeout
    while not all(p.is_file() for p in parts):
        if time.time() > end:
            missing = [p.name for p in parts if not p.is_file()]
            raise DataError(out, f"ranks did not finish: {', '.join(missing)} missing")
        time.sleep(0.5)
    docs = [json.loads(p.read_text()) for p in parts]
    for p in parts:
        p.unlink()
    all_rows = sorted((r for d in docs for r in d["rows"]), key=lambda r: str(r.get("path", r["id"])))
    return all_rows, [s for d in docs for s in d["skipped"]]
