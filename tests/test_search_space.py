"""Search spaces: presets, validation, genome layout, and genome -> YAML -> `evomerge merge` == materializer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from evomerge.merge.checkpoint import ModelFolder
from evomerge.merge.engine import merge_recipe
from evomerge.merge.materializer import Materializer
from evomerge.search.space import SearchSpace, SearchSpaceError, preset_names
from evomerge.testing import llama_config, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("space"), n_experts=2, seed=31, delta_scale=0.3,
                       config=llama_config(layers=4))


def test_presets_load():
    names = preset_names()
    for required in ("task_arithmetic_global", "ties_per_layer", "dare_ties_per_block"):
        assert required in names
    for name in names:
        space = SearchSpace.load(name)
        assert space.name == name
        assert SearchSpace.from_dict(space.to_dict()) == space


def test_layout_block_granularity():
    bound = SearchSpace.load("dare_ties_per_block").bind(num_layers=5, num_experts=3)
    assert bound.num_blocks == 3  # layers (0,1), (2,3), (4)
    assert bound.dim == 3 * 2 * 3  # blocks x params x experts
    assert list(bound.gene_blocks) == sorted(bound.gene_blocks)
    genome = np.linspace(0.1, 0.9, bound.dim)
    per_layer = bound.per_layer(genome)
    weight = per_layer["weight"][0]  # (K, L)
    assert np.array_equal(weight[:, 0], weight[:, 1]) and np.array_equal(weight[:, 2], weight[:, 3])
    assert not np.array_equal(weight[:, 1], weight[:, 2])
    # Gene order: block-major, then group, then parameter, then expert.
    assert weight[1, 4] == genome[bound._gene_index(2, 0, 0, 1)]
    assert bound.gene_names()[bound._gene_index(2, 0, 1, 1)] == "block2.all.density.expert1"


def test_corner_genomes_decode_to_the_obvious_task_level_merges():
    bound = SearchSpace.load("ties_per_layer").bind(num_layers=3, num_experts=3)
    corners = bound.corner_genomes()
    assert corners.shape == (8, bound.dim)
    weights = [bound.per_layer(g)["weight"][0] for g in corners]  # (K, L) each
    for w in weights:  # the same per-expert weight in every layer
        assert np.all(w == w[:, :1])
    per_expert = [tuple(w[:, 0]) for w in weights]
    assert per_expert[0] == (0.0, 0.0, 0.0) and per_expert[-1] == (1.0, 1.0, 1.0)
    assert per_expert[1:4] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    assert sorted(per_expert) == sorted(set(per_expert))
    density = bound.per_layer(corners[3])["density"][0]
    low, high = bound.space.parameters["density"].low, bound.space.parameters["density"].high
    assert np.allclose(density, (low + high) / 2)  # unsearched-for values sit mid-range
    capped = bound.corner_genomes(max_count=5)
    assert [tuple(bound.per_layer(g)["weight"][0][:, 0]) for g in capped][-1] == (1.0, 1.0, 1.0)
    assert len(capped) == 5
    with pytest.raises(SearchSpaceError, match="weight needs 3 values"):
        bound.task_level_genome({"weight": [1.0, 0.0]})


@pytest.mark.parametrize("name", ["task_arithmetic_per_layer", "ties_per_layer", "dare_ties_per_block",
                                  "task_arithmetic_attn_mlp_per_block", "task_arithmetic_depth_curve"])
def test_genome_yaml_evomerge_merge_reproduces_materializer(tmp_path, family, name):
    base, experts = family
    space = SearchSpace.load(name).bind(num_layers=4, num_experts=2)
    rng = np.random.default_rng(5)
    bounds = space.bounds
    genome = rng.uniform(bounds[:, 0], bounds[:, 1])
    recipe_yaml = space.recipe_yaml(genome, str(base), [str(e) for e in experts], dtype="float32", seed=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml)
    out = merge_recipe(path, tmp_path / "merged", progress=False).out_dir

    mat = Materializer.from_folders(base, experts, device="cpu", seed=3, compile=False,
                                    order_stats_grid=None)  # exact top-k, as the file path
    decoded = space.decode(genome)
    mat.apply(decoded.method, decoded.coefficients(mat.layer_map), **decoded.materializer_settings())
    on_disk = ModelFolder.open(out)
    for tensor_name, tensor in mat.merged_state().items():
        torch.testing.assert_close(tensor, on_disk.get_tensor(tensor_name), rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{tensor_name}: {m}")


def test_component_filters_reach_the_right_tensors(family):
    base, experts = family
    space = SearchSpace.load("task_arithmetic_attn_mlp_per_block").bind(num_layers=4, num_experts=2)
    assert space.groups == ("attention", "mlp", "rest")
    genome = np.zeros(space.dim)
    genome[space._gene_index(0, 1, 0, 0)] = 1.0  # block 0, mlp, weight, expert 0
    mat = Materializer.from_folders(base, experts, device="cpu", compile=False)
    coeffs = space.decode(genome).coefficients(mat.layer_map)
    pos = mat.layer_map.position
    assert coeffs("model.layers.1.mlp.up_proj.weight", pos("model.layers.1.mlp.up_proj.weight")).weight == (1.0, 0.0)
    assert coeffs("model.layers.2.mlp.up_proj.weight", pos("model.layers.2.mlp.up_proj.weight")).weight == (0.0, 0.0)
    assert coeffs("model.layers.1.self_attn.q_proj.weight", pos("model.layers.1.self_attn.q_proj.weight")).weight == (0.0, 0.0)


def test_recipe_yaml_is_mergekit_loadable(family):
    from mergekit.config import MergeConfiguration

    base, experts = family
    space = SearchSpace.load("ties_per_layer").bind(num_layers=4, num_experts=2)
    genome = np.full(space.dim, 0.5)
    text = space.recipe_yaml(genome, str(base), [str(e) for e in experts])
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert config.merge_method == "ties"
    assert config.parameters["normalize"] is False


BAD = [
    ({"name": "x", "method": "ties"}, "field `parameters` is required"),
    ({"name": "x", "method": "magic", "parameters": {}}, "unknown method 'magic'"),
    ({"name": "x", "method": "ties", "parameters": {"weight": {"low": 0, "high": 1}}, "granularity": "row"},
     "granularity`: 'row' is not one of"),
    ({"name": "x", "method": "ties", "parameters": {"gamma": {"low": 0, "high": 0.1}, "weight": {"low": 0, "high": 1}}},
     "`parameters.gamma`: 'ties' has no such parameter"),
    ({"name": "x", "method": "ties", "parameters": {"weight": {"low": 1, "high": 0}}}, "low 1.0 must be below high 0.0"),
    ({"name": "x", "method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0, "high": 2}}},
     "bounds must lie in \\[0, 1\\]"),
    ({"name": "x", "method": "ties", "parameters": {"weight": {"low": 0, "high": 1}}, "settings": {"t": 0.5}},
     "`settings.t` is not a setting of 'ties'"),
    ({"name": "x", "method": "ties", "parameters": {"weight": {"low": 0, "high": 1}}, "colour": 1},
     "field `colour` is not supported"),
    ({"name": "x", "method": "ties", "parameters": {"density": {"low": 0, "high": 1}}}, "`parameters.weight` is required"),
]


@pytest.mark.parametrize("data,error", BAD)
def test_bad_search_spaces_name_the_field(data, error):
    with pytest.raises(SearchSpaceError, match=error):
        SearchSpace.from_dict(data, source="bad.yaml")


def test_unknown_preset_and_out_of_bounds_genome():
    with pytest.raises(SearchSpaceError, match="unknown search space 'nope'; presets: \\["):
        SearchSpace.load("nope")
    bound = SearchSpace.load("ties_per_layer").bind(num_layers=2, num_experts=2)
    genome = np.full(bound.dim, 0.5)
    genome[3] = 1.2  # a density gene
    with pytest.raises(SearchSpaceError, match="block0.all.density.expert1 = 1.2 is outside \\[0.1, 1.0\\]"):
        bound.per_layer(genome)
    with pytest.raises(SearchSpaceError, match="genome has shape"):
        bound.per_layer(np.zeros(3))


@pytest.mark.parametrize("name", preset_names())
def test_decode_equals_the_recipe_path_it_replaced(family, name):
    """The one decode (genome -> recipe settings -> `resolve_setting` per tensor) gives, for every
    tensor, exactly the coefficients the disk engine resolves from the validated YAML recipe."""
    from evomerge.merge.engine import resolve_tensor_params
    from evomerge.merge.layers import LayerMap
    from evomerge.merge.recipe import load_recipe

    base, experts = family
    space = SearchSpace.load(name).bind(num_layers=4, num_experts=2)
    folder = ModelFolder.open(base)
    layer_map = LayerMap.from_config(folder.config)
    rng = np.random.default_rng(11)
    for genome in (rng.uniform(space.bounds[:, 0], space.bounds[:, 1]), space.corner_genomes()[-1]):
        decoded = space.decode(genome)
        recipe = load_recipe(yaml.safe_load(yaml.safe_dump(decoded.recipe(str(base), [str(e) for e in experts]))),
                             source="decoded").recipe
        coefficients = decoded.coefficients(layer_map)
        for tensor_name in folder.tensor_names():
            ours = coefficients(tensor_name, layer_map.position(tensor_name))
            theirs = resolve_tensor_params(recipe, tensor_name, layer_map.depth_fraction(tensor_name))
            for param in ("weight", "density", "gamma", "epsilon"):
                expected = getattr(theirs, param) if param in space.param_names or param == "weight" else None
                got = getattr(ours, param)
                assert (None if expected is None else tuple(expected)) == got, (tensor_name, param)
        assert decoded.materializer_settings() == {("lambda_" if k == "lambda" else k): v
                                                    for k, v in space.space.settings.items()}


def test_a_depth_curve_is_a_mergekit_gradient_over_its_control_points():
    """granularity `curve`: each expert's weight is 3 anchors interpolated linearly over depth, so the
    layer values are np.interp of the anchors at layer / (L - 1), and the recipe holds the anchors."""
    bound = SearchSpace.load("task_arithmetic_depth_curve").bind(num_layers=5, num_experts=2)
    assert bound.dim == 3 * 2 and bound.num_blocks == 3 and list(bound.gene_blocks) == [0, 0, 1, 1, 2, 2]
    genome = np.array([0.0, 1.2, 1.0, 0.6, 0.5, 0.0])  # (control point, expert)
    anchors = genome.reshape(3, 2)
    weight = bound.per_layer(genome)["weight"][0]  # (K, L)
    for k in range(2):
        np.testing.assert_allclose(weight[k], np.interp(np.linspace(0, 1, 5), [0, 0.5, 1], anchors[:, k]), atol=1e-12)
    decoded = bound.decode(genome)
    assert decoded.settings["weight"] == ([0.0, 1.0, 0.5], [1.2, 0.6, 0.0])
    corners = bound.corner_genomes()
    assert [tuple(bound.per_layer(g)["weight"][0][:, 2]) for g in corners] == [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0),
                                                                               (1.0, 1.0)]
    with pytest.raises(SearchSpaceError, match="4 control points for a model of 3 layers"):
        SearchSpace.from_dict({**bound.space.to_dict(), "control_points": 4}).bind(num_layers=3, num_experts=2)
    with pytest.raises(SearchSpaceError, match="`control_points` only applies to granularity `curve`"):
        SearchSpace.from_dict({"name": "x", "method": "ties", "control_points": 3,
                               "parameters": {"weight": {"low": 0, "high": 1}}})


def test_window_genomes_put_one_expert_in_each_window_of_layers():
    """Hand-worked: 4 layers, 2 experts, windows of 2 slid by 1 -> 3 windows x 2 experts, each the
    expert at 1 in its window and every other coefficient 0; refused for a window wider than the model."""
    bound = SearchSpace.load("task_arithmetic_per_layer").bind(4, 2)
    weights = [bound.per_layer(g)["weight"][0] for g in bound.window_genomes(2)]  # (K, L) each
    expected = [
        [[1, 1, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 0]],
        [[0, 1, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 1, 1, 0]],
        [[0, 0, 1, 1], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 1, 1]],
    ]
    assert np.array_equal(np.array(weights), np.array(expected, dtype=float))
    assert len(bound.window_genomes(2, stride=2)) == 4  # windows at layers 0-1 and 2-3
    with pytest.raises(SearchSpaceError, match="window width 5"):
        bound.window_genomes(5)
