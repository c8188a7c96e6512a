"""`medstudent evaluate`: score predictions against ground truth and write the report files.

Segmentation: per-image Dice/IoU/precision/recall CSV, summary JSON (mean Dice over images with
empty/empty = 1, as the competition scored; pixel-pooled Dice; bootstrap 95% CI) and a worst-10 gallery,
all computed by `evaluation.scoring` like the `cv` and self-training scores.
Classification: accuracy, macro-F1, one-vs-rest AUC, per-class sensitivity/specificity/accuracy, bootstrap
CIs, confusion matrices and a gallery of the most confidently wrong images.
Both also write report.html, one self-contained page of all that (`evaluation.report_html`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.data.io import IMAGE_EXTS, list_images, read_image, read_mask
from medstudent.data.labelme import labelme_to_mask
from medstudent.data.layouts import ClassificationDataset, SegmentationDataset, detect_layout, open_dataset
from medstudent.errors import DataError
from medstudent.evaluation.lesions import (
    boundary_scores,
    detection_scores,
    match_lesions,
    per_class_scores,
    size_table,
)
from medstudent.evaluation.metrics import bootstrap_ci
from medstudent.evaluation.report import cls_gallery_png, confusion_matrix_png, seg_gallery_png
from medstudent.evaluation.report_html import cls_per_image, write_cls_report, write_seg_report
from medstudent.evaluation.scoring import cls_summary, seg_row, seg_summary


def _pred_masks(pred: Path) -> dict[str, Path]:
    folder = pred / "masks" if (pred / "masks").is_dir() else pred
    masks: dict[str, Path] = {}
    for p in list_images(folder):
        if p.stem in masks:  # a.png and a.tif: which one is the prediction of image a is not knowable
            raise DataError(p, f"two predicted masks for '{p.stem}' ({masks[p.stem].name} and {p.name})")
        masks[p.stem] = p
    if not masks:
        raise DataError(pred, "contains no predicted mask images")
    return masks


def _gt_loaders(gt: Path) -> tuple[dict, dict]:
    """stem -> callable returning the GT mask, and stem -> image path (for galleries) where known."""
    gt = Path(gt)
    layout = None
    with contextlib.suppress(DataError):  # not a data set root: a bare folder of JSON or masks
        layout = detect_layout(gt)
    if layout in ("labelme", "masks") and not list(gt.glob("*.json")):
        ds = open_dataset(gt, empty_if_missing=False)
        assert isinstance(ds, SegmentationDataset)
        loaders, images = {}, {}
        for i, it in enumerate(ds.items):
            stem = Path(it.id).name
            loaders[stem] = lambda i=i: ds.load(i)[1]
            images[stem] = it.image
        return loaders, images
    jsons = sorted(gt.glob("*.json"))
    if jsons:  # a bare folder of labelme files: sizes come from imageWidth/imageHeight
        return {p.stem: (lambda p=p: labelme_to_mask(p)) for p in jsons}, {}
    masks = [p for p in gt.iterdir() if p.suffix.lower() in IMAGE_EXTS] if gt.is_dir() else []
    if not masks:
        raise DataError(gt, "is neither a segmentation data set, a folder of labelme JSON, nor of masks")
    return {p.stem: (lambda p=p: read_mask(p)) for p in masks}, {}


def evaluate_segmentation(
    pred: str | Path,
    gt: str | Path,
    out: str | Path,
    n_worst: int = 10,
    seed: int = 0,
    iou: float = 0.5,
    tolerance_px: float = 2.0,
    mpp: float | None = None,
) -> dict:
    """Pixel scores (the one scorer), lesion detection (matched at `iou`), lesion recall and Dice by lesion
    size (px, and um^2 with `mpp`), HD95 and surface Dice at `tolerance_px`; per_image.csv,
    lesions_by_size.csv, summary.json and the worst-cases gallery under `out`."""
    pred, out = Path(pred), Path(out)
    preds = _pred_masks(pred)
    loaders, images = _gt_loaders(Path(gt))
    missing = sorted(set(loaders) - set(preds))
    if missing:
        raise DataError(
            pred, f"has no prediction for {len(missing)} ground-truth image(s), e.g. {missing[0]}"
        )
    rows, pm, gm, matches = [], [], [], []
    names: list[str] | None = None  # class names, looked up once the first label map shows up
    for stem in sorted(loaders):
        g_ids, p_ids = _label_ids(loaders[stem]()), _label_ids(read_mask(preds[stem]))
        g, p = g_ids > 0, p_ids > 0  # the headline scores: any foreground class against background
        if p.shape != g.shape:
            raise DataError(
                preds[stem],
                f"prediction is {p.shape[1]}x{p.shape[0]}, ground truth {g.shape[1]}x{g.shape[0]}",
            )
        row = seg_row(stem, g, mask=p)[0]  # masks from `predict` are already post-processed
        match = match_lesions(p, g, iou)
        row.update({"lesion_tp": match["tp"], "lesion_fp": match["fp"], "lesion_fn": match["fn"]})
        row.update(detection_scores(match["tp"], match["fp"], match["fn"]))
        row.update(boundary_scores(p, g, tolerance_px))
        if max(int(g_ids.max(initial=0)), int(p_ids.max(initial=0))) > 1:  # label maps: every class too
            names = names or _class_names(Path(gt), g_ids, p_ids)
            row.update(per_class_scores(p_ids, g_ids, names))
        rows.append(row)
        matches.append(match)
        pm.append(p)
        gm.append(g)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_image.csv") as tmp:
        df.to_csv(tmp, index=False)
    scores = seg_summary(rows, n_boot=2000, seed=seed)
    summary = {"images": scores.pop("n_images"), **scores, **lesion_summary(df, matches, seed, iou)}
    summary.update(boundary_summary(df, tolerance_px, seed))
    for col in [c for c in df.columns if c.startswith(("dice_", "iou_")) and c != "dice_raw"] + (
        ["mean_class_dice", "mean_class_iou"] if "mean_class_dice" in df else []
    ):
        values = df[col].dropna().to_numpy()
        key = col if col.startswith("mean_") else f"mean_{col}"  # mean_dice_<class>, mean_class_dice
        summary[key] = float(values.mean())
        summary[f"{key}_ci95"] = list(bootstrap_ci(values, seed=seed))
    by_size = size_table(matches, mpp=mpp)
    summary["lesions_by_size"] = by_size
    with atomic_path(out / "lesions_by_size.csv") as tmp:
        pd.DataFrame(by_size).to_csv(tmp, index=False)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    order = {stem: k for k, stem in enumerate(sorted(loaders))}
    dice = dict(zip(df["id"], df["dice"], strict=True))

    def tile(stem: str, known_only: bool = False) -> dict | None:
        k, img_path = order[stem], images.get(stem)
        if img_path is None and known_only:
            return None
        image = (
            read_image(img_path) if img_path is not None else np.stack([gm[k] * 255] * 3, -1).astype(np.uint8)
        )
        return {"id": stem, "image": image, "gt": gm[k], "pred": pm[k], "dice": float(dice[stem])}

    gallery = [tile(stem) for stem in df.nsmallest(n_worst, "dice")["id"]]
    if gallery:
        seg_gallery_png(gallery, out / "worst.png", f"worst {len(gallery)} by Dice")
    write_seg_report(out, summary, df, lambda stem: tile(stem, known_only=True))
    return summary


def _label_ids(mask: np.ndarray) -> np.ndarray:
    """Class ids of a mask: a binary 0/255 PNG (the competition format) becomes 0/1, ids stay ids."""
    values = np.unique(mask)
    return (mask > 0).astype(np.uint8) if set(values.tolist()) <= {0, 255} else mask.astype(np.int64)


def _class_names(gt: Path, *maps: np.ndarray) -> list[str]:
    """The ground truth data set's class names when it has them, else class_<id> up to the largest id."""
    with contextlib.suppress(DataError):  # a bare folder of masks has no class names
        names = list(getattr(open_dataset(gt), "class_names", None) or [])
        if len(names) > max(int(m.max(initial=0)) for m in maps):
            return names
    return ["background"] + [f"class_{k}" for k in range(1, max(int(m.max(initial=0)) for m in maps) + 1)]


def lesion_summary(df: pd.DataFrame, matches: list[dict], seed: int, iou: float) -> dict:
    """Pooled lesion counts and precision/recall/F1 over all images, each with a bootstrap CI (images
    resampled with replacement, the pooled figure recomputed)."""
    counts = df[["lesion_tp", "lesion_fp", "lesion_fn"]].to_numpy()
    pooled = detection_scores(*map(int, counts.sum(0)))
    rng = np.random.default_rng(seed)
    draws = (counts[rng.integers(0, len(counts), len(counts))].sum(0) for _ in range(1000))
    boot = [detection_scores(*map(int, d)) for d in draws]
    out: dict = {"lesion_match": f"8-connected components, one-to-one at IoU >= {iou}"}
    out.update({f"lesions_{k}": int(v) for k, v in zip(("tp", "fp", "fn"), counts.sum(0), strict=True)})
    for key, value in pooled.items():
        vals = np.array([b[key] for b in boot])
        out[key] = value
        out[f"{key}_ci95"] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]
    return out


def boundary_summary(df: pd.DataFrame, tolerance_px: float, seed: int) -> dict:
    """Mean HD95 over the images where both masks have a boundary, mean surface Dice over all, with CIs."""
    hd = df["hd95_px"].dropna().to_numpy()
    nsd = df["surface_dice"].to_numpy()
    return {
        "mean_hd95_px": float(hd.mean()) if len(hd) else float("nan"),
        "mean_hd95_px_ci95": list(bootstrap_ci(hd, seed=seed)),
        "hd95_images": int(len(hd)),
        "mean_surface_dice": float(nsd.mean()),
        "mean_surface_dice_ci95": list(bootstrap_ci(nsd, seed=seed)),
        "surface_dice_tolerance_px": tolerance_px,
    }


def evaluate_classification(
    pred: str | Path, gt: str | Path, out: str | Path, n_gallery: int = 12, seed: int = 0
) -> dict:
    """pred: predictions.csv (or the folder holding it) from `medstudent predict`; gt: class folders."""
    pred, out = Path(pred), Path(out)
    csv_path = pred / "predictions.csv" if pred.is_dir() else pred
    if not csv_path.is_file():
        raise DataError(csv_path, "prediction CSV not found")
    df = pd.read_csv(csv_path)
    ds = open_dataset(gt)
    if not isinstance(ds, ClassificationDataset):
        raise DataError(gt, "is not a classification folder ([train|val|test/]<CLASS>/images)")
    cols = [f"p_{c}" for c in ds.class_names]
    if missing := [c for c in cols if c not in df.columns]:
        raise DataError(csv_path, f"lacks probability column(s) {missing} for the ground truth's classes")
    by_path = {str(Path(it.image).resolve()): it for it in ds.items}
    by_name = {Path(it.image).name: it for it in ds.items}
    y, probs, paths = [], [], []
    for _, r in df.iterrows():
        it = by_path.get(str(Path(r["path"]).resolve())) or by_name.get(Path(r["path"]).name)
        if it is None:
            continue
        y.append(it.label)
        probs.append(r[cols].to_numpy(float))
        paths.append(it.image)
    if not y:
        raise DataError(csv_path, f"none of its images are in {gt}")
    y_arr, p_arr = np.array(y), np.stack(probs)
    m = cls_summary(y_arr, p_arr, ds.class_names, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.json", json.dumps(m, indent=1))
    with atomic_path(out / "per_class.csv") as tmp:
        pd.DataFrame(m["per_class"]).to_csv(tmp, index=False)
    cm = np.array(m["confusion_matrix"])
    confusion_matrix_png(cm, ds.class_names, out / "confusion_matrix.png", normalize=False)
    confusion_matrix_png(cm, ds.class_names, out / "confusion_matrix_normalized.png", normalize=True)
    pred_cls = p_arr.argmax(1)
    wrong = np.flatnonzero(pred_cls != y_arr)
    wrong = wrong[np.argsort(-p_arr[wrong].max(1))][:n_gallery]
    items = [
        {
            "id": Path(paths[i]).name,
            "image": read_image(paths[i]),
            "true": ds.class_names[y_arr[i]],
            "pred": ds.class_names[pred_cls[i]],
            "confidence": float(p_arr[i].max()),
        }
        for i in wrong
    ]
    figures = [out / "confusion_matrix.png", out / "confusion_matrix_normalized.png"]
    if items:
        figures.append(cls_gallery_png(items, out / "confidently_wrong.png", "most confidently wrong"))
    write_cls_report(out, m, cls_per_image(paths, y_arr, p_arr, ds.class_names), figures)
    return m


def per_class_table(metrics: dict, title: str = "per class"):
    """The OCT reference's table (sensitivity, specificity, accuracy per class) as a rich Table."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in ("class", "sensitivity", "specificity", "accuracy", "support"):
        t.add_column(c)
    for r in metrics["per_class"]:
        t.add_row(
            r["class"],
            *(f"{r[k]:.3f}" for k in ("sensitivity", "specificity", "accuracy")),
            str(r["support"]),
        )
    return t
