"""The merge layer's user-facing errors, in a module that imports nothing heavy.

The CLI catches these to print one line instead of a traceback; defining them here (rather than
beside torch-importing code) lets `evomerge --help` start without importing torch. The modules that
raise them re-export them, so `from evomerge.merge.checkpoint import CheckpointError` still works.
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["CheckpointError", "LayerMappingError", "OptionError", "ParameterError", "RecipeError", "USER_ERRORS"]


class CheckpointError(ValueError):
    """A model folder is missing, malformed, unsafe to load, or incompatible with another."""


class RecipeError(ValueError):
    """A merge recipe that cannot be used; the message names the file and field."""


class LayerMappingError(ValueError):
    """A tensor name or architecture the layer mapping cannot place."""


class ParameterError(ValueError):
    """A parameter setting that cannot be resolved; the message names the field."""


class OptionError(ValueError):
    """An argument that cannot be used (a device, a shard size, an output folder); `option` names it
    as the API spells it (`out_dir`), and `renamed` as the CLI does (`--out`)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message

    def renamed(self, names: Mapping[str, str]) -> "OptionError":
        """The same error naming `names[option]` (a CLI flag) instead of the API argument."""
        return type(self)(names.get(self.option, self.option), self.message)

    def __reduce__(self):  # picklable (worker processes) despite the two-argument constructor
        return type(self), (self.option, self.message)


# What the CLI reports as one line (exit status 2) rather than a traceback.
USER_ERRORS = (CheckpointError, RecipeError, LayerMappingError, ParameterError, OptionError, FileExistsError,
               FileNotFoundError)
