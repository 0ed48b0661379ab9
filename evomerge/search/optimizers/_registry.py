"""The registry of optimizers by name.

Entries are ``"module:Class"`` paths imported on first use, so importing the protocol does not
import pymoo, nevergrad or scipy. The registry imports no optimizer module itself: the strategies
import the protocol (:mod:`._base`), the protocol imports this table, and nothing points back.

Wrappers (``prescreen``: surrogate pre-screening around another optimizer) resolve by name, so
``make_optimizer("prescreen", ..., inner="nsga2", factor=4)`` and ``Optimizer.from_state`` work,
but they are not listed among the optimizers: a wrapper is not a search strategy by itself.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._base import Optimizer, OptimizerState

__all__ = ["OPTIMIZERS", "make_optimizer", "register_optimizer", "restore_optimizer"]

_HERE = "evomerge.search.optimizers"
_BUILTIN: dict[str, str] = {
    "random": f"{_HERE}._random:RandomSearch",
    "nsga2": f"{_HERE}._pymoo:NSGA2Optimizer",
    "nsga3": f"{_HERE}._pymoo:NSGA3Optimizer",
    "ga": f"{_HERE}._pymoo:GAOptimizer",
    "de": f"{_HERE}._pymoo:DEOptimizer",
    "cma": f"{_HERE}._nevergrad:CMAOptimizer",
    "twopointsde": f"{_HERE}._nevergrad:TwoPointsDEOptimizer",
    "ngopt": f"{_HERE}._nevergrad:NGOptOptimizer",
    "m2n2": f"{_HERE}._m2n2:M2N2Optimizer",
    "map": f"{_HERE}._map:MAPOptimizer",
    "stitch": f"{_HERE}._stitch:StitchOptimizer",
}
_WRAPPERS: dict[str, str] = {
    "prescreen": f"{_HERE}._prescreen:Prescreened",
}


class _Registry(Mapping):
    """name -> Optimizer subclass; unknown names raise a ValueError listing the valid ones."""

    def __init__(self, entries: dict[str, str], wrappers: dict[str, str]):
        self._paths = dict(entries)
        self._wrappers = dict(wrappers)  # resolvable by name, not listed
        self._loaded: dict[str, type[Optimizer]] = {}

    def __getitem__(self, name: str) -> type[Optimizer]:
        if name not in self._paths and name not in self._loaded and name not in self._wrappers:
            raise ValueError(f"unknown optimizer {name!r}; valid names are {sorted(self)}")
        if name not in self._loaded:
            module, attr = {**self._wrappers, **self._paths}[name].split(":")
            cls = getattr(importlib.import_module(module), attr)
            if cls.name != name:
                raise RuntimeError(f"registry entry {name!r} points at {cls.__name__} named {cls.name!r}")
            self._loaded[name] = cls
        return self._loaded[name]

    def _listed(self) -> set[str]:
        return (set(self._paths) | set(self._loaded)) - set(self._wrappers)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._listed()))

    def __len__(self) -> int:
        return len(self._listed())

    def __contains__(self, name: object) -> bool:
        return name in self._listed()

    def register(self, cls: type[Optimizer]) -> type[Optimizer]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        if cls.name in self._wrappers:
            raise ValueError(f"{cls.name!r} is the name of a built-in wrapper")
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"an optimizer named {cls.name!r} is already registered")
        self._loaded[cls.name] = cls
        return cls


OPTIMIZERS = _Registry(_BUILTIN, _WRAPPERS)


def register_optimizer(cls: type[Optimizer]) -> type[Optimizer]:
    """Class decorator adding a user-defined optimizer to :data:`OPTIMIZERS`."""
    return OPTIMIZERS.register(cls)


def make_optimizer(
    name: str, dim: int, bounds: Any, n_objectives: int, seed: int = 0, **settings: Any
) -> Optimizer:
    """Build the optimizer registered as ``name`` (see :data:`OPTIMIZERS`)."""
    return OPTIMIZERS[name](dim, bounds, n_objectives, seed, **settings)


def restore_optimizer(state: OptimizerState) -> Optimizer:
    """Rebuild an optimizer from a state written by ``Optimizer.state()``."""
    return OPTIMIZERS[state.name].from_state(state)
