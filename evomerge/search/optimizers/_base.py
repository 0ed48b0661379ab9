"""One ask/tell protocol for every evomerge optimizer (pymoo, nevergrad, random, M2N2, MAP).

The protocol follows pyribs' scheduler and evosax's strategies:

* ``ask() -> (n, dim)`` genomes inside the box; ``tell(genomes, objectives, responses=None)``
  with ``objectives`` of shape ``(n, n_objectives)`` (to MAXIMISE) and optional per-item
  ``responses`` of shape ``(n, n_items)`` (0/1 or scores in [0, 1]; M2N2 uses them).
* The base class does the shared work once: call-order checks (ask twice, tell without ask),
  shape checks against the last ask, clipping to the bounds, NaN handling (a NaN objective is a
  failed evaluation and is replaced by the worst value seen so far for that objective), the
  scalarisation used by single-objective back-ends, best-so-far tracking and checkpoints. Each
  strategy implements only ``_ask`` / ``_tell`` (its maths) and declares its ``State``.
* A strategy keeps everything that changes while it runs in ``self.strategy_state``, an instance
  of its ``State`` dataclass (numbers, strings, numpy arrays, lists, nested dataclasses).
  ``state()`` returns an :class:`OptimizerState` holding a copy of it, which one generic function
  turns into JSON and back exactly (:mod:`._checkpoint`); ``Optimizer.from_state(state)``
  rebuilds an optimizer whose next asks equal the uninterrupted one's.
* Back-ends whose internal objects cannot be written as plain data (pymoo, nevergrad) are
  :class:`~._replay.ReplayOptimizer` subclasses: their state is the ask/tell history, replayed
  on restore. Their hidden use of numpy's / Python's *global* RNG is confined to a private
  generator (:class:`PrivateGlobalRNG`) so that replay does not depend on what else the process
  did.
* Steady state (asynchronous evaluation): a strategy that can take results one at a time, in any
  order, while other genomes it proposed are still being evaluated sets ``out_of_order = True``
  and is driven by ``ask_one()`` / ``tell_one(genome, objectives, responses)`` instead: ``ask_one``
  hands out the rows of the strategy's ``_ask`` one by one (asking it again when they are all out),
  ``tell_one`` takes back any row that is out, and the strategy's ``_tell`` sees one-row batches in
  the order the results arrived. The rows out and those not yet handed out are part of ``state()``.
  A strategy may answer an ``_ask`` with zero rows while it waits for results (``ask_one`` returns
  None: a worker waits until the next ``tell_one``).
"""
from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from ._registry import OPTIMIZERS

__all__ = [
    "BaseSettings",
    "Optimizer",
    "OptimizerState",
    "PrivateGlobalRNG",
    "parse_bounds",
]

STATE_FORMAT_VERSION = 1
_RENAMED_SETTINGS = {"gene_layer_index": "gene_blocks"}  # old name -> current name


@dataclass(frozen=True)
class BaseSettings:
    """Settings every optimizer accepts.

    weights: scalarisation weights over the objectives (normalised to sum 1). Used by the
        single-objective back-ends (GA, DE, CMA, TwoPointsDE, NGOpt) and for best-so-far tracking.
        ``None`` means equal weights, i.e. the mean of the objectives.
    """

    weights: tuple[float, ...] | None = None
    # Known genomes the search starts from (e.g. the task-level "corner" merges): the first asks
    # return them, inside the strategy's own first population (pymoo's initial sampling, nevergrad
    # suggestions, M2N2's archive, MAP's design, random search's first rows).
    initial_genomes: tuple[tuple[float, ...], ...] | None = None
    # The genome's structure, from the search space: (dim,) non-decreasing block (layer or group of
    # layers) of each gene. A strategy that recombines genomes (M2N2) splits them only between
    # blocks; the others ignore it.
    gene_blocks: tuple[int, ...] | None = None


@dataclass
class OptimizerState:
    """Everything needed to resume an optimizer: the protocol's counters and the strategy's own
    ``State``; plain data only (see ``_checkpoint``)."""

    name: str                                  # registry name, e.g. "nsga2"
    dim: int
    n_objectives: int
    lower: np.ndarray                          # (dim,)
    upper: np.ndarray                          # (dim,)
    seed: int
    settings: dict[str, Any]                   # the Settings dataclass as a dict
    rng: dict[str, Any]                        # numpy Generator bit-generator state
    n_asks: int = 0
    n_tells: int = 0
    n_evaluations: int = 0                     # rows told so far (failed ones included)
    n_failed: int = 0                          # rows with a NaN objective
    pending: np.ndarray | None = None          # (n, dim) rows of an ask() not yet told
    objective_floor: np.ndarray | None = None  # (M,) lowest finite objective seen (NaN fill value)
    n_items: int | None = None                 # width of the response rows, once seen
    best_genome: np.ndarray | None = None      # (dim,) best by the scalarisation
    best_objectives: np.ndarray | None = None  # (M,)
    best_score: float | None = None
    strategy: Any = None                       # the strategy's `State` dataclass (None: it has none)
    steady: bool = False                       # driven by ask_one/tell_one (steady state) since its first ask
    out: np.ndarray | None = None              # (k, dim) steady state: rows handed out by ask_one, not yet told
    queued: np.ndarray | None = None           # (q, dim) steady state: rows of the last _ask not yet handed out
    format_version: int = STATE_FORMAT_VERSION


def parse_bounds(bounds: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` (scalars or ``(dim,)`` arrays) or an array of shape ``(dim, 2)``."""
    if isinstance(bounds, (tuple, list)) and len(bounds) == 2:
        lower, upper = bounds  # a Python pair is always (lower, upper), never two (l, u) rows
    else:
        arr = np.asarray(bounds, dtype=float)
        if arr.shape != (dim, 2):
            raise ValueError(
                f"bounds must be (lower, upper) or an array of shape ({dim}, 2); got shape {arr.shape}"
            )
        lower, upper = arr[:, 0], arr[:, 1]
    lower = np.broadcast_to(np.asarray(lower, dtype=float), (dim,)).copy()
    upper = np.broadcast_to(np.asarray(upper, dtype=float), (dim,)).copy()
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise ValueError("bounds must be finite")
    bad = np.flatnonzero(~(lower < upper))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"bounds: lower[{i}]={lower[i]} is not below upper[{i}]={upper[i]}")
    return lower, upper


class PrivateGlobalRNG:
    """Gives a back-end its own copy of numpy's and Python's *global* random state.

    pymoo and nevergrad mostly use explicit generators, but some code paths call
    ``np.random.*`` / ``random.*``. Inside ``with rng.active():`` the global states are swapped for
    this object's; on exit they are swapped back, so the back-end is reproducible from its seed and
    does not disturb (or get disturbed by) anything else in the process.
    """

    def __init__(self, seed: int):
        self._np_state = np.random.RandomState(seed).get_state()
        self._py_state = random.Random(seed).getstate()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved_np, saved_py = np.random.get_state(), random.getstate()
        np.random.set_state(self._np_state)
        random.setstate(self._py_state)
        try:
            yield
        finally:
            self._np_state, self._py_state = np.random.get_state(), random.getstate()
            np.random.set_state(saved_np)
            random.setstate(saved_py)


class Optimizer(abc.ABC):
    """Base class: the ask/tell protocol with order and shape checks.

    Subclasses set ``name`` and ``Settings``, implement ``_ask`` and ``_tell``, and, when they
    carry state from one ask to the next, set ``State`` (a dataclass) and keep that state in
    ``self.strategy_state`` (built in ``_setup``). Checkpoints copy it; nothing else is saved, so
    whatever ``_setup`` derives from the settings and the seed is simply derived again.
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseSettings]] = BaseSettings
    State: ClassVar[type | None] = None  # the strategy's own state dataclass
    # The setting that sizes the first population (pymoo's pop_size, M2N2's archive_size), if any.
    population_setting: ClassVar[str | None] = None
    single_objective: ClassVar[bool] = False  # True: optimises only the scalarisation (GA, DE, CMA, ...)
    # True: `_tell` takes results one row at a time, in any order, while other asked rows are still
    # out (`ask_one` / `tell_one`: asynchronous, steady-state evaluation).
    out_of_order: ClassVar[bool] = False

    def __init__(self, dim: int, bounds: Any, n_objectives: int, seed: int = 0, **settings: Any):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"{self.name}: dim must be a positive integer, got {dim!r}")
        if not isinstance(n_objectives, (int, np.integer)) or n_objectives < 1:
            raise ValueError(f"{self.name}: n_objectives must be a positive integer, got {n_objectives!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"{self.name}: seed must be an integer in [0, 2**32), got {seed!r}")
        self.dim = int(dim)
        self.n_objectives = int(n_objectives)
        self.seed = int(seed)
        self.lower, self.upper = parse_bounds(bounds, self.dim)
        self.settings = self._parse_settings(settings)
        self.weights = self._parse_weights(self.settings.weights)
        self._rng = np.random.default_rng(self.seed)
        self.n_asks = 0
        self.n_tells = 0
        self.n_evaluations = 0
        self.n_failed = 0
        self._pending: np.ndarray | None = None
        self._objective_floor: np.ndarray | None = None
        self._n_items: int | None = None
        self.best_genome: np.ndarray | None = None
        self.best_objectives: np.ndarray | None = None
        self.best_score: float | None = None
        self.strategy_state: Any = None
        self._steady = False  # set by the first ask_one(); then ask()/tell() are refused
        self._out = np.zeros((0, self.dim))     # (k, dim) handed out by ask_one, not yet told
        self._queued = np.zeros((0, self.dim))  # (q, dim) asked from the strategy, not yet handed out
        self._setup()
        if self.State is not None and not isinstance(self.strategy_state, self.State):
            raise TypeError(f"{self.name}: _setup() must set strategy_state to a {self.State.__name__}")

    # ------------------------------------------------------------------ settings
    @classmethod
    def initial_capacity(cls, settings: dict[str, Any]) -> int | None:
        """How many `initial_genomes` the first population holds with these settings (None: the
        strategy sets no limit of its own), so a caller can choose which known genomes to give."""
        if cls.population_setting is None:
            return None
        return int(settings.get(cls.population_setting, getattr(cls.Settings, cls.population_setting)))

    def _parse_settings(self, settings: dict[str, Any]) -> BaseSettings:
        settings = {_RENAMED_SETTINGS.get(k, k): v for k, v in settings.items()}  # checkpoints of older versions
        valid = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown setting(s) {unknown}; valid settings are {sorted(valid)}"
            )
        # JSON gives lists where the dataclasses declare tuples; normalise nested sequences.
        clean = {k: _tupleize(v) for k, v in settings.items()}
        return self.Settings(**clean)

    def _parse_weights(self, weights: Sequence[float] | None) -> np.ndarray:
        if weights is None:
            return np.full(self.n_objectives, 1.0 / self.n_objectives)
        w = np.asarray(weights, dtype=float)
        if w.shape != (self.n_objectives,) or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise ValueError(
                f"{self.name}: weights must be {self.n_objectives} non-negative numbers with a positive "
                f"sum (one per objective); got {weights!r}"
            )
        return w / w.sum()

    def initial_rows(self, clip: bool = False) -> np.ndarray:
        """`settings.initial_genomes` as a checked ``(n, dim)`` array (``(0, dim)`` when unset);
        a row outside the bounds is an error, or clipped into them with `clip`."""
        given = self.settings.initial_genomes
        rows = np.zeros((0, self.dim)) if not given else np.asarray(given, dtype=float)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"{self.name}: initial_genomes must have shape (n, {self.dim}); got {rows.shape}")
        if clip:
            return np.clip(rows, self.lower, self.upper)
        outside = np.flatnonzero(np.any((rows < self.lower) | (rows > self.upper), axis=1))
        if outside.size:
            raise ValueError(f"{self.name}: initial_genomes row {int(outside[0])} lies outside the bounds")
        return rows

    def scalarize(self, objectives: np.ndarray) -> np.ndarray:
        """Weighted mean of the objectives, ``(n, M) -> (n,)``; larger is better."""
        return np.asarray(objectives, dtype=float) @ self.weights

    # ------------------------------------------------------------------ protocol
    @property
    def pending(self) -> np.ndarray | None:
        """The rows of the last ask() that still await tell(), or None."""
        return None if self._pending is None else self._pending.copy()

    def ask(self) -> np.ndarray:
        """Return the next genomes to evaluate, shape ``(n, dim)``, inside the bounds."""
        if self._steady:
            raise RuntimeError(f"{self.name}: this optimizer is driven by ask_one()/tell_one(); do not mix in ask()")
        if self._pending is not None:
            raise RuntimeError(
                f"{self.name}: ask() was called twice without tell(). Evaluate the "
                f"{len(self._pending)} genomes returned by the previous ask() and pass them to "
                "tell(genomes, objectives) before asking again."
            )
        genomes = self._checked_ask(allow_empty=False)
        self._pending = genomes
        self.n_asks += 1
        return genomes.copy()

    def _checked_ask(self, allow_empty: bool) -> np.ndarray:
        genomes = np.asarray(self._ask(), dtype=float)
        if genomes.ndim != 2 or genomes.shape[1] != self.dim or (len(genomes) == 0 and not allow_empty):
            raise RuntimeError(
                f"{self.name}: internal error, _ask() returned shape {genomes.shape}; expected (n>0, {self.dim})"
            )
        if not np.all(np.isfinite(genomes)):
            raise RuntimeError(f"{self.name}: internal error, _ask() returned non-finite genomes")
        return np.clip(genomes, self.lower, self.upper)  # (n, dim)

    # ------------------------------------------------------------------ steady state
    @property
    def out(self) -> np.ndarray:
        """Steady state: the rows handed out by ask_one() and not yet told, ``(k, dim)``."""
        return self._out.copy()

    @classmethod
    def takes_out_of_order(cls, settings: dict[str, Any]) -> bool:
        """Can this strategy, with these settings, be driven by ask_one()/tell_one()?"""
        return cls.out_of_order

    def ask_one(self) -> np.ndarray | None:
        """Steady state: the next genome, ``(dim,)``, for a worker that is free now; None when the
        strategy needs a result first (ask again after the next tell_one())."""
        if not self.takes_out_of_order(dataclasses.asdict(self.settings)):
            raise RuntimeError(f"{self.name}: takes results only as whole ask() batches in the asked order; "
                               "use ask()/tell()")
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: an ask() is pending; tell() it before switching to ask_one()")
        self._steady = True
        if not len(self._queued):
            self._queued = self._checked_ask(allow_empty=True)
            self.n_asks += 1
            if not len(self._queued):
                return None
        genome, self._queued = self._queued[0].copy(), self._queued[1:]
        self._out = np.vstack([self._out, genome])
        return genome.copy()

    def tell_one(self, genome: Any, objectives: Any, responses: Any = None) -> None:
        """Steady state: the result of one genome that ask_one() handed out, in any order.

        objectives: ``(n_objectives,)`` to maximise, NaN = failed; responses: ``(n_items,)`` or None."""
        if not self._steady:
            raise RuntimeError(f"{self.name}: tell_one() without ask_one(); call ask_one() first")
        genome = np.asarray(genome, dtype=float).reshape(-1)
        if genome.shape != (self.dim,):
            raise ValueError(f"{self.name}: tell_one() got a genome of shape {genome.shape}; expected ({self.dim},)")
        tol = 1e-6 * (self.upper - self.lower)
        match = np.flatnonzero(np.all(np.abs(self._out - genome) <= tol, axis=1))
        if not match.size:
            raise ValueError(f"{self.name}: tell_one() got a genome that is not out (handed out by ask_one() and "
                             "not yet told); tell each handed-out genome once")
        i = int(match[0])
        F = self._check_objectives(np.reshape(np.asarray(objectives, dtype=float), (1, -1)), 1)
        R = None if responses is None else self._check_responses(np.reshape(np.asarray(responses, dtype=float),
                                                                            (1, -1)), 1)
        self._apply_tell(self._out[i : i + 1].copy(), F, R)
        self._out = np.delete(self._out, i, axis=0)

    def tell(self, genomes: Any, objectives: Any, responses: Any = None) -> None:
        """Report the results of the last ask().

        genomes: ``(n, dim)``, the asked rows in the asked order.
        objectives: ``(n, n_objectives)`` to maximise (``(n,)`` allowed when n_objectives == 1);
            NaN marks a failed evaluation; ±inf is rejected.
        responses: optional ``(n, n_items)`` per-item scores in [0, 1] (NaN = item not scored).
        """
        if self._pending is None:
            raise RuntimeError(
                f"{self.name}: tell() was called without a matching ask(). Call ask(), evaluate "
                "exactly the genomes it returns, then tell() their objectives once."
            )
        pending = self._pending
        n = len(pending)
        genomes = np.asarray(genomes, dtype=float)
        if genomes.shape != (n, self.dim):
            raise ValueError(
                f"{self.name}: tell() got genomes of shape {genomes.shape}; the last ask() returned "
                f"({n}, {self.dim}). Tell every asked genome, once, in the asked order."
            )
        tol = 1e-6 * (self.upper - self.lower)  # survives a float32 round trip, catches reordering
        mismatch = np.flatnonzero(np.any(np.abs(genomes - pending) > tol, axis=1))
        if mismatch.size:
            raise ValueError(
                f"{self.name}: tell() genome row {int(mismatch[0])} differs from row {int(mismatch[0])} "
                "of the last ask(); tell() needs the asked genomes in the asked order."
            )
        F = self._check_objectives(objectives, n)
        R = self._check_responses(responses, n)
        self._apply_tell(pending, F, R)
        self._pending = None

    def _apply_tell(self, rows: np.ndarray, F: np.ndarray, R: np.ndarray | None) -> None:
        """The shared part of tell() and tell_one(): checked rows ``(n, dim)`` and their results."""
        failed = np.any(np.isnan(F), axis=1)  # (n,)
        self._check_tell(F, R, failed)  # strategy-specific checks, before any state changes
        F = self._fill_failed(F)
        self._track_best(rows, F, failed)
        self._tell(rows, F, R, failed)
        if R is not None:
            self._n_items = R.shape[1]
        self.n_tells += 1
        self.n_evaluations += len(rows)
        self.n_failed += int(failed.sum())

    def _check_objectives(self, objectives: Any, n: int) -> np.ndarray:
        try:
            F = np.array(objectives, dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.name}: objectives must be numeric, ({n}, {self.n_objectives}); {err}") from None
        if F.ndim == 1 and self.n_objectives == 1:
            F = F[:, None]
        if F.ndim != 2:
            raise ValueError(
                f"{self.name}: objectives must be 2-D ({n}, {self.n_objectives}) (one row per asked "
                f"genome, one column per objective); got shape {F.shape}"
            )
        if F.shape[1] != self.n_objectives:
            raise ValueError(
                f"{self.name}: objectives has {F.shape[1]} columns but this optimizer was built with "
                f"n_objectives={self.n_objectives}"
            )
        if F.shape[0] != n:
            raise ValueError(
                f"{self.name}: objectives has {F.shape[0]} rows but the last ask() returned {n} genomes"
            )
        bad = np.argwhere(np.isinf(F))
        if bad.size:
            i, j = (int(v) for v in bad[0])
            raise ValueError(
                f"{self.name}: objectives[{i}, {j}] is {F[i, j]}; report a failed evaluation as NaN"
            )
        return F

    def _check_responses(self, responses: Any, n: int) -> np.ndarray | None:
        if responses is None:
            return None
        R = np.array(responses, dtype=float)
        if R.ndim != 2 or R.shape[0] != n:
            raise ValueError(
                f"{self.name}: responses must have shape ({n}, n_items), one row per asked genome; "
                f"got {R.shape}"
            )
        if self._n_items is not None and R.shape[1] != self._n_items:
            raise ValueError(
                f"{self.name}: responses has {R.shape[1]} items per row but earlier tells had "
                f"{self._n_items}; the item set must stay the same for the whole run"
            )
        finite = R[~np.isnan(R)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise ValueError(
                f"{self.name}: responses must be scores in [0, 1] (or NaN); got values in "
                f"[{finite.min()}, {finite.max()}]"
            )
        return R

    def _fill_failed(self, F: np.ndarray) -> np.ndarray:
        """NaN -> the lowest finite value seen so far for that objective (0 if none yet)."""
        batch_min = np.where(np.isnan(F), np.inf, F).min(axis=0)  # (M,)
        floor = batch_min if self._objective_floor is None else np.minimum(self._objective_floor, batch_min)
        self._objective_floor = floor
        fill = np.where(np.isfinite(floor), floor, 0.0)
        return np.where(np.isnan(F), fill[None, :], F)

    def _track_best(self, genomes: np.ndarray, F: np.ndarray, failed: np.ndarray) -> None:
        if np.all(failed):
            return
        scores = np.where(failed, -np.inf, self.scalarize(F))
        i = int(np.argmax(scores))
        if self.best_score is None or scores[i] > self.best_score:
            self.best_score = float(scores[i])
            self.best_genome = genomes[i].copy()
            self.best_objectives = F[i].copy()

    # ------------------------------------------------------------------ strategy hooks
    def _setup(self) -> None:
        """Build the strategy's own state (called at the end of __init__)."""

    def _check_tell(self, objectives: np.ndarray, responses: np.ndarray | None, failed: np.ndarray) -> None:
        """Raise ValueError for data this strategy cannot use (objectives still hold NaN)."""

    @abc.abstractmethod
    def _ask(self) -> np.ndarray:
        """Return ``(n, dim)`` genomes; the base clips them to the bounds."""

    @abc.abstractmethod
    def _tell(
        self, genomes: np.ndarray, objectives: np.ndarray, responses: np.ndarray | None, failed: np.ndarray
    ) -> None:
        """Update on checked data: genomes ``(n, dim)`` exactly as asked, objectives ``(n, M)`` with
        failed rows already filled with the worst value, responses ``(n, items)`` or None,
        failed ``(n,)`` bool."""

    def _strategy_snapshot(self) -> Any:
        """The strategy's state for a checkpoint: a copy of ``strategy_state``."""
        return copy.deepcopy(self.strategy_state)

    def _restore_strategy(self, strategy: Any, state: OptimizerState) -> None:
        """Put a snapshot back into a freshly built optimizer. Strategies that derive objects from
        their state (a Sobol engine, a replayed back-end, a wrapped optimizer) extend this."""
        expected = type(None) if self.State is None else self.State
        if not isinstance(strategy, expected):
            raise ValueError(
                f"{self.name}: the state's strategy part is a {type(strategy).__name__}, expected {expected.__name__}"
            )
        self.strategy_state = copy.deepcopy(strategy)

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> OptimizerState:
        """A snapshot of the optimizer as plain data (copies; later calls do not mutate it)."""
        return OptimizerState(
            name=self.name,
            dim=self.dim,
            n_objectives=self.n_objectives,
            lower=self.lower.copy(),
            upper=self.upper.copy(),
            seed=self.seed,
            settings=_plain(dataclasses.asdict(self.settings)),
            rng=_plain(self._rng.bit_generator.state),
            n_asks=self.n_asks,
            n_tells=self.n_tells,
            n_evaluations=self.n_evaluations,
            n_failed=self.n_failed,
            pending=None if self._pending is None else self._pending.copy(),
            objective_floor=None if self._objective_floor is None else self._objective_floor.copy(),
            n_items=self._n_items,
            best_genome=None if self.best_genome is None else self.best_genome.copy(),
            best_objectives=None if self.best_objectives is None else self.best_objectives.copy(),
            best_score=self.best_score,
            strategy=self._strategy_snapshot(),
            steady=self._steady,
            out=self._out.copy() if self._steady else None,
            queued=self._queued.copy() if self._steady else None,
        )

    @classmethod
    def from_state(cls, state: OptimizerState) -> "Optimizer":
        """Rebuild an optimizer from ``state``; ``Optimizer.from_state`` dispatches on ``state.name``."""
        if state.format_version != STATE_FORMAT_VERSION:
            raise ValueError(
                f"optimizer state format {state.format_version} is not supported (expected {STATE_FORMAT_VERSION})"
            )
        target: type[Optimizer] = cls
        if cls.name != state.name:
            if cls is not Optimizer:
                raise ValueError(f"state is for optimizer {state.name!r}, not {cls.name!r}")
            target = OPTIMIZERS[state.name]
        opt = target(state.dim, (state.lower, state.upper), state.n_objectives, state.seed, **state.settings)
        opt._steady = bool(state.steady)
        opt._restore_strategy(state.strategy, state)
        if state.steady:
            opt._out = np.array(state.out, dtype=float).reshape(-1, opt.dim)
            opt._queued = np.array(state.queued, dtype=float).reshape(-1, opt.dim)
        opt._rng.bit_generator.state = state.rng
        opt.n_asks, opt.n_tells = state.n_asks, state.n_tells
        opt.n_evaluations, opt.n_failed = state.n_evaluations, state.n_failed
        opt._pending = None if state.pending is None else np.array(state.pending, dtype=float)
        opt._objective_floor = None if state.objective_floor is None else np.array(state.objective_floor, dtype=float)
        opt._n_items = state.n_items
        opt.best_genome = None if state.best_genome is None else np.array(state.best_genome, dtype=float)
        opt.best_objectives = None if state.best_objectives is None else np.array(state.best_objectives, dtype=float)
        opt.best_score = state.best_score
        return opt

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, n_objectives={self.n_objectives}, "
            f"seed={self.seed}, evaluations={self.n_evaluations})"
        )


def _tupleize(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tupleize(v) for v in value)
    if isinstance(value, np.ndarray):
        return _tupleize(value.tolist())
    return value


def _plain(value: Any) -> Any:
    """Tuples -> lists and numpy scalars -> Python numbers, recursively (arrays are kept)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
