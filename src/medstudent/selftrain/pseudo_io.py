"""Pseudo labels: the teacher predicts a subset of the pool, confident labels are kept and written
(round_<r>/pseudo/: pseudo.csv, masks/*.png, stats.json) and read back as the student's extra data."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.config import RunConfig, SelfTrainConfig
from medstudent.core.postprocess import postprocess
from medstudent.data.layouts import SegmentationDataset
from medstudent.distributed import barrier, gather, is_main, shard
from medstudent.errors import DataError
from medstudent.selftrain.plan import Plan, PoolItem, load_pool_image
from medstudent.selftrain.pseudo import pseudo_mask_agreement, seg_pseudo_mask, select_cls_pseudo
from medstudent.selftrain.rounds import in_process_group, predict_fn


def choose_pool(plan: Plan, st: SelfTrainConfig, r: int, used: set[str], seed: int) -> list[PoolItem]:
    """`unlabeled_fraction` of the pool, a fresh subset each round (images not used by earlier rounds
    first; when those run out, any)."""
    n = max(1, int(round(st.unlabeled_fraction * len(plan.pool))))
    rng = np.random.default_rng(seed + 1000 * r)
    fresh = [p for p in plan.pool if p.id not in used]
    rest = [p for p in plan.pool if p.id in used]
    order = [fresh[i] for i in rng.permutation(len(fresh))] + [rest[i] for i in rng.permutation(len(rest))]
    return sorted(order[:n], key=lambda p: p.id)


def make_pseudo_labels(
    teacher_dirs: list[Path],
    cfg: RunConfig,
    plan: Plan,
    items: list[PoolItem],
    out: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Predict the pool subset with the (ensembled, TTA'd) teacher and keep confident pseudo labels.
    Writes out/pseudo.csv (+ out/masks/*.png for segmentation) and out/stats.json; returns the stats.

    In a multi-process run (after Lightning's DDP set up the process group) each rank predicts its share of
    the images; rank 0 gathers the rows and writes the tables."""
    st = cfg.selftrain
    assert st is not None
    predict, predictors = predict_fn(teacher_dirs, cfg, st.tta)
    ds = plan.dataset
    seg = isinstance(ds, SegmentationDataset)
    (out / "masks" if seg else out).mkdir(parents=True, exist_ok=True)
    grouped = in_process_group()
    mine = shard(items) if grouped else items
    results: list = []  # segmentation: table rows; classification: (item, probabilities)
    skipped: list[str] = []
    post = predictors[0].postprocess if st.postprocess else None
    for n, item in enumerate(mine):
        try:
            img = load_pool_image(plan, item)
            p = predict(img)
        except DataError as e:  # one bad file is reported and skipped, never fatal
            skipped.append(str(e))
            warnings.warn(f"skipped: {e}", stacklevel=2)
            continue
        results.append(
            _seg_row(item, *_seg_pseudo(p, post, st.threshold), plan, st, out) if seg else (item, p)
        )
        if (n + 1) % 25 == 0:
            log(f"pseudo-labelled {n + 1}/{len(mine)}")
    if grouped:
        results = [r for part in gather(results) for r in part]
        skipped = [s for part in gather(skipped) for s in part]
    if seg:
        results.sort(key=lambda r: r["id"])
        stats = _seg_stats(results)
        if is_main():
            write_csv(out / "pseudo.csv", results)
    else:
        results.sort(key=lambda r: r[0].id)
        stats = _cls_pseudo(results, plan, st, out, cfg)
    stats.update(
        {
            "predicted": len(results),
            "skipped": skipped,
            "tta": st.tta,
            "teachers": [str(d) for d in teacher_dirs],
        }
    )
    if is_main():
        write_text_atomic(out / "stats.json", json.dumps(stats, indent=1))
    if grouped:
        barrier()  # the other ranks read the tables rank 0 just wrote
    return stats


def _seg_pseudo(prob: np.ndarray, post, threshold: float) -> tuple[np.ndarray, float]:
    """(pseudo mask with IGNORE, confident-pixel fraction); `post` optionally cleans the hard labels."""
    hard = postprocess(prob, post) if (post is not None and prob.ndim == 2) else None
    return seg_pseudo_mask(prob, threshold, hard)


def _seg_row(
    item: PoolItem, mask: np.ndarray, frac: float, plan: Plan, st: SelfTrainConfig, out: Path
) -> dict[str, Any]:
    """One pseudo mask: written to out/masks when kept; scored against the hidden label when there is one."""
    keep = frac >= st.min_confident_fraction
    row: dict[str, Any] = {
        "id": item.id,
        "source": item.source,
        "index": item.index,
        "confident_fraction": round(frac, 5),
        "kept": int(keep),
    }
    if item.source == "hidden":
        truth = plan.dataset.load_mask(item.index, (mask.shape[1], mask.shape[0]))  # type: ignore[union-attr]
        row.update({k: round(v, 5) for k, v in pseudo_mask_agreement(mask, truth).items()})
    if keep:
        name = item.id.replace("/", "__") + ".png"
        with atomic_path(out / "masks" / name, fsync=False) as tmp:
            Image.fromarray(mask).save(tmp, format="PNG")
        row["mask"] = name
    return row


def _seg_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [r for r in rows if r["kept"]]
    scored = [r for r in kept if "dice" in r]
    return {
        "task": "segmentation",
        "kept": len(kept),
        "mean_confident_fraction": _mean([r["confident_fraction"] for r in rows]),
        "kept_mean_confident_fraction": _mean([r["confident_fraction"] for r in kept]),
        "pseudo_pixel_precision": _mean([r["pixel_precision"] for r in scored]),
        "pseudo_dice": _mean([r["dice"] for r in scored]),
        "scored_against_hidden": len(scored),
    }


def _cls_pseudo(
    results: list[tuple[PoolItem, np.ndarray]], plan: Plan, st: SelfTrainConfig, out: Path, cfg: RunConfig
) -> dict[str, Any]:
    items = [item for item, _ in results]
    probs = [p for _, p in results]
    ds = plan.dataset
    names = ds.class_names
    table = np.stack(probs) if probs else np.zeros((0, len(names)))
    sel = select_cls_pseudo(table, st.threshold, soft=st.soft, balance=st.balance, seed=cfg.train.seed)
    rows = []
    for k, r in enumerate(sel.rows):
        item = items[r]
        row: dict[str, Any] = {
            "id": item.id,
            "source": item.source,
            "index": item.index,
            "label": names[int(table[r].argmax())],
            "confidence": round(float(sel.confidence[k]), 5),
        }
        row.update({f"p_{c}": float(v) for c, v in zip(names, table[r], strict=True)})
        if item.source == "hidden":
            row["hidden_label"] = names[ds.items[item.index].label]  # type: ignore[union-attr]
        rows.append(row)
    if is_main():
        write_csv(out / "pseudo.csv", rows, fields=_cls_fields(names))
    # quality is counted over distinct images (balancing duplicates some rows and drops others)
    hidden_rows = list({r["id"]: r for r in rows if "hidden_label" in r}.values())
    return {
        "task": "classification",
        "kept": len(set(sel.rows.tolist())),  # distinct images
        "training_rows": len(rows),  # after class balancing
        "kept_per_class": {names[c]: n for c, n in sel.kept_per_class.items()},
        "balanced_per_class": {names[c]: n for c, n in sel.balanced_per_class.items()},
        "pseudo_precision": _mean([float(r["label"] == r["hidden_label"]) for r in hidden_rows]),
        "scored_against_hidden": len(hidden_rows),
        "soft": st.soft,
    }


def _cls_fields(names: list[str]) -> list[str]:
    return ["id", "source", "index", "label", "confidence", *[f"p_{c}" for c in names], "hidden_label"]


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or sorted({k for r in rows for k in r}, key=lambda k: (k != "id", k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        reason = f"cannot read ({e.strerror}); delete the round's pseudo/ folder to redo it"
        raise DataError(path, reason) from e


def _mean(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return round(float(np.mean(v)), 5) if v else None


def pseudo_dataset(pseudo_dir: Path, cfg: RunConfig, plan: Plan):
    """Torch dataset(s) of the kept pseudo labels (their transform is set by the trainer: the student's)."""
    # deferred: imports torch
    import torch

    from medstudent.training.data import ClsTorchDataset, SegTorchDataset

    rows = read_csv(pseudo_dir / "pseudo.csv")
    ds = plan.dataset
    parts = []
    for source in ("hidden", "unlabeled"):
        src = ds if source == "hidden" else plan.unlabeled
        mine = [r for r in rows if r["source"] == source]
        if not mine or src is None:
            continue
        if isinstance(ds, SegmentationDataset):
            mine = [r for r in mine if r.get("kept") == "1"]
            masks = {int(r["index"]): read_mask_raw(pseudo_dir / "masks" / r["mask"]) for r in mine}
            idx = [int(r["index"]) for r in mine]
            if idx:
                parts.append(SegTorchDataset(src, idx, transform=None, cache=cfg.data.cache, masks=masks))  # type: ignore[arg-type]
        else:
            names = ds.class_names
            labels: dict[int, Any] = {}
            for r in mine:
                if cfg.selftrain and cfg.selftrain.soft:
                    labels[int(r["index"])] = np.array([float(r[f"p_{c}"]) for c in names], np.float32)
                else:
                    labels[int(r["index"])] = names.index(r["label"])
            idx = [int(r["index"]) for r in mine]  # duplicates from class balancing are kept
            parts.append(
                ClsTorchDataset(
                    src, idx, transform=None, labels=labels, cache=cfg.data.cache, num_classes=len(names)
                )  # type: ignore[arg-type]
            )
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def read_mask_raw(path: Path) -> np.ndarray:
    """A pseudo mask exactly as written (class ids and 255 = ignore; `read_mask` would map 255 to 1)."""
    try:
        return np.asarray(Image.open(path)).astype(np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read pseudo mask ({e})") from e
