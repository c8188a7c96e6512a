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
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medstudent.config import RunConfig, save_config
from medstudent.errors import ConfigError, DataError
from medstudent.evaluation.results import primary_metric
from medstudent.experiments.cv import FoldRunner, resolve_split, run_cv

SCALARS = (type(None), bool, int, float, str)


class ParamSpec(BaseModel):
    """One searched parameter: a float or int range (optionally log-scaled or stepped), or choices."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("categorical takes `choices` only (no low/high/step/log)")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not `choices`")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be > 0")
        if self.type == "int" and any(
            v is not None and not float(v).is_integer() for v in (self.low, self.high, self.step)
        ):
            raise ValueError("int needs whole low, high and step")
        return self

    def _encoded(self) -> bool:
        return not all(isinstance(c, SCALARS) for c in self.choices or [])

    def samples(self) -> list[Any]:
        """Values to validate the config with: the range ends, or every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def suggest(self, trial: Any, name: str) -> Any:
        if self.type == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log, step=step)
        if self._encoded():  # lists/dicts (e.g. a crop size): Optuna stores scalars, so offer them as JSON
            return json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in self.choices or []]))
        return trial.suggest_categorical(name, self.choices)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, ParamSpec]
    n_trials: int = Field(20, ge=1)
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str | None = None
    folds: int | None = Field(None, ge=1)
    pruner: Literal["median", "none"] = "median"
    n_startup_trials: int = Field(3, ge=0)  # MedianPruner: trials that are never pruned
    n_warmup_steps: int = Field(0, ge=0)  # MedianPruner: folds before pruning starts
    seed: int | None = None  # TPE seed: reproducible single worker (workers sharing a seed sample alike)
    timeout_minutes: float | None = Field(None, gt=0)


def _set_path(doc: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise KeyError(p)
        node = node[p]
    node[last] = value


def _base_doc(cfg: RunConfig) -> dict:
    doc = cfg.model_dump(mode="json")
    doc["search"] = None
    return doc


def _flatten_params(node: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": {type: ...}}} and {"optim.lr": {type: ...}} both give {"optim.lr": {type: ...}}."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and "type" not in v and v:
            out.update(_flatten_params(v, name + "."))
        else:
            out[name] = v
    return out


def parse_search(cfg: RunConfig, source: str | Path | None = None) -> SearchSpace:
    """Validate cfg.search: settings, parameter specs, and that every sampled value makes a valid config."""
    raw = cfg.search
    if not raw:
        raise ConfigError(source, "has no `search:` section to tune (see README, Experiments)")
    names = set(SearchSpace.model_fields) - {"params"}
    settings = {k: v for k, v in raw.items() if k in names}
    params: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "params" and isinstance(v, dict):
            params.update(_flatten_params(v))
        elif k not in names:
            params.update(_flatten_params({k: v}))
    for k, v in params.items():
        if "." not in k and not isinstance(v, dict):
            raise ConfigError(
                source,
                f"search.{k}: unknown setting (settings: {', '.join(sorted(names))}; "
                "parameters are config paths such as optim.lr)",
            )
    try:
        space = SearchSpace.model_validate({**settings, "params": params})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if x != "params")
        raise ConfigError(source, f"search.{loc}: {err['msg'].removeprefix('Value error, ')}") from e
    if not space.params:
        raise ConfigError(source, "search: no parameters (keys are config paths such as optim.lr)")
    base = _base_doc(cfg)
    for name, spec in space.params.items():
        section = name.split(".")[0]
        if section not in RunConfig.model_fields or section in ("search", "ensemble"):
            raise ConfigError(source, f"search.{name}: '{section}' is not a config section")
        if base.get(section) is None:
            raise ConfigError(
                source, f"search.{name}: the config has no `{section}:` section; add it to search inside it"
            )
        for value in spec.samples():
            doc = json.loads(json.dumps(base))
            try:
                _set_path(doc, name, value)
                RunConfig.model_validate(doc)
            except KeyError as e:
                raise ConfigError(source, f"search.{name}: '{e.args[0]}' is not a config section") from e
            except ValidationError as e:
                raise ConfigError(
                    source, f"search.{name}: value {value!r} makes an invalid config ({e.errors()[0]['msg']})"
                ) from e
    return space


def trial_config(cfg: RunConfig, space: SearchSpace, trial: Any) -> tuple[RunConfig, dict[str, Any]]:
    """The base config with one trial's sampled parameters (and no `search:` section)."""
    doc = _base_doc(cfg)
    values = {name: spec.suggest(trial, name) for name, spec in space.params.items()}
    for name, value in values.items():
        _set_path(doc, name, value)
    return RunConfig.model_validate(doc), values


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
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url.split("@")[-1]


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
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
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
        doc = _base_doc(cfg)
        for k, v in best.params.items():
            if (spec := space.params.get(k)) is not None:  # the search space may have changed since
                _set_path(doc, k, json.loads(v) if spec._encoded() else v)
        doc.pop("search")
        save_config(RunConfig.model_validate(doc), out / "best_config.yaml")
        report["best_config"] = str(out / "best_config.yaml")
    (out / "best.json").write_text(json.dumps(report, indent=1))
    return report
