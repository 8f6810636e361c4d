"""A sweep's search space: one table per config key, in the shape of a W&B sweep config.

    [parameters."optim.lr_gen"]
    distribution = "log_uniform_values"      # or "uniform", "int_uniform", "q_uniform" (with q)
    min = 1e-5
    max = 1e-3
    [parameters."optim.lr_schedule"]
    values = ["exponential", "warmup_exponential"]
    [parameters."optim.warmup_steps"]
    distribution = "int_uniform"
    min = 0
    max = 2000
    when = { "optim.lr_schedule" = "warmup_exponential" }   # searched only then

Everything is checked before a trial runs: every key must be a config key, and every value the
space can produce (each end of a range, each listed value) must make a valid config with the
sweep's base recipe, so a range outside a key's allowed values is refused naming the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vits_ray.config import Config, ConfigError, replace
from vits_ray.errors import NonRetryable

DISTRIBUTIONS = ("values", "uniform", "log_uniform_values", "int_uniform", "q_uniform")


class SpaceError(NonRetryable, ValueError):
    """The search space file is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class Parameter:
    key: str  # "section.key"
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    q: float | None = None
    values: tuple = ()
    when: dict[str, Any] = field(default_factory=dict)

    def extremes(self) -> list[Any]:
        """Every value the space can produce that a config must accept."""
        return list(self.values) if self.distribution == "values" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """Optuna's suggestion for this key (define-by-run)."""
        name = self.key
        if self.distribution == "values":
            return trial.suggest_categorical(name, list(self.values))
        if self.distribution == "int_uniform":
            return trial.suggest_int(name, int(self.low), int(self.high))
        if self.distribution == "log_uniform_values":
            return trial.suggest_float(name, float(self.low), float(self.high), log=True)
        if self.distribution == "q_uniform":
            return trial.suggest_float(name, float(self.low), float(self.high), step=float(self.q))
        return trial.suggest_float(name, float(self.low), float(self.high))


@dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    source: str = ""

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def suggest(self, trial) -> dict[str, Any]:
        """One trial's settings: conditional keys only when their condition holds (file order, so
        a condition refers to keys chosen before it)."""
        chosen: dict[str, Any] = {}
        for param in self.parameters:
            if all(chosen.get(k) == v for k, v in param.when.items()):
                chosen[param.key] = param.suggest(trial)
        return chosen


def as_overrides(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"optim.lr_gen": 1e-4} -> {"optim": {"lr_gen": 1e-4}} (what `config.replace` takes)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def _parameter(key: str, table: Any, where: str) -> Parameter:
    if not isinstance(table, dict):
        raise SpaceError(f"{where}: [parameters.\"{key}\"] must be a table")
    unknown = set(table) - {"distribution", "min", "max", "q", "values", "when"}
    if unknown:
        raise SpaceError(f"{where}: {key}: unknown field(s) {', '.join(sorted(unknown))}")
    when = table.get("when", {})
    if not isinstance(when, dict):
        raise SpaceError(f"{where}: {key}: when must be a table of key = value")
    if "values" in table:
        values = table["values"]
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: {key}: values must be a non-empty list")
        return Parameter(key, "values", values=tuple(values), when=dict(when))
    distribution = table.get("distribution", "uniform")
    if distribution not in DISTRIBUTIONS[1:]:
        raise SpaceError(f"{where}: {key}: distribution {distribution!r} is not one of {', '.join(DISTRIBUTIONS[1:])}")
    if "min" not in table or "max" not in table:
        raise SpaceError(f"{where}: {key}: a {distribution} range needs min and max")
    low, high = table["min"], table["max"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise SpaceError(f"{where}: {key}: min and max must be numbers with min < max (got {low!r}, {high!r})")
    if distribution == "log_uniform_values" and low <= 0:
        raise SpaceError(f"{where}: {key}: log_uniform_values needs min > 0")
    if distribution == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
        raise SpaceError(f"{where}: {key}: int_uniform needs integer min and max")
    q = table.get("q")
    if distribution == "q_uniform" and not (isinstance(q, (int, float)) and q > 0):
        raise SpaceError(f"{where}: {key}: q_uniform needs a positive q")
    return Parameter(key, distribution, low, high, q, when=dict(when))


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and check a space file against the sweep's base config."""
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpaceError(f"{where}: no such space file") from None
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{where}: not valid TOML: {err}") from None
    tables = data.get("parameters")
    if not isinstance(tables, dict) or not tables:
        raise SpaceError(f"{where}: no [parameters.\"section.key\"] tables")
    params = []
    for key, table in tables.items():
        if key.count(".") != 1:
            raise SpaceError(f"{where}: {key!r}: expected a config key as section.key, e.g. optim.lr_gen")
        param = _parameter(key, table, where)
        for value in param.extremes():
            try:
                replace(base, **as_overrides({key: value}))
            except ConfigError as err:
                raise SpaceError(f"{where}: {key} = {value!r} is not a valid setting: {err}") from None
        for cond_key, cond_value in param.when.items():
            earlier = {p.key: p for p in params}
            if cond_key not in earlier:
                raise SpaceError(f"{where}: {key}: when refers to {cond_key!r}, which is not searched before it")
            if earlier[cond_key].distribution == "values" and cond_value not in earlier[cond_key].values:
                raise SpaceError(f"{where}: {key}: when {cond_key} = {cond_value!r}, which it never takes")
        params.append(param)
    return SearchSpace(tuple(params), where)
