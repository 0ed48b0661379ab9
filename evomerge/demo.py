"""`make demo`: the whole product on the built-in zoo, from nothing to an exported merge.

Steps 1-4 choose, so they run with the test splits sealed (`evomerge.fitness.sealed`,
benchmarks/PROTOCOL.md): a test-split read there raises. Steps 5-6 are the final report, the
only place the demo reads test.

1. build the small zoo (cached in ./zoo/small),
2. calibrate the compressed fitness (cached in ./fitness/zoo_small),
3. search with the local Ray pool (./runs/zoo_small, started afresh),
4. choose a member without the test split (the 5 best Pareto members by compressed fitness,
   re-scored on the whole fitness split) and export it (./exports/zoo_small_best: Hugging Face
   folder + recipe.yaml); choose the best corner (each expert left out or at weight 1) on the
   whole fitness split, a baseline for step 6,
5. verify the Pareto set on the full test split (all recorded in verify.json; a short table of the
   chosen member and the best by compressed fitness printed),
6. compare the member on the test split with the baselines: the base, each expert, uniform task
   arithmetic, averaging, TIES (weight 1, density 0.5) and the best corner, ending with which it
   beats and by how many points of test mean.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import pandas as pd

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


# TIES as mergekit's examples run it: every expert at weight 1 keeping half of its task vector
# (density 0.5); `normalize: true` is mergekit's default for ties and the row's (evomerge/merge/methods.py).
TIES_WEIGHT, TIES_DENSITY = 1.0, 0.5
SHORT_TABLE = 5  # step 5 prints the chosen member and this many best Pareto members by compressed fitness


@dataclass(frozen=True)
class Baseline:
    """A merge anyone could try without a search: a method with one weight (and density) per expert."""

    label: str
    method: str
    weight: tuple[float, ...]
    density: tuple[float, ...] | None = None

    def apply(self, materializer):
        coefficients = {"weight": np.asarray(self.weight)}
        if self.density is not None:
            coefficients["density"] = np.asarray(self.density)
        return materializer.apply(self.method, **coefficients)


def expert_names(run: Run) -> list[str]:
    return [Path(e).name for e in run.config.models.experts]


def corner_label(weight: Sequence[float], experts: Sequence[str]) -> str:
    taken = [name for w, name in zip(weight, experts) if w]
    return "+".join(taken) if taken else "base"


def baselines(experts: Sequence[str], corner: Sequence[float]) -> list[Baseline]:
    """What the chosen merge is compared with: the base, each expert, uniform task arithmetic,
    averaging, TIES (mergekit's usual settings) and the best corner chosen on validation."""
    k = len(experts)
    rows = [Baseline("base", "task_arithmetic", (0.0,) * k)]
    rows += [Baseline(f"expert: {name}", "task_arithmetic", tuple(float(v) for v in np.eye(k)[i]))
             for i, name in enumerate(experts)]
    rows += [Baseline("uniform task arithmetic (w=1)", "task_arithmetic", (1.0,) * k),
             Baseline("averaging (w=1/K)", "task_arithmetic", (1.0 / k,) * k),
             Baseline(f"TIES (w={TIES_WEIGHT:g}, density {TIES_DENSITY:g})", "ties", (TIES_WEIGHT,) * k,
                      (TIES_DENSITY,) * k),
             Baseline(f"best corner on validation ({corner_label(corner, experts)})", "task_arithmetic",
                      tuple(float(w) for w in corner))]
    return rows


def _scoring(run: Run, role: str):
    """The run's merge problem (the models held once, in memory) and whole-split scorers for `role`."""
    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.runs.problem import MergeProblem

    meta = json.loads((run.path / "run.json").read_text())
    fitness = CompressedFitness.load(meta["fitness"])
    problem = MergeProblem(run.config, fitness, worker="demo")
    return problem, fitness.full_scorers(problem.tokenizer, role=role, device=problem.materializer.device)


def accuracies(model, scorers: dict) -> dict[str, float]:
    return {task: float(np.mean(scorer(model))) for task, scorer in scorers.items()}


def best_corner(run: Run, *, echo=print) -> tuple[float, ...]:
    """The best task-arithmetic corner on the whole fitness (validation) split: each expert left out
    or taken at weight 1 (the base, each expert, each subset: the merges a person tries first, and
    the ones the demo's search starts from); the highest mean wins, the worst task breaking ties."""
    from evomerge.runs.run import ChoiceRule

    problem, scorers = _scoring(run, "fitness")
    experts = expert_names(run)
    corners = [tuple(float(w) for w in c) for c in itertools.product((0, 1), repeat=len(experts))]
    scores = {i: accuracies(problem.materializer.apply("task_arithmetic", weight=np.asarray(c)), scorers)
              for i, c in enumerate(corners)}
    frame = pd.DataFrame.from_dict(scores, orient="index")
    best = ChoiceRule.parse("mean", list(frame.columns)).ranked(frame)[0]
    echo(f"best corner on validation: {corner_label(corners[best], experts)} (validation mean "
         f"{frame.loc[best].mean():.3f}; {len(corners)} corners scored on the whole fitness split)")
    return corners[best]


@dataclass(frozen=True)
class Scored:
    """A model's accuracy per task on one split."""

    label: str
    scores: dict[str, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values())))

    @property
    def worst(self) -> float:
        return float(min(self.scores.values()))


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    header = line(columns)
    return "\n".join([header, "-" * len(header), *(line(r) for r in rows)])


def comparison_table(chosen: Scored, rows: Sequence[Scored]) -> str:
    """Test accuracy per task, mean and worst task of the baselines and the chosen merge."""
    tasks = list(chosen.scores)
    body = [[r.label, *(f"{r.scores[t]:.3f}" for t in tasks), f"{r.mean:.3f}", f"{r.worst:.3f}"]
            for r in [*rows, chosen]]
    return text_table(["model", *tasks, "mean", "worst"], body)


def verdicts(chosen: Scored, rows: Sequence[Scored]) -> list[str]:
    """For each baseline, whether the chosen merge beats it on the test mean, and by how many points."""
    lines = []
    for row in rows:
        diff = 100 * (chosen.mean - row.mean)
        lines.append(f"beats {row.label} by {diff:+.1f} points (test mean)" if diff > 0
                     else f"does not beat {row.label} ({diff:+.1f})")
    return lines


def short_verify_table(run: Run, member: int, top: int = SHORT_TABLE) -> str:
    """The chosen member and the `top` best Pareto members by compressed fitness: the estimate,
    the whole fitness split (finalists only) and the full test split."""
    tasks = run.tasks
    frame = run.pareto
    shown = run.ranked("mean")[:top]
    shown += [member] if member not in shown else []
    body = []
    for i in shown:
        row = frame.loc[i]
        test = [float(row[f"{t}_test"]) for t in tasks]
        validation = (f"{np.mean([row[f'{t}_fitness'] for t in tasks]):.3f}"
                      if all(f"{t}_fitness" in row.index and not pd.isna(row[f"{t}_fitness"]) for t in tasks) else "-")
        body.append([f"{i}{' (chosen)' if i == member else ''}", f"{row['mean']:.3f}", validation,
                     *(f"{v:.3f}" for v in test), f"{np.mean(test):.3f}", f"{min(test):.3f}"])
    return text_table(["member", "est. mean", "val. mean", *(f"{t} test" for t in tasks), "test mean",
                       "test worst"], body)

def _run_models(run_config: Path) -> tuple[str, list[str]]:
    from evomerge.runs.config import load_run_config

    models = load_run_config(run_config).models
    return str(models.base), [str(e) for e in models.experts]


def ensure_fitness(paths: DemoPaths) -> Path:
    """Step 2: reuse the compressed fitness if it matches the run's models, else calibrate it."""
    from evomerge.fitness.calibrate import calibrate_from_config, load_calibration_config, preset_mismatches
    from evomerge.fitness.compressed import CompressedFitness, resolve_fitness_path

    try:
        path = resolve_fitness_path(paths.fitness)
    except FileNotFoundError:
        return calibrate_from_config(paths.calibration)
    base, experts = _run_models(paths.run_config)
    fitness = CompressedFitness.load(path)
    stale = fitness.model_mismatches(base, experts, unknown_is_stale=True)
    if paths.calibration.is_file():  # without its preset a fitness can be reused but not remade
        stale += preset_mismatches(fitness, load_calibration_config(paths.calibration)[0])
    if stale:  # the zoo was rebuilt, or the preset changed, since this fitness was calibrated
        print(f"{path} does not match the zoo's models or the calibration preset ({'; '.join(stale)}); recalibrating")
        return calibrate_from_config(paths.calibration, overwrite=True)
    print(f"reusing {path}")
    return path


class Developed(NamedTuple):
    """What steps 1-4 chose, on validation only."""

    run: Run
    member: int  # the exported Pareto member
    corner: tuple[float, ...]  # the best corner's task-arithmetic weights (a baseline for step 6)


def develop(paths: DemoPaths, *, progress: bool = False) -> Developed:
    """Steps 1-4 with the test splits sealed: zoo, fitness, search, choose and export, and the best
    corner baseline chosen on validation."""
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
        t = step(f"4/6 choose ({FINALISTS} finalists on the whole fitness split), export, and the best corner "
                 "on validation")
        member = run.choose(FINALISTS)
        out = run.export(member, paths.export, overwrite=True)
        print(f"member {member} -> {out} (+ {out / 'recipe.yaml'})")
        corner = best_corner(run)
        print(f"chosen in {time.perf_counter() - t:.0f}s")
    return Developed(run, member, corner)


def report(run: Run, member: int, corner: Sequence[float]) -> str:
    """Steps 5-6, the final report (the only test-split reads): the Pareto set verified on test
    (a short table printed), then the chosen member against the baselines. Returns step 6's text."""
    t = step("5/6 verify the Pareto set on the full test split (the first test-split read)")
    run.verify(echo=lambda *a, **k: None)
    print(f"{len(run.pareto)} Pareto members verified in {time.perf_counter() - t:.0f}s (all in "
          f"{run.path / 'verify.json'}); the chosen one and the {SHORT_TABLE} best by estimated mean (compressed "
          "fitness); val. mean: on the whole validation split (finalists only):")
    print(short_verify_table(run, member))

    step("6/6 the chosen merge against the baselines (full test split; everything chosen on validation)")
    problem, scorers = _scoring(run, "test")
    rows = [Scored(b.label, accuracies(b.apply(problem.materializer), scorers))
            for b in baselines(expert_names(run), corner)]
    chosen = Scored(f"evomerge member {member}", accuracies(problem.materialize(run.genome(member)), scorers))
    text = "\n".join([comparison_table(chosen, rows), "",
                      f"evomerge member {member}, chosen on validation, on the full test split:",
                      *(f"  {line}" for line in verdicts(chosen, rows))])
    print(text)
    return text


def main() -> int:
    started = time.perf_counter()
    run, member, corner = develop(DemoPaths.default(), progress=sys.stderr.isatty())
    report(run, member, corner)
    print(f"\nPareto set: evomerge pareto {run.path}\nnotebook:   EVOMERGE_RUN={run.path} jupyter notebook notebooks/inspect_pareto.ipynb")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
