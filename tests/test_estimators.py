"""Full-task accuracy estimators: hand-worked values, the c >= 0 combination, fitted mixing weight, MAE."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit

from evomerge.fitness.estimators import (
    ESTIMATORS,
    CompressedEstimator,
    Estimate,
    fit_combination,
    fit_mixing_weight,
    get_estimator,
    mix,
    mpirt_estimate,
    pirt_estimate,
    subset_estimate,
)
from evomerge.fitness.irt import IRTParams, fit_irt, log_likelihood
from evomerge.fitness.subsets import Subset, select_items


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Tiny example (unidimensional, logit = a (theta - b)):
#   items      0     1     2     3
#   a          1     1     2     1
#   b         -1     1     0     ln 3
# The subset is items {0, 1}; the candidate answers (1, 0). The likelihood
# sigmoid(theta + 1) * sigmoid(-(theta - 1)) is symmetric about 0, so theta_hat = 0 for both
# MLE and MAP (the N(0, 1) prior is symmetric too). Predictions for the unseen items:
#   P_2 = sigmoid(2 * 0) = 1/2,   P_3 = sigmoid(-ln 3) = 1 / (1 + 3) = 1/4.
#   p-IRT  = (1 + 0 + 1/2 + 1/4) / 4 = 0.4375
#   subset = 0.75 * 1 + 0.25 * 0 = 0.75            (weights 0.75, 0.25)
#   gp-IRT = 0.4 * 0.75 + 0.6 * 0.4375 = 0.5625   (mixing weight 0.4)
TINY = IRTParams(np.array([1.0, 1.0, 2.0, 1.0]), np.array([-1.0, 1.0, 0.0, math.log(3.0)]), np.zeros(1))
TINY_SUBSET = Subset(np.array([0, 1]), np.array([0.75, 0.25]), "random", 2, 0, 4)
TINY_Y = np.array([1.0, 0.0])


def tiny_estimator(endpoint_theta=None, params=TINY, ability_method="mle") -> CompressedEstimator:
    mixing_weights = {"gp-IRT": 0.4, "gmp-IRT": 0.4}
    return CompressedEstimator(params, TINY_SUBSET, endpoint_theta, mixing_weights, ability_method)


def test_subset_estimate_by_hand():
    est = tiny_estimator().estimate("subset", TINY_Y)
    assert est.value == pytest.approx(0.75, abs=1e-12)
    # s.e.: p = (n ybar + 1/2) / (n + 1) = (2 * 0.75 + 0.5) / 3 = 2/3; sum w^2 = 0.625;
    # finite-population correction (N - n) / (N - 1) = 2/3.
    assert est.stderr == pytest.approx(math.sqrt(0.625 * (2 / 3) * (1 / 3) * (2 / 3)), rel=1e-12)
    np.testing.assert_array_equal(est.subset_responses, TINY_Y)


def test_estimates_are_accuracies_even_when_the_weights_overshoot_one_in_floating_point():
    """Seven subset weights normalised to 1 whose float64 dot product with all-correct answers is
    1.0000000000000002 (a search's MAP, link='logit', refused such an objective): the estimate is 1."""
    from evomerge.fitness.estimators import mix, subset_estimate

    w = np.array([0.2025685913706569, 0.3581971678527226, 0.10374590996586161, 0.023399867873627283,
                  0.1819727574313413, 0.0892937876920204, 0.04082191781377013])
    assert float(w @ np.ones(7)) > 1.0  # the overshoot this guards against
    full = subset_estimate(np.ones(7), w, n_total=100)
    assert full.value == 1.0
    assert mix("gp-IRT", 0.3, full, full).value == 1.0
    assert subset_estimate(np.zeros(7), w, n_total=100).value == 0.0


@pytest.mark.parametrize("method", ["mle", "map"])
def test_pirt_and_gpirt_by_hand(method):
    fitted = tiny_estimator(ability_method=method)
    pirt = fitted.estimate("p-IRT", TINY_Y)
    assert float(pirt.theta) == pytest.approx(0.0, abs=1e-8)
    assert pirt.value == pytest.approx(0.4375, abs=1e-10)
    assert fitted.estimate("gp-IRT", TINY_Y).value == pytest.approx(0.5625, abs=1e-10)
    # delta-method s.e.: information at theta = 0 from the two seen items,
    # 2 * sigmoid(1) * sigmoid(-1) (+ 1 for the prior under MAP); slope of the estimate in theta
    # (P(1-P) a summed over unseen items) / N = (0.25 * 2 + 0.1875 * 1) / 4; plus the unseen
    # items' own Bernoulli noise (0.25 + 0.1875) / 4^2.
    information = 2 * sigmoid(1) * sigmoid(-1) + (1.0 if method == "map" else 0.0)
    slope = (0.25 * 2 + 0.1875 * 1) / 4
    assert pirt.stderr == pytest.approx(math.sqrt(slope**2 / information + 0.4375 / 16), rel=1e-8)


# mp-IRT, unidimensional: subset items 0, 1 now have b = 1 and 3 (a = 1), answers (1, 0), so the
# unconstrained maximum-likelihood ability is their midpoint, theta = 2. Unseen items as above.
#   endpoints theta = (-1, -0.5): c >= 0 confines theta = -c_1 - 0.5 c_2 to <= 0; the concave
#   likelihood peaks at 2, so the constrained optimum is c = (0, 0), theta = 0:
#     mp-IRT  = (1 + 0 + 1/2 + 1/4) / 4 = 0.4375
#     gmp-IRT = 0.4 * 0.5 + 0.6 * 0.4375 = 0.4625   (uniform subset weights: subset = 0.5)
#   MERGE^3's unconstrained c would reach theta = 2:
#     (1 + 0 + sigmoid(4) + sigmoid(2 - ln 3)) / 4 = 0.67331
#   endpoints (-1, 2): theta = 2 is reachable, so mp-IRT equals that p-IRT value.
SHIFTED = IRTParams(np.array([1.0, 1.0, 2.0, 1.0]), np.array([1.0, 3.0, 0.0, math.log(3.0)]), np.zeros(1))
UNIFORM = Subset(np.array([0, 1]), np.array([0.5, 0.5]), "random", 2, 0, 4)


def test_mpirt_by_hand_with_the_constraint_active_and_inactive():
    fitted = CompressedEstimator(SHIFTED, UNIFORM, np.array([-1.0, -0.5]), {"gp-IRT": 0.4, "gmp-IRT": 0.4}, "mle")
    mp = fitted.estimate("mp-IRT", TINY_Y)
    np.testing.assert_allclose(mp.coefficients, [0.0, 0.0], atol=1e-8)
    assert mp.value == pytest.approx(0.4375, abs=1e-8)
    assert fitted.estimate("gmp-IRT", TINY_Y).value == pytest.approx(0.4625, abs=1e-8)

    unconstrained = (1 + sigmoid(4) + sigmoid(2 - math.log(3))) / 4
    assert unconstrained == pytest.approx(0.67331, abs=1e-5)
    reachable = mpirt_estimate(TINY_Y, UNIFORM.items, SHIFTED, np.array([-1.0, 2.0]), "mle")
    assert np.all(reachable.coefficients >= 0)
    assert float(reachable.theta) == pytest.approx(2.0, abs=1e-6)
    assert reachable.value == pytest.approx(unconstrained, abs=1e-6)
    assert pirt_estimate(TINY_Y, UNIFORM.items, SHIFTED, "mle").value == pytest.approx(unconstrained, abs=1e-6)


# mp-IRT, two dimensions (logit = a . theta - |a| b). Endpoints theta_A = (1, 0), theta_B = (0, 1),
# so theta = (c_1, c_2) and the likelihood separates by axis:
#   items 0, 1: a = (1, 0), b = 0, 1,   answers 1, 0 -> theta_1 = midpoint 0.5 -> c_1 = 0.5
#   items 2, 3: a = (0, 1), b = -1, 0.5, answers 1, 0 -> theta_2 = -0.25, clipped by c_2 >= 0 to 0
#   unseen 4:   a = (1, 0), b = 0.5 - ln 3 -> logit 0.5 - 0.5 + ln 3 -> P = 3/4
#   unseen 5:   a = (0, 1), b = 0          -> logit 0                -> P = 1/2
#   mp-IRT = (1 + 0 + 1 + 0 + 3/4 + 1/2) / 6 = 3.25 / 6
#   p-IRT (theta = (0.5, -0.25)) = (2 + 3/4 + sigmoid(-0.25)) / 6
PLANE = IRTParams(
    np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
    np.array([0.0, 1.0, -1.0, 0.5, 0.5 - math.log(3.0), 0.0]),
    np.zeros((1, 2)),
)


def test_mpirt_two_dimensions_by_hand():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    items = np.arange(4)
    mp = mpirt_estimate(y, items, PLANE, np.eye(2), "mle")
    np.testing.assert_allclose(mp.coefficients, [0.5, 0.0], atol=1e-6)
    assert mp.value == pytest.approx(3.25 / 6, abs=1e-6)
    # s.e.: c_2 sits on its bound, so only theta_1 varies, with variance 1 / information
    # 1 / (2 sigmoid(0.5) sigmoid(-0.5)); slope (3/16, 1/4) / 6; Bernoulli noise (3/16 + 1/4) / 36.
    var_theta_1 = 1 / (2 * sigmoid(0.5) * sigmoid(-0.5))
    expected_se = math.sqrt((3 / 16 / 6) ** 2 * var_theta_1 + (3 / 16 + 1 / 4) / 36)
    assert mp.stderr == pytest.approx(expected_se, rel=1e-5)
    pirt = pirt_estimate(y, items, PLANE, "mle")
    np.testing.assert_allclose(pirt.theta, [0.5, -0.25], atol=1e-6)
    assert pirt.value == pytest.approx((2.75 + sigmoid(-0.25)) / 6, abs=1e-6)


def random_plane_items(n_items: int, seed: int) -> IRTParams:
    rng = np.random.default_rng(seed)
    return IRTParams(np.abs(rng.normal(1.0, 0.5, (n_items, 2))), rng.normal(0.0, 1.0, n_items), np.zeros((1, 2)))


def test_mp_irt_recovers_a_known_non_negative_combination():
    # 2000 items, half measuring each skill, so both coordinates of theta are well determined
    rng = np.random.default_rng(0)
    a = np.zeros((2000, 2))
    a[:1000, 0] = rng.uniform(0.8, 2.0, 1000)
    a[1000:, 1] = rng.uniform(0.8, 2.0, 1000)
    params = IRTParams(a, rng.normal(0.0, 1.0, 2000), np.zeros((1, 2)))
    endpoints = np.array([[1.2, -0.3], [-0.2, 1.0]])
    true_c = np.array([0.7, 0.4])
    y = (rng.random(2000) < expit(log_likelihood_free_logits(true_c @ endpoints, params))).astype(float)
    c, theta_cov = fit_combination(y, params, endpoints, "mle")
    np.testing.assert_allclose(c, true_c, atol=0.15)
    # and the reported uncertainty covers the truth: |theta error| < 3 s.e. per coordinate
    error = (c - true_c) @ endpoints
    assert np.all(np.abs(error) < 3 * np.sqrt(np.diag(theta_cov))), (error, np.sqrt(np.diag(theta_cov)))


def log_likelihood_free_logits(theta: np.ndarray, params: IRTParams) -> np.ndarray:
    a = params.discrimination
    return a @ theta - np.linalg.norm(a, axis=1) * params.difficulty


def test_mp_irt_keeps_c_non_negative_where_merge3_would_go_negative():
    params = random_plane_items(800, seed=2)
    endpoints = np.array([[1.0, 0.2], [0.3, 1.0]])
    theta_outside_cone = np.array([0.8, -0.5]) @ endpoints  # needs a negative c_2
    rng = np.random.default_rng(3)
    y = (rng.random(800) < expit(log_likelihood_free_logits(theta_outside_cone, params))).astype(float)
    c, _ = fit_combination(y, params, endpoints, "mle")
    assert np.all(c >= 0) and c[1] == pytest.approx(0.0, abs=1e-8) and c[0] > 0.3, c

    # MERGE^3 / Mergenetic: the same likelihood, BFGS, no bounds -> a negative coefficient
    def nll(coefficients):
        return -log_likelihood(y, coefficients @ endpoints, params)[0]

    unconstrained = minimize(nll, np.full(2, 0.5), method="BFGS").x
    assert unconstrained[1] < -0.2, unconstrained


def test_fit_mixing_weight_matches_a_grid_search():
    rng = np.random.default_rng(4)
    truth = rng.uniform(0.2, 0.8, 50)
    data = truth + rng.normal(0, 0.08, 50)  # unbiased, noisy
    model = truth + 0.05 + rng.normal(0, 0.02, 50)  # biased, precise
    grid = np.linspace(0, 1, 100001)
    mse = ((grid[:, None] * data + (1 - grid[:, None]) * model - truth) ** 2).mean(axis=1)  # (G,)
    assert fit_mixing_weight(data, model, truth) == pytest.approx(grid[int(np.argmin(mse))], abs=1e-4)
    assert fit_mixing_weight(truth, truth + 1, truth) == 1.0  # clipped to [0, 1]


def simulate(n_items: int, n_models: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.5, n_items)
    b = rng.normal(0.0, 1.2, n_items)
    theta = rng.normal(0.0, 1.0, n_models)
    return (rng.random((n_models, n_items)) < expit(a[None] * (theta[:, None] - b[None]))).astype(float)


def test_fitted_mixing_weight_beats_both_ends_on_held_out_models():
    responses = simulate(40, 280, seed=5)
    calibration, held_out = responses[:80], responses[80:]
    subset = select_items(10, "random", seed=0, n_items=40)
    fitted = CompressedEstimator.fit(calibration, [], subset, model="2pl-jmap", n_folds=5, seed=0)
    fitted_weight = fitted.mixing_weights["gp-IRT"]
    assert 0.0 <= fitted_weight <= 1.0
    data = np.array([fitted.estimate("subset", r[subset.items]).value for r in held_out])
    model = np.array([fitted.estimate("p-IRT", r[subset.items]).value for r in held_out])
    truth = held_out.mean(axis=1)

    def mse(weight):
        return float(np.mean((weight * data + (1 - weight) * model - truth) ** 2))

    assert mse(fitted_weight) <= min(mse(0.0), mse(1.0)) + 1e-6, (fitted_weight, mse(fitted_weight), mse(0.0), mse(1.0))


def test_best_irt_estimator_beats_the_random_subset_mean():
    """100 items, 60 calibration + 50 held-out models, n = 20, four random subsets."""
    responses = simulate(100, 110, seed=100)
    calibration, held_out = responses[:60], responses[60:]
    params = fit_irt(calibration)  # girth 2PL MML, the default calibration
    errors: dict[str, list[float]] = {"subset": [], "p-IRT": [], "gp-IRT": []}
    for seed in range(4):
        subset = select_items(20, "random", seed=seed, n_items=100)
        fitted = CompressedEstimator.fit(calibration, [], subset, item_params=params, mixing_method="bias-variance")
        for row in held_out:
            for name, est in fitted.estimate_all(row[subset.items]).items():
                errors[name].append(abs(est.value - row.mean()))
    mae = {name: float(np.mean(v)) for name, v in errors.items()}
    best = min(("p-IRT", "gp-IRT"), key=mae.get)
    assert mae[best] < mae["subset"], f"MAE: {mae}"


def test_empirical_prior_centres_the_mixing_rows_and_precomputed_folds_give_the_same_fit():
    from evomerge.fitness.estimators import cross_validation_folds

    # the scale of a joint fit is arbitrary; the empirical prior puts the mixing rows at mean ~0, sd ~1
    responses = simulate(40, 60, seed=7)
    mixing_rows = np.arange(20, 60)
    subset = select_items(10, "random", seed=0, n_items=40)
    fitted = CompressedEstimator.fit(responses, [0, 1], subset, model="2pl-jmap", mixing_rows=mixing_rows, n_folds=4,
                                     empirical_prior=True)
    theta = fitted.item_params.theta[mixing_rows]
    assert abs(theta.mean()) < 0.2 and 0.6 < theta.std() < 1.2  # MAP under N(0, 1) on their own scale
    again = CompressedEstimator.fit(
        responses, [0, 1], subset, mixing_rows=mixing_rows,
        item_params=fit_irt(responses, "2pl-jmap", prior_rows=mixing_rows),
        folds=cross_validation_folds(responses, mixing_rows, 4, model="2pl-jmap", empirical_prior=True))
    assert again.mixing_weights == fitted.mixing_weights
    np.testing.assert_array_equal(again.endpoint_theta, fitted.endpoint_theta)
    with pytest.raises(ValueError, match=r"the folds hold out rows \[20, 21"):
        CompressedEstimator.fit(responses, [0, 1], subset, mixing_rows=np.arange(2, 60),
                                item_params=fitted.item_params,
                                folds=cross_validation_folds(responses, mixing_rows, 4, model="2pl-jmap"))


def small_fitted(endpoints=(0, 1)) -> tuple[CompressedEstimator, np.ndarray]:
    responses = simulate(30, 40, seed=6)
    subset = select_items(8, "random", seed=1, n_items=30)
    fitted = CompressedEstimator.fit(responses, list(endpoints), subset, model="2pl-jmap", mixing_method="bias-variance")
    return fitted, responses[0, subset.items]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_registered_estimator_returns_a_sane_estimate(name):
    fitted, y = small_fitted()
    est = fitted.estimate(name, y)
    assert isinstance(est, Estimate) and est.name == name
    assert 0.0 <= est.value <= 1.0 and 0.0 < est.stderr < 0.5
    np.testing.assert_array_equal(est.subset_responses, y)


def test_unknown_estimator_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown estimator 'irt'; valid: \['subset', 'p-IRT', 'gp-IRT', 'mp-IRT', 'gmp-IRT'\]"):
        get_estimator("irt")


def test_mp_irt_without_endpoints_says_what_is_missing():
    fitted, y = small_fitted(endpoints=())
    assert set(fitted.estimate_all(y)) == {"subset", "p-IRT", "gp-IRT"}
    with pytest.raises(ValueError, match="endpoint_rows"):
        fitted.estimate("mp-IRT", y)


def test_wrong_number_of_subset_responses_is_an_error():
    fitted, y = small_fitted()
    with pytest.raises(ValueError, match="expected 8 subset responses"):
        fitted.estimate("p-IRT", y[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix("gp-IRT", 1.5, subset_estimate(y, np.full(8, 1 / 8), 30), subset_estimate(y, np.full(8, 1 / 8), 30))


def test_fitted_estimator_round_trips_through_json_exactly():
    fitted, y = small_fitted()
    restored = CompressedEstimator.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert restored.to_dict() == fitted.to_dict()
    for name in ESTIMATORS:
        before, after = fitted.estimate(name, y), restored.estimate(name, y)
        assert (before.value, before.stderr) == (after.value, after.stderr), name


def test_an_estimator_saved_before_the_mixing_weights_were_named_so_loads_and_estimates_identically():
    # fitness.json files written before the rename store "lambdas" and "lambda_method"
    fitted, y = small_fitted()
    old = fitted.to_dict()
    old["lambdas"], old["lambda_method"] = old.pop("mixing_weights"), old.pop("mixing_method")
    restored = CompressedEstimator.from_dict(json.loads(json.dumps(old)))
    assert restored.mixing_weights == fitted.mixing_weights and set(restored.mixing_weights) == {"gp-IRT", "gmp-IRT"}
    assert restored.mixing_method == fitted.mixing_method == "bias-variance"  # not the default "cv"
    assert restored.to_dict() == fitted.to_dict()  # and it is saved again under the new keys
    for name in ESTIMATORS:
        before, after = fitted.estimate(name, y), restored.estimate(name, y)
        assert (before.value, before.stderr) == (after.value, after.stderr), name


def test_one_default_estimator_serves_calibration_and_loading():
    """The default is stated once (`DEFAULT_ESTIMATOR`) and works without endpoint abilities."""
    from evomerge.fitness.calibrate import CalibrationConfig
    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.fitness.estimators import DEFAULT_ESTIMATOR

    assert DEFAULT_ESTIMATOR in ESTIMATORS
    assert CompressedFitness("f", {}).estimator == DEFAULT_ESTIMATOR
    assert CalibrationConfig.model_fields["estimator"].default == DEFAULT_ESTIMATOR
    responses = simulate(40, 30, seed=11)
    fitted = CompressedEstimator.fit(responses, [], select_items(10, "random", seed=0, n_items=40), model="2pl-jmap")
    assert 0.0 <= fitted.estimate(DEFAULT_ESTIMATOR, responses[0, fitted.subset.items]).value <= 1.0
