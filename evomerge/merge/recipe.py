"""mergekit-style merge recipes (YAML): parsing and validation.

We accept the subset of mergekit's `MergeConfiguration` that describes a whole-model merge:
`models` with per-model `parameters`, `merge_method`, `base_model`, global `parameters`,
`dtype`, `out_dtype` and `tokenizer_source: base`. Anything else (slices, modules, tokenizer
surgery, ...) is refused with an error naming the field, never silently ignored. Two fields are
our own: `layer_pattern` (a regex for architectures the layer map does not know) and `seed`
(for the random masks of DARE and DELLA).

Every value is checked when the recipe is loaded (`PARAMETER_RULES`: every gradient anchor and
filtered value), and gradients against the base model's depth by `check_layers` before any tensor
is read, so a recipe that would fail at layer 60 of 80 fails at once, naming the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge._validation import Strict as _Strict
from evomerge._validation import format_validation_error as _format_validation
from evomerge.errors import RecipeError  # defined torch-free, for the CLI
from evomerge.merge.params import ParameterError, ParameterRule, check_setting

# Which parameters each method reads, per model and globally (mergekit 0.1.5's specs).
TASK_ARITHMETIC_FAMILY = {
    "task_arithmetic", "ties", "dare_ties", "dare_linear",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
}
_TA_GLOBAL = {"normalize", "rescale", "lambda", "int8_mask"}
MODEL_PARAMETERS: dict[str, set[str]] = {
    "linear": {"weight"},
    "slerp": set(),
    "task_arithmetic": {"weight", "density"},
    "ties": {"weight", "density"},
    "dare_ties": {"weight", "density"},
    "dare_linear": {"weight", "density"},
    "breadcrumbs": {"weight", "density", "gamma"},
    "breadcrumbs_ties": {"weight", "density", "gamma"},
    "della": {"weight", "density", "epsilon"},
    "della_linear": {"weight", "density", "epsilon"},
}
GLOBAL_PARAMETERS: dict[str, set[str]] = {
    "linear": {"normalize"},
    "slerp": {"t"},
    **{m: _TA_GLOBAL for m in TASK_ARITHMETIC_FAMILY},
}
# What every parameter's values may be. The fractions are the kernels' (`sparsify.check_fraction`);
# DELLA shrinks epsilon to min(epsilon, density, 1 - density), so any epsilon in [0, 1] is usable.
# Weights and lambda may be negative (subtracting a task vector) but must be finite.
PARAMETER_RULES: dict[str, ParameterRule] = {
    "weight": ParameterRule("number"),
    "density": ParameterRule("number", 0.0, 1.0),
    "gamma": ParameterRule("number", 0.0, 1.0),
    "epsilon": ParameterRule("number", 0.0, 1.0),
    "lambda": ParameterRule("number"),
    "t": ParameterRule("number", 0.0, 1.0),
    "normalize": ParameterRule("bool"),
    "rescale": ParameterRule("bool"),
    "int8_mask": ParameterRule("bool"),
}
UNSUPPORTED_TOP_LEVEL = {
    "slices": "layer slicing/stacking (frankenmerges) is not supported; merge whole models with `models:`",
    "modules": "per-module definitions are not supported; merge whole models with `models:`",
    "tokenizer": "tokenizer surgery is not supported; the base model's tokenizer is copied",
    "chat_template": "chat templates are copied from the base model; remove this field",
}


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] | None = None


class MergeRecipe(_Strict):
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    layer_pattern: str | None = None
    seed: int = 0

    # ------------------------------------------------------------------ views
    def experts(self) -> list[ModelEntry]:
        """The models that contribute task vectors (every listed model except the base)."""
        if self.merge_method == "linear":
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True)
        if data.get("seed") == 0:
            data.pop("seed")
        return yaml.safe_dump(data, sort_keys=False)


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: MergeRecipe
    source: str  # file path or "<memory>" for error messages
    root: Path  # folder used to resolve relative model paths


def load_recipe(path_or_text: str | os.PathLike | dict, *, source: str | None = None) -> LoadedRecipe:
    """Parse and validate a recipe from a YAML file, YAML text or a dict."""
    root = Path.cwd()
    if isinstance(path_or_text, dict):
        data, source = path_or_text, source or "<recipe>"
    else:
        path = Path(path_or_text)
        if isinstance(path_or_text, os.PathLike) or (len(str(path_or_text)) < 4096 and path.suffix in {".yaml", ".yml"}):
            if not path.is_file():
                raise RecipeError(f"{path}: recipe file not found")
            text, source, root = path.read_text(), str(path), path.resolve().parent
        else:
            text, source = str(path_or_text), source or "<recipe>"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key, why in UNSUPPORTED_TOP_LEVEL.items():
        if key in data:
            raise RecipeError(f"{source}: field `{key}` is not supported: {why}")
    try:
        recipe = MergeRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_format_validation(exc)}") from None
    _check_semantics(recipe, source)
    return LoadedRecipe(recipe=recipe, source=source, root=root)


def _check_semantics(recipe: MergeRecipe, source: str) -> None:
    from evomerge.merge.kernels import KERNELS  # kernels are the source of truth for method names

    method = recipe.merge_method
    if method not in KERNELS or method not in MODEL_PARAMETERS:
        valid = sorted(set(KERNELS) & set(MODEL_PARAMETERS))
        raise RecipeError(f"{source}: field `merge_method`: unknown method {method!r}; valid: {valid}")
    if not recipe.models:
        raise RecipeError(f"{source}: field `models` is empty")
    needs_base = method != "linear"
    if needs_base and not recipe.base_model:
        raise RecipeError(f"{source}: field `base_model` is required for merge_method {method!r}")
    for i, entry in enumerate(recipe.models):
        for name in entry.parameters or {}:
            if name not in MODEL_PARAMETERS[method]:
                raise RecipeError(
                    f"{source}: field `models[{i}].parameters.{name}` is not a parameter of {method!r} "
                    f"(per-model parameters: {sorted(MODEL_PARAMETERS[method]) or 'none'})"
                )
    for name in recipe.parameters or {}:
        if name not in GLOBAL_PARAMETERS[method] and name not in MODEL_PARAMETERS[method]:
            raise RecipeError(
                f"{source}: field `parameters.{name}` is not a parameter of {method!r} "
                f"(global: {sorted(GLOBAL_PARAMETERS[method])}; per-model: {sorted(MODEL_PARAMETERS[method])})"
            )
    experts = recipe.experts()
    if not experts:
        raise RecipeError(f"{source}: field `models` lists no model besides the base model")
    if method == "slerp":
        if len(experts) != 1:
            raise RecipeError(f"{source}: field `models`: slerp needs the base and exactly one other model, got {len(experts)}")
        if "t" not in (recipe.parameters or {}):
            raise RecipeError(f"{source}: field `parameters.t` is required for slerp")
    if recipe.tokenizer_source not in (None, "base", recipe.base_model):
        raise RecipeError(
            f"{source}: field `tokenizer_source`: only `base` is supported (the base model's tokenizer is copied)"
        )
    if "weight" in MODEL_PARAMETERS[method]:
        for i, entry in enumerate(recipe.models):
            if entry in experts and "weight" not in (entry.parameters or {}) and "weight" not in (recipe.parameters or {}):
                raise RecipeError(f"{source}: field `models[{i}].parameters.weight` is required for {method!r}")
    _check_values(recipe, source)


def _check_values(recipe: MergeRecipe, source: str, num_layers: int | None = None) -> None:
    """Every value of every parameter setting obeys its `PARAMETER_RULES` row (see `check_setting`)."""
    scopes = [(f"models[{i}].parameters", entry.parameters or {}) for i, entry in enumerate(recipe.models)]
    for scope, settings in [*scopes, ("parameters", recipe.parameters or {})]:
        for name, setting in settings.items():
            try:
                check_setting(setting, PARAMETER_RULES[name], field=f"{scope}.{name}", num_layers=num_layers)
            except ParameterError as exc:
                raise RecipeError(f"{source}: {exc}") from None


def check_layers(loaded: LoadedRecipe, num_layers: int) -> None:
    """Check the recipe's gradients against the base model's depth (from its config.json), before any
    tensor is read: a gradient may hold at most one anchor per layer (two for a one-layer model)."""
    _check_values(loaded.recipe, loaded.source, num_layers)


def resolve_model_path(reference: str, loaded: LoadedRecipe) -> Path:
    """A model reference is a local folder: absolute, relative to the cwd, or to the recipe file."""
    candidates = [Path(reference).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(loaded.root / reference)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RecipeError(
        f"{loaded.source}: model {reference!r} is not a local folder (looked in {', '.join(map(str, candidates))}); "
        "evomerge reads local Hugging Face folders only"
    )
