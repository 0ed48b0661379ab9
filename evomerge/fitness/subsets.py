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

`select_items(n, "informative", ...)` is for the IRT estimators: n items chosen greedily to
maximise sum_i log det(I + sum_{j in S} P_ij (1 - P_ij) a_j a_j^T) over the calibration models
i (by default; pass the random merges' abilities), i.e. the D-optimal design of computerized
adaptive testing (the prior's identity plus each item's Fisher information at that model's
ability), averaged over the population instead of adapted to one examinee. The log gives
diminishing returns for a model already well measured, so the items spread over the abilities
the candidates have rather than piling up at one difficulty. Items the calibration pinned (no
variance across models, so no estimated parameters) are never chosen. Weights are 1/n, but the
choice is not random, so the plain weighted mean of the answers is a biased estimate of the
task accuracy; the mixing weight of gp-IRT / gmp-IRT (fitted by cross-validation) sees that.
On the small zoo at n = 20 per task (benchmarks/fitness_estimation.py; benchmarks/RESULTS.md,
"Fitness estimation") the best estimator's MAE on 64 held-out merges was 0.036 with anchors,
0.039 with random items and 0.083 with informative ones; Spearman per task 0.92, 0.86 and 0.80.
Informative items were best on an earlier zoo with 300-item splits; anchors were the default until
measured on per-layer search candidates, where their error doubles (small zoo: 0.034 on held-out
merges, 0.059 on search candidates) while random items keep theirs (0.025, 0.029): random is the
default now (`calibrate.DEFAULT_SUBSET_METHOD`).

n = N (the whole split, the natural way to ask for an exact fitness) keeps every item at weight 1/N
whatever the method: anchors could not form N distinct clusters when items share IRT parameters,
and informative subsets never choose pinned items. Every estimator is then exact.

Subsets are per task: call once per task's response matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from evomerge.fitness.irt import IRTParams, predict_correct

__all__ = ["METHODS", "Subset", "select_items"]

METHODS = ("random", "anchors", "informative")
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
    abilities: np.ndarray | None = None,
) -> Subset:
    """Choose n of a task's items; the same arguments and seed always give the same Subset.

    The task size comes from `n_items`, `responses` (models, items) or `item_params`. "anchors"
    clusters with `features="irt"` (needs `item_params`) or `features="correctness"` (needs
    `responses`), using k-means with `random_state=seed` and `n_init` restarts. "informative"
    needs `item_params` and designs for `abilities` (rows like `item_params.theta`; default: all
    of them); it is deterministic, so `seed` is only recorded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown subset method {method!r}; valid: {list(METHODS)}")
    total = _total_items(n_items, responses, item_params)
    if not 1 <= n <= total:
        raise ValueError(f"cannot select n={n} items from a task with {total} items")
    if n == total:  # the whole split (an exact fitness): every method would keep every item, each at 1/N
        return Subset(items=np.arange(total), weights=np.full(n, 1.0 / n), method=method, n=n, seed=seed,
                      n_total=total)
    if method == "random":
        rng = np.random.default_rng(seed)
        items = np.sort(rng.choice(total, size=n, replace=False))
        weights = np.full(n, 1.0 / n)
    elif method == "anchors":
        items, weights = _anchors(n, _item_embeddings(features, responses, item_params), seed, n_init)
    else:
        if item_params is None:
            raise ValueError("informative subsets need item_params (from fit_irt)")
        items = _informative(n, item_params, item_params.theta if abilities is None else abilities)
        weights = np.full(n, 1.0 / n)
    return Subset(items=items, weights=weights, method=method, n=n, seed=seed, n_total=total)


def _informative(n: int, params: IRTParams, abilities: np.ndarray) -> np.ndarray:
    """Greedy D-optimal design over a population of abilities (see the module docstring)."""
    free = np.flatnonzero(~params.pinned)
    if free.size < n:
        raise ValueError(f"cannot choose n={n} informative items: only {free.size} of {params.n_items} items have "
                         "estimated parameters (the rest had no variance across the calibration models)")
    a = params.discrimination.reshape(params.n_items, -1)[free]  # (F, D)
    p = predict_correct(abilities, params.items(free))  # (M, F)
    weight = p * (1 - p)  # (M, F) Fisher information per unit a a^T
    n_models, dims = weight.shape[0], a.shape[1]
    inverse = np.broadcast_to(np.eye(dims), (n_models, dims, dims)).copy()  # (M, D, D) M_i^-1, prior only
    chosen: list[int] = []
    available = np.ones(free.size, dtype=bool)
    for _ in range(n):
        # log det(M + w a a^T) - log det M = log(1 + w a^T M^-1 a) (matrix determinant lemma)
        quad = np.einsum("fd,mde,fe->mf", a, inverse, a)  # (M, F)
        gain = np.log1p(weight * quad).sum(axis=0)  # (F,)
        gain[~available] = -np.inf
        j = int(np.argmax(gain))  # ties -> the lowest index: deterministic
        chosen.append(j)
        available[j] = False
        # Sherman-Morrison update of every model's inverse information
        u = np.einsum("mde,e->md", inverse, a[j])  # (M, D) M^-1 a
        denom = 1.0 + weight[:, j] * (u @ a[j])  # (M,)
        inverse -= (weight[:, j] / denom)[:, None, None] * u[:, :, None] * u[:, None, :]
    return np.sort(free[chosen])
