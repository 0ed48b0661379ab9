"""Search spaces: a genome (a real vector in a box) <-> a merge recipe.

A space fixes the merge method, the granularity of the coefficients (one value for the whole
network, one per block of N layers, or one per layer), which parameters are searched (weight,
density, gamma, epsilon) with their bounds, optional tensor-name components (attention vs MLP vs
the rest, as mergekit `filter` entries) and fixed method settings (normalize, lambda, ...).

Decoding goes one way, through a mergekit-style recipe: genome -> `MergeRecipe` (per-expert
gradient lists, one anchor per layer, wrapped in filters when components are searched). The
in-memory materializer's coefficients are then *resolved from that recipe* with the same code
`evomerge merge` uses, so the model the search scores and the model a user rebuilds from the
exported YAML (with `evomerge merge` or `mergekit-yaml`) are the same by construction.

Genes are laid out layer-major: all genes of slot 0 (the first block), then slot 1, ... so a
split point between slots (M2N2 crossover) exchanges whole depth ranges; `gene_slots` gives each
gene's slot.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from evomerge.merge.engine import resolve_tensor_params
from evomerge.merge.layers import LayerMap, TensorPosition
from evomerge.merge.materializer import CoefficientFn, TensorCoefficients
from evomerge.merge.recipe import GLOBAL_PARAMETERS, MODEL_PARAMETERS, MergeRecipe, load_recipe

SEARCHABLE = ("weight", "density", "gamma", "epsilon")
GRANULARITIES = ("global", "block", "layer")
# Component name -> mergekit filter substring. Order matters: the first matching filter wins.
COMPONENT_FILTERS = {"attention": "self_attn", "mlp": "mlp"}
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "search_spaces"


class SearchSpaceError(ValueError):
    """A search-space file or genome that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float


@dataclass(frozen=True)
class SearchSpace:
    """A merge method plus which coefficients are searched, at what granularity, within what bounds."""

    name: str
    method: str
    granularity: str = "layer"
    block_size: int = 1
    parameters: Mapping[str, Bounds] = field(default_factory=dict)
    components: tuple[str, ...] = ()  # e.g. ("attention", "mlp"); "rest" is implied when non-empty
    settings: Mapping[str, Any] = field(default_factory=dict)  # fixed global method parameters
    description: str = ""

    # ------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<search space>") -> "SearchSpace":
        known = {"name", "method", "granularity", "block_size", "parameters", "components", "settings", "description"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SearchSpaceError(f"{source}: field `{unknown[0]}` is not supported; fields: {sorted(known)}")
        for required in ("name", "method", "parameters"):
            if required not in data:
                raise SearchSpaceError(f"{source}: field `{required}` is required")
        method = data["method"]
        if method not in MODEL_PARAMETERS:
            raise SearchSpaceError(f"{source}: field `method`: unknown method {method!r}; valid: {sorted(MODEL_PARAMETERS)}")
        granularity = data.get("granularity", "layer")
        if granularity not in GRANULARITIES:
            raise SearchSpaceError(f"{source}: field `granularity`: {granularity!r} is not one of {list(GRANULARITIES)}")
        block_size = int(data.get("block_size", 1))
        if block_size < 1:
            raise SearchSpaceError(f"{source}: field `block_size` must be >= 1, got {block_size}")
        if granularity != "block" and "block_size" in data:
            raise SearchSpaceError(f"{source}: field `block_size` only applies to granularity `block`")
        params: dict[str, Bounds] = {}
        raw_params = data["parameters"]
        if not isinstance(raw_params, Mapping) or not raw_params:
            raise SearchSpaceError(f"{source}: field `parameters` must map parameter names to bounds")
        for pname, spec in raw_params.items():
            where = f"{source}: field `parameters.{pname}`"
            if pname not in SEARCHABLE:
                raise SearchSpaceError(f"{where}: not searchable; searchable: {list(SEARCHABLE)}")
            if pname not in MODEL_PARAMETERS[method]:
                raise SearchSpaceError(f"{where}: {method!r} has no such parameter; it takes {sorted(MODEL_PARAMETERS[method])}")
            if not isinstance(spec, Mapping) or set(spec) != {"low", "high"}:
                raise SearchSpaceError(f"{where}: expected {{low: ..., high: ...}}, got {spec!r}")
            low, high = float(spec["low"]), float(spec["high"])
            if not low < high:
                raise SearchSpaceError(f"{where}: low {low} must be below high {high}")
            if pname in ("density", "gamma", "epsilon") and not (0.0 <= low and high <= 1.0):
                raise SearchSpaceError(f"{where}: bounds must lie in [0, 1], got [{low}, {high}]")
            params[pname] = Bounds(low, high)
        if "weight" in MODEL_PARAMETERS[method] and "weight" not in params:
            raise SearchSpaceError(f"{source}: field `parameters.weight` is required for {method!r}")
        components = tuple(data.get("components") or ())
        for comp in components:
            if comp not in COMPONENT_FILTERS:
                raise SearchSpaceError(f"{source}: field `components`: unknown component {comp!r}; valid: {list(COMPONENT_FILTERS)}")
        settings = dict(data.get("settings") or {})
        for key in settings:
            if key not in GLOBAL_PARAMETERS[method]:
                raise SearchSpaceError(
                    f"{source}: field `settings.{key}` is not a setting of {method!r}; valid: {sorted(GLOBAL_PARAMETERS[method])}"
                )
        return cls(name=str(data["name"]), method=method, granularity=granularity, block_size=block_size,
                   parameters=params, components=components, settings=settings,
                   description=str(data.get("description", "")))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "SearchSpace":
        """Load a preset by name (e.g. `ties_per_layer`) or a YAML file by path."""
        path = resolve_preset(name_or_path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SearchSpaceError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(data, Mapping):
            raise SearchSpaceError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "method": self.method, "granularity": self.granularity}
        if self.granularity == "block":
            data["block_size"] = self.block_size
        data["parameters"] = {k: {"low": b.low, "high": b.high} for k, b in self.parameters.items()}
        if self.components:
            data["components"] = list(self.components)
        if self.settings:
            data["settings"] = dict(self.settings)
        if self.description:
            data["description"] = self.description
        return data

    # ---------------------------------------------------------------- layout
    def bind(self, num_layers: int, num_experts: int) -> "BoundSpace":
        """Fix the network depth and expert count, giving the genome layout."""
        if num_experts < 1:
            raise SearchSpaceError(f"search space {self.name!r}: needs at least one expert")
        if self.method == "slerp" and num_experts != 1:
            raise SearchSpaceError(f"search space {self.name!r}: slerp merges the base with exactly one expert")
        if self.granularity == "global":
            slot_of_layer = [0] * num_layers
        elif self.granularity == "block":
            slot_of_layer = [layer // self.block_size for layer in range(num_layers)]
        else:
            slot_of_layer = list(range(num_layers))
        return BoundSpace(self, num_layers, num_experts, tuple(slot_of_layer))


@dataclass(frozen=True)
class BoundSpace:
    """A search space for one concrete (depth, expert count): genome size, bounds and decoders."""

    space: SearchSpace
    num_layers: int
    num_experts: int
    slot_of_layer: tuple[int, ...]

    @property
    def num_slots(self) -> int:
        return max(self.slot_of_layer) + 1

    @property
    def groups(self) -> tuple[str, ...]:
        """Tensor groups with their own genes: the listed components plus 'rest', or one 'all'."""
        return (*self.space.components, "rest") if self.space.components else ("all",)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.space.parameters)

    @property
    def dim(self) -> int:
        return self.num_slots * len(self.groups) * len(self.param_names) * self.num_experts

    def _gene_index(self, slot: int, group: int, param: int, expert: int) -> int:
        return ((slot * len(self.groups) + group) * len(self.param_names) + param) * self.num_experts + expert

    @property
    def bounds(self) -> np.ndarray:
        """(dim, 2) array of [low, high] per gene."""
        out = np.empty((self.dim, 2))
        for slot in range(self.num_slots):
            for g in range(len(self.groups)):
                for p, pname in enumerate(self.param_names):
                    b = self.space.parameters[pname]
                    for k in range(self.num_experts):
                        out[self._gene_index(slot, g, p, k)] = (b.low, b.high)
        return out

    @property
    def gene_slots(self) -> np.ndarray:
        """(dim,) slot (block / layer index) of each gene, non-decreasing: where crossovers may split."""
        per_slot = len(self.groups) * len(self.param_names) * self.num_experts
        return np.repeat(np.arange(self.num_slots), per_slot)

    def gene_names(self) -> list[str]:
        names = [""] * self.dim
        for slot in range(self.num_slots):
            for g, group in enumerate(self.groups):
                for p, pname in enumerate(self.param_names):
                    for k in range(self.num_experts):
                        names[self._gene_index(slot, g, p, k)] = f"slot{slot}.{group}.{pname}.expert{k}"
        return names

    def check(self, genome: np.ndarray) -> np.ndarray:
        genome = np.asarray(genome, dtype=np.float64)
        if genome.shape != (self.dim,):
            raise SearchSpaceError(f"search space {self.space.name!r}: genome has shape {genome.shape}, expected ({self.dim},)")
        if not np.all(np.isfinite(genome)):
            raise SearchSpaceError(f"search space {self.space.name!r}: genome has non-finite values")
        b = self.bounds
        outside = np.flatnonzero((genome < b[:, 0] - 1e-9) | (genome > b[:, 1] + 1e-9))
        if outside.size:
            i = int(outside[0])
            raise SearchSpaceError(f"gene {self.gene_names()[i]} = {genome[i]} is outside [{b[i, 0]}, {b[i, 1]}]")
        return genome

    def task_level_genome(self, values: Mapping[str, Sequence[float]]) -> np.ndarray:
        """The genome giving every slot and group the same per-expert values: {param: (K,)}.
        Parameters left out take the middle of their bounds; values are clipped to the bounds."""
        genome = np.empty(self.dim)
        for p, pname in enumerate(self.param_names):
            b = self.space.parameters[pname]
            given = values.get(pname)
            per_expert = (np.full(self.num_experts, (b.low + b.high) / 2) if given is None
                          else np.asarray(given, dtype=np.float64))
            if per_expert.shape != (self.num_experts,):
                raise SearchSpaceError(f"search space {self.space.name!r}: {pname} needs {self.num_experts} values, "
                                       f"got shape {per_expert.shape}")
            for slot in range(self.num_slots):
                for g in range(len(self.groups)):
                    for k in range(self.num_experts):
                        genome[self._gene_index(slot, g, p, k)] = np.clip(per_expert[k], b.low, b.high)
        return genome

    def corner_genomes(self, max_count: int | None = None) -> np.ndarray:
        """The merges a person tries first, as genomes: every expert subset at weight 1 (weight 0
        for the rest) -- the base, each expert alone, each pair, ..., all of them (uniform task
        arithmetic). Ordered by subset size, so the first ``max_count`` keep the smallest subsets
        and the all-experts merge is added last when it would be cut. (n, dim)"""
        if "weight" not in self.param_names:
            raise SearchSpaceError(f"search space {self.space.name!r} does not search `weight`; no corner genomes")
        K = self.num_experts
        subsets = sorted(itertools.product((0.0, 1.0), repeat=K), key=lambda w: (sum(w), [-x for x in w]))
        if max_count is not None and len(subsets) > max_count:
            subsets = subsets[: max(1, max_count - 1)] + [(1.0,) * K]
        return np.stack([self.task_level_genome({"weight": w}) for w in subsets])

    def per_layer(self, genome: np.ndarray) -> dict[str, np.ndarray]:
        """{param: array (groups, K, L)}: each gene expanded to the layers of its slot."""
        genome = self.check(genome)
        out = {}
        for p, pname in enumerate(self.param_names):
            arr = np.empty((len(self.groups), self.num_experts, self.num_layers))
            for g in range(len(self.groups)):
                for layer, slot in enumerate(self.slot_of_layer):
                    for k in range(self.num_experts):
                        arr[g, k, layer] = genome[self._gene_index(slot, g, p, k)]
            out[pname] = arr
        return out

    # ------------------------------------------------------------- decoders
    def recipe(self, genome: np.ndarray, base_model: str, experts: Sequence[str], *, dtype: str | None = None,
               seed: int = 0) -> MergeRecipe:
        """The mergekit-style recipe this genome stands for (per-layer gradient lists, filters per component)."""
        if len(experts) != self.num_experts:
            raise SearchSpaceError(f"{len(experts)} expert paths for a space bound to {self.num_experts} experts")
        values = self.per_layer(genome)
        models: list[dict[str, Any]] = [{"model": str(base_model)}] if self.space.method != "linear" else []
        for k, expert in enumerate(experts):
            params = {}
            for pname, arr in values.items():
                settings = [_gradient(arr[g, k]) for g in range(len(self.groups))]
                if self.space.components:
                    entries = [{"filter": COMPONENT_FILTERS[c], "value": settings[g]}
                               for g, c in enumerate(self.space.components)]
                    entries.append({"value": settings[-1]})
                    params[pname] = entries
                else:
                    params[pname] = settings[0]
            models.append({"model": str(expert), "parameters": params})
        data: dict[str, Any] = {"merge_method": self.space.method, "models": models}
        if self.space.method != "linear":
            data["base_model"] = str(base_model)
        if self.space.settings:
            data["parameters"] = dict(self.space.settings)
        if dtype:
            data["dtype"] = dtype
        if seed:
            data["seed"] = int(seed)
        return load_recipe(data, source=f"search space {self.space.name!r}").recipe

    def recipe_yaml(self, genome: np.ndarray, base_model: str, experts: Sequence[str], **kwargs) -> str:
        return self.recipe(genome, base_model, experts, **kwargs).to_yaml()

    def shared_settings(self) -> dict[str, Any]:
        """Fixed method settings as materializer keywords (normalize, rescale, lambda_, t)."""
        out = {}
        for key, value in self.space.settings.items():
            out["lambda_" if key == "lambda" else key] = value
        return out

    def coefficients(self, genome: np.ndarray, layer_map: LayerMap) -> CoefficientFn:
        """Materializer coefficients resolved from `recipe(genome)`, exactly as `evomerge merge` resolves them."""
        placeholders = [f"expert_{k}" for k in range(self.num_experts)]
        recipe = self.recipe(genome, "base", placeholders)
        cache: dict[str, TensorCoefficients] = {}

        def resolve(tensor_name: str, position: TensorPosition) -> TensorCoefficients:
            if tensor_name not in cache:
                p = resolve_tensor_params(recipe, tensor_name, layer_map.depth_fraction(tensor_name))
                cache[tensor_name] = TensorCoefficients(
                    weight=tuple(p.weight) if p.weight is not None else (1.0,) * self.num_experts,
                    density=tuple(p.density) if p.density is not None and "density" in self.param_names else None,
                    gamma=tuple(p.gamma) if p.gamma is not None and "gamma" in self.param_names else None,
                    epsilon=tuple(p.epsilon) if p.epsilon is not None and "epsilon" in self.param_names else None,
                )
            return cache[tensor_name]

        return resolve


def _gradient(values: np.ndarray) -> float | list[float]:
    """A mergekit setting for per-layer values: a scalar when constant, else one anchor per layer."""
    values = [float(v) for v in values]
    if all(v == values[0] for v in values):
        return values[0]
    return values


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SearchSpaceError(f"{path}: search space file not found")
        return path
    # A project's own ./search_spaces/ shadows the packaged presets of the same name.
    for candidate in (Path.cwd() / "search_spaces" / f"{name_or_path}.yaml", PRESET_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise SearchSpaceError(f"unknown search space {str(name_or_path)!r}; presets: {preset_names()}")
