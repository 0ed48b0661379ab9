"""Calibration (`evomerge fitness calibrate CONFIG`): from full-split answers to a compressed fitness.

1. Score the calibration population on the *whole* fitness split of every task: the endpoint
   models (rows 0..K: the base, then each expert alone) and random task-level merges (the rest:
   random weights, and densities for sparsifying methods, through the in-memory materializer).
2. Keep the response matrix (models x items) per task (`responses.npz` beside the fitness).
3. Per task: fit a 2PL IRT model, choose n items (`informative`, `random` or tinyBenchmarks-style
   `anchors`), read the endpoints' abilities, and fit the mixing weights of gp-IRT / gmp-IRT on the
   random merges only -- they look like the candidates a search scores, the endpoints do not
   (`CompressedEstimator.fit(mixing_rows=...)`).
4. Save everything as a `CompressedFitness` under `fitness/<name>/`.

Defaults, as measured by benchmarks/fitness_estimation.py on the small zoo (3 tasks x 1,000
fitness items, i.e. the validation splits; 2-3 s to score one model on all of them) against 64
held-out random merges at n = 20 items per task; chosen on an earlier zoo build (content 9e59f74b),
re-measured on two later ones (dcbc5c71, whose sorting expert differs, and the current 1ed036dd,
trained in bfloat16; benchmarks/RESULTS.md holds the current one, its git history the others): the
three numbers in each triple, in that order:

* 10 random merges (14 models with the endpoints; ~30-40 s of scoring). That keeps the item
  evaluations per candidate 20.8x below the full splits once the calibration is amortised over a
  500-candidate search (14 x 3,000 / 500 + 60 = 144 against 3,000); 12 or more merges fall below
  20x. MAE of the best estimator with 6 / 8 / 10 / 16 / 24 / 64 merges: 0.052 / 0.032 / 0.028 /
  0.025 / 0.022 / 0.022, then 0.054 / 0.034 / 0.029 / 0.026 / 0.022 / 0.020, then 0.051 / 0.043 /
  0.036 / 0.023 / 0.023 / 0.020: on the current build 10 merges are short of MAE 0.03 and 16 are
  the better choice when accuracy matters more than the last 3x of savings.
* `anchors` subsets (tinyBenchmarks-style clusters on the IRT parameters, each anchor weighted
  by its cluster): MAE 0.028 / 0.030 / 0.036 and Spearman 0.94 / 0.90 / 0.92, against 0.040 / 0.039
  / 0.040 and 0.86 / 0.86 / 0.85 for random and 0.068 / 0.085 / 0.090 and 0.90 / 0.89 / 0.87 for
  `informative` (D-optimal), which was best on an earlier zoo with 300-item splits.
* a two-dimensional joint-MAP 2PL (`2pl-jmap`, `dims: 2`) with the empirical ability prior: MAE
  0.028 / 0.030 / 0.036 against 0.033 / 0.034 / 0.037 with one dimension (0.032 / 0.029 / 0.038
  with the standard N(0, 1) prior); ~0.1 s per fit. Girth's marginal likelihood (`irt.model: 2pl`,
  one dimension) took 65-150 s per 300-item fit on the earlier zoo for the same MAE as the joint MAP.
* mixing weights by 5-fold cross-validation on the random merges (~1.5 s in all; the in-sample
  bias-variance rule was worse on every subset method).
* estimator gp-IRT (`estimators.DEFAULT_ESTIMATOR`): MAE 0.0283 / 0.0302 / 0.0364 and Spearman
  0.940 / 0.902 / 0.920; gmp-IRT 0.0286 / 0.0292 / 0.0370 and 0.935 / 0.905 / 0.915 -- the same
  within the spread of zoo builds. gp-IRT is the simpler estimator: it needs no endpoint abilities,
  so it also serves a fitness calibrated without endpoint models, where gmp-IRT cannot run; and
  on random 20-item subsets of the current build it is the better of the two (0.0396 / 0.854
  against 0.0428 / 0.807).

For the thorough version raise `calibration.random_merges` (16-24: MAE ~0.022-0.026, at 13-17x
fewer item evaluations) and try `irt.model: 2pl`.

Config (YAML; relative paths, preset files included, resolve against the file's folder; see
fitness/examples/zoo_small_calibration.yaml):
```yaml
name: zoo_small
fitness_dir: .                        # save as ./zoo_small beside this file (default: fitness/zoo_small)
models: {base: ../zoo/small/models/base, experts: [../zoo/small/models/addition, ...]}
tasks:
  - {preset: zoo_addition, dataset: {path: ../zoo/small/tasks/addition}}
calibration: {random_merges: 10, method: task_arithmetic, weight: [0.0, 1.5], density: [0.2, 1.0], seed: 0}
subset: {n: 20, method: random, seed: 0}    # the default; or anchors (features: irt | correctness), or informative
irt: {model: 2pl-jmap, dims: 2, prior: empirical}   # or {model: 2pl, dims: 1} (girth's MML; minutes per fit)
mixing: {method: cv, folds: 5}        # or {method: bias-variance} (in-sample, no refits)
estimator: gp-IRT                     # or subset, p-IRT, mp-IRT, gmp-IRT
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
from evomerge.fitness.estimators import DEFAULT_ESTIMATOR, ESTIMATORS, CompressedEstimator
from evomerge.fitness.irt import fit_irt
from evomerge.fitness.subsets import select_items
from evomerge.fitness.tasks import TaskError, TaskSpec, dataset_hash, load_task

DEFAULT_RANDOM_MERGES = 10
# random, not anchors (issue 16, item 5; benchmarks/RESULTS.md, "Fitness cost at equal item
# evaluations"): at the demo's budget gp-IRT on random items has the lower error on both zoos, on
# held-out merges (small 0.025 vs 0.034, medium 0.026 vs 0.035) and on per-layer search candidates
# (0.029 vs 0.059, 0.028 vs 0.034), and ranks all candidates better; anchors ranked the small zoo's
# top decile better (0.71 vs 0.59), the medium zoo's worse (0.58 vs 0.78)
DEFAULT_SUBSET_METHOD = "random"
DEFAULT_IRT_MODEL = "2pl-jmap"
DEFAULT_IRT_DIMS = 2
DEFAULT_FOLDS = 5


def default_dims(irt_model: str, dims: int | None) -> int:
    """IRT dimensions when none are given: DEFAULT_IRT_DIMS for the joint MAP, 1 for girth's 2PL."""
    if dims is not None:
        return dims
    return DEFAULT_IRT_DIMS if irt_model == "2pl-jmap" else 1


class _Models(Strict):
    base: str
    experts: list[str] = Field(min_length=1)
    allow_pickle: bool = False


class _TaskEntry(Strict):
    preset: str
    dataset: dict[str, Any] | None = None
    splits: dict[str, str] | None = None


class _Calibration(Strict):
    random_merges: int = Field(default=DEFAULT_RANDOM_MERGES, ge=0)
    method: str = "task_arithmetic"
    weight: tuple[float, float] = (0.0, 1.5)
    density: tuple[float, float] = (0.2, 1.0)
    seed: int = 0


class _Subset(Strict):
    n: int = Field(default=20, ge=1)
    method: Literal["random", "anchors", "informative"] = DEFAULT_SUBSET_METHOD
    features: Literal["irt", "correctness"] = "irt"
    seed: int = 0


class _IRT(Strict):
    model: Literal["2pl", "2pl-jmap"] = DEFAULT_IRT_MODEL
    dims: int | None = Field(default=None, ge=1)  # None: DEFAULT_IRT_DIMS for 2pl-jmap, 1 for girth's 2pl
    prior: Literal["empirical", "standard"] = "empirical"


class _Mixing(Strict):
    method: Literal["cv", "bias-variance"] = "cv"
    folds: int = Field(default=DEFAULT_FOLDS, ge=2)


class CalibrationConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: _Models
    tasks: list[_TaskEntry] = Field(min_length=1)
    calibration: _Calibration = Field(default_factory=_Calibration)
    subset: _Subset = Field(default_factory=_Subset)
    irt: _IRT = Field(default_factory=_IRT)
    mixing: _Mixing = Field(default_factory=_Mixing)
    estimator: str = DEFAULT_ESTIMATOR
    device: str | None = None
    batch_size: int | None = None
    threads: int | None = Field(default=1, ge=1)
    # Where the fitness is saved (as <fitness_dir>/<name>): relative to this file's folder, as a run
    # config resolves its paths, so a run config beside it names it `fitness/<name>` from any directory.
    fitness_dir: str = DEFAULT_ROOT


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
    config.irt.dims = default_dims(config.irt.model, config.irt.dims)
    if config.irt.dims > 1 and config.irt.model == "2pl":
        raise FitnessError(f"{path}: field `irt.dims`: {config.irt.dims} needs `irt.model: 2pl-jmap` "
                           "(girth's 2pl is unidimensional)")
    from evomerge.merge.recipe import MODEL_PARAMETERS

    if config.calibration.method not in MODEL_PARAMETERS:
        raise FitnessError(f"{path}: field `calibration.method`: unknown merge method {config.calibration.method!r}; "
                           f"valid: {sorted(MODEL_PARAMETERS)}")
    if config.estimator not in ESTIMATORS:
        raise FitnessError(f"{path}: field `estimator`: unknown {config.estimator!r}; valid: {list(ESTIMATORS)}")
    return config, path.resolve().parent


def _absolute(root: Path, p: str) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _is_path(name: str) -> bool:
    """A fitness `name` that is a path rather than a name (the rule run configs use)."""
    return Path(name).is_absolute() or os.sep in name or bool(os.altsep and os.altsep in name)


def calibration_output_path(path: str | os.PathLike, *, name: str | None = None) -> Path:
    """The absolute folder `calibrate_from_config(path, name=name)` saves to.

    `name` as given when it is a path (absolute, or relative to the working directory); otherwise
    `<fitness_dir>/<name or the config's name>`, with the config's `fitness_dir` (default `fitness`)
    relative to the config's folder. A run config in the same folder finds it as `fitness/<name>`.
    """
    config, root = load_calibration_config(path)
    return _output_path(config, root, name)


def _output_path(config: CalibrationConfig, root: Path, name: str | None) -> Path:
    if name and _is_path(name):
        return Path(name).expanduser().resolve()
    return Path(_absolute(root, config.fitness_dir)) / (name or config.name)


def preset_mismatches(fitness: CompressedFitness, config) -> list[str]:
    """What of a calibration config (`load_calibration_config`) a saved fitness was not made with:
    its estimator, and each task's subset method and size (a changed default or preset must not keep
    an old fitness; the models are `CompressedFitness.model_mismatches`)."""
    out = [] if fitness.estimator == config.estimator else [
        f"estimator {fitness.estimator}, the preset's {config.estimator}"]
    for name, task in fitness.tasks.items():
        subset = task.estimator.subset
        n = min(config.subset.n, task.n_total)
        if subset.method != config.subset.method or len(subset.items) != n:
            out.append(f"{name}: subset {subset.method} n={len(subset.items)}, the preset's "
                       f"{config.subset.method} n={n}")
    return out


def calibrate_from_config(path: str | os.PathLike, *, name: str | None = None, out_dir: str | os.PathLike | None = None,
                          overwrite: bool = False, echo=print) -> Path:
    """Calibrate as the config file at `path` describes; saves to `out_dir`, else to
    `calibration_output_path(path, name=name)`. Returns the folder."""
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
        try:
            preset = _absolute(root, entry.preset) if entry.preset.endswith((".yaml", ".yml")) else entry.preset
            tasks.append(load_task(preset, overrides))
        except TaskError as exc:
            raise FitnessError(f"{path}: field `tasks[{i}]` ({entry.preset}): {exc}") from exc
    target = Path(out_dir) if out_dir else _output_path(config, root, name)
    return calibrate(
        tasks,
        _absolute(root, config.models.base),
        [_absolute(root, e) for e in config.models.experts],
        target,
        name=Path(name).name if name else config.name,
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
        empirical_prior=config.irt.prior == "empirical",
        mixing_method=config.mixing.method,
        n_folds=config.mixing.folds,
        estimator=config.estimator,
        device=config.device,
        threads=config.threads,
        allow_pickle=config.models.allow_pickle,
        overwrite=overwrite,
        echo=echo,
    )


def endpoint_coefficients(k: int) -> list[dict]:
    """The endpoint models as task-level merges: the base (all weights 0), then each expert alone."""
    return [{"weight": np.zeros(k)}] + [{"weight": np.eye(k)[i]} for i in range(k)]


def random_task_level_coefficients(k: int, count: int, weight_bounds, density_bounds, seed: int) -> list[dict]:
    """`count` random task-level merges: per-expert weights (and densities) uniform in their bounds."""
    rng = np.random.default_rng(seed)
    return [{"weight": rng.uniform(*weight_bounds, size=k), "density": rng.uniform(*density_bounds, size=k)}
            for _ in range(count)]


def population_scorers(tasks: list[TaskSpec], base: str, experts: list[str], *, device: str | None = None,
                       allow_pickle: bool = False, seed: int = 0, role: str = "fitness"):
    """(materializer, {task: scorer over the whole `role` split}, {task: split}) for scoring merges."""
    from transformers import AutoTokenizer

    from evomerge.merge.materializer import Materializer

    splits = {t.name: t.load_split(role) for t in tasks}
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    materializer = Materializer.from_folders(base, experts, device=device, allow_pickle=allow_pickle, seed=seed)
    scorers = {t.name: t.make_scorer(tokenizer, splits[t.name], device=materializer.device) for t in tasks}
    return materializer, scorers, splits


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
            echo(f"  scored {i + 1}/{len(population)} models ({time.perf_counter() - started:.0f}s)")
    return {task: np.vstack(rows) if rows else np.zeros((0, 0), np.int8) for task, rows in out.items()}


def fit_task_calibration(
    responses: np.ndarray,
    endpoint_rows,
    mixing_rows,
    *,
    n: int,
    subset_method: str = DEFAULT_SUBSET_METHOD,
    features: str = "irt",
    subset_seed: int = 0,
    irt_model: str = DEFAULT_IRT_MODEL,
    irt_dims: int | None = None,
    empirical_prior: bool = True,
    mixing_method: str = "cv",
    n_folds: int = DEFAULT_FOLDS,
    item_params=None,
    folds=None,
) -> CompressedEstimator:
    """One task's calibration from its full response matrix (models, items): IRT, subset, mixing weights.

    The mixing weights are fitted on `mixing_rows` (the random merges: they look like the candidates a search
    scores; the endpoints do not); with `empirical_prior` their abilities also set the ability
    prior (`fit_irt(prior_rows=...)`), and informative subsets are designed for them.
    `item_params` / `folds` reuse fits made earlier (`fit_irt` with the same prior rows,
    `cross_validation_folds`); neither depends on n or the subset.
    """
    y = np.asarray(responses, dtype=np.float64)
    design_rows = np.asarray(mixing_rows if mixing_rows is not None and len(mixing_rows) else range(y.shape[0]))
    params = item_params if item_params is not None else fit_irt(
        y, irt_model, dims=default_dims(irt_model, irt_dims), seed=subset_seed,
        prior_rows=design_rows if empirical_prior else None)
    subset = select_items(n, subset_method, seed=subset_seed, responses=y, item_params=params, features=features,
                          abilities=params.theta[design_rows])
    return CompressedEstimator.fit(y, endpoint_rows, subset, item_params=params, mixing_method=mixing_method,
                                   mixing_rows=mixing_rows, n_folds=n_folds, seed=subset_seed, folds=folds,
                                   empirical_prior=empirical_prior)


def model_fingerprints(base: str, experts: list[str], allow_pickle: bool) -> dict:
    """The calibration models' weights fingerprints: a search reusing this fitness checks them."""
    from evomerge.merge.checkpoint import ModelFolder

    def fingerprint(path: str) -> str:
        with ModelFolder.open(path, allow_pickle=allow_pickle) as folder:
            return folder.weights_fingerprint()

    return {"base": fingerprint(base), "experts": [fingerprint(e) for e in experts]}


def calibrate(
    tasks: list[TaskSpec],
    base: str,
    experts: list[str],
    out_dir: str | os.PathLike,
    *,
    name: str,
    random_merges: int = DEFAULT_RANDOM_MERGES,
    method: str = "task_arithmetic",
    weight_bounds=(0.0, 1.5),
    density_bounds=(0.2, 1.0),
    calibration_seed: int = 0,
    n: int = 20,
    subset_method: str = DEFAULT_SUBSET_METHOD,
    features: str = "irt",
    subset_seed: int = 0,
    irt_model: str = DEFAULT_IRT_MODEL,
    irt_dims: int | None = None,
    empirical_prior: bool = True,
    mixing_method: str = "cv",
    n_folds: int = DEFAULT_FOLDS,
    estimator: str = DEFAULT_ESTIMATOR,
    device: str | None = None,
    threads: int | None = 1,
    allow_pickle: bool = False,
    overwrite: bool = False,
    echo=print,
) -> Path:
    """Score endpoints and random merges on the full fitness splits, fit IRT, pick subsets, save.

    `threads` caps torch's CPU threads while scoring (restored afterwards; None leaves them): on
    a busy 2-core machine one thread scored a small-zoo model in 2.3 s and two took 5-30 s.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to recalibrate")
    if estimator not in ESTIMATORS:
        raise FitnessError(f"unknown estimator {estimator!r}; valid: {list(ESTIMATORS)}")
    irt_dims = default_dims(irt_model, irt_dims)
    started = time.perf_counter()
    fingerprints = model_fingerprints(base, experts, allow_pickle)
    for t in tasks:
        size = len(t.load_split("fitness"))
        if n > size:
            raise FitnessError(f"field `subset.n`: {n} items per task, but task {t.name!r} has {size} items in its "
                               f"fitness split (split {t.splits['fitness']!r}); n = {size} scores the whole split "
                               "(an exact fitness)")
    k = len(experts)
    endpoints = endpoint_coefficients(k)
    population = random_task_level_coefficients(k, random_merges, weight_bounds, density_bounds, calibration_seed)
    endpoint_rows = list(range(len(endpoints)))
    mixing_rows = list(range(len(endpoints), len(endpoints) + len(population)))
    if mixing_method == "cv" and len(mixing_rows) < n_folds:
        echo(f"  {len(mixing_rows)} random merges are too few for {n_folds}-fold cross-validation of the mixing "
             "weights; using mixing_method='bias-variance'")
        mixing_method = "bias-variance"

    materializer, scorers, splits = population_scorers(tasks, base, experts, device=device,
                                                       allow_pickle=allow_pickle, seed=calibration_seed)
    echo(f"calibrating {name}: {len(endpoints)} endpoint models + {random_merges} random {method} merges on "
         + ", ".join(f"{t.name} ({len(splits[t.name])} items)" for t in tasks))
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        responses = score_population(materializer, "task_arithmetic", endpoints, scorers, echo)
        if population:
            randoms = score_population(materializer, method, population, scorers, echo)
            responses = {t: np.vstack([responses[t], randoms[t]]) for t in responses}
    finally:
        torch.set_num_threads(previous_threads)
    scored = time.perf_counter()

    task_fitness = {}
    for t in tasks:
        t0 = time.perf_counter()
        try:
            fitted = fit_task_calibration(
                responses[t.name], endpoint_rows, mixing_rows or None, n=n, subset_method=subset_method,
                features=features, subset_seed=subset_seed, irt_model=irt_model, irt_dims=irt_dims,
                empirical_prior=empirical_prior, mixing_method=mixing_method, n_folds=n_folds)
        except ValueError as exc:
            rates = responses[t.name].mean(axis=1)
            raise FitnessError(f"task {t.name!r}: cannot calibrate ({exc}); the calibration models' accuracies "
                               f"range {rates.min():.3f}..{rates.max():.3f}") from exc
        ids = t.item_ids(splits[t.name])
        task_fitness[t.name] = TaskFitness(t, [ids[i] for i in fitted.subset.items], fitted,
                                           dataset_hash(splits[t.name]), len(ids))
        mixing_weights = {k: round(v, 3) for k, v in fitted.mixing_weights.items()}
        echo(f"  {t.name}: {irt_model} IRT + subset of {n} ({subset_method}) + mixing weights ({mixing_method}) in "
             f"{time.perf_counter() - t0:.1f}s; mixing weights {mixing_weights}")
    meta = {"models": {"base": base, "experts": experts}, "model_fingerprints": fingerprints,
            "calibration_models": len(endpoints) + len(population),
            "method": method,
            "irt": {"model": irt_model, "dims": irt_dims, "prior": "empirical" if empirical_prior else "standard"},
            "mixing": {"method": mixing_method, "folds": n_folds, "rows": "random merges"},
            "seconds": {"scoring": scored - started, "fitting": time.perf_counter() - scored,
                        "total": time.perf_counter() - started},
            "item_evaluations": int(sum(r.size for r in responses.values()))}
    # The raw matrices travel with the fitness, for benchmarks and re-fits (loaded with allow_pickle=False).
    # "mixing_rows" is "lambda_rows" in folders saved before the mixing weights got their name.
    coeffs = np.array([np.concatenate([c["weight"], c.get("density", np.ones(k))]) for c in endpoints + population])
    arrays = {"coefficients": coeffs, "endpoint_rows": np.array(endpoint_rows), "mixing_rows": np.array(mixing_rows),
              **{f"task_{t}": r for t, r in responses.items()}}
    path = CompressedFitness(name, task_fitness, estimator, meta).save(out_dir, overwrite=overwrite, arrays=arrays)
    echo(f"saved {path} in {time.perf_counter() - started:.0f}s "
         f"(scoring {scored - started:.0f}s, fitting {time.perf_counter() - scored:.0f}s)")
    return path
