"""Sparsifiers: which entries of one expert's task vector (delta) survive a merge.

Follows mergekit 0.1.5 `mergekit/sparsify.py`:

* `magnitude`          keep the top-k |delta|, k = max(1, int(density * numel))  (TIES, arXiv:2306.01708)
* `bernoulli`          keep each entry with probability `density`                 (DARE, arXiv:2311.03099)
* `magnitude_outliers` drop the largest `gamma` fraction and the smallest entries,
                       keeping int(density * numel)                                (Breadcrumbs, arXiv:2312.06795)
* `della_magprune`     keep with a probability that rises with the entry's magnitude
                       rank in its row, from density - epsilon to density + epsilon (DELLA, arXiv:2406.11617)

each with optional L1 rescaling (`rescale_l1`, mergekit's `rescaled_masked_tensor` with
`RescaleNorm.l1`: the kept entries are scaled so the L1 norm of the delta is unchanged). The norms
sum the finite entries only (`finite_l1`): a NaN or inf delta (models opened with allow_nonfinite)
stays non-finite at its own position instead of turning the whole tensor into NaN.

Each sparsifier is a `*_mask` function (a bool tensor of the input's shape) plus the shared
mask-and-rescale step, so masks can be tested and reused alone. Where we differ from mergekit:

* Selection never sorts the whole tensor: `torch.kthvalue` (quickselect) finds the threshold
  magnitude, then one comparison builds the mask. Ties at a threshold are broken by flat index
  in ascending-magnitude order (mergekit's `argsort` is unstable, so its tie order is unspecified).
* Random masks draw from an explicit `torch.Generator` (never the global RNG), as
  `torch.rand(shape) < p` in float32, so the same generator gives the same mask for
  float32 and float64 inputs.
* Tiny tensors, switched by keyword (see `evomerge.merge.kernels.KernelOptions`):
  `magnitude_outliers(..., keep_at_least_one=True)` keeps one entry when int(density * numel)
  rounds to 0, where mergekit zeroes the whole tensor; `della_magprune(..., mergekit_errors=False)`
  gives a row of one entry (and a 0-d tensor) keep probability `density` and shrinks epsilon to
  min(epsilon, density, 1 - density), where mergekit fails (NaN probabilities, IndexError,
  or ValueError).
* Order statistics live here, for every caller: `rank_window` gives the exact top-k / Breadcrumbs
  window (two thresholds, and a cut index where a threshold's tie run straddles the window's edge)
  from `RankBound`s, found either from `MagnitudeOrderStats` (sorted once per expert, reused by
  every candidate of a search: the grid brackets each rank; one counting pass finds the blocks
  holding entries inside the bracket and a selection over those finds the rank) or from
  `magnitude_rank_bounds` (a sampled bracket, for one-off merges). Both are exact: the sample or
  grid only decides how fast. A tie run's cut comes from the bracket's members, or else from a scan
  that stops at it; never from a full `nonzero`.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps: below it, no rescaling
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the dtype every kernel computes in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_fraction(value: float, parameter: str, tensor_name: str = "") -> float:
    """Return `value` as a float, or raise ValueError naming the parameter unless 0 <= value <= 1."""
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        where = f" (tensor {tensor_name!r})" if tensor_name else ""
        raise ValueError(f"{parameter} must be in [0, 1]; got {value}{where}")
    return value


# ----------------------------------------------------------------------------- rescaling

def rescale_l1(tensor: torch.Tensor, mask: torch.Tensor, eps: float = RESCALE_EPS) -> torch.Tensor:
    """`tensor * mask` scaled so its L1 norm equals `tensor`'s (mergekit `rescaled_masked_tensor`, l1).

    When either L1 norm is below `eps` the masked tensor is returned unscaled, as in mergekit.
    """
    masked = tensor * mask
    before = finite_l1(tensor)
    after = finite_l1(masked)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def finite_l1(tensor: torch.Tensor) -> torch.Tensor:
    """L1 norm over the finite entries (NaN and inf count 0); the plain L1 norm for finite tensors."""
    return tensor.abs().nan_to_num_(nan=0.0, posinf=0.0).sum()


def apply_mask(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Zero the entries outside `mask` (optionally L1-rescaling), computed in float32/64, returned in tensor's dtype."""
    work = tensor.to(work_dtype(tensor))
    out = rescale_l1(work, mask) if rescale else work * mask
    return out.to(tensor.dtype)


# ----------------------------------------------------------------------------- order statistics

def _rank_window_mask(magnitudes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat bool mask of the entries whose ascending rank lies in [start, stop), by selection.

    Rank order is (magnitude, flat index), so ties at either end are resolved by index;
    `torch.kthvalue` selects the two threshold values, with no full sort.
    """
    n = magnitudes.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if start >= stop:
        return keep
    keep.fill_(True)
    if start > 0:
        lo = torch.kthvalue(magnitudes, start + 1).values
        below = magnitudes < lo
        keep &= ~below
        ties = torch.nonzero(magnitudes == lo).squeeze(1)  # ascending flat index
        n_ties_below_window = max(0, start - int(below.sum()))
        keep[ties[:n_ties_below_window]] = False
    if stop < n:
        hi = torch.kthvalue(magnitudes, stop).values
        keep &= ~(magnitudes > hi)
        ties = torch.nonzero(magnitudes == hi).squeeze(1)
        n_ties_in_window = max(0, stop - int((magnitudes < hi).sum()))
        keep[ties[n_ties_in_window:]] = False
    return keep


@dataclass(frozen=True, eq=False)
class MagnitudeOrderStats:
    """Sorted |delta| of one expert's delta for one tensor, computed once, reused for every density.

    `values` holds ascending |delta| at the ascending ranks `ranks`; `ranks is None` means `values`
    is the full sorted vector. Grid stats (tensors larger than `grid`) keep `grid` evenly spaced
    ranks (at most one per GRID_SPACING entries) plus, for each, how many entries lie below its value (`below`) and at or below it
    (`not_above`). Either way `rank_bounds` is exact: between two grid ranks the value at any rank
    is bracketed, so only the entries inside the bracket (about numel / grid) are selected over.
    Build it from the delta the kernel will sparsify, i.e. `task_vectors(base, experts)[i]`
    (float32, or float64 for float64 inputs); `values` keeps that dtype.
    """

    numel: int
    values: torch.Tensor
    ranks: torch.Tensor | None = None
    below: torch.Tensor | None = None
    not_above: torch.Tensor | None = None

    @classmethod
    def from_delta(cls, delta: torch.Tensor, grid: int | None = 65536) -> "MagnitudeOrderStats":
        """Sort |delta| once; keep all of it if numel <= grid (or grid is None), else evenly spaced ranks:
        `grid` of them, or one per GRID_SPACING entries when that is fewer (a bracket then holds about
        GRID_SPACING entries, which a selection handles as fast as fewer), 12 bytes each."""
        sorted_magnitudes = _sort_magnitudes(_magnitudes(delta))
        n = sorted_magnitudes.numel()
        if grid is None or n <= grid:
            return cls(numel=n, values=sorted_magnitudes)
        if grid < 2:
            raise ValueError(f"grid must be >= 2 (or None for full stats); got {grid}")
        points = min(grid, max(2, n // GRID_SPACING))
        # Spacing (n - 1) / (points - 1) > 1, so rounded ranks are strictly increasing, from 0 to n - 1.
        ranks = torch.linspace(0, n - 1, points, dtype=torch.float64).round().long().to(delta.device)
        values = sorted_magnitudes[ranks].clone()
        below = torch.searchsorted(sorted_magnitudes, values, right=False)
        not_above = torch.searchsorted(sorted_magnitudes, values, right=True)
        index = torch.int32 if n < 2**31 else torch.int64
        return cls(numel=n, values=values, ranks=ranks.to("cpu", index), below=below.to("cpu", index),
                   not_above=not_above.to("cpu", index))

    @property
    def is_exact(self) -> bool:
        """True when `values` is the whole sorted vector (no selection is ever needed)."""
        return self.ranks is None

    def check_matches(self, tensor: torch.Tensor) -> None:
        if tensor.numel() != self.numel:
            raise ValueError(
                f"order stats were built for {self.numel} elements but the tensor has {tensor.numel()}"
            )

    def bracket(self, rank: int) -> "RankBound | tuple[float, float, int]":
        """The bound at `rank` when these stats pin it down, else its bracket (a, b, entries below a).

        Full stats, and grid stats whose two neighbouring grid ranks share one value (the rank lies in a
        tie run), give the `RankBound` itself (without its tied indices); otherwise the value at `rank`
        lies in [a, b], the values of the neighbouring grid ranks, and `below[low]` entries lie below a.
        """
        if not 0 <= rank < self.numel:
            raise ValueError(f"rank must be in [0, {self.numel}); got {rank}")
        if self.ranks is None:
            return self._full_bound(rank)
        high = int(torch.searchsorted(self.ranks, rank))  # first grid rank >= rank
        low = high if int(self.ranks[high]) == rank else high - 1
        a, b = float(self.values[low]), float(self.values[high])
        if a == b:  # the rank lies in one tie run: its value and counts are stored
            return RankBound(rank, a, int(self.below[low]), int(self.not_above[low] - self.below[low]))
        return a, b, int(self.below[low])

    def rank_bounds(self, tensor: torch.Tensor, ranks: list[int] | tuple[int, ...]) -> list["RankBound"]:
        """Exact `RankBound`s of |tensor| (the delta these stats were built from) at the given ranks.

        Full stats look them up. Grid stats bracket each rank between its neighbouring grid ranks;
        one pass collects the entries inside the bracket (about numel / grid, with their indices), and
        `torch.kthvalue` over those gives the value (the same value and counts as a selection over the
        whole tensor). `select_in_bracket` with precomputed block counts does the same without the pass.
        """
        self.check_matches(tensor)
        flat = tensor.detach().reshape(-1)
        bounds = []
        for rank in ranks:
            found = self.bracket(rank)
            bounds.append(found if isinstance(found, RankBound) else select_in_bracket(flat, rank, *found))
        return bounds

    def _full_bound(self, rank: int) -> "RankBound":
        value = self.values[rank]
        below = int(torch.searchsorted(self.values, value, right=False))
        not_above = int(torch.searchsorted(self.values, value, right=True))
        if bool(torch.isnan(value)):  # searchsorted cannot place NaN: count as the selection does
            return _exact_rank_bound(self.values, rank)
        return RankBound(rank, float(value), below, not_above - below)


def magnitude_keep_count(numel: int, density: float) -> int:
    """mergekit's top-k size: 0 if density <= 0, all if density >= 1, else max(1, int(density * numel))."""
    if density <= 0 or numel == 0:
        return 0
    if density >= 1:
        return numel
    return max(1, int(density * numel))


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().abs().reshape(-1).to(work_dtype(tensor))


# ----------------------------------------------------------------------------- magnitude (TIES)

def magnitude_mask(
    tensor: torch.Tensor, density: float, *, stats: MagnitudeOrderStats | None = None
) -> torch.Tensor:
    """Bool mask of the top-k entries by |x|, k = `magnitude_keep_count(numel, density)`."""
    density = check_fraction(density, "density")
    n = tensor.numel()
    k = magnitude_keep_count(n, density)
    if k in (0, n):
        return torch.full(tensor.shape, k == n, dtype=torch.bool, device=tensor.device)
    if stats is not None:
        return rank_window(tensor, n - k, n, bounds=(stats.rank_bounds(tensor, [n - k])[0], None)).mask(tensor)
    return _rank_window_mask(_magnitudes(tensor), n - k, n).reshape(tensor.shape)


def magnitude(
    tensor: torch.Tensor, density: float, *, rescale: bool = False, stats: MagnitudeOrderStats | None = None
) -> torch.Tensor:
    """Keep the top-k |x| (mergekit `sparsify.magnitude`); density >= 1 returns `tensor` itself."""
    if check_fraction(density, "density") >= 1:
        return tensor
    return apply_mask(tensor, magnitude_mask(tensor, density, stats=stats), rescale)


# ----------------------------------------------------------------------------- magnitude_outliers (Breadcrumbs)

def outlier_window(numel: int, density: float, gamma: float, keep_at_least_one: bool = True) -> tuple[int, int]:
    """Ascending-rank window [start, stop) that `magnitude_outliers` keeps (mergekit's arithmetic).

    target = int(density * numel) entries are kept; n_top = int(gamma * numel) outliers are dropped
    from the top, reduced when needed so the target fits (start = max(0, numel - target - n_top)).
    mergekit keeps nothing when density * numel < 1; `keep_at_least_one` raises target to 1 then.
    (gamma * numel < 1 just means no outlier is dropped, in both.)
    """
    target = int(density * numel)
    if keep_at_least_one and density > 0 and numel > 0:
        target = max(1, target)
    n_top = int(gamma * numel)
    start = max(0, numel - target - n_top)
    return start, start + target


def magnitude_outliers_mask(
    tensor: torch.Tensor,
    density: float,
    gamma: float = 0.01,
    *,
    keep_at_least_one: bool = True,
    stats: MagnitudeOrderStats | None = None,
) -> torch.Tensor:
    """Bool mask of the entries kept by Breadcrumbs (see `outlier_window`); density >= 1 keeps all."""
    density = check_fraction(density, "density")
    gamma = check_fraction(gamma, "gamma")
    n = tensor.numel()
    if density >= 1:
        return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
    start, stop = outlier_window(n, density, gamma, keep_at_least_one)
    if start >= stop:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    if stats is not None:
        return rank_window(tensor, start, stop, stats=stats).mask(tensor)
    return _rank_window_mask(_magnitudes(tensor), start, stop).reshape(tensor.shape)


def magnitude_outliers(
    tensor: torch.Tensor,
    density: float,
    gamma: float = 0.01,
    *,
    rescale: bool = False,
    keep_at_least_one: bool = True,
    stats: MagnitudeOrderStats | None = None,
) -> torch.Tensor:
    """Breadcrumbs (mergekit `sparsify.magnitude_outliers`); density >= 1 returns `tensor` itself."""
    if check_fraction(density, "density") >= 1:
        return tensor
    mask = magnitude_outliers_mask(tensor, density, gamma, keep_at_least_one=keep_at_least_one, stats=stats)
    return apply_mask(tensor, mask, rescale)


# ----------------------------------------------------------------------------- exact rank windows (no full selection)

@dataclass(frozen=True)
class RankBound:
    """The entry at one ascending rank of |x| (rank order: magnitude, then flat index).

    `value` is its magnitude; `below` and `equal` count the entries whose magnitude is smaller than,
    or equal to, `value` (so the tie run at `value` holds ranks below .. below + equal - 1).
    """

    rank: int
    value: float
    below: int
    equal: int
    # Flat indices (ascending) of the entries equal to `value`, when the search that found the bound saw
    # them all (a bracket scan); None otherwise (`tie_cut` then scans for the ones it needs).
    tied: torch.Tensor | None = field(default=None, compare=False, repr=False)


def _sort_magnitudes(magnitudes: torch.Tensor) -> torch.Tensor:
    """Ascending sort of non-negative values; float32 ones as int32 bit patterns (same order, radix sort)."""
    if magnitudes.dtype == torch.float32:
        return torch.sort(magnitudes.view(torch.int32)).values.view(torch.float32)
    return torch.sort(magnitudes).values


def _exact_rank_bound(magnitudes: torch.Tensor, rank: int) -> RankBound:
    value = torch.kthvalue(magnitudes, rank + 1).values
    below = int((magnitudes < value).sum())
    equal = int((magnitudes == value).sum())
    return RankBound(rank, float(value), below, equal)


RANK_BLOCK = 64  # entries per block of a bracket scan: blocks holding a bracket member are gathered whole
GRID_SPACING = 256  # grid stats keep at most one rank per this many entries (a bracket: ~this many members)
SCAN_CHUNK = 1 << 16  # entries per step of an eager scan (a multiple of RANK_BLOCK), cache-sized


def block_counts(flat: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """(numel // RANK_BLOCK,) how many entries of each whole block of |flat| lie in [a, b].

    The reference form of what `fused.FusedOps.block_counts` computes in one compiled pass, for
    `bracket_members` to gather only the blocks that hold members.
    """
    whole = flat.numel() - flat.numel() % RANK_BLOCK
    magnitudes = _magnitudes(flat[:whole])
    return ((magnitudes >= a) & (magnitudes <= b)).float().view(-1, RANK_BLOCK).sum(1)


def _scan_bracket(flat: torch.Tensor, a: float, b: float, *,
                  count_below: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One eager chunked pass over |flat|: (entries below a if asked, else 0; the magnitudes inside
    [a, b]; their flat indices, ascending)."""
    dtype = work_dtype(flat)
    n = flat.numel()
    size = min(SCAN_CHUNK, n)
    magnitude, upper = (torch.empty(size, dtype=dtype, device=flat.device) for _ in range(2))
    inside = torch.empty(size, dtype=torch.float32, device=flat.device)
    below, values, indices = 0.0, [], []
    for start in range(0, n, SCAN_CHUNK):
        c = min(SCAN_CHUNK, n - start)
        m = torch.abs(flat[start:start + c].to(dtype), out=magnitude[:c])
        # Comparisons into float outputs: torch vectorizes those, not comparisons into bool.
        if count_below:
            below += float(torch.lt(m, a, out=inside[:c]).sum())
        hits = torch.nonzero(torch.ge(m, a, out=inside[:c]).mul_(torch.le(m, b, out=upper[:c]))).squeeze(1)
        if hits.numel():
            values.append(m[hits])
            indices.append(hits + start)
    if not values:
        return int(below), torch.zeros(0, dtype=dtype, device=flat.device), torch.zeros(0, dtype=torch.long,
                                                                                       device=flat.device)
    return int(below), torch.cat(values), torch.cat(indices)


def bracket_members(flat: torch.Tensor, a: float, b: float,
                    counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitudes of |flat| inside [a, b] and their flat indices (ascending), in the work dtype.

    With `counts` (`block_counts(flat, a, b)` or its compiled form) only the blocks they mark are
    read again, plus the tail after the last whole block; without, one eager scan.
    """
    if counts is None:
        return _scan_bracket(flat, a, b, count_below=False)[1:]
    dtype = work_dtype(flat)
    whole = counts.numel() * RANK_BLOCK
    blocks = torch.nonzero(counts).squeeze(1)  # (H,) ascending
    gathered = flat[:whole].view(-1, RANK_BLOCK)[blocks].abs().to(dtype)  # (H, RANK_BLOCK)
    hits = torch.nonzero((gathered >= a) & (gathered <= b))  # (M, 2), row-major: ascending flat index
    tail = flat[whole:].abs().to(dtype)
    tail_hits = torch.nonzero((tail >= a) & (tail <= b)).squeeze(1)
    values = torch.cat([gathered[hits[:, 0], hits[:, 1]], tail[tail_hits]])
    indices = torch.cat([blocks[hits[:, 0]] * RANK_BLOCK + hits[:, 1], tail_hits + whole])
    return values, indices


def select_in_bracket(flat: torch.Tensor, rank: int, a: float, b: float, below: int,
                      counts: torch.Tensor | None = None) -> RankBound:
    """The exact `RankBound` at `rank` of |flat|, known to lie in [a, b] with `below` entries under a.

    A selection over the bracket's members only; its tied indices come with it. If the rank is not in
    the bracket after all (NaN magnitudes order outside any bracket), a selection over everything.
    """
    return _select(flat, rank, below, *bracket_members(flat, a, b, counts))


def _select(flat: torch.Tensor, rank: int, below: int, values: torch.Tensor, indices: torch.Tensor) -> RankBound:
    """`select_in_bracket` given the bracket's members (values, indices) and the count below it."""
    if below <= rank < below + values.numel():
        value = torch.kthvalue(values, rank - below + 1).values
        tied = values == value
        return RankBound(rank, float(value), below + int((values < value).sum()), int(tied.sum()), indices[tied])
    return _exact_rank_bound(_magnitudes(flat), rank)


def tie_cut(flat: torch.Tensor, value: float, m: int) -> int:
    """Flat index of the m-th (0-based) entry of |flat| equal to `value`: m tied entries lie before it.

    One eager scan that stops at the chunk holding it (ascending index order).
    """
    dtype = work_dtype(flat)
    n = flat.numel()
    size = min(SCAN_CHUNK, n)
    magnitude = torch.empty(size, dtype=dtype, device=flat.device)
    equal = torch.empty(size, dtype=torch.float32, device=flat.device)
    seen = 0
    for start in range(0, n, SCAN_CHUNK):
        c = min(SCAN_CHUNK, n - start)
        m_chunk = torch.abs(flat[start:start + c].to(dtype), out=magnitude[:c])
        here = int(torch.eq(m_chunk, value, out=equal[:c]).sum())
        if seen + here > m:
            return start + int(torch.nonzero(equal[:c]).squeeze(1)[m - seen])
        seen += here
    raise ValueError(f"|tensor| holds {seen} entries equal to {value}, not more than {m}")


def magnitude_rank_bounds(
    tensor: torch.Tensor,
    ranks: list[int] | tuple[int, ...],
    *,
    sample_size: int = 1 << 16,
    z: float = 5.0,
) -> list[RankBound]:
    """Exact `RankBound`s of |tensor| at the given ascending ranks, with no selection over the whole tensor.

    A sorted random sample (fixed seed) brackets each rank's value between two sample quantiles
    z standard errors apart; one chunked pass per rank counts the entries below its bracket and
    collects those inside it (about 2 * z / sqrt(sample_size) of the tensor, with their indices),
    and `torch.kthvalue` on that small subset gives the exact value. A bracket that misses
    (probability ~1e-6 at z = 5, or NaNs) falls back to `torch.kthvalue` over the whole tensor, so
    the answer is always exact. The sample only decides how fast, never what is returned.
    """
    flat = tensor.detach().reshape(-1)
    dtype = work_dtype(tensor)
    n = flat.numel()
    for rank in ranks:
        if not 0 <= rank < n:
            raise ValueError(f"rank must be in [0, {n}); got {rank}")
    if not ranks:
        return []
    if n <= 4 * sample_size:
        magnitudes = flat.abs().to(dtype)
        return [_exact_rank_bound(magnitudes, rank) for rank in ranks]

    # About n / 64 sample entries (at least 1024, at most sample_size): the sort stays cheap next to the pass.
    samples = min(sample_size, max(1024, n // 64))
    generator = torch.Generator(device=flat.device)
    generator.manual_seed(0)
    positions = torch.randint(n, (samples,), generator=generator, device=flat.device)
    sample = _sort_magnitudes(flat[positions].abs().to(dtype))  # (S,)
    bounds = []
    for rank in ranks:
        q = (rank + 0.5) / n
        half_width = z * math.sqrt(samples * q * (1 - q)) + 2
        low = math.floor(q * samples - half_width)
        high = math.ceil(q * samples + half_width)
        a = float(sample[low]) if low >= 0 else -math.inf
        b = float(sample[high]) if high < samples else math.inf
        below, values, indices = _scan_bracket(flat, a, b, count_below=True)
        bounds.append(_select(flat, rank, below, values, indices))  # a full selection on a miss
    return bounds


def _next_up(value: float) -> float:
    """The smallest float32 above `value` (so |x| >= it means |x| > value); NaN (keeps nothing) above inf."""
    v = np.float32(value)
    return math.nan if math.isnan(value) or v == np.inf else float(np.nextafter(v, np.float32(np.inf)))


def _next_down(value: float) -> float:
    """The largest float32 below `value` (so |x| <= it means |x| < value)."""
    return math.nan if math.isnan(value) else float(np.nextafter(np.float32(value), np.float32(-np.inf)))


@dataclass(frozen=True)
class RankWindow:
    """The entries of ascending rank in [start, stop) of |x| (rank order: magnitude, then flat index).

    Entry i is kept iff lo < |x_i| < hi, or |x_i| == lo and i >= lo_cut, or |x_i| == hi and i < hi_cut:
    of the entries tied at a threshold, the window holds one run of consecutive flat indices, so two
    cut indices say which. lo_cut = 0 and hi_cut = numel when nothing tied lies outside the window.
    """

    lo: float
    hi: float
    lo_cut: int
    hi_cut: int

    def cuts(self, numel: int) -> list[int]:
        """The flat indices where the window's thresholds change (at most two)."""
        return [c for c in (self.lo_cut, self.hi_cut) if 0 < c < numel]

    def thresholds(self, start: int, stop: int) -> tuple[float, float]:
        """(lo, hi) with lo <= |x| <= hi keeping exactly the window's entries among flat indices
        [start, stop), a range that no cut splits (float32 thresholds, as the fused pass compares)."""
        lo = self.lo if start >= self.lo_cut else _next_up(self.lo)
        hi = self.hi if stop <= self.hi_cut else _next_down(self.hi)
        return lo, hi

    def mask(self, tensor: torch.Tensor) -> torch.Tensor:
        """Bool mask of the window, in tensor's shape (equal to `_rank_window_mask` of the same window)."""
        magnitudes = _magnitudes(tensor)
        index = torch.arange(magnitudes.numel(), device=magnitudes.device)
        keep = (magnitudes > self.lo) | ((magnitudes == self.lo) & (index >= self.lo_cut))
        keep &= (magnitudes < self.hi) | ((magnitudes == self.hi) & (index < self.hi_cut))
        return keep.reshape(tensor.shape)


def window_from_bounds(tensor: torch.Tensor, start: int, stop: int, low_bound: RankBound | None,
                       high_bound: RankBound | None) -> RankWindow:
    """The `RankWindow` [start, stop) of |tensor| from the bounds at ranks start (if > 0) and stop - 1
    (if < numel): thresholds plus, where a threshold ties across the window's edge, its cut index
    (from the bound's tied indices, else one scan that stops at the cut)."""
    n = tensor.numel()
    if start >= stop:
        return RankWindow(math.inf, -math.inf, 0, n)
    flat = tensor.detach().reshape(-1)

    def cut(bound: RankBound, m: int) -> int:  # flat index of the m-th entry tied at the bound's value
        return int(bound.tied[m]) if bound.tied is not None else tie_cut(flat, bound.value, m)

    lo, hi, lo_cut, hi_cut = -math.inf, math.inf, 0, n
    if start > 0:
        lo = low_bound.value
        below_window = start - low_bound.below  # tied entries ranked below the window
        if below_window > 0 and not math.isnan(lo):
            lo_cut = cut(low_bound, below_window)
    if stop < n:
        hi = high_bound.value
        in_window = stop - high_bound.below  # tied entries ranked inside the window
        if in_window < high_bound.equal and not math.isnan(hi):
            hi_cut = cut(high_bound, in_window)
    return RankWindow(lo, hi, lo_cut, hi_cut)


def window_ranks(numel: int, start: int, stop: int) -> list[int]:
    """The ranks whose bounds a window [start, stop) needs: start if > 0, stop - 1 if < numel."""
    if start >= stop:
        return []
    return ([start] if start > 0 else []) + ([stop - 1] if stop < numel else [])


def rank_window(
    tensor: torch.Tensor,
    start: int,
    stop: int,
    *,
    bounds: tuple[RankBound | None, RankBound | None] | None = None,
    stats: MagnitudeOrderStats | None = None,
    **bound_options,
) -> RankWindow:
    """Thresholds and tie cuts of the ascending-rank window [start, stop) of |tensor|.

    Same entries as the selection path (`magnitude_mask`: start = numel - k, stop = numel;
    `magnitude_outliers_mask`: `outlier_window`), ties broken by flat index, but found with
    the given bounds at ranks start and stop - 1, or `stats.rank_bounds`, or else
    `magnitude_rank_bounds`: a compare, and a cut index only when a threshold ties across the edge.
    """
    n = tensor.numel()
    ranks = window_ranks(n, start, stop)
    if bounds is None:
        found = iter(stats.rank_bounds(tensor, ranks) if stats is not None
                     else magnitude_rank_bounds(tensor, ranks, **bound_options))
        bounds = (next(found) if start > 0 and ranks else None, next(found) if stop < n and ranks else None)
    return window_from_bounds(tensor, start, stop, *bounds)


# ----------------------------------------------------------------------------- random (DARE)

def bernoulli_mask(
    shape: torch.Size | tuple[int, ...], density: float, *, generator: torch.Generator
) -> torch.Tensor:
    """Keep each entry independently with probability `density`, drawing from `generator` only."""
    density = check_fraction(density, "density")
    draws = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return draws < density


def bernoulli(
    tensor: torch.Tensor, density: float, *, generator: torch.Generator, rescale: bool = False
) -> torch.Tensor:
    """DARE drop (mergekit `sparsify.bernoulli`); density >= 1 returns `tensor` itself, drawing nothing."""
    if check_fraction(density, "density") >= 1:
        return tensor
    return apply_mask(tensor, bernoulli_mask(tensor.shape, density, generator=generator), rescale)


# ----------------------------------------------------------------------------- della_magprune (DELLA)

def della_keep_probabilities(
    tensor: torch.Tensor, density: float, epsilon: float, *, mergekit_errors: bool = False
) -> torch.Tensor:
    """Per-entry keep probability: density - epsilon + 2 * epsilon * rank / (row_length - 1).

    As in mergekit, rows run along dim 1 (tensors with fewer than 2 dims are one row) and the rank
    is the ascending |x| rank within the row (ties by index). Our rule where mergekit fails: a row
    of one entry (or a 0-d tensor) gets probability `density`, and epsilon is shrunk to
    min(epsilon, density, 1 - density) so probabilities stay in [0, 1] and still average `density`.
    `mergekit_errors=True` raises ValueError in those cases instead.
    """
    density = check_fraction(density, "density")
    epsilon = check_fraction(epsilon, "epsilon")
    dtype = work_dtype(tensor)
    if mergekit_errors and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(
            f"della: density +/- epsilon must lie in (0, 1) (mergekit's rule); got density={density}, epsilon={epsilon}"
        )
    epsilon = min(epsilon, density, 1 - density)
    rows = tensor.detach().abs().to(dtype)
    rows = rows.reshape(1, -1) if rows.dim() < 2 else rows
    row_length = rows.shape[1]
    if tensor.numel() == 0:
        return torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    if row_length == 1:
        if mergekit_errors:
            raise ValueError(
                "della: rows of one element have no magnitude ranking (mergekit 0.1.5 fails here); "
                f"shape {tuple(tensor.shape)}"
            )
        return torch.full(tensor.shape, density, dtype=dtype, device=tensor.device)
    order = torch.argsort(rows, dim=1, stable=True)
    position_shape = [1] * rows.dim()
    position_shape[1] = row_length
    positions = torch.arange(row_length, device=rows.device).reshape(position_shape).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)  # rank of each entry within its row
    rank_fraction = ranks.to(dtype) / (row_length - 1)  # 0 = smallest |x|, 1 = largest
    probabilities = (density - epsilon) + rank_fraction * (2 * epsilon)
    return probabilities.reshape(tensor.shape)


def della_mask(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    generator: torch.Generator,
    mergekit_errors: bool = False,
) -> torch.Tensor:
    """Draw the DELLA keep mask from `della_keep_probabilities`, using `generator` only."""
    probabilities = della_keep_probabilities(tensor, density, epsilon, mergekit_errors=mergekit_errors)
    draws = torch.rand(tuple(tensor.shape), generator=generator, device=generator.device, dtype=torch.float32)
    return draws < probabilities


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    generator: torch.Generator,
    rescale: bool = False,
    mergekit_errors: bool = False,
) -> torch.Tensor:
    """DELLA magnitude-ranked drop (mergekit `sparsify.della_magprune`).

    density >= 1 returns `tensor` itself and density <= 0 zeros, before any other check (as mergekit).
    """
    density = check_fraction(density, "density")
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    mask = della_mask(tensor, density, epsilon, generator=generator, mergekit_errors=mergekit_errors)
    return apply_mask(tensor, mask, rescale)


def sparsify(
    tensor: torch.Tensor,
    method: str,
    density: float,
    *,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    stats: MagnitudeOrderStats | None = None,
    keep_at_least_one: bool = True,
    mergekit_errors: bool = False,
) -> torch.Tensor:
    """Dispatch to one sparsifier by mergekit's `SparsificationMethod` name (see `SPARSIFIERS`)."""
    if method == "magnitude":
        return magnitude(tensor, density, rescale=rescale, stats=stats)
    if method == "magnitude_outliers":
        return magnitude_outliers(
            tensor, density, gamma, rescale=rescale, keep_at_least_one=keep_at_least_one, stats=stats
        )
    if method in ("random", "della_magprune"):
        if generator is None:
            raise ValueError(f"sparsifier {method!r} draws a random mask and needs an explicit generator")
        if stats is not None:
            raise ValueError(f"sparsifier {method!r} does not use magnitude order stats")
        if method == "random":
            return bernoulli(tensor, density, generator=generator, rescale=rescale)
        return della_magprune(
            tensor, density, epsilon, generator=generator, rescale=rescale, mergekit_errors=mergekit_errors
        )
    raise ValueError(f"unknown sparsifier {method!r}; valid: {', '.join(sorted(SPARSIFIERS))}")
