"""Score any model folder on a compressed fitness's tasks (`evomerge score MODEL_DIR --fitness NAME`).

Three splits, each through the code a search, `evomerge verify` and `evomerge export` already use:

* `fitness`: every item of each task's fitness split (`CompressedFitness.full_scorers`, as
  `Run.choose` scores finalists);
* `test`: every item of the sealed test split, read through `TaskSpec.load_split`, so the read is
  recorded and refused inside `sealed.sealed_test()` (benchmarks/PROTOCOL.md);
* `subset`: the compressed fitness's subset items in its order (`CompressedFitness.subset_scorers`,
  as `MergeProblem.evaluate` scores a candidate), with the estimate of full-split accuracy a
  search records. These answers equal an evaluation record's `responses` for the same weights: an
  exported merge scored this way reproduces what the search logged.

The model is loaded as the materializer loads the base (`from_pretrained` in the folder's stored
dtype, remote code off) and scored with its own tokenizer (an export carries the base's).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.errors import CheckpointError, OptionError

if TYPE_CHECKING:
    from evomerge.fitness.compressed import CompressedFitness

__all__ = ["SPLITS", "ModelScore", "TaskScore", "score_model"]

SPLITS = ("fitness", "test", "subset")


@dataclass(frozen=True)
class TaskScore:
    accuracy: float  # mean of `answers`
    answers: list[int]  # 0/1 per item: the split's rows in order, or the subset's items in subset order
    item_ids: list[str] | None = None  # subset only: the items `answers` are for
    estimate: float | None = None  # subset only: the fitness's estimate of full-split accuracy (a search's objective)
    stderr: float | None = None  # subset only: the estimate's standard error

    @property
    def n_items(self) -> int:
        return len(self.answers)


@dataclass(frozen=True)
class ModelScore:
    model_dir: Path
    fitness: str  # the compressed fitness's name
    fitness_path: Path
    split: str
    tasks: dict[str, TaskScore]
    seconds: float

    @property
    def accuracy(self) -> dict[str, float]:
        return {task: score.accuracy for task, score in self.tasks.items()}

    @property
    def mean(self) -> float:
        """Mean accuracy over tasks (each task counts once, whatever its size)."""
        return float(np.mean([score.accuracy for score in self.tasks.values()]))

    @property
    def responses(self) -> dict[str, list[int]]:
        """task -> answers: for `subset`, what an evaluation record stores under `responses`."""
        return {task: list(score.answers) for task, score in self.tasks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "fitness": self.fitness, "fitness_path": str(self.fitness_path),
                "split": self.split, "mean": self.mean, "seconds": self.seconds,
                "tasks": {task: {"accuracy": s.accuracy, "n_items": s.n_items, "estimate": s.estimate,
                                 "stderr": s.stderr, "item_ids": s.item_ids, "answers": s.answers}
                          for task, s in self.tasks.items()}}


def score_model(model_dir: str | os.PathLike, fitness: "str | os.PathLike | CompressedFitness", *,
                split: str = "fitness", estimator: str | None = None, device: str | None = None,
                allow_pickle: bool = False) -> ModelScore:
    """Score the model in `model_dir` on every task of the compressed fitness `fitness` (a name
    under ./fitness/ or the packaged presets, or a path, as a run config names it; or one already
    loaded, to score many models without reloading it) on `split` (`SPLITS`; see the module
    docstring). `estimator`: for `subset`, the estimator of the estimate (default: the fitness's
    own, which is also a run's default).

    Everything is checked before the model is loaded: the split, the folder (`CheckpointError`
    when it is not a model folder), the fitness (`FileNotFoundError` when no fitness has that name,
    `FitnessError` when its data changed since calibration)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge._device import default_device, resolve_device
    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.merge.checkpoint import ModelFolder

    if split not in SPLITS:
        raise OptionError("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    device = resolve_device(device, field="device") if device is not None else default_device()
    model_dir = Path(model_dir)
    with ModelFolder.open(model_dir, allow_pickle=allow_pickle) as folder:
        dtype = folder.dtype(folder.tensor_names()[0])
    compressed = fitness if isinstance(fitness, CompressedFitness) else CompressedFitness.load(fitness)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a folder without one
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from exc
    if split == "subset":
        scorers = compressed.subset_scorers(tokenizer, device=device)
    else:
        scorers = compressed.full_scorers(tokenizer, role=split, device=device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False).to(device).eval()
    tasks = {}
    for task, scorer in scorers.items():
        answers = np.asarray(scorer(model), dtype=np.int64)
        extra = {}
        if split == "subset":
            estimate = compressed.estimate(task, answers, estimator)
            extra = {"item_ids": list(compressed.task(task).item_ids), "estimate": float(estimate.value),
                     "stderr": float(estimate.stderr)}
        tasks[task] = TaskScore(accuracy=float(answers.mean()) if answers.size else float("nan"),
                                answers=answers.tolist(), **extra)
    return ModelScore(model_dir=model_dir, fitness=compressed.name, fitness_path=Path(compressed.path), split=split,
                      tasks=tasks, seconds=time.perf_counter() - started)
