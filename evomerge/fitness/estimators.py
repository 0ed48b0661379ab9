"""Estimate a candidate's accuracy on a whole task from its answers on a small item subset.

Five estimators, registered by name in `ESTIMATORS` (n subset items out of N):

* "subset":  sum_k w_k y_k, the subset's weighted mean (weights 1/n for a random subset,
             cluster shares for anchors).
* "p-IRT":   tinyBenchmarks (Polo et al., 2024; `evaluate` in tinyBenchmarks/__init__.py): read
             the ability theta from the n responses, predict P(correct) for the N - n other items
             with the calibrated 2PL, and average observed and predicted over all N items:
             (sum_k y_k + sum_{j unseen} P_j(theta)) / N.
* "gp-IRT":  weight * subset + (1 - weight) * p-IRT, with the fitted mixing weight of gp-IRT.
* "mp-IRT":  MERGE^3 (Mencattini et al., ICML 2025; `fit_lambda` / `eval_mpirt_on_anchors` in
             mergenetic/estimator/utils.py): the merge's ability is a combination of its
             endpoint models' abilities, theta = sum_i c_i theta_i, with c fitted to the subset
             responses; then extrapolate as p-IRT does.
* "gmp-IRT": weight * subset + (1 - weight) * mp-IRT, with the fitted mixing weight of gmp-IRT.

What we do differently from the references:

* c >= 0 (L-BFGS-B with bounds); Mergenetic's BFGS leaves c unconstrained, so a "merge" can be
  scored as the negative of an endpoint. With a one-dimensional ability and endpoints of both
  signs the constraint is inactive and mp-IRT equals p-IRT; it bites in the multidimensional
  model, where theta is confined to the cone the endpoints span.
* The mixing weight is fitted, per mixture, on the calibration models (`CompressedEstimator.fit`):
  K-fold over calibration models, refitting the IRT model without the held-out fold, then the
  weight in [0, 1] that minimises the squared error of the held-out models' full-task accuracy
  (closed form). tinyBenchmarks (which calls it lambda) validates it on a grid the same way in
  its experiments; Mergenetic hard-codes 0.5. The fallback "bias-variance" mixing method sets
  weight = b^2 / (b^2 + s^2) -- the MSE-optimal mix of an unbiased estimator of variance s^2 (the
  subset mean) with one of squared error b^2 (p-IRT) when their errors are independent -- from
  in-sample calibration errors.
* The observed part of p-IRT / mp-IRT is the plain sum of the subset answers, as tinyBenchmarks
  does; Mergenetic's `eval_mpirt_on_anchors` mixes the anchor-weighted mean in with weight n/N.
* The ability is the MAP under the N(0, I) prior the calibration assumed by default
  (`ability_method`); "mle" is the references' plain likelihood (bounded |theta| <= 6).

Uncertainty (`Estimate.stderr`):

* subset:  binomial, sqrt(sum_k w_k^2 p (1 - p) (N - n) / (N - 1)), with the finite-population
           correction and p = (n y_bar + 1/2) / (n + 1) so that an all-correct subset does not
           claim zero uncertainty.
* p-IRT / mp-IRT: delta method. Var = g^T Cov(theta) g + sum_unseen P_j (1 - P_j) / N^2,
           g = sum_unseen P_j (1 - P_j) a_j / N, Cov(theta) the inverse observed information
           (plus the prior's for MAP; for mp-IRT propagated through the free c's). The second
           term is the Bernoulli noise of the unseen answers themselves. Item-parameter
           uncertainty is ignored.
* g*-IRT:  weight se_subset + (1 - weight) se_IRT, the bound for perfectly correlated errors (both
           use the same answers).

Everything here is per task: one calibration response matrix (models, items) per task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from evomerge.fitness.irt import (
    IRTParams,
    ability_covariance,
    estimate_ability,
    fit_irt,
    predict_correct,
    single_threaded_blas,
)
from evomerge.fitness.subsets import Subset

__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "CalibrationFold",
    "CompressedEstimator",
    "Estimate",
    "cross_validation_folds",
    "fit_combination",
    "fit_mixing_weight",
    "get_estimator",
    "mix",
    "mpirt_estimate",
    "pirt_estimate",
    "subset_estimate",
]

_LOGIT_CLIP = 30.0
_MIXING_METHODS = ("cv", "bias-variance")


@dataclass(frozen=True)
class Estimate:
    """An estimated full-task accuracy, its standard error and the answers it came from."""

    name: str
    value: float
    stderr: float
    subset_responses: np.ndarray  # (n,) the candidate's 0/1 answers on the subset items
    theta: np.ndarray | None = None  # ability used to extrapolate (IRT estimators)
    coefficients: np.ndarray | None = None  # mp-IRT's c, one per endpoint


# ---------------------------------------------------------------------------------------------
# Pure estimators
# ---------------------------------------------------------------------------------------------


def _check_subset_responses(responses: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(responses, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"expected {n} subset responses (one per subset item), got shape {y.shape}")
    if not np.all((y == 0.0) | (y == 1.0)):
        raise ValueError(f"subset responses must be 0/1, got values {np.unique(y)[:5]}")
    return y


def subset_estimate(responses: np.ndarray, weights: np.ndarray, n_total: int) -> Estimate:
    """The weighted mean of the subset answers, with a binomial standard error."""
    w = np.asarray(weights, dtype=np.float64)
    y = _check_subset_responses(responses, w.shape[0])
    n = y.shape[0]
    value = min(max(float(w @ y), 0.0), 1.0)  # an accuracy: weights summing to 1 in floating point may overshoot by an ulp
    p = (n * value + 0.5) / (n + 1.0)
    fpc = (n_total - n) / (n_total - 1.0) if n_total > 1 else 0.0
    stderr = float(np.sqrt((w * w).sum() * p * (1 - p) * fpc))
    return Estimate("subset", value, stderr, y)


def _extrapolate(
    name: str,
    y: np.ndarray,
    items: np.ndarray,
    params: IRTParams,
    theta: np.ndarray,
    theta_cov: np.ndarray,
    coefficients: np.ndarray | None = None,
) -> Estimate:
    """(observed answers + 2PL predictions for the unseen items) / N, with its delta-method s.e."""
    unseen = np.setdiff1d(np.arange(params.n_items), items)
    p_unseen = predict_correct(theta, params.items(unseen))[0]  # (N - n,)
    n_total = params.n_items
    value = float((y.sum() + p_unseen.sum()) / n_total)
    a_unseen = params.discrimination.reshape(n_total, -1)[unseen]  # (N - n, D); (0, D) when n = N
    slope = (p_unseen * (1 - p_unseen)) @ a_unseen / n_total  # (D,) d value / d theta
    variance = float(slope @ theta_cov @ slope) + float((p_unseen * (1 - p_unseen)).sum()) / n_total**2
    return Estimate(name, value, float(np.sqrt(variance)), y, np.asarray(theta, dtype=np.float64), coefficients)


def pirt_estimate(responses: np.ndarray, items: np.ndarray, params: IRTParams, method: str = "map") -> Estimate:
    """p-IRT: ability from the subset answers, 2PL predictions for the rest, averaged over all items."""
    items = np.asarray(items, dtype=np.int64)
    y = _check_subset_responses(responses, items.shape[0])
    seen = params.items(items)
    theta = estimate_ability(y, seen, method)
    return _extrapolate("p-IRT", y, items, params, theta, ability_covariance(y, theta, seen, method))


def _endpoint_matrix(endpoint_theta: np.ndarray, params: IRTParams) -> np.ndarray:
    e = np.asarray(endpoint_theta, dtype=np.float64)
    e = e.reshape(-1, 1) if params.discrimination.ndim == 1 else e.reshape(-1, params.dims)  # (K, D)
    if e.shape[0] == 0:
        raise ValueError("mp-IRT needs at least one endpoint ability; got none")
    return e


def fit_combination(
    responses: np.ndarray,
    params: IRTParams,
    endpoint_theta: np.ndarray,
    method: str = "map",
    *,
    max_coefficient: float = 100.0,
) -> tuple[np.ndarray, np.ndarray]:
    """c >= 0 maximising the (penalised, for "map") likelihood of theta = sum_i c_i theta_i.

    `params` describes exactly the answered items. Starts at c = 1/K as MERGE^3 does; bounds
    [0, max_coefficient] per coefficient (the upper one only stops an all-correct subset from
    walking off). Returns (c (K,), covariance of theta (D, D)).
    """
    if method not in ("map", "mle"):
        raise ValueError(f"unknown ability method {method!r}; valid: ['map', 'mle']")
    y = _check_subset_responses(responses, params.n_items)
    ends = _endpoint_matrix(endpoint_theta, params)  # (K, D)
    a = params.discrimination.reshape(params.n_items, -1)  # (n, D)
    offset = np.linalg.norm(a, axis=1) * params.difficulty  # (n,)
    prior = 1.0 if method == "map" else 0.0

    def objective(c: np.ndarray) -> tuple[float, np.ndarray]:
        theta = c @ ends  # (D,)
        z = np.clip(a @ theta - offset, -_LOGIT_CLIP, _LOGIT_CLIP)  # (n,)
        nll = float((np.logaddexp(0.0, z) - y * z).sum()) + 0.5 * prior * float(theta @ theta)
        grad_theta = (expit(z) - y) @ a + prior * theta  # (D,)
        return nll, ends @ grad_theta  # chain rule: d theta / d c = ends

    k = ends.shape[0]
    with single_threaded_blas():
        result = minimize(
            objective,
            np.full(k, 1.0 / k),
            jac=True,
            method="L-BFGS-B",
            bounds=[(0.0, max_coefficient)] * k,
            options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15},
        )
    c = result.x
    theta = c @ ends
    # Covariance through the coefficients that are not held at a bound.
    free = (c > 1e-8) & (c < max_coefficient - 1e-8)
    p = predict_correct(theta, params)[0]  # (n,)
    info_theta = (a * (p * (1 - p))[:, None]).T @ a + prior * np.eye(a.shape[1])  # (D, D)
    ends_free = ends[free]  # (F, D)
    cov_c = np.linalg.pinv(ends_free @ info_theta @ ends_free.T)  # (F, F)
    return c, ends_free.T @ cov_c @ ends_free


def mpirt_estimate(
    responses: np.ndarray,
    items: np.ndarray,
    params: IRTParams,
    endpoint_theta: np.ndarray,
    method: str = "map",
) -> Estimate:
    """mp-IRT: theta = sum_i c_i theta_i (c >= 0) fitted on the subset, then extrapolate as p-IRT."""
    items = np.asarray(items, dtype=np.int64)
    y = _check_subset_responses(responses, items.shape[0])
    c, theta_cov = fit_combination(y, params.items(items), endpoint_theta, method)
    theta = c @ _endpoint_matrix(endpoint_theta, params)
    if params.discrimination.ndim == 1:
        theta = theta[0]
    return _extrapolate("mp-IRT", y, items, params, theta, theta_cov, c)


def mix(name: str, weight: float, data: Estimate, model: Estimate) -> Estimate:
    """weight * data + (1 - weight) * model, the generalised (g*-IRT) estimators."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixing weight for {name} must lie in [0, 1], got {weight}")
    return Estimate(
        name,
        min(max(weight * data.value + (1 - weight) * model.value, 0.0), 1.0),  # an accuracy, whatever the rounding
        weight * data.stderr + (1 - weight) * model.stderr,
        data.subset_responses,
        model.theta,
        model.coefficients,
    )


def fit_mixing_weight(data_values: np.ndarray, model_values: np.ndarray, truth: np.ndarray) -> float:
    """The weight w in [0, 1] minimising sum (w d + (1 - w) m - t)^2: sum (d - m)(t - m) / sum (d - m)^2."""
    d, m, t = (np.asarray(v, dtype=np.float64) for v in (data_values, model_values, truth))
    gap = d - m
    denominator = float(gap @ gap)
    if denominator == 0.0:  # the two estimators agree everywhere; any weight is optimal
        return 0.0
    return float(np.clip(gap @ (t - m) / denominator, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# The fitted estimator: calibration pieces + registry
# ---------------------------------------------------------------------------------------------


def _subset(est: "CompressedEstimator", y: np.ndarray) -> Estimate:
    return subset_estimate(y, est.subset.weights, est.subset.n_total)


def _pirt(est: "CompressedEstimator", y: np.ndarray) -> Estimate:
    return pirt_estimate(y, est.subset.items, est.item_params, est.ability_method)


def _gpirt(est: "CompressedEstimator", y: np.ndarray) -> Estimate:
    return mix("gp-IRT", est.mixing_weights["gp-IRT"], _subset(est, y), _pirt(est, y))


def _mpirt(est: "CompressedEstimator", y: np.ndarray) -> Estimate:
    if est.endpoint_theta is None:
        raise ValueError("mp-IRT needs endpoint abilities; fit the estimator with endpoint_rows")
    return mpirt_estimate(y, est.subset.items, est.item_params, est.endpoint_theta, est.ability_method)


def _gmpirt(est: "CompressedEstimator", y: np.ndarray) -> Estimate:
    if "gmp-IRT" not in est.mixing_weights:
        raise ValueError("gmp-IRT needs endpoint abilities; fit the estimator with endpoint_rows")
    return mix("gmp-IRT", est.mixing_weights["gmp-IRT"], _subset(est, y), _mpirt(est, y))


ESTIMATORS: dict[str, Callable[["CompressedEstimator", np.ndarray], Estimate]] = {
    "subset": _subset,
    "p-IRT": _pirt,
    "gp-IRT": _gpirt,
    "mp-IRT": _mpirt,
    "gmp-IRT": _gmpirt,
}

# What a compressed fitness reports unless its calibration config names another estimator. Why gp-IRT
# rather than gmp-IRT: evomerge/fitness/calibrate.py's docstring, from benchmarks/RESULTS.md.
DEFAULT_ESTIMATOR = "gp-IRT"


def get_estimator(name: str) -> Callable[["CompressedEstimator", np.ndarray], Estimate]:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; valid: {list(ESTIMATORS)}") from None


@dataclass(frozen=True)
class CalibrationFold:
    """One fold of the mixing weights' cross-validation: the held-out rows and the IRT fit without them."""

    held_out: np.ndarray  # (h,) sorted calibration rows
    params: IRTParams  # fitted on every other row, in row order

    def train_rows(self, n_models: int) -> np.ndarray:
        return np.setdiff1d(np.arange(n_models), self.held_out)


def cross_validation_folds(
    responses: np.ndarray,
    rows: Sequence[int],
    n_folds: int,
    *,
    model: str = "2pl",
    dims: int = 1,
    seed: int = 0,
    empirical_prior: bool = False,
) -> list[CalibrationFold]:
    """Split `rows` into `n_folds` folds (seeded) and refit the IRT model without each one.

    The fits depend on neither the subset nor n, so callers comparing many subsets of one task
    (benchmarks, `evomerge fitness calibrate` on several n) compute them once and pass them to
    `CompressedEstimator.fit(folds=...)`. Rows outside `rows` (the endpoints) stay in training.
    `empirical_prior` standardizes each fold's ability scale on its training rows among `rows`,
    as `fit_irt(prior_rows=rows)` does for the full calibration.
    """
    y = np.asarray(responses, dtype=np.float64)
    chosen = np.asarray(rows, dtype=np.int64)
    if n_folds < 2 or chosen.size < n_folds:
        raise ValueError(
            f"cross-validation needs n_folds >= 2 and at least n_folds rows to hold out; "
            f"got n_folds={n_folds}, {chosen.size} rows"
        )
    rng = np.random.default_rng(seed)
    folds = []
    for held_out in np.array_split(rng.permutation(chosen), n_folds):
        held_out = np.sort(held_out)
        train = np.setdiff1d(np.arange(y.shape[0]), held_out)
        prior_rows = np.flatnonzero(np.isin(train, chosen)) if empirical_prior else None  # positions in train
        folds.append(CalibrationFold(held_out, fit_irt(y[train], model, dims=dims, seed=seed, prior_rows=prior_rows)))
    return folds


def _check_folds(folds: Sequence[CalibrationFold], rows: np.ndarray, ends: np.ndarray, n_models: int) -> None:
    held_out = np.sort(np.concatenate([f.held_out for f in folds])) if folds else np.empty(0, np.int64)
    if not np.array_equal(held_out, np.sort(rows)):
        raise ValueError(
            f"the folds hold out rows {held_out.tolist()} but the mixing weights are fitted on rows "
            f"{np.sort(rows).tolist()}; "
            "make them with cross_validation_folds(responses, mixing_rows, ...)"
        )
    for fold in folds:
        if fold.params.n_models != n_models - fold.held_out.size:
            raise ValueError(f"a fold's IRT fit has {fold.params.n_models} models; expected "
                             f"{n_models - fold.held_out.size} (all {n_models} rows minus the "
                             f"{fold.held_out.size} held out)")
    if np.intersect1d(held_out, ends).size:
        raise ValueError(f"the folds hold out endpoint rows {np.intersect1d(held_out, ends).tolist()}")


@dataclass
class CompressedEstimator:
    """One task's calibration: item parameters, subset, endpoint abilities and mixing weights.

    Build it with `fit`; score a candidate with `estimate(name, subset_responses)`, where the
    responses are the candidate's 0/1 answers on `subset.items`, in that order.
    """

    item_params: IRTParams
    subset: Subset
    endpoint_theta: np.ndarray | None  # (K,) or (K, D); None when no endpoints were given
    mixing_weights: dict[str, float] = field(default_factory=dict)  # "gp-IRT" and, with endpoints, "gmp-IRT"
    ability_method: str = "map"
    mixing_method: str = "cv"

    def __post_init__(self) -> None:
        if self.subset.n_total != self.item_params.n_items:
            raise ValueError(
                f"subset was drawn from {self.subset.n_total} items but the item parameters "
                f"describe {self.item_params.n_items}"
            )
        if self.endpoint_theta is not None:
            self.endpoint_theta = np.asarray(self.endpoint_theta, dtype=np.float64)

    @classmethod
    def fit(
        cls,
        responses: np.ndarray,
        endpoint_rows: Sequence[int],
        subset: Subset,
        *,
        item_params: IRTParams | None = None,
        model: str = "2pl",
        dims: int = 1,
        ability_method: str = "map",
        mixing_method: str = "cv",
        mixing_rows: Sequence[int] | None = None,
        n_folds: int = 5,
        seed: int = 0,
        folds: Sequence[CalibrationFold] | None = None,
        empirical_prior: bool = False,
    ) -> "CompressedEstimator":
        """Calibrate on one task's (models, items) responses.

        `endpoint_rows` are the rows of the models being merged (may be empty: then mp-IRT and
        gmp-IRT are unavailable). `item_params` reuses an existing calibration of exactly these
        responses (e.g. the one the anchors were clustered on); otherwise `fit_irt(model, dims,
        seed)` runs here. `mixing_method`, how the mixing weights are fitted: "cv" (K-fold, see the
        module docstring; needs n_folds >= 2 and at least n_folds rows to hold out) or
        "bias-variance". `mixing_rows` are the calibration rows the mixing weights are fitted on
        (default: every non-endpoint row). Pass rows that look like the models you will score --
        e.g. merges already evaluated in full.
        `folds` reuses `cross_validation_folds(responses, mixing_rows, ...)` made earlier (they
        must hold out exactly the mixing rows); otherwise "cv" computes them here.
        `empirical_prior` standardizes the ability scale on the mixing rows (`fit_irt(prior_rows=)`)
        in the fits made here: the IRT fit when `item_params` is not given, and the folds.
        """
        y = np.asarray(responses, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != subset.n_total:
            raise ValueError(f"responses must be (models, {subset.n_total}) to match the subset, got {y.shape}")
        if mixing_method not in _MIXING_METHODS:
            raise ValueError(f"unknown mixing_method {mixing_method!r}; valid: {list(_MIXING_METHODS)}")
        ends = np.asarray(endpoint_rows, dtype=np.int64)
        if ends.size and (ends.min() < 0 or ends.max() >= y.shape[0]):
            raise ValueError(f"endpoint_rows {ends.tolist()} out of range for {y.shape[0]} calibration models")
        others = np.setdiff1d(np.arange(y.shape[0]), ends)
        if mixing_rows is not None:
            chosen = np.unique(np.asarray(mixing_rows, dtype=np.int64))
            if chosen.size and (chosen.min() < 0 or chosen.max() >= y.shape[0]):
                raise ValueError(f"mixing_rows {chosen.tolist()} out of range for {y.shape[0]} calibration models")
            if np.intersect1d(chosen, ends).size:
                raise ValueError(f"mixing_rows {chosen.tolist()} include endpoint rows {ends.tolist()}")
            others = chosen
        params = item_params if item_params is not None else fit_irt(
            y, model, dims=dims, seed=seed, prior_rows=others if empirical_prior else None)
        if params.n_models != y.shape[0]:
            raise ValueError(f"item_params were fitted on {params.n_models} models, responses have {y.shape[0]}")
        fitted = cls(
            item_params=params,
            subset=subset,
            endpoint_theta=params.theta[ends] if ends.size else None,
            ability_method=ability_method,
            mixing_method=mixing_method,
        )
        if mixing_method == "cv":
            if folds is None:
                if n_folds < 2 or others.size < n_folds:
                    raise ValueError(
                        f"mixing_method='cv' needs n_folds >= 2 and at least n_folds rows to hold out "
                        f"(non-endpoint or mixing_rows); got n_folds={n_folds}, {others.size} rows "
                        "(use mixing_method='bias-variance' for tiny calibration sets)"
                    )
                folds = cross_validation_folds(y, others, n_folds, model=params.model, dims=params.dims, seed=seed,
                                               empirical_prior=empirical_prior)
            else:
                _check_folds(folds, others, ends, y.shape[0])
            fitted.mixing_weights = fitted._cross_validated_mixing_weights(y, ends, folds)
        else:
            fitted.mixing_weights = fitted._bias_variance_mixing_weights(y, others)
        return fitted

    def _held_out_values(self, calibration: "CompressedEstimator", y: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Subset / p-IRT / mp-IRT values for `rows` under `calibration`, and their true accuracy."""
        names = ["subset", "p-IRT"] + (["mp-IRT"] if calibration.endpoint_theta is not None else [])
        values = {name: np.array([ESTIMATORS[name](calibration, y[r, self.subset.items]).value for r in rows]) for name in names}
        values["truth"] = y[rows].mean(axis=1)
        return values

    def _cross_validated_mixing_weights(
        self, y: np.ndarray, ends: np.ndarray, folds: Sequence[CalibrationFold]
    ) -> dict[str, float]:
        collected: dict[str, list[np.ndarray]] = {}
        for fold in folds:
            positions = np.searchsorted(fold.train_rows(y.shape[0]), ends)  # endpoints always train
            calibration = CompressedEstimator(
                fold.params, self.subset, fold.params.theta[positions] if ends.size else None, {}, self.ability_method
            )
            for name, values in self._held_out_values(calibration, y, fold.held_out).items():
                collected.setdefault(name, []).append(values)
        pooled = {name: np.concatenate(parts) for name, parts in collected.items()}
        mixing_weights = {"gp-IRT": fit_mixing_weight(pooled["subset"], pooled["p-IRT"], pooled["truth"])}
        if "mp-IRT" in pooled:
            mixing_weights["gmp-IRT"] = fit_mixing_weight(pooled["subset"], pooled["mp-IRT"], pooled["truth"])
        return mixing_weights

    def _bias_variance_mixing_weights(self, y: np.ndarray, others: np.ndarray) -> dict[str, float]:
        rows = others if others.size else np.arange(y.shape[0])
        values = self._held_out_values(self, y, rows)  # in-sample: optimistic for the IRT side
        variance = float(np.mean([subset_estimate(y[r, self.subset.items], self.subset.weights, self.subset.n_total).stderr ** 2 for r in rows]))
        mixing_weights = {}
        for mixed, irt in (("gp-IRT", "p-IRT"), ("gmp-IRT", "mp-IRT")):
            if irt in values:
                bias2 = float(np.mean((values[irt] - values["truth"]) ** 2))
                mixing_weights[mixed] = bias2 / (bias2 + variance) if bias2 + variance > 0 else 0.0
        return mixing_weights

    def estimate(self, name: str, subset_responses: np.ndarray) -> Estimate:
        """Estimate the full-task accuracy with the named estimator (see `ESTIMATORS`)."""
        return get_estimator(name)(self, np.asarray(subset_responses, dtype=np.float64))

    def estimate_all(self, subset_responses: np.ndarray) -> dict[str, Estimate]:
        """Every estimator this calibration supports (mp-IRT ones only with endpoints)."""
        names = list(ESTIMATORS) if self.endpoint_theta is not None else ["subset", "p-IRT", "gp-IRT"]
        return {name: self.estimate(name, subset_responses) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """The estimator as `fitness.json` stores it."""
        return {
            "item_params": self.item_params.to_dict(),
            "subset": self.subset.to_dict(),
            "endpoint_theta": None if self.endpoint_theta is None else self.endpoint_theta.tolist(),
            "mixing_weights": dict(self.mixing_weights),
            "ability_method": self.ability_method,
            "mixing_method": self.mixing_method,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressedEstimator":
        """Inverse of `to_dict`; also reads files saved before the mixing weights got their name,
        which store them as "lambdas" and "lambda_method" (lambda is mergekit's word for a merge
        setting, so the fitness no longer uses it)."""
        endpoint_theta = data.get("endpoint_theta")
        weights = data["mixing_weights"] if "mixing_weights" in data else data.get("lambdas", {})
        method = data["mixing_method"] if "mixing_method" in data else data.get("lambda_method", "cv")
        return cls(
            item_params=IRTParams.from_dict(data["item_params"]),
            subset=Subset.from_dict(data["subset"]),
            endpoint_theta=None if endpoint_theta is None else np.asarray(endpoint_theta, dtype=np.float64),
            mixing_weights={str(k): float(v) for k, v in weights.items()},
            ability_method=str(data.get("ability_method", "map")),
            mixing_method=str(method),
        )
