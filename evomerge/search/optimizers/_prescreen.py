"""Surrogate pre-screening: an optimizer proposes more genomes than are evaluated; a surrogate picks.

Pre-screening as in Emmerich, Giannakoglou & Naujoks, "Single- and multiobjective evolutionary
optimization assisted by Gaussian random field metamodels" (IEEE TEVC 2006): each generation the
optimizer proposes ``factor`` times more offspring than the budget evaluates, a metamodel fitted to
every evaluation so far predicts them, and only the most promising are evaluated. The metamodel is
MAP's quadratic surrogate (:class:`~evomerge.search.optimizers.QuadraticSurrogate`, one output
per objective, logit link for accuracies).

    opt = make_prescreened("nsga2", dim, bounds, n_objectives, seed=0, factor=4, pop_size=16)
    genomes = opt.ask()           # (4, dim): the best 4 of NSGA-II's 16 offspring, as predicted
    opt.tell(genomes, objectives)

:class:`Prescreened` is an :class:`~evomerge.search.optimizers.Optimizer`, so the call-order and
shape checks, NaN handling, best tracking and the ``state()`` / ``Optimizer.from_state`` round trip
are the base class's; the inner optimizer's state is nested in the wrapper's (:class:`PrescreenState`).

Batch sizes. When the inner optimizer asks ``m`` genomes, the wrapper evaluates
``n = max(1, floor(m / factor))`` of them (or ``batch_size`` when set): the inner algorithm keeps its
own population size and simply runs about ``factor`` times more generations for the same number of
real evaluations. When ``m < factor * n`` (e.g. a nevergrad optimizer with ``batch_size=1``) the
wrapper asks the inner optimizer repeatedly; each earlier inner batch must be told before the next
ask, so it is told the surrogate's predictions for all its rows. If a row of such an earlier batch
is then selected and evaluated, its real value reaches the surrogate and the run's log but not the
inner optimizer (only the last batch is still open). The default batch sizing avoids this whenever
``m >= factor``.

The surrogate, and when there is none. Per objective, on every successful evaluation so far, three
nested models are fitted by ridge least squares on the link scale: linear (``1 + d`` terms),
diagonal quadratic (``1 + 2d``: a curvature per gene) and MAP's full quadratic
(``1 + d + d(d+1)/2``); a model is a candidate once there are at least ``terms + 2`` samples, and
each objective uses the candidate with the smallest closed-form leave-one-out error. With per-layer
genomes (d = 12..36) the full quadratic needs 93..705 samples, so in a 150-evaluation search the
diagonal model does most of the screening. There is no screening, and the inner batch is evaluated
as asked, while fewer than ``d + 3`` evaluations have succeeded or while the chosen models' mean
leave-one-out R² (link scale) is not above ``min_r2``: a surrogate that predicts worse than the
mean would only pick at random.

Which proposals are evaluated (``criterion``). With one objective, or an inner optimizer that only
optimises the scalarisation (GA, DE, CMA, TwoPointsDE, NGOpt: ``single_objective``), the ``n`` with
the best predicted weighted mean of the objectives. With several objectives and a multi-objective
inner optimizer (random, NSGA-II/III, M2N2, MAP), greedy predicted hypervolume improvement over
the evaluated front (reference point 0 for accuracies), each pick added to the front before the next
(ties, e.g. proposals predicted to be dominated, broken by the predicted weighted mean). That is what
those optimizers and the benchmark's hypervolume reward; ranking by the mean would pull every
evaluation toward the single best compromise and starve the ends of the front.

What the inner optimizer is told (``screened_out``). The evaluated rows get their real objectives
(NaN when the evaluation failed, so the inner optimizer applies its own failure handling). Every
asked row needs a value: pymoo's survival, CMA's rank-based update and DE's selection are defined
on whole populations. "predicted" (default) tells the screened-out rows the surrogate's prediction,
clipped to the range of the objectives evaluated so far, so an extrapolating quadratic never tells
the optimizer a point beats everything evaluated. It is the best estimate available, and as those
rows were predicted less promising than the evaluated ones they rank below them in the inner
selection, which is the point of pre-screening. "failed" tells them NaN (the inner optimizer scores
them as the worst value seen): that keeps unevaluated points out of archives (M2N2, MAP), but
wrongly punishes the region around the best evaluated points, from which most rejected proposals
come. Per-item responses of screened-out rows are NaN (M2N2 counts them as unsolved).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..pareto import hypervolume, non_dominated_mask
from ._base import BaseSettings, Optimizer, OptimizerState
from ._map import TieredQuadratic
from ._registry import make_optimizer

__all__ = [
    "PRESCREEN_DEFAULTS",
    "PrescreenSettings",
    "PrescreenState",
    "Prescreened",
    "ScreenPlan",
    "fit_screen",
    "make_prescreened",
    "select_proposals",
]

# Measured by `python benchmarks/search_quality.py synthetic` (table in benchmarks/RESULTS.md):
# factor 4 against no screening at equal evaluated budgets (150), 3 synthetic logistic-of-quadratic
# accuracy tasks in 12 and 36 dimensions, 6 seeds each, paired. On only where the primary metric
# (hypervolume for multi-objective optimizers, best mean for single-objective ones) improved with a
# paired t >= 2 and the other metric did not fall (t > -2):
#   nsga2 +0.110 hv (t 17), nsga3 +0.122 (t 12), de +0.119 best mean (t 8), twopointsde +0.040
#   (t 6), cma / ngopt +0.009 (t 3; at d = 36 CMA's samples are too concentrated for the surrogate to
#   beat the mean, so it mostly stays off there), ga +0.033 (t 2.3).
# Off: m2n2 (-0.008 hv, t -1.5; telling screened-out children as failed instead: +0.002, t 0.2;
# factor 2: -0.010 hv, t -1.3) and map (-0.012 hv, t -0.7: MAP already chooses its candidates with
# the same surrogate). random improved too (+0.050 hv, t 4) but stays off by default: it is the
# reference every optimizer must beat, and screened random search is no longer random search.
PRESCREEN_DEFAULTS: dict[str, float | None] = {
    "random": None,
    "nsga2": 4.0,
    "nsga3": 4.0,
    "ga": 4.0,
    "de": 4.0,
    "cma": 4.0,
    "twopointsde": 4.0,
    "ngopt": 4.0,
    "m2n2": None,
    "map": None,
}


# ---------------------------------------------------------------------------- the surrogate
def fit_screen(X: np.ndarray, F: np.ndarray, *, link: str = "auto", ridge: float = 1e-6,
               eps: float = 0.01) -> TieredQuadratic | None:
    """Per objective, the linear / diagonal / full quadratic with the smallest leave-one-out error,
    fitted to ``(n, d)`` genomes and ``(n, M)`` objectives (:class:`TieredQuadratic`).

    Returns None when there are fewer than ``d + 3`` rows (not even the linear model can be checked).
    link="auto" is "logit" when every objective lies in [0, 1] (accuracies), else "identity".
    """
    X = np.asarray(X, dtype=float)
    n, d = X.shape
    if n < d + 3:
        return None
    F = np.asarray(F, dtype=float).reshape(n, -1)
    if link == "auto":
        link = "logit" if F.min() >= 0.0 and F.max() <= 1.0 else "identity"
    return TieredQuadratic(ridge, link, eps).fit(X, F)


# ---------------------------------------------------------------------------- selection
def select_proposals(predicted: np.ndarray, n: int, weights: np.ndarray, *, criterion: str = "scalarized",
                     front: np.ndarray | None = None, ref: np.ndarray | float = 0.0) -> np.ndarray:
    """Indices of the ``n`` proposals to evaluate, best first.

    predicted: ``(N, M)`` predicted objectives (to maximise). criterion "scalarized": the largest
    ``predicted @ weights``. criterion "hvi": greedy predicted hypervolume improvement over ``front``
    (the evaluated non-dominated objectives, ``(k, M)``) with reference point ``ref``, each pick
    joining the front before the next; ties broken by ``predicted @ weights``, then by index.
    """
    P = np.asarray(predicted, dtype=float)
    score = P @ weights  # (N,)
    if criterion == "scalarized":
        return np.argsort(-score, kind="stable")[:n]
    if criterion != "hvi":
        raise ValueError(f"criterion must be 'scalarized' or 'hvi', got {criterion!r}")
    current = np.zeros((0, P.shape[1])) if front is None else np.asarray(front, dtype=float).reshape(-1, P.shape[1])
    ref = np.broadcast_to(np.asarray(ref, dtype=float), (P.shape[1],))
    remaining = np.arange(len(P))
    chosen: list[int] = []
    while len(chosen) < min(n, len(P)):
        base = hypervolume(current, ref) if len(current) else 0.0
        gain = np.zeros(len(remaining))
        for k, i in enumerate(remaining):
            if len(current) and np.any(np.all(current >= P[i], axis=1)):
                continue  # weakly dominated by the front: improves nothing
            gain[k] = hypervolume(np.vstack([current, P[i]]), ref) - base
        k = int(np.lexsort((np.arange(len(remaining)), -score[remaining], -np.round(gain, 12)))[0])
        i = int(remaining[k])
        chosen.append(i)
        remaining = np.delete(remaining, k)
        current = np.vstack([current, P[i]])
        current = current[non_dominated_mask(current)]
    return np.asarray(chosen, dtype=int)


# ---------------------------------------------------------------------------- the wrapper
@dataclass(frozen=True)
class PrescreenSettings(BaseSettings):
    """inner: the registered name of the wrapped optimizer; inner_settings: its settings (its
    ``weights`` come from this wrapper's ``weights``). The other fields: see the module docstring."""

    inner: str = ""
    inner_settings: dict[str, Any] | None = None
    factor: float = 4.0                  # proposals per evaluated genome
    batch_size: int | None = None        # evaluations per ask; None = max(1, floor(inner batch / factor))
    screened_out: str = "predicted"      # what the inner optimizer is told: "predicted" or "failed"
    criterion: str = "auto"              # "auto", "scalarized" or "hvi"
    link: str = "auto"                   # "auto", "logit" (accuracies) or "identity"
    ridge: float = 1e-6
    eps: float = 0.01                    # logit clip: accuracies come from tens of items
    min_r2: float = 0.0                  # screen only when the mean leave-one-out R² exceeds this


@dataclass
class ScreenPlan:
    """How the pending ask maps onto the inner optimizer's last batch."""

    positions: np.ndarray     # (n,) row of the inner batch each asked genome is; -1: an earlier batch
    told: np.ndarray | None   # (m, M) what the inner batch's rows not evaluated are told; None: nothing screened


@dataclass
class PrescreenState:
    inner: OptimizerState | None  # the wrapped optimizer, in a checkpoint (while running: `Prescreened.inner`)
    X: np.ndarray                 # (n, dim) every evaluated genome
    F: np.ndarray                 # (n, M) their objectives, failures filled
    failed: np.ndarray            # (n,) bool
    plan: ScreenPlan | None       # for the pending ask
    last_screen: dict[str, Any]   # what the last ask did: screened or not, proposals, chosen models


class Prescreened(Optimizer):
    """Surrogate pre-screening around another optimizer (see the module docstring)."""

    name = "prescreen"
    Settings = PrescreenSettings
    State = PrescreenState

    def _setup(self) -> None:
        s = self.settings
        if not s.inner or s.inner == self.name:
            raise ValueError(f"prescreen: `inner` must name the optimizer to wrap; got {s.inner!r}")
        if not (isinstance(s.factor, (int, float)) and math.isfinite(s.factor) and s.factor >= 1):
            raise ValueError(f"prescreen: factor must be a number >= 1, got {s.factor!r}")
        if s.batch_size is not None and s.batch_size < 1:
            raise ValueError(f"prescreen: batch_size must be >= 1 or None, got {s.batch_size}")
        for field, value, valid in (("screened_out", s.screened_out, ("predicted", "failed")),
                                    ("criterion", s.criterion, ("auto", "scalarized", "hvi")),
                                    ("link", s.link, ("auto", "logit", "identity"))):
            if value not in valid:
                raise ValueError(f"prescreen: {field} must be one of {list(valid)}, got {value!r}")
        if s.ridge < 0 or not 0 < s.eps < 0.5:
            raise ValueError(f"prescreen: need ridge >= 0 and 0 < eps < 0.5; got ridge={s.ridge}, eps={s.eps}")
        inner_settings = dict(s.inner_settings or {})
        if "weights" in inner_settings:
            raise ValueError("prescreen: give `weights` to the wrapper (it passes them on), not in inner_settings")
        if s.weights is not None:
            inner_settings["weights"] = s.weights
        self.inner = make_optimizer(s.inner, self.dim, (self.lower, self.upper), self.n_objectives, self.seed,
                                    **inner_settings)
        self.criterion = s.criterion
        if s.criterion == "auto":
            self.criterion = "hvi" if self.n_objectives > 1 and not self.inner.single_objective else "scalarized"
        self.strategy_state = PrescreenState(inner=None, X=np.zeros((0, self.dim)), F=np.zeros((0, self.n_objectives)),
                                             failed=np.zeros(0, dtype=bool), plan=None, last_screen={})
        self.last_proposals: np.ndarray | None = None    # (N, dim) every proposal of the last ask
        self.last_predictions: np.ndarray | None = None  # (N, M) the surrogate's predictions of them
        self.last_selected: np.ndarray | None = None     # (n,) rows of last_proposals that were asked

    @classmethod
    def wrap(cls, inner: Optimizer, factor: float = 4.0, **settings: Any) -> "Prescreened":
        """Pre-screen an existing, not yet used optimizer (same seed, bounds and settings)."""
        if inner.n_asks or inner.pending is not None:
            raise ValueError(f"prescreen: wrap a fresh optimizer; {inner.name} has already been asked")
        inner_settings = dataclasses.asdict(inner.settings)
        weights = inner_settings.pop("weights")
        return cls(inner.dim, (inner.lower, inner.upper), inner.n_objectives, inner.seed, inner=inner.name,
                   inner_settings=inner_settings, factor=factor, weights=weights, **settings)

    @property
    def last_screen(self) -> dict[str, Any]:
        return self.strategy_state.last_screen

    # -- data
    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        st = self.strategy_state
        ok = ~st.failed
        return st.X[ok], st.F[ok]

    def surrogate(self) -> TieredQuadratic | None:
        """The screen fitted to every successful evaluation so far, or None when not usable yet."""
        X, F = self._data()
        s = self.settings
        screen = fit_screen(X, F, link=s.link, ridge=s.ridge, eps=s.eps)
        if screen is None:
            return None
        r2 = screen.r2_loo_[np.isfinite(screen.r2_loo_)]  # NaN: an objective that never varied
        return screen if r2.size and r2.mean() > s.min_r2 else None

    def _told_values(self, predicted: np.ndarray) -> np.ndarray:
        if self.settings.screened_out == "failed":
            return np.full_like(predicted, np.nan)
        _, F = self._data()
        return np.clip(predicted, F.min(axis=0), F.max(axis=0))

    # -- ask
    def _ask(self) -> np.ndarray:
        s = self.settings
        screen = self.surrogate()
        first = self.inner.ask()  # (m, dim)
        self.last_selected = self.last_predictions = None
        self.last_proposals = first
        st = self.strategy_state
        if screen is None:  # evaluate the inner batch as asked
            st.plan = ScreenPlan(positions=np.arange(len(first)), told=None)
            st.last_screen = {"screened": False, "proposals": len(first)}
            return first
        n = s.batch_size or max(1, int(len(first) / s.factor))
        need = math.ceil(s.factor * n - 1e-9)
        batches = [first]
        while sum(len(b) for b in batches) < need:
            earlier = batches[-1]  # told before the next ask; see the module docstring
            self._tell_inner(earlier, self._told_values(screen.predict(earlier)), None)
            batches.append(self.inner.ask())
        proposals = np.vstack(batches)  # (N, dim)
        predicted = screen.predict(proposals)  # (N, M)
        _, F = self._data()
        front = F[non_dominated_mask(F)]
        ref = 0.0 if screen.link == "logit" else F.min(axis=0) - 0.1 * (np.ptp(F, axis=0) + 1e-12)
        selected = select_proposals(predicted, n, self.weights, criterion=self.criterion, front=front, ref=ref)
        offset = len(proposals) - len(batches[-1])
        st.plan = ScreenPlan(positions=np.where(selected >= offset, selected - offset, -1),
                             told=self._told_values(predicted[offset:]))
        self.last_proposals, self.last_predictions, self.last_selected = proposals, predicted, selected
        st.last_screen = {"screened": True, "proposals": len(proposals), "inner_asks": len(batches),
                          "terms": list(screen.terms_), "r2_loo": [float(r) for r in screen.r2_loo_]}
        return proposals[selected]

    def _tell_inner(self, genomes: np.ndarray, objectives: np.ndarray, responses: np.ndarray | None) -> None:
        if responses is None and self.inner._n_items is not None:  # keep response-driven optimizers fed
            responses = np.full((len(genomes), self.inner._n_items), np.nan)
        self.inner.tell(genomes, objectives, responses)

    # -- tell
    def _tell(self, genomes, objectives, responses, failed) -> None:
        st = self.strategy_state
        st.X = np.vstack([st.X, genomes])
        st.F = np.vstack([st.F, objectives])
        st.failed = np.concatenate([st.failed, failed])
        batch = self.inner.pending  # (m, dim), the last inner ask
        told = st.plan.told
        T = np.full((len(batch), self.n_objectives), np.nan) if told is None else np.array(told, dtype=float)
        R = None if responses is None else np.full((len(batch), responses.shape[1]), np.nan)
        real = np.where(failed[:, None], np.nan, objectives)  # the inner optimizer handles failures itself
        for row, position in enumerate(st.plan.positions):
            if position >= 0:
                T[position] = real[row]
                if R is not None:
                    R[position] = responses[row]
        self._tell_inner(batch, T, R)
        st.plan = None

    # -- checkpoint: the live inner optimizer travels as its own state
    def _strategy_snapshot(self) -> PrescreenState:
        return dataclasses.replace(super()._strategy_snapshot(), inner=self.inner.state())

    def _restore_strategy(self, strategy: Any, state: OptimizerState) -> None:
        super()._restore_strategy(strategy, state)
        self.inner = Optimizer.from_state(self.strategy_state.inner)
        self.strategy_state.inner = None


def make_prescreened(name: str, dim: int, bounds: Any, n_objectives: int, seed: int = 0,
                     factor: float | None = None, *, screen_settings: dict[str, Any] | None = None,
                     **settings: Any) -> Optimizer:
    """The optimizer ``name`` with surrogate pre-screening, as a run config's ``optimizer.prescreen``.

    factor: proposals per evaluation; ``None`` takes :data:`PRESCREEN_DEFAULTS` for ``name`` (no
    entry or ``None`` means off); ``1`` means off. Off returns the plain optimizer, so a run
    without screening is exactly the unwrapped one. ``settings`` go to the optimizer (``weights``
    to both); ``screen_settings`` are the wrapper's other :class:`PrescreenSettings` fields.
    """
    if name == Prescreened.name:
        raise ValueError("make_prescreened: name the optimizer to wrap, not 'prescreen'")
    if factor is None:
        factor = PRESCREEN_DEFAULTS.get(name)
    if factor is None or factor == 1:
        return make_optimizer(name, dim, bounds, n_objectives, seed, **settings)
    weights = settings.pop("weights", None)
    return Prescreened(dim, bounds, n_objectives, seed, inner=name, inner_settings=settings, factor=float(factor),
                       weights=weights, **(screen_settings or {}))
