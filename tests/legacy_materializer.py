"""The in-memory materializer as it was before its memory modes (commit 027470c), frozen as the
reference of tests/test_memory_modes.py: base and task vectors resident in float32 on the device.

(Original docstring follows.) In-memory materializer: writes a candidate merge straight into a live `transformers` model.

The search scores thousands of candidates that differ only in their coefficients. So the base
weights and the experts' stacked task vectors (expert - base) are loaded once, in float32, on
`cuda` when present, and every candidate is computed into the parameters of one live model:
no disk I/O and no per-candidate allocation of model-sized tensors (fresh large allocations run
at a tenth of the memory bandwidth of in-place work on this class of machine).

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
from evomerge.merge.methods import MergeMethod, method_row
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
    """One merged tensor: where it lives in the live model and its stored inputs."""

    name: str
    position: TensorPosition
    param: torch.Tensor  # the live model's parameter (written in place)
    base: torch.Tensor  # (N,) float32 on device
    task_vectors: torch.Tensor  # (K, N) float32 on device
    magnitude_stats: list[MagnitudeOrderStats] | None = None  # built on first magnitude-pruned use
    l1_norms: torch.Tensor | None = None  # (K,) built on first rescaled use
    draws: torch.Tensor | None = None  # (K, N) cached uniform draws of the random sparsifier
    windows: WindowCache = field(default_factory=WindowCache)  # recent exact rank windows, by (expert, span)


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
    tensors: list[_StoredTensor]
    device: torch.device
    num_experts: int
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
    ) -> "Materializer":
        """Load the base model (through `transformers`) and the experts' task vectors once.

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
        tensors = []
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
            tensors.append(_StoredTensor(name, layer_map.position(name), param, base_t, tvs))
        base.close()
        for expert in experts:
            expert.close()
        if compile == "auto":
            compile = sum(s.task_vectors.numel() for s in tensors) >= AUTO_COMPILE_MIN_ELEMENTS
        return cls(model=model, layer_map=layer_map, tensors=tensors, device=device, num_experts=len(experts),
                   seed=seed, order_stats_grid=order_stats_grid, compile=bool(compile),
                   cache_random_draws=cache_random_draws, random_draws_budget_bytes=random_draws_budget_bytes,
                   num_threads=num_threads)

    @property
    def num_layers(self) -> int:
        return self.layer_map.num_layers

    @property
    def weight_bytes(self) -> int:
        """Bytes one candidate reads (base + task vectors, float32) and writes (the merged tensors)."""
        return sum((2 + self.num_experts) * s.base.numel() * 4 for s in self.tensors)

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
        with torch.no_grad(), torch_threads(self.num_threads):
            for stored in self.tensors:
                coeffs = coefficients(stored.name, stored.position)
                if len(coeffs.weight) != self.num_experts:
                    raise ValueError(f"tensor {stored.name!r}: {len(coeffs.weight)} weights for {self.num_experts} experts")
                self._apply_tensor(stored, row, coeffs, normalize, rescale, lambda_, t)
        return self.model

    def _apply_tensor(self, stored: _StoredTensor, row: MergeMethod, c: TensorCoefficients, normalize: bool,
                      rescale: bool, lambda_: float, t: float | None) -> None:
        if row.fused:
            self._merge_masked(stored, row, MaskedCoefficients(c.weight, c.density, c.gamma, normalize, rescale,
                                                               float(lambda_)))
        elif row.kernel == "task_arithmetic":  # DELLA: the kernel's stages on the stored deltas
            args = KernelArgs(weight=c.weight, density=c.density, epsilon=c.epsilon, normalize=normalize,
                              rescale=rescale, lambda_=lambda_, seed=self.seed, tensor_name=stored.name)
            shape = stored.param.shape
            merged = merge_task_vectors(stored.base.view(shape), stored.task_vectors.view(-1, *shape),
                                        TaskArithmeticRecipe.of(row), args, row.name)
            stored.param.copy_(merged)
        elif row.kernel == "linear" and normalize:
            total = sum(c.weight)
            if total == 0:
                raise ValueError(f"linear: weights {list(c.weight)} sum to 0 and cannot be normalized "
                                 f"(tensor {stored.name!r})")
            out = self._output_buffer(stored)  # sum_k w_k (base + tv_k) / W = base + sum_k (w_k / W) tv_k
            coefficients = torch.tensor([w / total for w in c.weight], dtype=torch.float32, device=self.device)
            self._ops.sum(stored.base, stored.task_vectors, coefficients, out)
            self._commit(stored, out)
        else:
            shape = stored.param.shape
            experts = (stored.task_vectors + stored.base).view(-1, *shape)
            kwargs = {"t": t} if row.kernel == "slerp" else {"weight": c.weight, "normalize": normalize}
            merged = merge_tensor(row.name, stored.base.view(shape), experts, seed=self.seed,
                                  tensor_name=stored.name, **kwargs)
            stored.param.copy_(merged.view(shape))

    def _merge_masked(self, stored: _StoredTensor, row: MergeMethod, coefficients: MaskedCoefficients) -> None:
        densities = coefficients.density
        pruned = densities is not None and any(d < 1 for d in densities)
        out = self._output_buffer(stored)
        merge_masked(
            self._ops, row, stored.base, stored.task_vectors, coefficients, out, seed=self.seed,
            tensor_name=stored.name,
            order_stats=self._order_stats(stored) if pruned and row.sparsifier != "random" else None,
            uniform_draws=self._draws(stored, densities) if pruned and row.sparsifier == "random" else None,
            l1_before=self._l1_norms(stored) if pruned and coefficients.rescale else None,
            window_cache=stored.windows,
            eager=self._small(stored),
        )
        self._commit(stored, out)

    # ------------------------------------------------------------- buffers
    def _draws(self, stored: _StoredTensor, densities: Sequence[float]) -> torch.Tensor:
        """(K, N) uniform draws behind the kernel's bernoulli masks: same generator, same order.

        Cached when `cache_random_draws` allows: all tensors and all K experts at the first random
        candidate (later candidates, whatever their densities, only compare). Otherwise redrawn
        into a shared buffer. Each stream is drawn single-threaded, streams side by side on the pool.
        """
        numel = stored.base.numel()
        if self._cache_draws():
            if stored.draws is None:
                pending = [s for s in self.tensors if s.draws is None]
                for s in pending:
                    s.draws = torch.empty_like(s.task_vectors)
                tasks = sorted(((s, k) for s in pending for k in range(self.num_experts)),
                               key=lambda task: -task[0].base.numel())
                self._ops.map_each(lambda task: self._draw_into(task[0], task[1], task[0].draws[task[1]]), tasks)
            return stored.draws
        buf = self._scratch.get("draws")
        if buf is None:
            buf = torch.empty((self.num_experts, max(s.base.numel() for s in self.tensors)), dtype=torch.float32,
                              device=self.device)
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
                need = 4 * sum(s.task_vectors.numel() for s in self.tensors)
                budget = min(self.random_draws_budget_bytes, _free_memory(self.device) // 2)
                self._draws_cached = need <= budget
            else:
                self._draws_cached = bool(self.cache_random_draws)
        return self._draws_cached

    @property
    def random_draws_bytes(self) -> int:
        """Memory the cached random draws take now (0 until a random merge has run with caching on)."""
        return sum(s.draws.numel() * 4 for s in self.tensors if s.draws is not None)

    def _l1_norms(self, stored: _StoredTensor) -> torch.Tensor:
        if stored.l1_norms is None:
            stored.l1_norms = l1_norms(self._ops, stored.task_vectors)
        return stored.l1_norms

    def _order_stats(self, stored: _StoredTensor) -> list[MagnitudeOrderStats]:
        if stored.magnitude_stats is None:
            self._build_order_stats()
        return stored.magnitude_stats

    def _build_order_stats(self) -> None:
        """Sort every stored's |task vectors| once, on the worker pool (one sort per task, single-threaded).

        Done for all tensors at the first magnitude-pruned candidate: the sorts dominate its cost, and
        many single-threaded sorts side by side keep a shared CPU busy where OpenMP's do not.
        """
        tasks = [(stored, k) for stored in self.tensors if stored.magnitude_stats is None for k in range(self.num_experts)]
        tasks.sort(key=lambda task: -task[0].base.numel())  # big sorts first: the pool ends evenly

        def build(task: tuple[_StoredTensor, int]) -> MagnitudeOrderStats:
            stored, k = task
            return MagnitudeOrderStats.from_delta(stored.task_vectors[k], self.order_stats_grid)

        built = dict(zip([(id(stored), k) for stored, k in tasks], self._ops.map_each(build, tasks)))
        for stored in {id(stored): stored for stored, _ in tasks}.values():
            stored.magnitude_stats = [built[id(stored), k] for k in range(self.num_experts)]

    def _small(self, stored: _StoredTensor) -> bool:
        """Tensors below 65,536 entries (or the grid) take the eager pass: a compiled call costs more."""
        return stored.base.numel() <= (self.order_stats_grid or 1 << 16)

    def _output_buffer(self, stored: _StoredTensor) -> torch.Tensor:
        if stored.param.dtype == torch.float32 and stored.param.is_contiguous():
            return stored.param.view(-1)
        buf = self._scratch.get("out")
        if buf is None:
            buf = torch.empty(max(s.base.numel() for s in self.tensors), dtype=torch.float32, device=self.device)
            self._scratch["out"] = buf
        return buf[: stored.base.numel()]

    def _commit(self, stored: _StoredTensor, out: torch.Tensor) -> None:
        if out.data_ptr() != stored.param.data_ptr():
            stored.param.copy_(out.view(stored.param.shape))  # casts to the checkpoint dtype

    # ------------------------------------------------------------- exporting
    def merged_state(self) -> dict[str, torch.Tensor]:
        """The live model's merged tensors by checkpoint name (tied heads excluded), on CPU."""
        return {stored.name: stored.param.detach().to("cpu").clone() for stored in self.tensors}


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
