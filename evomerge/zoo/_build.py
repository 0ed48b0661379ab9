"""The zoo builder: manifest, component keys and reuse, and the reference-merge search.

`build_zoo` (in `_stages`) builds or reuses the zoo's tokenizer, tasks, base, experts and
reference merges through the `_Builder` defined here. The zoo is a folder::

    zoo.json               the manifest (see `Manifest`)
    tokenizer/             Hugging Face tokenizer files
    tasks/<task>/          a `datasets.DatasetDict` (train / validation / test), `save_to_disk`
    models/base/           `LlamaForCausalLM` folders: config, safetensors, tokenizer, generation config
    models/<task>/         one expert per task, fine-tuned from the base

Each component records a *key* (a hash of the settings and of the upstream components it was
built from) and the sha256 of every file it wrote. A later build reuses a component when its key
is unchanged and its files still hash to the recorded values, and rebuilds it otherwise (a
deleted or corrupted file, a different seed or size); downstream components follow through their
keys. Every folder is written atomically and the manifest is rewritten after each component, so
an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evomerge._atomic import atomic_directory, write_json_atomic
from evomerge._device import default_device
from evomerge.zoo._sizes import ZooSize
from evomerge.zoo._tasks import TASKS

MANIFEST_NAME = "zoo.json"
FORMAT = "evomerge-zoo/1"
BASE = "base"

# The quality bars of the issue, in accuracy points (0-100) on the validation splits.
BAR_EXPERT_OWN_TASK = 90.0
BAR_BASE_GAP = 20.0
BAR_MERGE_OVER_BASE = 10.0
BAR_MERGE_OVER_BEST_EXPERT = 5.0
BAR_HEADROOM = 5.0
# The smol zoo's bars (issue 15, item 2), in the same points on validation
BAR_CHAT_EXPERT_OWN_TASK = 80.0  # each expert on its own task
BAR_CHAT_EXPERT_OVER_BASE = 20.0  # each expert above the base on its own task
BAR_CHAT_BASE_GAP = 15.0  # the experts' own-task mean above the base's mean
BAR_CHAT_KEPT = 90.0  # each expert keeps this % of the base's mean on the other tasks


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """A built zoo: its folder and the parsed `zoo.json` (`data`, a plain JSON dictionary).

    Schema of `data` (accuracies are fractions in [0, 1] on the *validation* splits; manifests
    from before benchmarks/PROTOCOL.md, without ``evaluation.split``, hold test-split numbers)::

        format, size, seed, content_hash, built_with {python, torch, transformers, datasets}
        settings                  ZooSize as a dictionary (shapes, split sizes, training budgets)
        tokenizer                 component entry {path, key, hash, files, seconds, vocab}
        tasks[task]               component entry + {splits: {split: n_items}, columns}
        models[name]              component entry + {role: base|expert, task, parent, n_parameters,
                                  config, training: {steps, lr, ..., seed, final_loss}}
        evaluation                {key, seconds, split: "validation", accuracy[model][task],
                                   reference_merges, quality_bars}
        reference_merges[name]    {method, weights, validation: {task: acc, mean}}
                                  for best_grid (chosen on validation), uniform_task_arithmetic
                                  and averaging; best_grid also has grid {values, refine_step,
                                  n_evaluated}
        quality_bars              list of {bar, value, threshold, passed} in points
        build                     {seconds, load_average [before, after], threads (of the last
                                   build from scratch), last_run: {seconds, built, reused}}
    """

    root: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; build the zoo first with evomerge.zoo.build_zoo({str(root)!r})")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(root, data)

    @property
    def size(self) -> str:
        return self.data["size"]

    @property
    def seed(self) -> int:
        return self.data["seed"]

    @property
    def tasks(self) -> list[str]:
        return list(self.data["tasks"])

    @property
    def experts(self) -> list[str]:
        """Expert model names, in task order (the order of task vectors in every merge)."""
        return [name for name, m in self.data["models"].items() if m["role"] == "expert"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.data["tokenizer"]["path"]

    def task_path(self, task: str) -> Path:
        return self.root / self._entry("tasks", task)["path"]

    def task_preset(self, task: str) -> str:
        """The fitness preset (`fitness/<name>.yaml`) that scores `task`: `zoo_<task>` for the
        character-level zoos, `zoo_smol_<task>` for the chat family (its prompts and answers differ)."""
        self._entry("tasks", task)  # an unknown task is refused by name
        return f"zoo_smol_{task}" if self.data["settings"].get("family") == "chat" else f"zoo_{task}"

    def model_path(self, name: str) -> Path:
        return self.root / self._entry("models", name)["path"]

    @property
    def base_path(self) -> Path:
        return self.model_path(BASE)

    @property
    def expert_paths(self) -> list[Path]:
        return [self.model_path(name) for name in self.experts]

    @property
    def accuracy(self) -> dict[str, dict[str, float]]:
        return self.data["evaluation"]["accuracy"]

    @property
    def reference_merges(self) -> dict[str, dict]:
        return self.data["evaluation"]["reference_merges"]

    @property
    def quality_bars(self) -> list[dict]:
        return self.data["evaluation"]["quality_bars"]

    @property
    def content_hash(self) -> str:
        return self.data["content_hash"]

    @property
    def built(self) -> list[str]:
        """Components (re)built by the run that wrote this manifest."""
        return self.data["build"]["last_run"]["built"]

    @property
    def reused(self) -> list[str]:
        return self.data["build"]["last_run"]["reused"]

    def _entry(self, kind: str, name: str) -> dict:
        entries = self.data[kind]
        if name not in entries:
            raise KeyError(f"{self.root / MANIFEST_NAME}: no {kind[:-1]} {name!r}; it has {', '.join(entries)}")
        return entries[name]


# --------------------------------------------------------------------------- hashing


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative POSIX path (empty if it is missing).

    `datasets` writes `cache-*.arrow` files beside a dataset loaded from disk whenever someone
    maps or filters it; they are not part of the zoo, so they are left out.
    """
    if not folder.is_dir():
        return {}
    return {
        p.relative_to(folder).as_posix(): _sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (p.name.startswith("cache-") and p.suffix == ".arrow")
    }


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def derive_seed(seed: int, *names: str) -> int:
    """A 63-bit seed for one use (e.g. the addition expert's batches) from the zoo seed."""
    return int.from_bytes(hashlib.sha256(json.dumps([seed, *names]).encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------- the build


class _Builder:
    """Walks the components in dependency order, reusing each one whose key and files still match."""

    def __init__(self, root: Path, spec: ZooSize, seed: int, progress: bool) -> None:
        self.root = root
        self.spec = spec
        self.seed = seed
        self.progress = progress
        self.start = time.perf_counter()
        self.previous = _read_previous(root)
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "size": spec.name,
            "seed": seed,
            "content_hash": None,
            "built_with": _versions(),
            "settings": spec.to_json(),
            "tokenizer": None,
            "tasks": {},
            "models": {},
            "evaluation": None,
        }
        self.built: list[str] = []
        self.reused: list[str] = []
        self.device = default_device()

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[zoo {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)

    def previous_entry(self, kind: str, name: str | None = None) -> dict | None:
        entry = self.previous.get(kind)
        if name is not None:
            entry = (entry or {}).get(name)
        return entry

    @staticmethod
    def reusable(folder: Path, key: str, previous: dict | None) -> bool:
        """`previous` has this key and the folder's files are intact."""
        return previous is not None and previous.get("key") == key and folder_files(folder) == previous.get("files")

    def ensure(self, label: str, folder: Path, key: str, previous: dict | None, build: Callable[[Path], dict]) -> dict:
        """Reuse `folder` if `previous` has this key and the files are intact; else build it."""
        if self.reusable(folder, key, previous):
            self.reused.append(label)
            self.log(f"{label}: reused ({folder.relative_to(self.root)})")
            return previous
        reason = "missing" if previous is None or not folder.exists() else (
            "settings changed" if previous.get("key") != key else "files changed or missing")
        self.log(f"{label}: building ({reason})")
        began = time.perf_counter()
        with atomic_directory(folder, overwrite=True) as tmp:
            info = build(tmp)
        files = folder_files(folder)
        entry = {
            "path": folder.relative_to(self.root).as_posix(),
            "key": key,
            "hash": _hash_json(files),
            "files": files,
            "seconds": round(time.perf_counter() - began, 2),
            **info,
        }
        self.built.append(label)
        return entry

    def save(self) -> None:
        write_json_atomic(self.root / MANIFEST_NAME, self.data)


def _read_previous(root: Path) -> dict:
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if data.get("format") == FORMAT else {}


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


# --------------------------------------------------------------------------- reference merges


@dataclass(frozen=True)
class GridResult:
    weights: tuple[float, ...]  # the best point
    score: float
    seen: dict[tuple[float, ...], float]  # every evaluated point's score, in evaluation order

    @property
    def n_evaluated(self) -> int:
        return len(self.seen)


def grid_search(
    score: Callable[[tuple[float, ...]], float], n_experts: int, values: tuple[float, ...], refine_step: float,
    max_rounds: int = 3,
) -> GridResult:
    """Best weights by a coarse grid, then hill-climbing on the 3^K neighbourhood at `refine_step`
    (none when it is 0).

    Ties keep the earlier point, so the result depends only on the scores. Weights are rounded to
    4 decimals and never negative.
    """
    seen: dict[tuple[float, ...], float] = {}

    def evaluate(w: tuple[float, ...]) -> float:
        w = tuple(round(max(0.0, x), 4) for x in w)
        if w not in seen:
            seen[w] = score(w)
        return seen[w]

    best = max(itertools.product(values, repeat=n_experts), key=evaluate)  # first of equals wins
    best = tuple(round(x, 4) for x in best)
    best_score = seen[best]
    for _ in range(max_rounds if refine_step > 0 else 0):
        improved = False
        for offsets in itertools.product((-refine_step, 0.0, refine_step), repeat=n_experts):
            w = tuple(round(max(0.0, b + o), 4) for b, o in zip(best, offsets))
            s = evaluate(w)
            if s > best_score:
                best, best_score, improved = w, s, True
        if not improved:
            break
    return GridResult(best, best_score, seen)


def score_tasks(model, scorers: dict[str, Callable]) -> dict[str, float]:
    """Accuracy of `model` on each task and their mean."""
    scores = {task: float(np.mean(scorer(model))) for task, scorer in scorers.items()}
    scores["mean"] = float(np.mean([scores[t] for t in scorers]))
    return scores


__all__ = ["BASE", "MANIFEST_NAME", "Manifest", "TASKS", "derive_seed", "folder_files", "GridResult", "grid_search"]
