"""Fused single-pass versions of the task-arithmetic kernels, for the search and for `evomerge merge`.

The pure kernels in `kernels.py` run one stage at a time over whole tensors; each stage reads
and writes K full-size temporaries. Here the same maths (sparsify by thresholds or draws,
weight, TIES sign election, sum, normalize, add to base) runs in one pass over the K stored
task vectors, in one of two forms:

* compiled (`fused_sum`, `fused_masked`): elementwise maths over the K expert
  rows, compiled by `torch.compile` (Inductor: one OpenMP/SIMD loop on CPU, one Triton kernel
  on GPU) that reads each stored element once and writes straight into the output buffer.
  Dynamic shapes, so one graph per (K, variant: draws or not, consensus, normalize), not per tensor.
* eager and chunked (`masked_block`, `masked_l1_block`): the same stages over (K, chunk) blocks
  that stay in cache, written with float-valued masks (torch's comparisons into a float output
  are vectorized; bool tensors and `torch.where` are not) and in the pure kernel's operation
  order, so the result is bit-identical to `kernels.generalized_task_arithmetic`. Chunks run on
  a small thread pool with single-threaded torch ops: OpenMP's static split stalls on every op
  when the machine is shared, a pool of workers taking chunks does not.

The magnitude masks use the exact rank windows the planner found (`masked.merge_masked`), random
masks use draws made with the kernels' own generators (an explicit mask is passed as draws of
0 = keep / 1 = drop against keep_p 0.5), so the result equals the pure kernel's for the same masks.
The L1 norms of the rescale are always summed eagerly (`masked_l1_block`, float32 chunk sums added
in float64), so both executors get the same factors. Without a working compiler the eager form runs.

Non-finite input (models opened with `allow_nonfinite=True`) is treated as the pure kernels treat
it, so both paths give the same tensor: IEEE arithmetic per entry (a NaN or inf delta makes its own
output entry non-finite, even at weight 0 or when masked out, since NaN * 0 is NaN), and the L1
rescale norms sum the finite entries only (`sparsify.finite_l1`), so no other entry changes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from evomerge.merge.sparsify import RANK_BLOCK

log = logging.getLogger(__name__)

INF = math.inf


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to `n` (None: unchanged), restored after."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- compiled (row) form

def fused_sum(base: torch.Tensor, rows: tuple[torch.Tensor, ...], coef: torch.Tensor, out: torch.Tensor) -> None:
    """out = base + sum_k coef[k] * rows[k]; every argument is 1-D of the same length but coef (K,)."""
    acc = base + coef[0] * rows[0]
    for k in range(1, len(rows)):
        acc = acc + coef[k] * rows[k]
    out.copy_(acc)


def _keep(magnitude: torch.Tensor, k: int, draws, lo: torch.Tensor, hi: torch.Tensor, keep_p: torch.Tensor,
          use_hi: bool) -> torch.Tensor:
    """Expert k's keep mask: magnitude window [lo, hi] and, for random sparsifiers, draws below keep_p."""
    keep = magnitude >= lo[k]
    if use_hi:
        keep = keep & (magnitude <= hi[k])
    if draws is not None:
        keep = keep & (draws[k] < keep_p[k])
    return keep


def fused_masked(
    base: torch.Tensor,
    rows: tuple[torch.Tensor, ...],
    draws: tuple[torch.Tensor, ...] | None,
    weight: torch.Tensor,  # (K,) merge weights
    scale: torch.Tensor,  # (K,) L1 rescale factors (1 when not rescaling)
    lo: torch.Tensor,  # (K,) keep |t| >= lo
    hi: torch.Tensor,  # (K,) keep |t| <= hi
    keep_p: torch.Tensor,  # (K,) keep draws < keep_p (random sparsifier)
    lambda_: torch.Tensor,  # () task-vector scale
    plain_divisor: torch.Tensor,  # () total weight for normalize without consensus
    consensus: bool,
    normalize: bool,
    out: torch.Tensor,
    use_hi: bool = True,  # False: hi is all +inf, skip its compare (a separate, leaner graph)
    use_scale: bool = True,  # False: scale is all 1, skip its multiply
) -> None:
    """Sparsify, weight, elect signs, sum, normalize and add to base in one pass (see kernels.py)."""
    values = []
    for k, row in enumerate(rows):
        keep = _keep(row.abs(), k, draws, lo, hi, keep_p, use_hi)
        kept = row * scale[k] * keep if use_scale else row * keep
        values.append(kept * weight[k])  # (N,) weighted sparsified delta
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
    out.copy_(base + lambda_ * mixed)


# ----------------------------------------------------------------------------- the constants of one merge

@dataclass(frozen=True)
class MaskedMerge:
    """Per-tensor constants of one masked merge; each tensor is (K,) float32 on the data's device.

    None switches a stage off (no lower / upper magnitude bound, no draws, no rescale), which
    the eager form skips and the compiled form fills with a neutral value.
    """

    weight: torch.Tensor
    lo: torch.Tensor | None = None  # keep |t| >= lo
    hi: torch.Tensor | None = None  # keep |t| <= hi
    keep_p: torch.Tensor | None = None  # keep draws < keep_p (needs draws)
    scale: torch.Tensor | None = None  # L1 rescale factors
    lambda_: float = 1.0  # task-vector scale (recipe `lambda`)
    plain_divisor: float = 1.0  # normalize without consensus: float32 weight sum, 1 if |sum| < 1e-8
    consensus: bool = False  # TIES sign election ("sum")
    normalize: bool = False

    @property
    def masks(self) -> bool:
        return self.lo is not None or self.hi is not None or self.keep_p is not None

    def replace_scale(self, scale: torch.Tensor | None) -> "MaskedMerge":
        return MaskedMerge(self.weight, self.lo, self.hi, self.keep_p, scale, self.lambda_, self.plain_divisor,
                           self.consensus, self.normalize)

    def row_args(self) -> tuple:
        """(weight, scale, lo, hi, keep_p, lambda_, plain_divisor, consensus, normalize) for `fused_masked`."""
        w = self.weight

        def full(value: float) -> torch.Tensor:
            return torch.full_like(w, value)

        return (w, full(1.0) if self.scale is None else self.scale, full(-INF) if self.lo is None else self.lo,
                full(INF) if self.hi is None else self.hi, full(2.0) if self.keep_p is None else self.keep_p,
                torch.tensor(float(self.lambda_), dtype=w.dtype, device=w.device),
                torch.tensor(float(self.plain_divisor), dtype=w.dtype, device=w.device), self.consensus, self.normalize)


def weight_sum_divisor(weights: Sequence[float]) -> float:
    """The pure kernel's normalizing divisor without consensus: float32 sum of weights, 1 when |sum| < 1e-8."""
    total = float(torch.tensor(list(weights), dtype=torch.float32).sum())
    return 1.0 if abs(total) < 1e-8 else total


# ----------------------------------------------------------------------------- eager (block) form

class _Scratch:
    """Per-thread reusable buffers: fresh allocations per chunk would dominate the cost."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != like.device:
            buf = torch.empty(numel, dtype=torch.float32, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def _keep_mask(plan: MaskedMerge, tvs: torch.Tensor, draws: torch.Tensor | None, scratch: _Scratch) -> torch.Tensor:
    """(K, c) float 1/0 mask of the entries each expert keeps."""
    shape = tuple(tvs.shape)
    keep = scratch.take("keep", shape, tvs)
    aux = scratch.take("aux", shape, tvs)
    started = False
    if plan.lo is not None or plan.hi is not None:
        magnitude = torch.abs(tvs, out=scratch.take("magnitude", shape, tvs))
        if plan.lo is not None:
            torch.ge(magnitude, plan.lo[:, None], out=keep)
            started = True
        if plan.hi is not None:
            torch.le(magnitude, plan.hi[:, None], out=aux if started else keep)
            if started:
                keep.mul_(aux)
            started = True
    if plan.keep_p is not None:
        if draws is None:
            raise ValueError("keep_p needs draws")
        torch.lt(draws, plan.keep_p[:, None], out=aux if started else keep)
        if started:
            keep.mul_(aux)
    return keep


def masked_block(plan: MaskedMerge, base: torch.Tensor, tvs: torch.Tensor, draws: torch.Tensor | None,
                 out: torch.Tensor, scratch: _Scratch | None = None) -> None:
    """`fused_masked` on one block: base (c,), task vectors (K, c), draws (K, c) or None -> out (c,).

    Mirrors `kernels.generalized_task_arithmetic` operation by operation (mask, rescale, weight,
    sum over experts in order, elect, divide, add), so it is bit-identical to the pure kernel
    given the same masks and rescale factors.
    """
    scratch = scratch or _Scratch()
    k, c = tvs.shape
    shape = (k, c)
    v = scratch.take("v", shape, tvs)
    w = plan.weight[:, None]
    if plan.masks:
        torch.mul(tvs, _keep_mask(plan, tvs, draws, scratch), out=v)  # sparsified delta (t * mask)
        if plan.scale is not None:
            v.mul_(plan.scale[:, None])
        v.mul_(w)
    else:
        torch.mul(tvs, w, out=v)
    mixed = scratch.take("mixed", (c,), tvs)
    if plan.consensus:
        total = torch.sum(v, 0, out=scratch.take("total", (c,), tvs))
        elected = total.ge_(0).mul_(2).sub_(1)  # +1 / -1: the sign of the sum, + on ties
        tmp = scratch.take("aux", shape, tvs)
        agree = torch.gt(torch.mul(v, elected, out=tmp), 0, out=scratch.take("keep", shape, tvs))
        v.mul_(agree)
        torch.sum(v, 0, out=mixed)
        if plan.normalize:
            divisor = torch.sum(torch.mul(agree, w, out=tmp), 0, out=scratch.take("divisor", (c,), tvs))
            divisor.add_(torch.eq(divisor, 0, out=total))  # 0 -> 1
            mixed.div_(divisor)
    else:
        torch.sum(v, 0, out=mixed)
        if plan.normalize:
            mixed.div_(plan.plain_divisor)
    if plan.lambda_ != 1:
        mixed.mul_(plan.lambda_)
    torch.add(base, mixed, out=out)


def masked_l1_block(plan: MaskedMerge, tvs: torch.Tensor, draws: torch.Tensor | None,
                    scratch: _Scratch | None = None, keep: torch.Tensor | None = None, *,
                    nonfinite: bool = True) -> torch.Tensor:
    """(K,) float32 L1 norms of the block's masked task vectors (all of it when the plan has no mask).

    `keep` (K, c) float 1/0 replaces the plan's mask when given. Non-finite entries count 0, as in
    `sparsify.finite_l1`; `nonfinite=False` skips that step, for a caller that knows the block
    holds none (its sums come out finite: a sum of non-negative values is NaN or inf otherwise).
    """
    scratch = scratch or _Scratch()
    shape = tuple(tvs.shape)
    if keep is None and plan.masks:
        keep = _keep_mask(plan, tvs, draws, scratch)
    magnitude = torch.abs(tvs, out=scratch.take("l1", shape, tvs))
    if nonfinite:
        magnitude.nan_to_num_(nan=0.0, posinf=0.0)
    if keep is not None:
        magnitude.mul_(keep)
    return magnitude.sum(1)


def keep_mask(plan: MaskedMerge, tvs: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
    """(K, c) float 1/0 mask of the entries each expert keeps, in a fresh tensor (all 1 without masks)."""
    if not plan.masks:
        return torch.ones(tuple(tvs.shape), dtype=torch.float32, device=tvs.device)
    return _keep_mask(plan, tvs, draws, _Scratch())


def bracket_counts(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(K, numel // RANK_BLOCK) per row of rows (K, numel), numel a multiple of RANK_BLOCK: how many
    entries of each block have low[k] <= |x| <= high[k]; the compiled form of `sparsify.block_counts`."""
    magnitude = rows.abs()
    inside = ((magnitude >= low[:, None]) & (magnitude <= high[:, None])).to(torch.float32)
    return inside.view(rows.shape[0], -1, RANK_BLOCK).sum(2)  # float sums vectorize; int32 ones half as fast


# ----------------------------------------------------------------------------- dispatch

class FusedOps:
    """Runs the fused merges: compiled on first use, or eager and chunked (`compile` False or failing).

    `workers` threads share the eager chunks (default: torch's thread count); each op in them
    runs single-threaded.
    """

    def __init__(self, compile: bool = True, *, chunk_size: int = 1 << 16, workers: int | None = None):
        self.compile = compile
        self.chunk_size = int(chunk_size)
        self.workers = max(1, int(workers or torch.get_num_threads()))
        self._compiled: dict[str, Callable] = {}
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- compiled
    def _get(self, fn: Callable) -> Callable:
        name = fn.__name__
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        return self._compiled[name]

    def _try_compiled(self, fn: Callable, *args) -> tuple[bool, object]:
        if not self.compile:
            return False, None
        try:
            return True, self._get(fn)(*args)
        except Exception as exc:  # a missing C compiler or an Inductor limitation: fall back, same maths
            log.warning("torch.compile unavailable (%s: %s); merging eagerly", type(exc).__name__, exc)
            self.compile = False
            return False, None

    # ---------------------------------------------------------------- eager
    def _scratch(self) -> _Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch

    def map_chunks(self, fn: Callable[[int, int, _Scratch], object], numel: int, chunk_size: int | None = None) -> list:
        """[fn(start, stop, scratch) for each chunk of [0, numel)], on the worker pool, ops single-threaded.

        Chunks of `chunk_size` entries (default: the ops' own)."""
        size = chunk_size or self.chunk_size
        bounds = [(s, min(s + size, numel)) for s in range(0, numel, size)]
        with torch_threads(1):
            if self.workers == 1 or len(bounds) < 2:
                scratch = self._scratch()
                return [fn(s, e, scratch) for s, e in bounds]
            return list(self.pool().map(lambda se: fn(se[0], se[1], self._scratch()), bounds))

    def map_each(self, fn: Callable[[object], object], items: Sequence) -> list:
        """[fn(item) for item in items], on the worker pool, ops single-threaded (e.g. one task per expert)."""
        with torch_threads(1):
            if self.workers == 1 or len(items) < 2:
                return [fn(item) for item in items]
            return list(self.pool().map(fn, items))

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="evomerge-fused")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def rows_finite(self, rows: Sequence[torch.Tensor]) -> list[bool]:
        """[row holds no NaN / inf for row in rows] (1-D, equal lengths), in one chunked pass on the pool.

        A chunk whose sum is finite holds no NaN / inf (IEEE: either makes the sum NaN or inf), and a
        sum is one vectorized read; only a chunk with a non-finite sum (or an overflow) is checked
        entry by entry.
        """
        def finite(chunk: torch.Tensor) -> bool:
            return bool(torch.isfinite(chunk.sum())) or bool(torch.isfinite(chunk).all())

        def block(start: int, stop: int, _) -> list[bool]:
            return [finite(row[start:stop]) for row in rows]

        parts = self.map_chunks(block, rows[0].numel())
        return [all(part[i] for part in parts) for i in range(len(rows))]

    def block_counts(self, tvs: torch.Tensor, rows: Sequence[int], low: Sequence[float],
                     high: Sequence[float]) -> list[torch.Tensor | None]:
        """[`sparsify.block_counts`(tvs[k], low[j], high[j]) for the j-th k in rows], in one compiled
        pass over all K rows of tvs (K, N) (the others compare against an empty bracket); Nones when
        not compiling (`sparsify.bracket_members` then gathers the members in one eager scan)."""
        whole = tvs.shape[1] - tvs.shape[1] % RANK_BLOCK
        if whole:
            lows = torch.full((tvs.shape[0],), math.inf, dtype=torch.float32, device=tvs.device)
            highs = torch.full((tvs.shape[0],), -math.inf, dtype=torch.float32, device=tvs.device)
            lows[list(rows)] = torch.tensor(list(low), dtype=torch.float32, device=tvs.device)
            highs[list(rows)] = torch.tensor(list(high), dtype=torch.float32, device=tvs.device)
            done, counts = self._try_compiled(bracket_counts, tvs[:, :whole], lows, highs)
            if done:
                return [counts[k] for k in rows]
        return [None] * len(rows)

    # ---------------------------------------------------------------- the merges
    def sum(self, base: torch.Tensor, tvs: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> None:
        """out = base + tvs^T @ coef (one read of every stored element, one write)."""
        done, _ = self._try_compiled(fused_sum, base, tuple(tvs), coef, out)
        if not done:
            torch.addmv(base, tvs.T, coef, out=out)

    def masked(self, plan: MaskedMerge, base: torch.Tensor, tvs: torch.Tensor, draws: torch.Tensor | None,
               out: torch.Tensor, *, eager: bool = False) -> None:
        """out (N,) = the masked merge of base (N,) and task vectors (K, N) (see `masked_block`)."""
        if not eager:
            rows_draws = tuple(draws) if draws is not None and plan.keep_p is not None else None
            done, _ = self._try_compiled(fused_masked, base, tuple(tvs), rows_draws, *plan.row_args(), out,
                                         plan.hi is not None, plan.scale is not None)
            if done:
                return

        def block(start: int, stop: int, scratch: _Scratch) -> None:
            masked_block(plan, base[start:stop], tvs[:, start:stop],
                         None if draws is None else draws[:, start:stop], out[start:stop], scratch)

        self.map_chunks(block, base.numel())


def rescale_factors(before: torch.Tensor, after: torch.Tensor, eps: float) -> torch.Tensor:
    """mergekit's L1 rescale: before/after, or 1 when either norm is below eps."""
    ok = (before >= eps) & (after >= eps)
    return torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))
