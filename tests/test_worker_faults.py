"""What a worker asks of a Ray cluster, and a candidate that runs out of device memory.

The resource request is checked against mocked `ray.cluster_resources()` totals (there is no GPU
here) and against Ray's own GPU assignment on a local Ray that declares two GPUs: each worker gets
its own `CUDA_VISIBLE_DEVICES`, so `cuda` in one worker is never another's GPU. Out of memory is
simulated on the CPU by raising torch's `OutOfMemoryError` for one candidate: it is recorded as
failed with the reason and the run goes on, its other candidates equal to those of a run without
the fault (the independent reference).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch

from evomerge.runs.backends import _Worker, check_ray_address
from evomerge.runs.config import ConfigError, WorkersConfig
from evomerge.runs.problem import Evaluation, MergeProblem
from evomerge.runs.ray_pool import ActorPool, ActorRequest, WorkersLost, actor_request
from evomerge.runs.search import start_search
from evomerge.testing import write_run_config

QUIET = dict(progress=False, echo=lambda *a: None)
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.65 GiB total capacity; 21.12 GiB already allocated)"


@pytest.mark.parametrize("workers,cluster,expected", [
    # a GPU cluster: one GPU per worker, each scores on the GPU Ray gave it
    (dict(num_workers=4), {"CPU": 64, "GPU": 8}, ActorRequest(4, 1, 1, "cuda")),
    # an index names a GPU on the driver's machine, not the one Ray assigns on a worker's node
    (dict(num_workers=2, device="cuda:1"), {"CPU": 8, "GPU": 2}, ActorRequest(2, 1, 1, "cuda")),
    # fewer GPUs than workers: fewer workers, never two on one GPU
    (dict(num_workers=4, threads_per_worker=2), {"CPU": 16, "GPU": 2}, ActorRequest(2, 2, 1, "cuda")),
    # no GPU in the cluster: CPU workers, told so (a visible but unassigned GPU is not theirs to take)
    (dict(num_workers=2), {"CPU": 4}, ActorRequest(2, 1, 0, "cpu")),
    (dict(num_workers=2, device="cpu"), {"CPU": 4, "GPU": 4}, ActorRequest(2, 1, 0, "cpu")),
])
def test_actor_request(workers, cluster, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="evomerge.runs.ray_pool"):
        assert actor_request(WorkersConfig(**workers), cluster) == expected
    assert ("starting 2 workers, one GPU each" in caplog.text) == (expected.count < workers["num_workers"])


def test_actor_request_refuses_what_the_cluster_lacks():
    with pytest.raises(ConfigError, match=r"field `workers.device`: 'cuda' asked for, but the Ray cluster at "
                                          r"10.0.0.5:6379 has no GPU \(its resources: CPU=8\)"):
        actor_request(WorkersConfig(device="cuda"), {"CPU": 8, "memory": 1e9}, "the Ray cluster at 10.0.0.5:6379")
    with pytest.raises(ConfigError, match=r"field `workers.num_workers`: 3 workers x 2 CPU \(`threads_per_worker`\) "
                                          r"need 6 CPUs, but the Ray cluster has 4"):
        actor_request(WorkersConfig(num_workers=3, threads_per_worker=2), {"CPU": 4})


def test_ray_gives_each_gpu_worker_its_own_gpu(monkeypatch):
    """Ray's own assignment, on a local Ray that declares two GPUs (none is needed to assign them)."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # on loopback, as `init_ray` starts a local pool
    import ray
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        check_ray_address(ray.get_runtime_context().gcs_address)  # a real cluster address passes the check
        request = actor_request(WorkersConfig(num_workers=3), ray.cluster_resources())
        assert request == ActorRequest(2, 1, 1, "cuda")

        @ray.remote
        class Probe:
            def visible(self) -> str | None:
                return os.environ.get("CUDA_VISIBLE_DEVICES")

        options = dict(num_cpus=request.num_cpus, num_gpus=request.num_gpus)
        probes = [Probe.options(**options).remote() for _ in range(request.count)]
        assert sorted(ray.get([p.visible.remote() for p in probes])) == ["0", "1"]  # one GPU each, not shared
        # a third GPU worker would wait for a GPU, not share one: the request never asks for it
        extra = Probe.options(**options).remote()
        ready, _ = ray.wait([extra.visible.remote()], timeout=3)
        assert not ready
    finally:
        ray.shutdown()


@pytest.fixture
def listener():
    """A loopback TCP server that answers each connection with `reply` (None: never answers)."""
    servers = []

    def serve(reply: bytes | None) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def answer():
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                servers.append(connection)
                if reply is not None:
                    connection.recv(1024)
                    connection.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    yield serve
    for server in servers:
        server.close()


def test_an_address_where_no_ray_cluster_answers_fails_in_seconds(listener):
    """ray.init waits minutes on these (measured: still connecting after 150 s to a silent port)."""
    started = time.perf_counter()
    dashboard = listener(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # what port 8265 would say
    with pytest.raises(ConfigError, match=rf"field `workers.address`: something answers at {dashboard}, but not a "
                                          r"Ray cluster \(it does not speak gRPC; first bytes b'HTTP/1.1 "
                                          r"'\); give the address `ray start --head` prints"):
        check_ray_address(dashboard)
    silent = listener(None)
    with pytest.raises(ConfigError, match=rf"cannot reach a Ray cluster at {silent} \(no answer within 1 s\)"):
        check_ray_address(silent, timeout=1)
    assert time.perf_counter() - started < 10


def test_an_actor_that_runs_out_of_memory_reports_the_candidate_failed(monkeypatch):
    """The Ray actor's body, without Ray: the reason comes back in the record, the cache is emptied."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    class Problem:
        class fitness:
            task_names = ["a", "b"]

        def evaluate(self, candidate_id, genome):
            if candidate_id == 3:
                raise torch.cuda.OutOfMemoryError(OOM)
            return Evaluation(candidate_id, {"a": 0.5, "b": 0.25}, {"a": 0.1, "b": 0.1}, {"a": [1], "b": [0]}, 2)

    worker = _Worker.__new__(_Worker)
    worker.name, worker.problem = "ray-0-pid1@127.0.0.1", Problem()
    failed = Evaluation(**worker.evaluate(3, [0.5]))
    assert failed.status == "failed" and failed.error.startswith(f"OutOfMemoryError: {OOM}\nTraceback")
    assert np.isnan(failed.objectives["a"]) and failed.worker == "ray-0-pid1@127.0.0.1"
    assert emptied == [True]
    assert Evaluation(**worker.evaluate(4, [0.5])).objectives == {"a": 0.5, "b": 0.25}  # the worker goes on


def test_a_candidate_out_of_memory_is_recorded_and_the_run_goes_on(run_workspace, monkeypatch):
    reference = start_search(write_run_config(run_workspace, "oom_ref"), **QUIET)
    evaluate = MergeProblem.evaluate

    def short_of_memory(self, candidate_id, genome):
        if candidate_id == 7:
            raise torch.cuda.OutOfMemoryError(OOM)
        return evaluate(self, candidate_id, genome)

    monkeypatch.setattr(MergeProblem, "evaluate", short_of_memory)
    run_dir = start_search(write_run_config(run_workspace, "oom"), **QUIET)
    records = {r["id"]: r for r in map(json.loads, (run_dir / "evaluations.jsonl").read_text().splitlines())}
    ref = {r["id"]: r for r in map(json.loads, (reference / "evaluations.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(24))  # the whole budget ran
    assert records[7]["status"] == "failed" and records[7]["error"] == f"OutOfMemoryError: {OOM}"
    assert all(records[i]["status"] == "ok" for i in records if i != 7)
    # generations 0 and 1 were asked before the failure was told: the same genomes and scores as without it
    for i in [*range(7), *range(8, 12)]:
        assert records[i]["genome"] == ref[i]["genome"] and records[i]["objectives"] == ref[i]["objectives"]
    assert records[7]["genome"] == ref[7]["genome"]
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert 7 not in {m["id"] for m in pareto["members"]} and pareto["evaluations"] == 24


# ---------------------------------------------------------------------------- the pool, on a fake Ray
class FakeRayError(Exception):
    """Stands for ray.exceptions.RayError (ActorDiedError, ActorUnavailableError, ...)."""


class FakeRef:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeRay(types.ModuleType):
    """`ray.wait` / `ray.get` over refs that are resolved when made (the actors below answer at once)."""

    def __init__(self):
        super().__init__("ray")
        self.exceptions = types.ModuleType("ray.exceptions")
        self.exceptions.RayError = FakeRayError

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        if refs:
            return [refs[0]], refs[1:]
        raise AssertionError("waited on nothing")

    @staticmethod
    def get(ref):
        if ref.error is not None:
            raise ref.error
        return ref.value


class FakeActor:
    """A worker that scores a candidate as (id / 10, 1 - id / 10), or is lost while scoring `lost_on`
    and then answers `ready` only after `down_for` probes (never when None)."""

    def __init__(self, name: str, lost_on=(), down_for=None):
        self.name, self.lost_on, self.down_for, self.down = name, set(lost_on), down_for, False
        self.evaluate = types.SimpleNamespace(remote=self._evaluate)
        self.ready = types.SimpleNamespace(remote=self._ready)
        self.scored: list[int] = []

    def _evaluate(self, candidate_id, genome):
        assert not self.down, f"{self.name} was given a candidate while lost"
        if candidate_id in self.lost_on:
            self.down, self.probes = True, 0
            return FakeRef(error=FakeRayError("the actor died"))
        self.scored.append(candidate_id)
        x = candidate_id / 10
        return FakeRef(asdict(Evaluation(candidate_id, {"a": x, "b": 1 - x}, {"a": 0.0, "b": 0.0}, {}, 1,
                                         worker=self.name)))

    def _ready(self):
        self.probes += 1
        if self.down_for is None or self.probes <= self.down_for:
            return FakeRef(error=FakeRayError("The actor is restarting"))
        self.down = False
        return FakeRef(self.name + "-restarted")


@pytest.fixture
def fake_ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", fake.exceptions)
    monkeypatch.setattr("evomerge.runs.ray_pool.PROBE_INTERVAL", 0.01)
    return fake


def _pool(actors, **kwargs):
    return ActorPool(actors, [a.name for a in actors], ["a", "b"], **kwargs)


def _drain(pool, n):
    return {e.candidate_id: e for e in (pool.next_result() for _ in range(n))}


def test_a_lost_workers_candidate_goes_to_a_live_one(fake_ray):
    w0, w1 = FakeActor("w0"), FakeActor("w1", lost_on={1})  # w1's node is gone for good
    pool = _pool([w0, w1], max_retries=2)
    for candidate_id in range(5):
        pool.submit(candidate_id, np.zeros(2))
    results = _drain(pool, 5)
    assert sorted(results) == list(range(5)) and all(e.status == "ok" for e in results.values())
    assert results[1].retries == ["w1 lost (FakeRayError)"] and results[1].worker == "w0"
    assert results[1].objectives == {"a": 0.1, "b": 0.9}
    assert all(results[i].retries == [] for i in (0, 2, 3, 4)) and sorted(w0.scored) == list(range(5))


def test_a_candidate_that_loses_every_worker_fails_after_max_retries(fake_ray):
    # candidate 2 takes down whichever worker scores it; Ray brings each back after one probe
    w0, w1 = FakeActor("w0", lost_on={2}, down_for=1), FakeActor("w1", lost_on={2}, down_for=1)
    pool = _pool([w0, w1], max_retries=1)
    for candidate_id in range(4):
        pool.submit(candidate_id, np.zeros(2))
    results = _drain(pool, 4)
    failed = results[2]
    assert failed.status == "failed" and np.isnan(failed.objectives["a"])
    assert failed.error == "lost its worker 2 times: w0 lost (FakeRayError); w1 lost (FakeRayError)"
    assert failed.retries == ["w0 lost (FakeRayError)", "w1 lost (FakeRayError)"]
    assert all(results[i].status == "ok" for i in (0, 1, 3))
    pool.submit(4, np.zeros(2))  # both workers were lost once: one is back (under its new name) to score it
    assert pool.next_result().status == "ok"
    assert {"w0-restarted", "w1-restarted"} & set(pool.names)


def test_no_live_worker_stops_the_pool_with_the_reason(fake_ray):
    pool = _pool([FakeActor("w0", lost_on={0})], max_retries=3, restart_wait=0.2)
    pool.submit(0, np.zeros(2))
    with pytest.raises(WorkersLost, match=r"no live worker for 0 s: all 1 workers were lost \(w0\).*1 candidates "
                                          r"were waiting.*`evomerge resume RUN_DIR`"):
        pool.next_result()


def test_next_result_with_a_timeout_returns_none_when_nothing_finished(fake_ray, monkeypatch):
    pool = _pool([FakeActor("w0")], max_retries=0)
    pool.submit(0, np.zeros(2))
    with monkeypatch.context() as mp:  # the worker is still scoring
        mp.setattr(FakeRay, "wait", staticmethod(lambda refs, num_returns=1, timeout=None: ([], refs)))
        assert pool.next_result(timeout=0) is None
    assert pool.next_result(timeout=0).candidate_id == 0
