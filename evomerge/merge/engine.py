"""Streaming merge of whole checkpoints to disk (`evomerge merge RECIPE.yaml --out DIR`).

One tensor name at a time across all models: read it from the base and each expert, stack the
experts as (K, *shape), merge, hand the result to the sharded writer. Peak memory is the K + 1
float32 copies of the largest tensor plus one output shard, never K whole state dicts (STYLE rule 6).

Two paths give the same numbers:
* the pure kernel (`kernels.merge_tensor`) for small tensors, other devices, dtypes and methods;
* the fused path for CPU tensors of at least `fused_min_elements` entries merged with
  task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs or breadcrumbs_ties. Safetensors
  are read with `pread` straight into two preallocated float32 buffers (base, K task vectors),
  so nothing stays mapped and nothing is allocated per tensor but the output. Top-k thresholds
  are exact but found without selecting over the whole tensor (`sparsify.rank_window`: sampled
  bracket, one counting pass, `kthvalue` on the small in-bracket subset; ties at a threshold are
  listed and dropped by flat index, as the pure kernel does). Then one fused pass per chunk
  (`fused.masked_block`, bit-identical to the pure kernel's stages) writes the output, and the
  few tied entries are recomputed with their exact masks. Chunks and experts are spread over a
  pool of threads running single-threaded torch ops (see `fused`), which keeps a shared CPU busy
  where OpenMP's per-op barriers stall.
"""
from __future__ import annotations

import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from evomerge._device import resolve_device
from evomerge.merge.checkpoint import ModelFolder, check_compatible, check_finite, parse_dtype, write_model
from evomerge.merge.fused import (
    FusedOps,
    MaskedMerge,
    masked_block,
    masked_l1_block,
    rescale_factors,
    weight_sum_divisor,
)
from evomerge.merge.kernels import TASK_ARITHMETIC_RECIPES, mask_generator, merge_tensor, method_defaults
from evomerge.merge.layers import LayerMap
from evomerge.merge.params import ParameterError, resolve_setting, to_bool, to_float
from evomerge.merge.outputs import (
    MODEL_MARKER,
    RECIPE_FILE,
    check_free_space,
    check_output_dir,
    marker_text,
    parse_shard_size,
    reads,
    writing_errors,
)
from evomerge.merge.recipe import LoadedRecipe, MergeRecipe, RecipeError, check_layers, load_recipe, resolve_model_path
from evomerge.merge.tokenizers import check_tokenizers
from evomerge.merge.sparsify import RESCALE_EPS, check_fraction, magnitude_keep_count, outlier_window, rank_window

PER_MODEL_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}
# Methods the fused path runs: a TASK_ARITHMETIC_RECIPES row with one of these sparsifiers and consensus.
FUSED_SPARSIFIERS = (None, "magnitude", "magnitude_outliers", "random")
FUSED_METHODS = tuple(m for m, r in TASK_ARITHMETIC_RECIPES.items()
                      if r.sparsifier in FUSED_SPARSIFIERS and r.consensus in (None, "sum"))
FUSED_MIN_ELEMENTS = 1 << 16  # below this the pure kernel is as fast and needs no setup
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in float32, as the kernels do
FUSED_CHUNK_SIZE = 1 << 16  # entries per expert row in one fused block (cache-sized)


@dataclass
class MergeReport:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float


@dataclass
class ResolvedTensorParams:
    """Everything the kernel needs for one tensor besides the tensors themselves."""

    weight: list[float] | None
    density: list[float] | None
    gamma: list[float] | None
    epsilon: list[float] | None
    shared: dict[str, Any]


def resolve_tensor_params(recipe: MergeRecipe, tensor_name: str, t: float, source: str = "<recipe>") -> ResolvedTensorParams:
    """Per-expert and shared parameters for one tensor, with mergekit's precedence and defaults."""
    method = recipe.merge_method
    global_params = recipe.parameters or {}
    defaults = method_defaults(method)

    def per_model(name: str) -> list[float] | None:
        from evomerge.merge.recipe import MODEL_PARAMETERS

        if name not in MODEL_PARAMETERS[method]:
            return None
        values = []
        for entry in recipe.experts():
            index = next(i for i, model in enumerate(recipe.models) if model is entry)  # as the recipe numbers it
            value = None
            for scope_name, scope in ((f"models[{index}].parameters", entry.parameters or {}), ("parameters", global_params)):
                if name in scope:
                    try:
                        value = resolve_setting(scope[name], tensor_name, t, field=f"{scope_name}.{name}", cast=to_float)
                    except (ParameterError, ValueError, TypeError) as exc:
                        raise RecipeError(f"{source}: {exc}") from None
                    if value is not None:
                        break
            if value is None:
                if name not in PER_MODEL_DEFAULTS:
                    raise RecipeError(
                        f"{source}: field `models[{index}].parameters.{name}`: no entry matches tensor {tensor_name!r} "
                        f"and {name} has no default; end the list with an entry without a filter"
                    )
                value = PER_MODEL_DEFAULTS[name]
            values.append(value)
        return values

    shared: dict[str, Any] = {}
    for name, cast in (("normalize", to_bool), ("rescale", to_bool), ("lambda", to_float), ("t", to_float)):
        if name in global_params:
            try:
                shared[name] = resolve_setting(global_params[name], tensor_name, t, field=f"parameters.{name}", cast=cast)
            except (ParameterError, ValueError, TypeError) as exc:
                raise RecipeError(f"{source}: {exc}") from None
        if shared.get(name) is None and name in defaults:
            shared[name] = defaults[name]
    return ResolvedTensorParams(
        weight=per_model("weight"),
        density=per_model("density"),
        gamma=per_model("gamma"),
        epsilon=per_model("epsilon"),
        shared=shared,
    )


def merge_recipe(
    recipe: str | os.PathLike | dict | LoadedRecipe,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | str = "5GB",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    fused_min_elements: int | None = FUSED_MIN_ELEMENTS,
    workers: int | None = None,
) -> MergeReport:
    """Merge the models a recipe names and write a Hugging Face folder to `out_dir` atomically.

    `allow_nonfinite`: merge models holding NaN / inf instead of raising `NonFiniteError` (each
    non-finite entry then stays at its own position in both paths: see `fused`).
    `fused_min_elements`: CPU tensors with at least this many entries take the fused path (None:
    none do). `workers`: threads of the fused path (default: torch's thread count); while they
    run, torch ops are single-threaded, and the previous thread count is restored after each pass.
    `overwrite`: replace an existing `out_dir` if a merge wrote it (`outputs.check_output_dir`);
    `out_dir` is never one of the inputs. Argument errors are `OptionError`s naming the argument.
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)  # checks every value
    spec, source = loaded.recipe, loaded.source
    # Every argument, the output location and the gradients are checked before any tensor is read.
    device = resolve_device(device, field="device")
    shard_bytes = parse_shard_size(max_shard_bytes, field="max_shard_bytes")
    compute_dtype = parse_dtype(spec.dtype, field_name=f"{source}: dtype")
    out_dtype = parse_dtype(spec.out_dtype, field_name=f"{source}: out_dtype") or compute_dtype

    expert_entries = spec.experts()
    base_ref = spec.base_model or expert_entries[0].model
    base_path = resolve_model_path(base_ref, loaded)
    expert_paths = [resolve_model_path(e.model, loaded) for e in expert_entries]
    inputs = [("base model", base_path)] if spec.base_model else []
    inputs += [(f"model {e.model!r}", path) for e, path in zip(expert_entries, expert_paths)]
    out_dir = check_output_dir(out_dir, inputs=inputs, overwrite=overwrite, field="out_dir")
    opened = dict(allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    base = ModelFolder.open(base_path, **opened)
    check_layers(loaded, LayerMap.from_config(base.config, spec.layer_pattern).num_layers)
    experts = [ModelFolder.open(path, **opened) for path in expert_paths]
    check_tokenizers(base.path, [e.path for e in experts])
    names = check_compatible(base, experts)
    layer_map = LayerMap.from_config(base.config, spec.layer_pattern)
    for name in names:  # fail before any work if a tensor cannot be placed or a parameter has no value for it
        layer_map.position(name)
        if base.dtype(name).is_floating_point:
            resolve_tensor_params(spec, name, layer_map.depth_fraction(name), source)
    check_free_space(out_dir, _output_bytes(base, names, out_dtype), field="out_dir")

    started = time.perf_counter()
    fused = _FusedMerger.for_recipe(spec, base, experts, names, compute_dtype, torch.device(device),
                                    fused_min_elements, workers)

    def merged_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        bar = tqdm(names, desc="merging", unit="tensor", disable=not progress, dynamic_ncols=True)
        for name in bar:
            if fused is not None and fused.takes(name):
                merged = fused.merge(name, resolve_tensor_params(spec, name, layer_map.depth_fraction(name), source))
                yield name, merged.to(dtype=out_dtype or merged.dtype)
                continue
            base_tensor = base.get_tensor(name, device=device, dtype=compute_dtype)
            if not base_tensor.is_floating_point():
                yield name, base_tensor
                continue
            stacked = torch.empty((len(experts), *base_tensor.shape), dtype=base_tensor.dtype, device=base_tensor.device)
            for k, expert in enumerate(experts):
                stacked[k].copy_(expert.get_tensor(name, device=device))
            params = resolve_tensor_params(spec, name, layer_map.depth_fraction(name), source)
            merged = merge_tensor(
                spec.merge_method,
                base_tensor,
                stacked,
                weight=params.weight,
                density=params.density,
                gamma=params.gamma,
                epsilon=params.epsilon,
                normalize=params.shared.get("normalize"),
                rescale=params.shared.get("rescale"),
                lambda_=params.shared.get("lambda", 1.0),
                t=params.shared.get("t"),
                seed=spec.seed,
                tensor_name=name,
            )
            del stacked
            yield name, merged.to(dtype=out_dtype or merged.dtype)

    try:
        with writing_errors(out_dir, field="out_dir"):  # disk full, permissions: named as out_dir
            write_model(
                out_dir,
                reads(merged_tensors()),
                base=base,
                max_shard_bytes=shard_bytes,
                dtype=out_dtype,
                overwrite=overwrite,
                extra_files={RECIPE_FILE: spec.to_yaml(), MODEL_MARKER: marker_text()},
            )
    finally:
        if fused is not None:
            fused.close()
        base.close()
        for expert in experts:
            expert.close()
    total = sum((out_dir / f).stat().st_size for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    return MergeReport(out_dir=out_dir, tensors=len(names), bytes_written=total, seconds=time.perf_counter() - started)


def _output_bytes(base: ModelFolder, names: Sequence[str], out_dtype: torch.dtype | None) -> int:
    """Bytes of the merged weights, from the headers: floating tensors in `out_dtype` (else as stored)."""
    total = 0
    for name in names:
        dtype = base.dtype(name)
        if dtype.is_floating_point and out_dtype is not None:
            dtype = out_dtype
        total += math.prod(base.shape(name)) * dtype.itemsize
    return total


# ----------------------------------------------------------------------------- reading without mmap

_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _TensorReader:
    """Reads one tensor of a safetensors model folder into a caller's buffer with `os.preadv`.

    Memory-mapped reads leave every page they touched counted in the process's resident memory
    until the map closes, and need a copy out of the map; `preadv` copies from the page cache
    straight into the destination. (This belongs in `checkpoint.ModelFolder`; it lives here
    until that module grows a read-into-buffer method.)
    """

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self._files: dict[str, tuple[int, int, dict]] = {}  # file -> (fd, data offset, header)

    def _entry(self, name: str) -> tuple[int, int, dict]:
        stored = name if name in self.folder.weight_map else self.folder.aliases[name]
        file = self.folder.weight_map[stored]
        if file not in self._files:
            fd = os.open(self.folder.path / file, os.O_RDONLY)
            try:
                (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, length, 8))
            except Exception:
                os.close(fd)
                raise
            self._files[file] = (fd, 8 + length, header)
        fd, data_start, header = self._files[file]
        if stored not in header:
            raise ValueError(f"{self.folder.path / file}: tensor {stored!r} is in the index but not in the file")
        return fd, data_start, header[stored]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype if it is floating point, else None."""
        return _SAFETENSORS_FLOATS.get(self._entry(name)[2]["dtype"])

    def read(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, of the stored dtype and element count) with the stored bytes."""
        fd, data_start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        if end - begin != len(view):
            raise ValueError(f"{self.folder.path}: tensor {name!r} holds {end - begin} bytes, expected {len(view)}")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], data_start + begin + done)
            if got <= 0:
                raise ValueError(f"{self.folder.path}: unexpected end of file reading tensor {name!r}")
            done += got

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


# ----------------------------------------------------------------------------- the fused path

class _FusedMerger:
    """The fused path of one `merge_recipe` call: readers, two reused float32 buffers, the worker pool."""

    def __init__(self, spec: MergeRecipe, readers: list[_TensorReader], eligible: dict[str, int],
                 compute_dtype: torch.dtype | None, workers: int | None):
        self.spec = spec
        self.recipe = TASK_ARITHMETIC_RECIPES[spec.merge_method]
        self.readers = readers  # base, then experts
        self.eligible = eligible  # name -> numel
        self.compute_dtype = compute_dtype
        self.k = len(readers) - 1
        self.ops = FusedOps(compile=False, workers=workers, chunk_size=FUSED_CHUNK_SIZE)
        largest = max(eligible.values())
        self._base = torch.empty(largest, dtype=torch.float32)
        self._tvs = torch.empty(self.k * largest, dtype=torch.float32)
        self._staging: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def for_recipe(cls, spec: MergeRecipe, base: ModelFolder, experts: Sequence[ModelFolder], names: Sequence[str],
                   compute_dtype: torch.dtype | None, device: torch.device, min_elements: int | None,
                   workers: int | None) -> "_FusedMerger | None":
        """The fused path for this merge, or None when no tensor takes it."""
        if (min_elements is None or device.type != "cpu" or spec.merge_method not in FUSED_METHODS
                or base.is_pickle or any(e.is_pickle for e in experts)
                or (compute_dtype is not None and compute_dtype not in FUSED_DTYPES)):
            return None
        readers = [_TensorReader(folder) for folder in (base, *experts)]
        eligible = {}
        for name in names:
            numel = math.prod(base.shape(name))
            if numel >= max(1, min_elements) and all(r.dtype(name) in FUSED_DTYPES for r in readers):
                eligible[name] = numel
        if not eligible:
            for reader in readers:
                reader.close()
            return None
        return cls(spec, readers, eligible, compute_dtype, workers)

    def takes(self, name: str) -> bool:
        return name in self.eligible

    def close(self) -> None:
        self.ops.close()
        for reader in self.readers:
            reader.close()

    def _read(self, reader: _TensorReader, name: str, out: torch.Tensor, dtype: torch.dtype) -> None:
        """out (float32) = the stored tensor cast to `dtype` (the compute dtype), then to float32."""
        stored = reader.dtype(name)
        if stored == torch.float32 and dtype == torch.float32:
            reader.read(name, out)
            return
        staging = self._staging.get(stored)
        if staging is None:
            staging = self._staging[stored] = torch.empty(self._base.numel(), dtype=stored)
        staging = staging[: out.numel()]
        reader.read(name, staging)
        out.copy_(staging if dtype == stored else staging.to(dtype))

    def merge(self, name: str, params: ResolvedTensorParams) -> torch.Tensor:
        """The merged tensor `name` in the compute dtype (the base's stored dtype when the recipe sets none)."""
        dtype = self.compute_dtype or self.readers[0].dtype(name)
        n = self.eligible[name]
        base = self._base[:n]
        experts = self._tvs[: self.k * n].view(self.k, n)
        for reader, target in zip(self.readers, [base, *experts]):
            self._read(reader, name, target, dtype)
        if not self.readers[0].folder.allow_nonfinite:  # one chunked pass on the pool, as ModelFolder checks
            for reader, target, finite in zip(self.readers, [base, *experts], self.ops.rows_finite([base, *experts])):
                if not finite:
                    folder = reader.folder
                    check_finite(target.view(folder.shape(name)), folder.file_of(name), folder.stored_name(name))
        out = torch.empty(n, dtype=torch.float32)
        merge_fused(self.ops, self.recipe.sparsifier, self.recipe.consensus is not None, base, experts, params,
                    self.spec.seed, name, out)
        out = out.view(self.readers[0].folder.shape(name))
        return out if dtype == torch.float32 else out.to(dtype)


def merge_fused(ops: FusedOps, sparsifier: str | None, consensus: bool, base: torch.Tensor, experts: torch.Tensor,
                params: ResolvedTensorParams, seed: int, name: str, out: torch.Tensor) -> None:
    """out (N,) = `generalized_task_arithmetic` of base (N,) and experts (K, N), float32, in fused passes.

    `experts` is turned into the task vectors in place. The masks are the pure kernel's exactly
    (exact rank windows, the same generators) and the stages run in its order, so the result is
    bit-identical but for the L1 rescale's summation order.
    """
    k, n = experts.shape
    weights = [float(w) for w in params.weight]
    densities = [float(d) for d in (params.density or [1.0] * k)]
    gammas = [float(g) for g in (params.gamma or [0.01] * k)]
    for index in range(k):
        if not math.isfinite(weights[index]):
            raise ValueError(f"weight[{index}] must be finite; got {weights[index]} (tensor {name!r})")
        check_fraction(densities[index], f"density[{index}]", name)
        check_fraction(gammas[index], f"gamma[{index}]", name)
    lam = float(params.shared.get("lambda", 1.0))
    if not math.isfinite(lam):
        raise ValueError(f"lambda_ must be finite; got {lam} (tensor {name!r})")

    tvs = experts
    ops.map_chunks(lambda s, e, _: tvs[:, s:e].sub_(base[s:e]), n)  # (K, N) task vectors, as task_vectors()
    masked = [sparsifier is not None and d < 1 for d in densities]  # density 1 leaves a delta untouched
    pruned = [i for i in range(k) if masked[i]]

    lo = hi = keep_p = draws = None
    drops = [torch.zeros(0, dtype=torch.long)] * k
    if sparsifier in ("magnitude", "magnitude_outliers") and pruned:
        def window(index: int):
            if sparsifier == "magnitude":
                start, stop = n - magnitude_keep_count(n, densities[index]), n
            else:
                start, stop = outlier_window(n, densities[index], gammas[index], keep_at_least_one=True)
            return rank_window(tvs[index], start, stop)

        windows = dict(zip(pruned, ops.map_each(window, pruned)))
        lo = [windows[i].lo if i in windows else -math.inf for i in range(k)]
        hi = [windows[i].hi if i in windows else math.inf for i in range(k)]
        drops = [windows[i].drop if i in windows else drops[i] for i in range(k)]
    elif sparsifier == "random" and pruned:
        draws = torch.zeros((k, n), dtype=torch.bool)  # True = dropped, compared as draws with keep_p 0.5
        keep_p = [0.5 if m else 2.0 for m in masked]

        def draw(index: int) -> None:
            # Chunk by chunk from the expert's own generator: the same stream as one torch.rand(n).
            generator = mask_generator(seed, name, index)
            uniform = torch.empty(min(n, FUSED_CHUNK_SIZE), dtype=torch.float32)
            for s in range(0, n, uniform.numel()):
                chunk = uniform[: min(uniform.numel(), n - s)]
                torch.rand(chunk.numel(), generator=generator, out=chunk)
                torch.ge(chunk, densities[index], out=draws[index, s:s + chunk.numel()])

        ops.map_each(draw, pruned)

    def column(values: Sequence[float] | None, neutral: float) -> torch.Tensor | None:
        if values is None or all(v == neutral for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32)

    plan = MaskedMerge(weight=torch.tensor(weights, dtype=torch.float32), lo=column(lo, -math.inf),
                       hi=column(hi, math.inf), keep_p=column(keep_p, 2.0), lam=lam,
                       plain_divisor=weight_sum_divisor(weights), consensus=consensus,
                       normalize=bool(params.shared.get("normalize")))
    if bool(params.shared.get("rescale")) and plan.masks:
        before, after = _l1_norms(ops, plan, tvs, draws, drops)
        scale = rescale_factors(before, after, RESCALE_EPS)
        plan = plan.replace_scale(torch.where(torch.tensor(masked), scale, torch.ones_like(scale)))
    ops.masked(plan, base, tvs, draws, out)

    if any(drop.numel() for drop in drops):  # entries tied at a threshold: recompute them with exact masks
        patch = torch.unique(torch.cat(drops))
        dropped = torch.stack([torch.isin(patch, drop).float() for drop in drops])  # (K, P) 1 = drop
        exact = MaskedMerge(plan.weight, plan.lo, plan.hi, torch.full((k,), 0.5), plan.scale, plan.lam,
                            plan.plain_divisor, plan.consensus, plan.normalize)
        patched = torch.empty(patch.numel(), dtype=torch.float32)
        masked_block(exact, base[patch], tvs[:, patch], dropped, patched)
        out[patch] = patched


def _l1_norms(ops: FusedOps, plan: MaskedMerge, tvs: torch.Tensor, draws: torch.Tensor | None,
              drops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) L1 norms of the task vectors before and after masking (float32, summed in float64)."""
    whole = MaskedMerge(plan.weight)

    def block(start: int, stop: int, scratch) -> torch.Tensor:
        part = tvs[:, start:stop]
        part_draws = None if draws is None else draws[:, start:stop]
        return torch.stack([masked_l1_block(whole, part, None, scratch).double(),
                            masked_l1_block(plan, part, part_draws, scratch).double()])

    before, after = torch.stack(ops.map_chunks(block, tvs.shape[1])).sum(0)
    for index, drop in enumerate(drops):  # tied entries the thresholds keep but the window drops
        if drop.numel():
            after[index] -= tvs[index, drop].abs().double().sum()
    return before.float(), after.float()
