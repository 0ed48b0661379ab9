"""`make demo`: the whole product on the built-in zoo, from nothing to an exported merge.

1. build the small zoo (cached in ./zoo/small),
2. calibrate the compressed fitness (cached in ./fitness/zoo_small),
3. search with the local Ray pool (./runs/zoo_small, started afresh),
4. verify the Pareto set on the full test split,
5. choose a member without the test split (the 5 best Pareto members by compressed fitness,
   re-scored on the whole fitness split) and export it (./exports/zoo_small_best: Hugging Face
   folder + recipe.yaml),
6. compare it with each expert, the base and uniform task arithmetic on the test split.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path.cwd()
CALIBRATION = ROOT / "fitness" / "examples" / "zoo_small_calibration.yaml"
RUN_CONFIG = ROOT / "search_spaces" / "examples" / "zoo_small_run.yaml"


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def comparison_table(run, member: int) -> str:
    """Test-split accuracy of the member next to the endpoints and uniform task arithmetic."""
    from transformers import AutoTokenizer

    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.merge.materializer import Materializer
    from evomerge.runs.problem import MergeProblem
    import json

    meta = json.loads((run.path / "run.json").read_text())
    fitness = CompressedFitness.load(meta["fitness"])
    problem = MergeProblem(run.config, fitness, worker="demo")
    scorers = fitness.full_scorers(problem.tokenizer, role="test", device=problem.materializer.device)
    tasks = list(scorers)
    k = len(run.config.models.experts)
    experts = [Path(e).name for e in run.config.models.experts]
    rows = [("base", {"weight": np.zeros(k)})]
    rows += [(f"expert: {name}", {"weight": np.eye(k)[i]}) for i, name in enumerate(experts)]
    rows += [("uniform task arithmetic (w=1)", {"weight": np.ones(k)}), ("average of experts", {"weight": np.full(k, 1 / k)})]
    results = []
    for label, coeffs in rows:
        model = problem.materializer.apply("task_arithmetic", **coeffs)
        results.append((label, [float(np.mean(scorers[t](model))) for t in tasks]))
    model = problem.materialize(run.genome(member))
    results.append((f"evomerge member {member}", [float(np.mean(scorers[t](model))) for t in tasks]))
    width = max(len(label) for label, _ in results) + 2
    cols = [max(len(t), 6) + 2 for t in tasks]
    header = "model".ljust(width) + "".join(t.rjust(c) for t, c in zip(tasks, cols)) + "mean".rjust(8)
    lines = [header, "-" * len(header)]
    for label, scores in results:
        lines.append(label.ljust(width) + "".join(f"{s:.3f}".rjust(c) for s, c in zip(scores, cols))
                     + f"{np.mean(scores):.3f}".rjust(8))
    return "\n".join(lines)


def main() -> int:
    from evomerge.fitness.calibrate import calibrate_from_config
    from evomerge.fitness.compressed import CompressedFitness, resolve_fitness_path
    from evomerge.runs.run import Run
    from evomerge.runs.search import start_search
    from evomerge.zoo import build_zoo

    started = time.perf_counter()
    t = step("1/6 demo zoo (built once, then reused)")
    zoo = build_zoo(ROOT / "zoo", size="small", seed=0, progress=True)
    print(f"zoo ready in {time.perf_counter() - t:.0f}s")

    t = step("2/6 compressed fitness (calibrated once, then reused)")
    try:
        path = resolve_fitness_path(ROOT / "fitness" / "zoo_small")
    except FileNotFoundError:
        path = calibrate_from_config(CALIBRATION)
    else:
        stale = CompressedFitness.load(path).model_mismatches(zoo.base_path, zoo.expert_paths, unknown_is_stale=True)
        if stale:  # the zoo was rebuilt (a new recipe or seed) since this fitness was calibrated
            print(f"{path} does not match the zoo's models ({'; '.join(stale)}); recalibrating")
            path = calibrate_from_config(CALIBRATION, overwrite=True)
        else:
            print(f"reusing {path}")
    print(f"fitness ready in {time.perf_counter() - t:.0f}s")

    t = step("3/6 search (local Ray pool)")
    run_dir = start_search(RUN_CONFIG, overwrite=True, progress=sys.stderr.isatty())
    print(f"search done in {time.perf_counter() - t:.0f}s")

    run = Run.load(run_dir)
    t = step("4/6 verify the Pareto set on the full test split")
    run.verify()
    print(f"verified in {time.perf_counter() - t:.0f}s")

    t = step("5/6 choose (5 finalists on the whole fitness split) and export")
    member = run.choose(5)
    out = run.export(member, ROOT / "exports" / "zoo_small_best", overwrite=True)
    print(f"member {member} -> {out} (+ {out / 'recipe.yaml'})")

    step("6/6 test-split accuracy (full test split, never seen by the search)")
    print(comparison_table(run, member))
    print(f"\nPareto set: evomerge pareto {run_dir}\nnotebook:   EVOMERGE_RUN={run_dir} jupyter notebook notebooks/inspect_pareto.ipynb")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
