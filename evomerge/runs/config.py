"""Run configuration (`evomerge search RUN.yaml`): validated, with errors naming the file and field.

```yaml
name: zoo_ties                      # run folder: <runs_dir>/<name>
models:
  base: ../zoo/small/base           # relative paths resolve against this file's folder
  experts: [../zoo/small/expert_addition, ../zoo/small/expert_reversal]
search_space: ties_per_layer        # preset name or a YAML path
fitness: zoo_small                  # a compressed fitness by name or path (see `evomerge fitness calibrate`)
                                    # or {name: zoo_small, adaptive: {max_items: 60}}: items chosen per candidate
optimizer: {name: nsga2, settings: {pop_size: 16}}
budget: {evaluations: 150, wall_time: null}   # stop at whichever comes first
workers: {backend: ray, num_workers: 2}       # or {backend: inprocess}, or {backend: ray, address: HOST:PORT}
                                              # memory: auto | resident | host | disk (see `evomerge plan`)
                                              # schedule: generations | async (see runs/search.py)
seed: 0
```
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from evomerge._validation import Strict, format_validation_error


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and field."""


class ModelsConfig(Strict):
    base: str
    experts: list[str] = Field(min_length=1)
    allow_pickle: bool = False


class AdaptiveConfig(Strict):
    """`fitness.adaptive`: items chosen per candidate by Fisher information (evomerge/fitness/adaptive.py).
    A field left out takes adaptive.py's default (chosen on validation: benchmarks/adaptive_items.py)."""

    batch_size: int | None = Field(default=None, ge=1)  # items scored at once per task
    max_items: int | None = Field(default=None, ge=1)  # per task and candidate: the budget, in item evaluations
    min_items: int | None = Field(default=None, ge=0)  # before the standard-error rule may stop a task
    se_threshold: float | None = Field(default=None, gt=0)  # stop a task once its accuracy's s.e. is this small
    racing: bool = False  # stop a candidate whose upper bounds cannot reach the Pareto set (fixed when it is handed out)
    z: float | None = Field(default=None, gt=0)  # racing's upper bound: value + z * stderr

    @model_validator(mode="after")
    def _consistent(self):
        self.settings()  # e.g. min_items above max_items: one message naming both
        return self

    def settings(self):
        from evomerge.fitness.adaptive import AdaptiveSettings

        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return AdaptiveSettings(**given)


class FitnessConfig(Strict):
    name: str | None = None  # a compressed fitness by name or path
    calibrate: str | None = None  # a calibration config to run first (then `name` is where it is saved)
    estimator: str | None = None  # None: the estimator the compressed fitness was calibrated to recommend
    adaptive: AdaptiveConfig | None = None  # None: every candidate answers the fitness's fixed subset

    @model_serializer(mode="wrap")
    def _without_default_adaptive(self, handler):
        data = handler(self)  # off by default and then not written: snapshots of older runs stay the same
        if isinstance(data, dict) and data.get("adaptive") is None:
            data.pop("adaptive", None)
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if self.name is None and self.calibrate is None:
            raise ValueError("give `name` (a compressed fitness) or `calibrate` (a calibration config)")
        return self


class OptimizerConfig(Strict):
    name: str
    settings: dict[str, Any] = Field(default_factory=dict)  # passed to the optimizer (pop_size, batch_size, ...)
    # Surrogate pre-screening: propose this many times more candidates and evaluate the surrogate's
    # best. null = the measured default for the optimizer (search.optimizers.PRESCREEN_DEFAULTS); 1 = off.
    prescreen: float | None = Field(default=None, ge=1.0)


class BudgetConfig(Strict):
    evaluations: int | None = Field(default=None, ge=1)
    wall_time: float | None = Field(default=None, gt=0)  # seconds

    @model_validator(mode="after")
    def _some_limit(self):
        if self.evaluations is None and self.wall_time is None:
            raise ValueError("give `evaluations`, `wall_time` (seconds) or both")
        return self


class WorkersConfig(Strict):
    backend: Literal["ray", "inprocess"] = "ray"
    num_workers: int = Field(default=2, ge=1)
    address: str | None = None  # an existing Ray cluster; default starts a local one
    threads_per_worker: int = Field(default=1, ge=1)
    max_retries: int = Field(default=2, ge=0)  # per candidate, after a worker crash
    device: str | None = None  # default: cuda when present, else cpu
    # Where each worker keeps the base and experts (merge.tensor_store): resident on the device, host
    # memory streamed to it, or a disk cache; auto takes the first that fits (`evomerge plan` shows the bytes).
    memory: Literal["auto", "resident", "host", "disk"] = "auto"
    cache_dir: str | None = None  # the disk mode's cache (default: $EVOMERGE_CACHE_DIR or ~/.cache/evomerge)
    # generations: ask a generation, wait for all of it, tell it (results independent of the worker
    # count). async: every free worker gets the next genome at once and each result is told as it
    # arrives (steady state; reproducible from the completion order the log records), for optimizers
    # that take results out of order; the others run generations (see runs/search.py).
    schedule: Literal["generations", "async"] = "generations"

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, device: str | None) -> str | None:
        # Spelling only: a run loaded for analysis on a laptop may name the GPU it ran on;
        # `load_run_config` checks that this machine has it before a search starts.
        from evomerge._device import DeviceError, check_device_name

        try:
            return None if device is None else check_device_name(device)
        except DeviceError as exc:
            raise ValueError(exc.message) from None


class RunConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: ModelsConfig
    search_space: str
    fitness: FitnessConfig
    optimizer: OptimizerConfig
    budget: BudgetConfig
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    seed: int = 0
    runs_dir: str = "runs"
    dtype: str | None = None  # dtype of exported models (default: the base's)

    # -- paths are resolved against the config file's folder when loading
    def resolved(self, root: Path) -> "RunConfig":
        def absolute(p: str) -> str:
            path = Path(p).expanduser()
            return str(path if path.is_absolute() else (root / path).resolve())

        data = self.model_dump()
        data["models"]["base"] = absolute(self.models.base)
        data["models"]["experts"] = [absolute(e) for e in self.models.experts]
        for key in ("search_space",):
            value = data[key]
            if value.endswith((".yaml", ".yml")) or os.sep in value:
                data[key] = absolute(value)
        fit = data["fitness"]
        for key in ("name", "calibrate"):
            value = fit.get(key)
            if value and (os.sep in value or value.endswith((".yaml", ".yml"))):
                fit[key] = absolute(value)
        data["runs_dir"] = absolute(self.runs_dir)
        if self.workers.cache_dir:
            data["workers"]["cache_dir"] = absolute(self.workers.cache_dir)
        return RunConfig.model_validate(data)

    def to_yaml(self) -> str:
        data = self.model_dump()
        if data["workers"]["schedule"] == "generations":  # the default is not written: snapshots of runs
            del data["workers"]["schedule"]                # made before the field existed stay the same
        return yaml.safe_dump(data, sort_keys=False)


def load_run_config(path: str | os.PathLike | dict, *, source: str | None = None, root: Path | None = None) -> RunConfig:
    """Validate a run config from a YAML file or a dict; relative paths resolve against the file's folder."""
    if isinstance(path, dict):
        data, source, root = path, source or "<run config>", root or Path.cwd()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: run config not found")
        source, root = str(path), path.resolve().parent
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None
    if config.workers.device is not None and config.workers.address is None:  # the workers run on this machine
        from evomerge._device import DeviceError, resolve_device

        try:
            resolve_device(config.workers.device)
        except DeviceError as exc:
            raise ConfigError(f"{source}: field `workers.device`: {exc.message}") from None
    return config.resolved(root)
