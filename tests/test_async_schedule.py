"""The asynchronous schedule (`workers.schedule: async`, issue 17 item 2).

References: a hand-written steady-state loop over the optimizer protocol (ask_one / tell_one in the
recorded order) for what the search told; an uninterrupted async run driven through the same
completion order for an interrupted-and-resumed one; a hand-computed schedule of a two-worker
sleeping pool for the busy fraction.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from evomerge.runs.backends import InProcessBackend
from evomerge.runs.config import load_run_config
from evomerge.runs.problem import MergeProblem, bind_space
from evomerge.runs.search import SearchInterrupted, new_optimizer, resume_search, start_search
from evomerge.search.optimizers import OPTIMIZERS, Optimizer, make_optimizer, state_from_dict, state_to_dict
from evomerge.testing import write_run_config

QUIET = dict(progress=False, echo=lambda *a: None)
WORKERS = 3
SETTINGS = {"m2n2": dict(archive_size=4, batch_size=2), "random": dict(batch_size=2), "cma": dict(batch_size=3),
            "nsga2": dict(pop_size=4, steady_state=True)}
STEADY = sorted(n for n in OPTIMIZERS if OPTIMIZERS[n].out_of_order)


# ---------------------------------------------------------------------------- the optimizer protocol
def _accuracy(genome: np.ndarray) -> np.ndarray:
    return np.array([1 - np.mean((genome - 0.3) ** 2), 1 - np.mean((genome - 0.7) ** 2)])


def _steady_loop(opt, out: list, rng, tells: int) -> list[np.ndarray]:
    told = []
    for _ in range(tells):
        while len(out) < 3:
            genome = opt.ask_one()
            if genome is None:  # steady-state pymoo: its first population is out
                assert out
                break
            out.append(genome)
        genome = out.pop(int(rng.integers(len(out))))
        opt.tell_one(genome, _accuracy(genome))
        told.append(genome)
    return told


STEADY_SETTINGS = {"random": dict(batch_size=3), "m2n2": dict(archive_size=4, batch_size=1),
                   "map": dict(batch_size=3, terms="auto", front_pop_size=8, front_generations=3),
                   "cma": dict(batch_size=3), "twopointsde": dict(batch_size=3), "ngopt": dict(batch_size=3, budget=30),
                   "nsga2": dict(pop_size=6, steady_state=True), "nsga3": dict(pop_size=6, steady_state=True),
                   "ga": dict(pop_size=6, steady_state=True)}


def test_the_out_of_order_optimizers_are_the_ones_named():
    assert STEADY == sorted(set(STEADY_SETTINGS) - {"nsga2", "nsga3", "ga"})
    assert not any(OPTIMIZERS[n].takes_out_of_order({}) for n in ("nsga2", "nsga3", "ga", "de"))
    assert not OPTIMIZERS["de"].takes_out_of_order({"steady_state": True})


@pytest.mark.parametrize("name", sorted(STEADY_SETTINGS))
def test_out_of_order_tells_checkpointed_mid_flight_resume_exactly(name):
    """Results told in a random order with three genomes out; a checkpoint with genomes out (and
    rows asked but not handed out) continues exactly like the uninterrupted optimizer."""
    live = make_optimizer(name, 2, (0, 1), 2, seed=1, **STEADY_SETTINGS[name])
    reference = _steady_loop(live, [], np.random.default_rng(0), 20)
    first = make_optimizer(name, 2, (0, 1), 2, seed=1, **STEADY_SETTINGS[name])
    out, rng = [], np.random.default_rng(0)
    told = _steady_loop(first, out, rng, 10)
    restored = Optimizer.from_state(state_from_dict(json.loads(json.dumps(state_to_dict(first.state())))))
    np.testing.assert_array_equal(restored.out, np.array(out))
    told += _steady_loop(restored, out, rng, 10)
    np.testing.assert_array_equal(np.array(told), np.array(reference))
    assert restored.n_evaluations == 20


def test_steady_state_misuse_is_refused():
    with pytest.raises(RuntimeError, match="whole ask"):
        make_optimizer("nsga2", 2, (0, 1), 2, pop_size=4).ask_one()
    opt = make_optimizer("random", 2, (0, 1), 2, batch_size=2)
    genome = opt.ask_one()
    with pytest.raises(RuntimeError, match="ask_one"):
        opt.ask()
    with pytest.raises(ValueError, match="not out"):
        opt.tell_one(genome + 0.5 * (genome < 0.5) - 0.5 * (genome >= 0.5), [0.5, 0.5])
    opt.tell_one(genome, [0.5, 0.5])
    with pytest.raises(ValueError, match="not out"):
        opt.tell_one(genome, [0.5, 0.5])  # told twice


# ---------------------------------------------------------------------------- the search
class ShuffledPool:
    """The in-process pool finishing its candidates in a seeded random order, as workers with uneven
    evaluation times do, or in a given order of candidate ids."""

    def __init__(self, config, fitness, seed: int = 0, order: list[int] | None = None):
        self.inner = InProcessBackend(config, fitness)
        self.flight: dict[int, np.ndarray] = {}
        self.rng, self.order = np.random.default_rng(seed), order

    def submit(self, candidate_id, genome):
        self.flight[candidate_id] = genome

    def next_result(self):
        if self.order is not None:
            candidate_id = self.order.pop(0)
            assert candidate_id in self.flight, (candidate_id, sorted(self.flight))
        else:
            candidate_id = sorted(self.flight)[int(self.rng.integers(len(self.flight)))]
        return self.inner.evaluate([(candidate_id, self.flight.pop(candidate_id))])[0]

    def evaluate(self, candidates, on_result=None):
        return self.inner.evaluate(candidates, on_result)

    def close(self):
        pass


def _pool(monkeypatch, **kwargs):
    monkeypatch.setattr("evomerge.runs.backends.make_backend", lambda config, fitness: ShuffledPool(config, fitness,
                                                                                                      **kwargs))


def _config(root: Path, name: str, optimizer: str = "m2n2", schedule: str = "async", evaluations: int = 12) -> Path:
    return write_run_config(root, name, optimizer={"name": optimizer, "settings": SETTINGS[optimizer], "prescreen": 1},
                            budget={"evaluations": evaluations},
                            workers={"backend": "inprocess", "num_workers": WORKERS, "schedule": schedule})


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]


def log_of(run_dir: Path) -> list[tuple]:
    """What the run computed and in which order it was told (timings and worker names left out)."""
    return sorted((r["told"], r["id"], r["asked_after"], r["generation"], tuple(r["genome"]), r["status"],
                   tuple(sorted(r["objectives"].items()))) for r in records_of(run_dir))


def pareto_of(run_dir: Path) -> list[tuple]:
    data = json.loads((run_dir / "pareto.json").read_text())
    return sorted((m["id"], tuple(sorted(m["objectives"].items()))) for m in data["members"])


def completion_order(run_dir: Path) -> list[int]:
    return [r["id"] for r in sorted(records_of(run_dir), key=lambda r: r["told"])]


@pytest.mark.parametrize("optimizer", ["m2n2", "cma"])
def test_results_are_told_in_completion_order(run_workspace, monkeypatch, optimizer):
    _pool(monkeypatch, seed=1)
    run_dir = start_search(_config(run_workspace, f"async_order_{optimizer}", optimizer), **QUIET)
    records = sorted(records_of(run_dir), key=lambda r: r["told"])
    assert [r["told"] for r in records] == list(range(12))
    order = [r["id"] for r in records]
    assert order != sorted(order) and sorted(order) == list(range(12))  # out of order, every candidate once
    # each free worker got the next genome at once: candidate j was asked after max(0, j - W + 1) results
    assert all(r["asked_after"] == max(0, r["id"] - WORKERS + 1) for r in records)
    # the reference: the optimizer driven by hand through the recorded order asks the logged genomes
    config = load_run_config(run_dir / "config.yaml")
    opt = new_optimizer(config, bind_space(config), 2)  # the run's optimizer, new
    asked: dict[int, np.ndarray] = {}
    tasks = json.loads((run_dir / "pareto.json").read_text())["tasks"]
    for r in records:
        while len(asked) < min(12, r["told"] + WORKERS):
            asked[len(asked)] = opt.ask_one()
        np.testing.assert_array_equal(asked[r["id"]], np.array(r["genome"]))
        responses = np.concatenate([r["responses"][t] for t in tasks]).astype(float)
        opt.tell_one(asked[r["id"]], [r["objectives"][t] for t in tasks], responses)
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))
    assert checkpoints[-1].name == "ckpt-000004.json"  # a round of W results per checkpoint


INTERRUPT_AT = 8
INTERRUPTS = {
    # mid-round: results logged past the last checkpoint, others in flight
    "during evaluations": (MergeProblem, "evaluate", lambda self, candidate_id, genome: candidate_id == INTERRUPT_AT),
    # while the second round's checkpoint is written: that round's results are all past the last checkpoint
    "during checkpoint write": (__import__("evomerge.runs.store", fromlist=["x"]), "write_text_atomic",
                                lambda path, text: path.name == "ckpt-000002.json"),
}


@pytest.mark.parametrize("optimizer,point", [("m2n2", p) for p in INTERRUPTS] + [("nsga2", "during evaluations")])
def test_ctrl_c_then_resume_equals_an_uninterrupted_run_with_the_same_completion_order(run_workspace, monkeypatch,
                                                                                       optimizer, point):
    name = f"async_interrupted_{optimizer}_" + point.replace(" ", "_")
    monkeypatch.setattr(sys.modules[__name__], "INTERRUPT_AT", {"m2n2": 8, "nsga2": 9}[optimizer])
    with monkeypatch.context() as mp:
        _pool(mp, seed=2)
        target, attribute, when = INTERRUPTS[point]
        fired = []
        original = getattr(target, attribute)

        def interrupting(*args, **kwargs):
            if not fired and when(*args, **kwargs):
                fired.append(True)
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        mp.setattr(target, attribute, interrupting)
        with pytest.raises(SearchInterrupted):
            start_search(_config(run_workspace, name, optimizer), **QUIET)
        assert fired
    run_dir = run_workspace / "runs" / name
    before = {r["id"]: r for r in records_of(run_dir)}
    checkpoint = json.loads((sorted((run_dir / "checkpoints").glob("ckpt-*.json"))[-1]).read_text().split("\n", 1)[1])
    assert checkpoint["in_flight"] and checkpoint["counters"]["evaluations"] < len(before)  # in flight, logged past it
    with monkeypatch.context() as mp:
        _pool(mp, seed=7)  # other workers, another completion order from here on
        resume_search(run_dir, **QUIET)
    after = {r["id"]: r for r in records_of(run_dir)}
    assert all(after[i]["time"] == r["time"] for i, r in before.items())  # logged results were replayed, not redone
    with monkeypatch.context() as mp:
        _pool(mp, order=completion_order(run_dir))
        reference = start_search(_config(run_workspace, name + "_reference", optimizer), **QUIET)
    assert log_of(run_dir) == log_of(reference)
    assert pareto_of(run_dir) == pareto_of(reference)


def test_a_finished_async_run_replays_from_its_log_alone(run_workspace, monkeypatch):
    with monkeypatch.context() as mp:
        _pool(mp, seed=4)
        original = start_search(_config(run_workspace, "async_finished"), **QUIET)
    replayed = run_workspace / "runs" / "async_replayed"
    shutil.copytree(original, replayed, ignore=shutil.ignore_patterns("checkpoints", "pareto.json", ".lock"))
    (replayed / "checkpoints").mkdir()
    config = (replayed / "config.yaml").read_text().replace("name: async_finished", "name: async_replayed")
    (replayed / "config.yaml").write_text(config)
    meta = json.loads((replayed / "run.json").read_text())
    meta["source"] = None
    from evomerge.runs.preflight import results_hash, sha256_text
    meta.update(config_sha256=sha256_text(config), results_sha256=results_hash(config))
    (replayed / "run.json").write_text(json.dumps(meta))
    with monkeypatch.context() as mp:
        mp.setattr("evomerge.runs.backends.make_backend", lambda *a: pytest.fail("a replay evaluated a candidate"))
        resume_search(replayed, **QUIET)
    assert (replayed / "evaluations.jsonl").read_bytes() == (original / "evaluations.jsonl").read_bytes()
    assert pareto_of(replayed) == pareto_of(original)
    assert json.loads((replayed / "pareto.json").read_text()) == json.loads((original / "pareto.json").read_text())


def test_an_optimizer_needing_whole_generations_falls_back_with_one_line(run_workspace):
    lines: list[str] = []
    config = write_run_config(run_workspace, "async_fallback", optimizer={"name": "nsga2", "settings": {"pop_size": 4}},
                              budget={"evaluations": 8}, workers={"backend": "inprocess", "schedule": "async"})
    run_dir = start_search(config, progress=False, echo=lines.append)
    fallback = [line for line in lines if "workers.schedule" in line]
    assert fallback == [
        "workers.schedule: async: optimizer nsga2 with pre-screening (optimizer.prescreen: 4) takes results only as "
        "whole generations, so this run evaluates generations (async: cma, m2n2, map, ngopt, random, twopointsde; "
        "ga, nsga2, nsga3 with settings.steady_state: true; each with optimizer.prescreen: 1)"]
    records = records_of(run_dir)
    assert [r["id"] for r in records] == list(range(8)) and all("told" not in r for r in records)
    assert [r["generation"] for r in records] == [0] * 4 + [1] * 4


# ---------------------------------------------------------------------------- the busy fraction
def _benchmark():
    from benchmark_modules import load_benchmark

    return load_benchmark("pool_utilisation")


def test_busy_fraction_of_a_two_worker_sleeping_pool_matches_the_hand_schedule(tmp_path):
    """Candidates 0..3 take 0.6, 0.2, 0.2, 0.4 s; random search asks two at a time; two workers.
    Generations: {0, 1} then {2, 3}: 0.6 + 0.4 = 1.0 s, busy 1.4 / 2.0 = 0.70. Async: worker A runs
    0 (0-0.6); worker B runs 1 (0-0.2), 2 (0.2-0.4), 3 (0.4-0.8): 0.8 s, busy 1.4 / 1.6 = 0.875."""
    bench = _benchmark()
    seconds = {0: 0.6, 1: 0.2, 2: 0.2, 3: 0.4}
    hand = {"generations": ({0: 0.0, 1: 0.0, 2: 0.6, 3: 0.6}, 1.0, 0.70, [1, 0, 2, 3]),
            "async": ({0: 0.0, 1: 0.0, 2: 0.2, 3: 0.4}, 0.8, 0.875, [1, 2, 0, 3])}
    for schedule, (starts, span, busy, order) in hand.items():
        run = bench.sleep_search(tmp_path, schedule, 2, schedule, seconds.__getitem__, 4, optimizer="random",
                                 settings={"batch_size": 2})
        assert run["schedule"] == schedule and run["order"] == order
        first = min(start for start, _ in run["intervals"])
        measured = {r["id"]: None for r in records_of(run["run_dir"])}
        for candidate_id, (start, _) in zip(run["order"], sorted(run["intervals"], key=lambda iv: iv[1])):
            measured[candidate_id] = start - first
        assert measured == pytest.approx(starts, abs=0.05)
        assert run["span"] == pytest.approx(span, abs=0.05)
        assert run["span_busy"] == pytest.approx(busy, abs=0.04)
        assert run["work"] == pytest.approx(1.4, abs=0.03)


@pytest.mark.slow
def test_async_on_a_ray_pool_replays_from_its_log(run_workspace):
    """Two Ray workers finish in whatever order they do; the log says which, and replaying it (the
    checkpoints deleted) reproduces the run without evaluating anything."""
    config = write_run_config(run_workspace, "async_ray", optimizer={"name": "m2n2", "settings": SETTINGS["m2n2"]},
                              budget={"evaluations": 12}, workers={"backend": "ray", "num_workers": 2,
                                                                   "schedule": "async"})
    run_dir = start_search(config, **QUIET)
    records = sorted(records_of(run_dir), key=lambda r: r["told"])
    assert [r["told"] for r in records] == list(range(12)) and sorted(r["id"] for r in records) == list(range(12))
    assert all(r["asked_after"] == max(0, r["id"] - 1) and r["worker"].startswith("ray-") for r in records)
    before = (run_dir / "evaluations.jsonl").read_bytes()
    pareto = json.loads((run_dir / "pareto.json").read_text())
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").mkdir()
    resume_search(run_dir, **QUIET)  # nothing left to evaluate: no pool is started
    assert (run_dir / "evaluations.jsonl").read_bytes() == before
    assert json.loads((run_dir / "pareto.json").read_text()) == pareto
