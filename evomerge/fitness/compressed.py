"""A compressed fitness: per task, a small item subset plus the calibration that extrapolates from it.

Saved as a folder (by `evomerge fitness calibrate`: `fitness/<name>/` beside the calibration config
unless it sets `fitness_dir`) holding `fitness.json`:
    name, created, estimator (default), and per task: the task spec, the fitness split's data hash,
    the subset item ids (in subset order), and the `CompressedEstimator` (item parameters, subset
    weights, endpoint abilities, fitted mixing weights).
`CompressedFitness.load(name)` checks each task's data hash against the data on disk now and
refuses a fitness whose source data changed since calibration.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evomerge._atomic import atomic_directory
from evomerge.fitness.estimators import DEFAULT_ESTIMATOR, CompressedEstimator, Estimate
from evomerge.fitness.tasks import TaskError, TaskSpec, dataset_hash

FITNESS_FILE = "fitness.json"
DEFAULT_ROOT = "fitness"
FORMAT_VERSION = 1


class FitnessError(ValueError):
    """A compressed fitness that cannot be found, read or trusted."""


@dataclass
class TaskFitness:
    task: TaskSpec
    item_ids: list[str]  # subset items, in the order their responses are given
    estimator: CompressedEstimator
    data_hash: str
    n_total: int

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task.to_dict(), "item_ids": list(self.item_ids), "estimator": self.estimator.to_dict(),
                "data_hash": self.data_hash, "n_total": self.n_total}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> "TaskFitness":
        return cls(TaskSpec.from_dict(data["task"], source=source), [str(i) for i in data["item_ids"]],
                   CompressedEstimator.from_dict(data["estimator"]), str(data["data_hash"]), int(data["n_total"]))


@dataclass
class CompressedFitness:
    name: str
    tasks: dict[str, TaskFitness]
    estimator: str = DEFAULT_ESTIMATOR
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def task(self, name: str) -> TaskFitness:
        """One task's calibration; an unknown name is an error listing the fitness's tasks."""
        try:
            return self.tasks[name]
        except KeyError:
            where = f" ({self.path})" if self.path else ""
            raise FitnessError(f"compressed fitness {self.name!r}{where} has no task {name!r}; "
                               f"tasks: {self.task_names}") from None

    def subset_size(self, task: str) -> int:
        return len(self.task(task).item_ids)

    @property
    def items_per_candidate(self) -> int:
        return sum(len(t.item_ids) for t in self.tasks.values())

    def model_mismatches(self, base: str | os.PathLike, experts: list[str | os.PathLike], *,
                         allow_pickle: bool = False, unknown_is_stale: bool = False) -> list[str]:
        """How these models differ from the ones this fitness was calibrated on (weights
        fingerprints, `ModelFolder.weights_fingerprint`); empty when they match. A fitness saved
        before fingerprints were recorded passes unless `unknown_is_stale`. Its item parameters
        describe the calibration models' population, so a fitness from other weights would estimate
        a search's candidates wrongly, without failing."""
        from evomerge.merge.checkpoint import ModelFolder

        recorded = self.meta.get("model_fingerprints")
        if not recorded:
            return ["no weights fingerprints recorded (calibrated by an older evomerge)"] if unknown_is_stale else []
        if len(experts) != len(recorded["experts"]):
            return [f"{len(experts)} experts, calibrated with {len(recorded['experts'])}"]
        pairs = [("base", base, recorded["base"])]
        pairs += [(f"expert {i}", path, fp) for i, (path, fp) in enumerate(zip(experts, recorded["experts"]))]
        out = []
        for role, path, fingerprint in pairs:
            with ModelFolder.open(path, allow_pickle=allow_pickle) as folder:
                if folder.weights_fingerprint() != fingerprint:
                    out.append(f"{role} {path} has other weights")
        return out

    # ------------------------------------------------------------- scoring
    def subset_items(self, task: str):
        """The fitness-split rows of the subset items, in subset order."""
        tf = self.task(task)
        data = tf.task.load_split("fitness")
        ids = tf.task.item_ids(data)
        position = {item_id: i for i, item_id in enumerate(ids)}
        missing = [i for i in tf.item_ids if i not in position]
        if missing:
            raise FitnessError(f"task {task!r}: subset items {missing[:3]} are no longer in the fitness split")
        return data.select([position[i] for i in tf.item_ids])

    def subset_scorers(self, tokenizer, device=None) -> dict[str, Any]:
        """task -> scorer(model) giving the 0/1 answers on that task's subset items."""
        return {t: self.tasks[t].task.make_scorer(tokenizer, self.subset_items(t), device=device) for t in self.tasks}

    def full_scorers(self, tokenizer, role: str = "test", device=None) -> dict[str, Any]:
        """task -> scorer over the whole split playing `role` ('test' for verification)."""
        out = {}
        for name, tf in self.tasks.items():
            out[name] = tf.task.make_scorer(tokenizer, tf.task.load_split(role), device=device)
        return out

    def estimate(self, task: str, responses: np.ndarray, estimator: str | None = None) -> Estimate:
        """Full-split accuracy of `task` from the answers on its subset items (in `item_ids` order)."""
        return self.task(task).estimator.estimate(estimator or self.estimator, responses)

    # ------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike, *, overwrite: bool = False,
             arrays: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write `fitness.json` (and `responses.npz` from `arrays`) into a folder, atomically."""
        path = Path(path)
        body = {"format_version": FORMAT_VERSION, "name": self.name, "estimator": self.estimator,
                "meta": {**self.meta, "saved": time.time()},
                "tasks": {name: tf.to_dict() for name, tf in self.tasks.items()}}
        with atomic_directory(path, overwrite=overwrite) as tmp:
            (tmp / FITNESS_FILE).write_text(json.dumps(body, indent=1) + "\n")
            if arrays:
                np.savez_compressed(tmp / "responses.npz", **arrays)
        self.path = path
        return path

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, check_data: bool = True) -> "CompressedFitness":
        path = resolve_fitness_path(name_or_path)
        file = path / FITNESS_FILE
        try:
            body = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FitnessError(f"{file}: cannot read compressed fitness ({exc})") from exc
        if body.get("format_version") != FORMAT_VERSION:
            raise FitnessError(f"{file}: format version {body.get('format_version')} is not {FORMAT_VERSION}")
        tasks = {name: TaskFitness.from_dict(data, source=str(file)) for name, data in body["tasks"].items()}
        fitness = cls(body["name"], tasks, body.get("estimator", DEFAULT_ESTIMATOR), body.get("meta", {}), path)
        if check_data:
            for name, tf in tasks.items():
                try:
                    data = tf.task.load_split("fitness")
                except TaskError as exc:
                    raise FitnessError(f"{file}: task {name!r}: {exc}") from exc
                now = dataset_hash(data)
                if now != tf.data_hash:
                    raise FitnessError(
                        f"{file}: task {name!r}: the fitness split's data changed since calibration "
                        f"(hash {now[:12]} != {tf.data_hash[:12]}); recalibrate with `evomerge fitness calibrate`"
                    )
        return fitness


def resolve_fitness_path(name_or_path: str | os.PathLike) -> Path:
    """A compressed fitness folder: a path, or a bare name under ./fitness/ (then the packaged presets).

    A run config resolves a path against its own folder first, so `fitness: {name: fitness/NAME}`
    in a run config beside a calibration config finds what calibrating it saved, from any directory.
    """
    from evomerge.fitness.tasks import PRESET_DIR

    path = Path(name_or_path)
    candidates = [path] if (path.is_absolute() or os.sep in str(name_or_path)) else [
        Path.cwd() / DEFAULT_ROOT / str(name_or_path), PRESET_DIR / str(name_or_path), path]
    for candidate in candidates:
        if (candidate / FITNESS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no compressed fitness {str(name_or_path)!r} (looked for {FITNESS_FILE} in "
                            f"{', '.join(map(str, candidates))}); create one with `evomerge fitness calibrate` "
                            "(it prints the folder it saves)")
