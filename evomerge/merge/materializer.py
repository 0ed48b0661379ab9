"""In-memory materializer: writes a candidate merge straight into a live `transformers` model.

The search scores thousands of candidates that differ only in their coefficients. So the base
weights and the experts are loaded once (`cuda` when present) and every candidate is computed into
the parameters of one live model: no per-candidate allocation of model-sized tensors (fresh large
allocations run at a tenth of the memory bandwidth of in-place work on this class of machine).
Where base and experts are kept is the memory mode (`tensor_store`): `resident` on the device in
the checkpoint's dtype, `host` in (pinned) host memory streamed to the device tensor by tensor,
`disk` memory-mapped from a one-time cache; `memory="auto"` takes the first that fits the device's
free memory and the host's (`memory_plan`). Each tensor is merged from float32 views of its base and
task vectors, the same bits in every mode, so every mode writes the same candidate.

Paths, each tested bit-equal to `evomerge merge` of the same recipe (the pure kernels, or the
planner it shares with us):
- methods whose row says `fused` (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
  breadcrumbs_ties): the planner of `evomerge.merge.masked` on the stored task vectors. Magnitude
  thresholds are exact: per-expert order statistics are sorted once (`MagnitudeOrderStats`, a
  grid of `order_stats_grid` ranks per tensor), so a candidate counts, in one compiled pass, which
  blocks hold entries between the two grid values around its rank and selects only over those;
  the last windows of each tensor are kept for candidates whose densities repeat. DARE's uniform draws come from the
  kernels' own generators, seeded by (seed, tensor, expert): the same for every candidate
  (common random numbers, which makes candidates comparable), so they are drawn once and kept
  when memory allows (`cache_random_draws`); later candidates only compare them with their densities.
- DELLA: the kernel's own stages on the stored task vectors (`kernels.merge_task_vectors`).
- linear and slerp: the pure kernel on base + task vector (normalized linear: one fused
  multiply-add pass), equal to `evomerge merge` up to float rounding of base + (expert - base).

Every stored tensor is checked for NaN / inf once, as it is loaded (`ModelFolder.get_tensor`), so
candidates cost nothing more; `allow_nonfinite=True` loads them anyway, and then every path treats
them as the pure kernels do (see `fused`). The tokenizers are compared first (`check_tokenizers`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from evomerge._device import default_device
from evomerge.merge.checkpoint import ModelFolder, check_compatible
from evomerge.merge.fused import FusedOps, torch_threads
from evomerge.merge.kernels import KernelArgs, TaskArithmeticRecipe, mask_generator, merge_task_vectors, merge_tensor
from evomerge.merge.layers import LayerMap, TensorPosition
from evomerge.merge.masked import MaskedCoefficients, WindowCache, l1_norms, merge_masked
from evomerge.merge.memory_plan import free_memory
from evomerge.merge.methods import MergeMethod, method_row
from evomerge.merge.tensor_store import MODES, TensorStore
from evomerge.merge.tokenizers import check_tokenizers
from evomerge.merge.sparsify import MagnitudeOrderStats
# Below this many stored elements, compiling costs more than it saves.
AUTO_COMPILE_MIN_ELEMENTS = 20_000_000
# `cache_random_draws="auto"` keeps the draws when they fit in this budget (and in half the free memory).
DEFAULT_RANDOM_DRAWS_BUDGET = 8 * 2**30
# Ranks of each expert's sorted |task vector| kept per tensor (tensors at most this large keep all).
DEFAULT_ORDER_STATS_GRID = 1 << 16


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
class _StoredTensor:
    """One merged tensor: where it lives in the live model, its block in the store, and its caches."""

    name: str
    position: TensorPosition
    param: torch.Tensor  # the live model's parameter (written in place)
    index: int  # its block in the TensorStore
    numel: int
    store: TensorStore = field(repr=False)
    magnitude_stats: list[MagnitudeOrderStats] | None = None  # built on first magnitude-pruned use
    l1_norms: torch.Tensor | None = None  # (K,) built on first rescaled use
    draws: torch.Tensor | None = None  # (K, N) cached uniform draws of the random sparsifier
    windows: WindowCache = field(default_factory=WindowCache)  # recent exact rank windows, by (expert, span)

    @property
    def base(self) -> torch.Tensor:
        """(N,) float32 copy of the base (for inspection; candidates stream it from the store)."""
        return self.store.float32(self.index)[0]

    @property
    def task_vectors(self) -> torch.Tensor:
        """(K, N) float32 copy of the task vectors (for inspection; candidates stream them from the store)."""
        return self.store.float32(self.index)[1]


class MaterializerOutOfMemory(RuntimeError):
    """The device ran out of memory while one candidate was written; the materializer stays usable."""


@dataclass
class Materializer:
    """Holds a base model and its experts (in one memory mode); materialises candidates in place.

    `Materializer.from_folders(base_dir, expert_dirs)`, then `apply(method, ...)` writes the
    merge into `self.model` (a live `transformers` model in eval mode) and returns it.

    `cache_random_draws` (True, False or "auto"): keep DARE's uniform draws after the first
    candidate. They cost 4 bytes per stored task-vector element (K x parameters x 4 bytes) and
    save regenerating them (the dominant cost of a dare_* candidate on CPU). "auto" caches when
    the memory mode is `resident` and that fits in `random_draws_budget_bytes` (default 8 GiB) and
    in half the device's free memory at the first random merge.
    `num_threads` sets torch's thread count while a candidate is written (None: unchanged);
    on a shared CPU, 1 avoids OpenMP stalls on every fused op.
    """

    model: torch.nn.Module
    layer_map: LayerMap
    tensors: list[_StoredTensor]
    device: torch.device
    num_experts: int
    store: TensorStore
    seed: int = 0
    order_stats_grid: int | None = DEFAULT_ORDER_STATS_GRID
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

    @property
    def memory(self) -> str:
        """The memory mode in use: resident, host or disk."""
        return self.store.mode

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
        order_stats_grid: int | None = DEFAULT_ORDER_STATS_GRID,
        compile: bool | str = "auto",
        cache_random_draws: bool | str = "auto",
        random_draws_budget_bytes: int = DEFAULT_RANDOM_DRAWS_BUDGET,
        num_threads: int | None = None,
        memory: str = "auto",
        method: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        host_share: float = 1.0,
    ) -> "Materializer":
        """Load the base model (through `transformers`) and the experts once, in memory mode `memory`.

        `memory`: "resident", "host", "disk" or "auto" (the first that fits now, per
        `memory_plan.choose_mode`, for merge method `method`, None: the most demanding; the host's
        free memory counts `host_share` of it, e.g. 1 / workers on this machine). A named mode that
        does not fit still loads (the caller asked for it). `cache_dir`: where the disk mode's cache
        lives (default `tensor_store.default_cache_dir()`).
        `compile="auto"` compiles the fused paths with `torch.compile` when the model is large
        enough for that to pay off; `order_stats_grid` is how many ranks of each expert's sorted
        |task vector| are kept per tensor (default 65,536, at most one per 256 entries: 12 bytes each,
        so at most 0.8 MB per expert and tensor and under 2% of the task vectors; a
        candidate's thresholds then cost one compiled counting pass over each pruned expert's
        tensor and a selection over the few entries between two grid values. None keeps all of
        it, as much memory again as the task vectors, for thresholds by binary search).
        Thresholds are exact either way (see `MagnitudeOrderStats`).
        A NaN / inf in any model raises `NonFiniteError` naming the file and tensor, unless
        `allow_nonfinite`.
        """
        from transformers import AutoModelForCausalLM

        from evomerge.merge.memory_plan import ModelShapes, choose_for_device

        device = default_device(device)
        opened = dict(allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
        base = ModelFolder.open(base_dir, **opened)
        experts = [ModelFolder.open(p, **opened) for p in expert_dirs]
        if not experts:
            raise ValueError("Materializer needs at least one expert")
        check_tokenizers(base.path, [e.path for e in experts])
        check_compatible(base, experts)
        layer_map = LayerMap.from_config(base.config, layer_pattern)
        if memory == "auto":
            shapes = ModelShapes.from_folder(base, len(experts))
            memory = choose_for_device(shapes, method, device, host_share=host_share,
                                       order_stats_grid=order_stats_grid).chosen
        if memory not in MODES:
            raise ValueError(f"memory must be 'auto' or one of {', '.join(MODES)}; got {memory!r}")

        dtype = base.dtype(base.tensor_names()[0])
        # The loading path users run on big checkpoints; remote code stays off.
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=False).to(device)
        model.eval()
        merged = []
        for name, param in model.named_parameters(remove_duplicate=False):
            if not base.has_tensor(name):
                raise ValueError(f"{base.path}: the model class expects tensor {name!r} but the checkpoint lacks it")
            if name in base.aliases:  # a tied head shares storage with the embedding, which is merged
                continue
            param.requires_grad_(False)
            if device.type == "cpu":
                # transformers may leave CPU parameters mapped from the checkpoint file, committed page by
                # page as the first candidate writes them; a private copy commits the live model now, so the
                # memory it takes is there from the start (and the file is no longer mapped).
                param.data = param.data.clone()
            merged.append((name, param))
        store = TensorStore.load(memory, base, experts, [name for name, _ in merged], device, cache_dir=cache_dir)
        tensors = [_StoredTensor(name, layer_map.position(name), param, i, store.numels[i], store)
                   for i, (name, param) in enumerate(merged)]
        base.close()
        for expert in experts:
            expert.close()
        if compile == "auto":
            compile = len(experts) * sum(s.numel for s in tensors) >= AUTO_COMPILE_MIN_ELEMENTS
        return cls(model=model, layer_map=layer_map, tensors=tensors, device=device, num_experts=len(experts),
                   store=store, seed=seed, order_stats_grid=order_stats_grid, compile=bool(compile),
                   cache_random_draws=cache_random_draws, random_draws_budget_bytes=random_draws_budget_bytes,
                   num_threads=num_threads)

    @property
    def num_layers(self) -> int:
        return self.layer_map.num_layers

    @property
    def weight_bytes(self) -> int:
        """Bytes one candidate reads (base + task vectors, float32) and writes (the merged tensors)."""
        return sum((2 + self.num_experts) * s.numel * 4 for s in self.tensors)

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
        row = method_row(method)
        defaults = row.defaults()
        normalize = bool(defaults.get("normalize", False)) if normalize is None else bool(normalize)
        rescale = bool(defaults.get("rescale", False)) if rescale is None else bool(rescale)
        current = None
        try:
            with torch.no_grad(), torch_threads(self.num_threads):
                for i, base, tvs in self.store.stream():
                    current = self.tensors[i]
                    coeffs = coefficients(current.name, current.position)
                    if len(coeffs.weight) != self.num_experts:
                        raise ValueError(f"tensor {current.name!r}: {len(coeffs.weight)} weights for "
                                         f"{self.num_experts} experts")
                    self._apply_tensor(current, base, tvs, row, coeffs, normalize, rescale, lambda_, t)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc, method, current) from None
        return self.model

    def _out_of_memory(self, exc: Exception, method: str, stored: _StoredTensor | None) -> MaterializerOutOfMemory:
        """Free what this candidate may have left half-built, so the next candidate can run; the error to raise."""
        dropped = self.random_draws_bytes
        for s in self.tensors:
            s.draws = None
        if self._draws_cached:
            self._draws_cached = False  # the cache is what grows between candidates: stop keeping it
        self._scratch.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        where = f"tensor {stored.name!r}" if stored is not None else "the first tensor"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        note = f"; dropped the {dropped / 1e9:.2f} GB random-draws cache" if dropped else ""
        return MaterializerOutOfMemory(f"out of {self.device} memory writing {where} of a {method} candidate "
                                       f"(memory mode {self.memory}): {reason}{note}")

    def _apply_tensor(self, stored: _StoredTensor, base: torch.Tensor, tvs: torch.Tensor, row: MergeMethod,
                      c: TensorCoefficients, normalize: bool, rescale: bool, lambda_: float, t: float | None) -> None:
        """Merge one tensor from float32 base (N,) and task vectors (K, N) into its live parameter."""
        if row.fused:
            self._merge_masked(stored, base, tvs, row, MaskedCoefficients(c.weight, c.density, c.gamma, normalize,
                                                                          rescale, float(lambda_)))
        elif row.kernel == "task_arithmetic":  # DELLA: the kernel's stages on the stored deltas
            args = KernelArgs(weight=c.weight, density=c.density, epsilon=c.epsilon, normalize=normalize,
                              rescale=rescale, lambda_=lambda_, seed=self.seed, tensor_name=stored.name)
            shape = stored.param.shape
            merged = merge_task_vectors(base.view(shape), tvs.view(-1, *shape), TaskArithmeticRecipe.of(row), args,
                                        row.name)
            stored.param.copy_(merged)
        elif row.kernel == "linear" and normalize:
            total = sum(c.weight)
            if total == 0:
                raise ValueError(f"linear: weights {list(c.weight)} sum to 0 and cannot be normalized "
                                 f"(tensor {stored.name!r})")
            out = self._output_buffer(stored)  # sum_k w_k (base + tv_k) / W = base + sum_k (w_k / W) tv_k
            coefficients = torch.tensor([w / total for w in c.weight], dtype=torch.float32, device=self.device)
            self._ops.sum(base, tvs, coefficients, out)
            self._commit(stored, out)
        else:
            shape = stored.param.shape
            experts = (tvs + base).view(-1, *shape)
            kwargs = {"t": t} if row.kernel == "slerp" else {"weight": c.weight, "normalize": normalize}
            merged = merge_tensor(row.name, base.view(shape), experts, seed=self.seed,
                                  tensor_name=stored.name, **kwargs)
            stored.param.copy_(merged.view(shape))

    def _merge_masked(self, stored: _StoredTensor, base: torch.Tensor, tvs: torch.Tensor, row: MergeMethod,
                      coefficients: MaskedCoefficients) -> None:
        densities = coefficients.density
        pruned = densities is not None and any(d < 1 for d in densities)
        out = self._output_buffer(stored)
        merge_masked(
            self._ops, row, base, tvs, coefficients, out, seed=self.seed,
            tensor_name=stored.name,
            order_stats=self._order_stats(stored, tvs) if pruned and row.sparsifier != "random" else None,
            uniform_draws=self._draws(stored, densities) if pruned and row.sparsifier == "random" else None,
            l1_before=self._l1_norms(stored, tvs) if pruned and coefficients.rescale else None,
            window_cache=stored.windows,
            eager=self._small(stored),
        )
        self._commit(stored, out)

    # ------------------------------------------------------------- buffers
    def _draws(self, stored: _StoredTensor, densities: Sequence[float]) -> torch.Tensor:
        """(K, N) uniform draws behind the kernel's bernoulli masks: same generator, same order.

        Cached when `cache_random_draws` allows: each tensor's K streams at the first random
        candidate (later candidates, whatever their densities, only compare). Otherwise redrawn
        into a shared buffer. Each stream is drawn single-threaded, streams side by side on the pool.
        """
        numel = stored.numel
        if self._cache_draws():
            if stored.draws is None:
                draws = torch.empty((self.num_experts, numel), dtype=torch.float32, device=self.device)
                self._ops.map_each(lambda k: self._draw_into(stored, k, draws[k]), range(self.num_experts))
                stored.draws = draws
            return stored.draws
        buf = self._scratch.get("draws")
        if buf is None:
            buf = torch.empty((self.num_experts, self.store.max_numel), dtype=torch.float32, device=self.device)
            self._scratch["draws"] = buf
        draws = buf[:, :numel]
        for k, density in enumerate(densities):
            if density >= 1:  # the kernel draws nothing for an expert kept whole
                draws[k].zero_()
        drawn = [k for k, density in enumerate(densities) if density < 1]
        self._ops.map_each(lambda k: self._draw_into(stored, k, draws[k]), drawn)
        return draws

    def _draw_into(self, stored: _StoredTensor, k: int, out: torch.Tensor) -> None:
        torch.rand(out.numel(), generator=mask_generator(self.seed, stored.name, k, self.device), out=out)

    def _cache_draws(self) -> bool:
        if self._draws_cached is None:
            if self.cache_random_draws == "auto":
                # Only the resident mode has room to spare on the device: the others exist because it has none.
                need = 4 * self.num_experts * sum(s.numel for s in self.tensors)
                budget = min(self.random_draws_budget_bytes, free_memory(self.device) // 2)
                self._draws_cached = self.memory == "resident" and need <= budget
            else:
                self._draws_cached = bool(self.cache_random_draws)
        return self._draws_cached

    @property
    def random_draws_bytes(self) -> int:
        """Memory the cached random draws take now (0 until a random merge has run with caching on)."""
        return sum(s.draws.numel() * 4 for s in self.tensors if s.draws is not None)

    def _l1_norms(self, stored: _StoredTensor, tvs: torch.Tensor) -> torch.Tensor:
        if stored.l1_norms is None:
            stored.l1_norms = l1_norms(self._ops, tvs)
        return stored.l1_norms

    def _order_stats(self, stored: _StoredTensor, tvs: torch.Tensor) -> list[MagnitudeOrderStats]:
        """Each expert's sorted |task vector| of this tensor, built at its first magnitude-pruned candidate
        (one sort per expert, side by side on the worker pool, single-threaded: many single-threaded sorts
        keep a shared CPU busy where OpenMP's do not)."""
        if stored.magnitude_stats is None:
            stored.magnitude_stats = self._ops.map_each(lambda k: self._sorted(tvs[k]), range(self.num_experts))
        return stored.magnitude_stats

    @property
    def sorts_on_host(self) -> bool:
        """True when order statistics are sorted on the host: the streaming modes on a GPU."""
        return self.memory != "resident" and self.device.type != "cpu"

    def _sorted(self, delta: torch.Tensor) -> MagnitudeOrderStats:
        """`MagnitudeOrderStats.from_delta`; in the streaming modes on a GPU the sort runs on the host, where
        those modes have room (a sort needs 28 bytes per entry: 3.7 GB for a 7B model's embedding), and only
        the values kept move to the device. A sort is exact, so the statistics are the same bits either way."""
        if not self.sorts_on_host:
            return MagnitudeOrderStats.from_delta(delta, self.order_stats_grid)
        stats = MagnitudeOrderStats.from_delta(delta.to("cpu"), self.order_stats_grid)
        return dataclasses.replace(stats, values=stats.values.to(self.device))

    def _small(self, stored: _StoredTensor) -> bool:
        """Tensors below 65,536 entries (or the grid) take the eager pass: a compiled call costs more."""
        return stored.numel <= (self.order_stats_grid or 1 << 16)

    def _output_buffer(self, stored: _StoredTensor) -> torch.Tensor:
        if stored.param.dtype == torch.float32 and stored.param.is_contiguous():
            return stored.param.view(-1)
        buf = self._scratch.get("out")
        if buf is None:
            buf = torch.empty(self.store.max_numel, dtype=torch.float32, device=self.device)
            self._scratch["out"] = buf
        return buf[: stored.numel]

    def _commit(self, stored: _StoredTensor, out: torch.Tensor) -> None:
        if out.data_ptr() != stored.param.data_ptr():
            stored.param.copy_(out.view(stored.param.shape))  # casts to the checkpoint dtype

    def close(self) -> None:
        """Release the store (the disk mode's map) and the worker pool; the live model stays usable."""
        self.store.close()
        self._ops.close()

    # ------------------------------------------------------------- exporting
    def merged_state(self) -> dict[str, torch.Tensor]:
        """The live model's merged tensors by checkpoint name (tied heads excluded), on CPU."""
        return {stored.name: stored.param.detach().to("cpu").clone() for stored in self.tensors}


