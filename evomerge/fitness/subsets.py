"""Which items of a task a candidate merge is scored on, and how much each one counts.

`select_items(n, "random", ...)` draws n items uniformly without replacement, each weighted 1/n.
`select_items(n, "anchors", ...)` follows tinyBenchmarks' anchor points
(tutorials/anchor_points.ipynb in felipemaiapolo/tinyBenchmarks): k-means with n clusters over
item embeddings -- the IRT parameters (discrimination, difficulty) of each item, or its column
of correct/wrong answers across the calibration models -- one anchor per cluster, weighted by
the cluster's share of the items. Two changes from the reference: the anchor is the cluster
member nearest its centroid (the reference takes the nearest item overall, which can pick the
same item for two clusters or an item whose own cluster is another), and `n_init` is fixed
explicitly rather than "auto" so results do not move with scikit-learn's default.

Subsets are per task: call once per task's response matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from evomerge.fitness.irt import IRTParams

__all__ = ["METHODS", "Subset", "select_items"]

METHODS = ("random", "anchors")
_FEATURES = ("irt", "correctness")


@dataclass(frozen=True, eq=False)
class Subset:
    """Item indices (sorted, into the task's full item list) with weights summing to 1.

    Two subsets are equal when every field, every index and every weight is.
    """

    items: np.ndarray  # (n,) int
    weights: np.ndarray  # (n,) float, aligned with items
    method: str
    n: int
    seed: int
    n_total: int  # items in the full task

    def __post_init__(self) -> None:
        items = np.asarray(self.items, dtype=np.int64)
        weights = np.asarray(self.weights, dtype=np.float64)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "weights", weights)
        if items.shape != (self.n,) or weights.shape != (self.n,):
            raise ValueError(f"Subset of n={self.n} got items {items.shape} and weights {weights.shape}")
        if np.any(np.diff(items) <= 0):
            raise ValueError(f"Subset items must be sorted and distinct, got {items.tolist()}")
        if self.n and (items[0] < 0 or items[-1] >= self.n_total):
            raise ValueError(f"Subset items must lie in [0, {self.n_total}), got {items.tolist()}")
        if not np.isclose(weights.sum(), 1.0):
            raise ValueError(f"Subset weights must sum to 1, they sum to {weights.sum()}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subset) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((tuple(self.items.tolist()), tuple(self.weights.tolist()), self.method, self.n, self.seed, self.n_total))

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items.tolist(),
            "weights": self.weights.tolist(),
            "method": self.method,
            "n": self.n,
            "seed": self.seed,
            "n_total": self.n_total,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Subset":
        return cls(
            items=np.asarray(data["items"], dtype=np.int64),
            weights=np.asarray(data["weights"], dtype=np.float64),
            method=str(data["method"]),
            n=int(data["n"]),
            seed=int(data["seed"]),
            n_total=int(data["n_total"]),
        )


def _total_items(n_items: int | None, responses: np.ndarray | None, item_params: IRTParams | None) -> int:
    sizes = {}
    if n_items is not None:
        sizes["n_items"] = int(n_items)
    if responses is not None:
        sizes["responses.shape[1]"] = int(np.shape(responses)[1])
    if item_params is not None:
        sizes["item_params.n_items"] = item_params.n_items
    if not sizes:
        raise ValueError("select_items needs the task size: pass n_items, responses or item_params")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inconsistent task sizes: {sizes}")
    return next(iter(sizes.values()))


def _item_embeddings(features: str, responses: np.ndarray | None, item_params: IRTParams | None) -> np.ndarray:
    if features == "irt":
        if item_params is None:
            raise ValueError("anchors with features='irt' need item_params (from fit_irt)")
        a = item_params.discrimination.reshape(item_params.n_items, -1)  # (I, D)
        return np.column_stack([a, item_params.difficulty])  # (I, D + 1), as tinyBenchmarks' X
    if features == "correctness":
        if responses is None:
            raise ValueError("anchors with features='correctness' need the calibration responses (models, items)")
        return np.asarray(responses, dtype=np.float64).T  # (I, M): one row per item
    raise ValueError(f"unknown anchor features {features!r}; valid: {list(_FEATURES)}")


def _anchors(n: int, embeddings: np.ndarray, seed: int, n_init: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    distinct = np.unique(embeddings, axis=0).shape[0]
    if distinct < n:
        raise ValueError(
            f"cannot form {n} anchor clusters: only {distinct} of {embeddings.shape[0]} items have "
            "distinct embeddings; lower n or cluster on other features"
        )
    kmeans = KMeans(n_clusters=n, n_init=n_init, random_state=seed).fit(embeddings)
    labels = kmeans.labels_  # (I,)
    anchors = np.empty(n, dtype=np.int64)
    sizes = np.empty(n, dtype=np.float64)
    for cluster in range(n):
        members = np.flatnonzero(labels == cluster)
        distances = np.linalg.norm(embeddings[members] - kmeans.cluster_centers_[cluster], axis=1)
        anchors[cluster] = members[np.argmin(distances)]
        sizes[cluster] = members.size
    order = np.argsort(anchors)
    return anchors[order], sizes[order] / sizes.sum()


def select_items(
    n: int,
    method: str = "random",
    *,
    seed: int,
    n_items: int | None = None,
    responses: np.ndarray | None = None,
    item_params: IRTParams | None = None,
    features: str = "irt",
    n_init: int = 10,
) -> Subset:
    """Choose n of a task's items; the same arguments and seed always give the same Subset.

    The task size comes from `n_items`, `responses` (models, items) or `item_params`. "anchors"
    clusters with `features="irt"` (needs `item_params`) or `features="correctness"` (needs
    `responses`), using k-means with `random_state=seed` and `n_init` restarts.
    """
    if method not in METHODS:
        raise ValueError(f"unknown subset method {method!r}; valid: {list(METHODS)}")
    total = _total_items(n_items, responses, item_params)
    if not 1 <= n <= total:
        raise ValueError(f"cannot select n={n} items from a task with {total} items")
    if method == "random":
        rng = np.random.default_rng(seed)
        items = np.sort(rng.choice(total, size=n, replace=False))
        weights = np.full(n, 1.0 / n)
    else:
        items, weights = _anchors(n, _item_embeddings(features, responses, item_params), seed, n_init)
    return Subset(items=items, weights=weights, method=method, n=n, seed=seed, n_total=total)
