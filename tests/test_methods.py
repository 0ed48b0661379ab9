"""Each method's row drives recipe validation, the kernels' argument checks and their defaults."""
from __future__ import annotations

import pytest
import torch

from evomerge.merge.kernels import KERNELS, merge_tensor, method_defaults
from evomerge.merge.methods import METHODS, UnknownMethodError, method_row
from evomerge.merge.recipe import RecipeError, load_recipe

PARAMETERS = ("weight", "density", "gamma", "epsilon")


def test_every_row_has_a_kernel_and_unknown_names_list_the_valid_ones():
    assert set(KERNELS) == set(METHODS)
    with pytest.raises(UnknownMethodError) as error:
        method_row("tie")
    assert all(name in str(error.value) for name in METHODS)
    with pytest.raises(RecipeError, match=r"unknown method 'tie'; valid: \[.*'breadcrumbs'.*'ties'"):
        load_recipe({"merge_method": "tie", "base_model": "a", "models": [{"model": "b"}]})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_parameter_outside_the_row_is_refused_naming_it(method):
    row = METHODS[method]
    for name in PARAMETERS:
        if name in row.per_model:
            continue
        recipe = {"merge_method": method, "base_model": "a", "parameters": {"t": 0.5} if method == "slerp" else {},
                  "models": [{"model": "b", "parameters": {name: 0.5}}]}
        with pytest.raises(RecipeError, match=rf"field `models\[0\]\.parameters\.{name}` is not a parameter of"):
            load_recipe(recipe)
        with pytest.raises(ValueError, match=rf"{method} does not use {name}"):
            merge_tensor(method, torch.zeros(4), torch.ones(1, 4), tensor_name="x", **{name: [0.5]},
                         **({"t": 0.5} if method == "slerp" else {"weight": [1.0]} if name != "weight" else {}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_defaults_and_ranges_come_from_the_row(method):
    row = METHODS[method]
    expected = {("lambda_" if k == "lambda" else k): v for k, v in row.defaults().items()}
    assert method_defaults(method) == expected
    for name, parameter in row.per_model.items():
        if parameter.high == 1.0:  # a fraction: out of range is refused naming the field
            recipe = {"merge_method": method, "base_model": "a",
                      "models": [{"model": "b", "parameters": {"weight": 1.0, name: 1.5}}]}
            with pytest.raises(RecipeError, match=rf"models\[0\]\.parameters\.{name}`: must be in \[0, 1\]"):
                load_recipe(recipe)
