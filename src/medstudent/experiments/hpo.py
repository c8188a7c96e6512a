"""`medstudent tune`: an Optuna study over the config's `search:` section; a trial's value is its CV metric.

    search:
      n_trials: 30              # finished (complete + pruned) trials the study should reach
      direction: maximize
      metric: mean_dice         # default: mean_dice (segmentation) / accuracy (classification)
      folds: 3                  # CV folds per trial: the first 3 of the split (default: all)
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.encoder: {type: categorical, choices: [efficientnet_lite0, resnet18]}
      selftrain.threshold: {type: float, low: 0.4, high: 0.8}
      selftrain.num_students: {type: int, low: 1, high: 3}

Settings are the keys above; every other key is a parameter, named by its config path (dotted as here,
or nested: `optim: {lr: {type: float, ...}}`, which `--set search.optim.lr=...` also gives).

Each trial's CV runs under <out>/trials/trial_<n>/ (fold_<k>/ as `medstudent cv`), every trial on the same
split (<out>/split.json or data.split). The running CV mean is reported after each fold, and a
MedianPruner stops bad trials early.

Storage: a SQLite file <out>/study.db by default; any SQLAlchemy URL (postgresql://user@host/db) lets
several workers, on one machine or many, work on one study. A rerun resumes: it runs only the trials
still missing, and a trial that was interrupted (Ctrl-C, or a killed worker whose heartbeat went stale)
is run again with the same parameters in the same folder, so its finished folds are not trained again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.config import RunConfig, save_config
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import primary_metric
from medstudent.experiments.cv import FoldRunner, resolve_split, run_cv
from medstudent.experiments.search_space import (
    ParamSpec,
    SearchSpace,
    parse_search,
    stored_trial_config,
    trial_config,
)

__all__ = [
    "ParamSpec",
    "SearchSpace",
    "objective_value",
    "parse_search",
    "run_study",
    "trial_config",
    "write_study_report",
]


def objective_value(
    cfg: RunConfig,
    run_method: FoldRunner | None = None,
    trial: Any = None,
    metric: str | None = None,
    folds: int | None = None,
    log: Callable[[str], None] | None = None,
) -> float:
    """Cross-validate `cfg` (see `run_cv`; `run_method` trains one fold, default: by the config, so the
    Noisy Student runner when `selftrain:` is set and registered) and return the CV mean of `metric`.

    With an Optuna trial, the running CV mean (folds 0..k) is reported as intermediate value at step k and
    the trial is pruned (optuna.TrialPruned) when the study's pruner says so.
    """
    import optuna

    metric = metric or primary_metric(cfg.data.task)
    seen: list[float] = []

    def on_fold(k: int, metrics: dict[str, float]) -> None:
        if metric not in metrics:
            raise ConfigError(
                None, f"metric '{metric}' is not among the fold's metrics ({', '.join(metrics)})"
            )
        seen.append(float(metrics[metric]))
        if trial is not None:
            trial.report(float(np.mean(seen)), step=k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"CV mean {metric} {np.mean(seen):.4f} after fold {k}")

    res = run_cv(
        cfg, folds=list(range(folds)) if folds else None, run_method=run_method, on_fold=on_fold, log=log
    )
    if res is None:
        raise ConfigError(None, "tune runs its trials single-process; launch workers instead of DDP ranks")
    return float(res.summary["metrics"][metric]["mean"])


# ------------------------------------------------------------------------------------------------ study


def default_out(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.name / "tune"


def masked_url(url: str) -> str:
    """The storage URL with its password replaced by ***, for messages.

    Written by hand rather than with SQLAlchemy's `make_url(...).render_as_string(hide_password=True)`:
    a password with an unescaped '@' or '/' is mis-parsed there and its tail shown. Here the host is what
    follows the last '@', and everything between the user name's ':' and it is hidden.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def _storage(url: str) -> Any:
    import optuna

    # Heartbeats mark the trials of a killed worker as failed; the callback queues them again (same
    # parameters, same user attributes, hence the same trial folder).
    kw: dict[str, Any] = {"heartbeat_interval": 60, "grace_period": 300}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if retry is not None:
            kw["heartbeat_stale_trial_callback"] = retry(max_retry=3)
        else:  # optuna < 4.9
            kw["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=3)
    for attempt in range(3):  # workers starting together may race to create the tables: try again
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kw)
        except ImportError as e:
            raise DataError(None, f"storage {masked_url(url)}: database driver missing ({e})") from e
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors: an unusable storage URL
            if attempt == 2:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(None, f"storage {masked_url(url)}: cannot open ({msg})") from e
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _blocking_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _resume_interrupted(study: Any) -> list[int]:
    """Queue again, with the same parameters and folder, trials interrupted by the user (Ctrl-C)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get("interrupted"):
            continue
        folder = t.user_attrs.get("folder_trial", t.number)
        if any(u.number > t.number and u.user_attrs.get("folder_trial") == folder for u in trials):
            continue  # already retried
        study.enqueue_trial(t.params, user_attrs={"folder_trial": folder})
        queued.append(t.number)
    return queued


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_study(
    cfg: RunConfig,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    out: str | Path | None = None,
    run_method: FoldRunner | None = None,
    source: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Create or load the study and run trials until it has `n_trials` (default search.n_trials) finished
    ones. Writes <out>/trials.csv, best.json and best_config.yaml; returns the best.json content."""
    import optuna

    say = log or (lambda _msg: None)
    space = parse_search(cfg, source)
    total = n_trials or space.n_trials
    metric = space.metric or primary_metric(cfg.data.task)
    out = Path(out) if out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study_name or cfg.train.name
    sampler = optuna.samplers.TPESampler(seed=space.seed)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=space.n_startup_trials, n_warmup_steps=space.n_warmup_steps
        )
        if space.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=_storage(url),
        study_name=name,
        direction=space.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study.direction.name.lower() != space.direction:
        raise ConfigError(source, f"study '{name}' exists with direction {study.direction.name.lower()}")
    if study.user_attrs.get("metric", metric) != metric:
        raise ConfigError(source, f"study '{name}' optimises {study.user_attrs['metric']}, not {metric}")
    study.set_user_attr("metric", metric)
    with _blocking_lock(out / ".split.lock"):  # workers on one machine make the split once
        split_file = resolve_split(cfg, out, None, None)
    if queued := _resume_interrupted(study):
        say(f"resuming interrupted trial(s) {queued}")
    done = _finished(study)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    say(f"study '{name}' at {masked_url(url)}: {done} of {total} trial(s) finished; metric {metric}")

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        folder = trial.user_attrs.get("folder_trial")
        if folder is None:
            folder = trial.number
            trial.set_user_attr("folder_trial", folder)
        tcfg, values = trial_config(cfg, space, trial)
        tcfg.train.output_dir = str(out / "trials")
        tcfg.train.name = f"trial_{int(folder):04d}"
        tcfg.data.split = str(split_file)
        say(f"trial {trial.number}: {values}")
        try:
            return objective_value(tcfg, run_method, trial, metric, space.folds, log=say)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise

    if done < total:
        study.optimize(
            objective,
            n_trials=total - done,
            timeout=space.timeout_minutes * 60 if space.timeout_minutes else None,
            callbacks=[
                optuna.study.MaxTrialsCallback(
                    total, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                )
            ],
        )
    return write_study_report(study, cfg, space, out, url, metric)


def write_study_report(
    study: Any, cfg: RunConfig, space: SearchSpace, out: Path, url: str, metric: str
) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    if trials:
        with atomic_path(out / "trials.csv", fsync=False) as tmp:
            study.trials_dataframe().to_csv(tmp, index=False)
    report: dict[str, Any] = {
        "study": study.study_name,
        "storage": masked_url(url),
        "metric": metric,
        "direction": space.direction,
        "trials": counts,
        "best_value": None,
        "best_params": None,
        "best_trial": None,
    }
    if counts.get("complete"):
        best = study.best_trial
        report.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        save_config(stored_trial_config(cfg, space, best.params), out / "best_config.yaml")
        report["best_config"] = str(out / "best_config.yaml")
    write_text_atomic(out / "best.json", json.dumps(report, indent=1))
    return report
