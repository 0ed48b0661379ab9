"""MAP: quadratic surrogates of per-task accuracy and their Pareto front.

Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation" (ICLR 2025, arXiv:2406.07529) and its reference code (``MAP.py``:
``quadratic_model``, ``fit_quadratic_functions``, ``find_pareto_front``, ``bayesian_pipeline``).

The reference fits, per task, ``sigmoid(quadratic(c))`` to accuracies with ``scipy.curve_fit``
(all squares, cross products, linear terms and a constant: ``(d + 1)(d + 2) / 2`` parameters), then
runs NSGA-III (DEAP) on the fitted surrogates; Bayesian MAP re-samples where the squared
prediction error is largest. Here:

* :class:`QuadraticSurrogate` fits the same full quadratic (terms ``[1, x_1..x_d, x_i x_j for
  i <= j]``) by ridge least squares on ``logit(clip(acc, eps, 1 - eps))``: the linearised form of
  the reference's sigmoid fit, exact on noise-free logit-quadratic data, closed-form and
  deterministic. Columns are scaled before the solve; the intercept is not penalised. It reports
  in-sample R², k-fold hold-out R² and closed-form leave-one-out residuals.
* :class:`MAPOptimizer` asks a space-filling design first (scrambled Sobol or Latin hypercube from
  ``scipy.stats.qmc``, at least twice the number of terms), then in every round refits, finds the
  surrogates' Pareto front with pymoo NSGA-II (NSGA-III with Das-Dennis directions for > 3
  objectives) inside the box, and asks (a) well-spread predicted-front points and (b) points near
  the samples with the largest leave-one-out error, i.e. where the surrogate errs most (the
  analogue of Bayesian MAP's error-weighted re-sampling). Predicted points are always evaluated
  for real before :meth:`MAPOptimizer.evaluated_front` reports them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import qmc

from ..pareto import non_dominated_mask
from ._base import BaseSettings, Optimizer, PrivateGlobalRNG

__all__ = [
    "MAPOptimizer",
    "MAPSettings",
    "MAPState",
    "QUADRATIC_TERMS",
    "QuadraticSurrogate",
    "TieredQuadratic",
    "cross_validated_r2",
    "n_quadratic_terms",
    "quadratic_features",
    "quadratic_term_names",
    "r2_score",
]


# ---------------------------------------------------------------------------- surrogate
QUADRATIC_TERMS = ("full", "diagonal", "linear")


def n_quadratic_terms(d: int, terms: str = "full") -> int:
    """Number of features of :func:`quadratic_features` for ``d`` inputs."""
    return {"full": 1 + d + d * (d + 1) // 2, "diagonal": 1 + 2 * d, "linear": 1 + d}[_check_terms(terms)]


def quadratic_term_names(d: int, terms: str = "full") -> list[str]:
    names = ["1"] + [f"x{i}" for i in range(d)]
    if _check_terms(terms) == "full":
        names += [f"x{i}*x{j}" for i in range(d) for j in range(i, d)]
    elif terms == "diagonal":
        names += [f"x{i}*x{i}" for i in range(d)]
    return names


def quadratic_features(X: np.ndarray, terms: str = "full") -> np.ndarray:
    """``[1, x_1..x_d, x_i x_j (i <= j, row-major)]``, shape (n, 1 + d + d(d+1)/2).

    terms="diagonal" keeps only the squares ``x_i x_i`` (1 + 2d features: curvature per gene, no
    interactions); terms="linear" drops every product (1 + d). They need far fewer samples than the
    full quadratic, which is what a surrogate fitted early in a search has.
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, d); got {X.shape}")
    n, d = X.shape
    terms = _check_terms(terms)
    if terms == "linear":
        return np.hstack([np.ones((n, 1)), X])
    if terms == "diagonal":
        return np.hstack([np.ones((n, 1)), X, X * X])
    iu, ju = np.triu_indices(d)
    return np.hstack([np.ones((n, 1)), X, X[:, iu] * X[:, ju]])


def _check_terms(terms: str) -> str:
    if terms not in QUADRATIC_TERMS:
        raise ValueError(f"terms must be one of {list(QUADRATIC_TERMS)}, got {terms!r}")
    return terms


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-column R² = 1 - SS_res / SS_tot; NaN for a constant column. (M,)"""
    y_true = np.asarray(y_true, dtype=float).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=float).reshape(len(y_pred), -1)
    ss_res = ((y_true - y_pred) ** 2).sum(axis=0)
    ss_tot = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)


class QuadraticSurrogate:
    """Full quadratic per output column, fitted by ridge least squares on the link scale.

    link="logit": outputs are accuracies in [0, 1], clipped to [eps, 1 - eps] before the logit and
    mapped back with a sigmoid by :meth:`predict`. link="identity": plain quadratic regression.
    terms: "full" (MAP's model), "diagonal" or "linear" (see :func:`quadratic_features`).
    """

    def __init__(self, ridge: float = 1e-8, link: str = "logit", eps: float = 1e-4, terms: str = "full"):
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if link not in ("logit", "identity"):
            raise ValueError(f"link must be 'logit' or 'identity', got {link!r}")
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.ridge, self.link, self.eps, self.terms = float(ridge), link, float(eps), _check_terms(terms)
        self.coef_: np.ndarray | None = None  # (n_terms, M) in the raw x parametrisation
        self._X: np.ndarray | None = None
        self._Z: np.ndarray | None = None  # (n, M) link-scale targets
        self._vector_output = False

    # link
    def to_link(self, y: np.ndarray) -> np.ndarray:
        if self.link == "identity":
            return y
        p = np.clip(y, self.eps, 1.0 - self.eps)
        return np.log(p) - np.log1p(-p)

    def from_link(self, z: np.ndarray) -> np.ndarray:
        return z if self.link == "identity" else 1.0 / (1.0 + np.exp(-z))

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "QuadraticSurrogate":
        X = np.asarray(X, dtype=float)
        Y = np.asarray(Y, dtype=float)
        self._vector_output = Y.ndim == 1
        Y = Y.reshape(len(Y), -1)  # (n, M)
        if X.ndim != 2 or len(X) != len(Y):
            raise ValueError(f"X (n, d) and Y (n, M) must have the same rows; got {X.shape} and {Y.shape}")
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(Y))):
            raise ValueError("X and Y must be finite (drop failed evaluations before fitting)")
        if self.link == "logit" and (Y.min() < 0 or Y.max() > 1):
            raise ValueError(f"link='logit' needs targets in [0, 1]; got [{Y.min()}, {Y.max()}]")
        Phi = quadratic_features(X, self.terms)  # (n, T)
        Z = self.to_link(Y)  # (n, M)
        scale = np.sqrt((Phi**2).mean(axis=0))
        scale[scale == 0] = 1.0
        Phis = Phi / scale  # (n, T), conditioned columns
        penalty = np.full(Phi.shape[1], math.sqrt(self.ridge))
        penalty[0] = 0.0  # the intercept is not shrunk
        A = np.vstack([Phis, np.diag(penalty)])  # (n + T, T)
        B = np.vstack([Z, np.zeros((Phi.shape[1], Z.shape[1]))])
        beta_s, *_ = np.linalg.lstsq(A, B, rcond=None)
        self.coef_ = beta_s / scale[:, None]  # (T, M) back to the raw features
        self._X, self._Z = X.copy(), Z
        self._scale, self._penalty = scale, penalty
        return self

    def _check_fitted(self) -> None:
        if self.coef_ is None:
            raise RuntimeError("QuadraticSurrogate is not fitted; call fit(X, Y) first")

    def predict_link(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        Z = quadratic_features(X, self.terms) @ self.coef_  # (n, M)
        return Z[:, 0] if self._vector_output else Z

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions on the original (accuracy) scale, (n, M) or (n,) like the fitted Y."""
        return self.from_link(self.predict_link(X))

    def r2(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """R² of :meth:`predict` against Y on the original scale, per output. (M,)"""
        return r2_score(Y, self.predict(X))

    def loo_residuals(self) -> np.ndarray:
        """Leave-one-out residuals on the link scale for the training data, (n, M).

        Closed form for ridge: ``e_i / (1 - h_ii)`` with ``H = Phi (Phi'Phi + P)^-1 Phi'``.
        """
        self._check_fitted()
        Phis = quadratic_features(self._X, self.terms) / self._scale
        G = Phis.T @ Phis + np.diag(self._penalty**2)
        h = np.einsum("ij,ji->i", Phis, np.linalg.pinv(G) @ Phis.T)  # (n,) leverages
        resid = self._Z - quadratic_features(self._X, self.terms) @ self.coef_
        return resid / np.maximum(1.0 - h, 1e-12)[:, None]

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"ridge": self.ridge, "link": self.link, "eps": self.eps, "terms": self.terms,
                "coef": self.coef_.tolist(), "vector_output": self._vector_output}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuadraticSurrogate":
        """A predict-only surrogate (no training data, so no loo_residuals)."""
        s = cls(data["ridge"], data["link"], data["eps"], data.get("terms", "full"))
        s.coef_ = np.asarray(data["coef"], dtype=float)
        s._vector_output = bool(data["vector_output"])
        return s


class TieredQuadratic:
    """Per output column, the linear, diagonal or full quadratic with the smallest leave-one-out error.

    Every term set with at least ``terms + 2`` samples is fitted (one :class:`QuadraticSurrogate`
    per term set, all columns at once); column ``j`` then uses the term set whose closed-form LOO
    mean squared error (link scale) is smallest, the simpler one on ties. Early in a search, or in
    many dimensions, that is the linear or diagonal model; the full quadratic takes over once the
    data supports it. ``r2_loo_`` is ``1 - LOO MSE / variance`` per column (link scale).
    Same interface as :class:`QuadraticSurrogate` for prediction (``predict``, ``predict_link``,
    ``from_link``, ``loo_residuals``, ``r2``).
    """

    def __init__(self, ridge: float = 1e-8, link: str = "logit", eps: float = 1e-4,
                 terms: tuple[str, ...] = QUADRATIC_TERMS):
        QuadraticSurrogate(ridge, link, eps)  # validates
        self.ridge, self.link, self.eps = float(ridge), link, float(eps)
        self.tiers = tuple(_check_terms(t) for t in terms)
        self.terms_: list[str] | None = None
        self.r2_loo_: np.ndarray | None = None

    def to_link(self, y: np.ndarray) -> np.ndarray:
        return QuadraticSurrogate(self.ridge, self.link, self.eps).to_link(y)

    def from_link(self, z: np.ndarray) -> np.ndarray:
        return QuadraticSurrogate(self.ridge, self.link, self.eps).from_link(z)

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "TieredQuadratic":
        X = np.asarray(X, dtype=float)
        Y = np.asarray(Y, dtype=float)
        self._vector_output = Y.ndim == 1
        Y = Y.reshape(len(Y), -1)  # (n, M)
        n, d = X.shape
        fits = {}
        for terms in QUADRATIC_TERMS:
            if terms in self.tiers and n >= n_quadratic_terms(d, terms) + 2:
                model = QuadraticSurrogate(self.ridge, self.link, self.eps, terms).fit(X, Y)
                loo = model.loo_residuals()  # (n, M)
                fits[terms] = (model, loo, (loo**2).mean(axis=0))
        if not fits:
            need = min(n_quadratic_terms(d, t) for t in self.tiers) + 2
            raise ValueError(f"TieredQuadratic needs at least {need} samples for d={d}; got {n}")
        spread = self.to_link(Y).var(axis=0)  # (M,)
        self.terms_, self._coef, self._loo, r2 = [], [], [], []
        for j in range(Y.shape[1]):
            terms = min(fits, key=lambda t: (fits[t][2][j], QUADRATIC_TERMS[::-1].index(t)))
            model, loo, mse = fits[terms]
            self.terms_.append(terms)
            self._coef.append(model.coef_[:, j])
            self._loo.append(loo[:, j])
            r2.append(1.0 - mse[j] / spread[j] if spread[j] > 0 else np.nan)
        self.r2_loo_ = np.asarray(r2)
        return self

    def predict_link(self, X: np.ndarray) -> np.ndarray:
        if self.terms_ is None:
            raise RuntimeError("TieredQuadratic is not fitted; call fit(X, Y) first")
        Z = np.column_stack([quadratic_features(X, t) @ c for t, c in zip(self.terms_, self._coef)])  # (N, M)
        return Z[:, 0] if self._vector_output else Z

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.from_link(self.predict_link(X))

    def loo_residuals(self) -> np.ndarray:
        """Leave-one-out residuals (link scale) of each column's chosen model, (n, M)."""
        return np.column_stack(self._loo)

    def r2(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return r2_score(Y, self.predict(X))


def cross_validated_r2(
    X: np.ndarray, Y: np.ndarray, folds: int = 5, seed: int = 0, **surrogate_kwargs: Any
) -> dict[str, np.ndarray]:
    """k-fold hold-out R² (pooled over the held-out predictions), per output column.

    Returns ``{"r2": (M,) on the original scale, "r2_link": (M,) on the link scale}``.
    """
    X = np.asarray(X, dtype=float)
    Y = np.asarray(Y, dtype=float).reshape(len(X), -1)
    n = len(X)
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, n={n}], got {folds}")
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty_like(Y)
    pred_link = np.empty_like(Y)
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        s = QuadraticSurrogate(**surrogate_kwargs).fit(X[train], Y[train])
        pred_link[part] = s.predict_link(X[part])
        pred[part] = s.from_link(pred_link[part])
    link = QuadraticSurrogate(**surrogate_kwargs).to_link
    return {"r2": r2_score(Y, pred), "r2_link": r2_score(link(Y), pred_link)}


# ---------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class MAPSettings(BaseSettings):
    batch_size: int = 8
    design: str = "sobol"              # "sobol" or "lhs"
    design_size: int | None = None     # None: 2 x n_terms (rounded up to a power of 2 for Sobol);
    #                                    terms="auto": 1 + 2 dim + 2
    ridge: float = 1e-8
    link: str = "logit"                # "logit" for accuracies, "identity" otherwise
    eps: float = 1e-4
    explore_fraction: float = 0.25     # share of each round spent where the surrogate errs most
    explore_radius: float = 0.1        # std of the exploration step, relative to the box width
    front_pop_size: int = 48           # NSGA on the surrogates
    front_generations: int = 40
    cv_folds: int = 5
    terms: str = "full"                # "full" (the paper), "diagonal", or "auto": see MAPOptimizer


@dataclass
class MAPState:
    n_design_asked: int                      # rows of the design asked so far
    round: int                               # surrogate rounds so far (seeds each round's NSGA)
    X: np.ndarray                            # (n, dim) every told genome
    F: np.ndarray                            # (n, M) their objectives, failures filled
    failed: np.ndarray                       # (n,) bool
    predicted_front_genomes: np.ndarray      # (P, dim) the surrogates' front, last round
    predicted_front_objectives: np.ndarray   # (P, M) its predicted objectives


class MAPOptimizer(Optimizer):
    """MAP behind the ask/tell protocol.

    terms="full" is the paper's surrogate; its design needs ``2 (1 + d + d(d+1)/2)`` evaluations,
    which per-layer genomes (d = 12..36: 182..1410) cannot afford within a few hundred. "diagonal"
    drops the cross products (design ``2 (1 + 2d)``); "auto" sizes the design for the diagonal
    model (``1 + 2d + 2`` points, not rounded to a power of two) and then fits, per task, whichever
    of the linear, diagonal and full quadratic has the smallest leave-one-out error on the data so
    far (:class:`TieredQuadratic`).
    """

    name = "map"
    Settings = MAPSettings
    State = MAPState
    out_of_order = True  # told rows are data for the next surrogate fit, in any order

    def _setup(self) -> None:
        s = self.settings
        if s.terms not in ("full", "diagonal", "auto"):
            raise ValueError(f"map: terms must be 'full', 'diagonal' or 'auto', got {s.terms!r}")
        self.n_terms = n_quadratic_terms(self.dim, "full" if s.terms == "full" else "diagonal")
        if s.design not in ("sobol", "lhs"):
            raise ValueError(f"map: design must be 'sobol' or 'lhs', got {s.design!r}")
        if s.terms == "auto":
            # Enough for the diagonal model plus two degrees of freedom for its leave-one-out check;
            # a prefix of the Sobol sequence (no power-of-two rounding), so the budget is not spent here.
            minimum = self.n_terms + 2
            n = minimum if s.design_size is None else int(s.design_size)
            if n < minimum:
                raise ValueError(
                    f"map: design_size={n} is below the {minimum} samples terms='auto' needs for dim={self.dim} "
                    f"(1 + 2 x {self.dim} diagonal-quadratic terms + 2)"
                )
        else:
            minimum = 2 * self.n_terms
            if s.design_size is None:
                n = minimum if s.design == "lhs" else 2 ** math.ceil(math.log2(minimum))
            else:
                n = int(s.design_size)
            if n < minimum:
                raise ValueError(
                    f"map: design_size={n} is below twice the number of quadratic terms "
                    f"(2 x {self.n_terms} = {minimum} for dim={self.dim})"
                )
        if s.batch_size < 1 or not 0 <= s.explore_fraction <= 1 or s.explore_radius <= 0:
            raise ValueError("map: need batch_size >= 1, 0 <= explore_fraction <= 1, explore_radius > 0")
        if s.cv_folds < 2:
            raise ValueError(f"map: cv_folds must be >= 2, got {s.cv_folds}")
        QuadraticSurrogate(s.ridge, s.link, s.eps)  # validates ridge / link / eps
        design_rng = np.random.default_rng([self.seed, 2])
        engine = (qmc.Sobol(self.dim, scramble=True, rng=design_rng) if s.design == "sobol"
                  else qmc.LatinHypercube(self.dim, rng=design_rng))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Sobol balance warning for n != 2**m
            unit = engine.random(n)
        self.design = self.lower + unit * (self.upper - self.lower)  # (n, dim)
        seeds = self.initial_rows(clip=True)
        if len(seeds):
            # known merges (e.g. the task-level corners) are evaluated first and join the design:
            # the surrogate learns their neighbourhood and the archive holds them
            self.design = np.vstack([seeds, self.design])
        self.strategy_state = MAPState(
            n_design_asked=0,
            round=0,
            X=np.zeros((0, self.dim)),
            F=np.zeros((0, self.n_objectives)),
            failed=np.zeros(0, dtype=bool),
            predicted_front_genomes=np.zeros((0, self.dim)),
            predicted_front_objectives=np.zeros((0, self.n_objectives)),
        )

    @property
    def predicted_front_genomes(self) -> np.ndarray:
        return self.strategy_state.predicted_front_genomes

    @property
    def predicted_front_objectives(self) -> np.ndarray:
        return self.strategy_state.predicted_front_objectives

    # -- data
    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        st = self.strategy_state
        ok = ~st.failed
        return st.X[ok], st.F[ok]

    def surrogate(self) -> QuadraticSurrogate | TieredQuadratic:
        """The surrogates fitted to every successful evaluation so far."""
        X, F = self._data()
        if len(X) == 0:
            raise RuntimeError("map: no successful evaluations to fit yet")
        return self._new_surrogate().fit(X, F)

    def _new_surrogate(self) -> QuadraticSurrogate | TieredQuadratic:
        s = self.settings
        if s.terms == "auto":
            return TieredQuadratic(s.ridge, s.link, s.eps)
        return QuadraticSurrogate(s.ridge, s.link, s.eps, s.terms)

    def surrogate_report(self) -> dict[str, Any]:
        """R² per objective: k-fold hold-out (original and link scale) and in-sample."""
        X, F = self._data()
        s = self.settings
        report: dict[str, Any] = {"n_samples": int(len(X)), "n_terms": self.n_terms, "folds": s.cv_folds}
        if len(X) < max(s.cv_folds, 2):
            return report
        surrogate = self.surrogate()
        if s.terms == "auto":
            report["terms"] = list(surrogate.terms_)
            report["r2_loo_link"] = surrogate.r2_loo_.tolist()
        else:
            cv = cross_validated_r2(X, F, s.cv_folds, self.seed, ridge=s.ridge, link=s.link, eps=s.eps,
                                    terms=s.terms)
            report["r2_holdout"] = cv["r2"].tolist()
            report["r2_holdout_link"] = cv["r2_link"].tolist()
        report["r2_train"] = surrogate.r2(X, F).tolist()
        return report

    def evaluated_front(self) -> tuple[np.ndarray, np.ndarray]:
        """Non-dominated evaluated genomes and their *real* objectives: ((k, dim), (k, M))."""
        X, F = self._data()
        if len(X) == 0:
            return X, F
        keep = non_dominated_mask(F)
        return X[keep], F[keep]

    # -- ask
    def _ask(self) -> np.ndarray:
        st, n_design = self.strategy_state, len(self.design)
        if st.n_design_asked < n_design:
            start = st.n_design_asked
            stop = min(n_design, start + self.settings.batch_size)
            st.n_design_asked = stop
            return self.design[start:stop]
        return self._surrogate_round()

    def _surrogate_round(self) -> np.ndarray:
        s = self.settings
        width = self.upper - self.lower
        X, F = self._data()
        self.strategy_state.round += 1
        if len(X) < max(self.n_terms, self.dim + 3 if s.terms == "auto" else 0):  # too many failures: keep filling
            return self.lower + self._rng.random((s.batch_size, self.dim)) * width
        surrogate = self._new_surrogate().fit(X, F)
        front_X, front_Z = self._predicted_front(surrogate)
        self.strategy_state.predicted_front_genomes = front_X
        self.strategy_state.predicted_front_objectives = surrogate.from_link(front_Z)
        n_explore = int(round(s.explore_fraction * s.batch_size))
        picked = self._spread_subset(front_X, front_Z, s.batch_size - n_explore)
        n_explore = s.batch_size - len(picked)
        # Where the surrogate errs most: the samples with the largest standardised LOO error.
        loo = surrogate.loo_residuals()  # (n, M)
        err = np.max(np.abs(loo) / (loo.std(axis=0) + 1e-12), axis=1)  # (n,)
        worst = np.argsort(-err, kind="stable")[:n_explore]
        worst = np.resize(worst, n_explore)  # repeat if fewer samples than needed
        steps = self._rng.normal(0.0, s.explore_radius, (n_explore, self.dim)) * width
        explore = np.clip(X[worst] + steps, self.lower, self.upper)
        return np.vstack([front_X[picked], explore])

    def _predicted_front(self, surrogate: QuadraticSurrogate | TieredQuadratic) -> tuple[np.ndarray, np.ndarray]:
        """Pareto set of the surrogates inside the box: ((P, dim), (P, M) link-scale predictions)."""
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize
        from pymoo.util.ref_dirs import get_reference_directions

        s, M = self.settings, self.n_objectives

        class SurrogateProblem(Problem):
            def _evaluate(self, x, out, *args, **kwargs):
                out["F"] = -surrogate.predict_link(x).reshape(len(x), M)  # sigmoid is monotone

        problem = SurrogateProblem(n_var=self.dim, n_obj=M, xl=self.lower, xu=self.upper)
        if M > 3:
            p = 1
            while math.comb(p + 1 + M - 1, M - 1) <= s.front_pop_size:
                p += 1
            ref_dirs = get_reference_directions("das-dennis", M, n_partitions=p)
            algorithm = NSGA3(ref_dirs=ref_dirs, pop_size=max(s.front_pop_size, len(ref_dirs)))
        else:
            algorithm = NSGA2(pop_size=s.front_pop_size)
        round_seed = int(np.random.SeedSequence([self.seed, 3, self.strategy_state.round]).generate_state(1)[0])
        with PrivateGlobalRNG(round_seed).active():
            res = minimize(problem, algorithm, ("n_gen", s.front_generations), seed=round_seed, verbose=False)
        front_X = np.atleast_2d(res.X).reshape(-1, self.dim)
        return front_X, -np.atleast_2d(res.F).reshape(-1, M)

    def _spread_subset(self, front_X: np.ndarray, front_Z: np.ndarray, k: int) -> np.ndarray:
        """Up to k well-spread front points (farthest-point in predicted objective space), skipping
        points that duplicate an evaluated genome."""
        width = self.upper - self.lower
        if k <= 0 or len(front_X) == 0:
            return np.zeros(0, dtype=int)
        told = self.strategy_state.X  # (n, dim)
        if len(told):
            gap = np.abs(front_X[:, None, :] - told[None, :, :]) / width  # (P, n, dim)
            fresh = np.flatnonzero(gap.max(axis=2).min(axis=1) > 1e-3)
        else:
            fresh = np.arange(len(front_X))
        if len(fresh) == 0:
            return np.zeros(0, dtype=int)
        Z = front_Z[fresh]
        span = Z.max(axis=0) - Z.min(axis=0)
        Zn = (Z - Z.min(axis=0)) / np.where(span > 0, span, 1.0)
        chosen = [int(np.argmax(Zn @ self.weights))]  # start from the best compromise
        dist = np.linalg.norm(Zn - Zn[chosen[0]], axis=1)
        while len(chosen) < min(k, len(fresh)):
            nxt = int(np.argmax(dist))
            if dist[nxt] <= 0:
                break
            chosen.append(nxt)
            dist = np.minimum(dist, np.linalg.norm(Zn - Zn[nxt], axis=1))
        return fresh[np.asarray(chosen, dtype=int)]

    # -- tell
    def _check_tell(self, objectives, responses, failed) -> None:
        ok = objectives[~failed]
        if self.settings.link == "logit" and ok.size and (ok.min() < 0 or ok.max() > 1):
            raise ValueError(
                f"map: link='logit' models accuracies in [0, 1]; got objectives in [{ok.min()}, {ok.max()}]. "
                "Use link='identity' for other objectives."
            )

    def _tell(self, genomes, objectives, responses, failed) -> None:
        st = self.strategy_state
        st.X = np.vstack([st.X, genomes])
        st.F = np.vstack([st.F, objectives])
        st.failed = np.concatenate([st.failed, failed])
