"""Ask/tell optimizers over genomes: one protocol, a registry, exact checkpoints.

    opt = make_optimizer("nsga2", dim=6, bounds=(0.0, 1.0), n_objectives=2, seed=0)
    genomes = opt.ask()                               # (n, 6)
    opt.tell(genomes, objectives, responses=None)     # (n, 2) to maximise; NaN = failed
    save_state(opt.state(), "opt.json"); opt = Optimizer.from_state(load_state("opt.json"))

Registered names: random, nsga2, nsga3, ga, de, cma, twopointsde, ngopt, m2n2, map. Any of them can
be wrapped in surrogate pre-screening (``evomerge.search.prescreen.make_prescreened``, or the
``prescreen`` wrapper by name: ``make_optimizer("prescreen", ..., inner="nsga2", factor=4)``).
"""
from ._checkpoint import load_state, save_state, state_from_dict, state_to_dict
from ._registry import OPTIMIZERS, make_optimizer, register_optimizer, restore_optimizer
from .base import BaseSettings, Optimizer, OptimizerState, ReplayOptimizer, parse_bounds

__all__ = [
    "OPTIMIZERS",
    "BaseSettings",
    "Optimizer",
    "OptimizerState",
    "ReplayOptimizer",
    "load_state",
    "make_optimizer",
    "parse_bounds",
    "register_optimizer",
    "restore_optimizer",
    "save_state",
    "state_from_dict",
    "state_to_dict",
]
