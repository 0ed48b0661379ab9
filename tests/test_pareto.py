"""Pareto archive against brute force, hypervolume against hand computation, crowding vs pymoo."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.search.pareto import (
    ParetoArchive,
    crowding_distance,
    dominates,
    hypervolume,
    non_dominated_mask,
)


def brute_force_front(F: np.ndarray) -> set[tuple[float, ...]]:
    """Rows no other row dominates, by the definition, one pair at a time (maximisation)."""
    front = set()
    for i, f in enumerate(F):
        if not any(np.all(g >= f) and np.any(g > f) for j, g in enumerate(F) if j != i):
            front.add(tuple(f))
    return front


@pytest.mark.parametrize("decimals", [None, 1])  # continuous, and coarse values with many ties
@pytest.mark.parametrize("M", [2, 3])
def test_archive_matches_brute_force_non_dominated_sort(M, decimals):
    F = np.random.default_rng(M).random((150, M))
    if decimals is not None:
        F = np.round(F, decimals)
    archive = ParetoArchive()
    for i, f in enumerate(F):
        archive.add(f"rec{i}", f)
    expected = brute_force_front(F)
    assert {tuple(f) for f in archive.objectives} == expected
    assert len(archive) == len(expected)  # duplicates of a member are not added twice
    assert {tuple(f) for f in F[non_dominated_mask(F)]} == expected
    for member in archive.members:  # ids stay linked to their own objectives
        np.testing.assert_array_equal(member.objectives, F[int(member.candidate_id[3:])])


def test_add_reports_membership_and_evicts_dominated_members():
    archive = ParetoArchive(2)
    assert archive.add("a", [0.5, 0.5])
    assert archive.add("b", [0.9, 0.1])
    assert not archive.add("c", [0.4, 0.4])  # dominated
    assert not archive.add("d", [0.5, 0.5])  # equal to a member
    assert archive.add("e", [0.6, 0.5])  # dominates "a"
    assert archive.candidate_ids == ["b", "e"]
    assert not archive.add("f", [np.nan, 1.0])  # failed evaluation
    with pytest.raises(ValueError, match="candidate 'b' is already a member"):
        archive.add("b", [1.0, 1.0])
    with pytest.raises(ValueError, match="3 objectives, but this archive holds 2"):
        archive.add("g", [1, 1, 1])
    assert dominates([1, 1], [1, 0]) and not dominates([1, 1], [1, 1])


def test_hypervolume_matches_hand_computation():
    F = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]])
    # Staircase above the origin: 0.2 * 0.8 + (0.5 - 0.2) * 0.5 + (0.8 - 0.5) * 0.2 = 0.37.
    assert hypervolume(F) == pytest.approx(0.37, abs=1e-12)
    # With ref (0.1, 0.1): 0.1 * 0.7 + 0.3 * 0.4 + 0.3 * 0.1 = 0.22.
    assert hypervolume(F, ref=[0.1, 0.1]) == pytest.approx(0.22, abs=1e-12)
    archive = ParetoArchive()
    for i, f in enumerate(F):
        archive.add(i, f)
    archive.add(3, [0.3, 0.3])  # dominated: no change
    assert archive.hypervolume() == pytest.approx(0.37, abs=1e-12)
    assert hypervolume(np.array([[0.5, 0.5, 0.5]])) == pytest.approx(0.125)
    assert hypervolume(np.array([[0.5, -0.1]])) == 0.0  # beyond the reference point
    assert ParetoArchive().hypervolume() == 0.0


def test_crowding_distance_matches_pymoo():
    from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance

    F = np.random.default_rng(0).random((12, 3))
    np.testing.assert_allclose(crowding_distance(F), calc_crowding_distance(-F))
    assert np.all(np.isinf(crowding_distance(F[:2])))


def test_archive_round_trips_through_json():
    archive = ParetoArchive()
    for i, f in enumerate(np.random.default_rng(1).random((40, 2))):
        archive.add(i, f)
    again = ParetoArchive.from_dict(json.loads(json.dumps(archive.to_dict())))
    assert again.candidate_ids == archive.candidate_ids
    np.testing.assert_array_equal(again.objectives, archive.objectives)
    assert again.add(100, [2.0, 2.0]) and len(again) == 1
