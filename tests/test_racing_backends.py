"""Racing (`fitness.adaptive.racing`, issue 16 item 3) on every backend: the Pareto set a candidate
races against travels with its job, fixed when the search hands the candidate out.

References: a brute-force Pareto set (numpy over the logged objectives, not the search's archive)
of the results the documented rule says a candidate races against (schedule `generations`: every
result of the earlier generations; `async`: the first `asked_after` results told), handed to a
fresh `MergeProblem` for each candidate; the in-process backend for the Ray pool's code (ActorPool,
RayBackend's submit/evaluate, the actor body) run over a fake Ray that finishes jobs last-in
first-out; an uninterrupted run for an interrupted-and-resumed one. The real Ray pool is in the
slow suite.
"""
from __future__ import annotations

import json
import pickle
import sys
import types

import numpy as np
import pytest

from evomerge.runs.backends import RayBackend, _Worker
from evomerge.runs.config import load_run_config
from evomerge.runs.problem import MergeProblem
from evomerge.runs.ray_pool import ActorPool
from evomerge.runs.search import SearchInterrupted, resume_search, start_search
from evomerge.testing import write_run_config

QUIET = dict(progress=False, echo=lambda *a: None)
ADAPTIVE = {"batch_size": 4, "max_items": 12, "min_items": 4, "se_threshold": 0.03, "racing": True, "z": 0.5}
KEYS = ("id", "genome", "objectives", "stderr", "responses", "adaptive", "item_evaluations", "status")


def _config(root, name, *, schedule="generations", backend="inprocess", num_workers=1, evaluations=18):
    optimizer = ({"name": "nsga2", "settings": {"pop_size": 6}} if schedule == "generations"
                 else {"name": "m2n2", "settings": {"archive_size": 4, "batch_size": 2}, "prescreen": 1})
    return write_run_config(root, name, fitness={"name": "fitness/mc", "adaptive": ADAPTIVE}, optimizer=optimizer,
                            budget={"evaluations": evaluations},
                            workers={"backend": backend, "num_workers": num_workers, "schedule": schedule})


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]


def _results(run_dir) -> list[dict]:
    """What each candidate was scored to (timings, worker names and order of completion left out)."""
    return sorted(({k: r[k] for k in KEYS} for r in _records(run_dir)), key=lambda r: r["id"])


def _pareto_rows(records, tasks) -> np.ndarray:
    """Brute force: the rows of the ok records no other ok record dominates (maximisation)."""
    rows = [[r["objectives"][t] for t in tasks] for r in records if r["status"] == "ok"]
    if not rows:
        return np.zeros((0, len(tasks)))
    F = np.array(rows, dtype=np.float64)
    keep = [i for i in range(len(F)) if not any(np.all(F[j] >= F[i]) and np.any(F[j] > F[i]) for j in range(len(F)))]
    return F[keep]


def _check_against_brute_force(run_dir, raced_against) -> None:
    """Every logged candidate equals a fresh MergeProblem scoring its genome against the brute-force
    Pareto set of `raced_against(record, records)`; some candidates were raced out."""
    from evomerge.runs.preflight import load_fitness

    config = load_run_config(run_dir / "config.yaml")
    fitness = load_fitness(config)
    tasks = list(fitness.task_names)
    problem = MergeProblem(config, fitness)
    records = _records(run_dir)
    stops = []
    for r in records:
        front = _pareto_rows(raced_against(r, records), tasks)
        again = problem.evaluate(r["id"], np.asarray(r["genome"]), front=front)
        assert again.objectives == r["objectives"] and again.responses == r["responses"], r["id"]
        assert again.adaptive == r["adaptive"] and again.item_evaluations == r["item_evaluations"], r["id"]
        stops += [entry["stop"] for entry in r["adaptive"].values()]
    assert "raced" in stops and "se" in stops  # racing stopped some candidates, not all


# ---------------------------------------------------------------------------- the Ray pool's code, fake Ray
class _Ref:
    def __init__(self, run):
        self.run = run  # what the actor does when the result is fetched


class _LastInFirstOutRay(types.ModuleType):
    """`ray.wait` hands back the job dispatched last (so results arrive out of submission order),
    `ray.get` runs it on its actor; arguments and results go through pickle, as Ray sends them."""

    def __init__(self):
        super().__init__("ray")
        self.exceptions = types.ModuleType("ray.exceptions")
        self.exceptions.RayError = type("RayError", (Exception,), {})

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return [refs[-1]], refs[:-1]

    @staticmethod
    def get(ref):
        return ref.run()


class _Actor:
    def __init__(self, body: _Worker):
        self.body = body
        self.jobs: list[tuple] = []
        self.evaluate = types.SimpleNamespace(remote=self._remote)
        self.ready = types.SimpleNamespace(remote=lambda: _Ref(self._lost))  # a lost worker stays lost

    def _remote(self, *job):
        self.jobs.append(job)
        args = pickle.loads(pickle.dumps(job))
        return _Ref(lambda: pickle.loads(pickle.dumps(self.body.evaluate(*args))))

    @staticmethod
    def _lost():
        raise sys.modules["ray.exceptions"].RayError("the actor is restarting")


class _FakeRayPool:
    """RayBackend's own submit / next_result / evaluate over an ActorPool of two actor bodies
    (`_Worker`, each with its MergeProblem), on the fake Ray above."""

    submit = RayBackend.submit
    next_result = RayBackend.next_result
    evaluate = RayBackend.evaluate

    def __init__(self, config, fitness):
        bodies = []
        for i in range(2):
            body = _Worker.__new__(_Worker)
            body.name = f"fake-ray-{i}"
            body.problem = MergeProblem(config, fitness, worker=body.name)
            bodies.append(body)
        self.actors = [_Actor(b) for b in bodies]
        self.pool = ActorPool(self.actors, [b.name for b in bodies], list(fitness.task_names), max_retries=0)
        _FakeRayPool.made.append(self)

    def close(self):
        pass


@pytest.fixture
def fake_ray_pool(monkeypatch):
    fake = _LastInFirstOutRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", fake.exceptions)
    _FakeRayPool.made = []
    from evomerge.runs.backends import InProcessBackend

    monkeypatch.setattr("evomerge.runs.backends.make_backend", lambda config, fitness: (
        InProcessBackend(config, fitness) if config.workers.backend == "inprocess" else _FakeRayPool(config, fitness)))
    return _FakeRayPool


def test_generations_race_the_set_before_them_and_a_ray_pool_gives_the_in_process_results(run_workspace,
                                                                                          fake_ray_pool):
    inprocess = start_search(_config(run_workspace, "race_gen_inprocess"), **QUIET)
    pooled = start_search(_config(run_workspace, "race_gen_pool", backend="ray", num_workers=2), **QUIET)
    assert _results(pooled) == _results(inprocess)
    completion = [r["id"] for r in _records(pooled)]
    assert completion != sorted(completion)  # the pool finished candidates out of order
    jobs = [job for actor in fake_ray_pool.made[0].actors for job in actor.jobs]
    assert len(jobs) == 18 and all(len(job) == 3 for job in jobs)  # (id, genome, front): the set went with each job
    assert {len(job[2]) for job in jobs if job[0] < 6} == {0}  # generation 0: nothing to race against yet
    # the documented rule: every candidate of generation g races the Pareto set of generations < g
    _check_against_brute_force(inprocess, lambda r, records: [x for x in records if x["generation"] < r["generation"]])


def test_async_candidates_race_the_set_when_asked_on_either_backend(run_workspace, fake_ray_pool):
    pooled = start_search(_config(run_workspace, "race_async_pool", schedule="async", backend="ray", num_workers=2,
                                  evaluations=14), **QUIET)
    records = _records(pooled)
    assert [r["id"] for r in sorted(records, key=lambda r: r["told"])] != list(range(14))  # out of order
    _check_against_brute_force(pooled, lambda r, records: [x for x in records if x["told"] < r["asked_after"]])
    # The in-process backend scores in submission order: the same rule, checked the same way.
    inprocess = start_search(_config(run_workspace, "race_async_inprocess", schedule="async", num_workers=2,
                                     evaluations=14), **QUIET)
    _check_against_brute_force(inprocess, lambda r, records: [x for x in records if x["told"] < r["asked_after"]])


def test_an_interrupted_async_racing_run_resumes_to_the_uninterrupted_one(run_workspace, monkeypatch):
    """Interrupted as candidate 8 is scored, the first after the checkpoint of 8 results, with four in
    flight, asked after 5, 6, 7 and 8 results: the resumed run rebuilds each one's set from the log
    (racing 8 and 9 against the checkpoint's archive instead changes their results)."""
    reference = start_search(_config(run_workspace, "race_async_ref", schedule="async", num_workers=4,
                                     evaluations=15), **QUIET)
    fired = []
    evaluate = MergeProblem.evaluate

    def interrupting(self, candidate_id, genome, **kwargs):
        if candidate_id == 8 and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return evaluate(self, candidate_id, genome, **kwargs)

    config = _config(run_workspace, "race_async_resumed", schedule="async", num_workers=4, evaluations=15)
    with monkeypatch.context() as mp:
        mp.setattr(MergeProblem, "evaluate", interrupting)
        with pytest.raises(SearchInterrupted):
            start_search(config, **QUIET)
    run_dir = run_workspace / "runs" / "race_async_resumed"
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))
    state = json.loads(checkpoints[-1].read_text().split("\n", 1)[1])
    assert state["counters"]["evaluations"] == 8
    assert [(i, a) for i, _, a in state["in_flight"]] == [(8, 5), (9, 6), (10, 7), (11, 8)]
    resume_search(run_dir, **QUIET)
    assert _results(run_dir) == _results(reference)
    told = lambda d: sorted((r["id"], r["told"], r["asked_after"]) for r in _records(d))  # noqa: E731
    assert told(run_dir) == told(reference)
    assert any(e["stop"] == "raced" for r in _records(reference) for e in r["adaptive"].values())


def test_a_retried_candidate_races_the_same_set_on_its_next_worker(monkeypatch):
    """A worker lost while scoring: the candidate goes to the next worker with its front."""
    fake = _LastInFirstOutRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", fake.exceptions)
    seen: list[tuple] = []

    class Body:
        def __init__(self, lost):
            self.lost = lost

        def evaluate(self, candidate_id, genome, front=None):
            seen.append((self.lost, candidate_id, front))
            if self.lost:
                self.lost = False
                raise fake.exceptions.RayError("the actor died")
            from dataclasses import asdict

            from evomerge.runs.problem import Evaluation
            return asdict(Evaluation(candidate_id, {"a": 0.5}, {"a": 0.0}, {}, 1))

    actors = [_Actor(Body(lost=True)), _Actor(Body(lost=False))]
    pool = ActorPool(actors, ["w0", "w1"], ["a"], max_retries=1)
    pool.submit(0, np.array([0.1]), np.array([[0.25], [0.75]]))
    result = pool.next_result()
    assert result.status == "ok" and result.retries == ["w0 lost (RayError)"]
    assert seen == [(True, 0, [[0.25], [0.75]]), (False, 0, [[0.25], [0.75]])]
    pool.submit(1, np.array([0.2]))  # no racing: no front in the job
    assert pool.next_result().candidate_id == 1 and actors[1].jobs[-1] == (1, [0.2])


@pytest.mark.slow
def test_a_real_ray_pool_races_like_the_in_process_backend(run_workspace):
    inprocess = start_search(_config(run_workspace, "race_gen_ref"), **QUIET)
    ray_run = start_search(_config(run_workspace, "race_gen_ray", backend="ray", num_workers=2), **QUIET)
    assert _results(ray_run) == _results(inprocess)
    assert {r["worker"].split("-")[0] for r in _records(ray_run)} == {"ray"}
    # async on Ray: the results arrive in whatever order they do; each candidate raced the set when asked
    async_run = start_search(_config(run_workspace, "race_async_ray", schedule="async", backend="ray", num_workers=2,
                                     evaluations=12), **QUIET)
    _check_against_brute_force(async_run, lambda r, records: [x for x in records if x["told"] < r["asked_after"]])
