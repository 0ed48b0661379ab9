"""pymoo back-ends (NSGA-II, NSGA-III, GA, DE) through pymoo's ask-and-tell interface.

Follows pymoo 0.6's documented pattern: ``algorithm.setup(problem, seed=..., termination=...)``,
``pop = algorithm.ask()``, ``Evaluator().eval(StaticProblem(problem, F=F), pop)``,
``algorithm.tell(infills=pop)``. pymoo minimises, so objectives are negated. GA and DE are
single-objective: they minimise the negated scalarisation (weighted mean of the objectives).

Checkpointing is by replay (:class:`ReplayOptimizer`): pymoo's Algorithm/Population objects are
not plain data, so the state is the seed plus the ask/tell history.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

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

from .base import BaseSettings, ReplayOptimizer

__all__ = [
    "DEOptimizer",
    "DESettings",
    "GAOptimizer",
    "NSGA2Optimizer",
    "NSGA3Optimizer",
    "NSGA3Settings",
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


class _PymooOptimizer(ReplayOptimizer):
    Settings = PymooSettings
    single_objective = False

    def _make_algorithm(self):
        raise NotImplementedError

    def _initial_population(self) -> dict:
        """pymoo's `sampling` for the first generation: the initial genomes, then uniform samples
        (from their own seeded stream) up to pop_size; {} (pymoo's own sampling) when there are none."""
        seeds = self.initial_rows()
        if not len(seeds):
            return {}
        fill = max(0, self.settings.pop_size - len(seeds))
        unit = np.random.default_rng([self.seed, 2]).random((fill, self.dim))
        return {"sampling": np.vstack([seeds, self.lower + unit * (self.upper - self.lower)])}

    def _setup_engine(self) -> None:
        if self.settings.pop_size < 2:
            raise ValueError(f"{self.name}: pop_size must be >= 2, got {self.settings.pop_size}")
        n_obj = 1 if self.single_objective else self.n_objectives
        self._problem = Problem(n_var=self.dim, n_obj=n_obj, xl=self.lower, xu=self.upper)
        self._algorithm = self._make_algorithm()
        with self._global_rng.active():
            self._algorithm.setup(self._problem, termination=NoTermination(), seed=self.seed, verbose=False)
        self._population = None

    def _engine_ask(self) -> np.ndarray:
        with self._global_rng.active():
            self._population = self._algorithm.ask()
        return self._population.get("X")

    def _engine_tell(self, genomes, objectives, failed) -> None:
        if self.single_objective:
            F = -self.scalarize(objectives)[:, None]  # (n, 1) to minimise
        else:
            F = -objectives  # (n, M) to minimise
        pop = self._population
        pop.set("X", genomes)  # the clipped rows the caller evaluated
        with self._global_rng.active():
            Evaluator().eval(StaticProblem(self._problem, F=F), pop)
            self._algorithm.tell(infills=pop)
        self._population = None


class NSGA2Optimizer(_PymooOptimizer):
    name = "nsga2"

    def _make_algorithm(self):
        return NSGA2(pop_size=self.settings.pop_size, **self._initial_population())


class NSGA3Optimizer(_PymooOptimizer):
    """NSGA-III with Das-Dennis reference directions (``get_reference_directions("das-dennis")``)."""

    name = "nsga3"
    Settings = NSGA3Settings

    def _make_algorithm(self):
        M, pop = self.n_objectives, self.settings.pop_size
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
        return NSGA3(ref_dirs=ref_dirs, pop_size=pop, **self._initial_population())


class GAOptimizer(_PymooOptimizer):
    """pymoo's single-objective GA on the weighted mean of the objectives."""

    name = "ga"
    single_objective = True

    def _make_algorithm(self):
        return GA(pop_size=self.settings.pop_size, **self._initial_population())


class DEOptimizer(_PymooOptimizer):
    """pymoo's differential evolution on the weighted mean of the objectives."""

    name = "de"
    Settings = DESettings
    single_objective = True

    def _make_algorithm(self):
        s = self.settings
        return DE(pop_size=s.pop_size, variant=s.variant, CR=s.CR, **self._initial_population())
