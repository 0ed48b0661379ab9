"""Checks a run passes before anything is written or loaded, and the identity of a run's config.

Everything here fails fast with a one-line error naming the field: the compressed fitness (its
data and the models it was calibrated on), the estimator's name, the Ray cluster's address, a
run folder overlapping the run's inputs, models that fit in no memory mode (`check_memory`).
`results_hash` says which two configs make the same run (everything but where the workers run and
keep the models), so `resume` can refuse a changed config yet accept a new worker address or
memory mode.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from evomerge.runs.config import ConfigError, RunConfig, load_run_config


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------- config identity
def results_hash(config_text: str) -> str:
    """SHA-256 of what decides a run's results: the config snapshot less `workers.address`,
    `workers.memory` and `workers.cache_dir`.

    Where the workers run, and where they keep the models (every memory mode writes the same
    candidates), does not change what they compute, so a resume may point at another Ray cluster or
    machine; every other field (models, space, fitness, optimizer, budget, seed, ...) is fixed."""
    data = yaml.safe_load(config_text) or {}
    for key in ("address", "memory", "cache_dir"):
        (data.get("workers") or {}).pop(key, None)
    return sha256_text(json.dumps(data, sort_keys=True, default=str))


def same_run(meta: dict, config_text: str) -> bool:
    """Does the config snapshot still describe the run its `run.json` (meta) was written for?"""
    if "results_sha256" in meta:
        return meta["results_sha256"] == results_hash(config_text)
    return meta.get("config_sha256") == sha256_text(config_text)  # runs started before the address could change


def source_unchanged(meta: dict, source: str, snapshot: str) -> bool:
    """Does the run config file the run started from still describe the same run?"""
    if "results_sha256" not in meta:
        return sha256_text(Path(source).read_text()) == meta.get("source_sha256")
    try:
        return results_hash(load_run_config(source).to_yaml()) == results_hash(snapshot)
    except ConfigError:
        return False


# ------------------------------------------------------------------------------- checks
def load_fitness(config: RunConfig):
    """The run's CompressedFitness, calibrated first when the config asks for that, loaded once.

    A fitness that exists is checked against the task data on disk (data hashes) and against the
    run's models (weights fingerprints): either changing makes it stale."""
    from evomerge.fitness.compressed import FITNESS_FILE, CompressedFitness, resolve_fitness_path

    fit = config.fitness
    if fit.calibrate:
        from evomerge.fitness.calibrate import calibrate_from_config, calibration_output_path

        # Where calibrating saves (beside the calibration config, or `name`): made once, then reused.
        path = calibration_output_path(fit.calibrate, name=fit.name)
        if not (path / FITNESS_FILE).is_file():
            path = calibrate_from_config(fit.calibrate, name=fit.name)
    else:
        path = resolve_fitness_path(fit.name)
    fitness = CompressedFitness.load(path)  # a stale source-data hash is an error here
    models = config.models
    mismatches = fitness.model_mismatches(models.base, models.experts, allow_pickle=models.allow_pickle)
    if mismatches:
        raise ConfigError(f"field `fitness`: {path} was calibrated on other models than this run's `models` "
                          f"({'; '.join(mismatches)}); recalibrate it for these models "
                          "(`evomerge fitness calibrate CONFIG --overwrite`) or name a fitness made for them")
    check_estimator(config, str(path))
    return fitness


def check_estimator(config: RunConfig, fitness_path: str) -> None:
    from evomerge.fitness.estimators import ESTIMATORS

    name = config.fitness.estimator
    if name is not None and name not in ESTIMATORS:
        raise ConfigError(f"field `fitness.estimator`: unknown estimator {name!r}; valid: {sorted(ESTIMATORS)} "
                          f"(or leave it out for the one {fitness_path} recommends)")


def check_ray_address(config: RunConfig) -> None:
    """An unreachable Ray cluster fails here, in seconds, before anything is written."""
    if config.workers.backend == "ray" and config.workers.address:
        from evomerge.runs.backends import check_ray_address as probe

        probe(config.workers.address)


def check_memory(config: RunConfig, echo=print) -> None:
    """Print the run's memory plan (one block) and refuse, before any model is loaded, models that fit
    in no memory mode on this machine (or not in the one `workers.memory` names), naming the numbers."""
    from evomerge.runs.plan import plan_run

    plan = plan_run(config)
    echo(plan.format())
    if plan.chosen is None and not plan.remote:
        raise ConfigError(str(plan.error()))


def check_run_dir_writable(run_dir: Path) -> None:
    """The run folder (or the nearest folder above it that exists) can be written in."""
    from evomerge.merge.outputs import OutputError, check_can_write

    try:
        check_can_write(run_dir, field="runs_dir")
    except OutputError as exc:
        raise ConfigError(f"field `runs_dir`: {exc.message}") from None


def check_run_dir_is_no_input(run_dir: Path, config: RunConfig, source: str | None) -> None:
    """A run folder must not be, hold, or sit inside one of the run's inputs (`--overwrite` would delete it)."""
    target = run_dir.resolve()
    inputs = {"models.base": config.models.base, "config": source,
              **{f"models.experts[{i}]": e for i, e in enumerate(config.models.experts)}}
    for field_name, value in inputs.items():
        if not value:
            continue
        path = Path(value).resolve()
        if path == target or target in path.parents or path in target.parents:
            raise ConfigError(f"the run folder {run_dir} (`runs_dir`/`name`) overlaps the run's input {field_name} "
                              f"({path}); choose another `runs_dir` or `name`")
