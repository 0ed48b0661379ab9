"""Checkpoint by deterministic replay, for back-ends whose objects are not plain data.

A :class:`ReplayOptimizer` *has* an engine (pymoo's algorithm, nevergrad's optimizer) behind two
calls, ``engine.ask() -> (n, dim)`` and ``engine.tell(genomes, objectives)``; it does not extend
one. Its state is every ask and every told (NaN-filled) objective matrix. Restoring builds a fresh
engine from the seed and re-runs the asks and tells in order, raising if any replayed ask differs
from the recorded one (e.g. a different pymoo / nevergrad version). The engine is built, asked and
told only inside ``self._global_rng.active()``, so its use of the global RNGs is reproducible.

In steady state (``ask_one`` / ``tell_one``, for engines that take results in any order) asks and
tells interleave: every engine ask is recorded in ``steady_asks`` and, per tell, how many engine
asks came before it; ``replay_asks`` then holds each tell's told row. Replay interleaves them the same way.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ._base import Optimizer, OptimizerState, PrivateGlobalRNG

__all__ = ["Engine", "ReplayOptimizer", "ReplayState"]


class Engine(Protocol):
    """A back-end behind ask/tell. ``objectives`` are ``(n, M)``, to maximise, failures filled."""

    def ask(self) -> np.ndarray: ...

    def tell(self, genomes: np.ndarray, objectives: np.ndarray) -> None: ...


@dataclass
class ReplayState:
    replay_asks: list[np.ndarray] = field(default_factory=list)        # (n, dim) per tell
    replay_objectives: list[np.ndarray] = field(default_factory=list)  # (n, M) as told to the engine
    replay_failed: list[np.ndarray] = field(default_factory=list)      # (n,) bool
    steady_asks: list[np.ndarray] = field(default_factory=list)        # steady state: (n, dim) per engine ask
    asks_before_tell: list[int] = field(default_factory=list)          # steady state: engine asks before each tell


class ReplayOptimizer(Optimizer):
    """An optimizer over an :class:`Engine`; subclasses only say how to build the engine."""

    State = ReplayState

    def _setup(self) -> None:
        self._global_rng = PrivateGlobalRNG(self.seed)
        self.strategy_state = ReplayState()
        with self._global_rng.active():
            self.engine = self._make_engine()

    @abc.abstractmethod
    def _make_engine(self) -> Engine:
        """The back-end, built from ``self.settings`` and ``self.seed``."""

    def _ask(self) -> np.ndarray:
        with self._global_rng.active():
            rows = self.engine.ask()
        if self._steady:
            self.strategy_state.steady_asks.append(np.clip(np.asarray(rows, dtype=float), self.lower, self.upper))
        return rows

    def _tell(self, genomes, objectives, responses, failed) -> None:
        with self._global_rng.active():
            self.engine.tell(genomes, objectives)
        history = self.strategy_state
        if self._steady:
            history.asks_before_tell.append(len(history.steady_asks))
        history.replay_asks.append(genomes.copy())
        history.replay_objectives.append(objectives.copy())
        history.replay_failed.append(failed.copy())

    def _restore_strategy(self, strategy: Any, state: OptimizerState) -> None:
        if self.strategy_state.replay_asks:
            raise RuntimeError(f"{self.name}: replay needs a fresh optimizer")
        super()._restore_strategy(strategy, state)  # checks the type
        recorded, self.strategy_state = self.strategy_state, ReplayState()  # the replayed tells refill it
        if state.steady:
            self._replay_steady(recorded)
            return
        for k, (X, F, failed) in enumerate(zip(recorded.replay_asks, recorded.replay_objectives,
                                               recorded.replay_failed)):
            self._replay_ask(k, X)
            self._tell(X, F, None, failed)
        if state.pending is not None:
            self._replay_ask(len(recorded.replay_asks), np.asarray(state.pending, dtype=float))

    def _replay_steady(self, recorded: ReplayState) -> None:
        asked = 0
        for X, F, failed, before in zip(recorded.replay_asks, recorded.replay_objectives, recorded.replay_failed,
                                        recorded.asks_before_tell):
            for k in range(asked, before):
                self._replay_ask(k, recorded.steady_asks[k])
            asked = before
            self._tell(X, F, None, failed)
        for k in range(asked, len(recorded.steady_asks)):
            self._replay_ask(k, recorded.steady_asks[k])

    def _replay_ask(self, k: int, expected: np.ndarray) -> None:
        got = np.clip(np.asarray(self._ask(), dtype=float), self.lower, self.upper)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise RuntimeError(
                f"{self.name}: checkpoint replay diverged at ask #{k} (shape {got.shape} vs recorded "
                f"{expected.shape}); the checkpoint was written with different settings or a different "
                "version of the back-end library, so the run cannot be resumed exactly."
            )
