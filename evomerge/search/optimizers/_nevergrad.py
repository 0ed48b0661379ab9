"""nevergrad back-ends (CMA, TwoPointsDE, NGOpt) through ``optimizer.ask()`` / ``optimizer.tell``.

The parametrization is ``ng.p.Array(shape=(dim,), lower=..., upper=...)`` seeded through
``parametrization.random_state``; one ask() returns ``batch_size`` candidates (nevergrad's
``num_workers``). nevergrad minimises a single loss, so the loss is minus the scalarisation
(weighted mean of the objectives). :class:`NevergradEngine` holds the nevergrad optimizer; each
registered optimizer is a :class:`ReplayOptimizer` that names it. Checkpointing is by replay
(nevergrad optimizers are not plain data). nevergrad's ask/tell is asynchronous by design (a
candidate may be told in any order while others are out), so these take results out of order
(``ask_one`` / ``tell_one``): each told genome is matched to its outstanding candidate.

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

from ._base import BaseSettings, Optimizer
from ._replay import ReplayOptimizer

__all__ = [
    "CMAOptimizer",
    "NGOptOptimizer",
    "NGOptSettings",
    "NevergradEngine",
    "NevergradSettings",
    "TwoPointsDEOptimizer",
]


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


class NevergradEngine:
    """One nevergrad optimizer (``ng.optimizers.registry[ng_name]``) behind ask/tell, minimising
    minus the weighted mean of the objectives."""

    def __init__(self, ng_name: str, lower: np.ndarray, upper: np.ndarray, seed: int, weights: np.ndarray,
                 batch_size: int, budget: int | None, initial_genomes: np.ndarray):
        param = ng.p.Array(shape=(len(lower),), lower=lower, upper=upper)
        param.random_state = np.random.RandomState(seed)
        self.optimizer = ng.optimizers.registry[ng_name](parametrization=param, budget=budget, num_workers=batch_size)
        # the first asks return the initial genomes; nevergrad hands suggestions out last-in
        # first-out, so suggesting them in reverse keeps their order
        for genome in initial_genomes[::-1]:
            self.optimizer.suggest(genome)
        self.weights, self.batch_size = weights, batch_size
        self.candidates: list = []  # asked and not yet told, in ask order

    @classmethod
    def for_optimizer(cls, opt: Optimizer, ng_name: str) -> "NevergradEngine":
        s = opt.settings
        if s.batch_size < 1:
            raise ValueError(f"{opt.name}: batch_size must be >= 1, got {s.batch_size}")
        return cls(ng_name, opt.lower, opt.upper, opt.seed, opt.weights, s.batch_size, s.budget, opt.initial_rows())

    def ask(self) -> np.ndarray:
        with _metamodel_numpy24_shim():
            new = [self.optimizer.ask() for _ in range(self.batch_size)]
        self.candidates.extend(new)
        return np.stack([np.asarray(c.value, dtype=float) for c in new])  # (n, dim)

    def tell(self, genomes: np.ndarray, objectives: np.ndarray) -> None:
        losses = -(objectives @ self.weights)  # (n,) to minimise
        for genome, loss in zip(genomes, losses):
            # the first outstanding candidate nearest the told (clipped) row: in a whole-batch tell,
            # the rows come in the asked order, so this is the candidate asked in that position
            values = np.stack([np.asarray(c.value, dtype=float) for c in self.candidates])  # (k, dim)
            candidate = self.candidates.pop(int(np.argmin(np.abs(values - genome).max(axis=1))))
            self.optimizer.tell(candidate, float(loss))


class CMAOptimizer(ReplayOptimizer):
    name = "cma"
    Settings = NevergradSettings
    single_objective = True
    out_of_order = True

    def _make_engine(self) -> NevergradEngine:
        return NevergradEngine.for_optimizer(self, "CMA")


class TwoPointsDEOptimizer(ReplayOptimizer):
    name = "twopointsde"
    Settings = NevergradSettings
    single_objective = True
    out_of_order = True

    def _make_engine(self) -> NevergradEngine:
        return NevergradEngine.for_optimizer(self, "TwoPointsDE")


@dataclass(frozen=True)
class NGOptSettings(NevergradSettings):
    # NGOpt chooses its sub-optimizer from (dim, budget, num_workers) and needs a budget; 200
    # evaluations is a typical merge-search budget. Pass the run's real budget.
    budget: int | None = 200


class NGOptOptimizer(ReplayOptimizer):
    name = "ngopt"
    Settings = NGOptSettings
    single_objective = True
    out_of_order = True

    def _make_engine(self) -> NevergradEngine:
        return NevergradEngine.for_optimizer(self, "NGOpt")
