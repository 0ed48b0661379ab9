"""Ask/tell optimizers over genomes: one protocol, a registry, exact checkpoints.

    opt = make_optimizer("nsga2", dim=6, bounds=(0.0, 1.0), n_objectives=2, seed=0)
    genomes = opt.ask()                               # (n, 6)
    opt.tell(genomes, objectives, responses=None)     # (n, 2) to maximise; NaN = failed
    save_state(opt.state(), "opt.json"); opt = Optimizer.from_state(load_state("opt.json"))

    genome = opt.ask_one(); opt.tell_one(genome, objectives_row)   # steady state, results in any order,
                                                      # for opt.takes_out_of_order(settings) (see _base)

Registered names: random, nsga2, nsga3, ga, de, cma, twopointsde, ngopt, m2n2, map, stitch. Any of them can
be wrapped in surrogate pre-screening (:func:`make_prescreened`, or the ``prescreen`` wrapper by
name: ``make_optimizer("prescreen", ..., inner="nsga2", factor=4)``).

Modules, in import order (each imports only those above it):

    _registry     name -> "module:Class", loaded on first use
    _base         the protocol (Optimizer, OptimizerState, settings, bounds)
    _checkpoint   one generic dataclass <-> JSON encoding for every optimizer's state
    _replay       ReplayOptimizer: back-ends checkpointed by replaying their history
    _random, _pymoo, _nevergrad, _m2n2, _map    the strategies (MAP's quadratic surrogates too)
    _prescreen    surrogate pre-screening around any of them
    _stitch       localize and stitch: depth windows of each expert, merged, then another optimizer

The protocol and the checkpoint functions are imported with this package; the strategies (and
pymoo, nevergrad, scipy with them) on first use of one of their names.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._base import BaseSettings, Optimizer, OptimizerState, PrivateGlobalRNG, parse_bounds
from ._checkpoint import decode_plain, encode_plain, from_plain, load_state, save_state, state_from_dict, state_to_dict
from ._registry import OPTIMIZERS, make_optimizer, register_optimizer, restore_optimizer

_LAZY: dict[str, tuple[str, ...]] = {
    "._replay": ("Engine", "ReplayOptimizer", "ReplayState"),
    "._random": ("RandomSearch", "RandomSearchState", "RandomSettings"),
    "._pymoo": ("DEOptimizer", "DESettings", "GAOptimizer", "GeneticOptimizer", "GeneticSettings", "NSGA2Optimizer",
                "NSGA3Optimizer", "NSGA3Settings", "PymooEngine", "PymooSettings"),
    "._nevergrad": ("CMAOptimizer", "NGOptOptimizer", "NGOptSettings", "NevergradEngine", "NevergradSettings",
                    "TwoPointsDEOptimizer"),
    "._m2n2": ("M2N2Optimizer", "M2N2Settings", "M2N2State", "allowed_splits", "attraction", "crossover",
               "parent_a_probabilities", "parent_b_probabilities", "replacement_index", "shared_fitness",
               "shared_fitness_matrix"),
    "._map": ("MAPOptimizer", "MAPSettings", "MAPState", "QUADRATIC_TERMS", "QuadraticSurrogate", "TieredQuadratic",
              "cross_validated_r2", "n_quadratic_terms", "quadratic_features", "quadratic_term_names", "r2_score"),
    "._prescreen": ("PRESCREEN_DEFAULTS", "PrescreenSettings", "PrescreenState", "Prescreened", "ScreenPlan",
                    "fit_screen", "make_prescreened", "select_proposals"),
    "._stitch": ("StitchOptimizer", "StitchSettings", "StitchState", "kept_parts", "stitch_genome"),
}
_LAZY_SOURCE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted([
    "OPTIMIZERS",
    "BaseSettings",
    "Optimizer",
    "OptimizerState",
    "PrivateGlobalRNG",
    "decode_plain",
    "encode_plain",
    "from_plain",
    "load_state",
    "make_optimizer",
    "parse_bounds",
    "register_optimizer",
    "restore_optimizer",
    "save_state",
    "state_from_dict",
    "state_to_dict",
    *_LAZY_SOURCE,
])


def __getattr__(name: str) -> Any:
    module = _LAZY_SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SOURCE))
