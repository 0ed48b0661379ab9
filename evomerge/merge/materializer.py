"""In-memory materializer: writes a candidate merge straight into a live `transformers` model.

The search scores thousands of candidates that differ only in their coefficients. So the base
weights and the experts' stacked task vectors (expert - base) are loaded once, in float32, on
`cuda` when present, and every candidate is computed into the parameters of one live model:
no disk I/O and no per-candidate allocation of model-sized tensors (fresh large allocations run
at a tenth of the memory bandwidth of in-place work on this class of machine).

Paths, each tested equal to the pure kernels in `evomerge.merge.kernels`:
- task arithmetic, normalized linear, and the sparsifying methods at density 1: one fused
  multiply-add pass, base + sum_k c_k tv_k, straight into the parameter (`fused.fused_sum`).
- ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties: one fused pass
  (`fused.fused_masked`, or its chunked eager form). Magnitude thresholds are looked up in
  per-expert order statistics computed once (`MagnitudeOrderStats`), so a candidate costs a
  compare, not a selection. DARE's uniform draws come from the kernels' own generators, seeded
  by (seed, tensor, expert): the same for every candidate (common random numbers, which makes
  candidates comparable), so they are drawn once and kept when memory allows
  (`cache_random_draws`); later candidates only compare them with their densities.
  Tensors small enough for exact order statistics (or all, with `order_stats_grid=None`) take
  the kernel's own masks (`sparsify.magnitude_mask`, ties by flat index) through the same pass.
- anything else (DELLA's per-row ranks, slerp): the pure kernel itself.

Every stored tensor is checked for NaN / inf once, as it is loaded (`ModelFolder.get_tensor`), so
candidates cost nothing more; `allow_nonfinite=True` loads them anyway, and then every path treats
them as the pure kernels do (see `fused`). The tokenizers are compared first (`check_tokenizers`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from evomerge._device import default_device
from evomerge.merge.checkpoint import ModelFolder, check_compatible
from evomerge.merge.fused import FusedOps, MaskedMerge, rescale_factors, torch_threads, weight_sum_divisor
from evomerge.merge.kernels import mask_generator, merge_tensor, method_defaults
from evomerge.merge.layers import LayerMap, TensorPosition
from evomerge.merge.tokenizers import check_tokenizers
from evomerge.merge.sparsify import (
    RESCALE_EPS,
    MagnitudeOrderStats,
    check_fraction,
    finite_l1,
    magnitude_keep_count,
    magnitude_mask,
    magnitude_outliers_mask,
    outlier_window,
)

# method -> (sparsifier, consensus) for the fused masked path.
FUSED_MASKED = {
    "ties": ("magnitude", "sum"),
    "dare_ties": ("random", "sum"),
    "dare_linear": ("random", None),
    "breadcrumbs": ("magnitude_outliers", None),
    "breadcrumbs_ties": ("magnitude_outliers", "sum"),
}
# Below this many stored elements, compiling costs more than it saves.
AUTO_COMPILE_MIN_ELEMENTS = 20_000_000
# `cache_random_draws="auto"` keeps the draws when they fit in this budget (and in half the free memory).
DEFAULT_RANDOM_DRAWS_BUDGET = 8 * 2**30


@dataclass(frozen=True)
class TensorCoefficients:
    """Per-expert coefficients for one tensor, each a length-K tuple."""

    weight: tuple[float, ...]
    density: tuple[float, ...] | None = None
    gamma: tuple[float, ...] | None = None
    epsilon: tuple[float, ...] | None = None


CoefficientFn = Callable[[str, TensorPosition], TensorCoefficients]


def layerwise(num_layers: int, **params: Sequence | np.ndarray | None) -> CoefficientFn:
    """Build a coefficient function from per-expert values, each shaped (K,) or (K, num_layers).

    A (K, L) array gives layer l the column l. Tensors outside the block stack (embeddings,
    final norm, LM head) take column 0, which is what a mergekit gradient list of the same values
    gives them (mergekit evaluates those tensors at t = 0), so a recipe export stays exact.
    """
    arrays = {}
    for name, value in params.items():
        if value is None:
            continue
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 1:
            arr = np.repeat(arr[:, None], num_layers, axis=1)
        if arr.ndim != 2 or arr.shape[1] != num_layers:
            raise ValueError(f"{name}: expected shape (K,) or (K, {num_layers}), got {arr.shape}")
        arrays[name] = arr

    def resolve(tensor_name: str, position: TensorPosition) -> TensorCoefficients:
        col = position.layer if position.is_layer else 0
        return TensorCoefficients(**{k: tuple(float(x) for x in v[:, col]) for k, v in arrays.items()})

    return resolve


@dataclass
class _Slot:
    """One merged tensor: where it lives in the live model and its stored inputs."""

    name: str
    position: TensorPosition
    param: torch.Tensor  # the live model's parameter (written in place)
    base: torch.Tensor  # (N,) float32 on device
    task_vectors: torch.Tensor  # (K, N) float32 on device
    magnitude_stats: list[MagnitudeOrderStats] | None = None  # built on first magnitude-pruned use
    lookups: list["_RankLookup"] | None = None  # the same stats, for threshold lookups without torch calls
    l1_norms: torch.Tensor | None = None  # (K,) built on first rescaled use
    draws: torch.Tensor | None = None  # (K, N) cached uniform draws of the random sparsifier


@dataclass
class Materializer:
    """Holds a base model and its experts' task vectors; materialises candidates in place.

    `Materializer.from_folders(base_dir, expert_dirs)`, then `apply(method, ...)` writes the
    merge into `self.model` (a live `transformers` model in eval mode) and returns it.

    `cache_random_draws` (True, False or "auto"): keep DARE's uniform draws after the first
    candidate. They cost 4 bytes per stored task-vector element, as much memory again as the task
    vectors (K x parameters x 4 bytes), and save regenerating them (the dominant cost of a
    dare_* candidate on CPU). "auto" caches when that fits in `random_draws_budget_bytes`
    (default 8 GiB) and in half the device's free memory at the first random merge.
    `num_threads` sets torch's thread count while a candidate is written (None: unchanged);
    on a shared CPU, 1 avoids OpenMP stalls on every fused op.
    """

    model: torch.nn.Module
    layer_map: LayerMap
    slots: list[_Slot]
    device: torch.device
    num_experts: int
    seed: int = 0
    order_stats_grid: int | None = 65536
    compile: bool = False
    cache_random_draws: bool | str = "auto"
    random_draws_budget_bytes: int = DEFAULT_RANDOM_DRAWS_BUDGET
    num_threads: int | None = None
    _scratch: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _ops: FusedOps = field(init=False, repr=False)
    _draws_cached: bool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cache_random_draws not in (True, False, "auto"):
            raise ValueError(f"cache_random_draws must be True, False or 'auto'; got {self.cache_random_draws!r}")
        # A CPU pool spreads eager chunks, sorts and draws; on a GPU the device already runs them in parallel.
        self._ops = FusedOps(compile=self.compile, workers=None if torch.device(self.device).type == "cpu" else 1)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_folders(
        cls,
        base_dir: str | os.PathLike,
        expert_dirs: Sequence[str | os.PathLike],
        *,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        layer_pattern: str | None = None,
        seed: int = 0,
        order_stats_grid: int | None = 65536,
        compile: bool | str = "auto",
        cache_random_draws: bool | str = "auto",
        random_draws_budget_bytes: int = DEFAULT_RANDOM_DRAWS_BUDGET,
        num_threads: int | None = None,
    ) -> "Materializer":
        """Load the base model (through `transformers`) and the experts' task vectors once.

        `compile="auto"` compiles the fused paths with `torch.compile` when the model is large
        enough for that to pay off; `order_stats_grid` trades exactness of magnitude thresholds
        on tensors above that many elements for a lookup (see `MagnitudeOrderStats`).
        A NaN / inf in any model raises `NonFiniteError` naming the file and tensor, unless
        `allow_nonfinite`.
        """
        from transformers import AutoModelForCausalLM

        device = default_device(device)
        opened = dict(allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
        base = ModelFolder.open(base_dir, **opened)
        experts = [ModelFolder.open(p, **opened) for p in expert_dirs]
        if not experts:
            raise ValueError("Materializer needs at least one expert")
        check_tokenizers(base.path, [e.path for e in experts])
        check_compatible(base, experts)
        layer_map = LayerMap.from_config(base.config, layer_pattern)

        dtype = base.dtype(base.tensor_names()[0])
        # The loading path users run on big checkpoints; remote code stays off.
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=False).to(device)
        model.eval()
        slots = []
        for name, param in model.named_parameters(remove_duplicate=False):
            if not base.has_tensor(name):
                raise ValueError(f"{base.path}: the model class expects tensor {name!r} but the checkpoint lacks it")
            if name in base.aliases:  # a tied head shares storage with the embedding, which is merged
                continue
            param.requires_grad_(False)
            base_t = base.get_tensor(name).to(device=device, dtype=torch.float32).reshape(-1)
            tvs = torch.empty((len(experts), base_t.numel()), dtype=torch.float32, device=device)
            for k, expert in enumerate(experts):
                tvs[k].copy_(expert.get_tensor(name).reshape(-1))
                tvs[k].sub_(base_t)
            slots.append(_Slot(name, layer_map.position(name), param, base_t, tvs))
        base.close()
        for expert in experts:
            expert.close()
        if compile == "auto":
            compile = sum(s.task_vectors.numel() for s in slots) >= AUTO_COMPILE_MIN_ELEMENTS
        return cls(model=model, layer_map=layer_map, slots=slots, device=device, num_experts=len(experts),
                   seed=seed, order_stats_grid=order_stats_grid, compile=bool(compile),
                   cache_random_draws=cache_random_draws, random_draws_budget_bytes=random_draws_budget_bytes,
                   num_threads=num_threads)

    @property
    def num_layers(self) -> int:
        return self.layer_map.num_layers

    @property
    def weight_bytes(self) -> int:
        """Bytes one candidate reads (base + task vectors, float32) and writes (the merged tensors)."""
        return sum((2 + self.num_experts) * s.base.numel() * 4 for s in self.slots)

    # ------------------------------------------------------------- applying
    def apply(
        self,
        method: str,
        coefficients: CoefficientFn | None = None,
        *,
        normalize: bool | None = None,
        rescale: bool | None = None,
        lambda_: float = 1.0,
        t: float | None = None,
        **per_expert: Sequence | np.ndarray | None,
    ) -> torch.nn.Module:
        """Write the merge into the live model and return it.

        Pass either a coefficient function (see `layerwise`) or per-expert arrays as keywords:
        `apply("ties", weight=[0.8, 0.6, 0.4], density=[0.5, 0.5, 0.5])`, or (K, L) arrays.
        """
        if coefficients is None:
            coefficients = layerwise(self.num_layers, **per_expert)
        elif per_expert:
            raise TypeError("pass either a coefficient function or per-expert arrays, not both")
        defaults = method_defaults(method)
        normalize = defaults.get("normalize", False) if normalize is None else bool(normalize)
        rescale = defaults.get("rescale", False) if rescale is None else bool(rescale)
        with torch.no_grad(), torch_threads(self.num_threads):
            for slot in self.slots:
                coeffs = coefficients(slot.name, slot.position)
                if len(coeffs.weight) != self.num_experts:
                    raise ValueError(f"tensor {slot.name!r}: {len(coeffs.weight)} weights for {self.num_experts} experts")
                self._apply_slot(slot, method, coeffs, normalize, rescale, lambda_, t)
        return self.model

    def _apply_slot(self, slot: _Slot, method: str, c: TensorCoefficients, normalize: bool, rescale: bool,
                    lambda_: float, t: float | None) -> None:
        dense = c.density is None or all(d >= 1.0 for d in c.density)
        if method in ("task_arithmetic", "dare_linear", "della_linear", "breadcrumbs") and dense:
            # Every entry survives, so these are plain task arithmetic (an L1 rescale by 1 changes nothing).
            total = sum(c.weight)
            divisor = total if normalize and abs(total) >= 1e-8 else 1.0
            self._fused_sum(slot, [w * lambda_ / divisor for w in c.weight])
        elif method == "linear" and normalize:
            total = sum(c.weight)
            if total == 0:
                raise ValueError(f"linear: weights {list(c.weight)} sum to 0 and cannot be normalized (tensor {slot.name!r})")
            # sum_k w_k (base + tv_k) / W = base + sum_k (w_k / W) tv_k
            self._fused_sum(slot, [w / total for w in c.weight])
        elif method in FUSED_MASKED:
            self._fused_masked(slot, method, c, normalize, rescale, lambda_)
        else:
            stats = self._order_stats(slot) if method in ("ties", "breadcrumbs", "breadcrumbs_ties") else None
            self._kernel(slot, method, c, normalize, rescale, lambda_, t, stats)

    def _fused_sum(self, slot: _Slot, coefficients: Sequence[float]) -> None:
        out = self._output_buffer(slot)
        coef = torch.tensor(coefficients, dtype=torch.float32, device=self.device)
        self._ops.sum(slot.base, slot.task_vectors, coef, out)
        self._commit(slot, out)

    def _fused_masked(self, slot: _Slot, method: str, c: TensorCoefficients, normalize: bool, rescale: bool,
                      lambda_: float) -> None:
        sparsifier, consensus = FUSED_MASKED[method]
        k_experts = self.num_experts
        densities = [float(d) for d in (c.density or (1.0,) * k_experts)]
        for k, density in enumerate(densities):
            check_fraction(density, f"density[{k}]", slot.name)
        gammas = [float(g) for g in (c.gamma or (0.01,) * k_experts)]
        for k, gamma in enumerate(gammas):
            check_fraction(gamma, f"gamma[{k}]", slot.name)
        lo = hi = keep_p = draws = None
        exact = sparsifier != "random" and self._exact_stats(slot)
        if sparsifier == "random":
            if min(densities) < 1:
                keep_p = [d if d < 1 else 2.0 for d in densities]  # draws are < 1: 2 keeps everything
                draws = self._draws(slot, densities)
        elif exact:  # exact stats: the kernel's own masks (ties by flat index), passed as drop draws
            draws = self._exact_drops(slot, sparsifier, densities, gammas)
            keep_p = [0.5] * k_experts
        elif sparsifier == "magnitude":
            lo = [_magnitude_lo(lookup, d) for lookup, d in zip(self._lookups(slot), densities)]
        else:
            lo, hi = zip(*(_outlier_bounds(lookup, d, g)
                           for lookup, d, g in zip(self._lookups(slot), densities, gammas)))
        as_tensor = self._small_tensor
        plan = MaskedMerge(
            weight=as_tensor(c.weight),
            lo=as_tensor(lo) if lo is not None and max(lo) > -math.inf else None,
            hi=as_tensor(hi) if hi is not None and min(hi) < math.inf else None,
            keep_p=as_tensor(keep_p) if keep_p is not None else None,
            lam=float(lambda_),
            plain_divisor=weight_sum_divisor(c.weight),
            consensus=consensus is not None,
            normalize=normalize,
        )
        if rescale and plan.masks:
            after = self._ops.l1(plan, slot.task_vectors, draws, eager=exact)
            scale = rescale_factors(self._l1_norms(slot), after, RESCALE_EPS)
            dense = as_tensor([d >= 1 for d in densities]).bool()  # the kernel leaves these unscaled
            plan = plan.replace_scale(torch.where(dense, torch.ones_like(scale), scale))
        out = self._output_buffer(slot)
        # Exact-stats slots are small (below the grid): eager blocks beat a compiled call's overhead.
        self._ops.masked(plan, slot.base, slot.task_vectors, draws, out, eager=exact)
        self._commit(slot, out)

    def _exact_drops(self, slot: _Slot, sparsifier: str, densities: Sequence[float],
                     gammas: Sequence[float]) -> torch.Tensor:
        """(K, N) float: 1 where the pure kernel's mask (from exact order stats) drops the entry."""
        stats = self._order_stats(slot)
        shape = slot.param.shape
        keep = []
        for k, tv in enumerate(slot.task_vectors):
            if sparsifier == "magnitude":
                keep.append(magnitude_mask(tv.view(shape), densities[k], stats=stats[k]))
            else:
                keep.append(magnitude_outliers_mask(tv.view(shape), densities[k], gammas[k], stats=stats[k]))
        return (~torch.stack(keep).reshape(self.num_experts, -1)).float()

    def _small_tensor(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)

    def _kernel(self, slot: _Slot, method: str, c: TensorCoefficients, normalize: bool, rescale: bool,
                lambda_: float, t: float | None, order_stats: list | None) -> None:
        shape = slot.param.shape
        experts = (slot.task_vectors + slot.base).view(-1, *shape)
        if method == "slerp":
            kwargs = {"t": t}
        elif method == "linear":
            kwargs = {"weight": c.weight, "normalize": normalize}
        else:
            kwargs = {"weight": c.weight, "density": c.density, "gamma": c.gamma, "epsilon": c.epsilon,
                      "normalize": normalize, "rescale": rescale, "lambda_": lambda_, "order_stats": order_stats}
        merged = merge_tensor(method, slot.base.view(shape), experts, seed=self.seed, tensor_name=slot.name, **kwargs)
        slot.param.copy_(merged.view(shape))

    # ------------------------------------------------------------- buffers
    def _draws(self, slot: _Slot, densities: Sequence[float]) -> torch.Tensor:
        """(K, N) uniform draws behind the kernel's bernoulli masks: same generator, same order.

        Cached when `cache_random_draws` allows: all slots and all K experts at the first random
        candidate (later candidates, whatever their densities, only compare). Otherwise redrawn
        into a shared buffer. Each stream is drawn single-threaded, streams side by side on the pool.
        """
        numel = slot.base.numel()
        if self._cache_draws():
            if slot.draws is None:
                pending = [s for s in self.slots if s.draws is None]
                for s in pending:
                    s.draws = torch.empty_like(s.task_vectors)
                tasks = sorted(((s, k) for s in pending for k in range(self.num_experts)),
                               key=lambda task: -task[0].base.numel())
                self._ops.map_each(lambda task: self._draw_into(task[0], task[1], task[0].draws[task[1]]), tasks)
            return slot.draws
        buf = self._scratch.get("draws")
        if buf is None:
            buf = torch.empty((self.num_experts, max(s.base.numel() for s in self.slots)), dtype=torch.float32,
                              device=self.device)
            self._scratch["draws"] = buf
        draws = buf[:, :numel]
        for k, density in enumerate(densities):
            if density >= 1:  # the kernel draws nothing for an expert kept whole
                draws[k].zero_()
        drawn = [k for k, density in enumerate(densities) if density < 1]
        self._ops.map_each(lambda k: self._draw_into(slot, k, draws[k]), drawn)
        return draws

    def _draw_into(self, slot: _Slot, k: int, out: torch.Tensor) -> None:
        torch.rand(out.numel(), generator=mask_generator(self.seed, slot.name, k, self.device), out=out)

    def _cache_draws(self) -> bool:
        if self._draws_cached is None:
            if self.cache_random_draws == "auto":
                need = 4 * sum(s.task_vectors.numel() for s in self.slots)
                budget = min(self.random_draws_budget_bytes, _free_memory(self.device) // 2)
                self._draws_cached = need <= budget
            else:
                self._draws_cached = bool(self.cache_random_draws)
        return self._draws_cached

    @property
    def random_draws_bytes(self) -> int:
        """Memory the cached random draws take now (0 until a random merge has run with caching on)."""
        return sum(s.draws.numel() * 4 for s in self.slots if s.draws is not None)

    def _l1_norms(self, slot: _Slot) -> torch.Tensor:
        if slot.l1_norms is None:
            slot.l1_norms = torch.stack([finite_l1(tv) for tv in slot.task_vectors])
        return slot.l1_norms

    def _order_stats(self, slot: _Slot) -> list[MagnitudeOrderStats]:
        if slot.magnitude_stats is None:
            self._build_order_stats()
        return slot.magnitude_stats

    def _build_order_stats(self) -> None:
        """Sort every slot's |task vectors| once, on the worker pool (one sort per task, single-threaded).

        Done for all slots at the first magnitude-pruned candidate: the sorts dominate its cost, and
        many single-threaded sorts side by side keep a shared CPU busy where OpenMP's do not.
        """
        tasks = [(slot, k) for slot in self.slots if slot.magnitude_stats is None for k in range(self.num_experts)]
        tasks.sort(key=lambda task: -task[0].base.numel())  # big sorts first: the pool ends evenly

        def build(task: tuple[_Slot, int]) -> MagnitudeOrderStats:
            slot, k = task
            return order_stats_from_delta(slot.task_vectors[k].view(slot.param.shape), self.order_stats_grid)

        built = dict(zip([(id(slot), k) for slot, k in tasks], self._ops.map_each(build, tasks)))
        for slot in {id(slot): slot for slot, _ in tasks}.values():
            slot.magnitude_stats = [built[id(slot), k] for k in range(self.num_experts)]

    def _lookups(self, slot: _Slot) -> list["_RankLookup"]:
        if slot.lookups is None:
            slot.lookups = [_RankLookup.of(stats) for stats in self._order_stats(slot)]
        return slot.lookups

    def _exact_stats(self, slot: _Slot) -> bool:
        return self.order_stats_grid is None or slot.base.numel() <= self.order_stats_grid

    def _output_buffer(self, slot: _Slot) -> torch.Tensor:
        if slot.param.dtype == torch.float32 and slot.param.is_contiguous():
            return slot.param.view(-1)
        buf = self._scratch.get("out")
        if buf is None:
            buf = torch.empty(max(s.base.numel() for s in self.slots), dtype=torch.float32, device=self.device)
            self._scratch["out"] = buf
        return buf[: slot.base.numel()]

    def _commit(self, slot: _Slot, out: torch.Tensor) -> None:
        if out.data_ptr() != slot.param.data_ptr():
            slot.param.copy_(out.view(slot.param.shape))  # casts to the checkpoint dtype

    # ------------------------------------------------------------- exporting
    def merged_state(self) -> dict[str, torch.Tensor]:
        """The live model's merged tensors by checkpoint name (tied heads excluded), on CPU."""
        return {slot.name: slot.param.detach().to("cpu").clone() for slot in self.slots}


def order_stats_from_delta(delta: torch.Tensor, grid: int | None = 65536) -> MagnitudeOrderStats:
    """`MagnitudeOrderStats.from_delta`, equal to it, but sorting float32 magnitudes as int32 bit patterns.

    Non-negative floats order like their bit patterns (NaN after inf, as torch sorts floats),
    and torch sorts int32 with a radix sort: about 4x faster than the float sort on CPU, which
    made building the stats the bulk of the first magnitude-pruned candidate.
    """
    if delta.dtype != torch.float32:
        return MagnitudeOrderStats.from_delta(delta, grid=grid)
    magnitudes = delta.detach().abs().reshape(-1)
    n = magnitudes.numel()
    sorted_magnitudes = torch.sort(magnitudes.view(torch.int32)).values.view(torch.float32)
    if grid is None or n <= grid:
        return MagnitudeOrderStats(numel=n, values=sorted_magnitudes)
    if grid < 2:
        raise ValueError(f"grid must be >= 2 (or None for full stats); got {grid}")
    ranks = torch.linspace(0, n - 1, grid, dtype=torch.float64).round().long()
    return MagnitudeOrderStats(numel=n, values=sorted_magnitudes[ranks.to(delta.device)].clone(), ranks=ranks)


@dataclass(frozen=True)
class _RankLookup:
    """`MagnitudeOrderStats.value_at_rank` on numpy arrays: hundreds of lookups per candidate, no torch calls."""

    numel: int
    values: np.ndarray
    ranks: np.ndarray | None

    @classmethod
    def of(cls, stats: MagnitudeOrderStats) -> "_RankLookup":
        ranks = None if stats.ranks is None else stats.ranks.cpu().numpy()
        return cls(stats.numel, stats.values.detach().cpu().numpy(), ranks)

    def value_at_rank(self, rank: int, round: str = "down") -> float:
        if not 0 <= rank < self.numel:
            raise ValueError(f"rank must be in [0, {self.numel}); got {rank}")
        if self.ranks is None:
            return float(self.values[rank])
        side = "right" if round == "down" else "left"
        index = int(np.searchsorted(self.ranks, rank, side=side)) - (1 if round == "down" else 0)
        return float(self.values[index])


def _free_memory(device: torch.device) -> int:
    """Bytes free on the device now (CPU: MemAvailable; unknown: 0, which turns caching off)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _magnitude_lo(stats: "MagnitudeOrderStats | _RankLookup", density: float) -> float:
    """Grid-stats threshold of `sparsify.magnitude_mask`: keep |t| >= lo."""
    k = magnitude_keep_count(stats.numel, density)
    if k == 0:
        return math.inf
    if k == stats.numel:
        return -math.inf
    return stats.value_at_rank(stats.numel - k, "down")


def _outlier_bounds(stats: "MagnitudeOrderStats | _RankLookup", density: float, gamma: float) -> tuple[float, float]:
    """Grid-stats window of `sparsify.magnitude_outliers_mask` (default options): keep lo <= |t| <= hi."""
    n = stats.numel
    if density >= 1:
        return -math.inf, math.inf
    start, stop = outlier_window(n, density, gamma, keep_at_least_one=True)
    if start >= stop:
        return math.inf, -math.inf
    lo = stats.value_at_rank(start, "down") if start > 0 else -math.inf
    hi = stats.value_at_rank(stop - 1, "up") if stop < n else math.inf
    return lo, hi
