"""Merge methods as rows of data: one `MergeMethod` per method, every other table derives from it.

Follows mergekit 0.1.5 (`merge_methods/registry.py`: each method's parameter spec and defaults;
`generalized_task_arithmetic.py`: the task-arithmetic family as (sparsifier, consensus, normalize,
rescale) rows). A row says which kernel runs the method, which parameters it reads per model and
globally (with defaults and valid ranges), the sparsifier and sign consensus of the task-arithmetic
family, and whether the fused masked pass (`masked.merge_masked`, run by both the in-memory
materializer and `evomerge merge`) applies. Recipe validation, the kernels' argument checks and
defaults, `evomerge merge`'s per-tensor resolution, the materializer and the search-space presets
all read these rows; adding a method is one row here plus, where needed, one kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

__all__ = [
    "METHODS",
    "MergeMethod",
    "Parameter",
    "UnknownMethodError",
    "method_row",
]

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method: its kind, default (None: required) and valid range [low, high]."""

    kind: Literal["number", "bool"] = "number"
    default: float | bool | None = None
    low: float = -math.inf
    high: float = math.inf


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its kernel, parameters and, for task arithmetic, its stages."""

    name: str
    kernel: Literal["task_arithmetic", "linear", "slerp"]
    per_model: Mapping[str, Parameter]  # recipe `models[i].parameters` (or global): one value per expert
    settings: Mapping[str, Parameter]  # recipe `parameters`: one value for all experts
    sparsifier: Sparsifier | None = None  # task arithmetic: which entries of each delta survive
    consensus: Literal["sum", "count"] | None = None  # task arithmetic: TIES sign election; None = plain sum
    needs_base: bool = True
    fused: bool = False  # the fused masked pass runs it (materializer and `evomerge merge` alike)

    def parameter(self, name: str) -> Parameter | None:
        return self.per_model.get(name) or self.settings.get(name)

    def defaults(self) -> dict[str, float | bool]:
        """Defaults of the optional parameters, by recipe name (`lambda`, not `lambda_`)."""
        return {name: p.default for name, p in {**self.per_model, **self.settings}.items()
                if p.default is not None and name != "int8_mask"}


class UnknownMethodError(ValueError):
    """A merge method name that has no row; the message lists the valid names."""


FRACTION = dict(low=0.0, high=1.0)
WEIGHT = Parameter()  # required, any finite number (a negative weight subtracts a task vector)
DENSITY = Parameter(default=1.0, **FRACTION)
GAMMA = Parameter(default=0.01, **FRACTION)  # Breadcrumbs: fraction of the largest entries dropped
EPSILON = Parameter(default=0.15, **FRACTION)  # DELLA: spread of keep probabilities around density


def _task_arithmetic(name: str, sparsifier: Sparsifier | None, consensus: Literal["sum"] | None, *,
                     normalize: bool, rescale: bool) -> MergeMethod:
    per_model = {"weight": WEIGHT, "density": DENSITY}
    if sparsifier == "magnitude_outliers":
        per_model["gamma"] = GAMMA
    if sparsifier == "della_magprune":
        per_model["epsilon"] = EPSILON
    settings = {
        "normalize": Parameter("bool", normalize),
        "rescale": Parameter("bool", rescale),
        "lambda": Parameter(default=1.0),
        "int8_mask": Parameter("bool", False),  # accepted for mergekit recipes; masks are never stored
    }
    # DELLA's per-row rank probabilities have no fused form; the rest are thresholds or draws.
    return MergeMethod(name, "task_arithmetic", MappingProxyType(per_model), MappingProxyType(settings),
                       sparsifier, consensus, fused=sparsifier != "della_magprune")


_ROWS = [
    MergeMethod("linear", "linear", MappingProxyType({"weight": WEIGHT}),
                MappingProxyType({"normalize": Parameter("bool", True)}), needs_base=False),
    MergeMethod("slerp", "slerp", MappingProxyType({}), MappingProxyType({"t": Parameter(**FRACTION)})),
    _task_arithmetic("task_arithmetic", None, None, normalize=False, rescale=False),
    _task_arithmetic("ties", "magnitude", "sum", normalize=True, rescale=False),
    _task_arithmetic("dare_ties", "random", "sum", normalize=False, rescale=True),
    _task_arithmetic("dare_linear", "random", None, normalize=False, rescale=True),
    _task_arithmetic("breadcrumbs", "magnitude_outliers", None, normalize=False, rescale=False),
    _task_arithmetic("breadcrumbs_ties", "magnitude_outliers", "sum", normalize=False, rescale=False),
    _task_arithmetic("della", "della_magprune", "sum", normalize=True, rescale=True),
    _task_arithmetic("della_linear", "della_magprune", None, normalize=False, rescale=True),
]
METHODS: Mapping[str, MergeMethod] = MappingProxyType({row.name: row for row in _ROWS})


def method_row(name: str) -> MergeMethod:
    """The row of merge method `name`; `UnknownMethodError` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None
