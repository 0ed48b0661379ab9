"""Adaptive items (evomerge/fitness/adaptive.py) against the fixed subset, at equal items per candidate.

Usage: .venv/bin/python benchmarks/adaptive_items.py [--fitness fitness/zoo_small] [--label zoo_small]
       .venv/bin/python benchmarks/adaptive_items.py --held-out 64   # merges the calibration never saw
       .venv/bin/python benchmarks/adaptive_items.py --record     # RESULTS.md block from the JSON

Offline: it reads only the compressed fitness's stored full-split answers (`responses.npz`: every
calibration model on every item of every task's fitness split, i.e. validation; nothing else is
scored and no test split is read). Leave-one-model-out: for each task and each calibration model
r, the IRT model is refitted without r (same model, dimensions and empirical prior rows as the
fitness's calibration, `fit_irt(prior_rows=)` on the random merges left), so r's own answers are
never in the item parameters that score it, and r plays a candidate whose true accuracy is its
mean over the whole split. Per n items per task:

* fixed: the fitness's subset method (anchors), recalibrated without r with `fit_task_calibration`
  (5-fold mixing weights on the merges left), scored by every estimator; and random subsets
  (subset mean, 5 seeds);
* adaptive: `run_adaptive` without a standard-error stop, read after every batch; variants for
  the batch size and for how unseen pinned items are predicted.

Reported: MAE of the estimated task accuracy (mean over tasks and models; also over the random
merges alone), and for the fixed subset at the fitness's n and at 20, the fewest items per task at
which adaptive reaches its MAE (the target: at least 2x fewer). The stopping rule's operating
points (se threshold -> mean items used, MAE, stop reasons), and racing against the Pareto set of
the other models' true accuracies (items saved, and true Pareto members wrongly raced out).
Defaults in adaptive.py were chosen from these (validation) numbers.

`--held-out N` is the same comparison on N random task-level merges (seed 1) that the calibration
never saw, scored once with the zoo on the fitness split (cached in benchmarks/.cache/, shared with
benchmarks/fitness_estimation.py), against the fitness's own IRT fit and subsets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
SIZES = (5, 10, 15, 20, 30, 40, 60, 80, 100)
RANDOM_SEEDS = 5
RACING_Z = (1.96, 3.0)
THRESHOLDS = (0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04)
VARIANTS = {"b5": {"batch_size": 5}, "b1": {"batch_size": 1}, "b10": {"batch_size": 10},
            "b5_pinned_irt": {"batch_size": 5, "pinned": "irt"}}
COMMAND = ".venv/bin/python benchmarks/adaptive_items.py --fitness fitness/zoo_small --label zoo_small"


def load(fitness_dir: Path):
    body = json.loads((fitness_dir / "fitness.json").read_text())
    with np.load(fitness_dir / "responses.npz", allow_pickle=False) as z:
        responses = {t: z[f"task_{t}"].astype(np.float64) for t in body["tasks"]}
        ends, mixing = z["endpoint_rows"].tolist(), z["mixing_rows"].tolist()
    return body, responses, ends, mixing


def trajectory(y, params, settings, limit):
    """value after every batch of one adaptive test with no se stop: {items used: value}."""
    from evomerge.fitness.adaptive import AdaptiveTest

    test, out = AdaptiveTest(), {}
    while test.stop is None:
        batch = test.next_batch(params, settings, limit=limit)
        if batch.size:
            test.record(batch, y[batch], params, settings, limit=limit)
            out[test.used] = (test.value, test.stderr)
    return out


def measure_rows(task, Y_train, t_ends, t_mix, targets, irt, subset_method) -> list[dict]:
    """Fit the IRT model, the mixing folds and the fixed subsets on `Y_train` (as the fitness's calibration
    does), then estimate every target (key, answers over the whole split, is a random merge) every way."""
    from evomerge.fitness.adaptive import AdaptiveSettings, run_adaptive
    from evomerge.fitness.calibrate import fit_task_calibration
    from evomerge.fitness.estimators import cross_validation_folds
    from evomerge.fitness.irt import fit_irt
    from evomerge.fitness.subsets import select_items

    empirical = irt["prior"] == "empirical"
    params = fit_irt(Y_train, irt["model"], dims=irt["dims"], seed=0, prior_rows=t_mix if empirical else None)
    folds = cross_validation_folds(Y_train, t_mix, 5, model=irt["model"], dims=irt["dims"], seed=0,
                                   empirical_prior=empirical)
    fixed = {n: fit_task_calibration(Y_train, t_ends, t_mix, n=n, subset_method=subset_method, subset_seed=0,
                                     irt_model=irt["model"], irt_dims=irt["dims"], empirical_prior=empirical,
                                     item_params=params, folds=folds) for n in SIZES}
    max_n, n_items = max(SIZES), Y_train.shape[1]
    rows = []
    for key, y, merge in targets:
        row = {"task": task, "model": key, "merge": merge, "truth": float(y.mean()), "fixed": {}, "random": {},
               "adaptive": {}, "stopping": {}}
        for n in SIZES:
            row["fixed"][n] = {k: e.value for k, e in fixed[n].estimate_all(y[fixed[n].subset.items]).items()}
            row["random"][n] = [float(y[select_items(n, "random", seed=s, n_items=n_items).items].mean())
                                for s in range(RANDOM_SEEDS)]  # one estimate per seed
        for name, overrides in VARIANTS.items():
            settings = AdaptiveSettings(max_items=max_n, min_items=0, se_threshold=1e-9, **overrides)
            row["adaptive"][name] = {n: v for n, (v, _) in trajectory(y, params, settings, max_n).items()}
        for threshold in THRESHOLDS:
            test = run_adaptive({task: lambda b, y=y: y[b]}, {task: params}, AdaptiveSettings(se_threshold=threshold))
            row["stopping"][threshold] = {"value": test[task].value, "used": test[task].used, "stop": test[task].stop}
        row["params"] = params  # dropped before saving; racing needs the fits
        rows.append(row)
    return rows


def main_measure(args, held_out: dict | None = None) -> dict:
    """Leave-one-model-out over the calibration models, or (`held_out`: task -> (merges, items) answers)
    the fitness's own calibration scoring merges it never saw."""
    body, responses, ends, mixing = load(args.fitness)
    irt = body["meta"]["irt"]
    tasks = list(body["tasks"])
    first = body["tasks"][tasks[0]]["estimator"]
    subset_method, fitness_n = first["subset"]["method"], first["subset"]["n"]
    started = time.perf_counter()
    rows = []  # one per (task, scored model)
    for task in tasks:
        Y = responses[task]
        if held_out is None:
            for r in range(Y.shape[0]):
                train = np.setdiff1d(np.arange(Y.shape[0]), [r])
                t_ends = [int(np.searchsorted(train, e)) for e in ends if e != r]
                t_mix = [int(np.searchsorted(train, m)) for m in mixing if m != r]
                rows += measure_rows(task, Y[train], t_ends, t_mix, [(r, Y[r], r in mixing)], irt, subset_method)
        else:
            H = held_out[task].astype(np.float64)
            rows += measure_rows(task, Y, ends, mixing, [(f"merge{i}", H[i], True) for i in range(H.shape[0])],
                                 irt, subset_method)
        print(f"  {task}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    by = {(row["task"], row["model"]): row for row in rows}
    keys = sorted({row["model"] for row in rows}, key=str)
    truth = {k: np.array([by[(t, k)]["truth"] for t in tasks]) for k in keys}
    answers = {k: {t: (responses[t][k] if held_out is None else held_out[t][int(k[5:])]) for t in tasks} for k in keys}
    if held_out is None:  # each model against the Pareto set of the others
        fronts = {k: np.array([truth[o] for o in keys if o != k]) for k in keys}
    else:  # each merge against the calibration models
        calibration = np.array([[responses[t][m].mean() for t in tasks] for m in range(responses[tasks[0]].shape[0])])
        fronts = {k: calibration for k in keys}
    racing = {str(z): measure_racing(keys, tasks, by, truth, answers, fronts, z) for z in RACING_Z}
    for row in rows:
        row.pop("params")
    label = args.label if held_out is None else f"{args.label}_held_out{len(keys)}"
    protocol = ("each calibration model held out of the IRT fit in turn" if held_out is None else
                f"{len(keys)} random merges (seed 1) the calibration never saw, scored by the fitness's own fit")
    return summarize(rows, tasks, body["estimator"], subset_method, fitness_n, racing, label, protocol,
                     command=COMMAND + (f" --held-out {len(keys)}" if held_out is not None else ""),
                     seconds=time.perf_counter() - started)


def measure_racing(keys, tasks, by, truth, answers, fronts, z) -> dict:
    """Racing (other settings default) of each candidate against the Pareto set of `fronts[key]`'s true
    accuracies; "wrongly raced out" = the candidate is truly not dominated by that set."""
    from evomerge.fitness.adaptive import AdaptiveSettings, run_adaptive
    from evomerge.search.pareto import ParetoArchive

    out = {"candidates": len(keys), "raced_out": 0, "wrongly_raced_out": 0, "items": 0, "items_without_racing": 0}
    for k in keys:
        archive = ParetoArchive(len(tasks))
        for i, row in enumerate(fronts[k]):
            archive.add(i, row)
        front = archive.objectives
        reachable = not any(np.all(f >= truth[k]) and np.any(f > truth[k]) for f in front)
        scorers = {t: (lambda b, y=answers[k][t]: y[b]) for t in tasks}
        params = {t: by[(t, k)]["params"] for t in tasks}
        raced = run_adaptive(scorers, params, AdaptiveSettings(racing=True, z=z), front=front)
        plain = run_adaptive(scorers, params, AdaptiveSettings())
        out["items"] += sum(x.used for x in raced.values())
        out["items_without_racing"] += sum(x.used for x in plain.values())
        if any(x.stop == "raced" for x in raced.values()):
            out["raced_out"] += 1
            out["wrongly_raced_out"] += int(reachable)
    out["front"] = "the other models" if len(fronts[keys[0]]) == len(keys) - 1 else "the calibration models"
    return out


def summarize(rows, tasks, estimator, subset_method, fitness_n, racing, label, protocol, command,
              seconds) -> dict:
    groups = {"all": rows, "merges": [r for r in rows if r["merge"]]}
    mae: dict = {}
    for group, members in groups.items():
        truth = np.array([r["truth"] for r in members])
        g = mae[group] = {"fixed_" + name: {} for name in members[0]["fixed"][SIZES[0]]}
        g["random_subset"] = {}
        for name in VARIANTS:
            g["adaptive_" + name] = {}
        for n in SIZES:
            for name in members[0]["fixed"][n]:
                g["fixed_" + name][n] = float(np.mean(np.abs([r["fixed"][n][name] for r in members] - truth)))
            g["random_subset"][n] = float(np.mean(np.abs(np.array([r["random"][n] for r in members]) - truth[:, None])))
            for name in VARIANTS:
                if all(n in r["adaptive"][name] for r in members):
                    g["adaptive_" + name][n] = float(np.mean(np.abs([r["adaptive"][name][n] for r in members] - truth)))
        g["stopping"] = {str(th): {
            "mae": float(np.mean([abs(r["stopping"][th]["value"] - r["truth"]) for r in members])),
            "mean_items": float(np.mean([r["stopping"][th]["used"] for r in members])),
            "stops": {s: sum(r["stopping"][th]["stop"] == s for r in members) for s in ("se", "budget", "exhausted")}}
            for th in THRESHOLDS}
    reach = {}
    for group in groups:
        reach[group] = {}
        fixed = mae[group]["fixed_" + estimator]
        adaptive = mae[group]["adaptive_b5"]
        for n_ref in sorted({20, fitness_n}):
            target = fixed[n_ref]
            hit = [n for n in sorted(adaptive) if adaptive[n] <= target]
            rule = [(s["mean_items"], th) for th, s in mae[group]["stopping"].items() if s["mae"] <= target]
            fewest = min(rule) if rule else None
            reach[group][str(n_ref)] = {"fixed_mae": target, "adaptive_items": hit[0] if hit else None,
                                        "ratio": (n_ref / hit[0]) if hit else None,
                                        "se_rule_items": fewest[0] if fewest else None,
                                        "se_rule_threshold": fewest[1] if fewest else None,
                                        "se_rule_ratio": (n_ref / fewest[0]) if fewest else None}
    return {"label": label, "protocol": protocol, "command": command, "tasks": tasks,
            "models": len({r["model"] for r in rows}), "merges": len({r["model"] for r in rows if r["merge"]}),
            "estimator": estimator, "subset_method": subset_method, "fitness_n": fitness_n, "sizes": list(SIZES),
            "mae": _keys_to_str(mae), "reach": reach, "racing": racing, "seconds": seconds,
            "rows": compact_rows(_keys_to_str(rows))}


def compact_rows(rows: list[dict]) -> list[dict]:
    """Per-row estimates rounded to 5 decimals, adaptive trajectories of the default batch size only
    (the summaries above keep every variant at full precision)."""
    def rounded(x):
        if isinstance(x, float):
            return round(x, 5)
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x

    return [rounded({**r, "adaptive": {"b5": r["adaptive"]["b5"]}, "fixed": {
        n: {k: v for k, v in f.items() if k in ("subset", "gp-IRT")} for n, f in r["fixed"].items()}}) for r in rows]


def _keys_to_str(x):
    if isinstance(x, dict):
        return {str(k): _keys_to_str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_keys_to_str(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


def table() -> str:
    lines = []
    for path in sorted((ROOT / "results").glob("adaptive_items_*.json")):
        r = json.loads(path.read_text())
        sizes = [str(n) for n in r["sizes"]]
        lines += [f"**{r['label']}** (`{r['command']}`; {r['models']} models, {r['merges']} of them random merges: "
                  f"{r.get('protocol', 'each calibration model held out of the IRT fit in turn')}; tasks "
                  f"{', '.join(r['tasks'])}; fitness split only). "
                  f"MAE of the estimated task accuracy at n items per task:", "",
                  "| rows | method | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        groups = ("all", "merges") if r["models"] != r["merges"] else ("merges",)
        for group in groups:
            for name, values in r["mae"][group].items():
                if name == "stopping" or not (name.startswith("adaptive") or name in (
                        "fixed_subset", f"fixed_{r['estimator']}", "random_subset")):
                    continue
                cells = [f"{values[n]:.4f}" if n in values else "" for n in sizes]
                lines.append(f"| {group} | {name} | " + " | ".join(cells) + " |")
        lines += ["", "Ratio = fixed items / adaptive items (target: at least 2).", "",
                  f"Fixed = the fitness's {r['subset_method']} subset (estimator {r['estimator']}, and its plain "
                  "weighted mean `fixed_subset`); adaptive_bK = batches of K items, D-optimal at the current ability; "
                  "`pinned_irt` predicts unseen pinned items at the ability instead of by the population rate.", ""]
        for group in groups:
            for n_ref, hit in r["reach"][group].items():
                verdict = (f"adaptive reaches it at {hit['adaptive_items']} items per task (ratio {hit['ratio']:.2f})"
                           if hit["adaptive_items"] else f"adaptive does not reach it within {max(r['sizes'])} items")
                if hit.get("se_rule_items"):
                    verdict += (f"; with the se stopping rule, threshold {hit['se_rule_threshold']} uses "
                                f"{hit['se_rule_items']:.1f} items per task on average (ratio {hit['se_rule_ratio']:.2f})")
                else:
                    verdict += "; no se threshold reaches it"
                lines.append(f"- {group}: fixed {r['estimator']} at n={n_ref} has MAE {hit['fixed_mae']:.4f}; {verdict}.")
        lines += ["", "Stopping rule (min 10, max 60 items per task, batches of 5): se threshold -> mean items "
                  "per task, MAE, stops (se / budget / exhausted):", ""]
        lines += ["| rows | se threshold | mean items | MAE | se | budget | exhausted |", "|---|---|---|---|---|---|---|"]
        for group in groups:
            for th, s in r["mae"][group]["stopping"].items():
                lines.append(f"| {group} | {th} | {s['mean_items']:.1f} | {s['mae']:.4f} | {s['stops']['se']} | "
                             f"{s['stops']['budget']} | {s['stops']['exhausted']} |")
        for z, rc in r["racing"].items():
            lines += ["", f"Racing (other settings default, z = {z}) against the Pareto set of "
                      f"{rc.get('front', 'the other models')}' true accuracies: {rc['raced_out']} of {rc['candidates']} raced "
                      f"out, {rc['wrongly_raced_out']} of them truly on that Pareto set; items {rc['items']} against "
                      f"{rc['items_without_racing']} without racing."]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def record() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file
    from results_md import record_section

    record_section("adaptive_items", table(), ROOT / "RESULTS.md", heading="## Adaptive items (issue 16, item 3)")
    print(table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fitness", type=Path, default=REPO / "fitness" / "zoo_small")
    parser.add_argument("--label", default="zoo_small")
    parser.add_argument("--record", action="store_true", help="regenerate the RESULTS.md block from the JSON and exit")
    parser.add_argument("--held-out", type=int, default=0,
                        help="instead of leave-one-model-out: score N random merges (seed 1, the held-out merges of "
                             "benchmarks/fitness_estimation.py, cached with it) with the zoo the fitness was "
                             "calibrated on, on the fitness split, and score them with the fitness's own fit")
    parser.add_argument("--zoo", type=Path, default=REPO / "zoo" / "small")
    args = parser.parse_args()
    if args.record:
        record()
        return
    from evomerge.fitness.sealed import sealed_test

    with sealed_test("benchmarks/adaptive_items.py chooses the adaptive defaults"):
        result = main_measure(args, held_out_answers(args) if args.held_out else None)
    out = ROOT / "results" / f"adaptive_items_{result['label']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump(result))
    print(f"wrote {out}")
    print(table())


def dump(result: dict) -> str:
    """JSON with the summaries indented and one line per row."""
    head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in result["rows"])
    return head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def held_out_answers(args) -> dict:
    """task -> (merges, items) full fitness-split answers of `--held-out` random merges (cached)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import fitness_estimation as fe
    from evomerge.fitness.calibrate import random_task_level_coefficients
    from evomerge.fitness.compressed import CompressedFitness

    torch.set_num_threads(1)
    manifest, tasks = fe.zoo_tasks(args.zoo)
    fitness = CompressedFitness.load(args.fitness)
    stale = fitness.model_mismatches(str(manifest.base_path), [str(p) for p in manifest.expert_paths])
    if stale:
        raise SystemExit(f"{args.fitness} was calibrated on other models than {args.zoo}: {stale}")
    merges = random_task_level_coefficients(len(manifest.experts), args.held_out, fe.WEIGHT_BOUNDS, fe.DENSITY_BOUNDS, 1)
    answers, _ = fe.scored_population(manifest, tasks, "held_out", merges)
    return answers


if __name__ == "__main__":
    main()
