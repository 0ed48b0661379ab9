"""Pareto archive over per-task objectives (all MAXIMISED), linked to evaluation record ids.

The archive only sees ``(candidate_id, objectives)`` pairs, so it does not care how evaluations are
budgeted or counted. Hypervolume uses pymoo's ``pymoo.indicators.hv.HV`` (which minimises, so the
objectives and the reference point are negated); crowding distance follows pymoo's
``calc_crowding_distance`` (NSGA-II distance averaged over objectives, extremes infinite).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

__all__ = [
    "ParetoArchive",
    "ParetoMember",
    "crowding_distance",
    "dominates",
    "hypervolume",
    "non_dominated_mask",
]

CandidateId = Any  # str or int: whatever the run store uses; must be JSON-able


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a is at least as good as b everywhere and better somewhere (maximisation)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a >= b) and np.any(a > b))


def non_dominated_mask(F: np.ndarray) -> np.ndarray:
    """(n,) True for rows no other row dominates (maximisation). Duplicate rows are all kept."""
    F = np.asarray(F, dtype=float)  # (n, M)
    if F.ndim != 2:
        raise ValueError(f"F must be 2-D (n, M); got {F.shape}")
    geq = np.all(F[:, None, :] >= F[None, :, :], axis=2)  # (n, n): row j >= row i everywhere
    gt = np.any(F[:, None, :] > F[None, :, :], axis=2)
    dominated_by = geq & gt  # [j, i]: j dominates i
    return ~dominated_by.any(axis=0)


def crowding_distance(F: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of one front, averaged over objectives; extremes get inf. (n,)"""
    F = np.asarray(F, dtype=float)  # (n, M)
    n, M = F.shape
    if n <= 2:
        return np.full(n, np.inf)
    dist = np.zeros(n)
    for m in range(M):
        order = np.argsort(F[:, m], kind="mergesort")
        values = F[order, m]
        span = values[-1] - values[0]
        gaps = np.zeros(n)
        gaps[0] = gaps[-1] = np.inf
        if span > 0:
            gaps[1:-1] = (values[2:] - values[:-2]) / span
        dist[order] += gaps
    return dist / M


def hypervolume(F: np.ndarray, ref: Iterable[float] | float = 0.0) -> float:
    """Volume dominated by the rows of F (maximisation) and bounded below by ``ref``."""
    from pymoo.indicators.hv import HV

    F = np.asarray(F, dtype=float)
    if F.ndim != 2:
        raise ValueError(f"F must be 2-D (n, M); got {F.shape}")
    r = np.broadcast_to(np.asarray(ref, dtype=float), (F.shape[1],))
    inside = F[np.all(F > r, axis=1)]  # points not beyond ref add nothing
    if len(inside) == 0:
        return 0.0
    return float(HV(ref_point=-r, norm_ref_point=False)(-inside))


@dataclass(frozen=True)
class ParetoMember:
    candidate_id: CandidateId
    objectives: np.ndarray  # (M,)


class ParetoArchive:
    """Non-dominated set of evaluated candidates.

    ``add`` keeps a candidate only if no member dominates or equals it, and drops the members it
    dominates. Candidates with a NaN objective (failed evaluations) are never added.
    """

    def __init__(self, n_objectives: int | None = None):
        self.n_objectives = n_objectives
        self._ids: list[CandidateId] = []
        self._F = np.zeros((0, n_objectives or 0))

    def add(self, candidate_id: CandidateId, objectives: Iterable[float]) -> bool:
        """Offer one evaluated candidate; True if it is now a member."""
        f = np.asarray(objectives, dtype=float).reshape(-1)
        if self.n_objectives is None:
            self.n_objectives = len(f)
            self._F = np.zeros((0, len(f)))
        if len(f) != self.n_objectives:
            raise ValueError(
                f"candidate {candidate_id!r}: {len(f)} objectives, but this archive holds {self.n_objectives}"
            )
        if np.any(np.isinf(f)):
            raise ValueError(f"candidate {candidate_id!r}: objectives must be finite or NaN; got {f.tolist()}")
        if candidate_id in self._ids:
            raise ValueError(f"candidate {candidate_id!r} is already a member of the archive")
        if np.any(np.isnan(f)):
            return False
        if len(self._F):
            weakly_better = np.all(self._F >= f[None, :], axis=1)  # member >= candidate everywhere
            if weakly_better.any():  # dominated by, or equal to, a member
                return False
            dominated = np.all(f[None, :] >= self._F, axis=1)  # candidate >= member (and not equal)
            keep = ~dominated
            self._F = self._F[keep]
            self._ids = [i for i, k in zip(self._ids, keep) if k]
        self._F = np.vstack([self._F, f[None, :]])
        self._ids.append(candidate_id)
        return True

    @property
    def members(self) -> list[ParetoMember]:
        return [ParetoMember(rid, f.copy()) for rid, f in zip(self._ids, self._F)]

    @property
    def candidate_ids(self) -> list[CandidateId]:
        return list(self._ids)

    @property
    def objectives(self) -> np.ndarray:
        """(k, M) objectives of the members, in insertion order."""
        return self._F.copy()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, candidate_id: object) -> bool:
        return candidate_id in self._ids

    def hypervolume(self, ref: Iterable[float] | float = 0.0) -> float:
        """Hypervolume of the members above ``ref`` (default 0: accuracies)."""
        if not len(self._F):
            return 0.0
        return hypervolume(self._F, ref)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; Python floats round-trip exactly through json."""
        return {
            "n_objectives": self.n_objectives,
            "candidate_ids": list(self._ids),
            "objectives": self._F.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParetoArchive":
        archive = cls(data["n_objectives"])
        ids = data["candidate_ids"] if "candidate_ids" in data else data["record_ids"]  # older checkpoints
        F = np.asarray(data["objectives"], dtype=float).reshape(len(ids), -1)
        archive._ids = list(ids)
        archive._F = F if len(F) else np.zeros((0, archive.n_objectives or 0))
        return archive

    def __repr__(self) -> str:
        return f"ParetoArchive(members={len(self)}, n_objectives={self.n_objectives})"
