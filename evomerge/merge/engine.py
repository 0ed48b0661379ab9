"""Streaming merge of whole checkpoints to disk (`evomerge merge RECIPE.yaml --out DIR`).

One tensor name at a time across all models: read it from the base and each expert, stack the
experts as (K, *shape), merge, hand the result to the sharded writer. Peak memory is the K + 1
float32 copies of the largest tensor plus one output shard, never K whole state dicts (STYLE rule 6).

Two paths give the same numbers:
* the pure kernel (`kernels.merge_tensor`) for small tensors, other devices, dtypes and methods;
* the fused path for CPU tensors of at least `fused_min_elements` entries merged with a method
  whose row says `fused` (`methods.METHODS`). Safetensors are read with `pread`
  (`checkpoint.SafetensorsReader`) straight into two preallocated float32 buffers (base, K task
  vectors), so nothing stays mapped and nothing is allocated per tensor but the output; then the
  planner the materializer also runs (`masked.merge_masked`: exact rank windows from a sampled
  bracket, the kernels' random draws, fused passes split where a threshold tie is cut) writes the output.
  Chunks and experts are spread over a pool of threads running single-threaded torch ops (see
  `fused`), which keeps a shared CPU busy where OpenMP's per-op barriers stall.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from evomerge._device import resolve_device
from evomerge.merge.checkpoint import (
    ModelFolder,
    SafetensorsReader,
    check_compatible,
    check_finite,
    parse_dtype,
    write_model,
)
from evomerge.merge.fused import FusedOps
from evomerge.merge.kernels import merge_tensor
from evomerge.merge.layers import LayerMap
from evomerge.merge.masked import MaskedCoefficients, merge_masked
from evomerge.merge.methods import METHODS, method_row
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

FUSED_METHODS = tuple(name for name, row in METHODS.items() if row.fused)  # the rows `merge_masked` runs
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
    """Everything the kernel needs for one tensor besides the tensors themselves.

    Per-expert lists are None for parameters the method does not read; `settings` holds the
    method's global settings by recipe name (`normalize`, `rescale`, `lambda`, `t`), defaults filled in.
    """

    weight: list[float] | None
    density: list[float] | None
    gamma: list[float] | None
    epsilon: list[float] | None
    settings: dict[str, Any]

    def masked_coefficients(self) -> MaskedCoefficients:
        """The coefficients `masked.merge_masked` takes."""
        return MaskedCoefficients(self.weight, self.density, self.gamma, bool(self.settings.get("normalize")),
                                  bool(self.settings.get("rescale")), float(self.settings.get("lambda", 1.0)))


def resolve_tensor_params(recipe: MergeRecipe, tensor_name: str, t: float, source: str = "<recipe>") -> ResolvedTensorParams:
    """Per-expert and global parameters for one tensor, with mergekit's precedence and the row's defaults."""
    row = method_row(recipe.merge_method)
    global_params = recipe.parameters or {}
    numbered = [(index, model) for index, model in enumerate(recipe.models)]  # as the recipe numbers them

    def per_model(name: str) -> list[float] | None:
        parameter = row.per_model.get(name)
        if parameter is None:
            return None
        values = []
        for entry in recipe.experts():
            index = next(i for i, model in numbered if model is entry)
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
                if parameter.default is None:
                    raise RecipeError(
                        f"{source}: field `models[{index}].parameters.{name}`: no entry matches tensor {tensor_name!r} "
                        f"and {name} has no default; end the list with an entry without a filter"
                    )
                value = float(parameter.default)
            values.append(value)
        return values

    settings: dict[str, Any] = {}
    for name, parameter in row.settings.items():
        if name == "int8_mask":
            continue
        cast = to_bool if parameter.kind == "bool" else to_float
        if name in global_params:
            try:
                settings[name] = resolve_setting(global_params[name], tensor_name, t, field=f"parameters.{name}", cast=cast)
            except (ParameterError, ValueError, TypeError) as exc:
                raise RecipeError(f"{source}: {exc}") from None
        if settings.get(name) is None and parameter.default is not None:
            settings[name] = parameter.default
    return ResolvedTensorParams(
        weight=per_model("weight"),
        density=per_model("density"),
        gamma=per_model("gamma"),
        epsilon=per_model("epsilon"),
        settings=settings,
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
                normalize=params.settings.get("normalize"),
                rescale=params.settings.get("rescale"),
                lambda_=params.settings.get("lambda"),
                t=params.settings.get("t"),
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


# ----------------------------------------------------------------------------- the fused path

class _FusedMerger:
    """The fused path of one `merge_recipe` call: readers, two reused float32 buffers, the worker pool."""

    def __init__(self, spec: MergeRecipe, readers: list[SafetensorsReader], eligible: dict[str, int],
                 compute_dtype: torch.dtype | None, workers: int | None):
        self.spec = spec
        self.row = METHODS[spec.merge_method]
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
        readers = [SafetensorsReader(folder) for folder in (base, *experts)]
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

    def _read(self, reader: SafetensorsReader, name: str, out: torch.Tensor, dtype: torch.dtype) -> None:
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
        tvs = experts
        self.ops.map_chunks(lambda s, e, _: tvs[:, s:e].sub_(base[s:e]), n)  # (K, N) task vectors, as task_vectors()
        merge_masked(self.ops, self.row, base, tvs, params.masked_coefficients(), out, seed=self.spec.seed,
                     tensor_name=name)
        out = out.view(self.readers[0].folder.shape(name))
        return out if dtype == torch.float32 else out.to(dtype)
