"""The merge layer's user-facing errors, in a module that imports nothing heavy.

The CLI catches these to print one line instead of a traceback; defining them here (rather than
beside torch-importing code) lets `evomerge --help` start without importing torch. The modules that
raise them re-export them, so `from evomerge.merge.checkpoint import CheckpointError` still works.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "LayerMappingError", "ParameterError", "RecipeError", "USER_ERRORS"]


class CheckpointError(ValueError):
    """A model folder is missing, malformed, unsafe to load, or incompatible with another."""


class RecipeError(ValueError):
    """A merge recipe that cannot be used; the message names the file and field."""


class LayerMappingError(ValueError):
    """A tensor name or architecture the layer mapping cannot place."""


class ParameterError(ValueError):
    """A parameter setting that cannot be resolved; the message names the field."""


# What the CLI reports as one line (exit status 2) rather than a traceback.
USER_ERRORS = (CheckpointError, RecipeError, LayerMappingError, ParameterError, FileExistsError, FileNotFoundError)
