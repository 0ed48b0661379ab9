"""Racing against the Pareto set as a search hands it out: what the front a candidate races against
costs and saves, by the rule that fixes it (issue 16, item 3; evomerge/runs/search.py, "Racing").

Usage: .venv/bin/python benchmarks/racing_schedule.py      # measure, write the JSON and the RESULTS.md block
       .venv/bin/python benchmarks/racing_schedule.py --record   # the RESULTS.md block from the JSON

Offline, validation only: the candidates are those of the short per-layer searches of
benchmarks/fitness_estimation.py --accounting (random, M2N2, MAP on the small zoo, in the order the
optimizer asked them), each scored once on the whole fitness split of every task (its cache,
benchmarks/.cache/fitness_search_*.npz; no test split is read). Each candidate is replayed through
`run_adaptive` with the compressed fitness fitness/zoo_small's item parameters and the default
adaptive settings, in ask order; the search's archive holds the estimates (not the truth), as
`Search` does. Rules for the set candidate i races against:

* off: no racing;
* each candidate: the estimates of every candidate before it (one in-process worker scoring a
  generation one after another and updating the set as it goes; what the in-process backend did
  on the asynchronous schedule before the set travelled with the job);
* generations of G: the estimates of the earlier generations only (`schedule: generations`, every
  backend; G = the strategy's batch size);
* async, W workers: the estimates of the first max(0, i - W + 1) candidates (`schedule: async`:
  the set when i was asked, with results told in ask order).

Reported per strategy and z: item evaluations (and the saving against no racing), candidates raced
out, and how many of the candidates on the true Pareto set of the whole search (true validation
accuracy over the whole split) were raced out.
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
STRATEGIES = {"random": 10, "m2n2": 4, "map": 8}  # -> generation size (fitness_estimation.SEARCH_SETTINGS' batch_size)
WORKERS = 4
Z = (3.0, 1.96)
RESULTS_JSON = ROOT / "results" / "racing_schedule_zoo_small.json"
COMMAND = ".venv/bin/python benchmarks/racing_schedule.py"


def search_answers(strategy: str) -> tuple[Path, dict[str, np.ndarray]]:
    paths = sorted((ROOT / ".cache").glob(f"fitness_search_{strategy}_*.npz"))
    if len(paths) != 1:
        raise SystemExit(f"expected one benchmarks/.cache/fitness_search_{strategy}_*.npz, found {len(paths)}; "
                         "run benchmarks/fitness_estimation.py --accounting first (it writes them)")
    with np.load(paths[0]) as data:
        return paths[0], {k: data[k] for k in data.files if k not in ("genomes", "seconds")}


def front_rows(estimates: list[np.ndarray]) -> np.ndarray:
    """The archive's objectives after adding `estimates` in order (ParetoArchive, as the search adds them)."""
    from evomerge.search.pareto import ParetoArchive

    archive = ParetoArchive(None)
    for i, row in enumerate(estimates):
        archive.add(i, row)
    return archive.objectives


def replay(answers: dict[str, np.ndarray], params: dict, rule: str, size: int, z: float | None) -> dict:
    """Every candidate in ask order; `rule` off / candidate / generations / async; `size` G or W."""
    from evomerge.fitness.adaptive import AdaptiveSettings, run_adaptive

    tasks = list(answers)
    settings = AdaptiveSettings() if rule == "off" else AdaptiveSettings(racing=True, z=z)
    n = answers[tasks[0]].shape[0]
    estimates, used, raced = [], [], []
    for i in range(n):
        seen = {"off": lambda: 0, "candidate": lambda: i, "generations": lambda: (i // size) * size,
                "async": lambda: max(0, i - size + 1)}[rule]()  # how many earlier estimates the set holds
        front = front_rows(estimates[:seen]) if rule != "off" and seen else None
        scorers = {t: (lambda b, y=answers[t][i]: y[b]) for t in tasks}
        tests = run_adaptive(scorers, params, settings, front=front)
        estimates.append(np.array([tests[t].value for t in tasks]))
        used.append(sum(x.used for x in tests.values()))
        raced.append(any(x.stop == "raced" for x in tests.values()))
    return {"estimates": np.array(estimates), "used": np.array(used), "raced": np.array(raced)}


def true_pareto(truth: np.ndarray) -> np.ndarray:
    from evomerge.search.pareto import non_dominated_mask

    return non_dominated_mask(truth)


def measure() -> dict:
    import torch

    torch.set_num_threads(1)
    from evomerge.fitness.compressed import CompressedFitness

    fitness = CompressedFitness.load(REPO / "fitness" / "zoo_small", check_data=False)
    started = time.perf_counter()
    out = {"command": COMMAND, "fitness": "fitness/zoo_small", "split": "fitness (validation)", "workers": WORKERS,
           "z": list(Z), "strategies": {}}
    for strategy, generation in STRATEGIES.items():
        path, answers = search_answers(strategy)
        tasks = list(fitness.task_names)
        if sorted(answers) != sorted(tasks):
            raise SystemExit(f"{path}: tasks {sorted(answers)}, fitness/zoo_small has {sorted(tasks)}")
        answers = {t: answers[t] for t in tasks}
        params = {t: fitness.task(t).estimator.item_params for t in tasks}
        truth = np.stack([answers[t].mean(axis=1) for t in tasks], axis=1)  # (candidates, tasks)
        on_front = true_pareto(truth)
        plain = replay(answers, params, "off", 0, None)
        entry = {"cache": path.name, "candidates": int(truth.shape[0]), "generation": generation,
                 "true_pareto": int(on_front.sum()), "items_off": int(plain["used"].sum()),
                 "mae_off": float(np.abs(plain["estimates"] - truth).mean()), "rules": {}}
        for z in Z:
            for rule, size in (("candidate", 1), ("generations", generation), ("async", WORKERS)):
                r = replay(answers, params, rule, size, z)
                entry["rules"][f"{rule}|{z}"] = {
                    "rule": rule, "size": size, "z": z, "items": int(r["used"].sum()),
                    "saving": float(1 - r["used"].sum() / plain["used"].sum()), "raced_out": int(r["raced"].sum()),
                    "true_pareto_raced_out": int((r["raced"] & on_front).sum())}
            print(f"  {strategy} z={z}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        out["strategies"][strategy] = entry
    out["seconds"] = time.perf_counter() - started
    return out


def table(result: dict | None = None) -> str:
    result = result or json.loads(RESULTS_JSON.read_text())
    names = {"candidate": "each candidate", "generations": "generations of {size}", "async": "async, {size} workers"}
    lines = [f"Racing in a search, by the set each candidate races against (`{result['command']}`; small zoo, "
             f"{result['split']}, fitness/zoo_small's item parameters, default adaptive settings; candidates of the "
             "per-layer searches of `fitness_estimation.py --accounting`, replayed in ask order; raw: "
             f"benchmarks/results/{RESULTS_JSON.name}).", "",
             "| search | candidates | rule | z | item evaluations | saved vs no racing | raced out "
             "| true Pareto members raced out |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for strategy, entry in result["strategies"].items():
        lines.append(f"| {strategy} | {entry['candidates']} | no racing | - | {entry['items_off']} | - | - | "
                     f"0 of {entry['true_pareto']} |")
        for r in entry["rules"].values():
            rule = names[r["rule"]].format(size=r["size"])
            lines.append(f"| {strategy} | {entry['candidates']} | {rule} | {r['z']:g} | {r['items']} | "
                         f"{100 * r['saving']:.1f}% | {r['raced_out']} | {r['true_pareto_raced_out']} of "
                         f"{entry['true_pareto']} |")
    for z in result["z"]:
        pairs = [(e["rules"][f"generations|{z}"]["saving"], e["rules"][f"candidate|{z}"]["saving"])
                 for e in result["strategies"].values()]
        lost = max(c - g for g, c in pairs)
        lines += ["", f"z = {z:g}: fixing the set per generation (every backend) saves "
                  + ", ".join(f"{100 * g:.1f}%" for g, _ in pairs) + " (random, M2N2, MAP) against "
                  + ", ".join(f"{100 * c:.1f}%" for _, c in pairs) + f" when each candidate sees the one before it: "
                  f"at most {100 * lost:.1f} points of the saving lost."]
    return "\n".join(lines) + "\n"


def record() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file
    from results_md import record_section

    record_section("racing_schedule", f"## Racing against the set a search hands out (issue 16, item 3)\n\n{table()}",
                   ROOT / "RESULTS.md")
    print(table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="regenerate the RESULTS.md block from the JSON and exit")
    args = parser.parse_args()
    if not args.record:
        from evomerge.fitness.sealed import sealed_test

        with sealed_test("benchmarks/racing_schedule.py measures racing on validation"):
            result = measure()
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {RESULTS_JSON}", file=sys.stderr)
    record()


if __name__ == "__main__":
    main()
