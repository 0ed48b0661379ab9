"""`TaskError`, in a module of its own so that `tasks` and `lm_eval_tasks` both raise it without importing
each other (`evomerge.fitness.tasks` re-exports it: `from evomerge.fitness.tasks import TaskError` still works)."""
from __future__ import annotations

__all__ = ["TaskError"]


class TaskError(ValueError):
    """A task preset, dataset or tokenizer that cannot be used; the message names the culprit."""
