"""Worker backends: where candidates are materialised and scored.

Both backends take a batch of (candidate id, genome) and return one `Evaluation` per candidate,
ordered by id, so the search tells the optimizer the same thing whatever ran it: the in-process
backend, one Ray worker or many (results are identical because every worker runs the same
deterministic code with the same thread count).

The Ray pool follows Ray's fault-tolerance model: actors are created with `max_restarts`, so a
crashed worker process is restarted (and reloads the base and task vectors); the candidate it
was scoring is resubmitted up to `max_retries` times and then recorded as failed, and the run
goes on.

The asynchronous schedule (`workers.schedule: async`) uses the other half of each backend:
`submit(candidate_id, genome)` hands one candidate to the pool and `next_result()` blocks until
any submitted candidate finishes and returns its `Evaluation` (completion order, not id order).
A pool whose `next_result` takes a `timeout` (seconds; None when nothing finished by then) lets
the search write its log only while every worker is busy.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from collections import deque
from dataclasses import asdict
from typing import Sequence

import numpy as np

from evomerge.runs.config import RunConfig
from evomerge.runs.problem import Evaluation, MergeProblem

log = logging.getLogger(__name__)

Candidate = tuple[int, np.ndarray]


def failed_evaluation(candidate_id: int, tasks: Sequence[str], error: str, worker: str = "") -> Evaluation:
    nan = float("nan")
    return Evaluation(candidate_id, {t: nan for t in tasks}, {t: nan for t in tasks}, {}, 0,
                      worker=worker, status="failed", error=error)


class InProcessBackend:
    """Scores candidates in this process, one after another."""

    def __init__(self, config: RunConfig, fitness):
        self.config = config
        self.fitness = fitness  # the driver's CompressedFitness: loaded and checked once per process
        self.problem = MergeProblem(config, fitness, worker="inprocess")
        self._queue: deque[Candidate] = deque()  # submitted, scored first in first out

    @property
    def tasks(self) -> list[str]:
        return list(self.fitness.task_names)

    def submit(self, candidate_id: int, genome: np.ndarray) -> None:
        self._queue.append((candidate_id, genome))

    def next_result(self, timeout: float | None = None) -> Evaluation | None:
        """Scores the oldest submitted candidate (one process scores one at a time); with a timeout,
        None: nothing here finishes without being waited for."""
        if timeout is not None:
            return None
        return self.evaluate([self._queue.popleft()])[0]

    def evaluate(self, candidates: Sequence[Candidate], on_result=None) -> list[Evaluation]:
        """Evaluations ordered by id; `on_result(evaluation)` is called as each one finishes."""
        out = []
        for candidate_id, genome in sorted(candidates, key=lambda c: c[0]):
            try:
                result = self.problem.evaluate(candidate_id, genome)
            except Exception as exc:  # a candidate that breaks scoring must not end the run
                log.error("candidate %d failed: %s", candidate_id, exc)
                result = failed_evaluation(candidate_id, self.tasks, f"{type(exc).__name__}: {exc}", "inprocess")
            if on_result is not None:
                on_result(result)
            out.append(result)
        return out

    def close(self) -> None:
        pass


class _Worker:
    """The Ray actor body: one MergeProblem per process, built once."""

    def __init__(self, config_data: dict, fitness_path: str, index: int):
        from evomerge.fitness.compressed import CompressedFitness

        config = RunConfig.model_validate(config_data)
        self.name = f"ray-{index}-pid{os.getpid()}"
        # The driver checked the fitness's data hashes before starting the pool: load, don't re-hash.
        self.problem = MergeProblem(config, CompressedFitness.load(fitness_path, check_data=False), worker=self.name)

    def evaluate(self, candidate_id: int, genome: list[float]) -> dict:
        try:
            return asdict(self.problem.evaluate(candidate_id, np.asarray(genome, dtype=np.float64)))
        except Exception as exc:
            tasks = list(self.problem.fitness.task_names)
            return asdict(failed_evaluation(candidate_id, tasks, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                                            self.name))

    def ready(self) -> str:
        return self.name


RAY_CONNECT_TIMEOUT = 10.0  # seconds to reach a cluster's address before giving up


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """Fail fast, naming the field, when a Ray cluster's `HOST:PORT` (or `ray://HOST:PORT`) does not answer.

    `ray.init` itself retries an unreachable address for minutes; a plain TCP connection tells in
    at most `timeout` seconds. `auto` (the address Ray finds on this machine) is left to Ray."""
    import socket

    from evomerge.runs.config import ConfigError

    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"field `workers.address`: {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, (TimeoutError, socket.timeout)) else (exc.strerror or str(exc))
        raise ConfigError(f"field `workers.address`: cannot reach a Ray cluster at {address} ({reason} within "
                          f"{timeout:.0f} s); start the cluster, correct the address, or remove it to run a local "
                          "pool") from None


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Start a local single-node Ray on loopback (no dashboard), or join the cluster at `address`."""
    if not address:
        # Without this a local Ray on Linux binds to the machine's external address; a local pool
        # stays on loopback. Ray reads the variable when it is imported, so when it was imported
        # already its constant is switched too (the raylet and workers inherit the variable).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if not address:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    # Ray (2.60 here) logs on every new local cluster that it turned token authentication on and how to
    # turn it off; our pool is on loopback and keeps the token, so the user has nothing to do about it.
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notices.addFilter(_drop_token_auth_notice)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    finally:
        notices.removeFilter(_drop_token_auth_notice)


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class RayBackend:
    """A pool of Ray actors, each holding the base and task vectors once."""

    def __init__(self, config: RunConfig, fitness):
        import ray
        import torch

        self.config = config
        self.tasks = list(fitness.task_names)
        fitness_path = str(fitness.path)
        workers = config.workers
        init_ray(workers.address, num_cpus=None if workers.address else max(
            os.cpu_count() or 1, workers.num_workers * workers.threads_per_worker))
        gpus = float(ray.cluster_resources().get("GPU", 0)) if workers.device != "cpu" else 0.0
        options = dict(num_cpus=workers.threads_per_worker, num_gpus=1 if gpus >= workers.num_workers else 0,
                       max_restarts=-1, max_task_retries=0)
        actor_cls = ray.remote(_Worker)
        config_data = config.model_dump()
        self.actors = [actor_cls.options(**options).remote(config_data, fitness_path, i)
                       for i in range(workers.num_workers)]
        ray.get([a.ready.remote() for a in self.actors])
        del torch

    def evaluate(self, candidates: Sequence[Candidate], on_result=None) -> list[Evaluation]:
        """Evaluations ordered by id; `on_result(evaluation)` is called as each one finishes."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        pending = list(sorted(candidates, key=lambda c: c[0]))
        attempts = {candidate_id: 0 for candidate_id, _ in pending}
        genomes = {candidate_id: g for candidate_id, g in pending}
        results: dict[int, Evaluation] = {}
        idle = list(range(len(self.actors)))
        running: dict = {}  # object ref -> ("eval", candidate id, actor) or ("ready", None, actor)
        while pending or any(kind == "eval" for kind, _, _ in running.values()):
            while pending and idle:
                candidate_id, genome = pending.pop(0)
                actor = idle.pop(0)
                ref = self.actors[actor].evaluate.remote(candidate_id, np.asarray(genome).tolist())
                running[ref] = ("eval", candidate_id, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            kind, candidate_id, actor = running.pop(done[0])
            try:
                value = ray.get(done[0])
            except (RayActorError, RayTaskError) as exc:
                if kind == "ready":  # still restarting: ask again
                    running[self.actors[actor].ready.remote()] = ("ready", None, actor)
                    continue
                if isinstance(exc, ActorUnavailableError):
                    # The actor is between death and restart: not this candidate's fault, try again.
                    log.debug("worker %d unavailable for candidate %d; waiting for its restart", actor, candidate_id)
                else:
                    attempts[candidate_id] += 1
                    log.warning("worker %d died while scoring candidate %d (attempt %d): %s", actor, candidate_id,
                                attempts[candidate_id], type(exc).__name__)
                # Ray restarts the actor (max_restarts); it takes work again once it answers.
                running[self.actors[actor].ready.remote()] = ("ready", None, actor)
                if attempts[candidate_id] <= self.config.workers.max_retries:
                    pending.insert(0, (candidate_id, genomes[candidate_id]))
                else:
                    results[candidate_id] = failed_evaluation(candidate_id, self.tasks,
                                                              f"worker crashed {attempts[candidate_id]} times",
                                                              f"ray-{actor}")
                    if on_result is not None:
                        on_result(results[candidate_id])
                continue
            if kind == "eval":
                results[candidate_id] = Evaluation(**value)
                if on_result is not None:
                    on_result(results[candidate_id])
            idle.append(actor)
        for ref, (kind, _, actor) in running.items():  # restarts still pending: they rejoin next batch
            try:
                ray.get(ref, timeout=120)
            except Exception:
                pass
            idle.append(actor)
        return [results[candidate_id] for candidate_id in sorted(results)]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if not self.config.workers.address:
            ray.shutdown()


def make_backend(config: RunConfig, fitness):
    """The worker pool the config asks for, scoring with `fitness` (a loaded CompressedFitness)."""
    if config.workers.backend == "inprocess":
        return InProcessBackend(config, fitness)
    started = time.perf_counter()
    backend = RayBackend(config, fitness)
    log.info("Ray pool of %d workers ready in %.1fs", config.workers.num_workers, time.perf_counter() - started)
    return backend
