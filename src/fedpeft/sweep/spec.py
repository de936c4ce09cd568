"""The sweep spec (YAML) and its checks, all before any model loads.

```yaml
base: configs/tiny.yaml          # the experiment config every trial starts from (relative to this file)
overrides: [federation.rounds=2] # key.sub=value applied to the base first (optional)
strategy: grid                   # grid | random | halving
space:                           # config key -> list of values, or one distribution (sweep/space.py)
  training.lr: [0.01, 0.001]
  peft.r: [4, 8]
n_trials: 6                      # random, and halving over random points (halving over the grid without it)
seed: 0                          # of the random points
metric: exact_match              # the task metric (default: the run's headline metric)
select_by: metric                # what ranks trials (best trial, halving promotions): metric | val_loss
halving: {min_rounds: 1, eta: 2, max_rounds: null}
```

Each space key is checked against the config schema with the config's own error machinery (the
nearest valid key is suggested), and every trial's full config is validated before the first trial runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedpeft.config import ConfigError, ExperimentConfig, apply_overrides, build_config
from fedpeft.sweep.space import entry_kind, grid_points, random_points

STRATEGIES = ("grid", "random", "halving")


class HalvingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_rounds: int = Field(1, ge=1, description="r0: federated rounds of the first (screening) rung.")
    eta: int = Field(2, ge=2, description="Reduction factor: each rung keeps the top 1/eta and multiplies rounds by eta.")
    max_rounds: int | None = Field(None, ge=1, description="No rung beyond this many rounds (null: until one trial is left).")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str | None = Field(None, description="Base experiment YAML, relative to the spec file (null: defaults).")
    overrides: list[str] = Field(default_factory=list)
    strategy: str = "grid"
    space: dict[str, Any] = Field(default_factory=dict)
    n_trials: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    metric: str | None = Field(None, description="Task metric (default: the run's headline metric).")
    select_by: Literal["metric", "val_loss"] = "metric"
    halving: HalvingSpec = Field(default_factory=HalvingSpec)

    @model_validator(mode="after")
    def _checks(self) -> "SweepSpec":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: '{self.strategy}' is not a sweep strategy; expected one of "
                             f"{', '.join(STRATEGIES)}")
        if not self.space:
            raise ValueError("space: empty; give at least one config key with its values")
        for key, entry in self.space.items():
            entry_kind(key, entry)
        if self.strategy == "random" and self.n_trials is None:
            raise ValueError("n_trials: strategy random needs the number of trials")
        if self.strategy == "grid" and self.n_trials is not None:
            raise ValueError("n_trials: strategy grid runs the whole product; remove n_trials or use random")
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<spec>"
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {msg}" if item["type"] != "extra_forbidden"
                     else f"unknown key '{key}' (valid keys: {', '.join(SweepSpec.model_fields)})")
    return "invalid sweep spec:\n  " + "\n  ".join(lines)


def _override(key: str, value: Any) -> str:
    # YAML flow style keeps lists and strings intact through config.parse_override
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


class Sweep:
    """A loaded spec: the base config data, the trial points and their validated configs."""

    def __init__(self, spec: SweepSpec, base_data: dict[str, Any], source: str) -> None:
        self.spec, self.base_data, self.source = spec, base_data, source
        self.points = self._points()
        self.configs = [self.config_for(p) for p in self.points]  # every trial checked now

    def _points(self) -> list[dict[str, Any]]:
        spec = self.spec
        if spec.strategy == "grid" or (spec.strategy == "halving" and spec.n_trials is None):
            return grid_points(spec.space)
        return random_points(spec.space, spec.n_trials, spec.seed)

    def config_for(self, point: dict[str, Any], rounds: int | None = None) -> ExperimentConfig:
        """The base config with the point's values (and a rung's rounds) set; config errors name the key."""
        data = json.loads(json.dumps(self.base_data))  # deep copy
        overrides = [_override(k, v) for k, v in point.items()]
        if rounds is not None:
            overrides.append(f"federation.rounds={rounds}")
        try:
            return build_config(apply_overrides(data, overrides))
        except ConfigError as exc:
            raise ConfigError(f"sweep {self.source}, trial {point}:\n{exc}") from None

    def fingerprint(self) -> str:
        """What a resumed sweep must match: the spec and the base config it resolved."""
        blob = json.dumps({"spec": self.spec.model_dump(mode="json"), "base": self.base_data}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_space_keys(space: dict[str, Any], base_data: dict[str, Any]) -> None:
    """Each key must name a config field: set it to its first value and let the config say which key is
    unknown and which valid key is nearest."""
    for key, entry in space.items():
        finite = entry if isinstance(entry, list) else entry.get("choice") if isinstance(entry, dict) else None
        value = finite[0] if finite else next(iter(entry.values()))[0]
        data = json.loads(json.dumps(base_data))
        try:
            build_config(apply_overrides(data, [_override(key, value)]))
        except ConfigError as exc:
            if "unknown key" in str(exc):
                raise ConfigError(f"space: '{key}' is not a config key\n{exc}") from None
            # other errors (a value out of range) are reported per trial, with the trial's point


def load_sweep(path: str | Path, extra_overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep spec; raises ConfigError naming the field before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep spec '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep spec '{path}' must hold a mapping (base, strategy, space, ...)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None
    base_data: dict[str, Any] = {}
    if spec.base is not None:
        base_path = (path.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
        if not base_path.is_file() and Path(spec.base).is_file():
            base_path = Path(spec.base)  # relative to the working directory
        if not base_path.is_file():
            raise ConfigError(f"base: config file '{spec.base}' not found (relative to {path.parent} or the "
                              "working directory)")
        base_data = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
    base_data = apply_overrides(base_data, list(spec.overrides) + list(extra_overrides or []))
    build_config(json.loads(json.dumps(base_data)))  # the base itself is valid
    check_space_keys(spec.space, base_data)
    return Sweep(spec, base_data, str(path))
