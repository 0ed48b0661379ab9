"""MAP: the quadratic surrogate against known quadratics, and the optimizer's design and rounds."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import qmc

from evomerge.search.optimizers import (
    MAPOptimizer,
    QuadraticSurrogate,
    cross_validated_r2,
    n_quadratic_terms,
    quadratic_features,
    quadratic_term_names,
)
from evomerge.search.pareto import non_dominated_mask


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_features_follow_the_documented_term_order():
    X = np.array([[2.0, 3.0]])
    np.testing.assert_array_equal(quadratic_features(X), [[1, 2, 3, 4, 6, 9]])
    assert quadratic_term_names(2) == ["1", "x0", "x1", "x0*x0", "x0*x1", "x1*x1"]
    assert n_quadratic_terms(4) == 1 + 4 + 10


def test_recovers_a_known_logit_quadratic_exactly():
    rng = np.random.default_rng(0)
    d, M = 3, 2
    X = qmc.Sobol(d, rng=1).random(2 ** 5) * 2 - 1  # 32 >= 2 x 10 terms
    beta = rng.normal(size=(n_quadratic_terms(d), M))  # (10, 2)
    Y = sigmoid(quadratic_features(X) @ beta)  # noise-free accuracies
    s = QuadraticSurrogate().fit(X, Y)
    np.testing.assert_allclose(s.coef_, beta, atol=1e-6)
    X_new = rng.uniform(-1, 1, (50, d))
    np.testing.assert_allclose(s.predict(X_new), sigmoid(quadratic_features(X_new) @ beta), atol=1e-8)
    np.testing.assert_allclose(s.r2(X, Y), [1.0, 1.0], atol=1e-10)
    cv = cross_validated_r2(X, Y, folds=4)
    np.testing.assert_allclose(cv["r2"], [1.0, 1.0], atol=1e-8)


def test_identity_link_is_plain_quadratic_regression_and_vector_targets_stay_vectors():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 2))
    beta = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    y = quadratic_features(X) @ beta + 10.0  # outside [0, 1]: only the identity link accepts it
    s = QuadraticSurrogate(link="identity", ridge=0.0).fit(X, y)
    assert s.predict(X).shape == (30,)
    np.testing.assert_allclose(s.coef_[:, 0], beta + np.eye(6)[0] * 10.0, atol=1e-9)
    with pytest.raises(ValueError, match=r"link='logit' needs targets in \[0, 1\]"):
        QuadraticSurrogate().fit(X, y)


def test_closed_form_loo_residuals_match_brute_force_refits():
    rng = np.random.default_rng(2)
    X = rng.uniform(size=(25, 2))
    Y = np.clip(0.5 + 0.3 * np.sin(4 * X) + 0.05 * rng.normal(size=(25, 2)), 0, 1)
    s = QuadraticSurrogate(ridge=0.0).fit(X, Y)
    loo = s.loo_residuals()
    for i in (0, 7, 24):
        rest = np.delete(np.arange(25), i)
        refit = QuadraticSurrogate(ridge=0.0).fit(X[rest], Y[rest])
        np.testing.assert_allclose(loo[i], s.to_link(Y[i]) - refit.predict_link(X[i : i + 1])[0], rtol=1e-6)


def test_surrogate_round_trips_through_a_dict():
    X = np.random.default_rng(3).uniform(size=(20, 2))
    s = QuadraticSurrogate().fit(X, X.mean(axis=1))
    again = QuadraticSurrogate.from_dict(s.to_dict())
    np.testing.assert_array_equal(again.predict(X), s.predict(X))


# ------------------------------------------------------------------ the optimizer
CENTRES = np.array([[0.2, 0.3, 0.2], [0.8, 0.6, 0.7]])


def two_tasks(X):
    """Exactly logit-quadratic accuracies: sigmoid(2 - 8 ||x - c_k||^2)."""
    return sigmoid(2.0 - 8.0 * ((X[:, None, :] - CENTRES[None]) ** 2).sum(axis=2))


def test_design_is_space_filling_and_large_enough():
    opt = MAPOptimizer(3, (0.0, 1.0), 2, seed=0, batch_size=8)
    assert len(opt.design) == 32  # 2 x 10 terms, rounded up to a power of two for Sobol
    asks = []
    for _ in range(4):
        X = opt.ask()
        asks.append(X)
        opt.tell(X, two_tasks(X))
    np.testing.assert_array_equal(np.vstack(asks), opt.design)
    counts = np.stack([np.bincount((opt.design[:, j] * 4).astype(int), minlength=4) for j in range(3)])
    assert np.all(counts == 8)  # Sobol: every quarter of every axis holds exactly 8 of 32 points
    with pytest.raises(ValueError, match=r"design_size=19 is below twice the number of quadratic terms \(2 x 10 = 20"):
        MAPOptimizer(3, (0.0, 1.0), 2, design_size=19)
    assert len(MAPOptimizer(3, (0.0, 1.0), 2, design="lhs").design) == 20


def test_initial_genomes_are_asked_first_then_the_design():
    seeds = ((0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (2.0, -1.0, 0.5))  # the last one is clipped into the box
    plain = MAPOptimizer(3, (0.0, 1.0), 2, seed=0, batch_size=8)
    seeded = MAPOptimizer(3, (0.0, 1.0), 2, seed=0, batch_size=8, initial_genomes=seeds)
    first = seeded.ask()
    np.testing.assert_array_equal(first[:3], [[0, 0, 0], [1, 1, 0], [1, 0, 0.5]])
    np.testing.assert_array_equal(first[3:], plain.design[:5])
    assert len(seeded.design) == len(plain.design) + 3
    with pytest.raises(ValueError, match=r"map: initial_genomes must have shape \(n, 3\); got \(1, 2\)"):
        MAPOptimizer(3, (0.0, 1.0), 2, initial_genomes=((0.0, 1.0),))


def test_rounds_ask_true_pareto_points_when_the_surrogate_is_exact():
    opt = MAPOptimizer(3, (0.0, 1.0), 2, seed=0, batch_size=8, explore_fraction=0.25)
    while opt.n_evaluations < len(opt.design):
        X = opt.ask()
        opt.tell(X, two_tasks(X))
    report = opt.surrogate_report()
    assert report["n_samples"] == 32 and report["n_terms"] == 10
    np.testing.assert_allclose(report["r2_holdout"], [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(report["r2_train"], [1.0, 1.0], atol=1e-9)

    X = opt.ask()  # 6 predicted-front points, then 2 exploration points
    assert X.shape == (8, 3) and np.all((X >= 0) & (X <= 1))
    front = X[:6]
    # The true Pareto set of two isotropic bowls is the segment between their centres.
    t = np.clip(((front - CENTRES[0]) @ (CENTRES[1] - CENTRES[0])) / np.sum((CENTRES[1] - CENTRES[0]) ** 2), 0, 1)
    on_segment = CENTRES[0] + t[:, None] * (CENTRES[1] - CENTRES[0])
    np.testing.assert_allclose(front, on_segment, atol=0.08)  # NSGA-II converges to ~0.04 here
    assert np.ptp(t) > 0.5  # spread along the front, not six copies of one point
    opt.tell(X, two_tasks(X))
    # Reported members are evaluated for real; the front points dominate the whole design.
    genomes, objectives = opt.evaluated_front()
    np.testing.assert_array_equal(objectives, two_tasks(genomes))
    F = two_tasks(np.vstack([opt.design, front]))
    assert np.all(non_dominated_mask(F)[-6:])


def test_failed_evaluations_are_left_out_of_the_fit():
    opt = MAPOptimizer(2, (0.0, 1.0), 1, seed=0, batch_size=16, design_size=16)
    X = opt.ask()
    F = sigmoid(1 - 4 * ((X - 0.3) ** 2).sum(axis=1, keepdims=True))
    F[[2, 5]] = np.nan
    opt.tell(X, F)
    assert opt.surrogate_report()["n_samples"] == 14
    np.testing.assert_allclose(opt.surrogate_report()["r2_train"], [1.0], atol=1e-9)
    X = opt.ask()
    with pytest.raises(ValueError, match=r"map: link='logit' models accuracies in \[0, 1\]"):
        opt.tell(X, np.full((len(X), 1), 3.0))
