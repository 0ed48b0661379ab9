"""Finalist racing for `Run.choose`: score the finalists on the fitness split a batch of items at a
time and drop those that are confidently worse than the current leader, instead of scoring every
finalist on the whole split.

The procedure is a paired racing algorithm (Maron & Moore's Hoeffding races, 1994; Birattari et
al.'s F-Race, 2002), with a normal bound on stratified sampling without replacement (Cochran,
*Sampling Techniques*, 1977, ch. 5) in place of Hoeffding's, for the reason given below.

1. Each task's fitness split is put in one seeded random order (`item_order`: a generator seeded
   from (seed, task index)); round r gives *every* surviving finalist the next `batch` items of
   every task in that order. All finalists answer the same items, so comparisons are paired.
2. After each round the leader is the survivor best by the choice rule (`ChoiceRule`: primary key,
   then secondary, then the compressed-fitness rank) on the items seen so far. A rival is dropped
   when the upper confidence bound of (rival - leader) on the rule's primary statistic is below 0.
3. Racing stops when one finalist is left (stop "won") or when the whole split has been scored
   (the survivors: stop "split_used"). Then every survivor's accuracies are exact, and the choice
   among them is `ChoiceRule.ranked` on those accuracies: today's choice whenever nobody was dropped.

The bound, for the primary statistic P (a weighted mean of the task accuracies for "mean" and
weights, the lowest task accuracy for "worst"):

* mean / weights (w_t = 1/T for the mean): the estimate of P_c - P_L is
  D = sum_t w_t mean_i(x_c,ti - x_L,ti) over the n_t items of task t seen so far, with variance
  sum_t w_t^2 (1 - n_t/N_t) s_t^2 / n_t (stratified, without replacement: the finite-population
  factor makes the bound exact, width 0, once a task's N_t items are all seen).
* worst: P_c - P_L <= A_c,s - min_u A_L,u for every task s, so the rival is dropped when, for some
  task s, A_c,s - A_L,u has an upper bound below 0 for *every* task u (u = s: paired differences;
  u != s: independent means on different items, variances added).

s_t^2 is the sample variance of the paired differences with one +1 and one -1 added (for a single
accuracy: one 1 and one 0), so that a batch in which the two finalists happen to agree on every item,
or disagree in one direction only, does not give a zero-width interval. The bound is one-sided at
z = Phi^-1(1 - delta / m), delta = 1 - confidence, with a Bonferroni union over m = (finalists - 1)
x (rounds that can end with some task unseen) x (T for "worst", else 1) comparisons, so that the
probability of dropping the finalist that is truly best on the whole split is at most delta (under
the normal approximation; tests/test_finalist_racing.py checks the rate by simulation). Hoeffding's
bound is valid without the normal approximation but ignores that paired finalists agree on most
items: on differences in [-1, 1] its one-sided half-width is 2 sqrt(ln(1/delta) / 2n), 0.175 at
n = 300 items and delta = 0.01, and separating a gap of 0.026 (the two best finalists by the mean on
the small zoo's run) takes n of about 13,600, more than the 3,000-item split. An empirical-Bernstein
bound uses the variance but pays a 7 ln(3/delta) / 3(n-1) range term; the normal bound is the one
that lets racing stop early here, and the simulation is its check.

Not resumable: like the whole-split choice it replaces, a race interrupted before it ends records
nothing (verify.json is written once, at the end).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from evomerge.runs.run import ChoiceRule

__all__ = ["DEFAULT_BATCH", "DEFAULT_CONFIDENCE", "RaceResult", "RacingSettings", "STOP_REASONS",
           "item_order", "race_finalists"]

DEFAULT_BATCH = 100  # items per task per round: a tenth of a 1,000-item fitness split
DEFAULT_CONFIDENCE = 0.95
STOP_REASONS = ("dropped", "won", "split_used")

# answers(candidate id, {task: item indices into the fitness split}) -> {task: 0/1 answers}
Answers = Callable[[int, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class RacingSettings:
    batch: int = DEFAULT_BATCH
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0

    def __post_init__(self) -> None:
        from evomerge.errors import OptionError

        if not (isinstance(self.batch, (int, np.integer)) and not isinstance(self.batch, bool) and self.batch >= 1):
            raise OptionError("batch", f"expected a whole number of items per task, at least 1, got {self.batch!r}")
        if not (isinstance(self.confidence, (int, float)) and 0.0 < self.confidence < 1.0):
            raise OptionError("confidence", f"expected a number strictly between 0 and 1, got {self.confidence!r}")


@dataclass
class RaceResult:
    chosen: int
    members: dict[int, dict[str, Any]]  # id -> items {task: n}, stop, round, dropped_by, accuracy {task: on items seen}
    rounds: int
    item_evaluations: int
    full_split_item_evaluations: int  # what scoring every finalist on the whole split costs
    z: float
    answers: dict[int, dict[str, np.ndarray]] = field(repr=False, default_factory=dict)  # in item_order

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "rounds": self.rounds, "item_evaluations": self.item_evaluations,
                "full_split_item_evaluations": self.full_split_item_evaluations, "z": self.z,
                "members": {str(k): v for k, v in self.members.items()}}


def item_order(n_items: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """{task: a permutation of range(N_t)}: the order in which every finalist sees task t's items."""
    return {task: np.random.default_rng([int(seed), k]).permutation(int(n)) for k, (task, n) in enumerate(n_items.items())}


def _variance(values: np.ndarray, pseudo: tuple[float, float]) -> float:
    """Sample variance (n - 1 denominator) of `values` with the two pseudo-observations added."""
    padded = np.concatenate([np.asarray(values, dtype=np.float64), np.asarray(pseudo, dtype=np.float64)])
    return float(padded.var(ddof=1))


def _upper_mean_rule(rival: Mapping[str, np.ndarray], leader: Mapping[str, np.ndarray], weights: np.ndarray,
                     n_total: Mapping[str, int], z: float) -> float:
    """Upper bound of P_rival - P_leader for a weighted mean of task accuracies."""
    estimate, variance = 0.0, 0.0
    for w, task in zip(weights, n_total):
        d = rival[task].astype(np.float64) - leader[task].astype(np.float64)
        n, total = d.size, n_total[task]
        estimate += w * float(d.mean())
        variance += w * w * (1.0 - n / total) * _variance(d, (1.0, -1.0)) / n
    return estimate + z * math.sqrt(max(variance, 0.0))


def _upper_worst_rule(rival: Mapping[str, np.ndarray], leader: Mapping[str, np.ndarray], n_total: Mapping[str, int],
                      z: float) -> float:
    """An upper bound of P_rival - P_leader for P = the lowest task accuracy: min over tasks s of
    max over tasks u of the upper bound of A_rival,s - A_leader,u (see the module docstring)."""
    def fpc_var(x: np.ndarray, task: str, pseudo: tuple[float, float]) -> float:
        return (1.0 - x.size / n_total[task]) * _variance(x, pseudo) / x.size

    best = math.inf
    for s in n_total:
        worst_case = -math.inf
        for u in n_total:
            a, b = rival[s].astype(np.float64), leader[u].astype(np.float64)
            if s == u:
                estimate, variance = float((a - b).mean()), fpc_var(a - b, s, (1.0, -1.0))
            else:
                estimate = float(a.mean() - b.mean())
                variance = fpc_var(a, s, (1.0, 0.0)) + fpc_var(b, u, (1.0, 0.0))
            worst_case = max(worst_case, estimate + z * math.sqrt(max(variance, 0.0)))
        best = min(best, worst_case)
    return best


def race_finalists(finalists: Sequence[int], n_items: Mapping[str, int], rule: "ChoiceRule", answers: Answers,
                   settings: RacingSettings = RacingSettings(), *, echo: Callable[[str], Any] | None = None) -> RaceResult:
    """Race `finalists` (best compressed-fitness rank first: it breaks full ties) on splits of
    `n_items` {task: N_t} items, in `rule.tasks` order. `answers` scores one finalist on a batch of
    items of every task. See the module docstring."""
    import pandas as pd

    finalists = [int(c) for c in finalists]
    if not finalists:
        raise ValueError("race_finalists needs at least one finalist")
    tasks = list(rule.tasks)
    n_items = {t: int(n_items[t]) for t in tasks}
    if any(n < 1 for n in n_items.values()):
        raise ValueError(f"every task needs at least one item, got {n_items}")
    order = item_order(n_items, settings.seed)
    uncertain_rounds = max(1, max(math.ceil(n / settings.batch) for n in n_items.values()) - 1)
    comparisons = max(1, len(finalists) - 1) * uncertain_rounds * (len(tasks) if rule.by == "worst" else 1)
    z = NormalDist().inv_cdf(1.0 - (1.0 - settings.confidence) / comparisons)
    weights = np.full(len(tasks), 1.0 / len(tasks)) if rule.by == "mean" else np.asarray(rule.weights or (), float)

    seen: dict[int, dict[str, list[np.ndarray]]] = {c: {t: [] for t in tasks} for c in finalists}
    members: dict[int, dict[str, Any]] = {c: {"items": {t: 0 for t in tasks}, "stop": None, "round": 0,
                                              "dropped_by": None} for c in finalists}
    alive = list(finalists)
    used = {t: 0 for t in tasks}
    rounds, spent = 0, 0
    while len(alive) > 1 and any(used[t] < n_items[t] for t in tasks):
        rounds += 1
        batch = {t: order[t][used[t]:min(n_items[t], used[t] + settings.batch)] for t in tasks}
        for c in alive:
            got = answers(c, batch)
            for t in tasks:
                values = np.asarray(got[t]).astype(np.int64).reshape(-1)
                if values.size != batch[t].size:
                    raise ValueError(f"task {t!r}: {values.size} answers for {batch[t].size} items (finalist {c})")
                seen[c][t].append(values)
                members[c]["items"][t] += int(values.size)
                spent += int(values.size)
        used = {t: used[t] + int(batch[t].size) for t in tasks}
        so_far = {c: {t: np.concatenate(seen[c][t]) for t in tasks} for c in alive}
        frame = pd.DataFrame([[float(np.mean(so_far[c][t])) for t in tasks] for c in alive], index=alive, columns=tasks)
        leader = rule.ranked(frame)[0]  # stable: ties keep the compressed-fitness order of `alive`
        exhausted = all(used[t] >= n_items[t] for t in tasks)  # then the rule itself decides, below
        for c in ([] if exhausted else list(alive)):
            if c == leader:
                continue
            if rule.by == "worst":
                upper = _upper_worst_rule(so_far[c], so_far[leader], n_items, z)
            else:
                upper = _upper_mean_rule(so_far[c], so_far[leader], weights, n_items, z)
            if upper < 0.0:
                alive.remove(c)
                members[c].update(stop="dropped", round=rounds, dropped_by=leader)
        if echo is not None:
            echo(f"  round {rounds}: {min(used.values())}-{max(used.values())} items per task; leader {leader}; "
                 f"left {alive}")
    final = {c: {t: float(np.mean(np.concatenate(seen[c][t]))) if seen[c][t] else None for t in tasks}
             for c in finalists}  # None: no item seen (a single finalist wins unscored)
    if len(alive) == 1:
        chosen = alive[0]
        members[chosen].update(stop="won", round=rounds)
    else:  # the whole split was scored: exact accuracies, today's rule
        frame = pd.DataFrame([[final[c][t] for t in tasks] for c in alive], index=alive, columns=tasks)
        chosen = rule.ranked(frame)[0]
        for c in alive:
            members[c].update(stop="split_used", round=rounds)
    for c in finalists:
        members[c]["accuracy"] = final[c]
        members[c]["chosen"] = c == chosen
    kept = {c: {t: np.concatenate(seen[c][t]) if seen[c][t] else np.zeros(0, np.int64) for t in tasks}
            for c in finalists}
    return RaceResult(chosen=chosen, members=members, rounds=rounds, item_evaluations=spent,
                      full_split_item_evaluations=len(finalists) * sum(n_items.values()), z=float(z), answers=kept)
