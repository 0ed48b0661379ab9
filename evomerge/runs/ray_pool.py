"""A pool of Ray actors that survives losing workers: what each worker asks of the cluster, and
a dispatcher that gives every live worker the next candidate and returns results as they finish.

What a worker asks for (`actor_request`): one GPU when the cluster has GPUs, and then it scores on
`cuda`, which Ray maps to the GPU it assigned to that actor (Ray sets `CUDA_VISIBLE_DEVICES` per
actor), so no two workers share a GPU; a pool asks for no more workers than the cluster has GPUs.
On a cluster without GPUs the workers score on the CPU even where CUDA is visible: a worker that Ray
gave no GPU never touches one (Ray leaves `CUDA_VISIBLE_DEVICES` alone for `num_gpus=0`, so it
would otherwise land on whichever GPU is first, beside the others).

Losing workers (`ActorPool`), after Ray's fault-tolerance model: actors are created with
`max_restarts=-1`, so Ray restarts a dead worker wherever the cluster has room (on the same node
after a crash; after a node is lost, elsewhere when another node has the resources). Until a lost
worker answers again the pool goes on with the workers it has. The candidate it was scoring goes
to the next live worker, at most `max_retries` times, and its `Evaluation.retries` lists each lost
attempt (worker and Ray's error); past that it is recorded as failed. A candidate that fails for
its own reasons (out of device memory, a genome that cannot be decoded) comes back from its worker
as a failed `Evaluation` with the reason, is not retried, and the pool goes on. With no live
worker left for `restart_wait` seconds the pool raises `WorkersLost`: the log keeps every finished
evaluation and `evomerge resume` continues once the cluster has room again.

A candidate's racing front (`submit(..., front)`, racing only) is kept with it until it finishes,
so a retried candidate races against the same set on its next worker.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from evomerge.runs.config import ConfigError, WorkersConfig
from evomerge.runs.problem import Evaluation, failed_evaluation
from evomerge.runs.store import RunStoreError

log = logging.getLogger(__name__)

RESTART_WAIT = 600.0  # seconds a pool with no live worker waits for one to come back
PROBE_INTERVAL = 1.0  # seconds between two "are you back?" calls to a lost worker


class WorkersLost(RunStoreError):
    """No live worker for `restart_wait` seconds: the search stops with the reason (resume continues)."""


@dataclass(frozen=True)
class ActorRequest:
    """How many workers to start and what each asks of the cluster."""

    count: int
    num_cpus: int
    num_gpus: int  # 0 or 1
    device: str  # what the worker scores on: "cuda" is the GPU Ray assigned to it


def actor_request(workers: WorkersConfig, cluster: Mapping[str, float], where: str = "the Ray cluster") -> ActorRequest:
    """The pool `workers` asks for on a cluster whose totals are `cluster` (`ray.cluster_resources()`)."""
    gpus = math.floor(float(cluster.get("GPU", 0.0)))
    cpus = float(cluster.get("CPU", 0.0))
    device = workers.device
    kind = (device or "").split(":", 1)[0]
    count = workers.num_workers
    if kind == "cuda" or (device is None and gpus > 0):
        if gpus == 0:
            raise ConfigError(f"field `workers.device`: {device!r} asked for, but {where} has no GPU "
                              f"(its resources: {_resources(cluster)}); use `device: cpu` or a cluster with GPUs")
        if gpus < count:
            log.warning("workers.num_workers is %d but %s has %d GPU(s): starting %d workers, one GPU each",
                        count, where, gpus, gpus)
            count = gpus
        num_gpus, device = 1, "cuda"  # inside the actor its own GPU is cuda:0, whatever its index on the node
    else:
        num_gpus, device = 0, device or "cpu"
    needed = count * workers.threads_per_worker
    if cpus < needed:
        raise ConfigError(f"field `workers.num_workers`: {count} workers x {workers.threads_per_worker} CPU "
                          f"(`threads_per_worker`) need {needed} CPUs, but {where} has {cpus:g}; "
                          "lower `num_workers` or `threads_per_worker`")
    return ActorRequest(count, workers.threads_per_worker, num_gpus, device)


def _resources(cluster: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if not k.startswith(("node:", "memory",
                                                                                            "object_store")))


class ActorPool:
    """Dispatches candidates to `actors` (each with `evaluate(candidate_id, genome) -> dict` and
    `ready() -> name`); `submit` queues one, `next_result` returns the next to finish."""

    def __init__(self, actors: list, names: list[str], tasks: list[str], *, max_retries: int,
                 restart_wait: float = RESTART_WAIT):
        self.actors = actors
        self.names = list(names)  # each worker's current name (its pid changes when Ray restarts it)
        self.tasks = tasks
        self.max_retries = max_retries
        self.restart_wait = restart_wait
        self._queue: deque[int] = deque()  # candidate ids waiting for a worker
        self._genomes: dict[int, list[float]] = {}
        self._fronts: dict[int, list[list[float]]] = {}  # candidate id -> the Pareto set it races against
        self._retries: dict[int, list[str]] = {}  # candidate id -> its lost attempts
        self._idle: list[int] = list(range(len(actors)))
        self._running: dict[Any, tuple[int, int]] = {}  # object ref -> (candidate id, worker)
        self._probes: dict[Any, tuple[int, float]] = {}  # ready() of a lost worker -> (worker, sent at)
        self._resting: dict[int, float] = {}  # lost worker -> when to ask it again

    @property
    def pending(self) -> int:
        """Candidates submitted and not yet returned."""
        return len(self._queue) + len(self._running)

    def submit(self, candidate_id: int, genome: np.ndarray, front: np.ndarray | None = None) -> None:
        """Queue one candidate; `front` (members, tasks): the Pareto set it races against (racing only)."""
        self._genomes[candidate_id] = np.asarray(genome, dtype=np.float64).tolist()
        if front is not None:
            self._fronts[candidate_id] = np.asarray(front, dtype=np.float64).tolist()
        self._queue.append(candidate_id)
        self._dispatch()

    def next_result(self, timeout: float | None = None) -> Evaluation | None:
        """The next submitted candidate to finish (completion order); with `timeout` (seconds),
        None when none has finished by then."""
        import ray

        if not self.pending:
            raise RuntimeError("next_result() with no candidate submitted")
        deadline = None if timeout is None else time.monotonic() + timeout
        stalled_since = None
        while True:
            self._dispatch()
            now = time.monotonic()
            waits = [at - now for at in self._resting.values()]  # until a lost worker is asked again
            if deadline is not None:
                waits.append(deadline - now)
            if not self._running:  # candidates queued and every worker lost: wait for a restart
                stalled_since = stalled_since or now
                left = self.restart_wait - (now - stalled_since)
                if left <= 0:
                    raise WorkersLost(self._lost_message())
                waits.append(left)
            else:
                stalled_since = None
            refs = [*self._running, *self._probes]
            if refs:
                done, _ = ray.wait(refs, num_returns=1, timeout=max(min(waits), 0.0) if waits else None)
            else:  # every worker lost and none being asked yet
                time.sleep(max(min(waits), 0.0))
                done = []
            if not done:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            if done[0] in self._probes:
                self._probe_answered(done[0])
                continue
            evaluation = self._finished(done[0])
            if evaluation is not None:
                return evaluation

    # ------------------------------------------------------------------ internals
    def _dispatch(self) -> None:
        now = time.monotonic()
        for worker, at in list(self._resting.items()):
            if at <= now:
                del self._resting[worker]
                self._probes[self.actors[worker].ready.remote()] = (worker, now)
        while self._queue and self._idle:
            candidate_id, worker = self._queue.popleft(), self._idle.pop(0)
            job = (candidate_id, self._genomes[candidate_id])
            if candidate_id in self._fronts:
                job += (self._fronts[candidate_id],)
            ref = self.actors[worker].evaluate.remote(*job)
            self._running[ref] = (candidate_id, worker)

    def _probe_answered(self, ref) -> None:
        import ray
        from ray.exceptions import RayError

        worker, sent = self._probes.pop(ref)
        try:
            name = ray.get(ref)
        except RayError:  # still being restarted (or placed): ask again shortly
            self._resting[worker] = sent + PROBE_INTERVAL
            return
        log.warning("worker %s is back as %s", self.names[worker], name)
        self.names[worker] = name
        self._idle.append(worker)

    def _finished(self, ref) -> Evaluation | None:
        """The candidate's Evaluation, or None when its worker was lost and it went back to the queue."""
        import ray
        from ray.exceptions import RayError

        candidate_id, worker = self._running.pop(ref)
        try:
            value = ray.get(ref)
        except RayError as exc:  # the worker died (crash, lost node) or became unreachable: not the candidate's fault
            retries = self._retries.setdefault(candidate_id, [])
            retries.append(f"{self.names[worker]} lost ({type(exc).__name__})")
            self._resting[worker] = time.monotonic()  # Ray restarts it where there is room; ask when it is back
            if len(retries) <= self.max_retries:
                log.warning("worker %s lost while scoring candidate %d (%s); the candidate goes to the next live "
                            "worker (retry %d of %d)", self.names[worker], candidate_id, type(exc).__name__,
                            len(retries), self.max_retries)
                self._queue.appendleft(candidate_id)
                return None
            evaluation = failed_evaluation(candidate_id, self.tasks, f"lost its worker {len(retries)} times: "
                                           + "; ".join(retries), self.names[worker])
        else:
            self._idle.append(worker)
            evaluation = Evaluation(**value)
        evaluation.retries = self._retries.pop(candidate_id, [])
        del self._genomes[candidate_id]
        self._fronts.pop(candidate_id, None)
        return evaluation

    def _lost_message(self) -> str:
        lost = sorted({self.names[w] for w, _ in self._probes.values()} | {self.names[w] for w in self._resting})
        return (f"no live worker for {self.restart_wait:.0f} s: all {len(self.actors)} workers were lost "
                f"({', '.join(lost)}), and the cluster has not restarted any (a node died and no other has room "
                f"for its workers?); {len(self._queue)} candidates were waiting. The evaluations that finished "
                "are in the run's log: `evomerge resume RUN_DIR` continues once the cluster has room again.")
