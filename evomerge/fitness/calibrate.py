"""Calibration (`evomerge fitness calibrate CONFIG`): from full-split answers to a compressed fitness.

1. Score the endpoint models (the base, and each expert alone) and a calibration population of
   random task-level merges (random weights, and densities for sparsifying methods, through the
   in-memory materializer) on the *whole* fitness split of every task.
2. Keep the response matrix (models x items) per task (`responses.npz` beside the fitness).
3. Fit a 2PL IRT model per task, choose n items (`random` or tinyBenchmarks-style `anchors`),
   and fit the estimators' calibration (endpoint abilities, mixing weights).
4. Save everything as a `CompressedFitness` under `fitness/<name>/`.

Config (YAML; relative paths resolve against the file's folder):
```yaml
name: zoo_small
models: {base: ../zoo/small/base, experts: [../zoo/small/addition, ...]}
tasks:
  - {preset: zoo_addition, dataset: {path: ../zoo/small/tasks/addition}}
calibration: {random_merges: 48, method: task_arithmetic, weight: [0.0, 1.5], density: [0.2, 1.0], seed: 0}
subset: {n: 20, method: anchors, features: irt, seed: 0}
irt: {model: 2pl, dims: 1}
estimator: gmp-IRT
```
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError

from evomerge._validation import Strict, format_validation_error
from evomerge.fitness.compressed import DEFAULT_ROOT, CompressedFitness, FitnessError, TaskFitness
from evomerge.fitness.estimators import ESTIMATORS, CompressedEstimator
from evomerge.fitness.irt import fit_irt
from evomerge.fitness.subsets import select_items
from evomerge.fitness.tasks import TaskSpec, dataset_hash, load_task


class _Models(Strict):
    base: str
    experts: list[str] = Field(min_length=1)
    allow_pickle: bool = False


class _TaskEntry(Strict):
    preset: str
    dataset: dict[str, Any] | None = None
    splits: dict[str, str] | None = None


class _Calibration(Strict):
    random_merges: int = Field(default=48, ge=0)
    method: str = "task_arithmetic"
    weight: tuple[float, float] = (0.0, 1.5)
    density: tuple[float, float] = (0.2, 1.0)
    seed: int = 0


class _Subset(Strict):
    n: int = Field(default=20, ge=1)
    method: Literal["random", "anchors"] = "anchors"
    features: Literal["irt", "correctness"] = "irt"
    seed: int = 0


class _IRT(Strict):
    model: Literal["2pl", "2pl-jmap"] = "2pl"
    dims: int = Field(default=1, ge=1)


class CalibrationConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: _Models
    tasks: list[_TaskEntry] = Field(min_length=1)
    calibration: _Calibration = Field(default_factory=_Calibration)
    subset: _Subset = Field(default_factory=_Subset)
    irt: _IRT = Field(default_factory=_IRT)
    estimator: str = "gmp-IRT"
    device: str | None = None
    batch_size: int | None = None


def load_calibration_config(path: str | os.PathLike) -> tuple[CalibrationConfig, Path]:
    path = Path(path)
    if not path.is_file():
        raise FitnessError(f"{path}: calibration config not found")
    try:
        data = yaml.safe_load(path.read_text())
        config = CalibrationConfig.model_validate(data)
    except yaml.YAMLError as exc:
        raise FitnessError(f"{path}: invalid YAML ({exc})") from exc
    except ValidationError as exc:
        raise FitnessError(f"{path}: {format_validation_error(exc)}") from None
    if config.estimator not in ESTIMATORS:
        raise FitnessError(f"{path}: field `estimator`: unknown {config.estimator!r}; valid: {list(ESTIMATORS)}")
    return config, path.resolve().parent


def _absolute(root: Path, p: str) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def calibrate_from_config(path: str | os.PathLike, *, name: str | None = None, out_dir: str | os.PathLike | None = None,
                          overwrite: bool = False, echo=print) -> Path:
    config, root = load_calibration_config(path)
    tasks = []
    for i, entry in enumerate(config.tasks):
        overrides: dict[str, Any] = {}
        if entry.dataset is not None:
            dataset = dict(entry.dataset)
            if "path" in dataset:
                dataset["path"] = _absolute(root, dataset["path"])
            overrides["dataset"] = dataset
        if entry.splits is not None:
            overrides["splits"] = entry.splits
        if config.batch_size:
            overrides["batch_size"] = config.batch_size
        tasks.append(load_task(entry.preset, overrides))
    target = Path(out_dir) if out_dir else Path.cwd() / DEFAULT_ROOT / (name or config.name)
    return calibrate(
        tasks,
        _absolute(root, config.models.base),
        [_absolute(root, e) for e in config.models.experts],
        target,
        name=name or config.name,
        random_merges=config.calibration.random_merges,
        method=config.calibration.method,
        weight_bounds=config.calibration.weight,
        density_bounds=config.calibration.density,
        calibration_seed=config.calibration.seed,
        n=config.subset.n,
        subset_method=config.subset.method,
        features=config.subset.features,
        subset_seed=config.subset.seed,
        irt_model=config.irt.model,
        irt_dims=config.irt.dims,
        estimator=config.estimator,
        device=config.device,
        allow_pickle=config.models.allow_pickle,
        overwrite=overwrite,
        echo=echo,
    )


def random_task_level_coefficients(k: int, count: int, weight_bounds, density_bounds, seed: int) -> list[dict]:
    """`count` random task-level merges: per-expert weights (and densities) uniform in their bounds."""
    rng = np.random.default_rng(seed)
    return [{"weight": rng.uniform(*weight_bounds, size=k), "density": rng.uniform(*density_bounds, size=k)}
            for _ in range(count)]


def score_population(materializer, method: str, population: list[dict], scorers: dict, echo=print) -> dict[str, np.ndarray]:
    """task -> (len(population), items) 0/1 answers on the full split."""
    from evomerge.merge.recipe import MODEL_PARAMETERS

    out = {task: [] for task in scorers}
    started = time.perf_counter()
    for i, coeffs in enumerate(population):
        kwargs = {k: v for k, v in coeffs.items() if k in MODEL_PARAMETERS[method]}
        model = materializer.apply(method, **kwargs)
        for task, scorer in scorers.items():
            out[task].append(np.asarray(scorer(model), dtype=np.int8))
        if (i + 1) % 8 == 0 or i + 1 == len(population):
            echo(f"  scored {i + 1}/{len(population)} calibration models ({time.perf_counter() - started:.0f}s)")
    return {task: np.vstack(rows) for task, rows in out.items()}


def calibrate(
    tasks: list[TaskSpec],
    base: str,
    experts: list[str],
    out_dir: str | os.PathLike,
    *,
    name: str,
    random_merges: int = 48,
    method: str = "task_arithmetic",
    weight_bounds=(0.0, 1.5),
    density_bounds=(0.2, 1.0),
    calibration_seed: int = 0,
    n: int = 20,
    subset_method: str = "anchors",
    features: str = "irt",
    subset_seed: int = 0,
    irt_model: str = "2pl",
    irt_dims: int = 1,
    estimator: str = "gmp-IRT",
    device: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    echo=print,
) -> Path:
    """Score endpoints and random merges on the full fitness splits, fit IRT, pick subsets, save."""
    from transformers import AutoTokenizer

    from evomerge.merge.materializer import Materializer

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to recalibrate")
    started = time.perf_counter()
    splits = {t.name: t.load_split("fitness") for t in tasks}
    for t in tasks:
        if n > len(splits[t.name]):
            raise FitnessError(f"task {t.name!r}: a subset of n={n} items is larger than its fitness split "
                               f"({len(splits[t.name])} items)")
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    materializer = Materializer.from_folders(base, experts, device=device, allow_pickle=allow_pickle,
                                             seed=calibration_seed)
    scorers = {t.name: t.make_scorer(tokenizer, splits[t.name], device=materializer.device) for t in tasks}
    k = len(experts)
    endpoints = [{"weight": np.zeros(k)}] + [{"weight": np.eye(k)[i]} for i in range(k)]
    echo(f"calibrating {name}: {len(endpoints)} endpoint models + {random_merges} random {method} merges on "
         + ", ".join(f"{t.name} ({len(splits[t.name])} items)" for t in tasks))
    responses = score_population(materializer, "task_arithmetic", endpoints, scorers, echo)
    population = random_task_level_coefficients(k, random_merges, weight_bounds, density_bounds, calibration_seed)
    if population:
        randoms = score_population(materializer, method, population, scorers, echo)
        responses = {t: np.vstack([responses[t], randoms[t]]) for t in responses}
    endpoint_rows = list(range(len(endpoints)))

    task_fitness = {}
    for t in tasks:
        y = responses[t.name].astype(np.float64)
        t0 = time.perf_counter()
        params = fit_irt(y, irt_model, dims=irt_dims, seed=subset_seed)
        subset = select_items(n, subset_method, seed=subset_seed, responses=y, item_params=params, features=features)
        fitted = CompressedEstimator.fit(y, endpoint_rows, subset, item_params=params, seed=subset_seed,
                                         lambda_method="cv" if y.shape[0] - len(endpoint_rows) >= 5 else "bias-variance")
        ids = t.item_ids(splits[t.name])
        task_fitness[t.name] = TaskFitness(t, [ids[i] for i in subset.items], fitted, dataset_hash(splits[t.name]),
                                           len(ids))
        echo(f"  {t.name}: IRT fit + subset of {n} ({subset_method}) in {time.perf_counter() - t0:.1f}s; "
             f"lambdas {fitted.lambdas}")
    meta = {"models": {"base": base, "experts": experts}, "calibration_models": len(endpoints) + len(population),
            "method": method, "irt": {"model": irt_model, "dims": irt_dims}, "seconds": time.perf_counter() - started,
            "item_evaluations": int(sum(r.size for r in responses.values()))}
    # The raw matrices travel with the fitness, for benchmarks and re-fits (loaded with allow_pickle=False).
    coeffs = np.array([np.concatenate([c["weight"], c.get("density", np.ones(k))]) for c in endpoints + population])
    arrays = {"coefficients": coeffs, "endpoint_rows": np.array(endpoint_rows),
              **{f"task_{t}": r for t, r in responses.items()}}
    path = CompressedFitness(name, task_fitness, estimator, meta).save(out_dir, overwrite=overwrite, arrays=arrays)
    echo(f"saved {path} in {time.perf_counter() - started:.0f}s")
    return path
