"""Search spaces: a genome (a real vector in a box) <-> a merge recipe.

A space fixes the merge method, the granularity of the coefficients (one value for the whole
network, one per block of N layers, or one per layer), which parameters are searched (weight,
density, gamma, epsilon) with their bounds, optional tensor-name components (attention vs MLP vs
the rest, as mergekit `filter` entries) and fixed method settings (normalize, lambda, ...).

A genome is decoded once per candidate, on the worker, into a `DecodedGenome`: per parameter and
expert, the setting exactly as a mergekit recipe writes it (a scalar, or one gradient anchor per
layer, inside `filter` entries when components are searched). Both products come from that one
structure: the materializer's per-tensor coefficients, resolved by the same pure function
`evomerge merge` uses (`merge.params.resolve_setting`), and the recipe that travels back in the
evaluation record for the log and `export`. So the model the search scores and the model a user
rebuilds from the exported YAML (with `evomerge merge` or `mergekit-yaml`) are the same by
construction, with no YAML or validation on the per-candidate path.

Genes are laid out block-major: all genes of block 0, then block 1, ... (a block is one layer,
a group of `block_size` layers, or the whole stack), so a split point between blocks (M2N2
crossover) exchanges whole depth ranges; `gene_blocks` gives each gene's block.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from evomerge.merge.layers import LayerMap, TensorPosition
from evomerge.merge.materializer import CoefficientFn, TensorCoefficients
from evomerge.merge.params import resolve_setting, to_float
from evomerge.merge.methods import METHODS, method_row
from evomerge.merge.recipe import MergeRecipe, load_recipe

SEARCHABLE = ("weight", "density", "gamma", "epsilon")
GRANULARITIES = ("global", "block", "layer", "curve")
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
    control_points: int = 3  # granularity `curve`: anchors of each depth curve
    parameters: Mapping[str, Bounds] = field(default_factory=dict)
    components: tuple[str, ...] = ()  # e.g. ("attention", "mlp"); "rest" is implied when non-empty
    settings: Mapping[str, Any] = field(default_factory=dict)  # fixed global method parameters
    description: str = ""

    # ------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<search space>") -> "SearchSpace":
        known = {"name", "method", "granularity", "block_size", "control_points", "parameters", "components", "settings",
                 "description"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SearchSpaceError(f"{source}: field `{unknown[0]}` is not supported; fields: {sorted(known)}")
        for required in ("name", "method", "parameters"):
            if required not in data:
                raise SearchSpaceError(f"{source}: field `{required}` is required")
        method = data["method"]
        if method not in METHODS:
            raise SearchSpaceError(f"{source}: field `method`: unknown method {method!r}; valid: {sorted(METHODS)}")
        row = method_row(method)  # what the method takes, its defaults and valid ranges
        granularity = data.get("granularity", "layer")
        if granularity not in GRANULARITIES:
            raise SearchSpaceError(f"{source}: field `granularity`: {granularity!r} is not one of {list(GRANULARITIES)}")
        block_size = int(data.get("block_size", 1))
        if block_size < 1:
            raise SearchSpaceError(f"{source}: field `block_size` must be >= 1, got {block_size}")
        if granularity != "block" and "block_size" in data:
            raise SearchSpaceError(f"{source}: field `block_size` only applies to granularity `block`")
        control_points = int(data.get("control_points", 3))
        if control_points < 2:
            raise SearchSpaceError(f"{source}: field `control_points` must be >= 2, got {control_points}")
        if granularity != "curve" and "control_points" in data:
            raise SearchSpaceError(f"{source}: field `control_points` only applies to granularity `curve`")
        params: dict[str, Bounds] = {}
        raw_params = data["parameters"]
        if not isinstance(raw_params, Mapping) or not raw_params:
            raise SearchSpaceError(f"{source}: field `parameters` must map parameter names to bounds")
        for pname, spec in raw_params.items():
            where = f"{source}: field `parameters.{pname}`"
            if pname not in SEARCHABLE:
                raise SearchSpaceError(f"{where}: not searchable; searchable: {list(SEARCHABLE)}")
            rule = row.per_model.get(pname)
            if rule is None:
                raise SearchSpaceError(f"{where}: {method!r} has no such parameter; it takes {sorted(row.per_model)}")
            if not isinstance(spec, Mapping) or set(spec) != {"low", "high"}:
                raise SearchSpaceError(f"{where}: expected {{low: ..., high: ...}}, got {spec!r}")
            low, high = float(spec["low"]), float(spec["high"])
            if not low < high:
                raise SearchSpaceError(f"{where}: low {low} must be below high {high}")
            if not (rule.low <= low and high <= rule.high):
                raise SearchSpaceError(f"{where}: bounds must lie in [{rule.low:g}, {rule.high:g}], got [{low}, {high}]")
            params[pname] = Bounds(low, high)
        if "weight" in row.per_model and "weight" not in params:
            raise SearchSpaceError(f"{source}: field `parameters.weight` is required for {method!r}")
        components = tuple(data.get("components") or ())
        for comp in components:
            if comp not in COMPONENT_FILTERS:
                raise SearchSpaceError(f"{source}: field `components`: unknown component {comp!r}; valid: {list(COMPONENT_FILTERS)}")
        settings = dict(data.get("settings") or {})
        for key in settings:
            if key not in row.settings:
                raise SearchSpaceError(
                    f"{source}: field `settings.{key}` is not a setting of {method!r}; valid: {sorted(row.settings)}")
        return cls(name=str(data["name"]), method=method, granularity=granularity, block_size=block_size,
                   control_points=control_points,
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
        if self.granularity == "curve":
            data["control_points"] = self.control_points
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
            block_of_layer = [0] * num_layers
        elif self.granularity == "block":
            block_of_layer = [layer // self.block_size for layer in range(num_layers)]
        elif self.granularity == "layer":
            block_of_layer = list(range(num_layers))
        else:  # curve: genes are anchors along depth, not layers
            if self.control_points > max(2, num_layers):
                raise SearchSpaceError(f"search space {self.name!r}: {self.control_points} control points for a model "
                                       f"of {num_layers} layers; use at most {max(2, num_layers)}")
            block_of_layer = []
        return BoundSpace(self, num_layers, num_experts, tuple(block_of_layer))


@dataclass(frozen=True)
class DecodedGenome:
    """One candidate, decoded once: what the materializer needs and what the log and `export` record.

    `settings[param][k]` is expert k's setting for `param`, exactly as the recipe writes it (a
    scalar, or one gradient anchor per layer, inside {filter, value} entries when components are
    searched); `shared` holds the space's fixed method settings (normalize, lambda, ...)."""

    method: str
    num_experts: int
    settings: Mapping[str, tuple[Any, ...]]
    shared: Mapping[str, Any]
    components: tuple[str, ...] = ()  # the searched components, whose filters the settings hold

    def coefficients(self, layer_map: LayerMap) -> CoefficientFn:
        """Per-tensor coefficients, resolved as `evomerge merge` resolves the recipe (`resolve_setting`
        at the tensor's depth fraction), each tensor once."""
        # A setting's value depends on the tensor only through its depth fraction and the first
        # component filter its name contains, so tensors sharing both share one resolution.
        filters = [COMPONENT_FILTERS[c] for c in self.components]
        cache: dict[tuple[float, int], TensorCoefficients] = {}
        unit = (1.0,) * self.num_experts

        def resolve(tensor_name: str, position: TensorPosition) -> TensorCoefficients:
            t = layer_map.depth_fraction(tensor_name)
            key = (t, next((i for i, f in enumerate(filters) if f in tensor_name), len(filters)))
            if key not in cache:
                values = {param: tuple(resolve_setting(setting, tensor_name, t, field=param, cast=to_float)
                                       for setting in per_expert)
                          for param, per_expert in self.settings.items()}
                cache[key] = TensorCoefficients(weight=values.get("weight", unit), density=values.get("density"),
                                                gamma=values.get("gamma"), epsilon=values.get("epsilon"))
            return cache[key]

        return resolve

    def materializer_settings(self) -> dict[str, Any]:
        """The fixed method settings as `Materializer.apply` keywords (`lambda` is `lambda_` there)."""
        return {("lambda_" if key == "lambda" else key): value for key, value in self.shared.items()}

    def recipe(self, base_model: str, experts: Sequence[str], *, dtype: str | None = None,
               seed: int = 0) -> dict[str, Any]:
        """The mergekit-style recipe (plain data) this candidate stands for."""
        if len(experts) != self.num_experts:
            raise SearchSpaceError(f"{len(experts)} expert paths for a genome of {self.num_experts} experts")
        models: list[dict[str, Any]] = [{"model": str(base_model)}] if self.method != "linear" else []
        for k, expert in enumerate(experts):
            models.append({"model": str(expert),
                           "parameters": {param: per_expert[k] for param, per_expert in self.settings.items()}})
        data: dict[str, Any] = {"merge_method": self.method, "models": models}
        if self.method != "linear":
            data["base_model"] = str(base_model)
        if self.shared:
            data["parameters"] = dict(self.shared)
        if dtype:
            data["dtype"] = dtype
        if seed:
            data["seed"] = int(seed)
        return data


@dataclass(frozen=True)
class BoundSpace:
    """A search space for one concrete (depth, expert count): genome size, bounds and the decoder."""

    space: SearchSpace
    num_layers: int
    num_experts: int
    block_of_layer: tuple[int, ...]  # empty for granularity `curve`

    @property
    def method(self) -> str:
        return self.space.method

    @property
    def is_curve(self) -> bool:
        return self.space.granularity == "curve"

    @property
    def num_blocks(self) -> int:
        """Gene groups along depth: blocks of layers, or a curve's control points."""
        return self.space.control_points if self.is_curve else max(self.block_of_layer) + 1

    @property
    def groups(self) -> tuple[str, ...]:
        """Tensor groups with their own genes: the listed components plus 'rest', or one 'all'."""
        return (*self.space.components, "rest") if self.space.components else ("all",)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.space.parameters)

    @property
    def _shape(self) -> tuple[int, int, int, int]:
        """The genome as an array: (blocks, groups, parameters, experts), C order."""
        return self.num_blocks, len(self.groups), len(self.param_names), self.num_experts

    @property
    def dim(self) -> int:
        return int(np.prod(self._shape))

    def _gene_index(self, block: int, group: int, param: int, expert: int) -> int:
        return int(np.ravel_multi_index((block, group, param, expert), self._shape))

    @property
    def bounds(self) -> np.ndarray:
        """(dim, 2) array of [low, high] per gene."""
        per_param = np.array([[b.low, b.high] for b in self.space.parameters.values()])  # (P, 2)
        return np.broadcast_to(per_param[None, None, :, None, :], (*self._shape, 2)).reshape(self.dim, 2).copy()

    @property
    def gene_blocks(self) -> np.ndarray:
        """(dim,) block (layer, group of layers, control point, or 0 for the whole stack) of each gene,
        non-decreasing: where crossovers may split."""
        return np.repeat(np.arange(self.num_blocks), self.dim // self.num_blocks)

    def gene_names(self) -> list[str]:
        return [f"block{b}.{self.groups[g]}.{self.param_names[p]}.expert{k}"
                for b, g, p, k in np.ndindex(*self._shape)]

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
        """The genome giving every block and group the same per-expert values: {param: (K,)}.
        Parameters left out take the middle of their bounds; values are clipped to the bounds."""
        genome = np.empty(self._shape)
        for p, pname in enumerate(self.param_names):
            b = self.space.parameters[pname]
            given = values.get(pname)
            per_expert = (np.full(self.num_experts, (b.low + b.high) / 2) if given is None
                          else np.asarray(given, dtype=np.float64))
            if per_expert.shape != (self.num_experts,):
                raise SearchSpaceError(f"search space {self.space.name!r}: {pname} needs {self.num_experts} values, "
                                       f"got shape {per_expert.shape}")
            genome[:, :, p, :] = np.clip(per_expert, b.low, b.high)
        return genome.reshape(self.dim)

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

    def window_genomes(self, width: int, stride: int = 1) -> np.ndarray:
        """Each expert alone at weight 1 in a window of `width` consecutive blocks (layers, for a
        per-layer space) and 0 everywhere else, the window slid over depth by `stride`: the merges that
        take one expert's skill from some depth only, which no corner can express. Ordered window by
        window, expert by expert within a window; other parameters take the middle of their bounds.
        (n, dim)"""
        return self.window_parts(width, stride)[0]

    def window_parts(self, width: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`window_genomes` and the expert each one takes: ``((n, dim), (n,))``."""
        if "weight" not in self.param_names:
            raise SearchSpaceError(f"search space {self.space.name!r} does not search `weight`; no window genomes")
        if self.is_curve:
            raise SearchSpaceError(f"search space {self.space.name!r}: window genomes need granularity layer or block")
        blocks = self._shape[0]
        if not 1 <= width <= blocks or stride < 1:
            raise SearchSpaceError(f"search space {self.space.name!r}: window width {width} (stride {stride}) must be "
                                   f"1..{blocks}, the space's blocks")
        middle = self.task_level_genome({}).reshape(self._shape)
        w = self.param_names.index("weight")
        out, experts = [], []
        for start in range(0, blocks - width + 1, stride):
            for k in range(self.num_experts):
                genome = middle.copy()
                genome[:, :, w, :] = 0.0
                genome[start:start + width, :, w, k] = 1.0
                out.append(genome.reshape(self.dim))
                experts.append(k)
        return np.clip(np.stack(out), self.bounds[:, 0], self.bounds[:, 1]), np.asarray(experts, dtype=int)

    def empty_genome(self) -> np.ndarray:
        """The genome that takes no expert (every weight 0: the base); other parameters in the middle
        of their bounds, as in the window genomes. (dim,)"""
        if "weight" not in self.param_names:
            raise SearchSpaceError(f"search space {self.space.name!r} does not search `weight`; no empty genome")
        return self.task_level_genome({"weight": np.zeros(self.num_experts)})  # corner 0

    def per_layer(self, genome: np.ndarray) -> dict[str, np.ndarray]:
        """{param: array (groups, K, L)}: each layer's value (a block's gene, or a curve at the layer's depth)."""
        if self.is_curve:  # resolved as the materializer resolves the decoded setting at each layer's depth
            settings = self.decode(genome).settings
            depth = [layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0 for layer in range(self.num_layers)]
            out = {}
            for pname, per_expert in settings.items():
                arr = np.empty((len(self.groups), self.num_experts, self.num_layers))
                for k, setting in enumerate(per_expert):
                    for g in range(len(self.groups)):
                        value = setting[g]["value"] if self.space.components else setting
                        arr[g, k] = [resolve_setting(value, "", t, cast=to_float) for t in depth]
                out[pname] = arr
            return out
        genes = self._anchors(genome)  # (L, G, P, K)
        return {pname: np.ascontiguousarray(genes[:, :, p, :].transpose(1, 2, 0))
                for p, pname in enumerate(self.param_names)}

    def _anchors(self, genome: np.ndarray) -> np.ndarray:
        """(anchors, G, P, K): a curve's control points, or each layer's block genes."""
        genes = self.check(genome).reshape(self._shape)
        return genes if self.is_curve else genes[list(self.block_of_layer)]

    # ------------------------------------------------------------- the decoder
    def decode(self, genome: np.ndarray) -> DecodedGenome:
        """The genome as recipe settings: per parameter and expert a scalar when constant across
        depth, else a mergekit gradient (one anchor per layer, or a curve's control points); per group
        a {filter, value} entry when components are searched."""
        anchors = self._anchors(genome)  # (anchors along depth, G, P, K)
        settings: dict[str, tuple[Any, ...]] = {}
        for p, pname in enumerate(self.param_names):
            per_expert = []
            for k in range(self.num_experts):
                by_group = [_gradient(anchors[:, g, p, k]) for g in range(len(self.groups))]
                if self.space.components:
                    entries = [{"filter": COMPONENT_FILTERS[c], "value": by_group[g]}
                               for g, c in enumerate(self.space.components)]
                    per_expert.append([*entries, {"value": by_group[-1]}])
                else:
                    per_expert.append(by_group[0])
            settings[pname] = tuple(per_expert)
        return DecodedGenome(self.space.method, self.num_experts, settings, dict(self.space.settings),
                             self.space.components)

    def recipe(self, genome: np.ndarray, base_model: str, experts: Sequence[str], *, dtype: str | None = None,
               seed: int = 0) -> MergeRecipe:
        """The validated mergekit-style recipe this genome stands for (for export and inspection)."""
        data = self.decode(genome).recipe(base_model, experts, dtype=dtype, seed=seed)
        return load_recipe(data, source=f"search space {self.space.name!r}").recipe

    def recipe_yaml(self, genome: np.ndarray, base_model: str, experts: Sequence[str], **kwargs) -> str:
        return self.recipe(genome, base_model, experts, **kwargs).to_yaml()


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
