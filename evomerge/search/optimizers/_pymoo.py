"""pymoo back-ends (NSGA-II, NSGA-III, GA, DE) through pymoo's ask-and-tell interface.

Follows pymoo 0.6's documented pattern: ``algorithm.setup(problem, seed=..., termination=...)``,
``pop = algorithm.ask()``, ``Evaluator().eval(StaticProblem(problem, F=F), pop)``,
``algorithm.tell(infills=pop)``. pymoo minimises, so objectives are negated. GA and DE are
single-objective: they minimise the negated scalarisation (weighted mean of the objectives).

Composition, not pymoo's hook hierarchy: :class:`PymooEngine` holds one configured pymoo algorithm
and does the ask/evaluate/tell dance; each registered optimizer is a :class:`ReplayOptimizer` whose
only code builds its algorithm. Checkpointing is by replay: pymoo's Algorithm/Population objects
are not plain data, so the state is the seed plus the ask/tell history.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.algorithms.soo.nonconvex.de import DE
from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.core.evaluator import Evaluator
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.problems.static import StaticProblem
from pymoo.util.ref_dirs import get_reference_directions

from ._base import BaseSettings, Optimizer
from ._replay import ReplayOptimizer

__all__ = [
    "DEOptimizer",
    "DESettings",
    "GAOptimizer",
    "NSGA2Optimizer",
    "NSGA3Optimizer",
    "NSGA3Settings",
    "PymooEngine",
    "PymooSettings",
]


@dataclass(frozen=True)
class PymooSettings(BaseSettings):
    pop_size: int = 20


@dataclass(frozen=True)
class NSGA3Settings(PymooSettings):
    # Das-Dennis partitions; None -> the most that give no more directions than pop_size.
    n_partitions: int | None = None


@dataclass(frozen=True)
class DESettings(PymooSettings):
    variant: str = "DE/rand/1/bin"
    CR: float = 0.7


class PymooEngine:
    """One pymoo algorithm behind ask/tell.

    weights: ``None`` for a multi-objective algorithm (it minimises the negated objectives), else
    the scalarisation weights ``(M,)`` of a single-objective one (it minimises the negated
    weighted mean).
    """

    def __init__(self, algorithm: Any, lower: np.ndarray, upper: np.ndarray, n_objectives: int, seed: int,
                 weights: np.ndarray | None = None):
        self.algorithm, self.weights = algorithm, weights
        n_obj = n_objectives if weights is None else 1
        self.problem = Problem(n_var=len(lower), n_obj=n_obj, xl=lower, xu=upper)
        self.algorithm.setup(self.problem, termination=NoTermination(), seed=seed, verbose=False)
        self.population = None  # the last ask, until told

    @classmethod
    def for_optimizer(cls, opt: Optimizer, algorithm: Any) -> "PymooEngine":
        return cls(algorithm, opt.lower, opt.upper, opt.n_objectives, opt.seed,
                   opt.weights if opt.single_objective else None)

    def ask(self) -> np.ndarray:
        self.population = self.algorithm.ask()
        return self.population.get("X")  # (n, dim)

    def tell(self, genomes: np.ndarray, objectives: np.ndarray) -> None:
        F = -objectives if self.weights is None else -(objectives @ self.weights)[:, None]  # to minimise
        self.population.set("X", genomes)  # the clipped rows the caller evaluated
        Evaluator().eval(StaticProblem(self.problem, F=F), self.population)
        self.algorithm.tell(infills=self.population)
        self.population = None


def population_settings(opt: Optimizer) -> dict[str, Any]:
    """``pop_size`` and, with initial genomes, pymoo's ``sampling`` for the first generation: the
    initial genomes, then uniform samples (from their own seeded stream) up to pop_size."""
    pop_size = opt.settings.pop_size
    if pop_size < 2:
        raise ValueError(f"{opt.name}: pop_size must be >= 2, got {pop_size}")
    seeds = opt.initial_rows()
    if not len(seeds):
        return {"pop_size": pop_size}
    unit = np.random.default_rng([opt.seed, 2]).random((max(0, pop_size - len(seeds)), opt.dim))
    return {"pop_size": pop_size, "sampling": np.vstack([seeds, opt.lower + unit * (opt.upper - opt.lower)])}


class NSGA2Optimizer(ReplayOptimizer):
    name = "nsga2"
    Settings = PymooSettings
    population_setting = "pop_size"

    def _make_engine(self) -> PymooEngine:
        return PymooEngine.for_optimizer(self, NSGA2(**population_settings(self)))


class NSGA3Optimizer(ReplayOptimizer):
    """NSGA-III with Das-Dennis reference directions (``get_reference_directions("das-dennis")``)."""

    name = "nsga3"
    Settings = NSGA3Settings
    population_setting = "pop_size"

    def _make_engine(self) -> PymooEngine:
        population = population_settings(self)
        M, pop = self.n_objectives, population["pop_size"]
        p = self.settings.n_partitions
        if p is None:
            p = 1
            while M > 1 and comb(p + 1 + M - 1, M - 1) <= pop:
                p += 1
        if p < 1:
            raise ValueError(f"nsga3: n_partitions must be >= 1, got {p}")
        ref_dirs = get_reference_directions("das-dennis", M, n_partitions=p)
        if len(ref_dirs) > pop:
            raise ValueError(
                f"nsga3: {len(ref_dirs)} Das-Dennis directions (n_partitions={p}, {M} objectives) "
                f"exceed pop_size={pop}; raise pop_size or lower n_partitions"
            )
        return PymooEngine.for_optimizer(self, NSGA3(ref_dirs=ref_dirs, **population))


class GAOptimizer(ReplayOptimizer):
    """pymoo's single-objective GA on the weighted mean of the objectives."""

    name = "ga"
    Settings = PymooSettings
    population_setting = "pop_size"
    single_objective = True

    def _make_engine(self) -> PymooEngine:
        return PymooEngine.for_optimizer(self, GA(**population_settings(self)))


class DEOptimizer(ReplayOptimizer):
    """pymoo's differential evolution on the weighted mean of the objectives."""

    name = "de"
    Settings = DESettings
    population_setting = "pop_size"
    single_objective = True

    def _make_engine(self) -> PymooEngine:
        s = self.settings
        return PymooEngine.for_optimizer(self, DE(variant=s.variant, CR=s.CR, **population_settings(self)))
