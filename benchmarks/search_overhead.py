"""Per-candidate overhead of the search loop: everything a candidate costs besides materialising and scoring it.

Usage: .venv/bin/python benchmarks/search_overhead.py [--evaluations 96] [--label NAME] [--json PATH]

The demo's search (`search_spaces/examples/zoo_small_run.yaml`: per-layer task arithmetic over three
experts, MAP with batches of 8 seeded with the corner merges), run in-process on a family shaped like
the small zoo (4-layer Llama, hidden 128, 3 experts; random weights: the overhead does not depend on
what the models know) with a compressed fitness of two 60-item multiple-choice tasks (12 items each
per candidate). Measured:

* overhead per candidate = (search wall time - one-time set-up - sum of the logged materialise and
  score seconds) / candidates: decoding the genome, building the recipe for the log, logging, ask,
  tell, checkpoints, the Pareto file;
* set-up: from the call to the first candidate (fitness loading and checks, the worker's models);
* cross-module calls per genome: calls from a function in one `evomerge` module into a function of
  another, counted with `sys.setprofile` from the return of one generation's `ask` to its `tell`
  (the genome's path: decode, materialise, score, log), divided by the generation's size.

Prints one line per quantity; `--json` writes them for benchmarks/results/; `--record` regenerates
the table in benchmarks/RESULTS.md from every benchmarks/results/search_overhead_*.json.

    python benchmarks/search_overhead.py --label after --reps 3 --json benchmarks/results/search_overhead_after.json
    python benchmarks/search_overhead.py --record
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def build_workspace(root: Path) -> Path:
    import datasets

    from evomerge.fitness.calibrate import calibrate
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.testing import choice_task_preset, llama_config, make_choice_task, make_family

    datasets.disable_progress_bars()
    config = llama_config(hidden=128, layers=4, heads=4, intermediate=512, vocab=64)
    base, experts = make_family(root / "fam", n_experts=3, seed=5, delta_scale=0.5, config=config)
    tasks = [TaskSpec.from_dict(choice_task_preset(make_choice_task(root / "tasks" / name, n_validation=60,
                                                                    n_test=20, seed=i), name))
             for i, name in enumerate(["sums_a", "sums_b"])]
    calibrate(tasks, str(base), [str(e) for e in experts], root / "fitness" / "mc", name="mc", random_merges=6, n=12,
              echo=lambda *a: None)
    return root


def run_config(root: Path, name: str, evaluations: int) -> Path:
    import yaml

    config = {
        "name": name,
        "models": {"base": "fam/base", "experts": [f"fam/expert_{i}" for i in range(3)]},
        "search_space": "task_arithmetic_per_layer",
        "fitness": {"name": "fitness/mc"},
        "optimizer": {"name": "map", "settings": {"batch_size": 8, "terms": "auto", "initial_genomes": "corners"}},
        "budget": {"evaluations": evaluations},
        "workers": {"backend": "inprocess", "threads_per_worker": 1},
        "seed": 0,
        "runs_dir": "runs",
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def count_cross_module_calls(root: Path) -> tuple[float, int]:
    """Cross-module calls inside evomerge per genome over one generation after the first (ask to tell)."""
    from evomerge.runs import search as search_module

    path = run_config(root, "calls", 24)
    counts = {"calls": 0, "genomes": 0, "on": False}
    generation = {"n": 0}

    def profiler(frame, event, arg):
        if event != "call" or not counts["on"]:
            return
        callee = frame.f_globals.get("__name__", "")
        caller_frame = frame.f_back
        caller = caller_frame.f_globals.get("__name__", "") if caller_frame is not None else ""
        if callee.startswith("evomerge") and caller.startswith("evomerge") and callee != caller:
            counts["calls"] += 1

    from evomerge.search.optimizers import Optimizer

    original_ask, original_tell = Optimizer.ask, Optimizer.tell

    def ask(self):
        genomes = original_ask(self)
        if generation["n"] == 1 and not counts["genomes"]:
            counts["on"], counts["genomes"] = True, len(genomes)
            sys.setprofile(profiler)
        return genomes

    def tell(self, *args, **kwargs):
        if counts["on"]:  # the genome's path ends where the optimizer takes the scores back
            sys.setprofile(None)
            counts["on"] = False
        generation["n"] += 1
        return original_tell(self, *args, **kwargs)

    Optimizer.ask, Optimizer.tell = ask, tell
    try:
        start = getattr(search_module, "start_search")
        start(path, progress=False, echo=lambda *a: None)
    finally:
        Optimizer.ask, Optimizer.tell = original_ask, original_tell
        sys.setprofile(None)
    return counts["calls"] / max(counts["genomes"], 1), counts["genomes"]


def measure(root: Path, evaluations: int, rep: int = 0) -> dict:
    import evomerge.runs.backends as backends
    from evomerge.runs.search import start_search

    marks = {}
    original = backends.make_backend

    def make_backend(*args, **kwargs):
        backend = original(*args, **kwargs)
        marks["first_candidate"] = time.perf_counter()
        return backend

    backends.make_backend = make_backend
    path = run_config(root, f"overhead{rep}", evaluations)
    try:
        started = time.perf_counter()
        run_dir = start_search(path, progress=False, echo=lambda *a: None)
        total = time.perf_counter() - started
    finally:
        backends.make_backend = original
    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    work = sum(r["seconds"].get("materialize", 0.0) + r["seconds"].get("score", 0.0) for r in records)
    setup = marks["first_candidate"] - started
    loop = total - setup
    return {"candidates": len(records), "total_s": total, "setup_s": setup, "materialize_score_s": work,
            "overhead_per_candidate_ms": 1000 * (loop - work) / len(records),
            "materialize_score_per_candidate_ms": 1000 * work / len(records)}


def table() -> str:
    """The RESULTS.md block, generated from the committed JSON results."""
    rows = [json.loads(p.read_text()) for p in sorted((ROOT / "results").glob("search_overhead_*.json"))]
    lines = ["| code | candidates | overhead ms / candidate | materialise + score ms / candidate | set-up s "
             "| cross-module calls / genome |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['candidates']} | {r['overhead_per_candidate_ms']:.1f} | "
                     f"{r['materialize_score_per_candidate_ms']:.1f} | {r['setup_s']:.2f} | "
                     f"{r['cross_module_calls_per_genome']:.0f} |")
    return "\n".join(lines)


def record() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file
    from results_md import record_section

    record_section("search_overhead", table(), ROOT / "RESULTS.md")
    print(table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="regenerate the RESULTS.md table and exit")
    parser.add_argument("--evaluations", type=int, default=96)
    parser.add_argument("--label", default="current")
    parser.add_argument("--reps", type=int, default=1, help="repeat the timed search; report the fastest")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.record:
        record()
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_workspace(Path(tmp))
        result = min((measure(root, args.evaluations, rep) for rep in range(args.reps)),
                     key=lambda r: r["overhead_per_candidate_ms"])
        calls, genomes = count_cross_module_calls(root)
    result.update({"label": args.label, "cross_module_calls_per_genome": calls, "generation_size": genomes})
    print(f"[{args.label}] {result['candidates']} candidates: overhead {result['overhead_per_candidate_ms']:.1f} ms "
          f"per candidate outside materialise + score ({result['materialize_score_per_candidate_ms']:.1f} ms); "
          f"set-up {result['setup_s']:.2f} s; total {result['total_s']:.1f} s")
    print(f"[{args.label}] cross-module calls per genome, ask to tell: {calls:.0f} (generation of {genomes})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
