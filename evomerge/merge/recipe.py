"""mergekit-style merge recipes (YAML): parsing and validation.

We accept the subset of mergekit's `MergeConfiguration` that describes a whole-model merge:
`models` with per-model `parameters`, `merge_method`, `base_model`, global `parameters`,
`dtype`, `out_dtype` and `tokenizer_source: base`. Anything else (slices, modules, tokenizer
surgery, ...) is refused with an error naming the field, never silently ignored. Two fields are
our own: `layer_pattern` (a regex for architectures the layer map does not know) and `seed`
(for the random masks of DARE and DELLA).

Which parameters a method reads, their defaults and valid ranges are its row in
`evomerge.merge.methods.METHODS`. Every value is checked against that row when the recipe is
loaded (every gradient anchor and filtered value), and gradients against the base model's depth by `check_layers` before any tensor
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
from evomerge.merge.methods import METHODS, MergeMethod
from evomerge.merge.params import ParameterError, ParameterRule, check_setting

# Views of the method rows (`methods.METHODS`), for callers that only need the names.
MODEL_PARAMETERS: dict[str, set[str]] = {name: set(row.per_model) for name, row in METHODS.items()}
GLOBAL_PARAMETERS: dict[str, set[str]] = {name: set(row.settings) for name, row in METHODS.items()}
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
        """The models the kernel stacks: every listed model, but the base for methods that need one."""
        if not METHODS[self.merge_method].needs_base:
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
    if recipe.merge_method not in METHODS:
        raise RecipeError(f"{source}: field `merge_method`: unknown method {recipe.merge_method!r}; "
                          f"valid: {sorted(METHODS)}")
    row = METHODS[recipe.merge_method]
    method = row.name
    if not recipe.models:
        raise RecipeError(f"{source}: field `models` is empty")
    if row.needs_base and not recipe.base_model:
        raise RecipeError(f"{source}: field `base_model` is required for merge_method {method!r}")
    for i, entry in enumerate(recipe.models):
        for name in entry.parameters or {}:
            if name not in row.per_model:
                raise RecipeError(
                    f"{source}: field `models[{i}].parameters.{name}` is not a parameter of {method!r} "
                    f"(per-model parameters: {sorted(row.per_model) or 'none'})"
                )
    for name in recipe.parameters or {}:
        if row.parameter(name) is None:
            raise RecipeError(
                f"{source}: field `parameters.{name}` is not a parameter of {method!r} "
                f"(global: {sorted(row.settings)}; per-model: {sorted(row.per_model)})"
            )
    experts = recipe.experts()
    if not experts:
        raise RecipeError(f"{source}: field `models` lists no model besides the base model")
    if row.kernel == "slerp" and len(experts) != 1:
        raise RecipeError(f"{source}: field `models`: slerp needs the base and exactly one other model, got {len(experts)}")
    for name, parameter in row.settings.items():  # required global settings (slerp's t)
        if parameter.default is None and name not in (recipe.parameters or {}):
            raise RecipeError(f"{source}: field `parameters.{name}` is required for {method}")
    if recipe.tokenizer_source not in (None, "base", recipe.base_model):
        raise RecipeError(
            f"{source}: field `tokenizer_source`: only `base` is supported (the base model's tokenizer is copied)"
        )
    for name, parameter in row.per_model.items():  # required per-model parameters (weight)
        if parameter.default is not None:
            continue
        for i, entry in enumerate(recipe.models):
            if entry in experts and name not in (entry.parameters or {}) and name not in (recipe.parameters or {}):
                raise RecipeError(f"{source}: field `models[{i}].parameters.{name}` is required for {method!r}")
    _check_values(recipe, row, source)


def _check_values(recipe: MergeRecipe, row: MergeMethod, source: str, num_layers: int | None = None) -> None:
    """Every value of every parameter setting obeys its row's kind and range (see `check_setting`)."""
    scopes = [(f"models[{i}].parameters", entry.parameters or {}) for i, entry in enumerate(recipe.models)]
    for scope, settings in [*scopes, ("parameters", recipe.parameters or {})]:
        for name, setting in settings.items():
            parameter = row.parameter(name)
            rule = ParameterRule(parameter.kind, parameter.low, parameter.high)
            try:
                check_setting(setting, rule, field=f"{scope}.{name}", num_layers=num_layers)
            except ParameterError as exc:
                raise RecipeError(f"{source}: {exc}") from None


def check_layers(loaded: LoadedRecipe, num_layers: int) -> None:
    """Check the recipe's gradients against the base model's depth (from its config.json), before any
    tensor is read: a gradient may hold at most one anchor per layer (two for a one-layer model)."""
    _check_values(loaded.recipe, METHODS[loaded.recipe.merge_method], loaded.source, num_layers)


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
