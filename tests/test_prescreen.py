"""Surrogate pre-screening (evomerge.search.optimizers._prescreen): protocol, checkpoints, selection, benefit."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from evomerge.search.optimizers import (
    OPTIMIZERS,
    PRESCREEN_DEFAULTS,
    Optimizer,
    Prescreened,
    fit_screen,
    load_state,
    make_optimizer,
    make_prescreened,
    restore_optimizer,
    save_state,
    select_proposals,
)
from evomerge.search.pareto import hypervolume

DIM, M = 4, 2
CENTRES = np.array([[0.2, 0.3, 0.25, 0.2], [0.7, 0.6, 0.75, 0.8]])  # (M, DIM)
FAST = {
    "random": dict(batch_size=8),
    "nsga2": dict(pop_size=8),
    "cma": dict(batch_size=8),
    "m2n2": dict(archive_size=8, batch_size=8, n_initial=16),
    "map": dict(batch_size=8, terms="auto", front_pop_size=16, front_generations=5),
}


@pytest.fixture(autouse=True)
def _quiet_backends():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def accuracies(X: np.ndarray) -> np.ndarray:
    """Two logit-quadratic accuracy tasks with different optima; x0 > 0.97 fails (NaN)."""
    F = 1.0 / (1.0 + np.exp(-(2.0 - 12.0 * ((X[:, None, :] - CENTRES[None]) ** 2).sum(axis=2))))  # (n, M)
    F[X[:, 0] > 0.97] = np.nan
    return F


def responses_of(F: np.ndarray) -> np.ndarray:
    thresholds = (np.arange(10) + 0.5) / 10
    return (np.nan_to_num(F, nan=0.0)[:, :, None] > thresholds).astype(float).reshape(len(F), -1)


def make(name: str, seed: int = 0, factor: float = 4.0, **screen) -> Optimizer:
    return make_prescreened(name, DIM, (0.0, 1.0), M, seed=seed, factor=factor, screen_settings=screen, **FAST[name])


def step(opt: Optimizer) -> np.ndarray:
    X = opt.ask()
    F = accuracies(X)
    opt.tell(X, F, responses_of(F))
    return X


# ------------------------------------------------------------------ protocol
def test_the_wrapper_keeps_the_protocol_checks():
    opt = make("nsga2")
    with pytest.raises(RuntimeError, match=r"prescreen: tell\(\) was called without a matching ask"):
        opt.tell(np.zeros((1, DIM)), np.zeros((1, M)))
    X = opt.ask()
    with pytest.raises(RuntimeError, match="ask\\(\\) was called twice"):
        opt.ask()
    with pytest.raises(ValueError, match=r"objectives has 3 columns"):
        opt.tell(X, np.zeros((len(X), 3)))
    opt.tell(X, accuracies(X))  # the failed ask is still pending and can be told


@pytest.mark.parametrize("name", sorted(FAST))
def test_screening_starts_once_the_surrogate_can_be_checked(name):
    opt = make(name, seed=1)
    sizes = []
    while opt.n_evaluations < 60:
        sizes.append(len(step(opt)))
    assert opt.n_evaluations == sum(sizes)
    assert opt.last_screen["screened"]
    assert len(opt.last_proposals) >= 4 * len(opt.last_selected)  # factor 4
    assert opt.inner.n_evaluations > opt.n_evaluations  # the inner optimizer also heard the screened-out rows
    assert np.all(np.isin(opt.last_screen["terms"], ["linear", "diagonal", "full"]))


def test_failed_evaluations_reach_the_inner_optimizer_as_failures_and_stay_out_of_the_fit():
    opt = make("random", seed=0)
    while opt.n_evaluations < 40:
        step(opt)
    failed = opt.strategy_state.failed
    assert failed.any()  # x0 > 0.97 happens in 40 uniform samples
    assert opt.inner.n_failed >= failed.sum()
    X, F = opt._data()
    assert len(X) == (~failed).sum() and np.all(np.isfinite(F))


def test_registry_and_factory():
    assert "prescreen" not in OPTIMIZERS  # a wrapper, not a strategy: not listed...
    assert OPTIMIZERS["prescreen"] is Prescreened  # ...but resolvable (Optimizer.from_state needs it)
    plain = make_prescreened("nsga2", DIM, (0, 1), M, factor=1, pop_size=8)
    assert type(plain).__name__ == "NSGA2Optimizer"
    by_default = make_prescreened("nsga2", DIM, (0, 1), M, pop_size=8)  # factor None: PRESCREEN_DEFAULTS
    assert isinstance(by_default, Prescreened) == (PRESCREEN_DEFAULTS.get("nsga2") is not None)
    by_settings = make_optimizer("prescreen", DIM, (0, 1), M, inner="nsga2", factor=3, inner_settings={"pop_size": 8})
    assert by_settings.inner.name == "nsga2" and by_settings.inner.settings.pop_size == 8
    weighted = make_prescreened("cma", DIM, (0, 1), M, factor=2, weights=(3, 1), batch_size=4)
    np.testing.assert_allclose(weighted.inner.weights, [0.75, 0.25])
    assert weighted.criterion == "scalarized"  # CMA optimises the scalarisation only
    assert make("nsga2").criterion == "hvi"
    with pytest.raises(ValueError, match="prescreen: factor must be a number >= 1"):
        make_optimizer("prescreen", DIM, (0, 1), M, inner="nsga2", factor=0.5)
    with pytest.raises(ValueError, match="unknown optimizer 'nsga4'"):
        make_prescreened("nsga4", DIM, (0, 1), M, factor=2)
    with pytest.raises(ValueError, match="give `weights` to the wrapper"):
        make_optimizer("prescreen", DIM, (0, 1), M, inner="cma", inner_settings={"weights": (1, 1)})
    wrapped = Prescreened.wrap(make_optimizer("random", DIM, (0, 1), M, seed=5, batch_size=8), factor=2)
    assert wrapped.seed == 5 and wrapped.inner.settings.batch_size == 8


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", sorted(FAST))
def test_checkpoint_round_trip_through_the_wrapper(name, tmp_path):
    live = make(name, seed=3)
    while not (live.n_evaluations >= 40 and live.last_screen.get("screened")):
        step(live)
    save_state(live.state(), tmp_path / "after_tell.json")
    X_pending = live.ask()
    save_state(live.state(), tmp_path / "mid_ask.json")
    json.loads((tmp_path / "mid_ask.json").read_text())  # plain JSON

    after_tell = Optimizer.from_state(load_state(tmp_path / "after_tell.json"))
    mid_ask = restore_optimizer(load_state(tmp_path / "mid_ask.json"))
    assert isinstance(after_tell, Prescreened) and after_tell.inner.name == name
    np.testing.assert_array_equal(after_tell.ask(), X_pending)
    np.testing.assert_array_equal(mid_ask.pending, X_pending)
    np.testing.assert_array_equal(mid_ask.inner.pending, live.inner.pending)
    for opt in (live, after_tell, mid_ask):
        F = accuracies(X_pending)
        opt.tell(X_pending, F, responses_of(F))
    for _ in range(2):
        X = live.ask()
        for other in (after_tell, mid_ask):
            np.testing.assert_array_equal(other.ask(), X)
        F = accuracies(X)
        for opt in (live, after_tell, mid_ask):
            opt.tell(X, F, responses_of(F))
    assert mid_ask.best_score == live.best_score and mid_ask.n_evaluations == live.n_evaluations
    assert mid_ask.inner.n_evaluations == live.inner.n_evaluations


def test_an_inner_batch_smaller_than_the_factor_is_asked_repeatedly_and_resumes(tmp_path):
    live = make_prescreened("cma", DIM, (0.0, 1.0), M, seed=2, factor=4, batch_size=2)
    while not live.last_screen.get("screened"):
        step(live)
    assert live.last_screen["inner_asks"] == 2 and live.last_screen["proposals"] == 4
    assert len(live.last_selected) == 1
    step(live)
    save_state(live.state(), tmp_path / "s.json")
    resumed = Optimizer.from_state(load_state(tmp_path / "s.json"))
    np.testing.assert_array_equal(resumed.ask(), live.ask())


# ------------------------------------------------------------------ selection
def quadratic(X: np.ndarray) -> np.ndarray:
    """A known single-objective quadratic with cross terms, maximum 5 at (0.3, 0.6, 0.4)."""
    H = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 4.0]])
    Y = X - np.array([0.3, 0.6, 0.4])
    return 5.0 - np.einsum("ni,ij,nj->n", Y, H, Y)


def test_the_screened_batch_is_the_top_n_of_an_exact_surrogate():
    opt = make_prescreened("random", 3, (0.0, 1.0), 1, seed=0, factor=4, batch_size=12,
                           screen_settings={"link": "identity", "ridge": 0.0})
    while opt.n_evaluations < 24:  # 10 quadratic terms need 12 samples for the leave-one-out check
        X = opt.ask()
        opt.tell(X, quadratic(X))
    X = opt.ask()
    assert opt.last_screen["terms"] == ["full"] and opt.last_screen["r2_loo"][0] > 1 - 1e-9
    proposals = opt.last_proposals
    assert X.shape == (3, 3) and len(proposals) == 12  # n = floor(12 / 4)
    np.testing.assert_allclose(opt.last_predictions[:, 0], quadratic(proposals), atol=1e-8)
    top = np.argsort(-quadratic(proposals), kind="stable")[:3]
    np.testing.assert_array_equal(opt.last_selected, top)
    np.testing.assert_array_equal(X, proposals[top])
    # The inner optimizer is told the real values of the 3 and the (clipped) predictions of the 9.
    inner_before, before = opt.inner.n_evaluations, opt.n_evaluations
    opt.tell(X, quadratic(X))
    assert (opt.inner.n_evaluations - inner_before, opt.n_evaluations - before) == (12, 3)


def test_greedy_hypervolume_improvement_by_hand():
    front = np.array([[1.0, 0.0], [0.0, 1.0]])  # dominates nothing above ref 0 on its own axes
    P = np.array([[0.5, 0.5],    # HVI 0.25
                  [0.6, 0.3],    # HVI 0.18
                  [0.2, 0.2],    # HVI 0.04
                  [0.5, 0.49]])  # HVI 0.245, but only 0.245 - 0.245 = 0 after [0.5, 0.5] is taken
    order = select_proposals(P, 3, np.array([0.5, 0.5]), criterion="hvi", front=front, ref=0.0)
    # after (0.5, 0.5): (0.6, 0.3) adds 0.1 * 0.3 = 0.03; (0.2, 0.2) and (0.5, 0.49) add 0.
    # The tie at 0 is broken by the predicted mean: (0.5, 0.49) over (0.2, 0.2).
    np.testing.assert_array_equal(order, [0, 1, 3])
    assert hypervolume(np.vstack([front, P[0]])) - hypervolume(front) == pytest.approx(0.25)
    # By the mean alone, the near-duplicate (0.5, 0.49) beats the point that widens the front.
    np.testing.assert_array_equal(select_proposals(P, 2, np.array([0.5, 0.5])), [0, 3])


def test_no_screen_without_enough_data_and_model_choice_by_leave_one_out():
    rng = np.random.default_rng(0)
    X = rng.random((DIM + 2, DIM))
    assert fit_screen(X, X[:, :1]) is None  # fewer than d + 3 rows
    X = rng.random((40, 3))
    noisy_line = X @ np.array([1.0, -2.0, 0.5]) + rng.normal(0.0, 0.1, 40)
    assert fit_screen(X, noisy_line, link="identity").terms_ == ["linear"]  # the richer models fit the noise
    curved = fit_screen(X, quadratic(X), link="identity")
    assert curved.terms_ == ["full"] and curved.r2_loo_[0] > 1 - 1e-9


# ------------------------------------------------------------------ benefit
def test_screening_finds_a_better_quadratic_optimum_at_equal_evaluations():
    regret = {1: [], 8: []}  # distance of the best evaluated value from the maximum, 5
    for seed in range(4):
        for factor in (1, 8):
            opt = make_prescreened("random", 3, (0.0, 1.0), 1, seed=seed, factor=factor, batch_size=8,
                                   screen_settings={"link": "identity", "batch_size": 2})
            values = []
            while opt.n_evaluations < 48:
                X = opt.ask()
                y = quadratic(X)
                opt.tell(X, y)
                values.extend(y)
            regret[factor].append(5.0 - max(values[:48]))
    # 48 evaluations each (the first 8 identical). Screening keeps the best 2 of every 16 random
    # proposals, so it is never worse and on average far closer to the maximum.
    assert np.all(np.array(regret[8]) <= np.array(regret[1])), regret
    assert np.mean(regret[8]) < 0.5 * np.mean(regret[1]), regret
