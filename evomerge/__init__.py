"""evomerge: cheap, multi-objective, resumable search for the best way to merge fine-tuned models.

Heavy submodules load on first use, so `import evomerge` stays fast:
    evomerge.Run.load("runs/<name>")      inspect a search (Pareto set, log, plots, export)
    evomerge.Search.create("run.yaml")    a search to drive: .step() one generation, .run() to the budget
    evomerge.start_search("run.yaml")     the Python side of `evomerge search`
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Run": ("evomerge.runs.run", "Run"),
    "Search": ("evomerge.runs.search", "Search"),
    "start_search": ("evomerge.runs.search", "start_search"),
    "resume_search": ("evomerge.runs.search", "resume_search"),
    "merge_recipe": ("evomerge.merge.engine", "merge_recipe"),
    "Materializer": ("evomerge.merge.materializer", "Materializer"),
    "SearchSpace": ("evomerge.search.space", "SearchSpace"),
    "CompressedFitness": ("evomerge.fitness.compressed", "CompressedFitness"),
    "calibrate_from_config": ("evomerge.fitness.calibrate", "calibrate_from_config"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
