"""2PL calibration and ability estimation, against known generating parameters and brute force."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from evomerge.fitness.irt import (
    ABILITY_BOUND,
    IRTParams,
    choose_dims,
    estimate_ability,
    fit_irt,
    held_out_log_likelihood,
    log_likelihood,
    predict_correct,
    standardize_abilities,
)


def simulate_2pl(n_items: int, n_models: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.7, 2.0, n_items)
    b = rng.normal(0.0, 1.0, n_items)
    theta = rng.normal(0.0, 1.0, n_models)
    p = expit(a[None, :] * (theta[:, None] - b[None, :]))  # (M, I)
    return (rng.random(p.shape) < p).astype(float), a, b, theta


def simulate_two_factor(n_items: int, n_models: int, seed: int):
    """Half the items load on skill 1, half on skill 2, skills independent: truly 2-D data."""
    rng = np.random.default_rng(seed)
    a = np.zeros((n_items, 2))
    half = n_items // 2
    a[:half, 0] = rng.uniform(0.8, 2.0, half)
    a[half:, 1] = rng.uniform(0.8, 2.0, n_items - half)
    d = rng.normal(0.0, 1.0, n_items)
    theta = rng.normal(0.0, 1.0, (n_models, 2))
    return (rng.random((n_models, n_items)) < expit(theta @ a.T + d)).astype(float)


def test_girth_recovers_known_difficulties():
    responses, a, b, theta = simulate_2pl(40, 200, seed=0)
    params = fit_irt(responses)
    r_b = np.corrcoef(params.difficulty, b)[0, 1]
    r_theta = np.corrcoef(params.theta, theta)[0, 1]
    assert r_b >= 0.9, f"difficulty correlation {r_b:.3f}"
    assert r_theta >= 0.9, f"ability correlation {r_theta:.3f}"
    assert np.abs(params.difficulty - b).mean() < 0.3, np.abs(params.difficulty - b).mean()


def test_constant_items_are_pinned_to_the_smoothed_base_rate():
    responses, *_ = simulate_2pl(30, 60, seed=1)
    responses[:, 0] = 1.0  # everyone right
    responses[:, 1] = 0.0  # everyone wrong
    params = fit_irt(responses)
    assert params.pinned.tolist()[:3] == [True, True, False]
    assert np.all(np.isfinite(params.difficulty)) and np.all(np.isfinite(params.discrimination))
    # Independent check of the probit approximation: integrate P(correct) over N(0, 1) numerically.
    grid = np.linspace(-8, 8, 4001)
    density = np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi)
    for item, rate in ((0, 60.5 / 61), (1, 0.5 / 61)):
        p = expit(params.discrimination[item] * (grid - params.difficulty[item]))
        marginal = np.trapezoid(p * density, grid)
        assert marginal == pytest.approx(rate, abs=0.003), (item, marginal, rate)


def test_ability_matches_brute_force_search():
    params = IRTParams(np.array([1.0, 1.5, 0.7, 2.0]), np.array([-1.0, 0.2, 0.5, 1.3]), np.zeros(1))
    y = np.array([1.0, 1.0, 0.0, 1.0])
    grid = np.linspace(-ABILITY_BOUND, ABILITY_BOUND, 120001)
    ll = log_likelihood(np.tile(y, (grid.size, 1)), grid, params)
    for method, log_post in (("mle", ll), ("map", ll - grid**2 / 2)):
        assert estimate_ability(y, params, method) == pytest.approx(grid[np.argmax(log_post)], abs=1e-3), method
    # 1 right at b = -1 and 1 wrong at b = 1 with a = 1: the likelihood is symmetric about 0
    symmetric = IRTParams(np.ones(2), np.array([-1.0, 1.0]), np.zeros(1))
    assert estimate_ability(np.array([1.0, 0.0]), symmetric, "mle") == pytest.approx(0.0, abs=1e-8)
    # all right: the MLE runs to the bound, the MAP stays finite
    assert estimate_ability(np.ones(2), symmetric, "mle") == pytest.approx(ABILITY_BOUND)
    assert 0 < estimate_ability(np.ones(2), symmetric, "map") < 2


def test_multidimensional_ability_matches_brute_force_search():
    params = IRTParams(
        np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.2, 0.3], [0.2, 1.5]]),
        np.array([-0.5, 0.3, 0.0, 0.8, -0.2]),
        np.zeros((1, 2)),
    )
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    axis = np.linspace(-3, 3, 601)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (G, 2)
    log_post = log_likelihood(np.tile(y, (grid.shape[0], 1)), grid, params) - (grid**2).sum(1) / 2
    np.testing.assert_allclose(estimate_ability(y, params, "map"), grid[np.argmax(log_post)], atol=0.011)


def test_predict_correct_uses_mdiff_so_one_dimension_matches_the_textbook_form():
    a, b = np.array([1.3, 0.4]), np.array([0.5, -1.0])
    uni = IRTParams(a, b, np.zeros(1))
    multi = IRTParams(a[:, None], b, np.zeros((1, 1)))
    expected = expit(a * (0.8 - b))
    np.testing.assert_allclose(predict_correct(0.8, uni)[0], expected, rtol=1e-12)
    np.testing.assert_allclose(predict_correct(np.array([0.8]), multi)[0], expected, rtol=1e-12)


@pytest.mark.parametrize("dims", [1, 2])
def test_irt_params_round_trip_through_json_exactly(dims):
    responses, *_ = simulate_2pl(12, 40, seed=2)
    responses[:, 0] = 1.0
    params = fit_irt(responses, "2pl-jmap", dims=dims, seed=3)
    restored = IRTParams.from_dict(json.loads(json.dumps(params.to_dict())))
    for name in ("discrimination", "difficulty", "theta", "pinned"):
        original, back = getattr(params, name), getattr(restored, name)
        assert original.shape == back.shape and original.dtype == back.dtype, name
        assert np.array_equal(original, back), name
    assert restored.model == params.model and restored.dims == dims


def test_two_dimensions_help_exactly_when_the_data_have_two_skills():
    """The multidimensional finding: held-out log-likelihood per response, higher is better."""
    two_skill = simulate_two_factor(40, 160, seed=4)
    one_skill, *_ = simulate_2pl(40, 160, seed=5)
    scores = {}
    for label, data in (("two", two_skill), ("one", one_skill)):
        calibration, held_out = data[:100], data[100:]
        for dims in (1, 2):
            params = fit_irt(calibration, "2pl-jmap", dims=dims, seed=0)
            scores[label, dims] = held_out_log_likelihood(held_out, params, seed=0)
    assert scores["two", 2] > scores["two", 1] + 0.01, scores
    assert scores["one", 2] < scores["one", 1] + 0.005, scores


def test_choose_dims_picks_two_for_two_skill_data():
    dims, scores = choose_dims(simulate_two_factor(30, 90, seed=6), candidates=(1, 2))
    assert dims == 2, scores


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="3pl"), "valid: ['2pl', '2pl-jmap']"),
        (dict(model="2pl", dims=2), "use model='2pl-jmap'"),
    ],
)
def test_fit_irt_rejects_bad_arguments(kwargs, message):
    responses, *_ = simulate_2pl(5, 10, seed=7)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fit_irt(responses, **kwargs)


def test_fit_irt_rejects_non_binary_responses():
    with pytest.raises(ValueError, match="0/1"):
        fit_irt(np.array([[0.0, 0.5], [1.0, 0.0]]))


@pytest.mark.parametrize("dims", [1, 2])
def test_standardized_scale_predicts_the_same_and_centres_the_chosen_rows(dims):
    rng = np.random.default_rng(dims)
    y = simulate_two_factor(40, 30, seed=dims) if dims == 2 else simulate_2pl(40, 30, seed=1)[0]
    params = fit_irt(y, "2pl-jmap", dims=dims, seed=0)
    rows = np.arange(10, 30)
    params.theta = params.theta + (0.8 if dims == 1 else np.array([0.8, -0.5]))  # move the scale off-centre
    params.theta = params.theta * 1.7
    moved = standardize_abilities(params, y, rows)
    # theta = mu + L theta' maps the old abilities onto the new scale; every prediction is unchanged
    theta = params.theta.reshape(30, -1)
    mu = theta[rows].mean(axis=0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(theta[rows], rowvar=False)) + 1e-6 * np.eye(dims))
    mapped = np.linalg.solve(chol, (theta - mu).T).T  # (M, D)
    np.testing.assert_allclose(mapped[rows].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.atleast_2d(np.cov(mapped[rows], rowvar=False)), np.eye(dims), atol=1e-5)
    old = predict_correct(params.theta, params)
    new = predict_correct(mapped[:, 0] if dims == 1 else mapped, moved)
    np.testing.assert_allclose(new, old, rtol=1e-9, atol=1e-12)
    # and the stored abilities are the MAP ones under the new scale's N(0, I) prior
    np.testing.assert_allclose(moved.theta, estimate_ability(y, moved, "map"), atol=1e-12)
    assert moved.pinned.tolist() == params.pinned.tolist()
    with pytest.raises(ValueError, match="at least 2 rows"):
        standardize_abilities(params, y, [3])
