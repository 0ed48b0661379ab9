"""Item subsets: random draws and tinyBenchmarks-style k-means anchors."""
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
    with pytest.raises(ValueError, match=r"valid: \['random', 'anchors'\]"):
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
