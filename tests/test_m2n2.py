"""M2N2: hand-worked test vectors, guards, crossover algebra, and the optimizer's archive rules."""
from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.optimizers import (
    M2N2Optimizer,
    allowed_splits,
    attraction,
    crossover,
    parent_a_probabilities,
    parent_b_probabilities,
    replacement_index,
    shared_fitness,
)

S = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


# ------------------------------------------------------------------ the brief's test vectors
def test_shared_fitness_attraction_and_replacement_test_vectors():
    # z = [2, 1, 1, 1]: member 0 gets 1/2 + 1, member 1 gets 1/2 + 1, member 2 gets 1.
    np.testing.assert_allclose(shared_fitness(S, alpha=1.0), [1.5, 1.5, 1.0])
    np.testing.assert_allclose(parent_a_probabilities(S), [0.375, 0.375, 0.25])
    # F_0 = [.5, 1, 0, 0]; member 1 gains item 2 (+1), member 2 gains item 3 (+1).
    np.testing.assert_allclose(attraction(S, 0), [0.0, 1.0, 1.0])
    np.testing.assert_allclose(parent_b_probabilities(S, 0), [0.0, 0.5, 0.5])
    # With the child [1, 1, 1, 0]: z = [3, 2, 2, 1]; fitness [5/6, 5/6, 1, 4/3] -> member 0 goes.
    assert replacement_index(S, np.array([1, 1, 1, 0])) == 0


def test_alpha_zero_is_plain_accuracy_and_unsolved_items_count_zero():
    np.testing.assert_allclose(shared_fitness(S, alpha=0.0), S.sum(axis=1))
    with_unsolved = np.hstack([S, np.zeros((3, 1))])  # z_j = 0 for the new item: no division by 0
    np.testing.assert_allclose(shared_fitness(with_unsolved), [1.5, 1.5, 1.0])


def test_a_child_that_is_the_worst_is_not_inserted():
    assert replacement_index(S, np.zeros(4)) is None


# ------------------------------------------------------------------ degenerate cases
def test_zero_attraction_falls_back_to_uniform_over_the_others():
    dominant = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0]], dtype=float)  # member 0 solves everything
    np.testing.assert_allclose(attraction(dominant, 0), [0, 0, 0])
    np.testing.assert_allclose(parent_b_probabilities(dominant, 0), [0.0, 0.5, 0.5])


def test_zero_fitness_falls_back_to_uniform_and_archive_of_one_pairs_with_itself():
    np.testing.assert_allclose(parent_a_probabilities(np.zeros((4, 3))), [0.25] * 4)
    np.testing.assert_allclose(parent_b_probabilities(np.ones((1, 3)), 0), [1.0])


def test_identical_parents_give_a_mutated_clone_not_a_wasted_copy():
    opt = M2N2Optimizer(2, (0.0, 1.0), 1, seed=0, archive_size=1, batch_size=3, mutation_std=0.0,
                        initial_genomes=[[0.5, 0.5]])
    X = opt.ask()
    opt.tell(X, [[0.5]], responses=[[1.0, 0.0]])
    children = opt.ask()
    assert np.all(opt.last_parents == 0)
    assert not np.any(np.all(children == 0.5, axis=1))
    assert np.all(np.abs(children - 0.5) < 0.3)


# ------------------------------------------------------------------ crossover
def test_crossover_mixes_before_and_after_the_split_with_swapped_ratios():
    a, b = np.zeros(6), np.ones(6)
    layers = np.array([0, 0, 1, 1, 2, 2])
    child = crossover(a, b, split=1, ratio=0.25, layer_index=layers)
    np.testing.assert_allclose(child, [0.25, 0.25, 0.75, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(crossover(a, b, 2, 0.0, layers), [0, 0, 0, 0, 1, 1])  # one-point
    np.testing.assert_allclose(crossover(a, b, 0, 0.3, layers), np.full(6, 0.7))  # no genes before
    np.testing.assert_array_equal(allowed_splits(layers[::-1]), [0, 1, 2])


def _linear_merge(genome, base, task_vectors):
    """Task arithmetic per layer: W_l = base_l + sum_k g[k, l] * tau[k, l]. (L, *shape)"""
    L, K = base.shape[0], task_vectors.shape[0]
    g = genome.reshape(K, L)  # expert-major layout: genes are NOT sorted by layer
    return base + np.einsum("kl,kl...->l...", g, task_vectors)


def test_crossover_of_genomes_equals_crossover_of_linearly_merged_weights():
    rng = np.random.default_rng(0)
    L, K = 5, 3
    base = rng.normal(size=(L, 4, 2))
    taus = rng.normal(size=(K, L, 4, 2))
    gene_layer = np.tile(np.arange(L), K)  # layer of each gene in the expert-major genome
    ga, gb = rng.random(K * L), rng.random(K * L)
    for split in allowed_splits(gene_layer):
        ratio = rng.random()
        merged_child = _linear_merge(crossover(ga, gb, split, ratio, gene_layer), base, taus)
        child_of_merged = crossover(_linear_merge(ga, base, taus), _linear_merge(gb, base, taus), split, ratio)
        np.testing.assert_allclose(merged_child, child_of_merged, atol=1e-12)
    # The identity needs linearity: a non-linear merge (squared coefficients) breaks it.
    squared = lambda g: _linear_merge(g**2, base, taus)  # noqa: E731
    assert not np.allclose(squared(crossover(ga, gb, 2, 0.3, gene_layer)),
                           crossover(squared(ga), squared(gb), 2, 0.3))


def test_children_never_split_inside_a_layer_block():
    layers = [0, 0, 0, 1, 1, 2, 2, 2]
    opt = M2N2Optimizer(8, (0.0, 1.0), 1, seed=1, archive_size=2, batch_size=50, mutation_std=0.0,
                        gene_blocks=layers, initial_genomes=[[0.0] * 8, [1.0] * 8])
    X = opt.ask()
    opt.tell(X, [[0.5], [0.5]], responses=[[1, 0], [0, 1]])
    children = opt.ask()  # each gene is the weight on the all-ones parent (or its complement)
    for block in ([0, 1, 2], [3, 4], [5, 6, 7]):
        np.testing.assert_allclose(children[:, block], children[:, block[:1]].repeat(len(block), 1))
    assert len(np.unique(np.round(children[:, 0] - children[:, 7], 12))) > 2  # splits do vary


# ------------------------------------------------------------------ the optimizer's archive
def _seeded(batch_size=1, **kw):
    opt = M2N2Optimizer(2, (0.0, 1.0), 1, seed=0, archive_size=3, batch_size=batch_size,
                        initial_genomes=[[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], **kw)
    X = opt.ask()
    opt.tell(X, S.mean(axis=1, keepdims=True), responses=S)
    return opt


def test_optimizer_inserts_the_test_vector_child_over_member_0():
    opt = _seeded()
    child = opt.ask()
    opt.tell(child, [[0.75]], responses=[[1, 1, 1, 0]])
    np.testing.assert_array_equal(opt.archive_genomes[0], child[0])
    np.testing.assert_array_equal(opt.archive_responses, [[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1]])


def test_optimizer_samples_parents_with_the_test_vector_probabilities():
    opt = _seeded(batch_size=200)
    parents = []
    for _ in range(20):  # 4000 children; all-zero rows are the worst, so the archive never changes
        X = opt.ask()
        parents.append(opt.last_parents)
        opt.tell(X, np.zeros((len(X), 1)), responses=np.zeros((len(X), 4)))
    P = np.vstack(parents)
    np.testing.assert_allclose(np.bincount(P[:, 0], minlength=3) / len(P), [0.375, 0.375, 0.25], atol=0.03)
    b_given_0 = np.bincount(P[P[:, 0] == 0, 1], minlength=3) / np.sum(P[:, 0] == 0)
    np.testing.assert_allclose(b_given_0, [0.0, 0.5, 0.5], atol=0.05)
    assert np.all(P[:, 0] != P[:, 1])


def test_failed_evaluations_never_enter_the_archive():
    opt = _seeded(batch_size=2)
    before = opt.archive_genomes.copy()
    X = opt.ask()
    opt.tell(X, [[np.nan], [np.nan]], responses=[[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(opt.archive_genomes, before)


def test_switching_between_responses_and_objectives_is_refused():
    opt = _seeded()
    X = opt.ask()
    with pytest.raises(ValueError, match="m2n2: this run was told responses so far; pass responses every time"):
        opt.tell(X, [[0.5]])
    opt.tell(X, [[0.5]], responses=[[0, 0, 0, 0]])  # the refused tell changed nothing
    assert opt.n_evaluations == 4 and opt.pending is None
