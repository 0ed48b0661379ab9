"""Search quality: which optimizer finds the best merges for a fixed budget of item evaluations.

Two studies, one script:

``zoo`` (issue 14, item 3) -- on a built zoo (``--zoo zoo/small`` or ``zoo/medium``), every
strategy (random, CMA-ES, NSGA-II, M2N2, MAP, or any registered optimizer) searching per-layer
task-arithmetic coefficients with the zoo's compressed fitness, each both *unseeded* and *seeded*
with the same warm-start set (the first ``--warm-start`` task-level corners), against baselines at
matched total item budgets (benchmarks/search_quality_table.py says how each is matched):
(a) the 2^K corners scored on the full validation split, the best chosen; (b) the same optimizers
over one weight per expert (``task_arithmetic_global``); (c) a mergekit-evolve-style run: CMA-ES over
layer groups, fitness = the mean on a fixed random subset of validation items, no IRT; (d) a
Mergenetic-style run: GA over one global TIES weight and density per expert, 20 random items per
task with gp-IRT calibrated on the endpoints only; (e) fixed recipes: uniform task arithmetic,
TIES with mergekit defaults, averaging, each expert, the base.

Item evaluations are counted for everything: calibration, the candidates' subsets, the finalists'
whole-validation re-scoring that chooses a member, the corners' full-split scoring. Two phases:

1. development, with every test split sealed (benchmarks/PROTOCOL.md): the fitnesses, then one job
   per (row, seed) -- search, Pareto set among the first ``budget`` candidates, the chosen member
   (on validation only) -- in a pool of ``--jobs`` processes, one torch thread each;
2. the final step, reading test once: each job's Pareto set and chosen member (and the fixed
   recipes) on the full test splits.

Each job writes its record to ``<results>/<row>/seedNN.json`` (``deterministic.json`` for the
corners and the fixed recipes) the moment it finishes, and the final step adds its ``test`` field;
``--resume`` skips finished jobs and resumes interrupted searches from their checkpoints. The tables
(``--record``: benchmarks/RESULTS.md) are generated from those records only.

    python benchmarks/search_quality.py zoo --zoo zoo/small --seeds 2 --budget 16 --strategies random,map --jobs 2
    python benchmarks/search_quality.py zoo --zoo zoo/medium --seeds 10 --budget 120 --jobs 2 --resume --record

``synthetic`` -- the measurement behind ``evomerge.search.optimizers.PRESCREEN_DEFAULTS``: every
registered optimizer with and without surrogate pre-screening at equal *evaluated* budgets, on
cheap synthetic merge-like objectives: three tasks, each accuracy ``sigmoid(a - s (x - c)' A (x - c))``
with its own optimum ``c`` and a diagonal-plus-rank-2 curvature ``A`` over a ``[0, 1.5]^d`` box
(d = 12 and 36, the per-layer genome sizes of small and mid-size zoos), observed with Gaussian
noise (sd 0.02, fixed per genome; the small zoo's 20-item compressed fitness is noisier, about 0.1
per task, so this is a favourable setting for any surrogate). Hypervolume and
best mean are computed from the *noise-free* accuracies of the observed Pareto set (the analogue of
re-scoring on the test split).

    python benchmarks/search_quality.py synthetic                             # ~40 min on 2 busy cores
    python benchmarks/search_quality.py synthetic --seeds 2 --optimizers random,nsga2 --dims 12
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality_table import (ItemCosts, Row, item_evaluations, plan_budgets, report,  # noqa: E402
                                  study_rows, test_summary)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SPACES = Path(__file__).resolve().parent / "search_spaces"
DEFAULT_STRATEGIES = ("random", "cma", "nsga2", "m2n2", "map")
# Settings per strategy for a 100-200-evaluation search; the rest are library defaults. Warm starts
# are a setting of the row (seeded / unseeded), not of the strategy.
# MAP's terms="auto": the paper's full quadratic needs a design of 2 x (1 + d + d(d+1)/2) points
# (182 for d = 12), more than the whole budget; see MAPOptimizer.
STRATEGY_SETTINGS: dict[str, dict[str, Any]] = {
    "random": {"batch_size": 10},
    "cma": {"batch_size": 10},
    "nsga2": {"pop_size": 20},
    "nsga3": {"pop_size": 20},
    "ga": {"pop_size": 20},
    "de": {"pop_size": 20},
    "twopointsde": {"batch_size": 10},
    "ngopt": {"batch_size": 10},  # budget filled in from --budget
    "m2n2": {"archive_size": 20, "batch_size": 4},
    "map": {"batch_size": 8, "terms": "auto"},
    # localize and stitch: each expert alone in each window of 3 layers, then merges of the kept
    # windows, then MAP (evomerge.search.optimizers._stitch)
    "stitch": {"parts": "windows", "window": 3, "stitches": 20, "batch_size": 8, "inner": "map",
               "inner_settings": {"batch_size": 8, "terms": "auto"}},
}


def strategy_settings(name: str, budget: int, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    settings = {**STRATEGY_SETTINGS.get(name, {}), **(overrides or {}).get(name, {})}
    if name == "ngopt":
        settings["budget"] = budget
    return settings


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """--set STRATEGY.SETTING=VALUE (VALUE as YAML: 40, map, [1, 2]) -> {strategy: {setting: value}}."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, value = item.partition("=")
        strategy, _, setting = name.partition(".")
        if not (strategy and setting and value):
            raise SystemExit(f"--set {item!r}: expected STRATEGY.SETTING=VALUE, e.g. stitch.stitches=40")
        out.setdefault(strategy, {})[setting] = yaml.safe_load(value)
    return out


# =============================================================================== results file
def record_section(key: str, markdown: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section between ``<!-- key:begin -->`` and ``<!-- key:end -->``
    (benchmarks/results_md.py: the one implementation every benchmark uses)."""
    from results_md import record_section as record

    record(key, markdown, path)


def section_key(zoo_size: str, content_hash: str = "") -> str:
    """One RESULTS.md section per zoo: the small zoo's by size; the medium zoo's first recipe (7781c7b3)
    kept its first key, "zoo", and a later medium zoo has its content's own section."""
    if zoo_size != "medium":
        return f"search_quality:{zoo_size}"
    return "search_quality:zoo" if content_hash.startswith("7781c7b3") else f"search_quality:medium_{content_hash[:8]}"


def paired_t(diff: np.ndarray) -> float:
    """Paired t statistic of the differences (inf when they are all equal and non-zero)."""
    diff = np.asarray(diff, dtype=float)
    if len(diff) < 2:
        return float("nan")
    sd = diff.std(ddof=1)
    if sd == 0:
        return 0.0 if diff.mean() == 0 else math.copysign(math.inf, diff.mean())
    return float(diff.mean() / (sd / math.sqrt(len(diff))))


# =============================================================================== synthetic
class SyntheticTasks:
    """Merge-like accuracies: per task ``sigmoid(a - s (x - c)' A (x - c))`` over ``[0, high]^d``.

    ``A = diag(D) + 0.5 U U'`` (D ~ U(0.3, 1), U ~ N(0, 1/d) of rank 2): per-gene curvature plus a
    little coupling, so the diagonal quadratic is close but not exact. ``s`` puts the median random
    genome 1.5 logits below chance at the optimum's ``a = 2.2`` (accuracy ~0.9 at ``c``, ~0.2 at a
    random point). ``observe`` adds noise that is a fixed function of the genome.
    """

    def __init__(self, dim: int, n_tasks: int = 3, seed: int = 0, noise: float = 0.02, high: float = 1.5):
        rng = np.random.default_rng([seed, dim, 7])
        self.dim, self.high, self.noise, self.seed = dim, high, noise, seed
        self.centres = rng.uniform(0.15 * high, 0.85 * high, (n_tasks, dim))  # (T, d)
        D = rng.uniform(0.3, 1.0, (n_tasks, dim))
        U = rng.normal(0.0, 1.0, (n_tasks, dim, 2)) / np.sqrt(dim)
        self.A = 0.5 * np.einsum("tij,tkj->tik", U, U) + np.eye(dim)[None] * D[:, None, :]  # (T, d, d)
        self.peak = np.full(n_tasks, 2.2)
        probe = rng.uniform(0.0, high, (512, dim))
        self.scale = (self.peak + 1.5) / np.median(self._quadratic(probe), axis=0)  # (T,)

    def _quadratic(self, X: np.ndarray) -> np.ndarray:
        Y = X[:, None, :] - self.centres[None]  # (n, T, d)
        return np.einsum("nti,tij,ntj->nt", Y, self.A, Y)

    def true(self, X: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.peak - self.scale * self._quadratic(np.atleast_2d(X)))))  # (n, T)

    def observe(self, X: np.ndarray) -> np.ndarray:
        P = self.true(X)
        noise = np.stack([np.random.default_rng([self.seed, *np.frombuffer(x.tobytes(), np.uint32)])
                          .normal(0.0, self.noise, P.shape[1]) for x in np.atleast_2d(X)])
        return np.clip(P + noise, 0.0, 1.0)


def synthetic_run(name: str, dim: int, seed: int, factor: float | None, budget: int,
                  screen_settings: dict | None = None) -> dict[str, float]:
    from evomerge.search.pareto import hypervolume, non_dominated_mask
    from evomerge.search.optimizers import make_prescreened

    problem = SyntheticTasks(dim, seed=seed)
    started = time.perf_counter()
    opt = make_prescreened(name, dim, (0.0, problem.high), 3, seed=seed, factor=factor or 1,
                           screen_settings=screen_settings, **strategy_settings(name, budget))
    X_all, F_all = [], []
    while opt.n_evaluations < budget:
        X = opt.ask()
        F = problem.observe(X)
        opt.tell(X, F)
        X_all.append(X)
        F_all.append(F)
    X, F = np.vstack(X_all)[:budget], np.vstack(F_all)[:budget]  # equal budgets: drop any overshoot
    front = problem.true(X[non_dominated_mask(F)])  # the observed Pareto set, re-scored without noise
    return {"hv": hypervolume(front), "best_mean": float(front.mean(axis=1).max()),
            "seconds": time.perf_counter() - started}


def synthetic_main(args: argparse.Namespace) -> None:
    from evomerge.search.optimizers import OPTIMIZERS

    names = args.optimizers.split(",") if args.optimizers else list(OPTIMIZERS)
    dims = [int(d) for d in args.dims.split(",")]
    screen = {"screened_out": args.screened_out} if args.screened_out else None
    rows = []
    print(f"synthetic: {len(names)} optimizers x dims {dims} x {args.seeds} seeds, budget {args.budget}, "
          f"factor {args.factor} vs off", flush=True)
    for name in names:
        for dim in dims:
            for seed in range(args.seeds):
                off = synthetic_run(name, dim, seed, None, args.budget)
                on = synthetic_run(name, dim, seed, args.factor, args.budget, screen)
                rows.append({"optimizer": name, "dim": dim, "seed": seed, "off": off, "on": on})
                print(f"  {name:12s} d={dim:2d} seed={seed}  hv {off['hv']:.3f} -> {on['hv']:.3f}   "
                      f"best mean {off['best_mean']:.3f} -> {on['best_mean']:.3f}   "
                      f"({off['seconds']:.0f}s, {on['seconds']:.0f}s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    table, verdicts = synthetic_table(rows, args)
    print(table)
    print("PRESCREEN_DEFAULTS = {" + ", ".join(
        f"{n!r}: {args.factor if v else None}" for n, v in verdicts.items()) + "}")
    if args.record:
        record_section("search_quality:synthetic", table)


def synthetic_table(rows: list[dict], args: argparse.Namespace) -> tuple[str, dict[str, bool]]:
    from evomerge.search.optimizers import OPTIMIZERS

    lines = [
        f"### Surrogate pre-screening on synthetic merge objectives (factor {args.factor}, budget "
        f"{args.budget} evaluated, dims {args.dims}, {args.seeds} seeds, paired)",
        "",
        "`python benchmarks/search_quality.py synthetic` -- noise-free hypervolume / best mean of the observed "
        "Pareto set. Helped = the primary metric (hypervolume for multi-objective optimizers, best mean for "
        "single-objective ones) improved with paired t >= 2 and the other metric did not fall (t > -2).",
        "",
        "| optimizer | hv off | hv on | Δhv (t) | best mean off | on | Δ (t) | helped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        sel = [r for r in rows if r["optimizer"] == name]
        hv = np.array([[r["off"]["hv"], r["on"]["hv"]] for r in sel])
        bm = np.array([[r["off"]["best_mean"], r["on"]["best_mean"]] for r in sel])
        t_hv, t_bm = paired_t(hv[:, 1] - hv[:, 0]), paired_t(bm[:, 1] - bm[:, 0])
        single = OPTIMIZERS[name].single_objective
        primary, secondary = (t_bm, t_hv) if single else (t_hv, t_bm)
        helped = bool(primary >= 2 and not secondary <= -2)
        verdicts[name] = helped
        lines.append(
            f"| {name}{' (SO)' if single else ''} | {hv[:, 0].mean():.3f} | {hv[:, 1].mean():.3f} | "
            f"{(hv[:, 1] - hv[:, 0]).mean():+.3f} ({t_hv:+.1f}) | {bm[:, 0].mean():.3f} | {bm[:, 1].mean():.3f} | "
            f"{(bm[:, 1] - bm[:, 0]).mean():+.3f} ({t_bm:+.1f}) | {'yes' if helped else 'no'} |")
    return "\n".join(lines) + "\n", verdicts


# =============================================================================== zoo: fitnesses
def quiet(*args, **kwargs) -> None:
    pass


def _calibrated(manifest, work: Path, name: str, settings: dict[str, Any]) -> Path:
    """A compressed fitness calibrated from a config written beside it; reused when it loads."""
    import yaml

    from evomerge.fitness.calibrate import calibrate_from_config
    from evomerge.fitness.compressed import CompressedFitness, FitnessError

    target = work / "fitness" / name
    if target.exists():
        try:
            CompressedFitness.load(target)
            print(f"compressed fitness: reusing {target}", flush=True)
            return target
        except FitnessError as exc:
            print(f"compressed fitness: {exc}; recalibrating", flush=True)
    config = {"name": name,
              "models": {"base": str(manifest.base_path), "experts": [str(p) for p in manifest.expert_paths]},
              "tasks": [{"preset": manifest.task_preset(t), "dataset": {"path": str(manifest.task_path(t))}} for t in manifest.tasks],
              **settings}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"compressed fitness: calibrating {target} from {path}", flush=True)
    return calibrate_from_config(path, out_dir=target, overwrite=True, echo=quiet)


# The subsets of the studies committed before 2026-11-30 (the small zoo's and the 7781c7b3 medium
# zoo's): anchors, the library's default when they ran. A study folder without a `subset_method`
# is one of those, and is resumed or reported with anchors; new studies take the library's default
# (random items since issue 16), the fitness the recommended configuration runs with.
LEGACY_SUBSET_METHOD = "anchors"


def main_fitness(manifest, work: Path, subset: int, random_merges: int | None, method: str) -> Path:
    """The searched rows' fitness: the calibration defaults (endpoints + random merges, gp-IRT) with
    `subset` items per task chosen by `method`."""
    from evomerge.fitness.calibrate import DEFAULT_IRT_DIMS, DEFAULT_RANDOM_MERGES

    merges = DEFAULT_RANDOM_MERGES if random_merges is None else random_merges
    name = (f"zoo_{manifest.size}_{manifest.content_hash[:8]}_bench_r{merges}_n{subset}_{method}"
            f"_d{DEFAULT_IRT_DIMS}")
    return _calibrated(manifest, work, name, {
        "calibration": {"random_merges": merges, "method": "task_arithmetic", "weight": [0.0, 1.5],
                        "density": [0.2, 1.0], "seed": 0},
        "subset": {"n": subset, "method": method, "seed": 0}})  # the rest: `evomerge fitness calibrate` defaults


def study_subset_method(results: Path, asked: str | None) -> str:
    """The searched rows' subset method: as asked, else the study folder's (a study from before the
    setting existed: anchors), else the library's default."""
    from evomerge.fitness.calibrate import DEFAULT_SUBSET_METHOD

    path = results / "study.json"
    saved = json.loads(path.read_text()).get("subset_method", LEGACY_SUBSET_METHOD) if path.is_file() else None
    return asked or saved or DEFAULT_SUBSET_METHOD


def mergenetic_fitness(manifest, work: Path, items: int) -> Path:
    """Mergenetic-style (MERGE^3): only the base and the experts scored on the whole validation
    split, `items` random items per task, gp-IRT. With no random merges evomerge sets the mixing
    weight by its in-sample bias-variance rule on the endpoints (Mergenetic hard-codes 0.5)."""
    name = f"zoo_{manifest.size}_{manifest.content_hash[:8]}_mergenetic_endpoints_n{items}_random"
    return _calibrated(manifest, work, name, {
        "calibration": {"random_merges": 0, "method": "task_arithmetic", "seed": 0},
        "subset": {"n": items, "method": "random", "seed": 0},
        "mixing": {"method": "bias-variance"}, "estimator": "gp-IRT"})


def random_subset_fitness(manifest, work: Path, main_path: Path, items: int) -> Path:
    """mergekit-evolve-style: the plain mean over a fixed random subset of `items` validation items
    per task (seed 0), with no calibration at all. A `CompressedFitness` whose estimator is
    'subset' (the subset's mean); its item parameters are zero placeholders that 'subset' never
    reads, so nothing is scored to build it (0 item evaluations)."""
    from evomerge.fitness.calibrate import model_fingerprints
    from evomerge.fitness.compressed import CompressedFitness, FitnessError, TaskFitness
    from evomerge.fitness.estimators import CompressedEstimator
    from evomerge.fitness.irt import IRTParams
    from evomerge.fitness.subsets import select_items
    from evomerge.fitness.tasks import dataset_hash

    name = f"zoo_{manifest.size}_{manifest.content_hash[:8]}_mergekit_random_n{items}"
    target = work / "fitness" / name
    if target.exists():
        try:
            CompressedFitness.load(target)
            return target
        except FitnessError:
            pass
    main = CompressedFitness.load(main_path)
    tasks = {}
    for t, tf in main.tasks.items():
        split = tf.task.load_split("fitness")
        ids = tf.task.item_ids(split)
        subset = select_items(min(items, len(ids)), "random", seed=0, n_items=len(ids))
        zeros = np.zeros(len(ids))
        estimator = CompressedEstimator(IRTParams(zeros, zeros, np.zeros(1)), subset, None, {}, mixing_method="none")
        tasks[t] = TaskFitness(tf.task, [ids[i] for i in subset.items], estimator, dataset_hash(split), len(ids))
    meta = {"models": main.meta["models"], "item_evaluations": 0, "calibration_models": 0,
            "model_fingerprints": model_fingerprints(str(manifest.base_path), [str(p) for p in manifest.expert_paths],
                                                      False),
            "note": "random subset, estimator 'subset' (plain mean); no IRT: placeholder item parameters"}
    return CompressedFitness(name, tasks, "subset", meta).save(target, overwrite=True)


# =============================================================================== zoo: jobs
def validation_items(fitness) -> tuple[int, int]:
    """(items of every task's whole fitness split, the smallest task's)."""
    sizes = [len(fitness.task(t).task.load_split("fitness")) for t in fitness.task_names]
    return sum(sizes), min(sizes)


def record_path(results: Path, row: Row, seed: int | None) -> Path:
    return results / row.key / ("deterministic.json" if seed is None else f"seed{seed:02d}.json")


def write_record(path: Path, record: dict) -> None:
    from evomerge._atomic import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def run_config(spec: dict):
    """The run config of one searched (row, seed); warm starts are the space's first corners."""
    from evomerge.runs.config import load_run_config
    from evomerge.runs.problem import bind_space

    row, seed = Row(**spec["row"]), spec["seed"]
    settings = strategy_settings(row.optimizer, row.candidates, spec.get("strategy_settings"))
    data = {"name": f"{row.key}_s{seed}", "models": spec["models"], "search_space": row.space,
            "fitness": {"name": spec["fitness"][row.fitness], "estimator": row.estimator},
            "optimizer": {"name": row.optimizer, "settings": settings, "prescreen": spec["prescreen"][row.key]},
            "budget": {"evaluations": row.candidates},
            "workers": {"backend": "inprocess", "threads_per_worker": 1, "device": spec["device"]},
            "seed": seed, "runs_dir": spec["runs_dir"]}
    config = load_run_config(data, root=Path(spec["runs_dir"]))
    if row.seeded:
        bound = bind_space(config)
        seeds = bound.corner_genomes(spec["warm_start"])
        if spec.get("warm_start_windows") and row.family == "per-layer":  # + each expert alone in each window
            seeds = np.vstack([seeds, bound.window_genomes(spec["warm_start_windows"])])
        data["optimizer"]["settings"]["initial_genomes"] = seeds.tolist()
        config = load_run_config(data, root=Path(spec["runs_dir"]))
    return config


def refuse_other_optimizer(path: Path, config) -> None:
    """A run folder of the same row and seed left by a study with other optimizer settings (another
    warm start, say) must not be resumed as this study's: it would silently stand for it."""
    from evomerge.runs.run import Run
    from evomerge.runs.store import RunStoreError

    try:
        saved = Run.load(path).config.optimizer.model_dump()
    except (RunStoreError, OSError, ValueError):  # unreadable: the caller restarts it, as before
        return
    if saved != config.optimizer.model_dump():
        raise RuntimeError(f"{path}: a run with other optimizer settings (warm start, strategy settings) is there; "
                           "give this study its own --work folder")


def search_job(spec: dict) -> dict:
    """Development step of one searched (row, seed): search (resumed if interrupted), its Pareto set
    among the first `candidates` evaluations, the member it chooses on validation. No test split."""
    from evomerge.runs.run import Run
    from evomerge.runs.search import resume_search, start_search
    from evomerge.runs.store import RunStoreError
    from evomerge.search.pareto import non_dominated_mask

    row, seed = Row(**spec["row"]), spec["seed"]
    config = run_config(spec)
    path = Path(config.runs_dir) / config.name
    started = time.perf_counter()
    resumed = (path / "run.json").is_file()
    if resumed:
        refuse_other_optimizer(path, config)
    try:
        path = resume_search(path, progress=False, echo=quiet) if resumed else None
    except RunStoreError:
        path = None
    if path is None:
        path = start_search(config, overwrite=True, progress=False, echo=quiet)
    seconds_search = time.perf_counter() - started
    run = Run.load(path)
    tasks = run.tasks
    # Equal budgets: a generation may overshoot the budget (NSGA-II's 20 at a time); only the
    # first `candidates` evaluations count.
    evaluations = run.evaluations
    evaluations = evaluations[evaluations.index < row.candidates]
    ok = evaluations[evaluations["status"] == "ok"]
    F = ok[tasks].to_numpy(dtype=float)  # (n, tasks) fitness estimates
    front = non_dominated_mask(F)
    ids = [int(i) for i in ok.index[front]]
    by_fitness = [ids[j] for j in np.lexsort((F[front].min(axis=1), F[front].mean(axis=1)))[::-1]]
    started = time.perf_counter()
    if row.finalists:  # `Run.choose`: the best finalists by fitness, re-scored on the whole validation split
        chosen = run.choose(row.finalists, among=ids, echo=quiet)
        finalists = min(row.finalists, len(ids))
        validation = run.verified()["fitness"][str(chosen)]
    else:  # mergekit-evolve / Mergenetic take their best fitness
        chosen, finalists, validation = by_fitness[0], 0, None
    record = {
        "row": row.key, "seed": seed, "run": str(path), "resumed": resumed,
        "candidates": int(len(evaluations)), "failed": int((evaluations["status"] != "ok").sum()),
        "pareto_ids": ids, "chosen_id": int(chosen),
        "chosen_fitness": {t: float(ok.loc[chosen, t]) for t in tasks},
        "chosen_validation": validation, "finalists": finalists,
        "item_evaluations": item_evaluations(calibration=spec["calibration_items"][row.fitness],
                                             search=int(evaluations["item_evaluations"].sum()),
                                             finalists=finalists * spec["validation_items"]),
        "seconds": {"search": seconds_search, "choose": time.perf_counter() - started},
    }
    write_record(Path(spec["path"]), record)
    return record


def _materializer_and_tasks(spec: dict, role: str):
    from evomerge.fitness.calibrate import population_scorers
    from evomerge.fitness.compressed import CompressedFitness

    fitness = CompressedFitness.load(spec["fitness"]["main"])
    tasks = [fitness.task(t).task for t in fitness.task_names]
    materializer, scorers, _ = population_scorers(tasks, spec["models"]["base"], spec["models"]["experts"],
                                                  device=spec["device"], role=role)
    return materializer, scorers, fitness.task_names


def corners_job(spec: dict) -> dict:
    """Baseline (a), development step: every expert subset at weight 1 on the whole validation
    split; the best validation mean (the worst task breaking ties) is chosen."""
    import itertools

    from evomerge.fitness.calibrate import score_population
    from evomerge.search.pareto import non_dominated_mask

    started = time.perf_counter()
    materializer, scorers, tasks = _materializer_and_tasks(spec, "fitness")
    K = len(spec["models"]["experts"])
    weights = [list(w) for w in itertools.product((0.0, 1.0), repeat=K)]
    responses = score_population(materializer, "task_arithmetic", [{"weight": np.array(w)} for w in weights],
                                 scorers, echo=quiet)
    V = np.stack([responses[t].mean(axis=1) for t in tasks], axis=1)  # (2^K, tasks) validation accuracy
    chosen = int(np.lexsort((V.min(axis=1), V.mean(axis=1)))[-1])
    record = {"row": "corners", "seed": None, "weights": weights, "candidates": len(weights),
              "validation": [dict(zip(tasks, map(float, v))) for v in V],
              "pareto_ids": [int(i) for i in np.flatnonzero(non_dominated_mask(V))], "chosen_id": chosen,
              "item_evaluations": item_evaluations(full_split=sum(int(r.size) for r in responses.values())),
              "seconds": {"score": time.perf_counter() - started}}
    write_record(Path(spec["path"]), record)
    return record


def test_job(spec: dict) -> dict:
    """The final step for one record: its Pareto set and chosen member on the full test splits."""
    record = json.loads(Path(spec["path"]).read_text())
    started = time.perf_counter()
    if spec["test_of"] == "search":
        from evomerge.runs.run import Run

        run = Run.load(record["run"])
        members = _members_to_test(record, run.evaluations.loc[record["pareto_ids"], run.tasks].mean(axis=1),
                                   spec.get("pareto_test_cap", 0))
        test = run.verify(members, role="test", echo=quiet)
        tasks = run.tasks
    else:  # the corners
        materializer, scorers, tasks = _materializer_and_tasks(spec, "test")
        test = {}
        members = record["pareto_ids"]
        for i in members:
            model = materializer.apply("task_arithmetic", weight=np.array(record["weights"][i]))
            test[str(i)] = {t: float(np.mean(scorer(model))) for t, scorer in scorers.items()}
    record["test"] = {**test_summary(test, members, record["chosen_id"], tasks), "members": test,
                      "pareto_size_full": len(record["pareto_ids"]), "seconds": time.perf_counter() - started}
    write_record(Path(spec["path"]), record)
    return record


def _members_to_test(record: dict, fitness_mean, cap: int) -> list[int]:
    """The Pareto members the final step scores: all of them, or with `cap`, the chosen member and
    the best `cap - 1` others by fitness mean (a Mergenetic-style front of hundreds of members
    would cost more test scoring than all other rows together); the same rule for every row."""
    ids = [int(i) for i in record["pareto_ids"]]
    if not cap or len(ids) <= cap:
        return ids
    chosen = int(record["chosen_id"])
    ranked = [int(i) for i in fitness_mean.sort_values(ascending=False, kind="stable").index if int(i) != chosen]
    return [chosen] + ranked[: cap - 1]


def fixed_test_job(spec: dict) -> list[dict]:
    """Baseline (e), the final step: each fixed recipe on the full test splits (nothing is chosen)."""
    from evomerge.merge.recipe import MODEL_PARAMETERS

    materializer, scorers, tasks = _materializer_and_tasks(spec, "test")
    out = []
    for row_json, path in zip(spec["rows"], spec["paths"]):
        row = Row(**row_json)
        method, params = row.recipe["method"], row.recipe["params"]
        started = time.perf_counter()
        model = materializer.apply(method, **{k: np.array(v) for k, v in params.items() if k in MODEL_PARAMETERS[method]})
        test = {"0": {t: float(np.mean(scorer(model))) for t, scorer in scorers.items()}}
        record = {"row": row.key, "seed": None, "recipe": row.recipe, "pareto_ids": [0], "chosen_id": 0,
                  "item_evaluations": item_evaluations(),
                  "test": {**test_summary(test, [0], 0, tasks), "members": test,
                           "seconds": time.perf_counter() - started}}
        write_record(Path(path), record)
        out.append(record)
    return out


JOBS = {"search": search_job, "corners": corners_job, "test": test_job, "fixed": fixed_test_job}
_SEAL = None


def exit_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """End this process soon after `parent` ends. A study killed without a chance to clean up
    (SIGTERM, SIGKILL) would otherwise leave its pool processes running their searches and holding
    the run folders' locks, and `--resume` would refuse those folders until they finished."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)  # the run's lock is left stale; the next resume takes it over

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(seal_reason: str | None) -> None:
    """A pool process: one torch thread, warnings off, and in the development phase every test
    split sealed for the process's lifetime (the seal is per process)."""
    global _SEAL
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_with_parent(os.getppid())
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if seal_reason:
        from evomerge.fitness.sealed import sealed_test

        _SEAL = sealed_test(seal_reason)
        _SEAL.__enter__()


def _run_job(spec: dict):
    return JOBS[spec["kind"]](spec)


def run_jobs(specs: list[dict], jobs: int, phase: str, seal_reason: str | None) -> None:
    """Run the jobs on `jobs` processes (inline for 1), printing a line as each finishes."""
    if not specs:
        print(f"{phase}: nothing to do", flush=True)
        return
    print(f"{phase}: {len(specs)} jobs on {jobs} process{'es' if jobs > 1 else ''}", flush=True)
    started, done = time.perf_counter(), 0

    def finished(spec: dict, result) -> None:
        nonlocal done
        done += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (len(specs) - done)
        print(f"[{phase} {done}/{len(specs)}] {describe(spec, result)} | {_clock(elapsed)} elapsed, "
              f"~{_clock(eta)} left", flush=True)

    if jobs <= 1:
        import torch

        torch.set_num_threads(1)
        for spec in specs:
            finished(spec, _run_job(spec))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(seal_reason,))
    try:
        pending = {pool.submit(_run_job, spec): spec for spec in specs}
        while pending:
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                finished(pending.pop(future), future.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def describe(spec: dict, result) -> str:
    if spec["kind"] == "fixed":
        return "fixed recipes: " + ", ".join(f"{r['row']} {100 * r['test']['chosen_mean']:.1f}" for r in result)
    r = result
    head = f"{r['row']}" + ("" if r.get("seed") is None else f" seed {r['seed']}")
    items = f"{r['item_evaluations']['total']:,} item evals"
    if spec["kind"] == "test":
        t = r["test"]
        return (f"{head}: test chosen mean {100 * t['chosen_mean']:.1f}, worst {100 * t['chosen_worst']:.1f}, "
                f"Pareto HV {t['hv']:.4f} ({t['pareto_size']} members, {t['seconds']:.0f}s)")
    if spec["kind"] == "corners":
        v = r["validation"][r["chosen_id"]]
        return (f"{head}: {r['candidates']} corners, chosen {r['weights'][r['chosen_id']]} (validation mean "
                f"{100 * np.mean(list(v.values())):.1f}), {items}, {r['seconds']['score']:.0f}s")
    chosen = r["chosen_validation"] or r["chosen_fitness"]
    on = "validation" if r["chosen_validation"] else "fitness"
    return (f"{head}: {r['candidates']} candidates{' (resumed)' if r['resumed'] else ''}, Pareto {len(r['pareto_ids'])}, "
            f"chosen #{r['chosen_id']} ({on} mean {100 * np.mean(list(chosen.values())):.1f}), {items}, "
            f"{r['seconds']['search'] + r['seconds']['choose']:.0f}s")


# =============================================================================== zoo: the study
def prescreen_factor(optimizer: str, option: str) -> float:
    """The run config's `prescreen` (1 = off)."""
    from evomerge.search.optimizers import PRESCREEN_DEFAULTS

    if option == "default":
        return float(PRESCREEN_DEFAULTS.get(optimizer) or 1)
    return 1.0 if option == "off" else float(option)


STUDY_IDENTITY = ("zoo_hash", "plan", "costs", "warm_start", "warm_start_windows", "prescreen", "spaces", "finalists",
                  "pareto_test_cap", "strategy_settings", "subset_method")


def open_results(results: Path, study: dict, resume: bool) -> None:
    """Refuse to mix two studies in one folder: --resume continues one with the same identity
    (zoo, budgets, settings; seeds and rows may be added); without it the folder must hold no records."""
    path = results / "study.json"
    commands = [study["command"]]
    if path.is_file():
        old = json.loads(path.read_text())
        earlier = old.get("commands") or [old["command"]]
        commands = earlier + ([study["command"]] if study["command"] not in earlier else [])
        if not resume:
            if any(results.glob("*/*.json")):
                raise SystemExit(f"{results} holds records of an earlier study: pass --resume to continue it, "
                                 "or remove the folder to start again")
        else:
            def same(key: str) -> bool:
                if key == "prescreen":  # per row: rows may be added or left out, a shared row must agree
                    a, b = old.get(key) or {}, study.get(key) or {}
                    return all(a[r] == b[r] for r in set(a) & set(b))
                if key == "subset_method":  # studies from before the setting ran with anchors
                    return old.get(key, LEGACY_SUBSET_METHOD) == study.get(key)
                return old.get(key) == study.get(key)

            changed = [k for k in STUDY_IDENTITY if not same(k)]
            if changed:
                raise SystemExit(f"{results}: --resume with other settings than the study there ({', '.join(changed)} "
                                 "differ); use another --results folder")
            study = merged_study(old, study)
    study["commands"] = commands
    results.mkdir(parents=True, exist_ok=True)
    from evomerge._atomic import write_json_atomic

    write_json_atomic(path, study)


def merged_study(old: dict, new: dict) -> dict:
    """The study a resumed run over some rows leaves: every row run so far (the earlier ones in their
    order, then the new ones), with the prescreen settings and fitnesses of all of them; the rest
    (command, seeds) is the new run's."""
    new_keys = {r["key"] for r in new["rows"]}
    rows = [r for r in old.get("rows", []) if r["key"] not in new_keys] + new["rows"]
    return {**new, "rows": rows, "prescreen": {**(old.get("prescreen") or {}), **new["prescreen"]},
            "fitness": {**(old.get("fitness") or {}), **new["fitness"]}}


def zoo_main(args: argparse.Namespace) -> None:
    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.fitness.sealed import sealed_test
    from evomerge.zoo import Manifest

    zoo = Path(args.zoo).resolve()
    manifest = Manifest.load(zoo)
    if not manifest.content_hash:
        raise SystemExit(f"{zoo / 'zoo.json'} has no content hash: the zoo is being built; wait for the build to finish")
    work = Path(args.work or ROOT / "runs" / "search_quality" / f"{manifest.size}_{manifest.content_hash[:8]}").resolve()
    results = Path(args.results or ROOT / "benchmarks" / "results" /
                   f"search_quality_{manifest.size}_{manifest.content_hash[:8]}_b{args.budget}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    strategies = args.strategies.split(",")
    overrides = parse_overrides(args.set)
    seedings = {"both": [False, True], "unseeded": [False], "seeded": [True]}[args.seeding]
    reason = "search_quality zoo: fitnesses, searches and choices (development phase)"
    subset_method = study_subset_method(results, args.subset_method)
    with sealed_test(reason):
        main_path = main_fitness(manifest, work, args.subset, args.random_merges, subset_method)
        main = CompressedFitness.load(main_path)
        n_val, smallest = validation_items(main)
        costs = ItemCosts(len(manifest.experts), len(main.task_names), n_val, smallest,
                          int(main.meta.get("item_evaluations", 0)), main.items_per_candidate)
        plan = plan_budgets(costs, args.budget, args.finalists)
        fitness = {"main": str(main_path)}
        if not args.skip_baselines:
            fitness["mergenetic"] = str(mergenetic_fitness(manifest, work, plan.mergenetic["items_per_task"]))
            fitness["mergekit"] = str(random_subset_fitness(manifest, work, main_path, plan.mergekit["items_per_task"]))
            endpoint = int(CompressedFitness.load(fitness["mergenetic"]).meta["item_evaluations"])
            if endpoint != costs.endpoint_calibration:
                raise SystemExit(f"endpoint calibration cost {endpoint} != (K + 1) x validation {costs.endpoint_calibration}")
    spaces = {"per-layer": args.search_space, "task-level": "task_arithmetic_global",
              "mergekit-evolve": str(SPACES / "task_arithmetic_layer_groups.yaml"),
              "mergenetic": str(SPACES / "ties_global.yaml")}
    rows = study_rows(strategies, seedings, plan, per_layer_space=spaces["per-layer"],
                      task_level_space=spaces["task-level"], mergekit_space=spaces["mergekit-evolve"],
                      mergenetic_space=spaces["mergenetic"], experts=manifest.experts,
                      baselines=not args.skip_baselines)
    if args.only_rows:  # a part of the design now, the rest later (--resume); the baselines stay
        keep = set(args.only_rows.split(","))
        rows = [r for r in rows if r.key in keep or r.family not in ("per-layer", "task-level")]
    prescreen = {r.key: (prescreen_factor(r.optimizer, args.prescreen) if r.family in ("per-layer", "task-level")
                         else 1.0) for r in rows if r.optimizer}
    study = {"zoo": str(zoo), "zoo_size": manifest.size, "zoo_hash": manifest.content_hash, "seeds": args.seeds,
             "command": "python benchmarks/search_quality.py " + " ".join(args.argv),
             "costs": vars(costs) | {"endpoint_calibration": costs.endpoint_calibration, "corners": costs.corners},
             "plan": plan.to_json(), "warm_start": args.warm_start, "prescreen": prescreen, "spaces": spaces,
             **({"warm_start_windows": args.warm_start_windows} if args.warm_start_windows else {}),
             **({"strategy_settings": overrides} if overrides else {}), "subset_method": subset_method,
             "finalists": args.finalists, "pareto_test_cap": args.pareto_test_cap, "fitness": fitness,
             "rows": [r.to_json() for r in rows]}
    if args.report_only:  # the tables from the records there, nothing run and nothing read
        path = results / "study.json"
        if not path.is_file():
            raise SystemExit(f"{results}: no study.json, nothing to report")
        study = json.loads(path.read_text())
        records = [json.loads(p.read_text()) for p in sorted(results.glob("*/*.json"))]
        wanted = {r.key for r in rows}
        markdown, comparisons = report(rows, [r for r in records if r["row"] in wanted], study)
        write_comparisons(results / "comparisons.json", comparisons)
        print(markdown)
        if args.record:
            record_section(section_key(manifest.size, manifest.content_hash), markdown, Path(args.results_md))
        return
    open_results(results, study, args.resume)
    print(f"zoo {zoo} ({manifest.size}, {costs.experts} experts, {costs.tasks} tasks, {n_val:,} validation items); "
          f"records in {results}; runs in {work / 'runs'}", flush=True)
    print(f"budgets (item evaluations): searched rows {plan.search['total']:,} ({args.budget} candidates); "
          f"mergekit-evolve-style {plan.mergekit['total']:,} ({plan.mergekit['candidates']} x "
          f"{plan.mergekit['items_per_task']} items/task); Mergenetic-style {plan.mergenetic['total']:,} "
          f"({plan.mergenetic['candidates']} candidates); corners {plan.corners['total']:,}", flush=True)
    for note in plan.notes:
        print(f"  note: {note}", flush=True)

    base = {"models": {"base": str(manifest.base_path), "experts": [str(p) for p in manifest.expert_paths]},
            "fitness": fitness, "device": args.device, "runs_dir": str(work / "runs"), "prescreen": prescreen,
            "warm_start": args.warm_start, "warm_start_windows": args.warm_start_windows, "strategy_settings": overrides,
            "validation_items": n_val, "pareto_test_cap": args.pareto_test_cap,
            "calibration_items": {"main": costs.calibration, "mergenetic": costs.endpoint_calibration, "mergekit": 0}}
    dev, final = [], []
    fixed_rows = [r for r in rows if r.family == "fixed"]
    for row in rows:
        if row.family == "fixed":
            continue
        for seed in ([None] if row.deterministic else range(args.seeds)):
            path = record_path(results, row, seed)
            spec = {**base, "kind": "corners" if row.family == "corners" else "search", "row": row.to_json(),
                    "seed": seed, "path": str(path)}
            record = json.loads(path.read_text()) if args.resume and path.is_file() else None
            if record is None:
                dev.append(spec)
            if record is None or "test" not in record:
                final.append({**spec, "kind": "test", "test_of": spec["kind"]})
    # longest first: the corners (2^K full-split scorings), then the rows with the most candidates
    dev.sort(key=lambda s: (s["kind"] != "corners", -Row(**s["row"]).candidates))
    with sealed_test(reason):
        run_jobs(dev, args.jobs, "development (test sealed)", reason)

    if args.development_only:  # a lever measured on validation (PROTOCOL.md): no test read at all
        print("development only: the test splits stay sealed; compare studies with benchmarks/search_levers.py",
              flush=True)
        return

    # ------------------------------------------------------------------ the final step: test, once
    # longest first again: the Pareto sets to score grow with the candidates (Mergenetic-style: hundreds)
    final_specs = sorted(final, key=lambda s: -Row(**s["row"]).candidates)
    pending_fixed = [r for r in fixed_rows
                     if not (args.resume and "test" in _load(record_path(results, r, None)))]
    if pending_fixed:
        final_specs.append({**base, "kind": "fixed", "rows": [r.to_json() for r in pending_fixed],
                            "paths": [str(record_path(results, r, None)) for r in pending_fixed]})
    run_jobs(final_specs, args.jobs, "final step (test, read once)", None)

    records = [json.loads(p.read_text()) for p in sorted(results.glob("*/*.json"))]
    wanted = {r.key for r in rows}
    markdown, comparisons = report(rows, [r for r in records if r["row"] in wanted], study)
    write_comparisons(results / "comparisons.json", comparisons)
    print()
    print(markdown)
    if args.record:
        record_section(section_key(manifest.size, manifest.content_hash), markdown, Path(args.results_md))


def write_comparisons(path: Path, comparisons: list) -> None:
    """The paired comparisons as JSON, merged into the file's: a run or report over some of the
    study's rows replaces those rows' entries (same row, baseline and metric) and keeps the others'."""
    fresh = [c.to_json() for c in comparisons]
    key = lambda c: (c["row"], c["baseline"], c["metric"])  # noqa: E731
    replaced = {key(c) for c in fresh}
    kept = [c for c in json.loads(path.read_text()) if key(c) not in replaced] if path.is_file() else []
    path.write_text(json.dumps(kept + fresh, indent=1))


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# =============================================================================== CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="study", required=True)

    z = sub.add_parser("zoo", help="issue 14 item 3: strategies (unseeded / seeded) vs baselines at matched item budgets")
    z.add_argument("--zoo", default=str(ROOT / "zoo" / "small"), help="a built zoo folder (zoo/small, zoo/medium)")
    z.add_argument("--work", default=None, help="fitnesses and run folders (default runs/search_quality/<size>_<hash>)")
    z.add_argument("--results", default=None, help="per-seed records (default benchmarks/results/"
                                                   "search_quality_<size>_<hash>_b<budget>)")
    z.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma list of registered optimizers")
    z.add_argument("--seeding", choices=("both", "unseeded", "seeded"), default="both",
                   help="rows per strategy: without and with the warm-start set")
    z.add_argument("--warm-start", type=int, default=8,
                   help="warm-start set: the first N task-level corners (base, each expert, ..., all experts)")
    z.add_argument("--warm-start-windows", type=int, default=0,
                   help="seeded per-layer rows also start from each expert alone in every window of this many "
                        "consecutive layers (BoundSpace.window_genomes; 0 = corners only)")
    z.add_argument("--set", action="append", default=[], metavar="STRATEGY.SETTING=VALUE",
                   help="a strategy setting other than STRATEGY_SETTINGS' (repeatable; YAML values), e.g. "
                        "stitch.stitches=40; part of the study's identity")
    z.add_argument("--seeds", type=int, default=10)
    z.add_argument("--budget", type=int, default=150, help="candidate evaluations per searched row")
    z.add_argument("--search-space", default="task_arithmetic_per_layer")
    z.add_argument("--prescreen", default="default",
                   help="'default' (PRESCREEN_DEFAULTS), 'off', or a factor, for the per-layer and task-level rows")
    z.add_argument("--random-merges", type=int, default=None, help="calibration random merges (default: the library's)")
    z.add_argument("--subset", type=int, default=20, help="fitness items per task of the searched rows")
    z.add_argument("--subset-method", default=None, choices=("random", "anchors"),
                   help="how the searched rows' fitness items are chosen (default: the study folder's, else the "
                        "library's default)")
    z.add_argument("--finalists", type=int, default=5,
                   help="best Pareto members by fitness re-scored on the whole validation split to choose one")
    z.add_argument("--development-only", action="store_true",
                   help="stop after the development phase (searches and validation choices), never reading test: "
                        "how a lever is measured (benchmarks/search_levers.py compares such studies)")
    z.add_argument("--pareto-test-cap", type=int, default=0,
                   help="final step: score at most N Pareto members per record on test (the chosen + the best by "
                        "fitness mean; 0 = all)")
    z.add_argument("--skip-baselines", action="store_true", help="only the per-layer rows")
    z.add_argument("--only-rows", default=None,
                   help="comma list of searched row keys to run (e.g. global-cma-seeded); the baselines stay")
    z.add_argument("--jobs", type=int, default=2, help="processes running (row, seed) jobs, one torch thread each")
    z.add_argument("--device", default=None)
    z.add_argument("--resume", action="store_true", help="skip finished jobs, resume interrupted searches")
    z.add_argument("--record", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    z.add_argument("--report-only", action="store_true",
                   help="only the tables, from the records already there for this command's rows (runs nothing)")
    z.add_argument("--results-md", default=str(RESULTS_MD), help=argparse.SUPPRESS)
    z.set_defaults(func=zoo_main)

    s = sub.add_parser("synthetic", help="pre-screening on/off per optimizer (PRESCREEN_DEFAULTS)")
    s.add_argument("--optimizers", default=None, help="comma list (default: every registered optimizer)")
    s.add_argument("--dims", default="12,36")
    s.add_argument("--seeds", type=int, default=6)
    s.add_argument("--budget", type=int, default=150)
    s.add_argument("--factor", type=float, default=4.0)
    s.add_argument("--screened-out", choices=("predicted", "failed"), default=None)
    s.add_argument("--out", default=None, help="write the per-run rows as JSON")
    s.add_argument("--record", action="store_true", help="write the table into benchmarks/RESULTS.md")
    s.set_defaults(func=synthetic_main)

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    warnings.simplefilter("ignore")  # pymoo / nevergrad chatter
    args.func(args)


if __name__ == "__main__":
    main()
