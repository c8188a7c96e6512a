"""The search space of `medstudent tune`: the config's `search:` section parsed and checked (every sampled
value must make a valid config), and one trial's config from Optuna's suggestions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medstudent.config import RunConfig
from medstudent.errors import ConfigError

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


def stored_trial_config(cfg: RunConfig, space: SearchSpace, params: Mapping[str, Any]) -> RunConfig:
    """The base config with a finished trial's parameters as Optuna stored them (JSON text for list or
    dict choices), without the `search:` section; parameters no longer in the space are skipped."""
    doc = _base_doc(cfg)
    for k, v in params.items():
        if (spec := space.params.get(k)) is not None:  # the search space may have changed since
            _set_path(doc, k, json.loads(v) if spec._encoded() else v)
    doc.pop("search")
    return RunConfig.model_validate(doc)
