"""Item subsets: random draws, tinyBenchmarks-style k-means anchors and D-optimal informative items."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.cluster import KMeans

from evomerge.fitness.irt import IRTParams
from evomerge.fitness.subsets import Subset, select_items


def blob_params() -> IRTParams:
    """Ten items in three tight, far-apart groups of 5, 3 and 2 in (a, b) space."""
    a = np.array([1.0, 1.01, 0.99, 1.0, 1.02, 3.0, 3.01, 2.99, 0.5, 0.51])
    b = np.array([-2.0, -2.01, -1.99, -2.02, -1.98, 0.0, 0.01, -0.01, 3.0, 3.02])
    return IRTParams(a, b, np.zeros(1))


def correctness_matrix(n_models: int = 40, n_items: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta, b = rng.normal(size=n_models), rng.normal(size=n_items)
    return (rng.random((n_models, n_items)) < expit(theta[:, None] - b[None, :])).astype(float)


def test_anchor_weights_are_the_cluster_shares_of_separated_blobs():
    subset = select_items(3, "anchors", seed=0, item_params=blob_params())
    groups = {0: set(range(5)), 1: set(range(5, 8)), 2: {8, 9}}
    found = {next(g for g, members in groups.items() if int(i) in members): w for i, w in zip(subset.items, subset.weights)}
    assert found == pytest.approx({0: 0.5, 1: 0.3, 2: 0.2})
    assert subset.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("features", ["irt", "correctness"])
def test_anchor_weights_match_an_independent_kmeans_run(features):
    responses = correctness_matrix()
    params = IRTParams(np.linspace(0.5, 2.0, 60), np.sin(np.arange(60.0)), np.zeros(40))
    subset = select_items(8, "anchors", seed=3, responses=responses, item_params=params, features=features)
    embeddings = responses.T if features == "correctness" else np.column_stack([params.discrimination, params.difficulty])
    labels = KMeans(n_clusters=8, n_init=10, random_state=3).fit(embeddings).labels_
    sizes = np.bincount(labels, minlength=8)
    assert np.array_equal(subset.items, np.sort(subset.items)) and len(set(subset.items.tolist())) == 8
    assert sorted(labels[subset.items].tolist()) == list(range(8)), "one anchor per cluster"
    np.testing.assert_allclose(subset.weights, sizes[labels[subset.items]] / 60)
    assert subset.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["random", "anchors"])
def test_same_seed_same_subset(method):
    responses = correctness_matrix()
    first = select_items(10, method, seed=11, responses=responses, features="correctness")
    again = select_items(10, method, seed=11, responses=responses, features="correctness")
    other = select_items(10, method, seed=12, responses=responses, features="correctness")
    assert first == again
    assert np.array_equal(first.items, again.items) and np.array_equal(first.weights, again.weights)
    assert first != other


def test_random_subset_is_uniform_and_seed_dependent():
    a = select_items(10, "random", seed=1, n_items=100)
    b = select_items(10, "random", seed=2, n_items=100)
    assert not np.array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.weights, np.full(10, 0.1))
    assert np.all(np.diff(a.items) > 0) and a.items.min() >= 0 and a.items.max() < 100
    # every item is equally likely: 2000 draws of 10 from 20 put each item in about half of them
    counts = np.zeros(20)
    for seed in range(2000):
        counts[select_items(10, "random", seed=seed, n_items=20).items] += 1
    assert np.abs(counts / 2000 - 0.5).max() < 0.05


def test_n_larger_than_the_task_names_both_numbers():
    with pytest.raises(ValueError, match=r"n=31 .* 30 items"):
        select_items(31, "random", seed=0, n_items=30)
    with pytest.raises(ValueError, match=r"n=11 .* 10 items"):
        select_items(11, "anchors", seed=0, item_params=blob_params())


def test_unknown_method_and_features_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['random', 'anchors', 'informative'\]"):
        select_items(2, "stratified", seed=0, n_items=10)
    with pytest.raises(ValueError, match=r"valid: \['irt', 'correctness'\]"):
        select_items(2, "anchors", seed=0, item_params=blob_params(), features="text")


def test_too_few_distinct_embeddings_is_an_error_not_a_duplicate_anchor():
    responses = np.tile(np.array([[1.0], [0.0]]), (1, 12))  # every item has the same column
    with pytest.raises(ValueError, match="only 1 of 12 items have distinct embeddings"):
        select_items(3, "anchors", seed=0, responses=responses, features="correctness")


def test_subset_round_trips_through_json_exactly():
    subset = select_items(3, "anchors", seed=5, item_params=blob_params())
    restored = Subset.from_dict(json.loads(json.dumps(subset.to_dict())))
    assert np.array_equal(restored.items, subset.items) and np.array_equal(restored.weights, subset.weights)
    assert restored.to_dict() == subset.to_dict()


def test_informative_items_by_hand_spread_over_the_population():
    # Two models, theta = -2 and +2; items a = (1.1, 1.1, 1, 1), b = (-2, -2, 2, 2).
    # First pick, gain sum_i log(1 + a^2 P(1 - P)) with the prior's information 1:
    #   item 0: log(1 + 1.21 / 4) + log(1 + 1.21 s(4.4)(1 - s(4.4))) = 0.2643 + 0.0144 = 0.2787
    #   item 2: log(1 + 1 / 4) + log(1 + s(4)(1 - s(4)))            = 0.2231 + 0.0175 = 0.2407
    # Second pick, with model 1's information now 1.3025 and model 2's 1.01447:
    #   item 1: log(1 + 0.3025 / 1.3025) + log(1 + 0.01447 / 1.01447) = 0.2090 + 0.0142 = 0.2232
    #   item 2: log(1 + 0.0177 / 1.3025) + log(1 + 0.25 / 1.01447)    = 0.0135 + 0.2203 = 0.2338
    # so the design takes one item for each model, where the top-2 by information takes 0 and 1.
    params = IRTParams(np.array([1.1, 1.1, 1.0, 1.0]), np.array([-2.0, -2.0, 2.0, 2.0]), np.array([-2.0, 2.0]))
    subset = select_items(2, "informative", seed=0, item_params=params)
    np.testing.assert_array_equal(subset.items, [0, 2])
    np.testing.assert_array_equal(subset.weights, [0.5, 0.5])
    # designed for the first model alone, both picks are its items
    np.testing.assert_array_equal(select_items(2, "informative", seed=0, item_params=params,
                                               abilities=np.array([-2.0])).items, [0, 1])


def test_informative_items_match_a_brute_force_log_det_greedy_in_two_dimensions():
    rng = np.random.default_rng(4)
    a, b, theta = rng.gamma(2.0, 0.5, size=(30, 2)), rng.normal(size=30), rng.normal(size=(12, 2))
    params = IRTParams(a, b, theta)
    logits = theta @ a.T - np.linalg.norm(a, axis=1) * b  # (models, items)
    w = expit(logits) * (1 - expit(logits))

    def objective(items: list[int]) -> float:  # sum_i log det(I + sum_j w_ij a_j a_j^T), slogdet
        return sum(np.linalg.slogdet(np.eye(2) + (a[items].T * w[i, items]) @ a[items])[1] for i in range(12))

    chosen: list[int] = []
    for _ in range(6):
        chosen.append(max((j for j in range(30) if j not in chosen), key=lambda j: objective(chosen + [j])))
    np.testing.assert_array_equal(select_items(6, "informative", seed=0, item_params=params).items, sorted(chosen))


def test_informative_items_skip_pinned_items_and_say_when_too_few_are_left():
    params = IRTParams(np.full(5, 1.0), np.zeros(5), np.zeros(3), pinned=np.array([True, False, True, False, False]))
    assert set(select_items(3, "informative", seed=0, item_params=params).items) == {1, 3, 4}
    with pytest.raises(ValueError, match=r"n=4 informative items: only 3 of 5 items have estimated parameters"):
        select_items(4, "informative", seed=0, item_params=params)
    with pytest.raises(ValueError, match="informative subsets need item_params"):
        select_items(2, "informative", seed=0, n_items=5)
