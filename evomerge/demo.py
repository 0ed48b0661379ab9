"""`make demo`: the whole product on the built-in zoo, from nothing to an exported merge.

Steps 1-4 choose, so they run with the test splits sealed (`evomerge.fitness.sealed`,
benchmarks/PROTOCOL.md): a test-split read there raises. Steps 5-6 are the final report, the
only place the demo reads test.

1. build the small zoo (cached in ./zoo/small),
2. calibrate the compressed fitness (cached in ./fitness/zoo_small),
3. search with the local Ray pool (./runs/zoo_small, started afresh),
4. choose a member without the test split (the 5 best Pareto members by compressed fitness,
   re-scored on the whole fitness split) and export it (./exports/zoo_small_best: Hugging Face
   folder + recipe.yaml),
5. verify the Pareto set on the full test split,
6. compare the member with each expert, the base and uniform task arithmetic on the test split.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from evomerge.runs.run import Run

ROOT = Path.cwd()
CALIBRATION = Path("fitness") / "examples" / "zoo_small_calibration.yaml"  # relative to the demo's root
RUN_CONFIG = Path("search_spaces") / "examples" / "zoo_small_run.yaml"
FINALISTS = 5


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo reads and writes. `zoo_dir` None: no zoo to build (the configs name the models)."""

    calibration: Path  # calibration config of the compressed fitness
    fitness: Path  # the compressed fitness folder it saves (and the run config uses)
    run_config: Path
    export: Path
    zoo_dir: Path | None = None
    zoo_size: str = "small"

    @classmethod
    def default(cls, root: Path = ROOT) -> "DemoPaths":
        return cls(root / CALIBRATION, root / "fitness" / "zoo_small", root / RUN_CONFIG,
                   root / "exports" / "zoo_small_best", zoo_dir=root / "zoo")


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


def _run_models(run_config: Path) -> tuple[str, list[str]]:
    from evomerge.runs.config import load_run_config

    models = load_run_config(run_config).models
    return str(models.base), [str(e) for e in models.experts]


def ensure_fitness(paths: DemoPaths) -> Path:
    """Step 2: reuse the compressed fitness if it matches the run's models, else calibrate it."""
    from evomerge.fitness.calibrate import calibrate_from_config
    from evomerge.fitness.compressed import CompressedFitness, resolve_fitness_path

    try:
        path = resolve_fitness_path(paths.fitness)
    except FileNotFoundError:
        return calibrate_from_config(paths.calibration)
    base, experts = _run_models(paths.run_config)
    stale = CompressedFitness.load(path).model_mismatches(base, experts, unknown_is_stale=True)
    if stale:  # the zoo was rebuilt (a new recipe or seed) since this fitness was calibrated
        print(f"{path} does not match the zoo's models ({'; '.join(stale)}); recalibrating")
        return calibrate_from_config(paths.calibration, overwrite=True)
    print(f"reusing {path}")
    return path


def develop(paths: DemoPaths, *, progress: bool = False) -> tuple[Run, int]:
    """Steps 1-4 with the test splits sealed: zoo, fitness, search, choose and export.
    Returns the run and the chosen member."""
    from evomerge.fitness.sealed import sealed_test
    from evomerge.runs.run import Run
    from evomerge.runs.search import start_search
    from evomerge.zoo import build_zoo

    with sealed_test("demo steps 1-4 choose the merge"):
        if paths.zoo_dir is not None:
            t = step("1/6 demo zoo (built once, then reused)")
            build_zoo(paths.zoo_dir, size=paths.zoo_size, seed=0, progress=True)
            print(f"zoo ready in {time.perf_counter() - t:.0f}s")

        t = step("2/6 compressed fitness (calibrated once, then reused)")
        ensure_fitness(paths)
        print(f"fitness ready in {time.perf_counter() - t:.0f}s")

        t = step("3/6 search")
        run_dir = start_search(paths.run_config, overwrite=True, progress=progress)
        print(f"search done in {time.perf_counter() - t:.0f}s")

        run = Run.load(run_dir)
        t = step(f"4/6 choose ({FINALISTS} finalists on the whole fitness split) and export")
        member = run.choose(FINALISTS)
        out = run.export(member, paths.export, overwrite=True)
        print(f"member {member} -> {out} (+ {out / 'recipe.yaml'}) in {time.perf_counter() - t:.0f}s")
    return run, member


def report(run: Run, member: int) -> str:
    """Steps 5-6, the final report: the Pareto set and the member on the full test split."""
    t = step("5/6 verify the Pareto set on the full test split (the first test-split read)")
    run.verify()
    print(f"verified in {time.perf_counter() - t:.0f}s")

    step("6/6 test-split accuracy (full test split, never seen by the search or the choice)")
    table = comparison_table(run, member)
    print(table)
    return table


def main() -> int:
    started = time.perf_counter()
    run, member = develop(DemoPaths.default(), progress=sys.stderr.isatty())
    report(run, member)
    print(f"\nPareto set: evomerge pareto {run.path}\nnotebook:   EVOMERGE_RUN={run.path} jupyter notebook notebooks/inspect_pareto.ipynb")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
