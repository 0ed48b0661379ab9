"""Worker backends: where candidates are materialised and scored.

Both backends take a batch of (candidate id, genome) and return one `Evaluation` per candidate,
ordered by id, so the search tells the optimizer the same thing whatever ran it: the in-process
backend, one Ray worker or many (results are identical because every worker runs the same
deterministic code with the same thread count).

The Ray pool follows Ray's fault-tolerance model: actors are created with `max_restarts`, so a
crashed worker process is restarted (and reloads the base and task vectors) wherever the cluster
has room; the candidate it was scoring goes to the next live worker up to `max_retries` times
(its record lists the lost attempts) and is then recorded as failed, and the run goes on with the
workers it has, also when a node is lost for good (`ray_pool`). A candidate that fails for its
own reasons (out of device memory) is recorded as failed with the reason, on either backend.

The asynchronous schedule (`workers.schedule: async`) uses the other half of each backend:
`submit(candidate_id, genome)` hands one candidate to the pool and `next_result()` blocks until
any submitted candidate finishes and returns its `Evaluation` (completion order, not id order).
A pool whose `next_result` takes a `timeout` (seconds; None when nothing finished by then) lets
the search write its log only while every worker is busy.

Racing (`fitness.adaptive.racing`): the Pareto set a candidate races against travels with its job,
as `front=` (members, tasks: a small array of objective vectors) to `evaluate` (one set for the
whole batch) or `submit` (one per candidate), and on to `MergeProblem.evaluate` on the worker; the
search fixes it when it hands the candidate out, so which worker scores a candidate, and when,
does not change the result. Without racing no `front` is passed.
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
from evomerge.runs.problem import Evaluation, MergeProblem, failed_evaluation

log = logging.getLogger(__name__)

Candidate = tuple[int, np.ndarray]


def _with_front(front) -> dict:
    """The keyword that hands a job its racing front; nothing without racing (pools and problems that
    take no `front` keep working)."""
    return {} if front is None else {"front": front}


def release_device_memory(exc: BaseException) -> None:
    """After a candidate ran out of device memory, hand its cached blocks back so the next one starts clean."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


class InProcessBackend:
    """Scores candidates in this process, one after another."""

    def __init__(self, config: RunConfig, fitness):
        self.config = config
        self.fitness = fitness  # the driver's CompressedFitness: loaded and checked once per process
        self.problem = MergeProblem(config, fitness, worker="inprocess")
        self._queue: deque[tuple[int, np.ndarray, np.ndarray | None]] = deque()  # submitted, scored first in first out

    @property
    def tasks(self) -> list[str]:
        return list(self.fitness.task_names)

    def submit(self, candidate_id: int, genome: np.ndarray, front: np.ndarray | None = None) -> None:
        """Queue one candidate; `front`: the Pareto set it races against (racing only)."""
        self._queue.append((candidate_id, genome, front))

    def next_result(self, timeout: float | None = None) -> Evaluation | None:
        """Scores the oldest submitted candidate (one process scores one at a time); with a timeout,
        None: nothing here finishes without being waited for."""
        if timeout is not None:
            return None
        candidate_id, genome, front = self._queue.popleft()
        return self.evaluate([(candidate_id, genome)], front=front)[0]

    def evaluate(self, candidates: Sequence[Candidate], on_result=None,
                 front: np.ndarray | None = None) -> list[Evaluation]:
        """Evaluations ordered by id; `on_result(evaluation)` is called as each one finishes; `front`:
        the Pareto set every one of them races against (racing only)."""
        out = []
        for candidate_id, genome in sorted(candidates, key=lambda c: c[0]):
            try:
                result = self.problem.evaluate(candidate_id, genome, **_with_front(front))
            except Exception as exc:  # a candidate that breaks scoring must not end the run
                log.error("candidate %d failed: %s", candidate_id, exc)
                release_device_memory(exc)
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
        import ray

        from evomerge.fitness.compressed import CompressedFitness

        config = RunConfig.model_validate(config_data)
        self.name = f"ray-{index}-pid{os.getpid()}@{ray.util.get_node_ip_address()}"
        # The driver checked the fitness's data hashes before starting the pool: load, don't re-hash.
        self.problem = MergeProblem(config, CompressedFitness.load(fitness_path, check_data=False), worker=self.name)

    def evaluate(self, candidate_id: int, genome: list[float], front: list[list[float]] | None = None) -> dict:
        try:
            genome = np.asarray(genome, dtype=np.float64)
            front = None if front is None else np.asarray(front, dtype=np.float64)
            return asdict(self.problem.evaluate(candidate_id, genome, **_with_front(front)))
        except Exception as exc:  # the candidate's own failure (out of device memory, ...): recorded, not retried
            release_device_memory(exc)
            tasks = list(self.problem.fitness.task_names)
            return asdict(failed_evaluation(candidate_id, tasks, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                                            self.name))

    def ready(self) -> str:
        return self.name


RAY_CONNECT_TIMEOUT = 10.0  # seconds to reach a cluster's address before giving up


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """Fail fast, naming the field, when a Ray cluster's `HOST:PORT` (or `ray://HOST:PORT`) does not answer.

    `ray.init` itself retries an unreachable address for minutes, and one where something else
    listens (the dashboard's port, 8265, for the cluster's, 6379) for as long; a TCP connection and
    the opening of an HTTP/2 exchange (Ray's cluster address is a gRPC server, which answers the
    client's preface with its SETTINGS frame) tell in at most `timeout` seconds. `auto` (the
    address Ray finds on this machine) is left to Ray."""
    import socket

    from evomerge.runs.config import ConfigError

    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"field `workers.address`: {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as connection:
            connection.sendall(_HTTP2_PREFACE + _HTTP2_EMPTY_SETTINGS)
            answer = _read_at_most(connection, 9)  # the server's first frame header: length(3) type(1) flags(1) id(4)
    except OSError as exc:
        reason = "no answer" if isinstance(exc, (TimeoutError, socket.timeout)) else (exc.strerror or str(exc))
        raise ConfigError(f"field `workers.address`: cannot reach a Ray cluster at {address} ({reason} within "
                          f"{timeout:.0f} s); start the cluster, correct the address, or remove it to run a local "
                          "pool") from None
    if len(answer) < 9 or answer[3] != 0x04:  # not a SETTINGS frame: no gRPC server there
        raise ConfigError(f"field `workers.address`: something answers at {address}, but not a Ray cluster (it does "
                          f"not speak gRPC; first bytes {answer[:16]!r}); give the address `ray start --head` prints "
                          "(HEAD:6379 by default; 8265 is the dashboard's port)")


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _read_at_most(connection, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = connection.recv(n - len(data))
        if not chunk:  # closed
            break
        data += chunk
    return data


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Start a local single-node Ray on loopback (no dashboard), or join the cluster at `address`."""
    loopback = not address or _is_loopback(address)
    if loopback:
        # Without this a local Ray on Linux binds to the machine's external address; a local pool
        # stays on loopback. Ray reads the variable when it is imported, so when it was imported
        # already its constant is switched too (the raylet and workers inherit the variable).
        # A cluster started on loopback (`ray start --node-ip-address 127.0.0.1`) needs it too: Ray
        # would otherwise swap 127.0.0.1 for the machine's external address, where nothing listens,
        # and `ray.init` would retry that for minutes.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if loopback:
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


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rstrip("/").rpartition(":")[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class RayBackend:
    """A pool of Ray actors, each holding the base and task vectors once; losing workers (a crash, a
    lost node) costs only the candidates they were scoring, which go to the next live worker
    (`ray_pool.ActorPool`)."""

    def __init__(self, config: RunConfig, fitness):
        import ray

        from evomerge.runs.ray_pool import ActorPool, actor_request

        self.config = config
        self.tasks = list(fitness.task_names)
        workers = config.workers
        init_ray(workers.address, num_cpus=None if workers.address else max(
            os.cpu_count() or 1, workers.num_workers * workers.threads_per_worker))
        request = actor_request(workers, ray.cluster_resources(),
                                f"the Ray cluster at {workers.address}" if workers.address else "this machine")
        # SPREAD: one worker per node before two on one, so a pool uses every node's memory and GPUs.
        options = dict(num_cpus=request.num_cpus, num_gpus=request.num_gpus, max_restarts=-1, max_task_retries=0,
                       scheduling_strategy="SPREAD")
        worker_config = config.model_copy(update={"workers": workers.model_copy(update={"device": request.device})})
        actor_cls = ray.remote(_Worker)
        self.actors = [actor_cls.options(**options).remote(worker_config.model_dump(), str(fitness.path), i)
                       for i in range(request.count)]
        names = ray.get([a.ready.remote() for a in self.actors])
        self.pool = ActorPool(self.actors, names, self.tasks, max_retries=workers.max_retries)

    def submit(self, candidate_id: int, genome: np.ndarray, front: np.ndarray | None = None) -> None:
        """Queue one candidate; `front`: the Pareto set it races against (racing only)."""
        self.pool.submit(candidate_id, genome, front)

    def next_result(self, timeout: float | None = None) -> Evaluation | None:
        """The next submitted candidate to finish (a lost worker's candidate goes to another); with
        `timeout` (seconds), None when none has finished by then."""
        return self.pool.next_result(timeout)

    def evaluate(self, candidates: Sequence[Candidate], on_result=None,
                 front: np.ndarray | None = None) -> list[Evaluation]:
        """Evaluations ordered by id; `on_result(evaluation)` is called as each one finishes; `front`:
        the Pareto set every one of them races against (racing only)."""
        for candidate_id, genome in sorted(candidates, key=lambda c: c[0]):
            self.pool.submit(candidate_id, genome, front)
        results: dict[int, Evaluation] = {}
        for _ in range(len(candidates)):
            evaluation = self.pool.next_result()
            results[evaluation.candidate_id] = evaluation
            if on_result is not None:
                on_result(evaluation)
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
