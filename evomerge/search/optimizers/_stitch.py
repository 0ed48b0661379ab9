"""Localize and stitch: find where each expert's skill sits in depth, then merge only those parts.

He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic" (TMLR 2024),
localize each task vector to the few parameters that carry its skill and stitch the localized parts
together, so that the experts stop interfering everywhere else. Here a *part* is a genome that takes
one expert from a few consecutive layers only (`BoundSpace.window_genomes`: the expert alone at
weight 1 in a depth window), the parts of one expert form a *group*, and the search localizes with
its own fitness, in three phases:

1. localize: evaluate the initial genomes (a warm start such as the corners), the ``empty`` genome
   (the base: no expert) and every part. Each group keeps the part with the largest gain over the
   empty genome on any one objective: a windowed expert shows its skill on its own task, which the
   mean over all tasks dilutes. Ties go to the larger scalarised value.
   With ``trim``, each kept part is also tried without its first and without its last block (a
   window one layer narrower at either end) and the group keeps the best of the three by the
   weighted mean: a window wider than the layers that carry the skill takes the expert's changes
   elsewhere along, which costs the other tasks.
2. stitch: merges of the kept parts of two or more groups, each the empty genome plus the sum of the
   parts' changes from it (clipped into the bounds). A beam over the number of parts: every pair
   first, then each of the ``beam`` best evaluated merges of the last size with one more group, in
   the order of a first-order prediction (the merge's objectives plus the added part's gain), until
   ``stitches`` merges are evaluated. Small merges go first because interference grows with the
   number of experts stitched (on the medium zoo all six kept parts together score 62.6 on
   validation, the best pair 76.5).
3. refine: the optimizer ``inner`` takes the rest of the budget, seeded with the best
   ``inner_seeds`` genomes evaluated so far (the non-dominated first); genomes it asks that were
   already evaluated are told from a cache, not evaluated again.

Every phase asks at most ``batch_size`` genomes at a time. The state is plain data; the inner
optimizer travels as its own state in a checkpoint (as :class:`~._prescreen.Prescreened`'s does).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..pareto import non_dominated_mask
from ._base import BaseSettings, Optimizer, OptimizerState
from ._registry import OPTIMIZERS, make_optimizer

__all__ = ["StitchOptimizer", "StitchSettings", "StitchState", "kept_parts", "stitch_genome"]

_MATCH = 1e-9  # genomes equal to this (relative to the bounds' width) are the same genome


@dataclass(frozen=True)
class StitchSettings(BaseSettings):
    """parts: ``(P, dim)`` genomes, each one expert in one depth window; part_groups: ``(P,)`` the
    group (expert) of each part; empty: ``(dim,)`` the genome with no expert (the base). A run config
    gives ``parts: windows`` and ``window`` (layers per window) instead, and the search fills these
    three in from its space."""

    parts: tuple[tuple[float, ...], ...] | None = None
    part_groups: tuple[int, ...] | None = None
    empty: tuple[float, ...] | None = None
    window: int | None = None   # run config: the layers per window the parts were made from
    window_stride: int = 1
    stitches: int = 20          # stitched merges evaluated before the inner optimizer takes over
    beam: int = 4               # merges of one size extended by one more group
    inner: str = "random"       # the optimizer of the refine phase
    inner_settings: dict[str, Any] | None = None
    inner_seeds: int = 16       # best genomes so far that seed it
    trim: bool = False          # also try each kept part without its first / without its last block
    batch_size: int = 8


@dataclass
class StitchState:
    phase: str                      # "localize", "stitch" or "refine"
    queue: np.ndarray               # (q, dim) rows of the current phase not yet asked
    X: np.ndarray                   # (n, dim) every evaluated genome
    F: np.ndarray                   # (n, M) their objectives, failures filled
    failed: np.ndarray              # (n,) bool
    R: np.ndarray | None            # (n, items) their responses (NaN where none); None until some
    kept: np.ndarray                # (G, dim) the part each group keeps (a part, or a trimmed one); (0, dim) before
    level: int                      # stitch phase: number of parts in the merges being evaluated
    stitched: list[list[int]]       # the group subsets evaluated or queued, in order
    inner: OptimizerState | None    # refine phase, in a checkpoint (while running: `StitchOptimizer.inner`)
    plan: np.ndarray | None         # refine: (m,) row of X each row of the inner batch is (-1: asked now)


def kept_parts(F_parts: np.ndarray, groups: np.ndarray, F_empty: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(G,) for each group 0..G-1, the index of its part with the largest gain over the empty genome
    on any one objective (ties: the larger weighted mean). F_parts: (P, M); groups: (P,)."""
    gain = (np.asarray(F_parts, dtype=float) - np.asarray(F_empty, dtype=float)).max(axis=1)  # (P,)
    score = np.asarray(F_parts, dtype=float) @ weights
    out = []
    for g in range(int(groups.max()) + 1):
        members = np.flatnonzero(groups == g)
        out.append(int(members[np.lexsort((score[members], gain[members]))[-1]]))
    return np.asarray(out, dtype=int)


def stitch_genome(parts: np.ndarray, empty: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The empty genome plus every part's change from it, clipped into the bounds. parts: (k, dim)."""
    return np.clip(empty + (np.asarray(parts, dtype=float) - empty).sum(axis=0), lower, upper)


class StitchOptimizer(Optimizer):
    """Localize and stitch (see the module docstring)."""

    name = "stitch"
    Settings = StitchSettings
    State = StitchState

    def _setup(self) -> None:
        s = self.settings
        if s.parts is None or s.part_groups is None or s.empty is None:
            raise ValueError("stitch: needs parts, part_groups and empty (a run config gives `parts: windows` "
                             "and `window`)")
        self.parts = np.asarray(s.parts, dtype=float)
        self.groups = np.asarray(s.part_groups, dtype=int)
        self.empty = np.asarray(s.empty, dtype=float)
        if self.parts.ndim != 2 or self.parts.shape[1] != self.dim:
            raise ValueError(f"stitch: parts must have shape (P, {self.dim}); got {self.parts.shape}")
        if self.groups.shape != (len(self.parts),) or self.groups.min(initial=0) < 0:
            raise ValueError(f"stitch: part_groups must be {len(self.parts)} group numbers >= 0 (one per part)")
        if sorted(set(self.groups.tolist())) != list(range(int(self.groups.max(initial=-1)) + 1)):
            raise ValueError("stitch: part_groups must number the groups 0..G-1, each with a part")
        if self.empty.shape != (self.dim,):
            raise ValueError(f"stitch: empty must have shape ({self.dim},); got {self.empty.shape}")
        for field in ("stitches", "beam", "inner_seeds", "batch_size"):
            if getattr(s, field) < (0 if field == "stitches" else 1):
                raise ValueError(f"stitch: {field} must be >= {0 if field == 'stitches' else 1}, got {getattr(s, field)}")
        if s.inner == self.name or s.inner not in OPTIMIZERS:
            raise ValueError(f"stitch: inner must name another optimizer ({sorted(OPTIMIZERS)}); got {s.inner!r}")
        if "weights" in (s.inner_settings or {}) or "initial_genomes" in (s.inner_settings or {}):
            raise ValueError("stitch: inner_settings take neither weights (the wrapper's pass on) nor "
                             "initial_genomes (the refine phase seeds it)")
        self._new_inner()  # a typo in them fails now, not after the localize and stitch phases
        first = np.vstack([self.initial_rows(), self.empty[None], self.parts])
        self.inner: Optimizer | None = None
        self.strategy_state = StitchState(
            phase="localize", queue=_unique_rows(first, self._scale), X=np.zeros((0, self.dim)),
            F=np.zeros((0, self.n_objectives)), failed=np.zeros(0, dtype=bool), R=None,
            kept=np.zeros((0, self.dim)), level=2, stitched=[], inner=None, plan=None)

    @property
    def _scale(self) -> np.ndarray:
        return self.upper - self.lower

    # -- lookups
    def _row_of(self, genomes: np.ndarray) -> np.ndarray:
        """(n,) the row of X each genome equals, -1 where none."""
        X = self.strategy_state.X
        if not len(X):
            return np.full(len(genomes), -1)
        close = np.all(np.abs(genomes[:, None, :] - X[None]) <= _MATCH * self._scale, axis=2)  # (n, N)
        return np.where(close.any(axis=1), close.argmax(axis=1), -1)

    def _evaluated(self, genome: np.ndarray) -> np.ndarray | None:
        row = int(self._row_of(genome[None])[0])
        return None if row < 0 else self.strategy_state.F[row]

    # -- ask
    def _ask(self) -> np.ndarray:
        st = self.strategy_state
        while True:
            if len(st.queue):
                n = self.settings.batch_size
                batch, st.queue = st.queue[:n], st.queue[n:]
                return batch
            if st.phase == "localize":
                self._localize()
            elif st.phase == "trim":
                self._keep_trimmed()
            elif st.phase == "stitch":
                self._next_level()
            else:
                return self._ask_inner()

    def _localize(self) -> None:
        st = self.strategy_state
        empty = self._evaluated(self.empty)
        F_parts = np.stack([self._evaluated(p) for p in self.parts])
        st.kept = self.parts[kept_parts(F_parts, self.groups, empty, self.weights)]
        if self.settings.trim:
            st.phase = "trim"
            trims = [t for part in st.kept for t in self._trims(part)]
            st.queue = _unique_rows(np.stack(trims), self._scale) if trims else np.zeros((0, self.dim))
            st.queue = st.queue[self._row_of(st.queue) < 0]
        else:
            self._start_stitching()

    def _trims(self, part: np.ndarray) -> list[np.ndarray]:
        """The part without its first and without its last block (genes of the gene_blocks it changes),
        when it changes more than one block; those genes take the empty genome's values."""
        if self.settings.gene_blocks is None:
            return []
        blocks = np.asarray(self.settings.gene_blocks)
        changed = np.unique(blocks[np.abs(part - self.empty) > _MATCH * self._scale])
        out = []
        for edge in (changed[:1], changed[-1:]) if len(changed) > 1 else ():
            trimmed = part.copy()
            trimmed[np.isin(blocks, edge)] = self.empty[np.isin(blocks, edge)]
            out.append(trimmed)
        return out

    def _keep_trimmed(self) -> None:
        """Each group keeps the best of its part and the part's trims by the weighted mean: all of them
        carry the skill (or the trim lost it, and its own task falls), and what a layer too many costs
        shows on the other tasks, which the one-task gain of the localize rule ignores. Ties keep the
        wider part."""
        st = self.strategy_state
        kept = []
        for part in st.kept:
            options = np.stack([part, *self._trims(part)])
            score = np.stack([self._evaluated(o) for o in options]) @ self.weights
            kept.append(options[int(np.argmax(score))])
        st.kept = np.stack(kept)
        self._start_stitching()

    def _start_stitching(self) -> None:
        st = self.strategy_state
        empty = self._evaluated(self.empty)
        st.phase, st.level = "stitch", 2
        gains = [self._gain(g) for g in range(len(st.kept))]
        self._queue_subsets([(list(pair), empty + gains[pair[0]] + gains[pair[1]])
                             for pair in itertools.combinations(range(len(st.kept)), 2)])

    def _queue_subsets(self, candidates: list[tuple[list[int], np.ndarray]]) -> None:
        """Queue the subsets not yet stitched, best first by their predicted objectives, within the
        stitches left; none left (or none new) moves on to the refine phase. A subset whose merge
        was evaluated already (a window as deep as the model makes a part a corner) counts as
        stitched without a second evaluation."""
        st = self.strategy_state
        fresh: dict[tuple[int, ...], float] = {}
        for subset, predicted in candidates:
            key = tuple(sorted(subset))
            if list(key) not in st.stitched:
                fresh[key] = max(fresh.get(key, -np.inf), float(predicted @ self.weights))
        order = sorted(fresh, key=lambda key: -fresh[key])[: max(0, self.settings.stitches - len(st.stitched))]
        queued = []
        for key in order:
            st.stitched.append(list(key))
            if self._evaluated(self._genome(list(key))) is None:
                queued.append(list(key))
        if not order:
            st.phase = "refine"
            return
        st.queue = np.stack([self._genome(s) for s in queued]) if queued else np.zeros((0, self.dim))

    def _genome(self, subset: list[int]) -> np.ndarray:
        return stitch_genome(self.strategy_state.kept[subset], self.empty, self.lower, self.upper)

    def _gain(self, group: int) -> np.ndarray:
        return self._evaluated(self.strategy_state.kept[group]) - self._evaluated(self.empty)

    def _next_level(self) -> None:
        """Each of the `beam` best evaluated merges of the current size, with one more group; the
        prediction is the evaluated merge plus the added part's gain."""
        st = self.strategy_state
        level = [s for s in st.stitched if len(s) == st.level]
        if st.level >= len(st.kept) or not level:
            st.phase = "refine"
            return
        values = [self._evaluated(self._genome(s)) for s in level]
        best = np.argsort([float(v @ self.weights) for v in values], kind="stable")[::-1][: self.settings.beam]
        st.level += 1
        self._queue_subsets([(level[i] + [g], values[i] + self._gain(g))
                             for i in best for g in range(len(st.kept)) if g not in level[i]])

    # -- refine
    def _new_inner(self, seeds: np.ndarray | None = None) -> Optimizer:
        """The inner optimizer with its settings (and the block structure), seeded with `seeds`."""
        s = self.settings
        settings = dict(s.inner_settings or {})
        if s.gene_blocks is not None:
            settings.setdefault("gene_blocks", s.gene_blocks)
        initial = None if seeds is None else [tuple(g) for g in seeds.tolist()]
        try:
            return make_optimizer(s.inner, self.dim, (self.lower, self.upper), self.n_objectives, self.seed + 1,
                                  weights=s.weights, initial_genomes=initial, **settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stitch: inner optimizer {s.inner!r}: {exc}") from None

    def _start_inner(self) -> None:
        st = self.strategy_state
        s = self.settings
        ok = np.flatnonzero(~st.failed)
        front = np.zeros(len(st.X), dtype=bool)
        front[ok[non_dominated_mask(st.F[ok])]] = True
        order = np.lexsort((-(st.F @ self.weights), ~front))  # the front first, each by weighted mean
        order = [i for i in order if not st.failed[i]]
        capacity = OPTIMIZERS[s.inner].initial_capacity(dict(s.inner_settings or {})) or s.inner_seeds
        self.inner = self._new_inner(st.X[order[: min(s.inner_seeds, capacity)]])

    def _ask_inner(self) -> np.ndarray:
        st = self.strategy_state
        if self.inner is None:
            self._start_inner()
        for _ in range(10_000):
            batch = self.inner.ask()
            rows = self._row_of(batch)
            if np.any(rows < 0):
                st.plan = rows
                return batch[rows < 0]
            self._tell_inner(batch, rows, None, None)  # all known: told from the cache
        raise RuntimeError(f"stitch: the inner optimizer {self.settings.inner} asked only evaluated genomes "
                           "10,000 times in a row")

    def _tell_inner(self, batch: np.ndarray, rows: np.ndarray, new_F: np.ndarray | None,
                    new_R: np.ndarray | None) -> None:
        st = self.strategy_state
        T = np.full((len(batch), self.n_objectives), np.nan)
        width = None if st.R is None else st.R.shape[1]
        R = None if width is None else np.full((len(batch), width), np.nan)
        for i, row in enumerate(rows):
            if row >= 0 and not st.failed[row]:
                T[i] = st.F[row]
                if R is not None:
                    R[i] = st.R[row]
        if new_F is not None:
            T[rows < 0] = new_F
            if R is not None and new_R is not None:
                R[rows < 0] = new_R
        self.inner.tell(batch, T, R)

    # -- tell
    def _tell(self, genomes, objectives, responses, failed) -> None:
        st = self.strategy_state
        if responses is not None and st.R is None:
            st.R = np.full((len(st.X), responses.shape[1]), np.nan)
        if st.R is not None:
            add = responses if responses is not None else np.full((len(genomes), st.R.shape[1]), np.nan)
            st.R = np.vstack([st.R, add])
        st.X = np.vstack([st.X, genomes])
        st.F = np.vstack([st.F, objectives])
        st.failed = np.concatenate([st.failed, failed])
        if st.plan is not None:  # refine: the inner batch, cached rows and these
            batch = self.inner.pending
            real = np.where(failed[:, None], np.nan, objectives)
            self._tell_inner(batch, st.plan, real, responses)
            st.plan = None

    # -- checkpoint: the live inner optimizer travels as its own state
    def _strategy_snapshot(self) -> StitchState:
        inner = None if self.inner is None else self.inner.state()
        return dataclasses.replace(super()._strategy_snapshot(), inner=inner)

    def _restore_strategy(self, strategy: Any, state: OptimizerState) -> None:
        super()._restore_strategy(strategy, state)
        saved = self.strategy_state.inner
        self.inner = None if saved is None else Optimizer.from_state(saved)
        self.strategy_state.inner = None


def _unique_rows(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The rows in their order, without repeats (a part equal to an initial genome, say)."""
    keep: list[int] = []
    for i, row in enumerate(rows):
        if not any(np.all(np.abs(rows[j] - row) <= _MATCH * scale) for j in keep):
            keep.append(i)
    return rows[keep]
