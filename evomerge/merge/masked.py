"""The one planner of masked task-arithmetic merges, run by both executors.

A method whose row has `fused=True` (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties) merges one tensor as: masks (exact rank windows for magnitude sparsifiers,
`mask_generator` draws for DARE), optional L1 rescale factors, then fused passes
(`fused.FusedOps.masked`). A rank window is two thresholds plus, where a threshold value ties across
the window's edge, a cut index (of the tied entries, those on one side of it are kept); the tensor is
split at the cuts into at most 2K + 1 ranges, each merged with plain thresholds (`RankWindow.thresholds`),
so no entry is patched afterwards. `merge_masked` validates the coefficients, plans the masks and runs
the passes; its two callers differ only in where the inputs come from:

* the in-memory materializer (search candidates): task vectors stored once, `MagnitudeOrderStats`
  per expert (a grid sorted once: a candidate's thresholds cost one compiled counting pass over the
  pruned experts and a selection over the few entries between two grid values), recent windows kept
  per tensor (`window_cache`), cached uniform draws and L1 norms;
* the streaming disk engine (`evomerge merge`, `export`): task vectors read per tensor, thresholds
  from a sampled bracket (`sparsify.magnitude_rank_bounds`), draws made per tensor.

Both give the windows, masks and operation order of the pure kernel (`kernels.merge_task_vectors`),
so a scored candidate and its exported recipe hold the same tensors bit for bit (on CPU; see
`fused` for the compiled and eager forms).
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from evomerge.merge.fused import FusedOps, MaskedMerge, keep_mask, masked_l1_block, rescale_factors, \
    weight_sum_divisor
from evomerge.merge.kernels import mask_generator
from evomerge.merge.methods import GAMMA, MergeMethod
from evomerge.merge.sparsify import (
    RESCALE_EPS,
    MagnitudeOrderStats,
    RankBound,
    RankWindow,
    check_fraction,
    magnitude_keep_count,
    outlier_window,
    rank_window,
    select_in_bracket,
    window_from_bounds,
    window_ranks,
)

__all__ = ["MaskedCoefficients", "WindowCache", "l1_norms", "merge_masked"]

DRAW_CHUNK = 1 << 16  # uniforms drawn per call: the same stream as one torch.rand(n), in cache-sized pieces
L1_CHUNK = 1 << 18  # entries per float32 partial sum of the L1 rescale norms, in both executors
ALIGN = 16  # compiled passes start on 64-byte boundaries (a misaligned input costs Inductor a copy on GPU)


class WindowCache(OrderedDict):
    """The last `capacity` rank windows of one tensor, by (expert, start, stop): a search whose density
    genes repeat (crossover copies them) skips the threshold search for them."""

    def __init__(self, capacity: int = 64):
        super().__init__()
        self.capacity = capacity

    def get_window(self, key: tuple[int, int, int]) -> RankWindow | None:
        window = self.get(key)
        if window is not None:
            self.move_to_end(key)
        return window

    def put(self, key: tuple[int, int, int], window: RankWindow) -> None:
        self[key] = window
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


@dataclass(frozen=True)
class MaskedCoefficients:
    """One tensor's coefficients: per-expert lists (density / gamma None: the row's default) and settings."""

    weight: Sequence[float]
    density: Sequence[float] | None
    gamma: Sequence[float] | None
    normalize: bool
    rescale: bool
    lambda_: float


Segment = tuple[int, int, MaskedMerge]  # flat range [start, stop) and the constants that merge it


def merge_masked(
    ops: FusedOps,
    row: MergeMethod,
    base: torch.Tensor,
    tvs: torch.Tensor,
    coefficients: MaskedCoefficients,
    out: torch.Tensor,
    *,
    seed: int,
    tensor_name: str,
    order_stats: Sequence[MagnitudeOrderStats] | None = None,
    uniform_draws: torch.Tensor | None = None,
    l1_before: torch.Tensor | None = None,
    window_cache: WindowCache | None = None,
    eager: bool = False,
) -> None:
    """out (N,) = method `row` on base (N,) and task vectors tvs (K, N), float32, in fused passes.

    `order_stats` (one per expert, from its task vector) speed up the magnitude thresholds and
    `window_cache` remembers them; `uniform_draws` (K, N) are the experts' `mask_generator` uniforms,
    drawn here when None (rows of experts kept whole may hold anything); `l1_before` (K,) are
    `l1_norms(ops, tvs)`. None of them changes the result; nor does `eager` (skip the compiled pass:
    see `fused`).
    """
    k, n = tvs.shape
    weights = [float(w) for w in coefficients.weight]
    densities = [float(d) for d in (coefficients.density or [1.0] * k)]
    gammas = [float(g) for g in (coefficients.gamma or [GAMMA.default] * k)]
    if len(weights) != k:
        raise ValueError(f"{len(weights)} weights for {k} experts (tensor {tensor_name!r})")
    for index in range(k):
        if not math.isfinite(weights[index]):
            raise ValueError(f"weight[{index}] must be finite; got {weights[index]} (tensor {tensor_name!r})")
        check_fraction(densities[index], f"density[{index}]", tensor_name)
        check_fraction(gammas[index], f"gamma[{index}]", tensor_name)
    lambda_ = float(coefficients.lambda_)
    if not math.isfinite(lambda_):
        raise ValueError(f"lambda_ must be finite; got {lambda_} (tensor {tensor_name!r})")

    sparsifier = row.sparsifier
    masked = [sparsifier is not None and d < 1 for d in densities]  # density 1 leaves a delta untouched
    pruned = [i for i in range(k) if masked[i]]
    windows: dict[int, RankWindow] = {}
    keep_p = draws = None
    if sparsifier in ("magnitude", "magnitude_outliers") and pruned:
        spans = {i: (n - magnitude_keep_count(n, densities[i]), n) if sparsifier == "magnitude"
                 else outlier_window(n, densities[i], gammas[i], keep_at_least_one=True) for i in pruned}
        windows = _rank_windows(ops, tvs, spans, order_stats, window_cache)
    elif sparsifier == "random" and pruned:
        keep_p = [d if m else 2.0 for d, m in zip(densities, masked)]  # uniforms are < 1: 2 keeps all
        draws = uniform_draws if uniform_draws is not None else _draw(ops, k, pruned, seed, tensor_name, n, tvs.device)

    def column(values: Sequence[float] | None, neutral: float) -> torch.Tensor | None:
        if values is None or all(v == neutral for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32, device=tvs.device)

    plan = MaskedMerge(weight=torch.tensor(weights, dtype=torch.float32, device=tvs.device),
                       keep_p=column(keep_p, 2.0), lambda_=lambda_, plain_divisor=weight_sum_divisor(weights),
                       consensus=row.consensus is not None, normalize=coefficients.normalize)
    cuts = sorted({c for window in windows.values() for c in window.cuts(n)})
    segments: list[Segment] = []
    for start, stop in zip([0, *cuts], [*cuts, n]):
        lo, hi = [-math.inf] * k, [math.inf] * k
        for i, window in windows.items():
            lo[i], hi[i] = window.thresholds(start, stop)
        segments.append((start, stop, dataclasses.replace(plan, lo=column(lo, -math.inf), hi=column(hi, math.inf))))
    if coefficients.rescale and segments[0][2].masks:
        before = l1_before if l1_before is not None else l1_norms(ops, tvs)
        scale = rescale_factors(before, _masked_l1_norms(ops, segments, tvs, draws), RESCALE_EPS)
        scale = torch.where(torch.tensor(masked, device=tvs.device), scale, torch.ones_like(scale))
        segments = [(start, stop, seg_plan.replace_scale(scale)) for start, stop, seg_plan in segments]
    for start, stop, seg_plan in segments:
        head = stop if eager else min(stop, -(-start // ALIGN) * ALIGN)  # eager up to an aligned start
        for a, b, eager_part in ((start, head, True), (head, stop, eager)):
            if a < b:
                ops.masked(seg_plan, base[a:b], tvs[:, a:b], None if draws is None else draws[:, a:b], out[a:b],
                           eager=eager_part)


def _rank_windows(ops: FusedOps, tvs: torch.Tensor, spans: dict[int, tuple[int, int]],
                  order_stats: Sequence[MagnitudeOrderStats] | None,
                  cache: WindowCache | None) -> dict[int, RankWindow]:
    """{expert: its exact `RankWindow` over `spans[expert]`}, from the cache, the order stats or a sample."""
    n = tvs.shape[1]
    windows, todo = {}, {}
    for i, span in spans.items():
        cached = cache.get_window((i, *span)) if cache is not None else None
        if cached is not None:
            windows[i] = cached
        else:
            todo[i] = span
    if not todo:
        return windows
    if order_stats is None:  # one-off merges: sampled brackets, each expert's scan on the pool
        found = ops.map_each(lambda i: rank_window(tvs[i], *todo[i]), list(todo))
    else:
        # Stored bounds, or brackets [a, b] that one counting pass (compiled when it can be) over the
        # pruned experts narrows to a few blocks, then a selection over the entries in them.
        ranks = {i: window_ranks(n, *span) for i, span in todo.items()}
        bounds = {i: [order_stats[i].bracket(rank) for rank in ranks[i]] for i in todo}
        for side in (0, 1):  # at most one bracket per expert and side: one pass per side
            pending = [i for i in todo if len(bounds[i]) > side and not isinstance(bounds[i][side], RankBound)]
            if not pending:
                continue
            counts = ops.block_counts(tvs, pending, [bounds[i][side][0] for i in pending],
                                      [bounds[i][side][1] for i in pending])

            def select(job: tuple[int, torch.Tensor | None]) -> RankBound:
                i, c = job
                return select_in_bracket(tvs[i], ranks[i][side], *bounds[i][side], c)

            for i, bound in zip(pending, ops.map_each(select, list(zip(pending, counts)))):
                bounds[i][side] = bound

        def window(i: int) -> RankWindow:
            start, stop = todo[i]
            found = iter(bounds[i])
            low = next(found) if start > 0 and ranks[i] else None
            high = next(found) if stop < n and ranks[i] else None
            return window_from_bounds(tvs[i], start, stop, low, high)  # tie cuts: scans that stop early

        found = ops.map_each(window, list(todo))
    for i, window in zip(todo, found):
        windows[i] = window
        if cache is not None:
            cache.put((i, *todo[i]), window)
    return windows


def _draw(ops: FusedOps, k: int, pruned: Sequence[int], seed: int, tensor_name: str, n: int,
          device: torch.device) -> torch.Tensor:
    """(K, N) uniforms of the pruned experts' `mask_generator`s (other rows 0), one stream each."""
    draws = torch.zeros((k, n), dtype=torch.float32, device=device)

    def draw(index: int) -> None:
        generator = mask_generator(seed, tensor_name, index, device)
        for start in range(0, n, DRAW_CHUNK):  # chunk by chunk: the same stream as one torch.rand(n)
            chunk = draws[index, start:start + DRAW_CHUNK]
            torch.rand(chunk.numel(), generator=generator, out=chunk)

    ops.map_each(draw, pruned)
    return draws


def l1_norms(ops: FusedOps, tvs: torch.Tensor) -> torch.Tensor:
    """(K,) L1 norms of the task vectors (finite entries), float32 chunk sums added in float64."""
    plan = MaskedMerge(torch.ones(tvs.shape[0], device=tvs.device))
    return _masked_l1_norms(ops, [(0, tvs.shape[1], plan)], tvs, None)


def _masked_l1_norms(ops: FusedOps, segments: Sequence[Segment], tvs: torch.Tensor,
                     draws: torch.Tensor | None) -> torch.Tensor:
    """(K,) L1 norms of the masked task vectors, in the same chunks whichever executor asks.

    Float32 sums of `L1_CHUNK`-entry pieces of [0, N) (whatever the segments: a chunk that a cut
    splits takes its mask from each segment and is summed whole, so a tensor of one chunk is summed
    as the pure kernel sums it), added in float64. Non-finite entries count 0: a chunk whose sums
    come out finite holds none, so only a chunk that does not is summed again without them.
    """
    def block(start: int, stop: int, scratch, nonfinite: bool = False) -> torch.Tensor:
        parts = [(max(s, start), min(e, stop), plan) for s, e, plan in segments if s < stop and e > start]
        if len(parts) == 1:
            return masked_l1_block(parts[0][2], tvs[:, start:stop], None if draws is None else draws[:, start:stop],
                                   scratch, nonfinite=nonfinite)
        keep = torch.cat([keep_mask(plan, tvs[:, a:b], None if draws is None else draws[:, a:b])
                          for a, b, plan in parts], 1)
        return masked_l1_block(parts[0][2], tvs[:, start:stop], None, scratch, keep=keep, nonfinite=nonfinite)

    n = tvs.shape[1]
    sums = torch.stack(ops.map_chunks(block, n, L1_CHUNK))  # (chunks, K) float32
    for chunk in torch.nonzero(~torch.isfinite(sums).all(1)).view(-1).tolist():
        start = chunk * L1_CHUNK
        sums[chunk] = block(start, min(start + L1_CHUNK, n), None, nonfinite=True)
    return sums.double().sum(0).float()
