"""M2N2 (Model Merging of Natural Niches) on merge genomes.

Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025
(arXiv:2508.16204); reference code: SakanaAI's natural-niches JAX implementation
(``sample_parents``, ``update_archive``, ``crossover`` / ``slerp_w_splitpoint``, ``mutate``).

What is implemented, on an archive of members ``i`` with response rows ``s_i`` (0/1 or [0, 1]
scores over items ``j``):

* resource competition: ``z_j = sum_k s_kj``; ``F_ij = s_ij / z_j**alpha`` (0 where ``z_j = 0``);
  shared fitness ``f_i = sum_j F_ij``.
* parent A ~ ``f / sum f``; parent B ~ attraction ``g(A, B) = sum_j max(0, F_Bj - F_Aj)`` (so B = A
  has probability 0). Selection uses the archive without the child, as the reference does.
* crossover (reference ``slerp_w_splitpoint`` with linear instead of spherical interpolation):
  a split ``s`` and a ratio ``r ~ U(0, 1)``; genes whose layer index is ``< s`` become
  ``(1 - r) * A + r * B`` and the others ``r * A + (1 - r) * B``. The reference draws ``s`` from
  ``randint(0, P)`` over parameter positions; here ``s`` is drawn uniformly from the distinct layer
  indices (``gene_blocks``, default ``arange(dim)`` = the reference), so a split never cuts a
  layer block. Linear interpolation keeps children inside the box and commutes with affine genome
  decoders, which is what makes :func:`crossover` on genomes equal :func:`crossover` on merged
  weights for linear merge methods (see the tests).
* mutation: Gaussian, ``std = mutation_std * (upper - lower)``, then clipped (the reference adds
  ``N(0, 0.01)`` when evolving from scratch).
* insertion (reference ``update_archive``): with the child's row appended, recompute the shared
  fitness of all ``k + 1`` rows; the lowest (first index on ties, members before the child)
  is replaced by the child unless that lowest row is the child itself. While the archive is not
  full the child is simply added (the reference's empty slots have fitness 0 and go first).

Guards the reference code lacks: all fitness zero -> A uniform; all attraction zero -> B uniform
over the other members; an archive of one (or identical parents) -> B = A and the clone is mutated
with ``clone_mutation_std`` so the evaluation is not wasted; failed evaluations (NaN objectives)
never enter the archive; NaN item responses count as 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import BaseSettings, Optimizer

__all__ = [
    "M2N2Optimizer",
    "M2N2Settings",
    "M2N2State",
    "allowed_splits",
    "attraction",
    "crossover",
    "parent_a_probabilities",
    "parent_b_probabilities",
    "replacement_index",
    "shared_fitness",
    "shared_fitness_matrix",
]


# ---------------------------------------------------------------------------- pure maths
def shared_fitness_matrix(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``F_ij = s_ij / z_j**alpha`` with ``z_j = sum_k s_kj``; items nobody solves give 0. (k, items)"""
    S = np.asarray(scores, dtype=float)  # (k, items)
    z = S.sum(axis=0)  # (items,)
    denom = np.where(z > 0, z, 1.0) ** alpha
    return np.where(z[None, :] > 0, S / denom[None, :], 0.0)


def shared_fitness(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``f_i = sum_j F_ij``, shape (k,)."""
    return shared_fitness_matrix(scores, alpha).sum(axis=1)


def attraction(scores: np.ndarray, a: int, alpha: float = 1.0) -> np.ndarray:
    """``g(A, B) = sum_j max(0, F_Bj - F_Aj)`` for every member B, shape (k,); ``g(A, A) = 0``."""
    F = shared_fitness_matrix(scores, alpha)
    return np.maximum(0.0, F - F[a][None, :]).sum(axis=1)


def parent_a_probabilities(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """P(A = i) proportional to shared fitness; uniform when every fitness is 0."""
    f = shared_fitness(scores, alpha)
    if f.sum() <= 0:
        return np.full(len(f), 1.0 / len(f))
    return f / f.sum()


def parent_b_probabilities(scores: np.ndarray, a: int, alpha: float = 1.0) -> np.ndarray:
    """P(B = i | A = a) proportional to attraction; uniform over the others when all are 0.

    With an archive of one the only choice is B = A.
    """
    k = len(scores)
    if k == 1:
        return np.ones(1)
    g = attraction(scores, a, alpha)
    g[a] = 0.0
    if g.sum() <= 0:
        g = np.ones(k)
        g[a] = 0.0
    return g / g.sum()


def allowed_splits(layer_index: np.ndarray) -> np.ndarray:
    """The split values a crossover may draw: the distinct layer indices, sorted.

    Split ``s`` puts every gene with layer index ``< s`` before the split; ``s = min`` puts none
    before it (as ``split_point = 0`` does in the reference).
    """
    return np.unique(np.asarray(layer_index))


def crossover(
    a: np.ndarray, b: np.ndarray, split: float, ratio: float, layer_index: np.ndarray | None = None
) -> np.ndarray:
    """Split-point crossover of two arrays ``(n, *rest)`` along their first, layer-ordered axis.

    Rows with ``layer_index < split`` get ``(1 - ratio) * a + ratio * b``; the other rows get
    ``ratio * a + (1 - ratio) * b``. ``layer_index`` (n,) defaults to ``arange(n)``. Pure: works on
    genomes and on stacked merged weights alike, and never mutates its inputs.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim == 0:
        raise ValueError(f"crossover needs two arrays of the same shape (n, ...); got {a.shape} and {b.shape}")
    layers = np.arange(a.shape[0]) if layer_index is None else np.asarray(layer_index)
    if layers.shape != (a.shape[0],):
        raise ValueError(f"layer_index must have shape ({a.shape[0]},); got {layers.shape}")
    before = (layers < split).reshape((-1,) + (1,) * (a.ndim - 1))  # (n, 1, ...)
    w_b = np.where(before, ratio, 1.0 - ratio)  # weight on b per row
    return (1.0 - w_b) * a + w_b * b


def replacement_index(scores: np.ndarray, child: np.ndarray, alpha: float = 1.0) -> int | None:
    """Index of the member the child replaces, or None when the child is itself the worst.

    Shared fitness is recomputed with the child's row included (reference ``update_archive``).
    """
    ext = np.vstack([np.asarray(scores, dtype=float), np.asarray(child, dtype=float)[None, :]])
    worst = int(np.argmin(shared_fitness(ext, alpha)))  # first index on ties: members before child
    return None if worst == len(ext) - 1 else worst


# ---------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class M2N2Settings(BaseSettings):
    archive_size: int = 20
    batch_size: int = 4                    # children per ask()
    alpha: float = 1.0                     # competition strength
    mutation_std: float = 0.01             # relative to (upper - lower); 0 disables
    clone_mutation_std: float = 0.05       # used when both parents have the same genome
    use_attraction: bool = True            # False: B ~ fitness too (the paper's ablation)
    n_initial: int | None = None           # size of the first ask (at least len(initial_genomes));
    #                                        None = archive_size


@dataclass
class M2N2State:
    initialised: bool                     # the first (initial population) ask has been made
    archive_genomes: np.ndarray           # (k, dim)
    archive_objectives: np.ndarray        # (k, M)
    archive_responses: np.ndarray | None  # (k, items): the rows the competition is over
    response_source: str | None           # "responses" or "objectives", once told
    last_parents: np.ndarray              # (n, 2) archive rows of the pending children's parents; -1: sampled


class M2N2Optimizer(Optimizer):
    """M2N2 behind the ask/tell protocol.

    The first ask() returns ``n_initial`` genomes (``initial_genomes`` then uniform samples); every
    later ask() returns ``batch_size`` children of archive parents. tell() inserts the told rows in
    order. Per-item ``responses`` drive the competition; without them the (clipped to [0, 1])
    objective vector is used, i.e. each task is one resource.
    """

    name = "m2n2"
    Settings = M2N2Settings
    State = M2N2State
    population_setting = "archive_size"
    out_of_order = True  # each told row is one insertion into the archive (steady state, as in the paper)

    def _setup(self) -> None:
        s = self.settings
        if s.archive_size < 1 or s.batch_size < 1:
            raise ValueError("m2n2: archive_size and batch_size must be >= 1")
        if s.alpha < 0 or s.mutation_std < 0 or s.clone_mutation_std < 0:
            raise ValueError("m2n2: alpha, mutation_std and clone_mutation_std must be >= 0")
        if s.gene_blocks is None:
            self.layer_index = np.arange(self.dim)
        else:
            self.layer_index = np.asarray(s.gene_blocks, dtype=int)
            if self.layer_index.shape != (self.dim,):
                raise ValueError(
                    f"m2n2: gene_blocks must have {self.dim} entries (one per gene); got "
                    f"{self.layer_index.shape}"
                )
        self.splits = allowed_splits(self.layer_index)
        self._initial = self.initial_rows()  # seeds for the archive
        self._n_initial = s.archive_size if s.n_initial is None else int(s.n_initial)
        if self._n_initial < 1:
            raise ValueError("m2n2: n_initial must be >= 1")
        self.strategy_state = M2N2State(
            initialised=False,
            archive_genomes=np.zeros((0, self.dim)),
            archive_objectives=np.zeros((0, self.n_objectives)),
            archive_responses=None,
            response_source=None,
            last_parents=np.zeros((0, 2), dtype=int),
        )

    @property
    def archive_genomes(self) -> np.ndarray:
        return self.strategy_state.archive_genomes

    @property
    def archive_objectives(self) -> np.ndarray:
        return self.strategy_state.archive_objectives

    @property
    def archive_responses(self) -> np.ndarray | None:
        return self.strategy_state.archive_responses

    @property
    def last_parents(self) -> np.ndarray:
        return self.strategy_state.last_parents

    # -- ask
    def _ask(self) -> np.ndarray:
        st = self.strategy_state
        if not st.initialised:
            st.initialised = True
            n_rand = max(0, self._n_initial - len(self._initial))
            unit = self._rng.random((n_rand, self.dim))
            st.last_parents = np.full((len(self._initial) + n_rand, 2), -1)
            return np.vstack([self._initial, self.lower + unit * (self.upper - self.lower)])
        if len(st.archive_genomes) == 0:  # every evaluation so far failed: keep sampling
            n = self.settings.batch_size
            st.last_parents = np.full((n, 2), -1)
            return self.lower + self._rng.random((n, self.dim)) * (self.upper - self.lower)
        children, parents = [], []
        for _ in range(self.settings.batch_size):
            child, a, b = self._make_child()
            children.append(child)
            parents.append((a, b))
        st.last_parents = np.asarray(parents, dtype=int)
        return np.stack(children)

    def _make_child(self) -> tuple[np.ndarray, int, int]:
        s, st = self.settings, self.strategy_state
        S = st.archive_responses  # (k, items)
        k = len(S)
        a = int(self._rng.choice(k, p=parent_a_probabilities(S, s.alpha)))
        if s.use_attraction:
            p_b = parent_b_probabilities(S, a, s.alpha)
        else:
            p_b = parent_a_probabilities(S, s.alpha)
        b = int(self._rng.choice(k, p=p_b))
        A, B = st.archive_genomes[a], st.archive_genomes[b]
        split = self._rng.choice(self.splits)
        ratio = self._rng.random()
        child = crossover(A, B, split, ratio, self.layer_index)
        std = s.clone_mutation_std if np.array_equal(A, B) else s.mutation_std
        if std > 0:
            child = child + self._rng.normal(0.0, 1.0, self.dim) * std * (self.upper - self.lower)
        return np.clip(child, self.lower, self.upper), a, b

    # -- tell
    def _check_tell(self, objectives, responses, failed) -> None:
        source, told = "objectives" if responses is None else "responses", self.strategy_state.response_source
        if told is not None and source != told:
            raise ValueError(
                f"m2n2: this run was told {told} so far; pass responses "
                + ("every time" if told == "responses" else "never")
                + " so the competition is over the same items"
            )

    def _tell(self, genomes, objectives, responses, failed) -> None:
        self.strategy_state.response_source = "objectives" if responses is None else "responses"
        rows = np.clip(objectives, 0.0, 1.0) if responses is None else np.nan_to_num(responses, nan=0.0)
        for i in np.flatnonzero(~failed):
            self._insert(genomes[i], objectives[i], rows[i])

    def _insert(self, genome: np.ndarray, objectives: np.ndarray, row: np.ndarray) -> None:
        st = self.strategy_state
        if st.archive_responses is None:
            st.archive_responses = np.zeros((0, len(row)))
        if len(st.archive_genomes) < self.settings.archive_size:
            st.archive_genomes = np.vstack([st.archive_genomes, genome])
            st.archive_objectives = np.vstack([st.archive_objectives, objectives])
            st.archive_responses = np.vstack([st.archive_responses, row])
            return
        i = replacement_index(st.archive_responses, row, self.settings.alpha)
        if i is not None:
            st.archive_genomes[i] = genome
            st.archive_objectives[i] = objectives
            st.archive_responses[i] = row
