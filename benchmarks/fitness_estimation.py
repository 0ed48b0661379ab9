"""Compressed fitness on the small zoo: how well each estimator predicts a merge's full-split accuracy.

Usage: .venv/bin/python benchmarks/fitness_estimation.py [--zoo zoo/small] [--held-out 64]
           [--seeds 3] [--mergenetic-python /tmp/mgvenv/bin/python] [--girth | --girth-only]
       .venv/bin/python benchmarks/fitness_estimation.py --accounting [--zoo zoo/small]   # issue 16
       .venv/bin/python benchmarks/fitness_estimation.py --record [JSON ...]              # RESULTS.md block

--accounting (issue 16, items 1, 2, 5): total item evaluations (calibration + candidates x subset items +
finalists re-scored in full) at the demo's budget (read from its calibration preset and run config), at 150
and at 500 candidates; every estimator against a plain random subset mean given the calibration's items as
extra items per candidate (equal total item evaluations), on the held-out merges and on the candidates of
short per-layer searches (random, m2n2, map; corners first, guided by the demo's compressed fitness; every
candidate scored on the whole fitness split once, ~2.5 s each on one thread, cached), their top decile by true
accuracy and the candidates above every calibration model. Writes benchmarks/results/
fitness_accounting_<label>.json; --record regenerates the marked block of RESULTS.md from those files.

The calibration population is what `evomerge fitness calibrate` scores (`endpoint_coefficients`
and `random_task_level_coefficients`, seed 0, through the materializer and `score_population`);
`--held-out` further random task-level merges (seed 1, never seen by the calibration) are
scored on the whole fitness split of each task once and cached in benchmarks/.cache/. For each
subset size n per task, subset method and subset seed, the calibration is fitted
with `fit_task_calibration` and every estimator predicts each held-out merge's full-split accuracy
from its answers on the n subset items. Printed:

(a) MAE (mean over tasks and held-out merges) and Spearman rank correlation (per task, then
    averaged; and of the task-mean fitness the search ranks on), mean over subset seeds, for
    every estimator, n in {10, 20, 50, 100}, random vs anchors vs informative (see subsets.py).
(b) Item evaluations per candidate: the full splits (sum over tasks) over (subset items + the
    calibration's full-split evaluations amortised over a 500-candidate search).
(c) What the calibration defaults cost in accuracy: calibration size, ability prior, IRT model
    (joint MAP, 1 or 2 dimensions; girth's marginal likelihood with --girth, ~13 min more),
    mixing method and folds, at n = 20.
(d) With --mergenetic-python: Mergenetic's estimators (MERGE^3: `estimate_fitness`, and
    tinyBenchmarks' `evaluate` for p-IRT / gp-IRT, which only supports n = 20) on the same
    response matrices, subsets and item parameters, side by side with ours.
Targets (issue 4), at n = 20 per task: best estimator MAE <= 0.03, Spearman >= 0.9, and >= 20x
fewer item evaluations per candidate. (With N-item splits and C calibration models, 20 items per task
save N / (20 + C N / 500) per task: at least 20x needs C < 25 and, e.g., N >= 770 for C = 14.) Also printed: whether the zoo presets reproduce the
validation accuracies recorded in zoo.json. The whole benchmark runs with the test splits sealed
(benchmarks/PROTOCOL.md): it reads only the fitness (validation) split. Mergenetic runs in its own venv (see issue 4), e.g.
`python3 -m venv /tmp/mgvenv` then its pinned requirements and `pip install --no-deps mergenetic`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
SEARCH_CANDIDATES = 500
SIZES = (10, 20, 50, 100)
SUBSET_METHODS = ("random", "anchors", "informative")
DETERMINISTIC = ("informative",)  # the seed does not change the subset: one run
WEIGHT_BOUNDS, DENSITY_BOUNDS = (0.0, 1.5), (0.2, 1.0)
MAX_CALIBRATION_MERGES = 64  # scored once; smaller calibrations use the first R of these (same seed)


# ------------------------------------------------------------------------------- data


def zoo_tasks(zoo: Path):
    from evomerge.fitness.tasks import load_task
    from evomerge.zoo import Manifest

    manifest = Manifest.load(zoo)
    tasks = [load_task(manifest.task_preset(t), {"dataset": {"path": str(manifest.task_path(t))}}) for t in manifest.tasks]
    return manifest, tasks


def scored_population(manifest, tasks, label: str, population: list[dict], method: str = "task_arithmetic"):
    """task -> (models, items) full-split answers, cached by zoo content, tasks and coefficients."""
    from evomerge.fitness.calibrate import population_scorers, score_population
    from evomerge.fitness.tasks import dataset_hash

    key_parts = [manifest.content_hash, method, [t.to_dict() for t in tasks],
                 [dataset_hash(t.load_split("fitness")) for t in tasks],
                 [{k: np.asarray(v).round(12).tolist() for k, v in c.items()} for c in population]]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = CACHE / f"fitness_{label}_{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {t.name: data[t.name] for t in tasks}, float(data["seconds"])
    materializer, scorers, splits = population_scorers(tasks, str(manifest.base_path),
                                                       [str(p) for p in manifest.expert_paths])
    started = time.perf_counter()
    responses = score_population(materializer, method, population, scorers,
                                 echo=lambda m: print(f"[{label}]{m}", file=sys.stderr))
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, seconds=seconds, **responses)
    return responses, seconds


def manifest_accuracy_gaps(manifest, tasks) -> list[str]:
    """Score the zoo's models on the validation (fitness) splits through the presets; list any
    mismatch with zoo.json. Never the test split: this benchmark makes choices (PROTOCOL.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if manifest.data["evaluation"].get("split") != "validation":
        return ["zoo.json predates benchmarks/PROTOCOL.md (test-split accuracies); rebuild the zoo to compare"]
    tokenizer = AutoTokenizer.from_pretrained(str(manifest.tokenizer_path))
    scorers = {t.name: t.make_scorer(tokenizer, t.load_split("fitness")) for t in tasks}
    gaps = []
    for name in ["base", *manifest.experts]:
        model = AutoModelForCausalLM.from_pretrained(str(manifest.model_path(name))).eval()
        for task in manifest.tasks:
            ours, theirs = float(np.mean(scorers[manifest.task_preset(task)](model))), manifest.accuracy[name][task]
            if ours != theirs:
                gaps.append(f"{name}/{task}: {ours} != {theirs}")
    return gaps


# ------------------------------------------------------------------------------- fitting


class TaskFits:
    """Per task: the IRT fit and the mixing weights' cross-validation folds; neither depends on the subset."""

    def __init__(self, y_cal: dict, ends, mixing_rows, irt_model: str, mixing_method: str, n_folds: int, dims: int = 1,
                 empirical_prior: bool = True):
        from evomerge.fitness.estimators import cross_validation_folds
        from evomerge.fitness.irt import fit_irt

        self.irt_model, self.mixing_method, self.n_folds, self.dims = irt_model, mixing_method, n_folds, dims
        self.empirical_prior = empirical_prior
        self.ends, self.mixing_rows = list(ends), list(mixing_rows)
        prior_rows = self.mixing_rows if empirical_prior else None
        self.params, self.folds = {}, {}
        started = time.perf_counter()
        for task, y in y_cal.items():
            self.params[task] = fit_irt(y.astype(np.float64), irt_model, dims=dims, seed=0, prior_rows=prior_rows)
            self.folds[task] = (cross_validation_folds(y, self.mixing_rows, n_folds, model=irt_model, dims=dims, seed=0,
                                                       empirical_prior=empirical_prior)
                                if mixing_method == "cv" else None)
        self.seconds = time.perf_counter() - started


def estimate_held_out(fits: TaskFits, y_cal: dict, y_held: dict, n: int, method: str, seed: int):
    """{task: {estimator: (H,) estimates}}, {task: fitted CompressedEstimator}; None if n cannot be drawn."""
    from evomerge.fitness.calibrate import fit_task_calibration

    values, fitted_all = {}, {}
    for task, y in y_cal.items():
        try:
            fitted = fit_task_calibration(
                y, fits.ends, fits.mixing_rows, n=n, subset_method=method, subset_seed=seed,
                irt_model=fits.irt_model, irt_dims=fits.dims, empirical_prior=fits.empirical_prior,
                mixing_method=fits.mixing_method, n_folds=fits.n_folds,
                item_params=fits.params[task], folds=fits.folds[task])
        except ValueError as exc:  # e.g. fewer distinct item embeddings than anchors
            print(f"  skipped {task} n={n} {method}: {exc}", file=sys.stderr)
            return None, None
        rows = [fitted.estimate_all(r[fitted.subset.items]) for r in y_held[task]]
        values[task] = {name: np.array([r[name].value for r in rows]) for name in rows[0]}
        fitted_all[task] = fitted
    return values, fitted_all


def metrics(values: dict, truth: dict) -> dict[str, tuple[float, float, float]]:
    """estimator -> (MAE over tasks and merges, mean per-task Spearman, Spearman of the task mean)."""
    from scipy.stats import spearmanr

    tasks = list(truth)
    out = {}
    for name in values[tasks[0]]:
        errors = np.concatenate([values[t][name] - truth[t] for t in tasks])
        rho = np.mean([spearmanr(values[t][name], truth[t])[0] for t in tasks])
        mean_est = np.mean([values[t][name] for t in tasks], axis=0)
        mean_true = np.mean([truth[t] for t in tasks], axis=0)
        out[name] = (float(np.abs(errors).mean()), float(rho), float(spearmanr(mean_est, mean_true)[0]))
    return out


def averaged(runs: list[dict]) -> dict[str, tuple[float, ...]]:
    return {name: tuple(float(np.mean([r[name][i] for r in runs])) for i in range(3)) for name in runs[0]}


# ------------------------------------------------------------------------------- Mergenetic


MERGENETIC_WORKER = "--mergenetic-worker"


def mergenetic_worker(inp: str, out: str) -> None:
    """Runs under Mergenetic's venv: its estimators on our exported subsets and item parameters.

    Each task is presented to Mergenetic as a one-scenario tinyBenchmarks dictionary ("gsm8k",
    one subscenario, so its balance weights are 1): A = a, B = a b (its logit is sum(A theta - B)),
    endpoint abilities read by `estimate_theta_anchors` from their answers on every item, as
    Mergenetic's pipeline does, then `estimate_fitness` (mp-IRT / gmp-IRT with delta = 0.5) and,
    for n = 20, tinyBenchmarks' `evaluate` (p-IRT, gp-IRT with our fitted mixing weight).
    """
    import io
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):  # "PROJECT_ROOT IS HARCODED ..."
        from mergenetic.estimator.utils import estimate_fitness, estimate_theta_anchors, evaluate
    data = np.load(inp)
    cases = sorted({k.split("/")[0] for k in data.files})
    results = {}
    for case in cases:
        a, b = data[f"{case}/a"], data[f"{case}/b"]
        n_items = a.shape[0]
        items, weights = data[f"{case}/items"].tolist(), data[f"{case}/weights"]
        # ours: sigmoid(a . theta - |a| b); tinyBenchmarks: sigmoid(sum_d theta_d A_d - B), A (1, D, n)
        a2 = a.reshape(n_items, -1)
        tb = {"lb": {
            "irt_parameters": {"A": a2.T.reshape(1, a2.shape[1], n_items),
                               "B": (np.linalg.norm(a2, axis=1) * b).reshape(1, 1, -1)},
            "scenarios_position": {"gsm8k": list(range(n_items))},
            "subscenarios_position": {"gsm8k": {"all": list(range(n_items))}},
            "seen_examples": items,
            "examples_weights": {"gsm8k": weights},
            "optimal_lambdas": {"gsm8k": float(data[f"{case}/gp_mixing_weight"])},  # tinyBenchmarks' name
        }}
        thetas = [estimate_theta_anchors(row.astype(float), "gsm8k", list(range(n_items)), tb)
                  for row in data[f"{case}/endpoints"]]
        held = data[f"{case}/held"]  # (H, n) subset answers
        mp, gmp, pirt, gpirt = [], [], [], []
        for y in held.astype(float):
            est = estimate_fitness(y, thetas, "gsm8k", items, weights, tb)
            mp.append(est["mpirt"])
            gmp.append(est["gmpirt"])
            if len(items) == 20:
                ev = evaluate(y, "gsm8k", tb)["gsm8k"]
                pirt.append(ev["pirt"])
                gpirt.append(ev["gpirt"])
        results[f"{case}/mp-IRT"] = np.array(mp)
        results[f"{case}/gmp-IRT"] = np.array(gmp)
        if pirt:
            results[f"{case}/p-IRT"] = np.array(pirt)
            results[f"{case}/gp-IRT"] = np.array(gpirt)
    np.savez(out, **results)


def run_mergenetic(python: str, cases: dict) -> dict | None:
    """cases: case -> {task: (fitted, y_cal, y_held_subset)}; returns case -> task -> {name: (H,)}."""
    CACHE.mkdir(parents=True, exist_ok=True)
    inp, out = CACHE / "mergenetic_in.npz", CACHE / "mergenetic_out.npz"
    arrays = {}
    for case, per_task in cases.items():
        for task, (fitted, endpoints, held) in per_task.items():
            key = f"{case}|{task}"
            arrays[f"{key}/a"] = fitted.item_params.discrimination
            arrays[f"{key}/b"] = fitted.item_params.difficulty
            arrays[f"{key}/items"] = fitted.subset.items
            arrays[f"{key}/weights"] = fitted.subset.weights
            arrays[f"{key}/gp_mixing_weight"] = np.array(fitted.mixing_weights["gp-IRT"])
            arrays[f"{key}/endpoints"] = endpoints
            arrays[f"{key}/held"] = held
    np.savez(inp, **arrays)
    started = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), MERGENETIC_WORKER, str(inp), str(out)],
                          capture_output=True, text=True, cwd=CACHE, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        print(f"Mergenetic run failed ({python}):\n{proc.stderr[-2000:]}")
        return None
    print(f"(Mergenetic estimators ran in {time.perf_counter() - started:.0f}s under {python})")
    results: dict = {}
    with np.load(out) as data:
        for key in data.files:
            case_task, name = key.rsplit("/", 1)
            case, task = case_task.split("|")
            results.setdefault(case, {}).setdefault(task, {})[name] = data[key]
    return results


# ------------------------------------------------------------------------------- main


def calibration_choices(args, calibration, default_fits, y_held, truth, ends, seeds, r0, n_endpoints,
                        seconds_per_model) -> None:
    """(c): accuracy at n = 20 and cost of each calibration choice (size, IRT model, mixing method, folds)."""
    from evomerge.fitness.calibrate import DEFAULT_FOLDS, DEFAULT_IRT_DIMS, DEFAULT_IRT_MODEL

    print(f"\n(c) calibration choices at n=20 (MAE / Spearman / Spearman of the mean; mean over {len(seeds)} seeds); "
          f"cost = scoring ({seconds_per_model:.2f}s per model) + fitting")
    # (R, irt model, dims, prior, mixing method, folds)
    D = DEFAULT_IRT_DIMS
    default = (r0, DEFAULT_IRT_MODEL, D, "empirical", "cv", DEFAULT_FOLDS)
    variants = [(r, DEFAULT_IRT_MODEL, D, "empirical", "cv", DEFAULT_FOLDS) for r in (6, 8, 10, 16, 24, 36, 64)]
    variants += [(r0, DEFAULT_IRT_MODEL, D, "standard", "cv", DEFAULT_FOLDS),
                 (r0, DEFAULT_IRT_MODEL, 1, "empirical", "cv", DEFAULT_FOLDS),
                 (r0, DEFAULT_IRT_MODEL, 3, "empirical", "cv", DEFAULT_FOLDS),
                 (r0, DEFAULT_IRT_MODEL, D, "empirical", "bias-variance", 0),
                 (r0, DEFAULT_IRT_MODEL, D, "empirical", "cv", 3), (r0, DEFAULT_IRT_MODEL, D, "empirical", "cv", 10)]
    girth = [(r0, DEFAULT_IRT_MODEL, 1, "empirical", "cv", 3), (r0, "2pl", 1, "empirical", "cv", 3)]  # 4 fits/task
    variants = girth if args.girth_only else variants + (girth[1:] if args.girth else [])
    print(f"{'R':>3} {'irt':11} {'prior':9} {'mixing':14} {'cost(s)':>16} {'subset':11} {'gp-IRT':>19} {'gmp-IRT':>19} "
          f"{'best':>19}")
    for variant in variants:
        r, irt_model, dims, prior, mixing_method, folds = variant
        y_c, rows = calibration(r)
        fits = default_fits if variant == default else \
            TaskFits(y_c, ends, rows, irt_model, mixing_method, folds, dims, prior == "empirical")
        scoring = (n_endpoints + r) * seconds_per_model
        for method in SUBSET_METHODS:
            runs = [metrics(v, truth) for v in (estimate_held_out(fits, y_c, y_held, 20, method, s)[0]
                                                for s in (seeds[:1] if method in DETERMINISTIC else seeds))
                    if v is not None]
            row = averaged(runs)
            best = min(row, key=lambda name: row[name][0])
            label = mixing_method + (f"/{folds}" if mixing_method == "cv" else "")
            irt_label = irt_model + (f" D={dims}" if dims > 1 else "")
            print(f"{r:>3} {irt_label:11} {prior:9} {label:14} {scoring:6.0f}+{fits.seconds:6.1f}={scoring + fits.seconds:4.0f} "
                  f"{method:11} {fmt(row['gp-IRT']):>19} {fmt(row['gmp-IRT']):>19} {fmt(row[best]):>19} {best}")


def fmt(m: tuple[float, float, float]) -> str:
    return f"{m[0]:.4f} {m[1]:5.3f} {m[2]:5.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default="zoo/small", type=Path)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="subset seeds averaged per configuration")
    parser.add_argument("--mergenetic-python", default=None)
    parser.add_argument("--girth", action="store_true", help="also time girth's 2PL (minutes per fit)")
    parser.add_argument("--girth-only", action="store_true", help="only the girth rows of (c)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for scoring (1: on a shared 2-core box, 2 threads ran 5-10x slower)")
    parser.add_argument("--accounting", action="store_true",
                        help="issue 16: item evaluations at the budgets used, estimators at equal total cost on "
                             "held-out merges and real searches' candidates; writes benchmarks/results/"
                             "fitness_accounting_<label>.json")
    parser.add_argument("--label", default=None, help="--accounting: the JSON's label (default: the zoo's size)")
    parser.add_argument("--record", nargs="*", type=Path, default=None,
                        help="regenerate RESULTS.md's fitness_accounting block from these JSON files (default: all)")
    args = parser.parse_args()
    if args.record is not None:
        return record(args.record or sorted(RESULTS_JSON.parent.glob("fitness_accounting_*.json")))
    if args.accounting:
        return accounting(args)
    import torch

    torch.set_num_threads(args.threads)
    from evomerge.fitness.calibrate import (
        DEFAULT_FOLDS,
        DEFAULT_IRT_DIMS,
        DEFAULT_IRT_MODEL,
        DEFAULT_RANDOM_MERGES,
        endpoint_coefficients,
        random_task_level_coefficients,
    )

    manifest, tasks = zoo_tasks(args.zoo)
    k = len(manifest.experts)
    endpoints = endpoint_coefficients(k)
    calibration_pool = random_task_level_coefficients(k, MAX_CALIBRATION_MERGES, WEIGHT_BOUNDS, DENSITY_BOUNDS, 0)
    held_out = random_task_level_coefficients(k, args.held_out, WEIGHT_BOUNDS, DENSITY_BOUNDS, 1)
    y_pool, pool_seconds = scored_population(manifest, tasks, "calibration", endpoints + calibration_pool)
    y_held, held_seconds = scored_population(manifest, tasks, "held_out", held_out)
    seconds_per_model = (pool_seconds + held_seconds) / (len(endpoints) + len(calibration_pool) + len(held_out))
    truth = {t: y.mean(axis=1) for t, y in y_held.items()}
    n_total = {t: y.shape[1] for t, y in y_held.items()}
    ends = list(range(len(endpoints)))
    seeds = list(range(args.seeds))

    def calibration(r: int) -> tuple[dict, list[int]]:
        return {t: y[: len(endpoints) + r] for t, y in y_pool.items()}, list(range(len(endpoints), len(endpoints) + r))

    print(f"zoo {args.zoo} ({manifest.size}, content {manifest.content_hash[:12]}): tasks "
          + ", ".join(f"{t} {n_total[t]} items" for t in n_total)
          + f"; scoring one model on all of them takes {seconds_per_model:.2f}s")
    gaps = manifest_accuracy_gaps(manifest, tasks)
    print("zoo presets vs zoo.json validation accuracies of the base and experts: "
          + ("identical" if not gaps else "DIFFERENT: " + "; ".join(gaps)))
    print("held-out merges: " + ", ".join(f"{t} accuracy {truth[t].min():.2f}..{truth[t].max():.2f} "
                                          f"(mean {truth[t].mean():.2f})" for t in truth)
          + f"; {args.held_out} merges, seed 1")

    # (a) the default calibration, every n, method and estimator
    r0 = DEFAULT_RANDOM_MERGES
    y_cal, mixing_rows = calibration(r0)
    default_fits = TaskFits(y_cal, ends, mixing_rows, DEFAULT_IRT_MODEL, "cv", DEFAULT_FOLDS, DEFAULT_IRT_DIMS)
    if args.girth_only:
        return calibration_choices(args, calibration, default_fits, y_held, truth, ends, seeds, r0,
                                   len(endpoints), seconds_per_model)
    print(f"\n(a) default calibration: {len(endpoints)} endpoints + {r0} random merges, irt {DEFAULT_IRT_MODEL} "
          f"D={DEFAULT_IRT_DIMS}, mixing weights cv {DEFAULT_FOLDS}-fold on the random merges "
          f"(IRT + folds fitted in {default_fits.seconds:.1f}s); "
          f"mean over {len(seeds)} subset seeds (informative subsets are deterministic: one)")
    print("    MAE / Spearman per task (mean) / Spearman of the task mean")
    table: dict = {}
    export: dict = {}
    for n in SIZES:
        for method in SUBSET_METHODS:
            runs = []
            for seed in seeds[:1] if method in DETERMINISTIC else seeds:
                values, fitted = estimate_held_out(default_fits, y_cal, y_held, n, method, seed)
                if values is None:
                    continue
                runs.append(metrics(values, truth))
                if seed == 0:
                    export[f"n{n}-{method}"] = {t: (fitted[t], y_cal[t][ends], y_held[t][:, fitted[t].subset.items])
                                                for t in fitted}
                    table[(n, method, "values")] = values
            if runs:
                table[(n, method)] = averaged(runs)
    names = list(next(v for k_, v in table.items() if len(k_) == 2))
    print(f"{'n':>4} {'subset':11} " + " ".join(f"{name:>19}" for name in names))
    for n in SIZES:
        for method in SUBSET_METHODS:
            if (n, method) not in table:
                print(f"{n:>4} {method:11} (cannot draw this subset)")
                continue
            row = table[(n, method)]
            best = min(row, key=lambda name: row[name][0])
            print(f"{n:>4} {method:11} " + " ".join(f"{fmt(row[name]):>19}" for name in names) + f"   best {best}")

    # (b) item evaluations
    calibration_models = len(endpoints) + r0
    full = sum(n_total.values())
    amortised = calibration_models * full / SEARCH_CANDIDATES
    print(f"\n(b) item evaluations per candidate (full splits: {full}; calibration {calibration_models} models x "
          f"{full} items / {SEARCH_CANDIDATES} candidates = {amortised:.1f})")
    for n in SIZES:
        subset = n * len(n_total)
        print(f"  n={n:>3}/task: {subset:>3} subset + {amortised:.1f} calibration = {subset + amortised:6.1f} "
              f"-> {full / (subset + amortised):5.1f}x fewer ({full / subset:5.1f}x without calibration)")

    # (c) calibration choices at n = 20
    calibration_choices(args, calibration, default_fits, y_held, truth, ends, seeds, r0, len(endpoints),
                        seconds_per_model)

    # (d) Mergenetic side by side
    if args.mergenetic_python:
        theirs = run_mergenetic(args.mergenetic_python, export)
        if theirs is not None:
            print("\n(d) Mergenetic (MERGE^3) estimators on the same responses, subsets and item parameters "
                  "(subset seed 0; MAE / Spearman / Spearman of the mean)")
            print(f"{'n':>4} {'subset':11} {'estimator':9} {'ours':>19} {'Mergenetic':>19}")
            for case in export:
                n, method = int(case.split("-")[0][1:]), case.split("-", 1)[1]
                ours = metrics(table[(n, method, "values")], truth)
                for name in ("p-IRT", "gp-IRT", "mp-IRT", "gmp-IRT"):
                    if name not in theirs[case][next(iter(theirs[case]))]:
                        continue
                    mg = metrics({t: {name: theirs[case][t][name]} for t in truth}, truth)[name]
                    print(f"{n:>4} {method:11} {name:9} {fmt(ours[name]):>19} {fmt(mg):>19}")


# ------------------------------------------------------------------------------- issue 16: accounting


DEMO_CALIBRATION = Path("fitness/examples/zoo_small_calibration.yaml")
DEMO_RUN = Path("search_spaces/examples/zoo_small_run.yaml")
SEARCH_STRATEGIES = ("random", "m2n2", "map")
SEARCH_SETTINGS = {"random": {"batch_size": 10}, "m2n2": {"archive_size": 20, "batch_size": 4},
                   "map": {"batch_size": 8, "terms": "auto"}}  # as benchmarks/search_quality.py runs them
SEARCH_BUDGET = 96  # candidates per strategy (whole batches: random's last batch may run over)
RESULTS_JSON = ROOT / "results" / "fitness_accounting_{label}.json"
RESULTS_MD = ROOT / "RESULTS.md"
MARK_BEGIN, MARK_END = "<!-- fitness_accounting:begin -->", "<!-- fitness_accounting:end -->"
RANDOM_MEAN_SEEDS = 10


def demo_settings(root: Path) -> dict:
    """The demo's budget, read from its calibration preset, run config and `evomerge.demo.FINALISTS`."""
    import yaml

    from evomerge.demo import FINALISTS

    cal = yaml.safe_load((root / DEMO_CALIBRATION).read_text())
    run = yaml.safe_load((root / DEMO_RUN).read_text())
    return {"random_merges": int(cal["calibration"]["random_merges"]), "n": int(cal["subset"]["n"]),
            "subset_method": cal["subset"]["method"], "estimator": cal["estimator"],
            "candidates": int(run["budget"]["evaluations"]), "finalists": int(FINALISTS),
            "optimizer": run["optimizer"]["name"], "search_space": run["search_space"]}


def budgets(demo: dict, n_endpoints: int) -> list[dict]:
    """The budgets actually used: the demo's, the search benchmark's 150 candidates and 500 (defaults n = 20)."""
    from evomerge.fitness.calibrate import DEFAULT_RANDOM_MERGES, DEFAULT_SUBSET_METHOD

    rows = [{"label": "demo", "candidates": demo["candidates"], "n": demo["n"], "random_merges": demo["random_merges"],
             "subset_method": demo["subset_method"]},
            # the most items per task at which the demo's search still saves 10x (issue 16's target)
            {"label": "demo at 10x (n=40)", "candidates": demo["candidates"], "n": 40,
             "random_merges": demo["random_merges"], "subset_method": demo["subset_method"]}]
    rows += [{"label": f"{b} candidates", "candidates": b, "n": 20, "random_merges": DEFAULT_RANDOM_MERGES,
              "subset_method": DEFAULT_SUBSET_METHOD} for b in (150, 500)]
    for row in rows:
        row["calibration_models"] = n_endpoints + row["random_merges"]
        row["finalists"] = demo["finalists"]
    return rows


def item_accounting(budget: dict, n_total: dict) -> dict:
    """Total item evaluations of a search: calibration (models x full splits) + candidates x subset items
    + finalists x full splits; against every candidate on the full splits. The random-subset baseline
    spends the calibration's items on its candidates instead: n + floor(calibration items per task / B)."""
    full = sum(n_total.values())
    tasks = len(n_total)
    c, b, n, f = budget["calibration_models"], budget["candidates"], budget["n"], budget["finalists"]
    calibration, search, finalists = c * full, b * n * tasks, f * full
    total = calibration + search + finalists
    per_task = min(n_total.values())
    n_equal = n + (c * per_task) // b
    return {"full_split_items": full, "calibration": calibration, "search": search, "finalists": finalists,
            "total": total, "all_full": b * full, "saving": b * full / total,
            "saving_without_finalists": b * full / (calibration + search),
            "random_mean_n": min(n_equal, per_task),
            "random_mean_total": b * min(n_equal, per_task) * tasks + finalists}


def score_genomes(materializer, space, scorers, genomes) -> dict[str, np.ndarray]:
    """task -> (len(genomes), items) 0/1 full-split answers of per-layer genomes."""
    out = {task: [] for task in scorers}
    for g in genomes:
        decoded = space.decode(np.asarray(g, dtype=np.float64))
        model = materializer.apply(decoded.method, decoded.coefficients(materializer.layer_map),
                                   **decoded.materializer_settings())
        for task, scorer in scorers.items():
            out[task].append(np.asarray(scorer(model), dtype=np.int8))
    return {t: np.vstack(rows) for t, rows in out.items()}


def per_layer_space(manifest):
    from evomerge.merge.checkpoint import ModelFolder
    from evomerge.merge.layers import LayerMap
    from evomerge.search.space import SearchSpace

    base = ModelFolder.open(str(manifest.base_path))
    return SearchSpace.load("task_arithmetic_per_layer").bind(LayerMap.from_config(base.config).num_layers,
                                                               len(manifest.experts))


def endpoint_mask(manifest, genomes: np.ndarray) -> np.ndarray:
    """Which genomes are the base or one expert alone (weight 1 in every layer): calibration models."""
    space = per_layer_space(manifest)
    k = len(manifest.experts)
    ends = [space.task_level_genome({"weight": w.tolist()}) for w in [np.zeros(k), *np.eye(k)]]
    return np.array([any(np.allclose(g, e) for e in ends) for g in genomes])


def search_candidates(manifest, tasks, strategy: str, guide: dict, estimator: str, seed: int = 0):
    """A short per-layer search (corners first, as the demo) guided by the demo's compressed fitness,
    every candidate scored on the whole fitness split once (the truth; the guide reads its subset items).
    Cached in benchmarks/.cache by zoo, strategy, budget and the guide's subsets."""
    from evomerge.fitness.calibrate import population_scorers
    from evomerge.runs.search import MAX_CORNERS
    from evomerge.search.optimizers import OPTIMIZERS
    from evomerge.search.optimizers._registry import make_optimizer

    key_parts = [manifest.content_hash, strategy, SEARCH_SETTINGS[strategy], SEARCH_BUDGET, seed, estimator,
                 {t: f.subset.items.tolist() for t, f in guide.items()}]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = CACHE / f"fitness_search_{strategy}_{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["genomes"], {t.name: data[t.name] for t in tasks}, float(data["seconds"])
    space = per_layer_space(manifest)
    materializer, scorers, _ = population_scorers(tasks, str(manifest.base_path), [str(p) for p in manifest.expert_paths])
    settings = {"gene_blocks": space.gene_blocks.tolist(), **SEARCH_SETTINGS[strategy]}
    capacity = OPTIMIZERS[strategy].initial_capacity(settings) or MAX_CORNERS
    settings["initial_genomes"] = [tuple(g) for g in space.corner_genomes(capacity).tolist()]
    opt = make_optimizer(strategy, space.dim, space.bounds, len(tasks), seed=seed, **settings)
    genomes, answers = [], {t.name: [] for t in tasks}
    started = time.perf_counter()
    while len(genomes) < SEARCH_BUDGET:
        asked = opt.ask()
        full = score_genomes(materializer, space, scorers, asked)
        objectives = np.array([[guide[t].estimate(estimator, full[t][i, guide[t].subset.items]).value
                                for t in full] for i in range(len(asked))])
        seen = np.hstack([full[t][:, guide[t].subset.items] for t in full]).astype(np.float64)
        opt.tell(asked, objectives, seen)
        genomes.extend(np.asarray(asked).tolist())
        for t in full:
            answers[t].append(full[t])
        print(f"[search {strategy}] {len(genomes)}/{SEARCH_BUDGET} ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    seconds = time.perf_counter() - started
    responses = {t: np.vstack(rows) for t, rows in answers.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, genomes=np.asarray(genomes), seconds=seconds, **responses)
    return np.asarray(genomes), responses, seconds


def error_metrics(est: dict, truth: dict, rows: np.ndarray | None = None, pairs: dict | None = None) -> dict:
    """MAE over tasks x candidates, mean per-task Spearman, Spearman of the task mean (rows: candidate
    indices; pairs: task -> candidate indices, for MAE only, e.g. candidates above every calibration model)."""
    from scipy.stats import spearmanr

    tasks = list(truth)
    if pairs is not None:
        errs = np.concatenate([est[t][pairs[t]] - truth[t][pairs[t]] for t in tasks])
        return {"mae": float(np.abs(errs).mean()) if errs.size else None, "count": int(errs.size)}
    idx = np.arange(len(truth[tasks[0]])) if rows is None else rows
    errs = np.concatenate([est[t][idx] - truth[t][idx] for t in tasks])
    rho_t = [spearmanr(est[t][idx], truth[t][idx])[0] for t in tasks]
    mean_e = np.mean([est[t][idx] for t in tasks], axis=0)
    mean_t = np.mean([truth[t][idx] for t in tasks], axis=0)
    return {"mae": float(np.abs(errs).mean()), "spearman_task": float(np.nanmean(rho_t)),
            "spearman_mean": float(spearmanr(mean_e, mean_t)[0]), "count": int(len(idx))}


def nanmean(values) -> float | None:
    """Mean over subset seeds of a metric that is undefined (NaN) for a seed whose estimates are all equal."""
    values = np.asarray(values, dtype=np.float64)
    return None if np.isnan(values).all() else float(np.nanmean(values))


def accounting(args) -> None:
    """Issue 16, items 1, 2, 5: item evaluations at the budgets used, and every estimator against a random
    subset mean at equal total item evaluations, on held-out merges and on candidates of real searches."""
    import torch

    torch.set_num_threads(args.threads)
    from evomerge.fitness.calibrate import DEFAULT_FOLDS, DEFAULT_IRT_DIMS, DEFAULT_IRT_MODEL, \
        endpoint_coefficients, random_task_level_coefficients

    started = time.perf_counter()
    manifest, tasks = zoo_tasks(args.zoo)
    k = len(manifest.experts)
    endpoints = endpoint_coefficients(k)
    demo = demo_settings(ROOT.parent)
    r_max = max(demo["random_merges"], 10)
    pool = random_task_level_coefficients(k, MAX_CALIBRATION_MERGES, WEIGHT_BOUNDS, DENSITY_BOUNDS, 0)[:r_max]
    y_pool, pool_seconds = scored_population(manifest, tasks, "calibration_acc", endpoints + pool)
    held_out = random_task_level_coefficients(k, args.held_out, WEIGHT_BOUNDS, DENSITY_BOUNDS, 1)
    y_held, held_seconds = scored_population(manifest, tasks, "held_out", held_out)
    n_total = {t: y.shape[1] for t, y in y_held.items()}
    ends = list(range(len(endpoints)))

    def calibration(r: int):
        return {t: y[: len(endpoints) + r] for t, y in y_pool.items()}, list(range(len(endpoints), len(endpoints) + r))

    plan = budgets(demo, len(endpoints))
    fits_by_r = {}
    for b in plan:
        r = b["random_merges"]
        if r not in fits_by_r:
            y_c, rows = calibration(r)
            fits_by_r[r] = (y_c, TaskFits(y_c, ends, rows, DEFAULT_IRT_MODEL, "cv", DEFAULT_FOLDS, DEFAULT_IRT_DIMS))
    # the demo's compressed fitness (subset seed 0) guides the searches
    y_c, fits = fits_by_r[demo["random_merges"]]
    _, guide = estimate_held_out(fits, y_c, {t: y[:1] for t, y in y_held.items()}, demo["n"], demo["subset_method"], 0)
    search = {}
    for strategy in SEARCH_STRATEGIES:
        genomes, resp, secs = search_candidates(manifest, tasks, strategy, guide, demo["estimator"])
        search[strategy] = {"genomes": genomes, "responses": resp, "seconds": secs,
                            "endpoint": endpoint_mask(manifest, genomes)}
    # drop the endpoints (the corners "base" and "one expert at weight 1" are calibration models: in-sample)
    sets = {"held-out merges": y_held}
    for strategy, s in search.items():
        sets[f"search: {strategy}"] = {t: y[~s["endpoint"]] for t, y in s["responses"].items()}
    sets["search: all"] = {t: np.vstack([sets[f"search: {s}"][t] for s in SEARCH_STRATEGIES]) for t in n_total}
    truth = {name: {t: y.mean(axis=1) for t, y in ys.items()} for name, ys in sets.items()}
    y_c_demo, _ = calibration(demo["random_merges"])
    cal_best = {t: y.mean(axis=1).max() for t, y in y_c_demo.items()}
    cal_best_mean = float(np.mean([y.mean(axis=1) for y in y_c_demo.values()], axis=0).max())
    subsets_of = {}
    for name in ("held-out merges", "search: all"):
        mean_t = np.mean([truth[name][t] for t in n_total], axis=0)
        top = np.argsort(-mean_t)[: max(2, int(np.ceil(len(mean_t) / 10)))]
        subsets_of[f"{name} / top decile"] = ("rows", name, np.sort(top))
        above = np.flatnonzero(mean_t > cal_best_mean)
        subsets_of[f"{name} / mean above every calibration model"] = ("rows", name, above)
        subsets_of[f"{name} / above every calibration model"] = (
            "pairs", name, {t: np.flatnonzero(truth[name][t] > cal_best[t]) for t in n_total})

    seeds = list(range(args.seeds))
    records = []
    for b in plan:
        acc = item_accounting(b, n_total)
        y_cal, fits = fits_by_r[b["random_merges"]]
        rows_out = []
        for method in ("anchors", "random"):
            per_seed = []
            for seed in seeds:
                est = {}
                for name, ys in sets.items():
                    values, _ = estimate_held_out(fits, y_cal, ys, b["n"], method, seed)
                    est[name] = values
                per_seed.append(est)
            for estimator in per_seed[0]["held-out merges"][next(iter(n_total))]:
                label = f"{estimator} ({method} n={b['n']}, {b['calibration_models']}-model calibration)"
                rows_out.append((label, [{name: {t: e[name][t][estimator] for t in n_total} for name in sets}
                                         for e in per_seed]))
        rng_rows = []
        n_eq = acc["random_mean_n"]
        for seed in range(RANDOM_MEAN_SEEDS):
            rng = np.random.default_rng([16, seed])
            items = {t: rng.choice(n_total[t], n_eq, replace=False) for t in n_total}
            rng_rows.append({name: {t: ys[t][:, items[t]].mean(axis=1) for t in n_total} for name, ys in sets.items()})
        rows_out.append((f"random subset mean, n={n_eq} (no calibration)", rng_rows))
        table = []
        for label, per_seed in rows_out:
            row = {"estimator": label, "sets": {}}
            for name in sets:
                ms = [error_metrics(e[name], truth[name]) for e in per_seed]
                row["sets"][name] = {key: float(np.mean([m[key] for m in ms])) for key in ("mae", "spearman_task", "spearman_mean")}
                row["sets"][name]["count"] = ms[0]["count"]
            for sub, (kind, base, sel) in subsets_of.items():
                if kind == "rows" and len(sel) < 5:  # no rank correlation on fewer than 5
                    ms = [error_metrics(e[base], truth[base], pairs={t: sel for t in n_total}) for e in per_seed]
                    row["sets"][sub] = {"mae": None if not len(sel) else float(np.mean([m["mae"] for m in ms])),
                                        "spearman_task": None, "spearman_mean": None, "count": len(sel)}
                elif kind == "rows":
                    ms = [error_metrics(e[base], truth[base], rows=sel) for e in per_seed]
                    row["sets"][sub] = {key: nanmean([m[key] for m in ms]) for key in ("mae", "spearman_task", "spearman_mean")}
                    row["sets"][sub]["count"] = ms[0]["count"]
                else:
                    ms = [error_metrics(e[base], truth[base], pairs=sel) for e in per_seed]
                    row["sets"][sub] = {"mae": None if ms[0]["mae"] is None else float(np.mean([m["mae"] for m in ms])),
                                        "count": ms[0]["count"]}
            table.append(row)
        records.append({"budget": b, "items": acc, "rows": table})
    out = {"zoo": str(args.zoo), "zoo_content": manifest.content_hash, "size": manifest.size,
           "tasks": n_total, "demo": demo, "seeds": len(seeds), "random_mean_seeds": RANDOM_MEAN_SEEDS,
           "held_out": args.held_out, "search_budget": SEARCH_BUDGET, "search_settings": SEARCH_SETTINGS,
           "search_candidates": {s: int(len(search[s]["genomes"])) for s in search},
           "search_candidates_kept": {s: int(len(sets[f"search: {s}"][next(iter(n_total))])) for s in search},
           "calibration_best": {t: float(v) for t, v in cal_best.items()}, "calibration_best_mean": cal_best_mean,
           "scoring_seconds": {"calibration": pool_seconds, "held_out": held_seconds,
                               **{s: search[s]["seconds"] for s in search}},
           "seconds": time.perf_counter() - started,
           "command": " ".join(["benchmarks/fitness_estimation.py", *sys.argv[1:]]),
           "budgets": records}
    path = Path(str(RESULTS_JSON).format(label=args.label or manifest.size))
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    print(render(out))


COLUMNS = [("held-out merges", True), ("held-out merges / top decile", True),
           ("held-out merges / mean above every calibration model", True), ("search: random", True),
           ("search: m2n2", True), ("search: map", True), ("search: all", True), ("search: all / top decile", True),
           ("search: all / mean above every calibration model", True)]


def render(out: dict) -> str:
    """The RESULTS.md block: item accounting per budget, then per budget every estimator's error on each set."""
    t = out["tasks"]
    lines = [f"**{out['zoo']}** (content `{out['zoo_content'][:12]}`; tasks " + ", ".join(f"{k} {v} items" for k, v in t.items())
             + f"; fitness split only, test sealed). Command: `.venv/bin/python {out['command']}`; scoring "
             + ", ".join(f"{k} {v:.0f} s" for k, v in out["scoring_seconds"].items())
             + f" (one torch thread; cached in benchmarks/.cache), this run {out['seconds']:.0f} s. Demo settings read from {DEMO_CALIBRATION} and {DEMO_RUN}: "
             f"{out['demo']['random_merges']} random merges + endpoints, {out['demo']['n']} {out['demo']['subset_method']} "
             f"items per task, {out['demo']['estimator']}, {out['demo']['candidates']} candidates "
             f"({out['demo']['optimizer']}, {out['demo']['search_space']}), {out['demo']['finalists']} finalists "
             "re-scored on the whole fitness split.", "",
             "Item evaluations per search (calibration = models x full splits; finalists = finalists x full splits; "
             "baseline = every candidate on the full splits). The random subset mean gets the calibration's items "
             "as extra items per candidate per task (n + calibration items per task / candidates):", "",
             "| budget | candidates | items/task | calibration | search | finalists | total | all full | saving | "
             "saving w/o finalists | random mean: items/task | random mean: total |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in out["budgets"]:
        b, a = rec["budget"], rec["items"]
        lines.append(f"| {b['label']} | {b['candidates']} | {b['n']} | {a['calibration']:,} | {a['search']:,} | "
                     f"{a['finalists']:,} | {a['total']:,} | {a['all_full']:,} | {a['saving']:.1f}x | "
                     f"{a['saving_without_finalists']:.1f}x | {a['random_mean_n']} | {a['random_mean_total']:,} |")
    kept = ", ".join(f"{s} {out['search_candidates_kept'][s]} of {out['search_candidates'][s]}" for s in out["search_candidates"])
    lines += ["", f"Error sets: {out['held_out']} held-out random task-level merges (seed 1); candidates of short per-layer "
              f"searches guided by the demo's compressed fitness, corners first, seed 0 ({kept}; the base and the "
              "experts alone are calibration models and left out); the top decile of each by true task-mean accuracy; "
              "and (candidate, task) pairs whose true accuracy exceeds every calibration model's on that task "
              "(best calibration accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in out["calibration_best"].items())
              + "; " + ", ".join(f"{out['budgets'][0]['rows'][0]['sets'][f'{n} / above every calibration model']['count']} "
                                 f"such pairs among the {n}" for n in ("held-out merges", "search: all"))
              + f"), and candidates whose true task mean exceeds every calibration model's "
              f"({out['calibration_best_mean']:.3f}). Cells: MAE / Spearman of the task mean (MAE / pairs where marked); mean over {out['seeds']} "
              f"subset seeds (random mean: {out['random_mean_seeds']} seeds).", ""]
    for rec in out["budgets"]:
        b, a = rec["budget"], rec["items"]
        first = rec["rows"][0]["sets"]
        head = []
        for col, ranked in COLUMNS:
            head.append(f"{col} ({first[col]['count']}{'' if ranked else ' pairs'})")
        lines += [f"*{b['label']}*: {a['total']:,} item evaluations for every row (random mean "
                  f"{a['random_mean_total']:,}).", "",
                  "| estimator | " + " | ".join(head) + " |", "|---|" + "---|" * len(COLUMNS)]
        for row in rec["rows"]:
            cells = []
            for col, ranked in COLUMNS:
                m = row["sets"][col]
                if ranked and m["spearman_mean"] is None:
                    cells.append("-" if m["mae"] is None else f"{m['mae']:.4f} / -")
                elif ranked:
                    cells.append(f"{m['mae']:.4f} / {m['spearman_mean']:.3f}")
                else:
                    cells.append("-" if m["mae"] is None else f"{m['mae']:.4f} / {m['count']}")
            lines.append(f"| {row['estimator']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def record(paths: list[Path]) -> None:
    """Regenerate the marked block of RESULTS.md from the committed raw JSON."""
    body = "\n\n".join(render(json.loads(p.read_text())) for p in paths)
    if MARK_BEGIN not in RESULTS_MD.read_text():  # this block is placed by hand, never appended
        raise SystemExit(f"{RESULTS_MD} has no {MARK_BEGIN} ... {MARK_END} block")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file
    from results_md import record_section

    record_section("fitness_accounting", body, RESULTS_MD)
    print(f"recorded {', '.join(map(str, paths))} in {RESULTS_MD}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == MERGENETIC_WORKER:
        mergenetic_worker(sys.argv[2], sys.argv[3])
    else:
        from evomerge.fitness.sealed import sealed_test

        with sealed_test("fitness_estimation: every number here chooses estimators and defaults"):
            main()
