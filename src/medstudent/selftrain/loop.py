"""Noisy Student self-training (Xie et al. 2020) for classification and segmentation.

runs/<name>/
  config.yaml, split.json      the resolved config; the split with this run's labeled/hidden ids
  plan.json                    labeled, hidden (labels withheld) and unlabeled pool ids: fixed for resume
  selftrain.json               state after every stage (what `--resume` continues from)
  round_0/                     the teacher (a run folder; member_<m>/ run folders when ensemble_size > 1)
  round_<r>/pseudo/            pseudo labels made by round r-1 for round r (CSV, masks, stats.json)
  round_<r>/                   student r, trained on labeled + pseudo-labeled images with noise
  summary.csv / summary.md     teacher vs students: pseudo-label statistics, validation and test metrics
  results.csv                  validation scores per round in the long format `medstudent compare` reads
  test_results.csv             the same for the fold's test images

Each round's model(s) are scored on the fold's validation set with the full prediction pipeline; a student
that does not beat its teacher there stops the loop (when selftrain.stop_when_worse), and the log says so.
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medstudent.config import RunConfig, SelfTrainConfig, save_config
from medstudent.data.layouts import (
    ClassificationDataset,
    SegmentationDataset,
    UnlabeledDataset,
    open_unlabeled,
)
from medstudent.distributed import barrier, gather, is_main, shard
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import primary_metric, write_results
from medstudent.selftrain.pseudo import pseudo_mask_agreement, seg_pseudo_mask, select_cls_pseudo

STATE_FORMAT = "medstudent-selftrain/1"


@dataclass
class PoolItem:
    """One image of the unlabeled pool: from the labeled set with its label hidden, or truly unlabeled."""

    id: str
    source: str  # "hidden" | "unlabeled"
    index: int  # index into the labeled data set or the unlabeled data set


@dataclass
class Plan:
    prep: Any  # training.train.Prepared restricted to the labeled subset
    pool: list[PoolItem]
    unlabeled: UnlabeledDataset | None

    @property
    def dataset(self) -> SegmentationDataset | ClassificationDataset:
        return self.prep.dataset


# ----------------------------------------------------------------------------------------------- the plan


def _labeled_subset(ds, train_idx: list[int], st: SelfTrainConfig, seed: int) -> list[int]:
    """Which training images keep their labels: `labeled_count` or `labeled_fraction` of them, stratified
    by class for classification (at least one image per class present), random for segmentation."""
    n = len(train_idx)
    want = st.labeled_count if st.labeled_count is not None else int(round(st.labeled_fraction * n))
    want = min(n, max(1, want))
    if want >= n:
        return list(train_idx)
    rng = np.random.default_rng(seed)
    if isinstance(ds, ClassificationDataset):
        labels = np.array([ds.items[i].label for i in train_idx])
        keep: list[int] = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = max(1, int(round(want * len(members) / n)))
            keep += rng.choice(members, min(k, len(members)), replace=False).tolist()
        return sorted(train_idx[j] for j in keep)
    return sorted(np.asarray(train_idx)[rng.choice(n, want, replace=False)].tolist())


def _open_pool_unlabeled(cfg: RunConfig, ds) -> UnlabeledDataset | None:
    st = cfg.selftrain
    assert st is not None
    if st.unlabeled in ("none", ""):
        return None
    if st.unlabeled:
        return open_unlabeled(st.unlabeled)
    extra = getattr(ds, "unlabeled", None)  # a segmentation data set's Unlabeled_Images folder
    return UnlabeledDataset(root=ds.root, images=list(extra)) if extra else None


def _wait_for(path: Path, seconds: float = 600) -> None:
    """Ranks > 0 wait for a file rank 0 writes (they may start before it does under torchrun)."""
    end = time.time() + seconds
    while not path.is_file():
        if time.time() > end:
            raise DataError(path, f"rank 0 did not write it within {seconds:.0f} s")
        time.sleep(1)


def make_plan(cfg: RunConfig, root: Path, split_path: str | Path | None = None) -> Plan:
    """Labeled subset, hidden-label pool and unlabeled pool of the configured fold; saved to plan.json the
    first time and read back afterwards, so a resumed run uses the very same images."""
    from medstudent.training.train import Prepared, prepare_data

    st = cfg.selftrain
    assert st is not None
    full = prepare_data(cfg, split_path, cfg.data.fold)
    ds = full.dataset
    ids = ds.ids()
    unl = _open_pool_unlabeled(cfg, ds)
    plan_file = root / "plan.json"
    if not is_main():
        _wait_for(plan_file)
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        index = {i: n for n, i in enumerate(ids)}
        try:
            labeled = [index[i] for i in saved["labeled"]]
            hidden = [index[i] for i in saved["hidden"]]
        except KeyError as e:
            raise DataError(plan_file, f"names image {e} that is not in {ds.root}") from None
        unl_ids = saved["unlabeled"]
        if unl is not None:
            uindex = {i: n for n, i in enumerate(unl.ids())}
            missing = [i for i in unl_ids if i not in uindex]
            if missing:
                raise DataError(plan_file, f"names unlabeled image {missing[0]} that is no longer there")
            unl_idx = [uindex[i] for i in unl_ids]
        elif unl_ids:
            raise DataError(plan_file, "names unlabeled images but no unlabeled folder is configured")
        else:
            unl_idx = []
    else:
        labeled = _labeled_subset(ds, full.train_idx, st, cfg.train.seed)
        hidden = sorted(set(full.train_idx) - set(labeled))
        unl_idx = list(range(len(unl))) if unl is not None else []
        plan_file.write_text(
            json.dumps(
                {
                    "labeled": [ids[i] for i in labeled],
                    "hidden": [ids[i] for i in hidden],
                    "unlabeled": [unl.ids()[i] for i in unl_idx] if unl is not None else [],
                },
                indent=1,
            )
        )
    pool = [PoolItem(ids[i], "hidden", i) for i in hidden]
    if unl is not None:
        pool += [PoolItem("unlabeled/" + unl.ids()[i], "unlabeled", i) for i in unl_idx]
    if not pool:
        raise ConfigError(
            None,
            "self-training needs unlabeled images: set selftrain.labeled_fraction < 1, "
            "selftrain.labeled_count, or selftrain.unlabeled to a folder of images",
        )
    split = json.loads(json.dumps(full.split))
    fold = split["folds"][cfg.data.fold]
    fold["train"] = [ids[i] for i in labeled]
    fold["hidden"] = [ids[i] for i in hidden]  # labels withheld from training; scored as pseudo labels
    prep = Prepared(ds, split, labeled, full.val_idx, full.test_idx)
    return Plan(prep, pool, unl)


# --------------------------------------------------------------------------------------------- the state


class State:
    """selftrain.json: one record per round, written after every finished stage."""

    def __init__(self, path: Path):
        self.path = path
        self.doc: dict[str, Any] = {"format": STATE_FORMAT, "rounds": {}}
        if path.is_file():
            try:
                self.doc = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(path, f"not valid JSON ({e}); delete it to start over") from e
            if self.doc.get("format") != STATE_FORMAT:
                raise DataError(path, "not a medstudent self-training state file")

    def round(self, r: int) -> dict[str, Any]:
        return self.doc["rounds"].setdefault(str(r), {"round": r})

    def save(self) -> None:
        if not is_main():
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(self.path)  # atomic: an interruption never leaves half a state file


# ------------------------------------------------------------------------------------- configs per round


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pick(value: str | list[str] | None, r: int) -> str | None:
    """A per-student setting: one value for all students or a list indexed by student (last one repeats)."""
    if isinstance(value, list):
        return value[min(r - 1, len(value) - 1)] if value else None
    return value


def student_config(cfg: RunConfig, r: int) -> RunConfig:
    """The noised student of round r: stronger augmentation, dropout, stochastic depth, optionally a larger
    encoder (segmentation) or architecture (classification)."""
    st = cfg.selftrain
    assert st is not None
    doc = cfg.model_dump(mode="json")
    doc["model"]["dropout"] = st.student_dropout
    doc["model"]["drop_path_rate"] = st.student_drop_path_rate
    if enc := _pick(st.student_encoder, r):
        doc["model"]["encoder"] = enc
    if arch := _pick(st.student_arch, r):
        doc["model"]["arch"] = arch
    doc["augment"] = _deep_merge(doc["augment"], st.student_augment)
    doc = _deep_merge(doc, st.student_overrides)
    try:
        return RunConfig.model_validate(doc)
    except Exception as e:  # noqa: BLE001 - pydantic's message names the bad key
        raise ConfigError(None, f"selftrain student settings are invalid: {e}".replace("\n", " ")) from e


def member_dirs(round_dir: Path, n: int) -> list[Path]:
    return [round_dir] if n == 1 else [round_dir / f"member_{m}" for m in range(n)]


def _member_cfg(cfg: RunConfig, m: int) -> RunConfig:
    out = cfg.model_copy(deep=True)
    out.train.seed = cfg.train.seed + m  # ensemble members differ by seed (init of new layers, data order)
    return out


def _done(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()


def _train_members(
    cfg: RunConfig,
    round_dir: Path,
    n: int,
    plan: Plan,
    extra,
    progress: bool,
    log: Callable[[str], None],
    init_from: list[Path] | None = None,
) -> list[Path]:
    from medstudent.inference.predict import _checkpoint_of
    from medstudent.training.train import train

    dirs = member_dirs(round_dir, n)
    for m, d in enumerate(dirs):
        init = _checkpoint_of(init_from[m % len(init_from)]) if init_from else None
        if _done(d):
            log(f"{d}: already trained, kept")
            continue
        resume = (d / "checkpoints" / "last.ckpt").is_file()
        log(f"{d}: {'resuming' if resume else 'training'} ({cfg.model.arch}/{cfg.model.encoder})")
        train(
            _member_cfg(cfg, m),
            init_from=init,
            resume=resume,
            progress=progress,
            extra_train=extra,
            run_dir=d,
            prepared=plan.prep,
        )
    return dirs


# ------------------------------------------------------------------------------------------- prediction


def _predict_fn(
    dirs: list[Path], cfg: RunConfig, tta: str
) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
    from medstudent.inference.predict import load_predictor, predict_probs

    predictors = [load_predictor(d, device="auto") for d in dirs]
    precision = cfg.train.precision if cfg.train.precision in ("auto", "bf16") else "32"
    return (
        lambda img: predict_probs(predictors, img, tta=tta, ensemble="mean", precision=precision)
    ), predictors


def _load_pool_image(plan: Plan, item: PoolItem) -> np.ndarray:
    if item.source == "hidden":
        return plan.dataset.load_image(item.index)
    assert plan.unlabeled is not None
    return plan.unlabeled.load_image(item.index)


def score_round(dirs: list[Path], cfg: RunConfig, plan: Plan, which: str) -> float | None:
    """Mean Dice (segmentation, threshold 0.5 / argmax, empty-empty = 1) or accuracy (classification) of
    the round's model(s), averaged as an ensemble, on the fold's `val` or `test` images."""
    from medstudent.evaluation.metrics import per_image_dice

    idx = plan.prep.val_idx if which == "val" else plan.prep.test_idx
    if not idx:
        return None
    predict, _ = _predict_fn(dirs, cfg, cfg.predict.tta)
    ds = plan.dataset
    grouped = in_process_group()
    scores: list[float] = []
    for i in shard(idx) if grouped else idx:
        if isinstance(ds, SegmentationDataset):
            img, gt = ds.load(i)
            p = predict(img)
            pred = p > 0.5 if p.ndim == 2 else p.argmax(0) > 0
            scores.append(float(per_image_dice([pred], [gt > 0])[0]))
        else:
            scores.append(float(int(np.argmax(predict(ds.load_image(i)))) == ds.items[i].label))
    if grouped:
        scores = [v for part in gather(scores) for v in part]
    return float(np.mean(scores))


def _choose_pool(plan: Plan, st: SelfTrainConfig, r: int, used: set[str], seed: int) -> list[PoolItem]:
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
    predict, predictors = _predict_fn(teacher_dirs, cfg, st.tta)
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
            img = _load_pool_image(plan, item)
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
            _write_csv(out / "pseudo.csv", results)
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
        (out / "stats.json").write_text(json.dumps(stats, indent=1))
    if grouped:
        barrier()  # the other ranks read the tables rank 0 just wrote
    return stats


def in_process_group() -> bool:
    """True inside a multi-process group (then work is sharded and gathered)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _seg_pseudo(prob: np.ndarray, post, threshold: float) -> tuple[np.ndarray, float]:
    """(pseudo mask with IGNORE, confident-pixel fraction); `post` optionally cleans the hard labels."""
    from medstudent.inference.postprocess import postprocess

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
        Image.fromarray(mask).save(out / "masks" / name)
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
        _write_csv(out / "pseudo.csv", rows, fields=_cls_fields(names))
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


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or sorted({k for r in rows for k in r}, key=lambda k: (k != "id", k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict[str, str]]:
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
    import torch

    from medstudent.training.data import ClsTorchDataset, SegTorchDataset

    rows = _read_csv(pseudo_dir / "pseudo.csv")
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


# ------------------------------------------------------------------------------------------------- loop


def run_selftrain(
    cfg: RunConfig,
    split_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Teacher -> pseudo labels -> noised student, `num_students` rounds; returns the summary."""
    if cfg.selftrain is None:
        cfg = cfg.model_copy(update={"selftrain": SelfTrainConfig()})
    st = cfg.selftrain
    assert st is not None
    if st.ensemble_size < 1 or st.num_students < 0:
        raise ConfigError(None, "selftrain.ensemble_size must be >= 1 and num_students >= 0")
    if cfg.data.fold == "all":
        raise ConfigError(None, "self-training needs a validation fold for its gate; --fold all is for train")
    root = Path(cfg.train.output_dir) / cfg.train.name
    state_file = root / "selftrain.json"
    main = is_main()  # DDP ranks > 0 run this loop too (for training and sharded prediction), writing nothing
    if main and state_file.is_file() and not resume:
        raise DataError(
            root, "already holds a self-training run; pass --resume to continue or choose another name"
        )
    root.mkdir(parents=True, exist_ok=True)
    state = State(state_file)
    plan = make_plan(cfg, root, split_path)
    if main:
        save_config(cfg, root / "config.yaml")
        (root / "split.json").write_text(json.dumps(plan.prep.split, indent=1))
    log(
        f"self-training {cfg.train.name}: {len(plan.prep.train_idx)} labeled, "
        f"{sum(p.source == 'hidden' for p in plan.pool)} hidden-label + "
        f"{sum(p.source == 'unlabeled' for p in plan.pool)} unlabeled pool images, "
        f"{len(plan.prep.val_idx)} val, {len(plan.prep.test_idx)} test"
    )

    # Round 0: the teacher.
    rec = state.round(0)
    round_dir = root / "round_0"
    start = time.time()
    if st.teacher:
        from medstudent.inference.predict import expand_runs

        teacher_dirs = expand_runs([st.teacher])
        rec["source"] = str(st.teacher)
    else:
        teacher_dirs = _train_members(cfg, round_dir, st.ensemble_size, plan, None, progress, log)
    rec.update(_evaluate_round(rec, teacher_dirs, cfg, plan, "teacher", start))
    rec["dirs"] = [str(d) for d in teacher_dirs]
    state.save()
    log(_round_line(rec))

    used: set[str] = set()
    best = rec
    for r in range(1, st.num_students + 1):
        rec = state.round(r)
        if rec.get("gate") == "rejected":
            break
        round_dir = root / f"round_{r}"
        start = time.time()
        pseudo_dir = round_dir / "pseudo"
        if (pseudo_dir / "stats.json").is_file():
            stats = json.loads((pseudo_dir / "stats.json").read_text())
        else:
            items = _choose_pool(plan, st, r, used, cfg.train.seed)
            log(f"round {r}: pseudo-labelling {len(items)} pool image(s) with {len(teacher_dirs)} teacher(s)")
            stats = make_pseudo_labels(teacher_dirs, cfg, plan, items, pseudo_dir, log)
        used |= {row["id"] for row in _read_csv(pseudo_dir / "pseudo.csv")}
        rec["pseudo"] = {k: v for k, v in stats.items() if k not in ("teachers",)}
        state.save()
        extra = pseudo_dataset(pseudo_dir, cfg, plan)
        if extra is None:
            log(f"round {r}: no pseudo label passed the threshold {st.threshold}; stopping")
            rec["gate"] = "no pseudo labels"
            state.save()
            break
        scfg = student_config(cfg, r)
        init = teacher_dirs if st.student_init == "teacher" else None
        dirs = _train_members(scfg, round_dir, st.ensemble_size, plan, extra, progress, log, init)
        rec.update(_evaluate_round(rec, dirs, scfg, plan, f"student_{r}", start))
        rec["dirs"] = [str(d) for d in dirs]
        better = (rec["val_metric"] or 0.0) > (best["val_metric"] or 0.0)
        rec["gate"] = "accepted" if better or not st.stop_when_worse else "rejected"
        state.save()
        log(_round_line(rec))
        if rec["gate"] == "rejected":
            log(
                f"gate: student {r} (val {rec['val_metric']:.4f}) did not beat its teacher "
                f"(val {best['val_metric']:.4f}); stopping, the teacher stays the result"
            )
            break
        log(
            f"gate: student {r} accepted (val {rec['val_metric']:.4f} vs {best['val_metric']:.4f}); "
            "it teaches the next round"
        )
        best, teacher_dirs = rec, dirs
    state.doc["best_round"] = best["round"]
    state.save()
    return write_summary(root, state, cfg)


def _evaluate_round(rec: dict, dirs: list[Path], cfg: RunConfig, plan: Plan, role: str, start: float) -> dict:
    if "val_metric" in rec and "test_metric" in rec:
        return {}
    return {
        "role": role,
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder if cfg.data.task == "segmentation" else None,
        "members": len(dirs),
        "val_metric": score_round(dirs, cfg, plan, "val"),
        "test_metric": score_round(dirs, cfg, plan, "test"),
        "metric": primary_metric(cfg.data.task),
        "minutes": round((time.time() - start) / 60, 2),
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _round_line(rec: dict) -> str:
    return (
        f"round {rec['round']} ({rec.get('role')}): val {rec.get('metric')} {_fmt(rec.get('val_metric'))}, "
        f"test {_fmt(rec.get('test_metric'))}"
    )


SUMMARY_FIELDS = [
    "round", "role", "arch", "encoder", "members", "pseudo_predicted", "pseudo_kept", "pseudo_quality",
    "confident_fraction", "val_metric", "test_metric", "gate", "minutes",
]  # fmt: skip


def write_summary(root: Path, state: State, cfg: RunConfig) -> dict[str, Any]:
    """summary.csv/.md (teacher vs students) and results.csv in the long format `compare` reads."""
    rows = []
    for key in sorted(state.doc["rounds"], key=int):
        rec = state.doc["rounds"][key]
        if "val_metric" not in rec:
            continue
        ps = rec.get("pseudo", {})
        quality = ps.get("pseudo_precision", ps.get("pseudo_dice"))
        rows.append({
            "round": rec["round"], "role": rec.get("role"), "arch": rec.get("arch"),
            "encoder": rec.get("encoder"), "members": rec.get("members"),
            "pseudo_predicted": ps.get("predicted"), "pseudo_kept": ps.get("kept"),
            "pseudo_quality": quality, "confident_fraction": ps.get("kept_mean_confident_fraction"),
            "val_metric": rec.get("val_metric"), "test_metric": rec.get("test_metric"),
            "gate": rec.get("gate", "teacher" if rec["round"] == 0 else ""), "minutes": rec.get("minutes"),
        })  # fmt: skip
    best = state.doc.get("best_round")
    best_dirs = state.doc["rounds"].get(str(best), {}).get("dirs", []) if best is not None else []
    summary = {"root": str(root), "rounds": rows, "best_round": best, "best_dirs": best_dirs}
    if not is_main():
        return summary
    _write_csv(root / "summary.csv", rows, fields=SUMMARY_FIELDS)
    lines = ["| " + " | ".join(SUMMARY_FIELDS) + " |", "|" + "---|" * len(SUMMARY_FIELDS)]
    lines += ["| " + " | ".join(_fmt(r.get(f)) for f in SUMMARY_FIELDS) + " |" for r in rows]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    metric = primary_metric(cfg.data.task)  # mean_dice | accuracy, as `cv` writes them
    dataset = Path(cfg.data.root).resolve().name
    for split_name, fname in (("val", "results.csv"), ("test", "test_results.csv")):
        rows_out = [
            {
                "dataset": dataset,
                "method": r["role"],
                "fold": cfg.data.fold,
                metric: r[f"{split_name}_metric"],
            }
            for r in rows
            if r[f"{split_name}_metric"] is not None
        ]
        if rows_out:
            write_results(rows_out, root / fname)
    return summary


def selftrain_fold(cfg: RunConfig, split_path: Path, fold: int, fold_dir: Path) -> list[Path]:
    """`medstudent cv` / `tune` fold runner: Noisy Student on one fold in fold_dir (resumed when it holds
    a started run); returns the model folders of the best round, which cv scores on the fold's val set."""
    c = cfg.model_copy(deep=True)
    c.data.fold = fold
    c.train.output_dir = str(Path(fold_dir).parent)
    c.train.name = Path(fold_dir).name
    resume = (Path(fold_dir) / "selftrain.json").is_file()
    summary = run_selftrain(c, split_path, resume=resume, progress=False, log=lambda _m: None)
    return [Path(d) for d in summary["best_dirs"]]
