"""Random search: uniform samples in the box, or a scrambled Sobol sequence (scipy.stats.qmc)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import qmc

from .base import BaseSettings, Optimizer, OptimizerState

__all__ = ["RandomSearch", "RandomSettings"]


@dataclass(frozen=True)
class RandomSettings(BaseSettings):
    batch_size: int = 10
    sampler: str = "uniform"  # "uniform" or "sobol"


class RandomSearch(Optimizer):
    """Ignores the objectives; the baseline every other optimizer must beat."""

    name = "random"
    Settings = RandomSettings

    def _setup(self) -> None:
        s = self.settings
        if s.batch_size < 1:
            raise ValueError(f"random: batch_size must be >= 1, got {s.batch_size}")
        if s.sampler not in ("uniform", "sobol"):
            raise ValueError(f"random: sampler must be 'uniform' or 'sobol', got {s.sampler!r}")
        self._initial = self.initial_rows()
        self._n_generated = 0
        self._sobol = self._new_sobol() if s.sampler == "sobol" else None

    def _new_sobol(self) -> qmc.Sobol:
        # Its own seed stream, so the scramble depends only on the run seed.
        return qmc.Sobol(self.dim, scramble=True, rng=np.random.default_rng([self.seed, 1]))

    def _ask(self) -> np.ndarray:
        n = self.settings.batch_size
        seeds = self._initial[self._n_generated : self._n_generated + n]  # the initial genomes come first
        n_random = n - len(seeds)
        if self._sobol is None:
            unit = self._rng.random((n_random, self.dim))  # (n_random, dim) in [0, 1)
        else:
            with warnings.catch_warnings():
                # Sobol balance warnings for batch sizes that are not powers of two: the sequence as
                # a whole is still low-discrepancy, which is what a search over many batches uses.
                warnings.simplefilter("ignore", UserWarning)
                unit = self._sobol.random(n_random)
        self._n_generated += n
        return np.vstack([seeds, self.lower + unit * (self.upper - self.lower)])

    def _tell(self, genomes, objectives, responses, failed) -> None:
        pass

    def _strategy_state(self) -> dict[str, Any]:
        return {"n_generated": self._n_generated}

    def _load_strategy_state(self, strategy: dict[str, Any], state: OptimizerState) -> None:
        self._n_generated = int(strategy.pop("n_generated"))
        super()._load_strategy_state(strategy, state)
        if self._sobol is not None:
            self._sobol = self._new_sobol()
            self._sobol.fast_forward(self._n_generated - min(self._n_generated, len(self._initial)))
