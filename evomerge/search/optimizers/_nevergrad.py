"""nevergrad back-ends (CMA, TwoPointsDE, NGOpt) through ``optimizer.ask()`` / ``optimizer.tell``.

The parametrization is ``ng.p.Array(shape=(dim,), lower=..., upper=...)`` seeded through
``parametrization.random_state``; one ask() returns ``batch_size`` candidates (nevergrad's
``num_workers``). nevergrad minimises a single loss, so the loss is minus the scalarisation
(weighted mean of the objectives). Checkpointing is by replay (nevergrad optimizers are not plain
data).

Limitations: nevergrad's MetaModel (which NGOpt may pick) stops its inner surrogate search after
20 s of wall time; a replay is exact only while that limit is not reached. Under numpy >= 2.4 the
MetaModel's ``float(model.predict(...))`` raises TypeError (nevergrad issue #1612);
:func:`_metamodel_numpy24_shim` turns that into nevergrad's own ``MetaModelFailure`` so the
MetaModel falls back to its base optimizer, as nevergrad does for any failed surrogate step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import nevergrad as ng
import numpy as np
from nevergrad.optimization import optimizerlib
from nevergrad.optimization.metamodel import MetaModelFailure

from .base import BaseSettings, ReplayOptimizer

__all__ = ["CMAOptimizer", "NGOptOptimizer", "NGOptSettings", "NevergradSettings", "TwoPointsDEOptimizer"]


@dataclass(frozen=True)
class NevergradSettings(BaseSettings):
    batch_size: int = 10
    budget: int | None = None  # total evaluations; NGOpt uses it to pick its sub-optimizer


@contextlib.contextmanager
def _metamodel_numpy24_shim() -> Iterator[None]:
    original = optimizerlib.learn_on_k_best

    def guarded(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except TypeError as err:
            if "scalar" not in str(err):
                raise
            message = str(err)
        # Raised outside the except block so no traceback (and no frame of nevergrad's Powell
        # helper thread) stays referenced: that thread is stopped when it is garbage-collected.
        raise MetaModelFailure(f"metamodel incompatible with this numpy: {message}")

    optimizerlib.learn_on_k_best = guarded
    try:
        yield
    finally:
        optimizerlib.learn_on_k_best = original


class _NevergradOptimizer(ReplayOptimizer):
    Settings = NevergradSettings
    single_objective = True
    ng_name = ""

    def _setup_engine(self) -> None:
        s = self.settings
        if s.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {s.batch_size}")
        param = ng.p.Array(shape=(self.dim,), lower=self.lower, upper=self.upper)
        param.random_state = np.random.RandomState(self.seed)
        with self._global_rng.active():
            self._engine = ng.optimizers.registry[self.ng_name](
                parametrization=param, budget=s.budget, num_workers=s.batch_size
            )
            # the first asks return the initial genomes; nevergrad hands suggestions out last-in
            # first-out, so suggesting them in reverse keeps their order
            for genome in self.initial_rows()[::-1]:
                self._engine.suggest(genome)
        self._candidates: list = []

    def _engine_ask(self) -> np.ndarray:
        with self._global_rng.active(), _metamodel_numpy24_shim():
            self._candidates = [self._engine.ask() for _ in range(self.settings.batch_size)]
        return np.stack([np.asarray(c.value, dtype=float) for c in self._candidates])  # (n, dim)

    def _engine_tell(self, genomes, objectives, failed) -> None:
        losses = -self.scalarize(objectives)  # (n,) to minimise
        with self._global_rng.active():
            for candidate, loss in zip(self._candidates, losses):
                self._engine.tell(candidate, float(loss))
        self._candidates = []


class CMAOptimizer(_NevergradOptimizer):
    name = "cma"
    ng_name = "CMA"


class TwoPointsDEOptimizer(_NevergradOptimizer):
    name = "twopointsde"
    ng_name = "TwoPointsDE"


@dataclass(frozen=True)
class NGOptSettings(NevergradSettings):
    # NGOpt chooses its sub-optimizer from (dim, budget, num_workers) and needs a budget; 200
    # evaluations is a typical merge-search budget. Pass the run's real budget.
    budget: int | None = 200


class NGOptOptimizer(_NevergradOptimizer):
    name = "ngopt"
    ng_name = "NGOpt"
    Settings = NGOptSettings
