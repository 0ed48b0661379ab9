"""pymoo back-ends (NSGA-II, NSGA-III, GA, DE) through pymoo's ask-and-tell interface.

Follows pymoo 0.6's documented pattern: ``algorithm.setup(problem, seed=..., termination=...)``,
``pop = algorithm.ask()``, ``Evaluator().eval(StaticProblem(problem, F=F), pop)``,
``algorithm.tell(infills=pop)``. pymoo minimises, so objectives are negated. GA and DE are
single-objective: they minimise the negated scalarisation (weighted mean of the objectives).

Composition, not pymoo's hook hierarchy: :class:`PymooEngine` holds one configured pymoo algorithm
and does the ask/evaluate/tell dance; each registered optimizer is a :class:`ReplayOptimizer` whose
only code builds its algorithm. Checkpointing is by replay: pymoo's Algorithm/Population objects
are not plain data, so the state is the seed plus the ask/tell history.

Steady state (``steady_state: true`` for NSGA-II, NSGA-III and GA): after the first population,
each ask breeds one offspring from the current population (pymoo's mating with
``n_offsprings=1``) and each tell runs the survival over the population plus the told individual
((mu + 1) selection, as in Durillo et al.'s steady-state NSGA-II), so results can be told one at
a time in any order (``ask_one`` / ``tell_one``, the asynchronous schedule). pymoo breeds only from
a told first population: while some of it is out, an ask returns nothing (a free worker waits for
the next result). DE has no steady-state form here: it replaces each parent by its own trial.
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
from pymoo.core.population import Population
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
    "GeneticOptimizer",
    "GeneticSettings",
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
class GeneticSettings(PymooSettings):
    steady_state: bool = False  # one offspring per ask, survival per told individual (see the module docstring)


@dataclass(frozen=True)
class NSGA3Settings(GeneticSettings):
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
                 weights: np.ndarray | None = None, steady: bool = False):
        self.algorithm, self.weights, self.steady = algorithm, weights, steady
        n_obj = n_objectives if weights is None else 1
        self.problem = Problem(n_var=len(lower), n_obj=n_obj, xl=lower, xu=upper)
        self.algorithm.setup(self.problem, termination=NoTermination(), seed=seed, verbose=False)
        self.population = None  # the last ask, until told (steady state: the first population, until all told)
        self.told: np.ndarray | None = None  # steady state: (pop_size,) which rows of the first population are told
        self.first_F: np.ndarray | None = None

    @classmethod
    def for_optimizer(cls, opt: Optimizer, algorithm: Any) -> "PymooEngine":
        return cls(algorithm, opt.lower, opt.upper, opt.n_objectives, opt.seed,
                   opt.weights if opt.single_objective else None, getattr(opt.settings, "steady_state", False))

    def ask(self) -> np.ndarray:
        if self.steady and self.population is not None:  # the first population is out: breed from it once told
            return np.zeros((0, self.problem.n_var))
        population = self.algorithm.ask()
        if self.steady and not self.algorithm.is_initialized:
            self.population = population
            self.told, self.first_F = np.zeros(len(population), dtype=bool), np.zeros((len(population), 0))
        elif not self.steady:
            self.population = population
        return population.get("X")  # (n, dim)

    def tell(self, genomes: np.ndarray, objectives: np.ndarray) -> None:
        F = -objectives if self.weights is None else -(objectives @ self.weights)[:, None]  # to minimise
        if not self.steady:
            self.population.set("X", genomes)  # the clipped rows the caller evaluated
            Evaluator().eval(StaticProblem(self.problem, F=F), self.population)
            self.algorithm.tell(infills=self.population)
            self.population = None
            return
        if self.population is None:  # offspring: (mu + 1) survival, one told individual at a time
            for x, f in zip(genomes, F):
                offspring = Population.new(X=x[None, :])
                Evaluator().eval(StaticProblem(self.problem, F=f[None, :]), offspring)
                self.algorithm.tell(infills=offspring)
            return
        X = self.population.get("X")
        if self.first_F.shape[1] == 0:
            self.first_F = np.zeros((len(X), F.shape[1]))
        for x, f in zip(genomes, F):  # the first untold row nearest the told (clipped) one
            distance = np.where(self.told, np.inf, np.abs(X - x).max(axis=1))
            i = int(np.argmin(distance))
            X[i], self.first_F[i], self.told[i] = x, f, True
        if self.told.all():
            self.population.set("X", X)
            Evaluator().eval(StaticProblem(self.problem, F=self.first_F), self.population)
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


class GeneticOptimizer(ReplayOptimizer):
    """NSGA-II, NSGA-III and GA: generational, or steady state with ``steady_state: true``."""

    @classmethod
    def takes_out_of_order(cls, settings: dict[str, Any]) -> bool:
        return bool(settings.get("steady_state", False))

    def population(self) -> dict[str, Any]:
        settings = population_settings(self)
        return {**settings, "n_offsprings": 1} if self.settings.steady_state else settings


class NSGA2Optimizer(GeneticOptimizer):
    name = "nsga2"
    Settings = GeneticSettings
    population_setting = "pop_size"

    def _make_engine(self) -> PymooEngine:
        return PymooEngine.for_optimizer(self, NSGA2(**self.population()))


class NSGA3Optimizer(GeneticOptimizer):
    """NSGA-III with Das-Dennis reference directions (``get_reference_directions("das-dennis")``)."""

    name = "nsga3"
    Settings = NSGA3Settings
    population_setting = "pop_size"

    def _make_engine(self) -> PymooEngine:
        population = self.population()
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


class GAOptimizer(GeneticOptimizer):
    """pymoo's single-objective GA on the weighted mean of the objectives."""

    name = "ga"
    Settings = GeneticSettings
    population_setting = "pop_size"
    single_objective = True

    def _make_engine(self) -> PymooEngine:
        return PymooEngine.for_optimizer(self, GA(**self.population()))


class DEOptimizer(ReplayOptimizer):
    """pymoo's differential evolution on the weighted mean of the objectives."""

    name = "de"
    Settings = DESettings
    population_setting = "pop_size"
    single_objective = True

    def _make_engine(self) -> PymooEngine:
        s = self.settings
        return PymooEngine.for_optimizer(self, DE(variant=s.variant, CR=s.CR, **population_settings(self)))
