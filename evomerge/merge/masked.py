"""The one planner of masked task-arithmetic merges, run by both executors.

A method whose row has `fused=True` (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties) merges one tensor as: masks (exact rank windows for magnitude sparsifiers,
`mask_generator` draws for DARE), optional L1 rescale factors, then one fused pass
(`fused.FusedOps.masked`), then the few entries tied at a threshold recomputed with their exact
masks. `merge_masked` validates the coefficients, plans the masks and runs the passes; its two
callers differ only in where the inputs come from:

* the in-memory materializer (search candidates): task vectors stored once, `MagnitudeOrderStats`
  per expert (sorted once, so a candidate's thresholds cost a selection over a small bracket),
  cached uniform draws and L1 norms;
* the streaming disk engine (`evomerge merge`, `export`): task vectors read per tensor, thresholds
  from a sampled bracket (`sparsify.magnitude_rank_bounds`), draws made per tensor.

Both give the windows, masks and operation order of the pure kernel (`kernels.merge_task_vectors`),
so a scored candidate and its exported recipe hold the same tensors bit for bit (on CPU; see
`fused` for the compiled and eager forms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from evomerge.merge.fused import FusedOps, MaskedMerge, masked_block, masked_l1_block, rescale_factors, \
    weight_sum_divisor
from evomerge.merge.kernels import mask_generator
from evomerge.merge.methods import GAMMA, MergeMethod
from evomerge.merge.sparsify import (
    RESCALE_EPS,
    MagnitudeOrderStats,
    check_fraction,
    magnitude_keep_count,
    outlier_window,
    rank_window,
)

__all__ = ["MaskedCoefficients", "l1_norms", "merge_masked"]

DRAW_CHUNK = 1 << 16  # uniforms drawn per call: the same stream as one torch.rand(n), in cache-sized pieces


@dataclass(frozen=True)
class MaskedCoefficients:
    """One tensor's coefficients: per-expert lists (density / gamma None: the row's default) and settings."""

    weight: Sequence[float]
    density: Sequence[float] | None
    gamma: Sequence[float] | None
    normalize: bool
    rescale: bool
    lambda_: float


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
    eager: bool = False,
) -> None:
    """out (N,) = method `row` on base (N,) and task vectors tvs (K, N), float32, in fused passes.

    `order_stats` (one per expert, from its task vector) speed up the magnitude thresholds;
    `uniform_draws` (K, N) are the experts' `mask_generator` uniforms, drawn here when None
    (rows of experts kept whole may hold anything); `l1_before` (K,) are `l1_norms(ops, tvs)`.
    None of them changes the result; nor does `eager` (skip the compiled pass: see `fused`).
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
    lo = hi = keep_p = draws = None
    drops = [torch.zeros(0, dtype=torch.long, device=tvs.device)] * k
    if sparsifier in ("magnitude", "magnitude_outliers") and pruned:
        def window(index: int):
            if sparsifier == "magnitude":
                start, stop = n - magnitude_keep_count(n, densities[index]), n
            else:
                start, stop = outlier_window(n, densities[index], gammas[index], keep_at_least_one=True)
            stats = order_stats[index] if order_stats is not None else None
            return rank_window(tvs[index], start, stop, stats=stats)

        windows = dict(zip(pruned, ops.map_each(window, pruned)))
        lo = [windows[i].lo if i in windows else -math.inf for i in range(k)]
        hi = [windows[i].hi if i in windows else math.inf for i in range(k)]
        drops = [windows[i].drop if i in windows else drops[i] for i in range(k)]
    elif sparsifier == "random" and pruned:
        keep_p = [d if m else 2.0 for d, m in zip(densities, masked)]  # uniforms are < 1: 2 keeps all
        draws = uniform_draws if uniform_draws is not None else _draw(ops, k, pruned, seed, tensor_name, n, tvs.device)

    def column(values: Sequence[float] | None, neutral: float) -> torch.Tensor | None:
        if values is None or all(v == neutral for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32, device=tvs.device)

    plan = MaskedMerge(weight=torch.tensor(weights, dtype=torch.float32, device=tvs.device), lo=column(lo, -math.inf),
                       hi=column(hi, math.inf), keep_p=column(keep_p, 2.0), lambda_=lambda_,
                       plain_divisor=weight_sum_divisor(weights), consensus=row.consensus is not None,
                       normalize=coefficients.normalize)
    if coefficients.rescale and plan.masks:
        before = l1_before if l1_before is not None else l1_norms(ops, tvs)
        scale = rescale_factors(before, _masked_l1_norms(ops, plan, tvs, draws, drops), RESCALE_EPS)
        plan = plan.replace_scale(torch.where(torch.tensor(masked, device=tvs.device), scale, torch.ones_like(scale)))
    ops.masked(plan, base, tvs, draws, out, eager=eager)

    if any(drop.numel() for drop in drops):  # entries tied at a threshold: recompute them with exact masks
        patch = torch.unique(torch.cat(drops))
        dropped = torch.stack([torch.isin(patch, drop).float() for drop in drops])  # (K, P) 1 = drop
        exact = MaskedMerge(plan.weight, plan.lo, plan.hi, torch.full((k,), 0.5, device=tvs.device), plan.scale,
                            plan.lambda_, plan.plain_divisor, plan.consensus, plan.normalize)
        patched = torch.empty(patch.numel(), dtype=torch.float32, device=tvs.device)
        masked_block(exact, base[patch], tvs[:, patch], dropped, patched)
        out[patch] = patched


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
    return _masked_l1_norms(ops, MaskedMerge(torch.ones(tvs.shape[0], device=tvs.device)), tvs, None, [])


def _masked_l1_norms(ops: FusedOps, plan: MaskedMerge, tvs: torch.Tensor, draws: torch.Tensor | None,
                     drops: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K,) L1 norms of the masked task vectors, in the same chunks whichever executor asks."""
    def block(start: int, stop: int, scratch) -> torch.Tensor:
        part_draws = None if draws is None else draws[:, start:stop]
        return masked_l1_block(plan, tvs[:, start:stop], part_draws, scratch).double()

    after = torch.stack(ops.map_chunks(block, tvs.shape[1])).sum(0)
    for index, drop in enumerate(drops):  # tied entries the thresholds keep but the window drops
        if drop.numel():
            after[index] -= tvs[index, drop].abs().double().sum()
    return after.float()
