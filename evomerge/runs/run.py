"""A finished (or running) search as data: `Run.load(path)` for the notebook, the CLI and the tests.

    run = Run.load("runs/zoo_ties")
    run.pareto          # DataFrame: one row per Pareto member, a column per task
    run.evaluations     # DataFrame: the whole evaluation log
    run.plot_front()    # pairwise projections when there are more than two tasks
    run.export(candidate_id, "merged/")   # Hugging Face folder + recipe.yaml (mergekit format)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import pandas as pd
import yaml

from evomerge.runs.config import RunConfig
from evomerge.runs.store import RunStore, RunStoreError


@dataclass
class Run:
    store: RunStore
    config: RunConfig

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        store = RunStore.open(path)
        return cls(store, RunConfig.model_validate(yaml.safe_load(store.config_text)))

    @property
    def path(self) -> Path:
        return self.store.root

    @property
    def tasks(self) -> list[str]:
        return list(self.store.read_pareto()["tasks"])

    # ------------------------------------------------------------- tables
    @property
    def evaluations(self) -> pd.DataFrame:
        rows = []
        for r in self.store.records():
            row = {"id": r["id"], "generation": r["generation"], "status": r["status"], "worker": r.get("worker"),
                   "item_evaluations": r["item_evaluations"]}
            for task, value in (r.get("objectives") or {}).items():
                row[task] = value
                row[f"{task}_stderr"] = (r.get("stderr") or {}).get(task)
            for key, value in (r.get("seconds") or {}).items():
                row[f"seconds_{key}"] = value
            rows.append(row)
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame = frame.set_index("id").sort_index()
        return frame

    @property
    def pareto(self) -> pd.DataFrame:
        """One row per Pareto member: generation, mean and per-task estimated accuracy, crowding
        distance (inf at the ends of the front), and `<task>_<split>` columns once verified."""
        data = self.store.read_pareto()
        rows = []
        verified = self.verified()
        for m in data["members"]:
            crowding = m.get("crowding")  # pareto.json stores an infinite distance as null
            row = {"id": m["id"], "generation": m.get("generation"), "mean": m["mean"],
                   "crowding": math.inf if crowding is None else float(crowding)}
            row.update(m["objectives"])
            for role, members in verified.items():
                for task, value in (members.get(str(m["id"])) or {}).items():
                    row[f"{task}_{role}"] = value
            rows.append(row)
        return pd.DataFrame(rows).set_index("id") if rows else pd.DataFrame()

    def record(self, candidate_id: int) -> dict[str, Any]:
        for r in self.store.records():
            if r["id"] == candidate_id:
                return r
        raise RunStoreError(f"{self.path}: no candidate with id {candidate_id}")

    def genome(self, candidate_id: int) -> np.ndarray:
        return np.asarray(self.record(candidate_id)["genome"], dtype=np.float64)

    def recipe_yaml(self, candidate_id: int) -> str:
        from evomerge.merge.recipe import load_recipe

        return load_recipe(self.record(candidate_id)["recipe"], source=f"{self.path} candidate {candidate_id}").recipe.to_yaml()

    def coefficients(self, candidate_id: int) -> dict[str, np.ndarray]:
        """{parameter: (groups, experts, layers)} of one candidate, for heatmaps."""
        from evomerge.runs.problem import bind_space

        return bind_space(self.config).per_layer(self.genome(candidate_id))

    def verified(self) -> dict[str, dict[str, dict[str, float]]]:
        """{split role: {member id: {task: full-split accuracy}}} from verify.json."""
        data = self.store.read_verify() or {}
        if "splits" in data:
            return data["splits"]
        # first format: one split's scores under "members"
        return {data.get("split", "test"): data["members"]} if data.get("members") else {}

    def ranked(self, by: ChooseBy = "mean", frame: pd.DataFrame | None = None) -> list[int]:
        """Pareto member ids (or `frame`'s rows: a column per task), best first by the rule `by`
        (`ChoiceRule`) applied to the compressed-fitness estimates."""
        frame = self.pareto if frame is None else frame
        if frame.empty:
            raise RunStoreError(f"{self.path}: the Pareto set is empty")
        return ChoiceRule.parse(by, self.tasks).ranked(frame)

    def choose(self, finalists: int = 5, *, by: ChooseBy = "mean", among: list[int] | None = None,
               device: str | None = None, echo=print, racing: bool | str = False, batch: int | None = None,
               confidence: float | None = None, seed: int | None = None) -> int:
        """The member to take without looking at the test split: the `finalists` Pareto members
        ranked best by the rule `by` on the compressed fitness are scored on the whole fitness split,
        and the best by the same rule there wins (full ties: the better compressed-fitness rank).
        `by`: "mean" (the default; the worst task breaking ties), "worst" (the mean breaking ties),
        or one weight per task in the run's task order (normalised; the worst task breaking ties);
        see `ChoiceRule`. `among`: choose from these candidate ids instead of the Pareto set.

        Costs finalists x (fitness split items) item evaluations; recorded in verify.json.

        `racing=True` (or "paired"): score the finalists on the fitness split `batch` items per task
        at a time (default `racing.DEFAULT_BATCH`), the same seeded items for every finalist, and drop
        a finalist once its paired confidence bound (`confidence`, default 0.95) lies below the
        leader's; stop when one is left or the split is used up (then the choice is the one above).
        See evomerge/runs/racing.py. Either way verify.json's "choose" entry says, per finalist, how
        many items of each task it used and why it stopped, and the total item evaluations; the
        whole-split accuracies go under splits.fitness as before (racing: only the finalists that used
        the whole split). Not resumable: an interrupted choice records nothing."""
        from evomerge.runs.racing import DEFAULT_BATCH, DEFAULT_CONFIDENCE, RacingSettings

        rule = ChoiceRule.parse(by, self.tasks)  # a bad rule fails before any scoring
        if finalists < 1:
            raise ValueError(f"finalists must be at least 1, got {finalists}")
        mode = _racing_mode(racing)
        settings = None
        if mode is not None:
            settings = RacingSettings(batch=DEFAULT_BATCH if batch is None else batch,
                                      confidence=DEFAULT_CONFIDENCE if confidence is None else confidence,
                                      seed=self.config.seed if seed is None else seed)
        elif batch is not None or confidence is not None or seed is not None:
            from evomerge.errors import OptionError

            raise OptionError("racing", "batch, confidence and seed apply only with racing on")
        if among is None:
            frame = self.pareto
        else:
            evaluations = self.evaluations
            frame = evaluations.loc[list(among), self.tasks]
            frame = frame.assign(mean=frame.mean(axis=1))
        if frame.empty:
            raise RunStoreError(f"{self.path}: the Pareto set is empty")
        shortlist = rule.ranked(frame)[:finalists]
        if settings is not None:
            return self._race(shortlist, rule, settings, device=device, echo=echo)
        scores = self.verify(shortlist, role="fitness", device=device, echo=echo)
        full = pd.DataFrame([scores[str(i)] for i in shortlist], index=shortlist)[self.tasks]
        chosen = rule.ranked(full)[0]  # a stable sort: full ties keep the compressed-fitness order
        n_items = self._fitness_split_sizes()
        members = {str(i): {"items": dict(n_items), "stop": "split_used", "round": 1, "dropped_by": None,
                            "accuracy": scores[str(i)], "chosen": i == chosen} for i in shortlist}
        total = len(shortlist) * sum(n_items.values())
        self._record_choice({"by": rule.describe(), "racing": None, "finalists": shortlist, "chosen": chosen,
                             "item_evaluations": total, "full_split_item_evaluations": total, "members": members})
        return chosen

    def _fitness(self):
        """The run's compressed fitness, as run.json names it."""
        from evomerge.fitness.compressed import CompressedFitness

        return CompressedFitness.load(json.loads((self.path / "run.json").read_text())["fitness"])

    def _verify_problem(self, device: str | None = None):
        """(fitness, problem): what `verify`, finalist racing and benchmarks score whole splits with."""
        from evomerge.runs.problem import MergeProblem

        fitness = self._fitness()
        return fitness, MergeProblem(self.config, fitness, device=device, worker="verify")

    def _fitness_split_sizes(self) -> dict[str, int]:
        fitness = self._fitness()
        return {t: len(fitness.task(t).task.load_split("fitness")) for t in self.tasks}

    def _record_choice(self, entry: dict[str, Any], full: dict[str, dict[str, float]] | None = None) -> None:
        data = self.store.read_verify() or {}
        splits = self.verified()
        if full:
            splits.setdefault("fitness", {}).update(full)
        self.store.write_verify({**{k: v for k, v in data.items() if k not in ("split", "members")},
                                 "splits": splits, "choose": entry})

    def _race(self, shortlist: list[int], rule: "ChoiceRule", settings, *, device: str | None, echo) -> int:
        """`choose` with racing: see evomerge/runs/racing.py."""
        from evomerge.runs.problem import _BatchScorer
        from evomerge.runs.racing import race_finalists

        fitness, problem = self._verify_problem(device)
        scorers = {t: _BatchScorer(fitness.task(t).task, problem.tokenizer, problem.materializer.device)
                   for t in self.tasks}
        n_items = {t: len(scorers[t].split) for t in self.tasks}

        def answers(candidate_id: int, items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            model = problem.materialize(self.genome(candidate_id))
            return {t: scorers[t](model, idx) if idx.size else np.zeros(0, np.int64) for t, idx in items.items()}

        echo(f"racing {len(shortlist)} finalists, {settings.batch} items per task per round "
             f"(confidence {settings.confidence}, seed {settings.seed})")
        result = race_finalists(shortlist, n_items, rule, answers, settings, echo=echo)
        full = {str(c): m["accuracy"] for c, m in result.members.items() if m["items"] == n_items}
        entry = {"by": rule.describe(), "racing": {"mode": "paired", "batch": settings.batch,
                                                   "confidence": settings.confidence, "seed": settings.seed},
                 "finalists": shortlist, **result.to_dict()}
        self._record_choice(entry, full)
        for c, m in result.members.items():
            echo(f"  member {c}: {m['stop']} after round {m['round']} ("
                 + ", ".join(f"{t} {n}" for t, n in m["items"].items()) + " items)")
        echo(f"  {result.item_evaluations} item evaluations (the whole split: {result.full_split_item_evaluations})")
        return result.chosen

    def best_balanced(self, by: ChooseBy = "mean") -> int:
        """The Pareto member `evomerge export` takes by default: the best by the rule `by` on the
        compressed fitness ("mean": the highest mean over tasks, the worst task breaking ties;
        "worst"; or weights per task; see `ChoiceRule`)."""
        return self.ranked(by)[0]

    # ------------------------------------------------------------- export and verify
    def check_export(self, out_dir: str | os.PathLike, *, overwrite: bool = False,
                     max_shard_bytes: str | int = "5GB") -> None:
        """Raise `OptionError` now if `export` to `out_dir` would be refused (it exists without
        `overwrite`, evomerge did not write it, it is or holds one of the run's models, a bad shard
        size), so that choosing a member (`choose` scores finalists) is not wasted on it."""
        from evomerge.merge.outputs import check_output_dir, parse_shard_size

        parse_shard_size(max_shard_bytes, field="max_shard_bytes")
        models = self.config.models
        inputs = [("base model", models.base), *(("expert", path) for path in models.experts)]
        check_output_dir(out_dir, inputs=inputs, overwrite=overwrite, field="out_dir")

    def export(self, candidate_id: int, out_dir: str | os.PathLike, *, overwrite: bool = False,
               max_shard_bytes: str | int = "5GB", progress: bool = False) -> Path:
        """Write the member as a Hugging Face folder plus `recipe.yaml` (mergekit format).

        `overwrite` replaces `out_dir` only if evomerge wrote it (see `check_export`)."""
        from evomerge.merge.engine import merge_recipe
        from evomerge.merge.recipe import load_recipe

        self.check_export(out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
        record = self.record(candidate_id)
        if record["status"] != "ok":
            raise RunStoreError(f"{self.path}: candidate {candidate_id} failed; nothing to export")
        loaded = load_recipe(record["recipe"], source=f"{self.path} candidate {candidate_id}")
        return merge_recipe(loaded, out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                            allow_pickle=self.config.models.allow_pickle, progress=progress).out_dir

    def verify(self, candidate_ids: list[int] | None = None, *, role: str = "test", device: str | None = None,
               echo=print) -> dict[str, dict[str, float]]:
        """Score Pareto members on the full `role` split ('test' or 'fitness') of every task and
        record it in verify.json, beside the other split's scores."""
        fitness, problem = self._verify_problem(device)
        scorers = fitness.full_scorers(problem.tokenizer, role=role, device=problem.materializer.device)
        ids = candidate_ids if candidate_ids is not None else list(self.pareto.index)
        results = {}
        for candidate_id in ids:
            model = problem.materialize(self.genome(candidate_id))
            results[str(candidate_id)] = {task: float(np.mean(scorer(model))) for task, scorer in scorers.items()}
            echo(f"  member {candidate_id}: " + " ".join(f"{t}={v:.3f}" for t, v in results[str(candidate_id)].items()))
        splits = self.verified()
        splits.setdefault(role, {}).update(results)
        self.store.write_verify({"splits": splits})
        return results

    # ------------------------------------------------------------- plots
    def plot_front(self, ax=None):
        """Pareto front; with more than two tasks, a grid of pairwise projections."""
        import matplotlib.pyplot as plt

        evals = self.evaluations
        evals = evals[evals["status"] == "ok"] if not evals.empty else evals
        front = self.pareto
        tasks = self.tasks
        pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]] or [(tasks[0], tasks[0])]
        if ax is None:
            fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
            axes = axes[0]
        else:
            fig, axes = ax.figure, [ax]
        for axis, (a, b) in zip(axes, pairs):
            axis.scatter(evals[a], evals[b], s=10, alpha=0.35, label="evaluated")
            axis.scatter(front[a], front[b], s=30, color="crimson", label="Pareto set")
            axis.set_xlabel(a)
            axis.set_ylabel(b)
            axis.grid(alpha=0.3)
        axes[0].legend(loc="lower left")
        fig.tight_layout()
        return fig

    def plot_trajectory(self, ax=None):
        """Best-so-far estimated accuracy per task against candidate evaluations."""
        import matplotlib.pyplot as plt

        evals = self.evaluations
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        for task in self.tasks:
            ax.plot(evals.index, evals[task].cummax(), label=task)
        ax.plot(evals.index, evals[self.tasks].mean(axis=1).cummax(), "k--", label="mean")
        ax.set_xlabel("candidate evaluations")
        ax.set_ylabel("best estimated accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
        return ax.figure

    def plot_coefficients(self, candidate_id: int, parameter: str = "weight", ax=None):
        """Heatmap of one member's per-layer `parameter`: a panel per tensor group (attention / MLP /
        rest, or all tensors), experts as rows, on the search space's range for that parameter."""
        from evomerge.runs.problem import bind_space

        space = bind_space(self.config)
        values = space.per_layer(self.genome(candidate_id))
        if parameter not in values:
            raise ValueError(f"search space {space.space.name!r} has no parameter {parameter!r}; it has {sorted(values)}")
        spec = space.space.parameters[parameter]
        return plot_coefficient_heatmap(values[parameter], space.groups, [Path(e).name for e in self.config.models.experts],
                                        parameter=parameter, bounds=(spec.low, spec.high),
                                        title=f"member {candidate_id}: {parameter} per layer", axes=ax)


ChooseBy = Union[str, Sequence[float]]
CHOOSE_BY_NAMES = ("mean", "worst")


@dataclass(frozen=True)
class ChoiceRule:
    """How a member is chosen from its per-task accuracies (`Run.choose`, `Run.best_balanced`,
    `evomerge export --choose-by`, the marker of `evomerge pareto`):

    * `mean`: the highest mean over tasks, the worst task breaking ties (the default);
    * `worst`: the highest worst task (the best guarantee on every task), the mean breaking ties;
    * weights, one per task in the run's task order: the highest weighted mean, the weights
      normalised to sum to 1, the worst task breaking ties.

    Members tied on both keep their order (a stable sort)."""

    by: str  # "mean", "worst" or "weights"
    tasks: tuple[str, ...]
    weights: tuple[float, ...] | None = None  # normalised; only for by == "weights"

    @classmethod
    def parse(cls, by: "ChooseBy | ChoiceRule", tasks: Sequence[str]) -> "ChoiceRule":
        """`by`: "mean", "worst", a sequence of weights, or the same as text ("1,0,2")."""
        from evomerge.errors import OptionError

        tasks = tuple(tasks)
        if isinstance(by, ChoiceRule):
            by = by.by if by.weights is None else by.weights
        if isinstance(by, str) and by.strip().lower() in CHOOSE_BY_NAMES:
            return cls(by.strip().lower(), tasks)
        expected = (f"expected mean, worst or {len(tasks)} non-negative weights separated by commas, one per task "
                    f"({','.join(tasks)})")
        try:
            values = [float(v) for v in (by.split(",") if isinstance(by, str) else by)]
        except (TypeError, ValueError):
            raise OptionError("by", f"{expected}, got {by!r}") from None
        if len(values) != len(tasks) or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            raise OptionError("by", f"{expected}, not all zero, got {by!r}")
        total = sum(values)
        return cls("weights", tasks, tuple(v / total for v in values))

    def describe(self) -> str:
        if self.by == "mean":
            return "the highest mean over tasks, then the highest worst task"
        if self.by == "worst":
            return "the highest worst task, then the highest mean over tasks"
        weights = ", ".join(f"{t} {w:.3g}" for t, w in zip(self.tasks, self.weights))
        return f"the highest weighted mean ({weights}), then the highest worst task"

    def keys(self, frame: pd.DataFrame) -> pd.DataFrame:
        """(primary, secondary) per row of `frame` (a column per task; a `mean` column, when there,
        is the mean pareto.json recorded)."""
        scores = frame[list(self.tasks)].astype(float)
        mean = frame["mean"] if "mean" in frame.columns else scores.mean(axis=1)
        worst = scores.min(axis=1)
        if self.by == "mean":
            return pd.DataFrame({"primary": mean, "secondary": worst})
        if self.by == "worst":
            return pd.DataFrame({"primary": worst, "secondary": mean})
        weighted = scores.to_numpy() @ np.asarray(self.weights)
        return pd.DataFrame({"primary": weighted, "secondary": worst}, index=frame.index)

    def ranked(self, frame: pd.DataFrame) -> list[int]:
        """`frame`'s index, best first."""
        keys = self.keys(frame)
        return [int(i) for i in keys.sort_values(["primary", "secondary"], ascending=False, kind="stable").index]


RACING_MODES = ("paired",)


def _racing_mode(racing: bool | str | None) -> str | None:
    """`Run.choose(racing=...)`: False/None/"off" -> None; True/"paired"/"on" -> "paired"."""
    from evomerge.errors import OptionError

    if racing is None or racing is False:
        return None
    if racing is True:
        return "paired"
    if isinstance(racing, str) and racing.strip().lower() in ("off", "none", "false"):
        return None
    if isinstance(racing, str) and racing.strip().lower() in ("on", "true", *RACING_MODES):
        return "paired"
    raise OptionError("racing", f"expected True, False, 'paired' or 'off', got {racing!r}")


GROUP_TITLES = {"attention": "attention (self_attn)", "mlp": "MLP", "rest": "rest (norms, embeddings, lm_head)",
                "all": "all tensors"}
MAX_LAYER_TICKS = 16


def layer_ticks(num_layers: int, max_ticks: int = MAX_LAYER_TICKS) -> list[int]:
    """Layer indices to label: every layer up to `max_ticks` layers, else every 2nd, 5th, 10th, 20th, ..."""
    steps = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500)
    step = next((s for s in steps if math.ceil(num_layers / s) <= max_ticks), math.ceil(num_layers / max_ticks))
    return list(range(0, num_layers, step))


def plot_coefficient_heatmap(values: np.ndarray, groups: Sequence[str], experts: Sequence[str], *, parameter: str,
                             bounds: tuple[float, float] | None = None, title: str | None = None, axes=None):
    """Per-layer coefficients as heatmaps: one panel per tensor group, experts x layers, values (groups, K, L).

    Every panel shares one colour scale (`bounds`, default the range of all the values) and one
    colorbar, so colours compare across groups (and, with the search range as bounds, across
    members). From 2 to 100+ layers the figure widens with depth up to 14 inches and at most
    MAX_LAYER_TICKS layers are labelled, once, under the last panel. `axes`: an Axes per group.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    values = np.asarray(values, dtype=float)
    if values.ndim != 3 or values.shape[:2] != (len(groups), len(experts)):
        raise ValueError(f"values of shape {values.shape} do not match {len(groups)} groups x {len(experts)} experts x layers")
    n_groups, k, num_layers = values.shape
    low, high = bounds if bounds is not None else (float(np.nanmin(values)), float(np.nanmax(values)))
    if high <= low:  # a constant heatmap still gets a scale
        low, high = low - 0.5, high + 0.5
    norm = Normalize(vmin=low, vmax=high)
    if axes is None:
        width = min(14.0, max(6.0, 2.5 + 0.15 * num_layers))
        height = min(12.0, max(2.5, 0.9 + n_groups * (0.6 + 0.3 * k)))
        fig, grid = plt.subplots(n_groups, 1, figsize=(width, height), sharex=True, squeeze=False, layout="constrained")
        axes = list(grid[:, 0])
    else:
        axes = list(np.ravel(axes))
        if len(axes) != n_groups:
            raise ValueError(f"{len(axes)} axes given for {n_groups} groups {list(groups)}")
        fig = axes[0].figure
    for g, axis in enumerate(axes):
        image = axis.imshow(values[g], aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        axis.set_yticks(range(k), list(experts))
        axis.set_xticks(layer_ticks(num_layers))
        axis.set_title(GROUP_TITLES.get(groups[g], groups[g]), loc="left", fontsize="medium")
        axis.tick_params(axis="x", labelbottom=g == n_groups - 1)
    axes[-1].set_xlabel("layer")
    fig.colorbar(image, ax=axes, label=parameter)
    if title:
        fig.suptitle(title)
    return fig
