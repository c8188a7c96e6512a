"""One self-training round: the student's configuration, training the round's members, scoring them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medstudent.config import RunConfig
from medstudent.core.postprocess import for_ensemble
from medstudent.distributed import gather, shard
from medstudent.errors import ConfigError
from medstudent.evaluation.scoring import result_metrics, score_images, summarize_rows
from medstudent.rundir import RunDir
from medstudent.selftrain.plan import Plan

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


def member_cfg(cfg: RunConfig, m: int) -> RunConfig:
    out = cfg.model_copy(deep=True)
    out.train.seed = cfg.train.seed + m  # ensemble members differ by seed (init of new layers, data order)
    return out


def train_members(
    cfg: RunConfig,
    round_dir: Path,
    n: int,
    plan: Plan,
    extra,
    progress: bool,
    log: Callable[[str], None],
    init_from: list[Path] | None = None,
) -> list[Path]:
    """Train (or resume, or keep when finished) the n members of a round in round_dir; returns their run
    folders. `extra`: the pseudo-labelled data set; `init_from`: teacher runs the members start from."""
    # deferred: imports torch and lightning
    from medstudent.inference.predict import checkpoint_of
    from medstudent.training.train import train

    dirs = member_dirs(round_dir, n)
    for m, d in enumerate(dirs):
        init = checkpoint_of(init_from[m % len(init_from)]) if init_from else None
        if RunDir(d).is_trained():
            log(f"{d}: already trained, kept")
            continue
        resume = RunDir(d).last_ckpt.is_file()
        log(f"{d}: {'resuming' if resume else 'training'} ({cfg.model.arch}/{cfg.model.encoder})")
        train(
            member_cfg(cfg, m),
            init_from=init,
            resume=resume,
            progress=progress,
            extra_train=extra,
            run_dir=d,
            prepared=plan.prep,
        )
    return dirs


# -------------------------------------------------------------------------------- prediction and scoring


def predict_fn(dirs: list[Path], cfg: RunConfig, tta: str) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
    """(image -> ensemble-mean probabilities with `tta`, the loaded predictors) of the runs in `dirs`."""
    # deferred: imports torch
    from medstudent.inference.predict import load_predictor, predict_probs

    predictors = [load_predictor(d, device="auto") for d in dirs]
    precision = cfg.train.precision if cfg.train.precision in ("auto", "bf16") else "32"
    return (
        lambda img: predict_probs(predictors, img, tta=tta, ensemble="mean", precision=precision)
    ), predictors


def score_round(dirs: list[Path], cfg: RunConfig, plan: Plan, which: str) -> dict[str, float] | None:
    """The round's model(s), averaged as an ensemble, scored on the fold's `val` or `test` images by
    `evaluation.scoring` as `cv` scores: segmentation after the first model's post-processing (mean_dice;
    mean_dice_raw at 0.5), classification by accuracy. None when the fold has no such images.

    In a multi-process run each rank predicts its share of the images; the rows are gathered."""
    idx = plan.prep.val_idx if which == "val" else plan.prep.test_idx
    if not idx:
        return None
    predict, predictors = predict_fn(dirs, cfg, cfg.predict.tta)
    first = predictors[0]
    grouped = in_process_group()
    post = for_ensemble(first.postprocess, "mean") if first.task == "segmentation" else None
    rows = score_images(plan.dataset, shard(idx) if grouped else idx, predict, post, first.class_names)
    if grouped:
        rows = [r for part in gather(rows) for r in part]
    return result_metrics(summarize_rows(rows, first.task, first.class_names), first.task)


def in_process_group() -> bool:
    """True inside a multi-process group (then work is sharded and gathered)."""
    import torch.distributed as dist  # deferred: torch

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
