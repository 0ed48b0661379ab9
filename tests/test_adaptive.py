"""Adaptive evaluation (evomerge/fitness/adaptive.py): Fisher information, batch selection, the
stopping rule, racing, determinism and resume, and the evaluation record's fields."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evomerge.fitness.adaptive import (
    AdaptiveSettings,
    AdaptiveTest,
    adaptive_estimate,
    cannot_reach,
    fisher_information,
    population_rates,
    run_adaptive,
    select_batch,
    separate_finalists,
)
from evomerge.fitness.estimators import pirt_estimate
from evomerge.fitness.irt import IRTParams


def bank_1d(a, b, pinned=None, theta=(-1.0, 0.0, 1.0)):
    return IRTParams(np.array(a, float), np.array(b, float), np.array(theta, float),
                     None if pinned is None else np.array(pinned, bool))


def test_fisher_information_2pl_hand_worked():
    # a = 1.5, b = 0.5, theta = 1: z = 1.5 (1 - 0.5) = 0.75; e^-0.75 = 0.4723665527410147;
    # p = 1 / 1.4723665527410147 = 0.6791786991753931; p (1 - p) = 0.2178949937...; a^2 p (1 - p) = 2.25 x that.
    info = fisher_information(1.0, bank_1d([1.5], [0.5]))
    assert info.shape == (1,)
    assert info[0] == pytest.approx(2.25 * 0.6791786991753931 * (1 - 0.6791786991753931), rel=1e-12)
    assert info[0] == pytest.approx(0.49026373597, rel=1e-9)
    # Two dimensions: a = (1, 2), b = 0, theta = (0.5, -0.25): a . theta = 0, so p = 1/2 and the
    # information is a a^T / 4.
    params = IRTParams(np.array([[1.0, 2.0]]), np.array([0.0]), np.zeros((2, 2)))
    info2 = fisher_information(np.array([0.5, -0.25]), params)
    np.testing.assert_allclose(info2[0], np.array([[0.25, 0.5], [0.5, 1.0]]), rtol=0, atol=1e-15)


def test_select_batch_one_dimension_takes_the_most_informative_ties_by_index():
    # At theta = 0 the information is a^2 p (1 - p): items 1 and 4 (a = 2, b = 0) give 1.0 each,
    # item 0 gives 0.25, item 3 0.0625, item 2 (b = 3: p = sigmoid(-6)) 4 x 0.00247 = 0.0099;
    # item 5 would give 2.25 but is pinned.
    params = bank_1d([1, 2, 2, 0.5, 2, 3], [0, 0, 3, 0, 0, 0], pinned=[0, 0, 0, 0, 0, 1])
    assert select_batch(0.0, params, [], 2).tolist() == [1, 4]  # the tie goes to the lower index first
    assert select_batch(0.0, params, [], 3).tolist() == [1, 4, 0]
    assert select_batch(0.0, params, [1], 2).tolist() == [4, 0]  # administered items are skipped
    assert select_batch(0.0, params, [], 10).tolist() == [1, 4, 0, 3, 2]  # only 5 unpinned items
    # At theta = 3 item 2 (b = 3: p = 1/2, information 1.0) beats items 1 and 4 (p = sigmoid(6)).
    assert select_batch(3.0, params, [], 1).tolist() == [2]


def test_select_batch_two_dimensions_is_d_optimal_not_top_k():
    # theta = 0, b = 0: w = 1/4 for every item. Items: (1, 0), (0, 0.9), (1, 0).
    # First pick: gains log(1 + 0.25 |a|^2 ) = log 1.25, log 1.2025, log 1.25 -> item 0 (tie with 2, lower index).
    # Then M = diag(1.25, 1): item 1 gains log(1 + 0.25 x 0.81) = log 1.2025, item 2 log(1 + 0.25 / 1.25) = log 1.2
    # -> item 1, although item 2 alone carries more information (the top-2 by own information is [0, 2]).
    params = IRTParams(np.array([[1.0, 0.0], [0.0, 0.9], [1.0, 0.0]]), np.zeros(3), np.zeros((2, 2)))
    assert select_batch(np.zeros(2), params, [], 2).tolist() == [0, 1]
    assert select_batch(np.zeros(2), params, [0], 1).tolist() == [1]


def test_adaptive_estimate_equals_pirt_when_pinned_items_follow_the_ability():
    rng = np.random.default_rng(0)
    params = bank_1d(rng.uniform(0.5, 2.0, 40), rng.normal(0, 1, 40), pinned=np.arange(40) < 5,
                     theta=rng.normal(0, 1, 12))
    items = np.array([7, 3, 19, 30, 11, 25])
    y = np.array([1, 0, 1, 1, 0, 1])
    ours = adaptive_estimate(y, items, params, pinned="irt")
    ref = pirt_estimate(y, items, params)  # the existing p-IRT (items in any order)
    assert ours.value == pytest.approx(ref.value, abs=1e-12) and ours.stderr == pytest.approx(ref.stderr, abs=1e-12)
    # "population": unseen pinned items (0..4 here, item 3 is seen) are predicted by their smoothed rate
    # among the 12 calibration models, 12.5 / 13 (all right) or 0.5 / 13 (all wrong), which does not move
    # with the candidate's ability; unpinned items keep the calibration models' mean probability.
    pop = adaptive_estimate(y, items, params)
    probs = 1 / (1 + np.exp(-(params.discrimination[None, :] * (params.theta[:, None] - params.difficulty[None, :]))))
    mean = probs.mean(axis=0)
    rates = np.where(np.arange(40) < 5, np.where(mean > 0.5, 12.5 / 13, 0.5 / 13), mean)
    np.testing.assert_allclose(population_rates(params), rates, rtol=1e-12)
    pinned_unseen = [0, 1, 2, 4]
    shift = (rates[pinned_unseen].sum()
             - (1 / (1 + np.exp(-params.discrimination * (ref.theta - params.difficulty))))[pinned_unseen].sum()) / 40
    assert pop.value == pytest.approx(ref.value + shift, abs=1e-9)


def _bank(n=60, seed=1, pinned=5):
    rng = np.random.default_rng(seed)
    return bank_1d(rng.uniform(0.5, 2.5, n), rng.normal(0, 1.2, n), pinned=np.arange(n) < pinned,
                   theta=rng.normal(0, 1, 20))


def _answers(params, theta, seed=2):
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-params.discrimination * (theta - params.difficulty)))
    return (rng.random(params.n_items) < p).astype(int)


def test_stopping_rule_se_budget_min_items_exhausted():
    params = _bank()
    y = _answers(params, 0.3)
    score = {"t": lambda batch: y[batch]}
    # The se after each batch, with no stop; then a threshold between the 3rd and 4th.
    free = AdaptiveSettings(batch_size=4, max_items=40, min_items=0, se_threshold=1e-9)
    ses = []
    test = AdaptiveTest()
    while test.stop is None:
        test.record(b := test.next_batch(params, free), y[b], params, free)
        ses.append(test.stderr)
    assert test.stop == "budget" and test.used == 40 and len(ses) == 10
    assert all(later < earlier for earlier, later in zip(ses, ses[1:]))  # more items, smaller se (here)
    threshold = (ses[2] + ses[3]) / 2
    got = run_adaptive(score, {"t": params}, AdaptiveSettings(batch_size=4, max_items=40, min_items=0,
                                                               se_threshold=threshold))["t"]
    assert (got.stop, got.used, got.stderr) == ("se", 16, ses[3])
    # min_items holds the se rule back
    got = run_adaptive(score, {"t": params}, AdaptiveSettings(batch_size=4, max_items=40, min_items=24,
                                                               se_threshold=threshold))["t"]
    assert (got.stop, got.used) == ("se", 24)
    # the last batch is cut to the budget: 4 + 4 + 2
    got = run_adaptive(score, {"t": params}, AdaptiveSettings(batch_size=4, max_items=10, min_items=0,
                                                               se_threshold=1e-9))["t"]
    assert (got.stop, got.used, got.batches) == ("budget", 10, 3)
    # fewer unpinned items than the budget
    small = _bank(n=12, pinned=4)
    y12 = _answers(small, 0.0)
    got = run_adaptive({"t": lambda b: y12[b]}, {"t": small}, AdaptiveSettings(batch_size=5, max_items=60, min_items=0,
                                                                               se_threshold=1e-9))["t"]
    assert (got.stop, got.used) == ("exhausted", 8) and not set(got.items) & {0, 1, 2, 3}


def test_racing_on_a_hand_made_pareto_set():
    front = np.array([[0.8, 0.5], [0.6, 0.7], [np.nan, np.nan]])
    assert cannot_reach([0.7, 0.45], front)  # below (0.8, 0.5) in both
    assert cannot_reach([0.5, 0.7], front)  # equal to (0.6, 0.7) in one, below in the other
    assert not cannot_reach([0.6, 0.7], front)  # equal to a member: not dominated
    assert not cannot_reach([0.85, 0.4], front)  # beyond the set in one task
    assert not cannot_reach([0.7, 0.45], np.zeros((0, 2)))  # empty set: nothing to race against
    # A weak candidate against a strong set stops early with reason "raced"; without racing it runs on.
    params = _bank()
    weak = {t: (lambda b, y=_answers(params, -2.0, seed=k): y[b]) for k, t in enumerate(["a", "b"])}
    settings = AdaptiveSettings(batch_size=5, max_items=40, min_items=10, se_threshold=1e-9, racing=True)
    strong = np.array([[0.95, 0.95]])
    raced = run_adaptive(weak, {"a": params, "b": params}, settings, front=strong)
    assert {t.stop for t in raced.values()} == {"raced"} and all(t.used < 40 for t in raced.values())
    upper = np.array([raced[t].upper(settings.z) for t in ("a", "b")])
    assert np.all(upper < 0.95)
    plain = run_adaptive(weak, {"a": params, "b": params}, AdaptiveSettings(batch_size=5, max_items=40, min_items=10,
                                                                            se_threshold=1e-9), front=strong)
    assert {t.stop for t in plain.values()} == {"budget"}
    # A strong candidate is never raced out by a weaker set.
    good = {t: (lambda b, y=np.ones(60, int): y[b]) for t in ("a", "b")}
    assert {t.stop for t in run_adaptive(good, {"a": params, "b": params}, settings,
                                         front=np.array([[0.3, 0.3]])).values()} == {"budget"}


def test_finalists_get_items_until_their_intervals_separate():
    params = _bank(n=200, pinned=0)
    answers = {0: _answers(params, 0.6, seed=3), 1: _answers(params, 0.1, seed=4)}  # accuracies 0.70, 0.53
    settings = AdaptiveSettings(batch_size=5, max_items=10, min_items=0, se_threshold=1e-9, finalist_max_items=150)
    tests = {cid: run_adaptive({"t": lambda b, y=y: y[b]}, {"t": params}, settings) for cid, y in answers.items()}
    # after 10 items both read 0.649 +- 0.066: the intervals overlap
    assert tests[0]["t"].value == pytest.approx(tests[1]["t"].value) and tests[0]["t"].used == 10
    state, info = separate_finalists(tests, lambda cid: {"t": lambda b: answers[cid][b]}, {"t": params}, settings,
                                     budget=400)
    assert info["separated"] and info["leader"] == 0 and info["items"] > 0
    lo0 = state[0]["t"].value - settings.z * state[0]["t"].stderr
    hi1 = state[1]["t"].value + settings.z * state[1]["t"].stderr
    assert lo0 > hi1
    # Identical finalists never separate: the budget ends it, spent exactly.
    same = {0: tests[0], 1: tests[0]}
    _, info = separate_finalists(same, lambda cid: {"t": lambda b: answers[0][b]}, {"t": params}, settings, budget=30)
    assert not info["separated"] and info["items"] == 30


def test_deterministic_and_resumable():
    params = _bank()
    scorers = {t: (lambda b, y=_answers(params, th, seed=k): y[b]) for k, (t, th) in enumerate([("a", 0.5), ("b", -0.5)])}
    settings = AdaptiveSettings(batch_size=3, max_items=30, min_items=6, se_threshold=0.05, racing=True)
    front = np.array([[0.9, 0.2]])
    whole = {t: x.to_dict() for t, x in run_adaptive(scorers, {"a": params, "b": params}, settings, front=front).items()}
    again = {t: x.to_dict() for t, x in run_adaptive(scorers, {"a": params, "b": params}, settings, front=front).items()}
    assert json.dumps(whole) == json.dumps(again)
    # interrupted after two rounds, saved as JSON, resumed
    part = run_adaptive(scorers, {"a": params, "b": params}, settings, front=front, rounds=2)
    assert all(x.used == 6 and x.stop is None for x in part.values())
    saved = json.loads(json.dumps({t: x.to_dict() for t, x in part.items()}))
    resumed = run_adaptive(scorers, {"a": params, "b": params}, settings, front=front,
                           tests={t: AdaptiveTest.from_dict(d) for t, d in saved.items()})
    assert json.dumps({t: x.to_dict() for t, x in resumed.items()}) == json.dumps(whole)


def test_settings_and_record_fields():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        AdaptiveSettings(batch_size=0)
    with pytest.raises(ValueError, match="min_items must lie in"):
        AdaptiveSettings(max_items=10, min_items=20)
    with pytest.raises(ValueError, match="se_threshold must be > 0"):
        AdaptiveSettings(se_threshold=0.0)
    params = _bank()
    y = _answers(params, 0.0)
    test = run_adaptive({"t": lambda b: y[b]}, {"t": params}, AdaptiveSettings(batch_size=5, max_items=20))["t"]
    record = test.to_dict()
    assert set(record) == {"items", "responses", "used", "stop", "value", "stderr", "theta", "batches"}
    assert record["used"] == len(record["items"]) == len(record["responses"]) == 20 and record["stop"] in ("se", "budget")
    assert record["responses"] == y[record["items"]].tolist()
    assert math.isfinite(record["value"]) and 0 <= record["value"] <= 1


def test_response_rows_lay_answers_over_the_whole_splits():
    from evomerge.fitness.adaptive import response_rows

    records = [{"status": "ok", "responses": {"a": [1, 0], "b": [1]}, "adaptive": {"a": {"items": [3, 0]}, "b": {"items": [1]}}},
               {"status": "failed", "responses": {}, "adaptive": None}]
    rows = response_rows(records, ["a", "b"], [4, 2])
    expected = np.array([[0, np.nan, np.nan, 1, np.nan, 1], [np.nan] * 6])
    np.testing.assert_array_equal(rows, expected)


def _search_records(workspace, name, adaptive, *, steps_then_resume=None):
    from evomerge.runs.search import Search
    from evomerge.testing import write_run_config

    path = write_run_config(workspace, name, fitness={"name": "fitness/mc", "adaptive": adaptive},
                            budget={"evaluations": 18})
    if steps_then_resume is None:
        with Search.create(path, echo=lambda *a: None) as search:
            search.run(progress=False)
    else:
        with Search.create(path, echo=lambda *a: None) as search:
            for _ in range(steps_then_resume):
                search.step()
        with Search.resume(workspace / "runs" / name, echo=lambda *a: None) as search:
            search.run(progress=False)
    from evomerge.runs.run import Run

    run = Run.load(workspace / "runs" / name)
    return [run.record(i) for i in sorted(run.evaluations.index)]


def test_search_records_say_items_and_stop_and_a_resumed_run_is_the_same(run_workspace):
    from evomerge.fitness.compressed import CompressedFitness

    adaptive = {"batch_size": 4, "max_items": 12, "min_items": 4, "se_threshold": 0.03, "racing": True, "z": 0.5}
    records = _search_records(run_workspace, "adaptive_whole", adaptive)
    fitness = CompressedFitness.load(run_workspace / "fitness" / "mc")
    settings = AdaptiveSettings(**adaptive)
    assert len(records) == 18 and all(r["status"] == "ok" for r in records)
    stops = set()
    for r in records:
        assert set(r["adaptive"]) == {"sums_a", "sums_b"}
        total = 0
        for task, entry in r["adaptive"].items():
            assert set(entry) == {"items", "used", "batches", "stop"}
            assert entry["used"] == len(entry["items"]) == len(r["responses"][task]) <= 12
            assert entry["stop"] in ("se", "budget", "exhausted", "raced")
            params = fitness.task(task).estimator.item_params
            assert not params.pinned[entry["items"]].any() and max(entry["items"]) < params.n_items
            # the objective is the adaptive estimate of exactly these items and answers
            est = adaptive_estimate(np.array(r["responses"][task]), entry["items"], params)
            assert r["objectives"][task] == pytest.approx(est.value, abs=1e-12)
            total += entry["used"]
            stops.add(entry["stop"])
        assert r["item_evaluations"] == total
    assert all(e["stop"] != "raced" for e in records[0]["adaptive"].values())  # nothing to race against yet
    # Interrupted after one generation and resumed: the same records (items, answers, stops, objectives).
    again = _search_records(run_workspace, "adaptive_resumed", adaptive, steps_then_resume=1)
    keys = ("id", "objectives", "responses", "adaptive", "item_evaluations")
    assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in records]
    assert settings.racing and {"se", "raced"} <= stops  # (here: 22 se, 13 raced, 1 budget of 36)


def test_run_config_adaptive_block_is_validated_with_field_errors():
    from evomerge.runs.config import ConfigError, load_run_config

    base = {"name": "x", "models": {"base": "/b", "experts": ["/e"]}, "search_space": "s", "fitness": {"name": "f"},
            "optimizer": {"name": "random"}, "budget": {"evaluations": 4}, "workers": {"backend": "inprocess"}}
    config = load_run_config(base)
    assert config.fitness.adaptive is None and "adaptive" not in config.to_yaml()  # off, and not in the snapshot
    on = load_run_config({**base, "fitness": {"name": "f", "adaptive": {"max_items": 30}}})
    assert on.fitness.adaptive.settings() == AdaptiveSettings(max_items=30) and "max_items: 30" in on.to_yaml()
    cases = [({"max_items": 10, "min_items": 20}, "field `fitness.adaptive`: adaptive settings: min_items must lie in"),
             ({"batch_size": 0}, "field `fitness.adaptive.batch_size`"),
             ({"se_threshold": -1}, "field `fitness.adaptive.se_threshold`"),
             ({"seed": 1}, "field `fitness.adaptive.seed` is not supported")]
    for block, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_run_config({**base, "fitness": {"name": "f", "adaptive": block}})
    # Racing on any backend (the Pareto set travels with each job: tests/test_racing_backends.py).
    for workers in ({"backend": "ray", "num_workers": 2}, {"backend": "ray", "schedule": "async"}):
        raced = load_run_config({**base, "fitness": {"name": "f", "adaptive": {"racing": True}}, "workers": workers})
        assert raced.fitness.adaptive.settings().racing and "racing: true" in raced.to_yaml()
