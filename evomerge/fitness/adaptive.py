"""Adaptive evaluation of a candidate (computerized adaptive testing, CAT) and racing against the Pareto set.

A fixed compressed fitness scores every candidate on the same n items per task. Adaptive
evaluation instead chooses each candidate's items as it goes, batch by batch, as computerized
adaptive testing does (van der Linden & Glas, *Computerized Adaptive Testing*, 2000; Segall 1996
for the multidimensional case) and as Fluid Benchmarking (Hofmann et al., 2025) does for language
models:

1. Start at the prior mean ability (theta = 0: with the empirical prior of `fit_irt(prior_rows=)`
   that is the random merges' mean).
2. Choose the next batch of `batch_size` items by Fisher information at the current ability
   (`select_batch`): greedy D-optimal design, each pick maximising
   log det(M + w_j a_j a_j^T) - log det M = log(1 + w_j a_j^T M^-1 a_j), with w_j = P_j (1 - P_j)
   and M the prior's identity plus the information of the items already given (Sherman-Morrison
   within the batch). With one dimension this is simply the batch of largest a_j^2 P_j (1 - P_j).
   Ties go to the lowest item index, and nothing here draws a random number: the same candidate
   answers the same items. Items the calibration pinned (no variance across calibration models,
   so no estimated parameters) are never chosen, as in `subsets._informative`.
3. Score the batch (a GPU scores the whole batch at once), re-estimate the ability (MAP) from
   every answer so far and the task accuracy (`adaptive_estimate`), and stop the task when the
   accuracy's standard error is at most `se_threshold` (after `min_items`), when the per-task
   budget `max_items` is spent, when no unpinned item is left, or when the candidate is raced out.

`adaptive_estimate` is p-IRT (observed answers + 2PL predictions for the unseen items, averaged
over the whole split) with one change: an unseen *pinned* item is predicted by its smoothed rate
among the calibration models (`population_rates`), not at the candidate's ability. Pinned
parameters are set, not fitted (`irt._pin_constant_items`), and an ability read from adaptively
chosen items can sit far from every calibration model; extrapolating the pinned half of a zoo task
there put the left-out base model's sorting accuracy at 0.10 instead of 0.60, and the MAE on merges
at 0.10-0.12 (benchmarks/adaptive_items.py, `adaptive_b5_pinned_irt`).

Measured (benchmarks/RESULTS.md, "Adaptive items"; small zoo, validation split): on 64 merges the
calibration never saw, the defaults used 23.4 items per task at MAE 0.0245, against 0.0344 for the
fixed 60-item subset; with each calibration model left out of the fit in turn, adaptive only ties
the fixed subset at equal items on the merges and loses on the experts.

Racing (`cannot_reach`): after every round of batches (one per unfinished task) the candidate's
upper bounds value + z * stderr are compared with the current Pareto set's objectives; when some
member is at least as good in every task and better in one, the candidate cannot enter the set
even at its bounds, and every unfinished task stops with reason "raced". `separate_finalists`
gives finalists more batches, those whose interval on the task mean overlaps the leader's, until
the leader's interval separates or the extra budget is spent.

Budgets are item evaluations. Every task's `AdaptiveTest` records its items (in the order given),
its answers, and why it stopped (`STOP_REASONS`); `to_dict` / `from_dict` round-trip it exactly, so
a test interrupted between batches and resumed gives the same items and the same result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evomerge.fitness.estimators import Estimate
from evomerge.fitness.irt import (
    IRTParams,
    _as_2d,
    ability_covariance,
    estimate_ability,
    predict_correct,
)

__all__ = [
    "AdaptiveSettings",
    "AdaptiveTest",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MIN_ITEMS",
    "DEFAULT_SE_THRESHOLD",
    "STOP_REASONS",
    "adaptive_estimate",
    "cannot_reach",
    "fisher_information",
    "population_rates",
    "response_rows",
    "run_adaptive",
    "select_batch",
    "separate_finalists",
]

# Defaults: chosen on the small zoo's fitness (validation) split by benchmarks/adaptive_items.py,
# leave-one-model-out over the 14 calibration models (benchmarks/RESULTS.md, "Adaptive items"). The
# rule: the fewest items per task whose MAE on the 10 random merges is at most the fixed 60-item
# anchors subset's with gp-IRT (0.0263). s.e. threshold 0.0175 stopped after 28.0 items per task on
# average at MAE 0.0251 (0.015: 33.3 items, 0.0240; 0.02: 23.0 items, 0.0301); the fixed subset is as
# good at 30 items there (0.0252). On 64 merges the calibration never saw (`--held-out 64`, the
# fitness's own fit) the same threshold used 23.4 items at MAE 0.0245 against 0.0344 for the fixed
# 60 items. Batches of 5 against single items: MAE within 0.006 from 20 items on (mostly within
# 0.001 from 30), for 5x fewer scorer calls.
DEFAULT_BATCH_SIZE = 5
DEFAULT_MAX_ITEMS = 60  # per task: the compressed fitness's fixed subset size, so adaptive never costs more
DEFAULT_MIN_ITEMS = 10
DEFAULT_SE_THRESHOLD = 0.0175
# Racing's bound value + z * stderr ignores the 2PL's bias: at z = 1.96, 3 of the 15 held-out merges raced
# out (and 1 of 3 models left out) were truly on the Pareto set; at z = 3, 0 of 3 (1 of 2).
DEFAULT_Z = 3.0
STOP_REASONS = ("se", "budget", "exhausted", "raced")
_PINNED = ("population", "irt")

Scorer = Callable[[np.ndarray], np.ndarray]  # item indices (into the fitness split) -> 0/1 answers


@dataclass(frozen=True)
class AdaptiveSettings:
    """How items are chosen and when a task stops (per task; budgets in item evaluations)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_items: int = DEFAULT_MAX_ITEMS
    min_items: int = DEFAULT_MIN_ITEMS
    se_threshold: float = DEFAULT_SE_THRESHOLD
    racing: bool = False
    z: float = DEFAULT_Z
    finalist_max_items: int | None = None  # per task for `separate_finalists`; None: max(200, max_items)
    ability_method: str = "map"
    pinned: str = "population"  # how unseen pinned items are predicted (see the module docstring)

    def __post_init__(self) -> None:
        if self.finalist_max_items is None:
            object.__setattr__(self, "finalist_max_items", max(200, self.max_items))
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_items < 1:
            problems.append(f"max_items must be >= 1, got {self.max_items}")
        if not 0 <= self.min_items <= self.max_items:
            problems.append(f"min_items must lie in [0, max_items = {self.max_items}], got {self.min_items}")
        if not self.se_threshold > 0:
            problems.append(f"se_threshold must be > 0, got {self.se_threshold}")
        if not self.z > 0:
            problems.append(f"z must be > 0, got {self.z}")
        if self.finalist_max_items < self.max_items:
            problems.append(f"finalist_max_items ({self.finalist_max_items}) must be >= max_items ({self.max_items})")
        if self.ability_method not in ("map", "mle"):
            problems.append(f"ability_method must be 'map' or 'mle', got {self.ability_method!r}")
        if self.pinned not in _PINNED:
            problems.append(f"pinned must be one of {list(_PINNED)}, got {self.pinned!r}")
        if problems:
            raise ValueError("adaptive settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# Information, selection, estimate
# ---------------------------------------------------------------------------------------------


def _theta_row(theta: np.ndarray | float | None, params: IRTParams) -> np.ndarray:
    if theta is None:
        return np.zeros(params.dims)
    return np.asarray(theta, dtype=np.float64).reshape(params.dims)


def fisher_information(theta: np.ndarray | float, params: IRTParams) -> np.ndarray:
    """Each item's Fisher information about the ability at `theta`: P (1 - P) a a^T.

    (items,) for a unidimensional model (a_j^2 P_j (1 - P_j)), (items, D, D) otherwise.
    """
    t = _theta_row(theta, params)
    p = predict_correct(t, params)[0]  # (I,)
    w = p * (1.0 - p)
    a = _as_2d(params.discrimination)  # (I, D)
    if params.dims == 1:
        return a[:, 0] ** 2 * w
    return w[:, None, None] * a[:, :, None] * a[:, None, :]  # (I, D, D)


def select_batch(theta: np.ndarray | float | None, params: IRTParams, administered: Sequence[int],
                 batch_size: int, *, prior: float = 1.0) -> np.ndarray:
    """The next `batch_size` items for a candidate at ability `theta` (greedy D-optimal; see the
    module docstring). `administered` items and pinned items are never chosen; fewer than
    `batch_size` come back when fewer are left. `prior` is the information the prior adds (1 for
    MAP's N(0, I); a tiny ridge for MLE keeps the design defined before any answer)."""
    t = _theta_row(theta, params)
    a = _as_2d(params.discrimination)  # (I, D)
    p = predict_correct(t, params)[0]
    w = p * (1.0 - p)  # (I,)
    given = np.asarray(list(administered), dtype=np.int64)
    info = max(prior, 1e-6) * np.eye(params.dims) + (a[given] * w[given, None]).T @ a[given]  # (D, D)
    inverse = np.linalg.inv(info)
    available = ~params.pinned.copy()
    available[given] = False
    chosen: list[int] = []
    for _ in range(min(int(batch_size), int(available.sum()))):
        quad = np.einsum("id,de,ie->i", a, inverse, a)  # (I,) a_j^T M^-1 a_j
        gain = np.log1p(w * quad)
        gain[~available] = -np.inf
        j = int(np.argmax(gain))  # the first maximum: ties go to the lowest item index
        chosen.append(j)
        available[j] = False
        u = inverse @ a[j]  # Sherman-Morrison: (M + w a a^T)^-1
        inverse = inverse - (w[j] / (1.0 + w[j] * (a[j] @ u))) * np.outer(u, u)
    return np.asarray(chosen, dtype=np.int64)


def population_rates(params: IRTParams) -> np.ndarray:
    """(items,) each item's rate among the calibration models, where the parameters say it: the
    add-half smoothed (k + 1/2) / (M + 1) that `irt._pin_constant_items` pinned the item to, for a
    pinned item (k = M, all right, when the calibration models' mean predicted probability is
    above 1/2; k = 0 otherwise); that mean predicted probability for the others."""
    mean = predict_correct(params.theta, params).mean(axis=0)  # (I,)
    m = params.n_models
    smoothed = np.where(mean > 0.5, (m + 0.5) / (m + 1.0), 0.5 / (m + 1.0))
    return np.where(params.pinned, smoothed, mean)


def adaptive_estimate(responses: np.ndarray, items: Sequence[int], params: IRTParams, method: str = "map", *,
                      pinned: str = "population") -> Estimate:
    """Full-task accuracy from the answers to `items` (any order): p-IRT, with unseen pinned items
    predicted by `population_rates` (`pinned="population"`) or at the ability like the rest
    ("irt"). Standard error by the delta method plus the unseen answers' Bernoulli noise, as
    `estimators.pirt_estimate`; the pinned items' predictions do not move with the ability."""
    if pinned not in _PINNED:
        raise ValueError(f"pinned must be one of {list(_PINNED)}, got {pinned!r}")
    idx = np.asarray(list(items), dtype=np.int64)
    y = np.asarray(responses, dtype=np.float64).reshape(-1)
    if y.shape != idx.shape:
        raise ValueError(f"{idx.size} items but {y.size} responses")
    if np.unique(idx).size != idx.size:
        raise ValueError("an item was given twice")
    n_total, dims = params.n_items, params.dims
    if idx.size:
        seen = params.items(idx)
        theta = estimate_ability(y, seen, method)
        cov = ability_covariance(y, theta, seen, method)
    else:  # before the first answer: the prior
        theta = np.zeros(()) if dims == 1 else np.zeros(dims)
        cov = np.eye(dims) if method == "map" else np.full((dims, dims), np.inf)
    p = predict_correct(theta, params)[0]  # (I,)
    moves = np.ones(n_total, dtype=bool)
    if pinned == "population":
        p = np.where(params.pinned, population_rates(params), p)
        moves = ~params.pinned
    unseen = np.ones(n_total, dtype=bool)
    unseen[idx] = False
    value = float((y.sum() + p[unseen].sum()) / n_total)
    a = _as_2d(params.discrimination)
    slope = ((p * (1 - p)) * (unseen & moves)) @ a / n_total  # (D,) d value / d theta
    variance = float(slope @ cov @ slope) + float((p * (1 - p))[unseen].sum()) / n_total**2
    return Estimate("adaptive", value, float(np.sqrt(variance)), y, np.asarray(theta, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# One task's test, one candidate's tests
# ---------------------------------------------------------------------------------------------


@dataclass
class AdaptiveTest:
    """One task's adaptive test for one candidate: items given (in order), answers, estimate, stop."""

    items: list[int] = field(default_factory=list)
    responses: list[int] = field(default_factory=list)
    value: float = float("nan")
    stderr: float = float("inf")
    theta: list[float] | None = None
    stop: str | None = None  # one of STOP_REASONS once the task is finished
    batches: int = 0

    @property
    def used(self) -> int:
        return len(self.items)

    def next_batch(self, params: IRTParams, settings: AdaptiveSettings, *, limit: int | None = None) -> np.ndarray:
        """The next items to score (empty once stopped); `limit` overrides `settings.max_items`."""
        if self.stop is not None:
            return np.zeros(0, dtype=np.int64)
        room = (settings.max_items if limit is None else limit) - self.used
        batch = select_batch(self.theta, params, self.items, min(settings.batch_size, room),
                             prior=1.0 if settings.ability_method == "map" else 0.0) if room > 0 else np.zeros(0, np.int64)
        if batch.size == 0:
            self.stop = "budget" if room <= 0 else "exhausted"
        return batch

    def record(self, batch: np.ndarray, answers: np.ndarray, params: IRTParams, settings: AdaptiveSettings, *,
               limit: int | None = None) -> None:
        """Add a scored batch, re-estimate, and apply the stopping rule."""
        answers = np.asarray(answers).reshape(-1)
        batch = np.asarray(batch, dtype=np.int64).reshape(-1)
        if answers.shape != batch.shape:
            raise ValueError(f"a batch of {batch.size} items came back with {answers.size} answers")
        if not np.all((answers == 0) | (answers == 1)):
            raise ValueError(f"answers must be 0/1, got {np.unique(answers)[:5].tolist()}")
        self.items += [int(i) for i in batch]
        self.responses += [int(v) for v in answers]
        self.batches += 1
        est = adaptive_estimate(np.asarray(self.responses), self.items, params, settings.ability_method,
                                pinned=settings.pinned)
        self.value, self.stderr = est.value, est.stderr
        self.theta = np.atleast_1d(est.theta).tolist()
        cap = settings.max_items if limit is None else limit
        if self.used >= settings.min_items and self.stderr <= settings.se_threshold:
            self.stop = "se"
        elif self.used >= cap:
            self.stop = "budget"
        elif not (~params.pinned).sum() > self.used:
            self.stop = "exhausted"

    def upper(self, z: float) -> float:
        return self.value + z * self.stderr

    def to_dict(self) -> dict[str, Any]:
        """The evaluation record's per-task entry (plain JSON; floats round-trip exactly)."""
        return {"items": list(self.items), "responses": list(self.responses), "used": self.used,
                "stop": self.stop, "value": self.value, "stderr": self.stderr, "theta": self.theta,
                "batches": self.batches}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdaptiveTest":
        return cls([int(i) for i in data["items"]], [int(v) for v in data["responses"]], float(data["value"]),
                   float(data["stderr"]), None if data.get("theta") is None else [float(t) for t in data["theta"]],
                   data.get("stop"), int(data.get("batches", 0)))


def cannot_reach(upper: np.ndarray, front: np.ndarray) -> bool:
    """True when some row of `front` (members, tasks) dominates `upper` (tasks,): >= everywhere, > once.

    Objectives are maximised, as in the Pareto archive; NaN rows (failed members) never dominate."""
    u = np.asarray(upper, dtype=np.float64).reshape(-1)
    f = np.asarray(front, dtype=np.float64).reshape(-1, u.size)
    if f.size == 0 or not np.all(np.isfinite(u)):
        return False
    ok = np.all(np.isfinite(f), axis=1)
    dominates = np.all(f >= u, axis=1) & np.any(f > u, axis=1) & ok
    return bool(dominates.any())


def run_adaptive(scorers: Mapping[str, Scorer], params: Mapping[str, IRTParams], settings: AdaptiveSettings,
                 *, front: np.ndarray | None = None, tests: Mapping[str, AdaptiveTest] | None = None,
                 limit: int | None = None, rounds: int | None = None) -> dict[str, AdaptiveTest]:
    """Adaptive tests for one candidate over every task, a round (one batch per unfinished task,
    in task order) at a time, with racing against `front` (members, tasks in `scorers` order)
    after each round when `settings.racing`. `tests` continues earlier tests (a resume);
    `rounds` stops after that many rounds (to interrupt one, in tests)."""
    names = list(scorers)
    state = {t: (AdaptiveTest.from_dict(tests[t].to_dict()) if tests and t in tests else AdaptiveTest())
             for t in names}
    done = 0
    while any(state[t].stop is None for t in names) and (rounds is None or done < rounds):
        for t in names:
            batch = state[t].next_batch(params[t], settings, limit=limit)
            if batch.size:
                state[t].record(batch, scorers[t](batch), params[t], settings, limit=limit)
        done += 1
        if settings.racing and front is not None and all(state[t].used for t in names):
            if cannot_reach(np.array([state[t].upper(settings.z) for t in names]), front):
                for t in names:
                    if state[t].stop is None:
                        state[t].stop = "raced"
    return state


def _mean_interval(tests: Mapping[str, AdaptiveTest], z: float) -> tuple[float, float, float]:
    values = np.array([t.value for t in tests.values()])
    se = float(np.sqrt(sum(t.stderr**2 for t in tests.values()))) / len(tests)
    mean = float(values.mean())
    return mean - z * se, mean, mean + z * se


def separate_finalists(finalists: Mapping[int, Mapping[str, AdaptiveTest]], scorers_for: Callable[[int], Mapping[str, Scorer]],
                       params: Mapping[str, IRTParams], settings: AdaptiveSettings, *,
                       budget: int) -> tuple[dict[int, dict[str, AdaptiveTest]], dict[str, Any]]:
    """More items for finalists until the leader's interval on the task mean separates from every
    other finalist's, or `budget` more item evaluations are spent, or nobody may take more
    (`settings.finalist_max_items` per task). Each round, every finalist whose interval overlaps
    the leader's (the leader included) gets one more batch per task, in id order. Returns the
    extended tests and {"leader", "separated", "items", "rounds"}."""
    state = {cid: {t: AdaptiveTest.from_dict(x.to_dict()) for t, x in tests.items()} for cid, tests in finalists.items()}
    spent, rounds = 0, 0

    def overlapping() -> tuple[int, list[int]]:
        intervals = {cid: _mean_interval(tests, settings.z) for cid, tests in state.items()}
        leader = min(intervals, key=lambda c: (-intervals[c][1], c))
        rivals = [c for c in sorted(state) if c != leader and intervals[c][2] >= intervals[leader][0]]
        return leader, rivals

    leader, rivals = overlapping()
    while rivals and spent < budget:
        progressed = False
        for cid in sorted([leader, *rivals]):
            scorers = None
            for t, test in state[cid].items():
                if test.used >= settings.finalist_max_items or spent >= budget:
                    continue
                test.stop = None  # reopened: a finalist's earlier stop is not final
                room = min(settings.finalist_max_items, test.used + budget - spent)
                batch = test.next_batch(params[t], settings, limit=room)
                if batch.size:
                    scorers = scorers or scorers_for(cid)
                    test.record(batch, scorers[t](batch), params[t], settings, limit=room)
                    spent += int(batch.size)
                    progressed = True
        rounds += 1
        leader, rivals = overlapping()
        if not progressed:
            break
    return state, {"leader": leader, "separated": not rivals, "items": spent, "rounds": rounds}


def response_rows(records: Sequence[Mapping[str, Any]], tasks: Sequence[str], n_items: Sequence[int]) -> np.ndarray:
    """(records, sum of n_items) answers of adaptive evaluation records laid out over the tasks' whole
    fitness splits: each record's answers at the items it was given, NaN elsewhere (all NaN for a
    failed record). What the optimizers' `responses` get when items differ between candidates."""
    offsets = np.concatenate([[0], np.cumsum(n_items)])
    out = np.full((len(records), int(offsets[-1])), np.nan)
    for row, record in enumerate(records):
        if record.get("status", "ok") != "ok" or not record.get("adaptive"):
            continue
        for k, task in enumerate(tasks):
            items = np.asarray(record["adaptive"][task]["items"], dtype=np.int64)
            out[row, offsets[k] + items] = np.asarray(record["responses"][task], dtype=np.float64)
    return out
