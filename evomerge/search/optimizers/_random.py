"""Random search: uniform samples in the box, or a scrambled Sobol sequence (scipy.stats.qmc)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import qmc

from ._base import BaseSettings, Optimizer, OptimizerState

__all__ = ["RandomSearch", "RandomSearchState", "RandomSettings"]


@dataclass(frozen=True)
class RandomSettings(BaseSettings):
    batch_size: int = 10
    sampler: str = "uniform"  # "uniform" or "sobol"


@dataclass
class RandomSearchState:
    n_generated: int = 0  # rows asked so far, initial genomes included


class RandomSearch(Optimizer):
    """Ignores the objectives; the baseline every other optimizer must beat."""

    name = "random"
    Settings = RandomSettings
    State = RandomSearchState
    out_of_order = True  # ignores the results: any order

    def _setup(self) -> None:
        s = self.settings
        if s.batch_size < 1:
            raise ValueError(f"random: batch_size must be >= 1, got {s.batch_size}")
        if s.sampler not in ("uniform", "sobol"):
            raise ValueError(f"random: sampler must be 'uniform' or 'sobol', got {s.sampler!r}")
        self._initial = self.initial_rows()
        self.strategy_state = RandomSearchState()
        self._sobol = self._new_sobol() if s.sampler == "sobol" else None

    def _new_sobol(self) -> qmc.Sobol:
        # Its own seed stream, so the scramble depends only on the run seed.
        return qmc.Sobol(self.dim, scramble=True, rng=np.random.default_rng([self.seed, 1]))

    def _ask(self) -> np.ndarray:
        n, done = self.settings.batch_size, self.strategy_state.n_generated
        seeds = self._initial[done : done + n]  # the initial genomes come first
        n_random = n - len(seeds)
        if self._sobol is None:
            unit = self._rng.random((n_random, self.dim))  # (n_random, dim) in [0, 1)
        else:
            with warnings.catch_warnings():
                # Sobol balance warnings for batch sizes that are not powers of two: the sequence as
                # a whole is still low-discrepancy, which is what a search over many batches uses.
                warnings.simplefilter("ignore", UserWarning)
                unit = self._sobol.random(n_random)
        self.strategy_state.n_generated += n
        return np.vstack([seeds, self.lower + unit * (self.upper - self.lower)])

    def _tell(self, genomes, objectives, responses, failed) -> None:
        pass

    def _restore_strategy(self, strategy: Any, state: OptimizerState) -> None:
        super()._restore_strategy(strategy, state)
        if self._sobol is not None:  # the Sobol points drawn so far, i.e. those not from initial_genomes
            done = self.strategy_state.n_generated
            self._sobol.fast_forward(done - min(done, len(self._initial)))
