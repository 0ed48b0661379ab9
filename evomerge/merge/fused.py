"""Fused single-pass versions of the task-arithmetic kernels, for the search's per-candidate path.

The pure kernels in `kernels.py` run one stage at a time over whole tensors; each stage reads
and writes K full-size temporaries. In the search, the same stored task vectors are merged
thousands of times, so here every stage is written as elementwise maths over the K expert rows
and compiled by `torch.compile` (Inductor: one OpenMP/SIMD loop on CPU, one Triton kernel on
GPU) that reads each stored element once and writes the result straight into the output buffer.

The magnitude masks use thresholds looked up from `MagnitudeOrderStats` (grid statistics), and
random masks use draws made outside with the kernels' own generators, so for the same inputs the
result equals the pure kernel's given the same order statistics (tested to float32 round-off).
Without a working compiler the same functions run eagerly: slower, same numbers.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

log = logging.getLogger(__name__)


def fused_sum(base: torch.Tensor, rows: tuple[torch.Tensor, ...], coef: torch.Tensor, out: torch.Tensor) -> None:
    """out = base + sum_k coef[k] * rows[k]; every argument is 1-D of the same length but coef (K,)."""
    acc = base + coef[0] * rows[0]
    for k in range(1, len(rows)):
        acc = acc + coef[k] * rows[k]
    out.copy_(acc)


def fused_masked(
    base: torch.Tensor,
    rows: tuple[torch.Tensor, ...],
    draws: tuple[torch.Tensor, ...] | None,
    weight: torch.Tensor,  # (K,) merge weights
    scale: torch.Tensor,  # (K,) L1 rescale factors (1 when not rescaling)
    lo: torch.Tensor,  # (K,) keep |t| >= lo
    hi: torch.Tensor,  # (K,) keep |t| <= hi
    keep_p: torch.Tensor,  # (K,) keep draws < keep_p (random sparsifier)
    lam: torch.Tensor,  # () lambda
    plain_divisor: torch.Tensor,  # () total weight for normalize without consensus
    consensus: bool,
    normalize: bool,
    out: torch.Tensor,
) -> None:
    """Sparsify, weight, elect signs, sum, normalize and add to base in one pass (see kernels.py)."""
    values = []
    for k, row in enumerate(rows):
        magnitude = row.abs()
        keep = (magnitude >= lo[k]) & (magnitude <= hi[k])
        if draws is not None:
            keep = keep & (draws[k] < keep_p[k])
        values.append(row * scale[k] * keep * weight[k])  # (N,) weighted sparsified delta
    total = values[0]
    for v in values[1:]:
        total = total + v
    if consensus:
        elected = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for k, v in enumerate(values):
            agree = (v * elected) > 0
            mixed = mixed + v * agree
            divisor = divisor + weight[k] * agree
        if normalize:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total / plain_divisor if normalize else total
    out.copy_(base + lam * mixed)


def masked_l1(rows: tuple[torch.Tensor, ...], draws: tuple[torch.Tensor, ...] | None, lo: torch.Tensor,
              hi: torch.Tensor, keep_p: torch.Tensor) -> torch.Tensor:
    """(K,) L1 norms of each row after masking: the denominator of the L1 rescale."""
    norms = []
    for k, row in enumerate(rows):
        magnitude = row.abs()
        keep = (magnitude >= lo[k]) & (magnitude <= hi[k])
        if draws is not None:
            keep = keep & (draws[k] < keep_p[k])
        norms.append((magnitude * keep).sum())
    return torch.stack(norms)


class FusedOps:
    """The three functions above, compiled on first use (or eager when `compile` is False/fails)."""

    def __init__(self, compile: bool = True):
        self.compile = compile
        self._compiled: dict[str, Callable] = {}

    def _get(self, fn: Callable) -> Callable:
        if not self.compile:
            return fn
        name = fn.__name__
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        return self._compiled[name]

    def _call(self, fn: Callable, *args):
        try:
            return self._get(fn)(*args)
        except Exception as exc:  # a missing C compiler or an Inductor limitation: fall back, same maths
            if not self.compile:
                raise
            log.warning("torch.compile unavailable (%s: %s); merging eagerly", type(exc).__name__, exc)
            self.compile = False
            return fn(*args)

    def sum(self, *args) -> None:
        self._call(fused_sum, *args)

    def masked(self, *args) -> None:
        self._call(fused_masked, *args)

    def l1(self, *args) -> torch.Tensor:
        return self._call(masked_l1, *args)


def rescale_factors(before: torch.Tensor, after: torch.Tensor, eps: float) -> torch.Tensor:
    """mergekit's L1 rescale: before/after, or 1 when either norm is below eps."""
    ok = (before >= eps) & (after >= eps)
    return torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))


INF = math.inf
