"""The problem a search solves: genome -> merged model -> per-task scores (pymoo's Problem, separated
from the optimizer and the stopping rule).

A `MergeProblem` lives once per worker: it loads the base and the task vectors once (the
materializer), tokenizes the fitness subset once (the scorers), and then each `evaluate(genome)`
decodes the genome once, writes the candidate into the live model and scores it on the subset
items only, returning the estimated full-split accuracy per task with its uncertainty, the raw
subset answers, and the recipe it scored (the log's and `export`'s record of the candidate).

With `fitness.adaptive` in the run config the items are chosen per candidate instead
(evomerge/fitness/adaptive.py): batch by batch from each task's whole fitness split, by Fisher
information at the candidate's current ability, until the accuracy's standard error, the per-task
budget or racing against the Pareto set stops the task. The set a candidate races against travels
with its job (`evaluate(..., front=)`: the objective vectors, fixed by the search when the candidate
is handed out), so a worker holds no racing state and every backend scores a candidate alike. The
record's `responses[task]` are then the answers in the order the items were given, and
`adaptive[task]` says which items (`items`), how many (`used`), in how many batches and why the task
stopped (`stop`: se, budget, exhausted or raced).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from evomerge.merge.materializer import MaterializerOutOfMemory
from evomerge.runs.config import RunConfig
from evomerge.search.space import BoundSpace, DecodedGenome, SearchSpace


@dataclass
class Evaluation:
    """What one candidate evaluation produced (plain data: it crosses process boundaries)."""

    candidate_id: int
    objectives: dict[str, float]  # task -> estimated full-split accuracy
    stderr: dict[str, float]
    responses: dict[str, list[int]]  # task -> 0/1 answers on the subset items, in subset order
    item_evaluations: int
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    recipe: dict[str, Any] | None = None  # the mergekit-style recipe that was scored (None when decoding failed)
    retries: list[str] = field(default_factory=list)  # attempts lost with their worker (a crash, a lost node)
    memory: str | None = None  # the worker's memory mode (resident, host, disk): where base and experts were kept
    adaptive: dict[str, dict[str, Any]] | None = None  # task -> items, used, batches, stop (adaptive evaluation only)


def bind_space(config: RunConfig) -> BoundSpace:
    """The search space bound to the base model's depth and the number of experts."""
    from evomerge.merge.checkpoint import ModelFolder
    from evomerge.merge.layers import LayerMap

    base = ModelFolder.open(config.models.base, allow_pickle=config.models.allow_pickle)
    num_layers = LayerMap.from_config(base.config).num_layers
    return SearchSpace.load(config.search_space).bind(num_layers, len(config.models.experts))


class MergeProblem:
    """Materializer + compressed fitness for one worker process."""

    def __init__(self, config: RunConfig, fitness, *, device: str | None = None, worker: str = "inprocess"):
        from transformers import AutoTokenizer

        from evomerge.merge.materializer import Materializer

        torch.set_num_threads(config.workers.threads_per_worker)
        self.config = config
        self.fitness = fitness
        self.worker = worker
        self.space = bind_space(config)
        workers = config.workers
        self.materializer = Materializer.from_folders(
            config.models.base, config.models.experts, device=device or workers.device,
            allow_pickle=config.models.allow_pickle, seed=config.seed, memory=workers.memory,
            method=self.space.method, cache_dir=workers.cache_dir,
            # a local pool's workers share this machine's host memory
            host_share=1.0 / (workers.num_workers if workers.backend == "ray" and not workers.address else 1),
        )
        self.tokenizer = AutoTokenizer.from_pretrained(config.models.base, trust_remote_code=False)
        adaptive = config.fitness.adaptive
        self.adaptive = adaptive.settings() if adaptive is not None else None
        if self.adaptive is None:
            self.scorers = fitness.subset_scorers(self.tokenizer, device=self.materializer.device)
        else:  # items come from the whole fitness split, a batch at a time
            self.scorers = {t: _BatchScorer(fitness.task(t).task, self.tokenizer, self.materializer.device)
                            for t in fitness.task_names}

    def materialize(self, genome: np.ndarray | DecodedGenome) -> torch.nn.Module:
        decoded = genome if isinstance(genome, DecodedGenome) else self.space.decode(genome)
        return self.materializer.apply(decoded.method, decoded.coefficients(self.materializer.layer_map),
                                       **decoded.materializer_settings())

    def recipe(self, decoded: DecodedGenome) -> dict[str, Any]:
        models = self.config.models
        return decoded.recipe(models.base, models.experts, dtype=self.config.dtype, seed=self.config.seed)

    def evaluate(self, candidate_id: int, genome: np.ndarray, front: np.ndarray | None = None) -> Evaluation:
        """Score one candidate. `front` (members, tasks in fitness order): the Pareto set's objectives
        it races against when `fitness.adaptive.racing` is on; None or empty: nothing to race against."""
        _test_hooks(candidate_id)
        t0 = time.perf_counter()
        decoded = self.space.decode(genome)
        model = self.materialize(decoded)  # MaterializerOutOfMemory: this candidate fails, the worker goes on
        t1 = time.perf_counter()
        objectives, stderr, responses, items, adaptive = {}, {}, {}, 0, None
        try:
            if self.adaptive is not None:
                task = "(adaptive items)"  # named in an out-of-memory message
                objectives, stderr, responses, adaptive = self._evaluate_adaptive(model, front)
                items = sum(entry["used"] for entry in adaptive.values())
            else:
                for task, scorer in self.scorers.items():
                    answers = np.asarray(scorer(model), dtype=np.int64)
                    estimate = self.fitness.estimate(task, answers, self.config.fitness.estimator)
                    objectives[task] = float(estimate.value)
                    stderr[task] = float(estimate.stderr)
                    responses[task] = answers.tolist()
                    items += int(answers.size)
        except torch.OutOfMemoryError as exc:  # free the activations so the next candidate can run
            if self.materializer.device.type == "cuda":
                torch.cuda.empty_cache()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MaterializerOutOfMemory(f"out of {self.materializer.device} memory scoring task {task!r} (memory "
                                          f"mode {self.materializer.memory}): {first}") from None
        t2 = time.perf_counter()
        return Evaluation(candidate_id, objectives, stderr, responses, items,
                          {"materialize": t1 - t0, "score": t2 - t1}, worker=self.worker, recipe=self.recipe(decoded),
                          memory=self.materializer.memory, adaptive=adaptive)

    def _evaluate_adaptive(self, model: torch.nn.Module, front: np.ndarray | None):
        from evomerge.fitness.adaptive import run_adaptive

        tasks = self.fitness.task_names
        params = {t: self.fitness.task(t).estimator.item_params for t in tasks}
        scorers = {t: (lambda batch, t=t: self.scorers[t](model, batch)) for t in tasks}
        if front is not None:
            front = np.asarray(front, dtype=np.float64).reshape(-1, len(tasks))  # (members, tasks)
        race = self.adaptive.racing and front is not None and len(front) > 0
        tests = run_adaptive(scorers, params, self.adaptive, front=front if race else None)
        record = {t: {"items": x.items, "used": x.used, "batches": x.batches, "stop": x.stop} for t, x in tests.items()}
        return ({t: x.value for t, x in tests.items()}, {t: x.stderr for t, x in tests.items()},
                {t: x.responses for t, x in tests.items()}, record)


class _BatchScorer:
    """Scores any items of one task's fitness split: `scorer(model, item_indices)` -> 0/1 answers.
    The split is loaded once; a batch's scorer (its tokenized prompts) is built the first time that
    batch is asked for and kept: every candidate starts from the same ability, so the first batches
    recur from candidate to candidate."""

    MAX_CACHED = 256  # batches of a few items each: a few MB of token ids at most

    def __init__(self, task, tokenizer, device):
        self.task, self.tokenizer, self.device = task, tokenizer, device
        self.split = task.load_split("fitness")
        self._scorers: dict[tuple[int, ...], Any] = {}

    def __call__(self, model: torch.nn.Module, items: np.ndarray) -> np.ndarray:
        key = tuple(int(i) for i in items)
        scorer = self._scorers.get(key)
        if scorer is None:
            scorer = self.task.make_scorer(self.tokenizer, self.split.select(list(key)), device=self.device)
            if len(self._scorers) >= self.MAX_CACHED:
                self._scorers.pop(next(iter(self._scorers)))  # the oldest batch
            self._scorers[key] = scorer
        return np.asarray(scorer(model), dtype=np.int64)


def _test_hooks(candidate_id: int) -> None:
    """Fault injection for the test suite (inert unless these variables are set):
    EVOMERGE_TEST_EVAL_DELAY=<seconds> slows every evaluation (to interrupt a run mid-generation);
    EVOMERGE_CRASH_ONCE=<candidate id>:<marker file> kills this process once, hard.
    """
    delay = os.environ.get("EVOMERGE_TEST_EVAL_DELAY")
    if delay:
        time.sleep(float(delay))
    spec = os.environ.get("EVOMERGE_CRASH_ONCE")
    if not spec:
        return
    target, marker = spec.split(":", 1)
    if int(target) == candidate_id and not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
        os._exit(17)


def failed_evaluation(candidate_id: int, tasks: Sequence[str], error: str, worker: str = "") -> Evaluation:
    """The record of a candidate that could not be scored: NaN everywhere, the reason in `error`."""
    nan = float("nan")
    return Evaluation(candidate_id, {t: nan for t in tasks}, {t: nan for t in tasks}, {}, 0,
                      worker=worker, status="failed", error=error)
