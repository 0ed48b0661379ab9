"""The zoo study's pure parts (benchmarks/search_quality.py ``zoo``): rows, matched item budgets,
per-seed records, paired comparisons and the RESULTS.md tables generated from them.

Nothing here loads a model or a split: the study's jobs write one JSON record per (row, seed), and
everything a reader sees is computed from those records by `report` (benchmarks/PROTOCOL.md,
section 5: tables generated, never typed; SDs ddof = 1; paired differences with a seeded
percentile bootstrap interval from `evomerge.stats`).

Budgets are counted in *item evaluations*: one item of one task answered by one model. A row's
total = calibration (scoring models on whole validation splits to fit a compressed fitness)
+ search (the candidates' subset items) + finalists (re-scoring the best few on the whole
validation split to choose one) + full-split scoring (the corners baseline). How each baseline
is matched to a searched row of `budget` candidates (`plan_budgets`):

* (a) corners: fixed at 2^K x the full validation split (every expert subset at weight 1, the
  best validation mean chosen); compared with a search only where the search spent no more.
* (b) task-level search: the same compressed fitness, candidates and finalists as the per-layer
  search: the same total.
* (c) mergekit-evolve-style: no calibration and no finalists (it takes its best fitness), the same
  number of candidates, and as many random validation items per task as bring its total to at
  least the search's (rounded up: the baseline never gets less).
* (d) Mergenetic-style: endpoint-only calibration ((K + 1) x the full split), 20 random items per
  task with gp-IRT, no finalists, and as many candidates as bring its total to at least the
  search's (rounded up).
* (e) fixed recipes (uniform task arithmetic, TIES, averaging, each expert, the base) cost no
  item evaluations: reference points, not budget-matched.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from evomerge.stats import mean_sd, paired_difference

SEEDED_LABEL = {False: "unseeded", True: "seeded"}
FAMILIES = ("per-layer", "task-level", "mergekit-evolve", "mergenetic", "corners", "fixed")
MERGENETIC_ITEMS = 20  # Mergenetic's / MERGE^3's subset size per task


# =============================================================================== rows
@dataclass(frozen=True)
class Row:
    """One line of the study: what is searched (or fixed) and how it is scored and chosen."""

    key: str  # folder name of its per-seed records
    label: str
    family: str  # one of FAMILIES
    optimizer: str | None = None
    seeded: bool = False  # started from the warm-start set (the task-level corners)
    space: str | None = None  # search space preset or YAML path
    fitness: str | None = None  # 'main', 'mergenetic', 'mergekit' (which compressed fitness)
    estimator: str | None = None  # override of the fitness's estimator (mergekit-evolve: 'subset')
    candidates: int = 0
    items_per_task: int = 0  # subset items per task and candidate
    finalists: int = 0  # 0: the best fitness mean is chosen without re-scoring
    deterministic: bool = False  # one record, no seeds (corners, fixed recipes)
    recipe: dict[str, Any] | None = None  # fixed recipes: {method, params}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def search_row_key(family: str, optimizer: str, seeded: bool) -> str:
    prefix = {"per-layer": "layer", "task-level": "global"}[family]
    return f"{prefix}-{optimizer}-{SEEDED_LABEL[seeded]}"


# =============================================================================== budgets
@dataclass(frozen=True)
class ItemCosts:
    """The zoo's and the fitnesses' item counts that every budget is computed from."""

    experts: int  # K
    tasks: int  # T
    validation_items: int  # the whole validation (fitness) split, summed over tasks
    smallest_validation_split: int  # the smallest task's validation split (caps subset sizes)
    calibration: int  # the main compressed fitness's calibration (item evaluations)
    items_per_candidate: int  # the main compressed fitness: T x n

    @property
    def endpoint_calibration(self) -> int:
        """Scoring the base and each expert on the whole validation split (Mergenetic-style)."""
        return (self.experts + 1) * self.validation_items

    @property
    def corners(self) -> int:
        """Scoring every expert subset at weight 1 (2^K merges) on the whole validation split."""
        return 2 ** self.experts * self.validation_items


def search_total(calibration: int, candidates: int, items_per_candidate: int, finalists: int,
                 validation_items: int) -> int:
    """Item evaluations of a searched row: calibration + candidates' subsets + finalists' re-scoring."""
    return calibration + candidates * items_per_candidate + finalists * validation_items


def candidates_to_reach(total: int, fixed_cost: int, items_per_candidate: int) -> int:
    """The fewest candidates whose items bring `fixed_cost` to at least `total` (at least 1)."""
    if items_per_candidate < 1:
        raise ValueError(f"items_per_candidate must be positive, got {items_per_candidate}")
    return max(1, math.ceil((total - fixed_cost) / items_per_candidate))


def candidates_within(total: int, fixed_cost: int, items_per_candidate: int) -> int:
    """The most candidates whose items keep `fixed_cost` at or below `total` (0 when none fit)."""
    if items_per_candidate < 1:
        raise ValueError(f"items_per_candidate must be positive, got {items_per_candidate}")
    return max(0, (total - fixed_cost) // items_per_candidate)


def items_to_reach(total: int, candidates: int, tasks: int, cap: int) -> tuple[int, int]:
    """(items per task, candidates) for a calibration-free row reaching at least `total`: the fewest
    items per task at `candidates`; when that exceeds `cap` (the smallest split), `cap` items and
    as many more candidates as needed."""
    if candidates < 1 or tasks < 1 or cap < 1:
        raise ValueError(f"candidates, tasks and cap must be positive, got {candidates}, {tasks}, {cap}")
    n = math.ceil(total / (candidates * tasks))
    if n <= cap:
        return max(1, n), candidates
    return cap, candidates_to_reach(total, 0, cap * tasks)


@dataclass(frozen=True)
class BudgetPlan:
    """Candidates, subset sizes and totals of every family for one per-layer budget."""

    search: dict[str, int]  # per-layer and task-level rows
    mergekit: dict[str, int]
    mergenetic: dict[str, int]
    corners: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_budgets(costs: ItemCosts, budget: int, finalists: int) -> BudgetPlan:
    """Match every baseline to a searched row of `budget` candidates (module docstring)."""
    total = search_total(costs.calibration, budget, costs.items_per_candidate, finalists, costs.validation_items)
    search = {"candidates": budget, "items_per_task": costs.items_per_candidate // costs.tasks,
              "finalists": finalists, "calibration": costs.calibration, "total": total}
    n_mk, b_mk = items_to_reach(total, budget, costs.tasks, costs.smallest_validation_split)
    mergekit = {"candidates": b_mk, "items_per_task": n_mk, "finalists": 0, "calibration": 0,
                "total": b_mk * n_mk * costs.tasks}
    per_candidate = MERGENETIC_ITEMS * costs.tasks
    b_mg = candidates_to_reach(total, costs.endpoint_calibration, per_candidate)
    mergenetic = {"candidates": b_mg, "items_per_task": MERGENETIC_ITEMS, "finalists": 0,
                  "calibration": costs.endpoint_calibration,
                  "total": costs.endpoint_calibration + b_mg * per_candidate}
    corners = {"candidates": 2 ** costs.experts, "items_per_task": 0, "finalists": 0, "calibration": 0,
               "total": costs.corners}
    notes = []
    if total > costs.corners:
        fit = candidates_within(costs.corners, costs.calibration + finalists * costs.validation_items,
                                costs.items_per_candidate)
        notes.append(f"a searched row spends {total:,} item evaluations, the corners {costs.corners:,}: "
                     + (f"at most {fit} candidates would keep a search within the corners' budget"
                        if fit else "the calibration alone exceeds the corners' budget")
                     + "; the corners comparison is shown only where the search spent no more")
    return BudgetPlan(search, mergekit, mergenetic, corners, notes)


# strategies that need a space with depth: localize and stitch takes experts from depth windows, and
# a task-level space has one block (its windows are the corners)
PER_LAYER_ONLY = frozenset({"stitch"})


def study_rows(strategies: Sequence[str], seedings: Sequence[bool], plan: BudgetPlan, *, per_layer_space: str,
               task_level_space: str, mergekit_space: str, mergenetic_space: str, experts: Sequence[str],
               baselines: bool = True) -> list[Row]:
    """Every row of the study, in table order."""
    rows = []
    for family, space in (("per-layer", per_layer_space), ("task-level", task_level_space)):
        if family == "task-level" and not baselines:
            continue
        for optimizer in strategies:
            if family == "task-level" and optimizer in PER_LAYER_ONLY:
                continue
            for seeded in seedings:
                rows.append(Row(search_row_key(family, optimizer, seeded),
                                f"{family} {optimizer}, {SEEDED_LABEL[seeded]}", family, optimizer, seeded, space,
                                "main", None, plan.search["candidates"], plan.search["items_per_task"],
                                plan.search["finalists"]))
    if not baselines:
        return rows
    rows.append(Row("mergekit-evolve", "mergekit-evolve-style: CMA-ES over layer groups, random-subset mean",
                    "mergekit-evolve", "cma", False, mergekit_space, "mergekit", "subset",
                    plan.mergekit["candidates"], plan.mergekit["items_per_task"], 0))
    rows.append(Row("mergenetic", "Mergenetic-style: GA over a global weight and density, gp-IRT (endpoints only)",
                    "mergenetic", "ga", False, mergenetic_space, "mergenetic", "gp-IRT",
                    plan.mergenetic["candidates"], plan.mergenetic["items_per_task"], 0))
    rows.append(Row("corners", f"corners (2^{len(experts)} expert subsets at weight 1) on the full validation split",
                    "corners", candidates=plan.corners["candidates"], deterministic=True))
    K = len(experts)
    fixed = [("fixed-uniform", "uniform task arithmetic (weight 1)", "task_arithmetic", {"weight": [1.0] * K}),
             ("fixed-ties", "TIES, mergekit defaults (weight 1, density 0.5)", "ties",
              {"weight": [1.0] * K, "density": [0.5] * K}),
             ("fixed-averaging", "averaging (linear, 1/K)", "linear", {"weight": [1.0 / K] * K}),
             ("fixed-base", "the base", "task_arithmetic", {"weight": [0.0] * K})]
    fixed += [(f"fixed-expert-{name}", f"expert: {name}", "task_arithmetic", {"weight": list(np.eye(K)[k])})
              for k, name in enumerate(experts)]
    rows += [Row(key, label, "fixed", deterministic=True, recipe={"method": method, "params": params})
             for key, label, method, params in fixed]
    return rows


# =============================================================================== records
def item_evaluations(*, calibration: int = 0, search: int = 0, finalists: int = 0, full_split: int = 0) -> dict[str, int]:
    """A record's item-evaluation accounting; `total` is the sum of the parts."""
    parts = {"calibration": int(calibration), "search": int(search), "finalists": int(finalists),
             "full_split": int(full_split)}
    return {**parts, "total": sum(parts.values())}


def test_summary(test: dict[str, dict[str, float]], pareto_ids: Sequence, chosen_id, tasks: Sequence[str]) -> dict[str, Any]:
    """The final step's numbers for one record from {member: {task: test accuracy}}: the chosen
    member's mean and worst task, and the Pareto set's test hypervolume (reference point 0)."""
    from evomerge.search.pareto import hypervolume

    T = np.array([[test[str(i)][t] for t in tasks] for i in pareto_ids], dtype=float)  # (members, tasks)
    chosen = np.array([test[str(chosen_id)][t] for t in tasks], dtype=float)
    return {"chosen_mean": float(chosen.mean()), "chosen_worst": float(chosen.min()),
            "chosen_per_task": dict(zip(tasks, map(float, chosen))), "hv": float(hypervolume(T, 0.0)),
            "best_mean": float(T.mean(axis=1).max()), "pareto_size": len(pareto_ids)}


def complete(records: Iterable[dict]) -> list[dict]:
    """Records that have been through the final step."""
    return [r for r in records if r.get("test")]


def by_row(records: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["row"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: -1 if r.get("seed") is None else r["seed"])
    return out


METRICS = {"chosen_mean": ("chosen test mean", 100.0, 1), "chosen_worst": ("chosen worst-task test", 100.0, 1),
           "hv": ("Pareto test hypervolume", 1.0, 4)}


@dataclass(frozen=True)
class Comparison:
    """A row against a baseline on one metric: the paired difference, or why there is none."""

    row: str
    baseline: str
    metric: str
    difference: Any  # evomerge.stats.PairedDifference or None
    row_items: float
    baseline_items: float
    matched: bool  # the row spent no more item evaluations than the baseline (or the baseline is a fixed recipe)
    reason: str = ""
    reference: bool = False  # the baseline is a fixed recipe: no budget to match (marked ‡)

    def cell(self) -> str:
        _, scale, digits = METRICS[self.metric]
        if self.difference is None:
            return self.reason
        text = self.difference.format(scale, digits)
        return f"{text} ‡" if self.reference else text

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "baseline": self.baseline, "metric": self.metric,
                "difference": None if self.difference is None else self.difference.to_json(),
                "row_items": self.row_items, "baseline_items": self.baseline_items, "matched": self.matched,
                "reason": self.reason, "reference": self.reference}


def compare(rows: dict[str, list[dict]], row: str, baseline: str, metric: str, *, fixed_recipe: bool = False) -> Comparison:
    """Paired difference row - baseline in `metric` over the seeds both have; a deterministic
    baseline (one record without a seed) pairs with every seed. Budget rule: a searched baseline
    is compared only where the row spent no more item evaluations than it; a fixed recipe
    (`fixed_recipe`) is a reference point and always compared."""
    mine, theirs = rows.get(row, []), rows.get(baseline, [])
    if not mine or not theirs:
        return Comparison(row, baseline, metric, None, float("nan"), float("nan"), False, "no records")
    items_a = float(np.mean([r["item_evaluations"]["total"] for r in mine]))
    items_b = float(np.mean([r["item_evaluations"]["total"] for r in theirs]))
    if len(theirs) == 1 and theirs[0].get("seed") is None:
        pairs = [(r["test"][metric], theirs[0]["test"][metric]) for r in mine]
    else:
        other = {r["seed"]: r for r in theirs}
        pairs = [(r["test"][metric], other[r["seed"]]["test"][metric]) for r in mine if r["seed"] in other]
    if not pairs:
        return Comparison(row, baseline, metric, None, items_a, items_b, False, "no common seeds")
    matched = fixed_recipe or items_a <= items_b
    if not matched:
        return Comparison(row, baseline, metric, None, items_a, items_b, False,
                          f"n/a: spent more ({items_a:,.0f} > {items_b:,.0f})")
    a, b = np.array(pairs).T
    return Comparison(row, baseline, metric, paired_difference(a, b), items_a, items_b, matched, "", fixed_recipe)


# (column title, baseline row key) in table order; None: the row's own task-level counterpart
BASELINES = (("corners (a)", "corners"), ("task-level, same optimizer (b)", None),
             ("mergekit-evolve-style (c)", "mergekit-evolve"), ("Mergenetic-style (d)", "mergenetic"),
             ("uniform task arithmetic (e)", "fixed-uniform"), ("TIES defaults (e)", "fixed-ties"))
BASELINE_TITLES = tuple(title for title, _ in BASELINES)


def baseline_keys(row: Row, available: Sequence[str]) -> list[tuple[str, str]]:
    """(column title, baseline row key) a per-layer row is compared with."""
    out = []
    for title, key in BASELINES:
        if key is None:
            if row.optimizer is None:
                continue
            key = search_row_key("task-level", row.optimizer, row.seeded)
        out.append((title, key))
    return [(title, key) for title, key in out if key in available]


# =============================================================================== tables
def _fmt_items(r: list[dict]) -> str:
    parts = {k: float(np.mean([x["item_evaluations"][k] for x in r])) for k in
             ("calibration", "search", "finalists", "full_split", "total")}
    shown = " + ".join(f"{parts[k]:,.0f}" for k in ("calibration", "search", "finalists", "full_split"))
    return f"{parts['total']:,.0f} ({shown})"


def _stat(values: list[float], scale: float, digits: int) -> str:
    s = mean_sd(values)
    if s.n == 1:
        return f"{scale * s.mean:.{digits}f}"
    return s.format(scale, digits)


def rows_table(rows: Sequence[Row], records: dict[str, list[dict]]) -> list[str]:
    lines = ["| row | seeds | candidates | items / task | item evaluations (calibration + search + finalists + "
             "full split) | chosen test mean (sd) | chosen worst-task test (sd) | Pareto test HV (sd) | Pareto size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rs = records.get(row.key)
        if not rs:
            continue
        seeds = "-" if row.deterministic else str(len(rs))
        lines.append(f"| {row.label} | {seeds} | {row.candidates or '-'} | {row.items_per_task or '-'} | "
                     f"{_fmt_items(rs)} | {_stat([r['test']['chosen_mean'] for r in rs], 100, 1)} | "
                     f"{_stat([r['test']['chosen_worst'] for r in rs], 100, 1)} | "
                     f"{_stat([r['test']['hv'] for r in rs], 1, 4)} | "
                     f"{np.mean([r['test']['pareto_size'] for r in rs]):.0f} |")
    return lines


def comparison_table(rows: Sequence[Row], records: dict[str, list[dict]], metric: str) -> tuple[list[str], list[Comparison]]:
    """Per-layer rows against each baseline: mean paired difference [95% CI]."""
    searched = [r for r in rows if r.family == "per-layer" and r.key in records]
    if not searched:
        return [], []
    present = {title for r in searched for title, _ in baseline_keys(r, list(records))}
    titles = [t for t in BASELINE_TITLES if t in present]  # one order, whichever row has which baselines
    if not titles:
        return [], []
    fixed = {r.key for r in rows if r.family == "fixed"}
    lines = ["| row | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    out = []
    for r in searched:
        cells = dict.fromkeys(titles, "not run")
        for title, key in baseline_keys(r, list(records)):
            c = compare(records, r.key, key, metric, fixed_recipe=key in fixed)
            cells[title] = c.cell()
            out.append(c)
        lines.append(f"| {r.label} | " + " | ".join(cells.values()) + " |")
    return lines, out


def target_lines(rows: Sequence[Row], records: dict[str, list[dict]]) -> tuple[list[str], list[Comparison]]:
    """Issue 14's target: M2N2 and MAP beat random search in test hypervolume at equal seeding (CI > 0)."""
    lines, out = [], []
    for optimizer in ("m2n2", "map"):
        for seeded in (False, True):
            row, base = (search_row_key("per-layer", optimizer, seeded), search_row_key("per-layer", "random", seeded))
            if row not in records or base not in records:
                continue
            c = compare(records, row, base, "hv")
            ok = c.difference is not None and c.difference.low > 0
            verdict = "PASS" if ok else ("no difference shown" if c.difference is not None and not c.difference.excludes_zero
                                         else "MISS")
            lines.append(f"* {optimizer} vs random, both {SEEDED_LABEL[seeded]}: test HV difference {c.cell()} "
                         f"(n = {c.difference.n if c.difference else 0}): **{verdict}**")
            out.append(c)
    return lines, out


def report(rows: Sequence[Row], records: Iterable[dict], study: dict[str, Any]) -> tuple[str, list[Comparison]]:
    """The RESULTS.md block: settings, the rows table, the paired comparisons and the targets."""
    recs = by_row(complete(records))
    plan = study["plan"]
    costs = study["costs"]
    seeded = sorted({len(rs) for rs in recs.values() if any(r.get("seed") is not None for r in rs)})
    seeds = (f"{seeded[0]} seeds" if len(seeded) == 1 else
             f"{seeded[0]}-{seeded[-1]} seeds per row (column *seeds*)" if seeded else f"{study['seeds']} seeds")
    # a study extended with --resume (more seeds, more rows) lists every command that wrote its records
    commands = study.get("commands") or [study["command"]]
    lines = [f"### Search quality on the {study['zoo_size']} zoo (`{study['zoo_hash'][:12]}`, "
             f"{plan['search']['candidates']} candidates per searched row, {seeds})", "",
             *[f"`{c}`" + ("" if i == len(commands) - 1 else "  ") for i, c in enumerate(commands)], "",
             f"Zoo: {costs['experts']} experts, {costs['tasks']} tasks, {costs['validation_items']:,} validation items "
             f"in all. Every choice on validation only (the fitness subsets, the finalists' whole-split re-scoring, "
             f"the corners' validation means); the test splits were read once, in the final step "
             f"(benchmarks/PROTOCOL.md). Warm start (*seeded*): the same {study['warm_start']} task-level corners "
             "for every optimizer. *chosen* = the member a user takes without the test split; its mean and its "
             "worst task on the full test splits; Pareto test HV = hypervolume (reference 0) of the run's Pareto "
             "set (by its fitness estimates) re-scored on the test splits"
             + (f" (at most {study['pareto_test_cap']} members per run: the chosen one and the best others by fitness "
                "mean, the same rule for every row; *Pareto size* counts those scored)"
                if study.get("pareto_test_cap") else "")
             + ". Means (sd, ddof = 1) over seeds.", "",
             "Budgets (item evaluations: calibration + search + finalists + full-split scoring):", "",
             f"* per-layer and task-level searches: {plan['search']['candidates']} candidates x "
             f"{costs['items_per_candidate']} items + calibration {costs['calibration']:,} + "
             f"{plan['search']['finalists']} finalists x {costs['validation_items']:,} = {plan['search']['total']:,};",
             f"* (a) corners: 2^{costs['experts']} x {costs['validation_items']:,} = {plan['corners']['total']:,} "
             "(compared only where the search spent no more);",
             f"* (c) mergekit-evolve-style: no calibration, no finalists, {plan['mergekit']['candidates']} candidates x "
             f"{plan['mergekit']['items_per_task']} random items per task = {plan['mergekit']['total']:,} "
             "(the fewest items per task reaching the search's total);",
             f"* (d) Mergenetic-style: endpoint calibration {plan['mergenetic']['calibration']:,} + "
             f"{plan['mergenetic']['candidates']} candidates x {MERGENETIC_ITEMS} items per task = "
             f"{plan['mergenetic']['total']:,} (the fewest candidates reaching the search's total);",
             "* (e) fixed recipes: no item evaluations (reference points; their differences are marked ‡).", ""]
    lines += [f"* {note}" for note in plan.get("notes", [])]
    lines += ["", *rows_table(rows, recs), ""]
    comparisons: list[Comparison] = []
    for metric in ("chosen_mean", "hv"):
        table, found = comparison_table(rows, recs, metric)
        if table:
            title, scale, _ = METRICS[metric]
            unit = "points" if scale == 100 else "hypervolume"
            lines += [f"Paired differences, {title} ({unit}): per-layer row - baseline, mean [95% percentile bootstrap "
                      "CI, 10,000 resamples, seed 0] over the seeds both have; ‡ = against a fixed recipe (no budget); "
                      "n/a = the search spent more item evaluations than the baseline.", "", *table, ""]
            comparisons += found
    targets, found = target_lines(rows, recs)
    if targets:
        lines += ["Target (issue 14): M2N2 and MAP vs random search at equal seeding, test hypervolume difference "
                  "with a 95% CI above 0:", "", *targets, ""]
        comparisons += found
    return "\n".join(lines).rstrip() + "\n", comparisons
