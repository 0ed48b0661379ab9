"""Item response theory for benchmark compression: calibrate items, then read a model's ability.

A response matrix holds one row per model and one column per item of one task, 1 for correct
and 0 for wrong (NaN marks an item a model was not scored on). Under the two-parameter
logistic model (2PL) model i answers item j correctly with probability

    P(y_ij = 1) = sigmoid(a_j . theta_i - |a_j| b_j)

with discrimination a_j (a scalar, or a (D,) vector in the multidimensional model), difficulty
b_j and ability theta_i. For D = 1 this is the textbook a_j (theta_i - b_j), girth's
convention; for D > 1, b_j is Reckase's multidimensional difficulty MDIFF = -d_j / |a_j|,
where d_j is the intercept of the slope-intercept form a_j . theta + d_j.

`fit_irt` calibrates items on a response matrix. The unidimensional default wraps girth's 2PL
marginal maximum likelihood (`girth.twopl_mml`, abilities integrated out against N(0, 1)).
The multidimensional fit is our own penalised joint maximum a posteriori (normal priors on
abilities, discriminations and intercepts; L-BFGS), the estimator family py-irt's
`multidim_2pl` belongs to (tinyBenchmarks calibrates with that): girth's
`multidimensional_twopl_mml` integrates over a 41**D quadrature grid (57 s for 40 items x 200
models at D = 2 on our machine) and its default initial guess calls `scipy.stats.mvn.mvnun`,
which SciPy has removed.

`fit_irt(prior_rows=...)` moves the ability scale so that those calibration models (e.g. the
random merges, which look like the candidates a search will score) have mean 0 and covariance I
(`standardize_abilities`): the N(0, I) prior of every later MAP ability is then an empirical-Bayes
prior for the candidates, not a statement about the calibration's arbitrary scale. On the small
zoo with 20-item anchor subsets, the empirical prior cut the best estimator's MAE on 64 held-out
merges from 0.0377 to 0.0364 (benchmarks/fitness_estimation.py; benchmarks/RESULTS.md).

`estimate_ability` reads a model's ability from its responses on any subset of calibrated
items, as tinyBenchmarks' `fit_theta` does; "map" adds the N(0, I) prior the calibration
assumed, "mle" is tinyBenchmarks' plain likelihood (bounded to |theta| <= 6 per dimension, as
girth's `ability_mle` is, so that an all-correct subset gives a finite value).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import brentq, minimize
from scipy.special import expit
from threadpoolctl import ThreadpoolController

__all__ = [
    "ABILITY_BOUND",
    "IRTParams",
    "ability_covariance",
    "choose_dims",
    "estimate_ability",
    "fit_irt",
    "held_out_log_likelihood",
    "item_logits",
    "log_likelihood",
    "predict_correct",
    "single_threaded_blas",
    "standardize_abilities",
]

ABILITY_BOUND = 6.0  # |theta| per dimension; girth's ability_map searches the same interval
_LOGIT_CLIP = 30.0  # as tinyBenchmarks' item_curve: keeps log(1 - p) finite
_FIT_MODELS = ("2pl", "2pl-jmap")
_ABILITY_METHODS = ("map", "mle")
_BLAS: ThreadpoolController | None = None


def single_threaded_blas():
    """Context manager limiting BLAS to one thread.

    Every optimisation here is small (tens of items, tens of models), and with a multi-threaded
    OpenBLAS on a busy machine L-BFGS-B spends almost all its time in thread hand-offs: 1.1 s
    instead of 0.03 s for a 40-item x 100-model joint fit on our 2-core box.
    """
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


@dataclass
class IRTParams:
    """Calibrated 2PL parameters of one task's items, and the calibration models' abilities.

    `discrimination` is (items,) for a unidimensional model and (items, D) for a
    multidimensional one; `theta` is (models,) or (models, D) to match. `pinned` marks items
    every calibration model got right (or every one got wrong): the fit has no information
    about them, so their parameters were set by `_pin_constant_items`, not estimated.
    """

    discrimination: np.ndarray
    difficulty: np.ndarray  # (items,)
    theta: np.ndarray
    pinned: np.ndarray = field(default=None)  # (items,) bool
    model: str = "2pl"

    def __post_init__(self) -> None:
        self.discrimination = np.asarray(self.discrimination, dtype=np.float64)
        self.difficulty = np.asarray(self.difficulty, dtype=np.float64)
        self.theta = np.asarray(self.theta, dtype=np.float64)
        if self.pinned is None:
            self.pinned = np.zeros(self.difficulty.shape[0], dtype=bool)
        self.pinned = np.asarray(self.pinned, dtype=bool)
        n_items = self.difficulty.shape[0]
        if self.difficulty.ndim != 1:
            raise ValueError(f"difficulty must be (items,), got shape {self.difficulty.shape}")
        if self.discrimination.shape[0] != n_items or self.discrimination.ndim not in (1, 2):
            raise ValueError(
                f"discrimination must be (items,) or (items, D) with items = {n_items}, "
                f"got shape {self.discrimination.shape}"
            )
        if self.pinned.shape != (n_items,):
            raise ValueError(f"pinned must be ({n_items},), got shape {self.pinned.shape}")
        expected = "(models,)" if self.discrimination.ndim == 1 else f"(models, {self.dims})"
        if (self.discrimination.ndim == 1 and self.theta.ndim != 1) or (
            self.discrimination.ndim == 2 and (self.theta.ndim != 2 or self.theta.shape[1] != self.dims)
        ):
            raise ValueError(
                f"theta has shape {self.theta.shape} but discrimination {self.discrimination.shape} "
                f"needs theta shaped {expected}"
            )

    @property
    def dims(self) -> int:
        return 1 if self.discrimination.ndim == 1 else self.discrimination.shape[1]

    @property
    def n_items(self) -> int:
        return self.difficulty.shape[0]

    @property
    def n_models(self) -> int:
        return self.theta.shape[0]

    def items(self, indices: Sequence[int] | np.ndarray) -> "IRTParams":
        """The same calibration restricted to some items (abilities unchanged)."""
        idx = np.asarray(indices, dtype=np.int64)
        return IRTParams(self.discrimination[idx], self.difficulty[idx], self.theta, self.pinned[idx], self.model)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and strings only, so `json.dumps` works; floats round-trip exactly."""
        return {
            "model": self.model,
            "discrimination": self.discrimination.tolist(),
            "difficulty": self.difficulty.tolist(),
            "theta": self.theta.tolist(),
            "pinned": self.pinned.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IRTParams":
        missing = {"discrimination", "difficulty", "theta"} - set(data)
        if missing:
            raise ValueError(f"IRTParams dict is missing {sorted(missing)}; it has {sorted(data)}")
        return cls(
            discrimination=np.asarray(data["discrimination"], dtype=np.float64),
            difficulty=np.asarray(data["difficulty"], dtype=np.float64),
            theta=np.asarray(data["theta"], dtype=np.float64),
            pinned=np.asarray(data.get("pinned", np.zeros(len(data["difficulty"]), bool)), dtype=bool),
            model=str(data.get("model", "2pl")),
        )


# ---------------------------------------------------------------------------------------------
# The 2PL response function
# ---------------------------------------------------------------------------------------------


def _as_2d(discrimination: np.ndarray) -> np.ndarray:
    a = np.asarray(discrimination, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a  # (items, D)


def _theta_2d(theta: np.ndarray, dims: int) -> np.ndarray:
    t = np.asarray(theta, dtype=np.float64)
    if dims == 1:
        return t.reshape(-1, 1)  # (models, 1)
    return t.reshape(-1, dims)  # (models, D)


def item_logits(theta: np.ndarray, params: IRTParams) -> np.ndarray:
    """Logits a_j . theta_i - |a_j| b_j, shaped (models, items); theta as one row or many."""
    a = _as_2d(params.discrimination)  # (I, D)
    t = _theta_2d(theta, params.dims)  # (M, D)
    return t @ a.T - (np.linalg.norm(a, axis=1) * params.difficulty)[None, :]  # (M, I)


def predict_correct(theta: np.ndarray, params: IRTParams) -> np.ndarray:
    """P(correct), shaped (models, items); pass theta with the shape of `params.theta` rows."""
    return expit(np.clip(item_logits(theta, params), -_LOGIT_CLIP, _LOGIT_CLIP))


def log_likelihood(responses: np.ndarray, theta: np.ndarray, params: IRTParams) -> np.ndarray:
    """Bernoulli log-likelihood per model, summed over observed (non-NaN) items: (models,)."""
    y = np.atleast_2d(np.asarray(responses, dtype=np.float64))  # (M, I)
    z = np.clip(item_logits(theta, params), -_LOGIT_CLIP, _LOGIT_CLIP)  # (M, I)
    observed = ~np.isnan(y)
    # log sigmoid(z) = -log(1 + e^-z); written with logaddexp for stability
    ll = np.where(np.nan_to_num(y) > 0.5, -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z))
    return np.where(observed, ll, 0.0).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# Ability estimation
# ---------------------------------------------------------------------------------------------


def _check_responses(responses: np.ndarray, n_items: int, what: str) -> np.ndarray:
    y = np.asarray(responses, dtype=np.float64)
    if y.shape[-1] != n_items:
        raise ValueError(f"{what} has {y.shape[-1]} items per model but the item parameters describe {n_items}")
    values = y[~np.isnan(y)]
    if not np.all((values == 0.0) | (values == 1.0)):
        raise ValueError(f"{what} must hold 0/1 (or NaN for missing); found values {np.unique(values)[:5]}")
    return y


def _check_method(method: str) -> None:
    if method not in _ABILITY_METHODS:
        raise ValueError(f"unknown ability method {method!r}; valid: {list(_ABILITY_METHODS)}")


def estimate_ability(
    responses: np.ndarray,
    params: IRTParams,
    method: str = "map",
    *,
    bound: float = ABILITY_BOUND,
) -> np.ndarray:
    """Ability of each model from its responses to the items `params` describes.

    `responses` is (items,) for one model or (models, items); use `params.items(subset)` to
    pair a subset's responses with its items. "map" maximises likelihood x N(0, I) prior, "mle"
    the likelihood alone; both are bounded to |theta| <= `bound` per dimension. Returns (,) /
    (D,) for one model and (models,) / (models, D) for many, like rows of `params.theta`.
    """
    _check_method(method)
    y = _check_responses(responses, params.n_items, "responses")
    single = y.ndim == 1
    y = np.atleast_2d(y)  # (M, I)
    observed = ~np.isnan(y)
    y0 = np.where(observed, y, 0.0)
    a = _as_2d(params.discrimination)  # (I, D)
    offset = np.linalg.norm(a, axis=1) * params.difficulty  # (I,)
    n_models, dims = y.shape[0], a.shape[1]
    prior = 1.0 if method == "map" else 0.0

    # The models are independent, so one L-BFGS-B over all of them minimises the sum of
    # separable objectives; its gradient is exact for each block.
    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        t = flat.reshape(n_models, dims)
        z = np.clip(t @ a.T - offset, -_LOGIT_CLIP, _LOGIT_CLIP)  # (M, I)
        nll = np.where(observed, np.logaddexp(0.0, z) - y0 * z, 0.0).sum()
        residual = np.where(observed, expit(z) - y0, 0.0)  # (M, I)
        grad = residual @ a + prior * t  # (M, D)
        return nll + 0.5 * prior * float((t * t).sum()), grad.ravel()

    with single_threaded_blas():
        result = minimize(
            objective,
            np.zeros(n_models * dims),
            jac=True,
            method="L-BFGS-B",
            bounds=[(-bound, bound)] * (n_models * dims),
            options={"maxiter": 500, "gtol": 1e-10, "ftol": 1e-14},
        )
    theta = result.x.reshape(n_models, dims)
    if params.discrimination.ndim == 1:
        theta = theta[:, 0]
    return theta[0] if single else theta


def ability_covariance(responses: np.ndarray, theta: np.ndarray, params: IRTParams, method: str = "map") -> np.ndarray:
    """Asymptotic covariance of one model's ability estimate: the inverse observed information.

    Information is sum_j p_j (1 - p_j) a_j a_j^T over observed items, plus the identity for
    "map" (the prior's curvature); (D, D). A pseudo-inverse keeps it finite when the items
    carry no information in some direction.
    """
    _check_method(method)
    y = _check_responses(responses, params.n_items, "responses")
    if y.ndim != 1:
        raise ValueError(f"ability_covariance takes one model's responses (items,), got shape {y.shape}")
    observed = ~np.isnan(y)
    a = _as_2d(params.discrimination)  # (I, D)
    p = predict_correct(theta, params)[0]  # (I,)
    weight = np.where(observed, p * (1 - p), 0.0)  # Fisher information of each observed item
    info = (a * weight[:, None]).T @ a  # (D, D)
    if method == "map":
        info = info + np.eye(a.shape[1])
    return np.linalg.pinv(info)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _check_calibration(responses: np.ndarray) -> np.ndarray:
    y = np.asarray(responses, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"responses must be (models, items), got shape {y.shape}")
    _check_responses(y, y.shape[1], "responses")
    if np.isnan(y).any():
        raise ValueError("fit_irt needs a complete response matrix; found NaN entries")
    if y.shape[0] < 2:
        raise ValueError(f"fit_irt needs at least 2 calibration models, got {y.shape[0]}")
    return y


def _pin_constant_items(rates: np.ndarray, n_models: int, discrimination: float) -> np.ndarray:
    """Difficulty for items with no variance across calibration models.

    Neither MML nor joint MAP can estimate such an item (girth returns b = 6 for an item
    everyone got right as well as for one everyone got wrong). We give it the median
    discrimination of the estimated items and the difficulty at which its marginal success
    rate under the N(0, 1) ability distribution, E[sigmoid(a (theta - b))], equals the add-half
    smoothed rate (k + 0.5) / (M + 1) (Gauss-Hermite quadrature, then a root search). With 30
    models an all-correct item gets a 0.984 base rate rather than an infinitely easy difficulty.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(61)  # probabilists': weight exp(-x^2/2)
    weights = weights / weights.sum()
    smoothed = (rates * n_models + 0.5) / (n_models + 1.0)

    def marginal_rate_minus(b: float, target: float) -> float:
        return float(weights @ expit(discrimination * (nodes - b))) - target

    return np.array([brentq(marginal_rate_minus, -50.0, 50.0, args=(target,)) for target in smoothed])


def _fit_girth_2pl(y: np.ndarray, options: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    import girth

    with single_threaded_blas():
        result = girth.twopl_mml(y.T.astype(int), dict(options or {}))  # girth wants (items, models)
    return np.asarray(result["Discrimination"], dtype=np.float64), np.asarray(result["Difficulty"], dtype=np.float64)


def _fit_joint_map(
    y: np.ndarray,
    dims: int,
    seed: int,
    *,
    discrimination_sd: float = 1.0,
    intercept_sd: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penalised joint MAP of logit = theta_i . a_j + d_j: returns (a (I, D), d (I,), theta (M, D)).

    Priors theta ~ N(0, I), a ~ N(0, discrimination_sd^2 I), d ~ N(0, intercept_sd^2). The fit
    is invariant to rotating theta and a together; predictions do not depend on the rotation.
    """
    n_models, n_items = y.shape
    rng = np.random.default_rng(seed)
    rates = y.mean(axis=0).clip(0.02, 0.98)
    a0 = rng.normal(0.0, 0.5, size=(n_items, dims)) + 0.5  # positive start: theta ~ "skill"
    d0 = np.log(rates / (1 - rates))
    t0 = rng.normal(0.0, 0.1, size=(n_models, dims))
    sizes = (n_items * dims, n_items, n_models * dims)

    def unpack(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = flat[: sizes[0]].reshape(n_items, dims)
        d = flat[sizes[0] : sizes[0] + sizes[1]]
        t = flat[sizes[0] + sizes[1] :].reshape(n_models, dims)
        return a, d, t

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        a, d, t = unpack(flat)
        z = t @ a.T + d  # (M, I)
        nll = float((np.logaddexp(0.0, z) - y * z).sum())
        r = expit(z) - y  # (M, I) d nll / d z
        penalty = 0.5 * ((t * t).sum() + (a * a).sum() / discrimination_sd**2 + (d * d).sum() / intercept_sd**2)
        grad_a = r.T @ t + a / discrimination_sd**2  # (I, D)
        grad_d = r.sum(axis=0) + d / intercept_sd**2  # (I,)
        grad_t = r @ a + t  # (M, D)
        return nll + float(penalty), np.concatenate([grad_a.ravel(), grad_d, grad_t.ravel()])

    flat0 = np.concatenate([a0.ravel(), d0, t0.ravel()])
    with single_threaded_blas():
        result = minimize(objective, flat0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-6})
    a, d, t = unpack(result.x)
    if dims == 1 and a.sum() < 0:  # the sign of a 1-D ability is arbitrary: make "higher = better"
        a, t = -a, -t
    return a, d, t


def standardize_abilities(params: IRTParams, responses: np.ndarray, rows: Sequence[int] | np.ndarray,
                          *, ridge: float = 1e-6) -> IRTParams:
    """The same 2PL on an ability scale where `rows`' abilities have mean 0 and covariance I.

    With mu, Sigma = L L^T the mean and covariance of params.theta[rows], theta = mu + L theta'
    gives logits a . theta - |a| b = a' . theta' - |a'| b' with a' = L^T a and
    b' = (|a| b - a . mu) / |a'|: every prediction is unchanged, only the scale moves. All
    abilities are then re-estimated (MAP) from `responses` under the N(0, I) prior on the new
    scale. `ridge` keeps Sigma invertible when the rows barely vary in some direction.
    """
    y = _check_calibration(responses)
    rows = np.asarray(rows, dtype=np.int64)
    if y.shape[0] != params.n_models:
        raise ValueError(f"responses have {y.shape[0]} models but the parameters were fitted on {params.n_models}")
    if rows.size < 2:
        raise ValueError(f"standardizing the ability scale needs at least 2 rows, got {rows.size}")
    theta = _theta_2d(params.theta, params.dims)[rows]  # (R, D)
    mu = theta.mean(axis=0)  # (D,)
    cov = np.atleast_2d(np.cov(theta, rowvar=False)) + ridge * np.eye(params.dims)  # (D, D)
    chol = np.linalg.cholesky(cov)  # L
    a = _as_2d(params.discrimination)  # (I, D)
    a_new = a @ chol  # rows are (L^T a_j)^T
    norm_new = np.maximum(np.linalg.norm(a_new, axis=1), 1e-12)
    b_new = (np.linalg.norm(a, axis=1) * params.difficulty - a @ mu) / norm_new
    out = IRTParams(a_new[:, 0] if params.dims == 1 else a_new, b_new, np.zeros_like(params.theta),
                    params.pinned.copy(), params.model)
    out.theta = estimate_ability(y, out, "map")
    return out


def fit_irt(
    responses: np.ndarray,
    model: str = "2pl",
    *,
    dims: int = 1,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    prior_rows: Sequence[int] | np.ndarray | None = None,
) -> IRTParams:
    """Calibrate a 2PL model on one task's (models, items) 0/1 response matrix.

    model="2pl" with dims=1 is girth's marginal-likelihood 2PL (`options` go to girth);
    model="2pl-jmap" (any dims; the only choice for dims > 1) is the penalised joint MAP
    described in the module docstring, seeded by `seed`. Items with no variance across models
    are left out of the fit and pinned (see `_pin_constant_items`; `IRTParams.pinned` marks
    them). `theta` holds each calibration model's MAP ability on all items, so calibration
    models and new candidates are scored by the same estimator. `prior_rows` standardizes the
    ability scale on those models (`standardize_abilities`): the empirical-Bayes prior.
    """
    if model not in _FIT_MODELS:
        raise ValueError(f"unknown IRT model {model!r}; valid: {list(_FIT_MODELS)}")
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    if model == "2pl" and dims != 1:
        raise ValueError(f"model='2pl' (girth MML) is unidimensional; for dims={dims} use model='2pl-jmap'")
    y = _check_calibration(responses)
    n_models, n_items = y.shape
    rates = y.mean(axis=0)  # (I,)
    constant = (rates == 0.0) | (rates == 1.0)
    free = np.flatnonzero(~constant)
    if free.size < 2:
        raise ValueError(
            f"only {free.size} of {n_items} items have both right and wrong answers among the "
            f"{n_models} calibration models; IRT needs at least 2"
        )

    discrimination = np.empty((n_items, dims))
    difficulty = np.empty(n_items)
    if model == "2pl":
        a_free, b_free = _fit_girth_2pl(y[:, free], options)
        discrimination[free, 0] = a_free
        difficulty[free] = b_free
    else:
        a_free, d_free, _ = _fit_joint_map(y[:, free], dims, seed)
        norm = np.maximum(np.linalg.norm(a_free, axis=1), 1e-12)
        discrimination[free] = a_free
        difficulty[free] = -d_free / norm  # MDIFF; a . theta - |a| b reproduces a . theta + d

    if constant.any():
        pin_a = float(np.median(np.linalg.norm(discrimination[free], axis=1)))
        # spread the pinned norm evenly over the dimensions; in 1-D this is just pin_a
        discrimination[constant] = pin_a / np.sqrt(dims)
        difficulty[constant] = _pin_constant_items(rates[constant], n_models, pin_a)

    params = IRTParams(
        discrimination=discrimination[:, 0] if dims == 1 else discrimination,
        difficulty=difficulty,
        theta=np.zeros(n_models) if dims == 1 else np.zeros((n_models, dims)),
        pinned=constant,
        model=model,
    )
    params.theta = estimate_ability(y, params, "map")
    if prior_rows is not None:
        params = standardize_abilities(params, y, prior_rows)
    return params


def choose_dims(
    responses: np.ndarray,
    candidates: Sequence[int] = (1, 2, 3),
    *,
    seed: int = 0,
    tolerance: float = 0.005,
) -> tuple[int, dict[int, float]]:
    """Pick the ability dimension by held-out log-likelihood, as tinyBenchmarks picks D.

    Every third calibration model is held out (tinyBenchmarks' `val_ind`); each candidate D is
    fitted on the others (D = 1 with girth's MML, D > 1 with the joint MAP) and scored with
    `held_out_log_likelihood`. The smallest D within `tolerance` nats per response of the best
    wins. Returns (D, {D: score}).
    """
    y = _check_calibration(responses)
    held_out = np.arange(0, y.shape[0], 3)
    train = np.setdiff1d(np.arange(y.shape[0]), held_out)
    scores: dict[int, float] = {}
    for dims in sorted(candidates):
        model = "2pl" if dims == 1 else "2pl-jmap"
        params = fit_irt(y[train], model, dims=dims, seed=seed)
        scores[dims] = held_out_log_likelihood(y[held_out], params, seed=seed)
    best = max(scores.values())
    return min(d for d, s in scores.items() if s >= best - tolerance), scores


def held_out_log_likelihood(
    responses: np.ndarray,
    params: IRTParams,
    *,
    seed: int = 0,
    fraction_seen: float = 0.5,
    method: str = "map",
) -> float:
    """Mean per-response log-likelihood of unseen items for models the calibration never saw.

    Each row's items are split at random (seeded); its ability is read from the seen part and
    the 2PL predictions are scored on the rest. Higher is better; it is how we compared the
    unidimensional and multidimensional calibrations.
    """
    y = _check_responses(np.atleast_2d(responses), params.n_items, "responses")
    rng = np.random.default_rng(seed)
    total, count = 0.0, 0
    for row in y:
        order = rng.permutation(params.n_items)
        n_seen = int(round(fraction_seen * params.n_items))
        seen, unseen = order[:n_seen], order[n_seen:]
        theta = estimate_ability(row[seen], params.items(seen), method)
        total += float(log_likelihood(row[unseen], theta, params.items(unseen))[0])
        count += unseen.size
    return total / count
