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

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medstudent.atomic import write_text_atomic
from medstudent.config import RunConfig, SelfTrainConfig, save_config
from medstudent.distributed import is_main
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import primary_metric
from medstudent.rundir import RunDir
from medstudent.selftrain.plan import Plan, make_plan
from medstudent.selftrain.pseudo_io import choose_pool, make_pseudo_labels, pseudo_dataset, read_csv
from medstudent.selftrain.rounds import score_round, student_config, train_members
from medstudent.selftrain.state import STATE_FILE, State, round_line, write_summary

__all__ = ["run_selftrain", "selftrain_fold", "student_config"]


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
    state_file = root / STATE_FILE
    main = is_main()  # DDP ranks > 0 run this loop too (for training and sharded prediction), writing nothing
    if main and state_file.is_file() and not resume:
        raise DataError(
            root, "already holds a self-training run; pass --resume to continue or choose another name"
        )
    root.mkdir(parents=True, exist_ok=True)
    state = State(state_file)
    plan = make_plan(cfg, root, split_path)
    if main:
        save_config(cfg, RunDir(root).config)
        write_text_atomic(RunDir(root).split, json.dumps(plan.prep.split, indent=1))
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
        from medstudent.inference.predict import expand_runs  # deferred: imports torch

        teacher_dirs = expand_runs([st.teacher])
        rec["source"] = str(st.teacher)
    else:
        teacher_dirs = train_members(cfg, round_dir, st.ensemble_size, plan, None, progress, log)
    rec.update(_evaluate_round(rec, teacher_dirs, cfg, plan, "teacher", start))
    rec["dirs"] = [str(d) for d in teacher_dirs]
    state.save()
    log(round_line(rec))

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
            items = choose_pool(plan, st, r, used, cfg.train.seed)
            log(f"round {r}: pseudo-labelling {len(items)} pool image(s) with {len(teacher_dirs)} teacher(s)")
            stats = make_pseudo_labels(teacher_dirs, cfg, plan, items, pseudo_dir, log)
        used |= {row["id"] for row in read_csv(pseudo_dir / "pseudo.csv")}
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
        dirs = train_members(scfg, round_dir, st.ensemble_size, plan, extra, progress, log, init)
        rec.update(_evaluate_round(rec, dirs, scfg, plan, f"student_{r}", start))
        rec["dirs"] = [str(d) for d in dirs]
        better = (rec["val_metric"] or 0.0) > (best["val_metric"] or 0.0)
        rec["gate"] = "accepted" if better or not st.stop_when_worse else "rejected"
        state.save()
        log(round_line(rec))
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
    """The round's record: what was trained, its primary metric on val and test (the gate compares the
    val one) and every scalar score of both (`val_scores`, `test_scores`: mean_dice_raw and the rest)."""
    if "val_metric" in rec and "test_metric" in rec:
        return {}
    metric = primary_metric(cfg.data.task)
    val = score_round(dirs, cfg, plan, "val")
    test = score_round(dirs, cfg, plan, "test")
    return {
        "role": role,
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder if cfg.data.task == "segmentation" else None,
        "members": len(dirs),
        "val_metric": val[metric] if val else None,
        "test_metric": test[metric] if test else None,
        "val_scores": val,
        "test_scores": test,
        "metric": metric,
        "minutes": round((time.time() - start) / 60, 2),
    }


def selftrain_fold(cfg: RunConfig, split_path: Path, fold: int, fold_dir: Path) -> list[Path]:
    """`medstudent cv` / `tune` fold runner: Noisy Student on one fold in fold_dir (resumed when it holds
    a started run); returns the model folders of the best round, which cv scores on the fold's val set."""
    c = cfg.model_copy(deep=True)
    c.data.fold = fold
    c.train.output_dir = str(Path(fold_dir).parent)
    c.train.name = Path(fold_dir).name
    resume = (Path(fold_dir) / STATE_FILE).is_file()
    summary = run_selftrain(c, split_path, resume=resume, progress=False, log=lambda _m: None)
    return [Path(d) for d in summary["best_dirs"]]
