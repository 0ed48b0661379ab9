"""Finalist racing in `Run.choose` (evomerge/runs/racing.py).

The race logic is checked on answer vectors written here, in the order the race gives items
(the mock maps an item index to its position in `item_order`), against stopping rounds and
survivors worked out by hand (the arithmetic is in the comments); the bound's error rate by
simulation; the real path (`Run.choose(racing=True)`, `evomerge export --racing`) on the test
family's run against a brute-force whole-split choice.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from evomerge.errors import OptionError
from evomerge.runs.racing import RacingSettings, item_order, race_finalists
from evomerge.runs.run import ChoiceRule, Run


def ordered_mock(vectors: dict[int, dict[str, list[int]]], n_items: dict[str, int], seed: int, log=None):
    """answers() for race_finalists: finalist c answers item i of task t with
    vectors[c][t][position of i in item_order]; `log` collects (c, t, items) requests."""
    order = item_order(n_items, seed)
    position = {t: np.argsort(o) for t, o in order.items()}

    def answers(c, items):
        out = {}
        for t, idx in items.items():
            if log is not None:
                log.append((c, t, tuple(int(i) for i in idx)))
            out[t] = np.asarray(vectors[c][t], dtype=np.int64)[position[t][np.asarray(idx, dtype=np.int64)]]
        return out
    return answers


TWO = ["a", "b"]


def test_hand_worked_mean_race_drops_the_clear_loser_and_uses_the_split_for_the_rest():
    # N = 4 per task, batch 2: 1 round can end with items unseen; 3 finalists -> 2 comparisons,
    # z = Phi^-1(1 - 0.05 / 2) = 1.959964.
    vectors = {10: {"a": [1, 1, 1, 1], "b": [1, 1, 0, 1]},
               20: {"a": [1, 1, 0, 1], "b": [1, 0, 1, 1]},
               30: {"a": [0, 0, 1, 0], "b": [0, 0, 1, 1]}}
    # Round 1 (positions 0, 1): means 10: 1.0, 20: 0.75, 30: 0.0; leader 10.
    #  20 - 10: d_a = [0, 0], d_b = [0, -1], D = -0.25; with +1 and -1 added the sample variances are
    #  2/3 and 11/12; var = 0.25 * (0.5 * 2/3 / 2) + 0.25 * (0.5 * 11/12 / 2) = 0.0989583, sd 0.314576,
    #  upper = -0.25 + 1.959964 * 0.314576 = 0.3666 > 0: kept.
    #  30 - 10: d = [-1, -1] on both, D = -1; variances 1 and 1: var = 2 * 0.25 * 0.25 = 0.125,
    #  upper = -1 + 1.959964 * 0.353553 = -0.3070 < 0: dropped in round 1 by 10.
    # Round 2: the split is used; 10 (0.875) beats 20 (0.75).
    n = {"a": 4, "b": 4}
    rule = ChoiceRule.parse("mean", TWO)
    result = race_finalists([10, 20, 30], n, rule, ordered_mock(vectors, n, 7), RacingSettings(batch=2, seed=7))
    assert result.z == pytest.approx(1.959964, abs=1e-6)
    assert result.chosen == 10
    assert {c: (m["stop"], m["round"], m["dropped_by"]) for c, m in result.members.items()} == {
        10: ("split_used", 2, None), 20: ("split_used", 2, None), 30: ("dropped", 1, 10)}
    assert result.members[30]["items"] == {"a": 2, "b": 2}
    assert result.members[20]["accuracy"] == {"a": 0.75, "b": 0.75}
    assert (result.item_evaluations, result.full_split_item_evaluations) == (20, 24)


def test_hand_worked_race_stops_when_one_is_left():
    # N = 8, batch 2: 3 uncertain rounds, 2 finalists -> z = Phi^-1(1 - 0.05 / 3) = 2.128045.
    # Round 1: d = [-1, -1] on both tasks, D = -1; each task: variance 1, fpc 0.75, / 2 -> 0.375, x 0.25;
    # sd = sqrt(0.1875) = 0.433013; upper = -1 + 2.128045 * 0.433013 = -0.0785 < 0: 2 dropped.
    vectors = {1: {"a": [1] * 8, "b": [1] * 8}, 2: {"a": [0] * 8, "b": [0] * 8}}
    n = {"a": 8, "b": 8}
    result = race_finalists([1, 2], n, ChoiceRule.parse("mean", TWO), ordered_mock(vectors, n, 0),
                            RacingSettings(batch=2))
    assert result.z == pytest.approx(2.128045, abs=1e-6)
    assert result.chosen == 1 and result.rounds == 1
    assert result.members[1]["stop"] == "won" and result.members[2]["stop"] == "dropped"
    assert result.item_evaluations == 8 and result.full_split_item_evaluations == 32


@pytest.mark.parametrize("confidence, dropped", [(0.95, True), (0.96, False)])
def test_hand_worked_worst_rule_bound(confidence, dropped):
    # N = 4, batch 2, 2 finalists, "worst": 2 tasks -> z = Phi^-1(1 - delta / 2).
    # Round 1: 1 answers a = [1, 1], b = [1, 1]; 2 answers a = [1, 1], b = [0, 0] (worst 1 vs 0).
    #  s = a: u = a is paired, d = [0, 0], upper = 1.96 * sqrt(0.5 * (2/3) / 2) = 0.80 > 0.
    #  s = b: u = b paired, d = [-1, -1], upper = -1 + z * sqrt(0.5 * 1 / 2) = -1 + 0.5 z;
    #         u = a independent, means 0 and 1 with a 1 and a 0 added: variances 1/4 each,
    #         upper = -1 + z * sqrt(2 * 0.5 * 0.25 / 2) = -1 + 0.3536 z.  max: -1 + 0.5 z.
    #  min over s: -1 + 0.5 z: z = 1.959964 (95%) -> -0.0200, dropped; z = 2.053749 (96%) -> +0.0269, kept.
    vectors = {1: {"a": [1, 1, 0, 0], "b": [1, 1, 1, 1]}, 2: {"a": [1, 1, 1, 1], "b": [0, 0, 0, 1]}}
    n = {"a": 4, "b": 4}
    result = race_finalists([1, 2], n, ChoiceRule.parse("worst", TWO), ordered_mock(vectors, n, 3),
                            RacingSettings(batch=2, seed=3, confidence=confidence))
    assert result.z == pytest.approx(NormalDist().inv_cdf(1 - (1 - confidence) / 2))
    assert result.members[2]["stop"] == ("dropped" if dropped else "split_used")
    # whole split: worst(1) = 0.5, worst(2) = 0.25 -> 1 either way
    assert result.chosen == 1


def test_hand_worked_mean_rule_keeps_what_the_worst_rule_drops():
    # The same first round under "mean" (1 comparison, z = 1.644854): D = -0.5, var = 0.25 * (1/6) +
    # 0.25 * 0.25 = 0.1041667, upper = -0.5 + 1.644854 * 0.322749 = +0.031: kept; at the whole split
    # the means are 0.75 (1) and 0.625 (2).
    vectors = {1: {"a": [1, 1, 0, 0], "b": [1, 1, 1, 1]}, 2: {"a": [1, 1, 1, 1], "b": [0, 0, 0, 1]}}
    n = {"a": 4, "b": 4}
    result = race_finalists([1, 2], n, ChoiceRule.parse("mean", TWO), ordered_mock(vectors, n, 3),
                            RacingSettings(batch=2, seed=3))
    assert result.members[2]["stop"] == "split_used" and result.chosen == 1


def test_every_finalist_gets_the_same_items_in_a_seeded_order():
    rng = np.random.default_rng(0)
    n = {"a": 30, "b": 17}
    vectors = {c: {t: rng.integers(0, 2, n[t]).tolist() for t in n} for c in (5, 6, 7)}
    log: list = []
    race_finalists([5, 6, 7], n, ChoiceRule.parse("mean", TWO), ordered_mock(vectors, n, 11, log),
                   RacingSettings(batch=4, seed=11, confidence=0.999))
    by_finalist = {c: [(t, items) for cc, t, items in log if cc == c] for c in (5, 6, 7)}
    longest = max(by_finalist.values(), key=len)
    for requests in by_finalist.values():
        assert requests == longest[:len(requests)]  # paired: a prefix of the same sequence
    for t in n:  # a permutation of the split, the same for the same seed, another for another seed
        assert sorted(item_order(n, 11)[t]) == list(range(n[t]))
        assert np.array_equal(item_order(n, 11)[t], item_order(n, 11)[t])
        assert not np.array_equal(item_order(n, 11)[t], item_order(n, 12)[t])


def test_same_seed_same_result():
    rng = np.random.default_rng(1)
    n = {"a": 60, "b": 60}
    vectors = {c: {t: (rng.random(n[t]) < p).astype(int).tolist() for t in n} for c, p in ((1, 0.7), (2, 0.6), (3, 0.5))}
    rule = ChoiceRule.parse("mean", TWO)
    runs = [race_finalists([1, 2, 3], n, rule, ordered_mock(vectors, n, 4), RacingSettings(batch=10, seed=4))
            for _ in range(2)]
    assert runs[0].to_dict() == runs[1].to_dict()


def full_primary(vectors, rule, tasks):
    frame = pd.DataFrame({t: {c: float(np.mean(v[t])) for c, v in vectors.items()} for t in tasks})
    return rule.keys(frame)["primary"], rule.ranked(frame)[0]


@pytest.mark.parametrize("by", ["mean", "worst", "3,1"])
def test_the_split_used_up_gives_the_whole_split_choice(by):
    """With a confidence so high that only exact bounds drop anyone, the race's choice is the brute-force
    rule on the whole-split accuracies (ties included: vectors here tie; task b, used up after 3 rounds,
    gives exact bounds for "worst")."""
    rng = np.random.default_rng(2)
    n = {"a": 40, "b": 24}
    rule = ChoiceRule.parse(by, TWO)
    for draw in range(20):
        vectors = {c: {t: rng.integers(0, 2, n[t]).tolist() for t in n} for c in (4, 9, 2)}
        if draw % 4 == 0:
            vectors[9] = vectors[4]  # a full tie: the compressed-fitness order (4 first) wins
        result = race_finalists([4, 9, 2], n, rule, ordered_mock(vectors, n, draw),
                                RacingSettings(batch=8, seed=draw, confidence=1 - 1e-12))
        primary, best = full_primary(vectors, rule, TWO)
        assert result.chosen == best
        for c, m in result.members.items():  # a drop at this confidence is one the exact bound of a used-up task allows
            assert m["stop"] == "split_used" or primary[c] < primary[best]


@pytest.mark.parametrize("by", ["mean", "worst"])
def test_the_error_rate_stays_within_the_confidence(by):
    """Many random finalist sets, close and correlated (items share a difficulty): racing may pick a
    member worse on the whole split than the best only with probability at most 1 - confidence.
    The sets are hard enough that racing drops members in most draws (else the check is empty)."""
    rng = np.random.default_rng(123)
    tasks = ["a", "b"]
    n = {"a": 200, "b": 200}
    rule = ChoiceRule.parse(by, tasks)
    draws, errors, early, spent, full = 400, 0, 0, 0, 0
    for draw in range(draws):
        difficulty = {t: rng.normal(0, 1.5, n[t]) for t in tasks}
        ability = rng.normal(0.0, 0.15, (4, len(tasks)))  # a few points of accuracy apart
        vectors = {c: {t: (rng.random(n[t]) < 1 / (1 + np.exp(difficulty[t] - 1.0 - ability[c, k]))).astype(int)
                       for k, t in enumerate(tasks)} for c in range(4)}
        result = race_finalists(list(range(4)), n, rule, ordered_mock(vectors, n, draw),
                                RacingSettings(batch=20, seed=draw, confidence=0.9))
        primary, _ = full_primary(vectors, rule, tasks)
        errors += primary[result.chosen] < primary.max() - 1e-12
        early += any(m["stop"] == "dropped" for m in result.members.values())
        spent, full = spent + result.item_evaluations, full + result.full_split_item_evaluations
    delta = 0.1
    assert errors <= draws * delta + 3 * np.sqrt(draws * delta * (1 - delta)), errors
    assert early > draws / 2 and spent < 0.95 * full, (early, spent / full)


def test_a_single_finalist_wins_unscored_and_bad_settings_are_option_errors():
    result = race_finalists([3], {"a": 5}, ChoiceRule.parse("mean", ["a"]), lambda c, items: pytest.fail())
    assert result.chosen == 3 and result.item_evaluations == 0 and result.members[3]["stop"] == "won"
    with pytest.raises(OptionError, match="^batch: "):
        RacingSettings(batch=0)
    with pytest.raises(OptionError, match="^confidence: "):
        RacingSettings(confidence=1.0)


# --------------------------------------------------------------------------- on a real run


@pytest.fixture(scope="module")
def small_run(run_workspace) -> Run:
    from evomerge.runs.search import start_search
    from evomerge.testing import write_run_config

    config = write_run_config(run_workspace, "finalist_racing", budget={"evaluations": 12})
    return Run.load(start_search(config, progress=False, echo=lambda *a: None))


def brute_force_choice(run: Run, finalists: int, by: str) -> tuple[list[int], int]:
    """Every shortlisted member on the whole fitness split, scored here, and the rule on that."""
    rule = ChoiceRule.parse(by, run.tasks)
    shortlist = rule.ranked(run.pareto)[:finalists]
    fitness, problem = run._verify_problem("cpu")
    scorers = fitness.full_scorers(problem.tokenizer, role="fitness", device=problem.materializer.device)
    rows = {}
    for c in shortlist:
        model = problem.materialize(run.genome(c))
        rows[c] = {t: float(np.mean(scorers[t](model))) for t in run.tasks}
    return shortlist, rule.ranked(pd.DataFrame.from_dict(rows, orient="index")[run.tasks])[0]


@pytest.mark.parametrize("by", ["mean", "worst"])
def test_choose_without_racing_is_the_brute_force_choice_and_records_it(small_run, by):
    finalists = min(3, len(small_run.pareto))
    shortlist, expected = brute_force_choice(small_run, finalists, by)
    assert small_run.choose(finalists, by=by, device="cpu", echo=lambda *a: None) == expected
    record = small_run.store.read_verify()["choose"]
    assert record["racing"] is None and record["finalists"] == shortlist and record["chosen"] == expected
    assert record["item_evaluations"] == record["full_split_item_evaluations"]
    assert {m["stop"] for m in record["members"].values()} == {"split_used"}


def test_choose_with_racing_records_items_and_stops_and_equals_the_whole_split_when_nobody_drops(small_run):
    finalists = min(3, len(small_run.pareto))
    shortlist, expected = brute_force_choice(small_run, finalists, "mean")
    chosen = small_run.choose(finalists, racing=True, batch=7, confidence=1 - 1e-12, device="cpu",
                              echo=lambda *a: None)
    record = small_run.store.read_verify()["choose"]
    assert chosen == expected == record["chosen"]
    assert record["racing"] == {"mode": "paired", "batch": 7, "confidence": 1 - 1e-12, "seed": small_run.config.seed}
    n_items = small_run._fitness_split_sizes()
    assert record["full_split_item_evaluations"] == finalists * sum(n_items.values())
    assert record["item_evaluations"] == sum(sum(m["items"].values()) for m in record["members"].values())
    for member in record["members"].values():
        assert member["stop"] == "split_used" and member["items"] == n_items
    # the same seed gives the same race; a default-confidence race records a stop for every finalist
    again = small_run.choose(finalists, racing="paired", batch=7, confidence=1 - 1e-12, device="cpu",
                             echo=lambda *a: None)
    assert again == chosen and small_run.store.read_verify()["choose"] == record
    small_run.choose(finalists, racing=True, batch=5, device="cpu", echo=lambda *a: None)
    stops = {m["stop"] for m in small_run.store.read_verify()["choose"]["members"].values()}
    assert stops <= {"dropped", "won", "split_used"} and stops


def test_racing_options_are_checked(small_run, tmp_path):
    from evomerge.cli import main

    with pytest.raises(OptionError, match="^racing: "):
        small_run.choose(2, racing="sometimes")
    with pytest.raises(OptionError, match="^racing: batch, confidence and seed apply only"):
        small_run.choose(2, batch=5)
    result = CliRunner().invoke(main, ["export", str(small_run.path), "--racing", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--racing and --racing-batch need --finalists" in result.output
    result = CliRunner().invoke(main, ["export", str(small_run.path), "--finalists", "2", "--racing",
                                       "--racing-batch", "5", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "item evaluations (the whole split:" in result.output
    assert small_run.store.read_verify()["choose"]["racing"]["batch"] == 5
