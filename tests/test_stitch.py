"""Localize and stitch (`evomerge.search.optimizers._stitch`) against hand-worked examples and a
brute force over every binary genome."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from evomerge.search.optimizers import Optimizer, kept_parts, load_state, make_optimizer, save_state, stitch_genome

L, K = 4, 3  # layers, experts; gene (layer, expert) at layer * K + expert
DIM = L * K


def window_parts(width: int = 2) -> tuple[list[tuple[float, ...]], list[int]]:
    """Each expert at 1 in each window of `width` layers (BoundSpace.window_parts' order)."""
    parts, groups = [], []
    for start in range(L - width + 1):
        for k in range(K):
            g = np.zeros((L, K))
            g[start:start + width, k] = 1.0
            parts.append(tuple(g.ravel()))
            groups.append(k)
    return parts, groups


def skills(X: np.ndarray, scale=(0.6, 0.6, 0.6)) -> np.ndarray:
    """Task k: 0.3 + scale_k x (the share of expert k's own layers k..k+1 taken at weight) - 0.1 x
    every weight outside its expert's own layers (interference, on every task). (n, K)"""
    out = []
    for x in np.asarray(X).reshape(-1, L, K):
        off = sum(x[layer, j] for j in range(K) for layer in range(L) if not j <= layer < j + 2)
        out.append([0.3 + scale[k] * x[k:k + 2, k].mean() - 0.1 * off for k in range(K)])
    return np.clip(np.array(out), 0.0, 1.0)


def make(seed: int = 0, **settings):
    parts, groups = window_parts()
    return make_optimizer("stitch", DIM, (0.0, 1.0), K, seed=seed, parts=parts, part_groups=groups,
                          empty=(0.0,) * DIM, **{"inner": "random", **settings})


def run(opt, evaluations: int, objective=skills) -> list[np.ndarray]:
    asked = []
    while opt.n_evaluations < evaluations:
        X = opt.ask()
        opt.tell(X, objective(X))
        asked.append(X)
    return asked


def test_kept_parts_take_the_largest_gain_on_one_objective_not_the_best_mean():
    """Hand-worked: group 0's second part gains 0.5 on objective 1 (mean 0.45) and beats the first,
    which gains 0.2 on both (mean 0.5, the larger mean); group 1's parts tie on gain and the larger
    mean wins."""
    F_parts = np.array([[0.5, 0.5], [0.2, 0.8], [0.4, 0.3], [0.3, 0.5]])
    kept = kept_parts(F_parts, np.array([0, 0, 1, 1]), np.array([0.3, 0.3]), np.array([0.5, 0.5]))
    assert kept.tolist() == [1, 3]


def test_a_stitched_genome_is_the_empty_genome_plus_each_parts_change_clipped():
    empty = np.array([0.0, 0.5, 0.2])
    parts = np.array([[1.0, 0.5, 0.2], [0.0, 0.5, 0.9], [0.0, 0.5, 0.9]])  # the last two both raise gene 2
    assert stitch_genome(parts, empty, np.zeros(3), np.ones(3)).tolist() == [1.0, 0.5, 1.0]  # 0.2 + 0.7 + 0.7 clipped


def test_stitching_finds_the_brute_force_optimum_every_corner_misses():
    """Each expert's skill sits in its own two layers; taking an expert anywhere else costs every task.
    Over all 2^12 binary genomes the best mean is 0.9 (every expert in its own layers only); the
    best corner (experts whole) scores far less. Localize keeps each expert's own window; the pairs,
    then the triple are stitched, and the triple is the brute-force optimum."""
    everything = np.array(list(itertools.product((0.0, 1.0), repeat=DIM)))
    means = skills(everything).mean(axis=1)
    corners = np.array([np.repeat(np.array(w)[None], L, axis=0).ravel() for w in itertools.product((0.0, 1.0), repeat=K)])
    assert means.max() == pytest.approx(0.9) and skills(corners).mean(axis=1).max() < 0.6

    opt = make(stitches=5)
    run(opt, 9 + 1 + 4)  # empty + 9 parts, then the 4 stitched merges
    state = opt.strategy_state
    parts, _ = window_parts()
    assert state.kept.tolist() == [list(parts[i]) for i in (0, 4, 8)]  # expert k's part starting at layer k
    assert state.stitched == [[0, 1], [0, 2], [1, 2], [0, 1, 2]]  # pairs (tied predictions: in order), the beam's one triple
    assert opt.best_score == pytest.approx(means.max())
    assert np.array_equal(opt.best_genome, everything[means.argmax()])


def test_trimming_narrows_a_window_wider_than_the_skill_to_the_layers_that_carry_it():
    """Windows of 3 layers hold each expert's 2 skill layers plus one more (-0.1 on every task): the best
    kept window of expert k still carries the extra layer, and stitching all three scores 0.6. With
    `trim`, each kept window is also tried one layer narrower at either end; the groups keep the two-layer
    windows, and the stitched triple is the brute-force optimum, 0.9."""
    parts, groups = window_parts(width=3)
    blocks = [layer for layer in range(L) for _ in range(K)]
    results = {}
    for trim in (False, True):
        opt = make_optimizer("stitch", DIM, (0.0, 1.0), K, seed=0, parts=parts, part_groups=groups,
                             empty=(0.0,) * DIM, gene_blocks=blocks, trim=trim, stitches=4, inner="random")
        run(opt, 40)
        results[trim] = opt
    assert results[False].best_score == pytest.approx(0.6)
    kept = results[True].strategy_state.kept.reshape(K, L, K)
    for k in range(K):
        expected = np.zeros((L, K))
        expected[k:k + 2, k] = 1.0
        assert np.array_equal(kept[k], expected), k
    assert results[True].best_score == pytest.approx(0.9)


def test_pairs_go_in_the_order_of_their_predicted_gain_and_stop_at_the_stitches():
    """Hand-worked: skills worth 0.2, 0.4, 0.6 on tasks 0, 1, 2 -> predicted pair means 0.3 + (sum)/3:
    (1, 2) first, then (0, 2), (0, 1); `stitches=2` stops after two, and the inner optimizer starts."""
    def objective(X):
        return skills(X, scale=(0.2, 0.4, 0.6))

    opt = make(stitches=2, batch_size=16)
    run(opt, 10 + 2, objective)
    assert opt.strategy_state.stitched == [[1, 2], [0, 2]]
    X = opt.ask()
    assert opt.strategy_state.phase == "refine" and opt.inner is not None
    opt.tell(X, objective(X))


def test_no_genome_is_evaluated_twice_and_the_inner_optimizer_starts_from_the_best():
    """The refine phase seeds the inner optimizer with the best genomes so far; they are told from
    the cache, so every asked genome is new."""
    opt = make(stitches=4, inner_seeds=6)
    asked = np.vstack(run(opt, 60))
    assert len(np.unique(asked, axis=0)) == len(asked)
    seeds = np.array(opt.inner.settings.initial_genomes)
    assert len(seeds) == 6 and skills(seeds[:1]).mean() == pytest.approx(0.9)  # the stitched triple first


@pytest.mark.parametrize("evaluations", [4, 12, 20, 30])  # mid-localize, mid-trim, mid-stitch, refine
def test_checkpoint_round_trip_gives_identical_next_asks(evaluations, tmp_path):
    live = make(seed=5, stitches=4, batch_size=4, inner="map", inner_settings={"batch_size": 4}, trim=True,
                gene_blocks=[layer for layer in range(L) for _ in range(K)])
    run(live, evaluations)
    save_state(live.state(), tmp_path / "state.json")
    resumed = Optimizer.from_state(load_state(tmp_path / "state.json"))
    for _ in range(3):
        X = live.ask()
        np.testing.assert_array_equal(resumed.ask(), X)
        for opt in (live, resumed):
            opt.tell(X, skills(X))
    assert resumed.best_score == live.best_score


def test_settings_errors_name_the_field():
    parts, groups = window_parts()
    with pytest.raises(ValueError, match="stitch: needs parts, part_groups and empty"):
        make_optimizer("stitch", DIM, (0.0, 1.0), K)
    with pytest.raises(ValueError, match="part_groups must number the groups 0..G-1"):
        make_optimizer("stitch", DIM, (0.0, 1.0), K, parts=parts, part_groups=[g + 1 for g in groups],
                       empty=(0.0,) * DIM)
    with pytest.raises(ValueError, match=r"stitch: inner must name another optimizer"):
        make(inner="stitch")
    with pytest.raises(ValueError, match=r"stitch: inner optimizer 'map': map: unknown setting\(s\) \['batchsize'\]"):
        make(inner="map", inner_settings={"batchsize": 8})  # at construction, before any evaluation
    with pytest.raises(ValueError, match=r"stitch: parts must have shape \(P, 12\)"):
        make_optimizer("stitch", DIM, (0.0, 1.0), K, parts=[(0.0,) * 3], part_groups=[0], empty=(0.0,) * DIM)
