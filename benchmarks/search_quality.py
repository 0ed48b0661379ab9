"""Search quality: which optimizer finds the best merges for a fixed number of candidate evaluations.

Two studies, one script:

``zoo`` (issue 5, item 7) -- on the small zoo with its compressed fitness, equal budgets of
candidate evaluations (default 150) and several seeds for random, CMA-ES, NSGA-II, M2N2 and MAP,
searching per-layer task-arithmetic coefficients. Every Pareto member (by the compressed fitness,
among the first ``budget`` candidates: runs that overshoot in their last generation are cut) is
re-scored on the *test* split with full data (``Run.verify``), never the fitness subset, in the final step:
every search and choice runs first with the test splits sealed (benchmarks/PROTOCOL.md). Baselines, scored the
same way: the base, each expert, uniform task arithmetic (weight 1 per expert), plain averaging
(linear, 1/K each), mergekit-default TIES (weight 1, density 0.5 -- mergekit has no default
density; 0.5 is the common choice -- normalize on, as mergekit) and the zoo's best task-level grid
merge (chosen by the zoo build on the full validation split). Item evaluations of a search =
calibration of the compressed fitness + the run's own; the grid's = its candidates x the validation
items of every task. Targets (printed as PASS / MISS):
  1. the best strategy matches or beats the grid merge's mean test accuracy with fewer item
     evaluations than the grid spent;
  2. it beats uniform task arithmetic by at least 10 points;
  3. M2N2 and MAP beat random search in test hypervolume at equal budget.

    python benchmarks/search_quality.py zoo          # full study: calibration, 15 runs, verification
    python benchmarks/search_quality.py zoo --seeds 1 --budget 12 --strategies random,m2n2   # smoke
    python benchmarks/search_quality.py zoo ... --record                      # also benchmarks/RESULTS.md

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
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.stats import mean_sd

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_STRATEGIES = ("random", "cma", "nsga2", "m2n2", "map")
# Settings per strategy for a 150-evaluation per-layer search; the rest are library defaults.
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
    "m2n2": {"archive_size": 20, "batch_size": 4, "initial_genomes": "corners"},  # the paper starts from the seed models
    "map": {"batch_size": 8, "terms": "auto", "initial_genomes": "corners"},
}


SEEDED = "+corners"  # a strategy name with this suffix starts from the task-level corner merges


def optimizer_name(strategy: str) -> str:
    return strategy.removesuffix(SEEDED)


def strategy_settings(strategy: str, budget: int) -> dict[str, Any]:
    name = optimizer_name(strategy)
    settings = dict(STRATEGY_SETTINGS.get(name, {}))
    if name == "ngopt":
        settings["budget"] = budget
    if strategy.endswith(SEEDED):
        settings["initial_genomes"] = "corners"
    return settings


# =============================================================================== results file
def record_section(key: str, markdown: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section between ``<!-- key:begin -->`` and ``<!-- key:end -->``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"recorded in {path} ({key})")


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


# =============================================================================== zoo
def load_or_build_zoo(zoo_dir: Path, size: str):
    from evomerge.zoo import Manifest, build_zoo

    try:
        return Manifest.load(zoo_dir)
    except FileNotFoundError:
        print(f"no zoo at {zoo_dir}: building it (size {size})", flush=True)
        return build_zoo(zoo_dir, size=size)


def ensure_fitness(manifest, work: Path, args: argparse.Namespace) -> Path:
    """The zoo's compressed fitness: reuse ``<work>/fitness/<name>`` or calibrate it from a config
    written next to it (same settings as presets/fitness/examples/zoo_small_calibration.yaml)."""
    import yaml

    from evomerge.fitness.calibrate import DEFAULT_RANDOM_MERGES, calibrate_from_config
    from evomerge.fitness.compressed import CompressedFitness, FitnessError

    random_merges = DEFAULT_RANDOM_MERGES if args.random_merges is None else args.random_merges
    from evomerge.fitness.calibrate import DEFAULT_IRT_DIMS, DEFAULT_SUBSET_METHOD

    name = (f"zoo_{manifest.size}_{manifest.content_hash[:8]}_bench_r{random_merges}_n{args.subset}"
            f"_{DEFAULT_SUBSET_METHOD}_d{DEFAULT_IRT_DIMS}")
    target = work / "fitness" / name
    if target.exists():
        try:
            CompressedFitness.load(target)
            print(f"compressed fitness: reusing {target}", flush=True)
            return target
        except FitnessError as exc:
            print(f"compressed fitness: {exc}; recalibrating", flush=True)
    config = {
        "name": name,
        "models": {"base": str(manifest.base_path), "experts": [str(p) for p in manifest.expert_paths]},
        "tasks": [{"preset": f"zoo_{t}", "dataset": {"path": str(manifest.task_path(t))}} for t in manifest.tasks],
        "calibration": {"random_merges": random_merges, "method": "task_arithmetic", "weight": [0.0, 1.5],
                        "density": [0.2, 1.0], "seed": 0},
        "subset": {"n": args.subset, "seed": 0},  # the rest: `evomerge fitness calibrate` defaults
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"compressed fitness: calibrating {target} from {path}", flush=True)
    return calibrate_from_config(path, out_dir=target, overwrite=True)


def optimizer_block(strategy: str, factor: float | None, budget: int) -> dict[str, Any]:
    """The run config's `optimizer` entry; `prescreen` 1 turns the surrogate pre-screening off."""
    settings = strategy_settings(strategy, budget)
    return {"name": optimizer_name(strategy), "settings": settings, "prescreen": 1 if factor is None else float(factor)}


def prescreen_factor(strategy: str, option: str) -> float | None:
    from evomerge.search.optimizers import PRESCREEN_DEFAULTS

    if option == "default":
        return PRESCREEN_DEFAULTS.get(optimizer_name(strategy))
    return None if option == "off" else float(option)


def run_strategy(strategy: str, seed: int, manifest, fitness_path: Path, work: Path, args: argparse.Namespace,
                 tasks: list[str], calibration_items: int, fitness_split_items: int) -> dict[str, Any]:
    from evomerge.runs.config import load_run_config
    from evomerge.runs.run import Run
    from evomerge.runs.search import start_search
    from evomerge.search.pareto import hypervolume, non_dominated_mask

    factor = prescreen_factor(strategy, args.prescreen)
    name = f"{strategy.replace('+', '_')}{'' if factor is None else f'_ps{factor:g}'}_b{args.budget}_s{seed}"
    data = {
        "name": name,
        "models": {"base": str(manifest.base_path), "experts": [str(p) for p in manifest.expert_paths]},
        "search_space": args.search_space,
        "fitness": {"name": str(fitness_path)},
        "optimizer": optimizer_block(strategy, factor, args.budget),
        "budget": {"evaluations": args.budget},
        "workers": {"backend": "inprocess", "threads_per_worker": args.threads, "device": args.device},
        "seed": seed,
        "runs_dir": str(work / "runs"),
    }
    config = load_run_config(data, root=work)
    started = time.perf_counter()
    path = start_search(config, overwrite=True, progress=args.progress, echo=lambda *a, **k: None)
    search_seconds = time.perf_counter() - started
    run = Run.load(path)
    # Equal budgets: the loop finishes the generation that reaches the budget (NSGA-II's 8th
    # generation of 20 ends at 160), so only the first `budget` candidates count.
    evaluations = run.evaluations
    evaluations = evaluations[evaluations.index < args.budget]
    ok = evaluations[evaluations["status"] == "ok"]
    F = ok[tasks].to_numpy(dtype=float)  # (n, tasks) compressed-fitness estimates
    front = non_dominated_mask(F)
    ids = [int(i) for i in ok.index[front]]
    # The member a user would take without the test split (`Run.choose` among the first `budget`
    # candidates' Pareto set); the finalists' item evaluations are counted in the search's cost.
    by_fitness = [ids[j] for j in np.lexsort((F[front].min(axis=1), F[front].mean(axis=1)))[::-1]]
    finalists = by_fitness[: args.finalists]
    started = time.perf_counter()
    chosen = run.choose(args.finalists, among=ids, echo=lambda *a, **k: None) if finalists else by_fitness[0]
    validation = run.verified().get("fitness", {})
    choose_seconds = time.perf_counter() - started
    finalist_items = len(finalists) * int(fitness_split_items)
    seconds = {c[len("seconds_"):]: float(evaluations[c].mean()) for c in evaluations.columns
               if c.startswith("seconds_")}
    row = {
        "strategy": strategy, "seed": seed, "prescreen": factor, "run": str(path),
        "candidates": int(len(evaluations)), "failed": int((evaluations["status"] != "ok").sum()),
        "run_item_evaluations": int(evaluations["item_evaluations"].sum()),
        "item_evaluations": calibration_items + int(evaluations["item_evaluations"].sum()) + finalist_items,
        "finalist_item_evaluations": finalist_items, "finalists": len(finalists),
        "pareto_size": len(ids), "pareto_ids": ids, "hv_fitness": hypervolume(F[front], 0.0),
        "chosen_id": chosen,
        "chosen_mean_fitness": float(ok.loc[chosen, tasks].mean()),
        "chosen_mean_validation": float(np.mean([validation[str(chosen)][t] for t in tasks])) if finalists else None,
        "top_fitness_id": by_fitness[0],
        "seconds_search": search_seconds, "seconds_choose": choose_seconds,
        "seconds_per_candidate": search_seconds / max(len(evaluations), 1), "seconds_breakdown": seconds,
    }
    print(f"  {name:28s} {row['candidates']} candidates in {search_seconds:.0f}s "
          f"({row['seconds_per_candidate']:.2f} s/candidate: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items())
          + f") | Pareto {len(ids)} | chosen #{chosen} (fitness {row['chosen_mean_fitness']:.3f}) | "
          f"choose {choose_seconds:.0f}s", flush=True)
    return row


def score_on_test(row: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """The final step for one run (benchmarks/PROTOCOL.md): its Pareto members on the full test
    split (`Run.verify`), after every run has searched and chosen."""
    from evomerge.runs.run import Run
    from evomerge.search.pareto import hypervolume

    ids = row["pareto_ids"]
    started = time.perf_counter()
    test = Run.load(row["run"]).verify(ids, role="test", echo=lambda *a, **k: None)
    T = np.array([[test[str(i)][t] for t in tasks] for i in ids])  # (members, tasks) full test split
    return {**row, "hv_test": hypervolume(T, 0.0), "best_mean_test": float(T.mean(axis=1).max()),
            "chosen_mean_test": float(np.mean([test[str(row["chosen_id"])][t] for t in tasks])),
            "top_fitness_mean_test": float(np.mean([test[str(row["top_fitness_id"])][t] for t in tasks])),
            "seconds_verify": time.perf_counter() - started}


def score_baselines(manifest, fitness, tasks: list[str], device: str | None) -> list[dict[str, Any]]:
    """Base, experts and reference merges on the full test split, through the same materializer."""
    from transformers import AutoTokenizer

    from evomerge.merge.materializer import Materializer

    materializer = Materializer.from_folders(manifest.base_path, manifest.expert_paths, device=device)
    tokenizer = AutoTokenizer.from_pretrained(manifest.base_path, trust_remote_code=False)
    scorers = fitness.full_scorers(tokenizer, role="test", device=materializer.device)
    K = len(manifest.expert_paths)
    grid = manifest.reference_merges["best_grid"]
    merges = [("base", "task_arithmetic", {"weight": [0.0] * K})]
    merges += [(f"expert: {name}", "task_arithmetic", {"weight": list(np.eye(K)[k])})
               for k, name in enumerate(manifest.experts)]
    merges += [
        ("uniform task arithmetic (weight 1)", "task_arithmetic", {"weight": [1.0] * K}),
        ("averaging (linear, 1/K)", "linear", {"weight": [1.0 / K] * K}),
        ("TIES, mergekit defaults (weight 1, density 0.5)", "ties", {"weight": [1.0] * K, "density": [0.5] * K}),
        (f"best grid merge {list(grid['weights'])}", "task_arithmetic", {"weight": list(grid["weights"])}),
    ]
    rows = []
    for label, method, params in merges:
        model = materializer.apply(method, **params)
        accuracy = {t: float(np.mean(scorer(model))) for t, scorer in scorers.items()}
        rows.append({"baseline": label, "method": method, "params": params, "test": accuracy,
                     "mean_test": float(np.mean([accuracy[t] for t in tasks]))})
        print(f"  {label:50s} " + " ".join(f"{t}={v:.3f}" for t, v in accuracy.items())
              + f" mean={rows[-1]['mean_test']:.3f}", flush=True)
    return rows


def grid_item_evaluations(manifest) -> tuple[int, int]:
    """(grid candidates, item evaluations) of the zoo's grid, as its manifest records them (older
    manifests: every grid point on every task's whole validation split)."""
    grid = manifest.reference_merges["best_grid"]["grid"]
    n_points = int(grid["n_evaluated"])
    if "item_evaluations" in grid:
        return n_points, int(grid["item_evaluations"])
    items = sum(int(manifest.data["tasks"][t]["splits"]["validation"]) for t in manifest.tasks)
    return n_points, n_points * items


def zoo_report(rows: list[dict], baselines: list[dict], manifest, calibration_items: int,
               args: argparse.Namespace) -> str:
    grid_points, grid_items = grid_item_evaluations(manifest)
    grid_row = next(b for b in baselines if b["baseline"].startswith("best grid")) if baselines else None
    uniform = next(b for b in baselines if b["baseline"].startswith("uniform")) if baselines else None
    # without the baselines, a manifest's test numbers (zoo.json before PROTOCOL.md) or none
    grid_mean = grid_row["mean_test"] if grid_row else float(
        manifest.reference_merges["best_grid"].get("test", {}).get("mean", float("nan")))
    uniform_mean = (uniform["mean_test"] if uniform else float(
        manifest.reference_merges["uniform_task_arithmetic"].get("test", {}).get("mean", float("nan"))))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    summary = {}
    for s in strategies:
        sel = [r for r in rows if r["strategy"] == s]
        summary[s] = {k: float(np.mean([r[k] for r in sel])) for k in
                      ("hv_test", "best_mean_test", "chosen_mean_test", "top_fitness_mean_test", "item_evaluations",
                       "seconds_per_candidate",
                       "candidates", "pareto_size")}
        summary[s]["hv_sd"] = mean_sd([r["hv_test"] for r in sel]).sd  # ddof = 1 (PROTOCOL.md)
        summary[s]["chosen_sd"] = mean_sd([r["chosen_mean_test"] for r in sel]).sd
        summary[s]["seeds"] = len(sel)
        summary[s]["prescreen"] = sel[0]["prescreen"]
    test_sizes = ", ".join(f"{t} {manifest.data['tasks'][t]['splits']['test']}" for t in manifest.tasks)
    lines = [
        f"### Search quality on the {manifest.size} zoo ({args.search_space}, budget {args.budget} candidates, "
        f"{args.seeds} seeds)",
        "",
        f"`python benchmarks/search_quality.py zoo --budget {args.budget} --seeds {args.seeds} --strategies "
        f"{args.strategies} --prescreen {args.prescreen}`. All accuracies on the full test splits "
        f"({test_sizes} items). "
        f"*chosen* = of the {args.finalists} Pareto members with the best compressed-fitness mean, the one with "
        "the best mean on the whole fitness (validation) split: what a user would take without the test split; "
        "*top-fitness* = the Pareto member with the best compressed-fitness mean alone; *best* = the Pareto "
        "member with the best test mean (an upper bound that peeks at the test split). Item evaluations = "
        f"calibration ({calibration_items}) + the run's subset evaluations + the finalists' validation scoring.",
        "",
        "| strategy | prescreen | test hv (sd) | chosen test mean (sd) | top-fitness test mean | best test mean | "
        "Pareto size | item evals | s/candidate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, v in summary.items():
        lines.append(f"| {s} | {v['prescreen'] or 'off'} | {v['hv_test']:.4f} ({v['hv_sd']:.4f}) | "
                     f"{100 * v['chosen_mean_test']:.1f} ({100 * v['chosen_sd']:.1f}) | "
                     f"{100 * v['top_fitness_mean_test']:.1f} | {100 * v['best_mean_test']:.1f} | "
                     f"{v['pareto_size']:.0f} | {v['item_evaluations']:.0f} | {v['seconds_per_candidate']:.2f} |")
    if baselines:
        lines += ["", "| baseline | " + " | ".join(baselines[0]["test"]) + " | mean |",
                  "|---|" + "---|" * (len(baselines[0]["test"]) + 1)]
        for b in baselines:
            lines.append(f"| {b['baseline']} | " + " | ".join(f"{100 * v:.1f}" for v in b["test"].values())
                         + f" | {100 * b['mean_test']:.1f} |")
    grid = manifest.reference_merges["best_grid"]["grid"]
    ranked = grid.get("screened_on", "the full validation splits")
    lines += ["", f"Grid merge: {grid_points} task-level candidates ranked on {ranked}"
              + (f", the best {grid['finalists']} re-scored on the full validation splits" if "finalists" in grid else "")
              + f" = {grid_items} item evaluations; test mean {100 * grid_mean:.1f}.", ""]
    if summary:
        best = max(summary, key=lambda s: summary[s]["chosen_mean_test"])
        b = summary[best]
        t1 = b["chosen_mean_test"] >= grid_mean and b["item_evaluations"] < grid_items
        t1_peek = b["best_mean_test"] >= grid_mean and b["item_evaluations"] < grid_items
        t2 = b["chosen_mean_test"] - uniform_mean >= 0.10
        lines.append(f"Targets (best strategy by chosen test mean: **{best}**):")
        lines.append(f"1. matches/beats the grid merge with fewer item evaluations: **{'PASS' if t1 else 'MISS'}** "
                     f"(chosen {100 * b['chosen_mean_test']:.1f} vs grid {100 * grid_mean:.1f}; "
                     f"{b['item_evaluations']:.0f} vs {grid_items} item evaluations; with the test-peeking best "
                     f"member {100 * b['best_mean_test']:.1f}: {'PASS' if t1_peek else 'MISS'})")
        lines.append(f"2. beats uniform task arithmetic by >= 10 points: **{'PASS' if t2 else 'MISS'}** "
                     f"({100 * (b['chosen_mean_test'] - uniform_mean):+.1f} points over {100 * uniform_mean:.1f})")
        if "random" in summary:
            for s in ("m2n2", "map"):
                if s in summary:
                    ok = summary[s]["hv_test"] > summary["random"]["hv_test"]
                    lines.append(f"3. {s} beats random search in test hypervolume: **{'PASS' if ok else 'MISS'}** "
                                 f"({summary[s]['hv_test']:.4f} vs {summary['random']['hv_test']:.4f})")
    return "\n".join(lines) + "\n"


def zoo_main(args: argparse.Namespace) -> None:
    """Searches and choices with the test splits sealed; then, the final step, test scoring."""
    from evomerge.fitness.sealed import sealed_test

    with sealed_test("search_quality zoo: searches, choices and baselines' settings"):
        manifest, fitness, rows, calibration_items, results_path, cache = zoo_develop(args)
    print("final step: Pareto sets and baselines on the full test split", flush=True)
    tasks = fitness.task_names
    for i, row in enumerate(rows):
        if "hv_test" not in row:  # runs cached by an earlier invocation keep their test scores
            rows[i] = cache[row["key"]] = score_on_test(row, tasks)
            results_path.write_text(json.dumps(cache, indent=1))
    work = Path(args.work)
    baselines = []
    if not args.skip_baselines:
        print("baselines on the full test split:", flush=True)
        baselines = score_baselines(manifest, fitness, tasks, args.device)
    (work / "baselines.json").write_text(json.dumps(baselines, indent=1))
    report = zoo_report(rows, baselines, manifest, calibration_items, args)
    print()
    print(report)
    if args.record:
        raw = ROOT / "benchmarks" / "results" / "search_quality_zoo.json"
        raw.write_text(json.dumps({"argv": vars(args) | {"func": None}, "zoo": manifest.content_hash,
                                   "runs": rows, "baselines": baselines}, indent=1, default=str))
        print(f"raw per-seed results: {raw}")
        record_section("search_quality:zoo", report)


def zoo_develop(args: argparse.Namespace):
    """Everything before the final step: the zoo, the compressed fitness, every run's search and
    its chosen member (on the fitness split). Reads no test split."""
    from evomerge.fitness.compressed import CompressedFitness

    manifest = load_or_build_zoo(Path(args.zoo), args.size)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fitness_path = Path(args.fitness) if args.fitness else ensure_fitness(manifest, work, args)
    fitness = CompressedFitness.load(fitness_path)
    tasks = fitness.task_names
    calibration_items = int(fitness.meta.get("item_evaluations", 0))
    fitness_split_items = sum(len(fitness.task(t).task.load_split("fitness")) for t in tasks)
    print(f"fitness {fitness_path}: {fitness.items_per_candidate} items per candidate; calibration cost "
          f"{calibration_items} item evaluations", flush=True)
    results_path = work / "results.json"
    cache = json.loads(results_path.read_text()) if args.resume and results_path.exists() else {}
    rows = []
    for strategy in args.strategies.split(","):
        for seed in range(args.seeds):
            key = (f"{strategy}|{seed}|{args.budget}|{args.prescreen}|{args.search_space}|{fitness_path}"
                   f"|finalists{args.finalists}")
            if key in cache:
                rows.append({**cache[key], "key": key})
                print(f"  {strategy} seed {seed}: reusing {cache[key]['run']}", flush=True)
                continue
            row = run_strategy(strategy, seed, manifest, fitness_path, work, args, tasks, calibration_items,
                               fitness_split_items)
            rows.append({**row, "key": key})
            cache[key] = rows[-1]
            results_path.write_text(json.dumps(cache, indent=1))
    return manifest, fitness, rows, calibration_items, results_path, cache


# =============================================================================== CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="study", required=True)

    z = sub.add_parser("zoo", help="issue 5 item 7: strategies vs baselines on the small zoo")
    z.add_argument("--zoo", default=str(ROOT / "zoo" / "small"), help="zoo folder (built with size=small if missing)")
    z.add_argument("--size", default="small", help="zoo size to build when --zoo is missing")
    z.add_argument("--work", default=str(ROOT / "runs" / "search_quality"),
                   help="folder for the calibration config, the compressed fitness and the runs")
    z.add_argument("--fitness", default=None, help="an existing compressed fitness (default: calibrate one in --work)")
    z.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help=f"comma list of optimizer names; NAME{SEEDED} starts NAME from the task-level corner merges")
    z.add_argument("--seeds", type=int, default=3)
    z.add_argument("--budget", type=int, default=150, help="candidate evaluations per run")
    z.add_argument("--search-space", default="task_arithmetic_per_layer")
    z.add_argument("--prescreen", default="default",
                   help="'default' (PRESCREEN_DEFAULTS), 'off', or a factor for every strategy")
    z.add_argument("--random-merges", type=int, default=None,
                   help="calibration population (+ K + 1 endpoints); default: the calibration default")
    z.add_argument("--subset", type=int, default=20, help="fitness items per task")
    z.add_argument("--finalists", type=int, default=5,
                   help="best Pareto members by compressed fitness re-scored on the whole fitness split to choose one")
    z.add_argument("--skip-baselines", action="store_true")
    z.add_argument("--device", default=None)
    z.add_argument("--threads", type=int, default=1, help="torch threads of the in-process worker")
    z.add_argument("--resume", action="store_true", help="reuse finished runs recorded in <work>/results.json")
    z.add_argument("--no-progress", dest="progress", action="store_false", help="hide the per-run progress bar")
    z.add_argument("--record", action="store_true", help="write the tables into benchmarks/RESULTS.md")
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

    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # pymoo / nevergrad chatter
    args.func(args)


if __name__ == "__main__":
    main()
