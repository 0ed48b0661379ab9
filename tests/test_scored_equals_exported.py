"""What the search scores is what `evomerge merge` / `export` writes: bit for bit, on tensors far
above the order-statistics grid (65,536 entries), for every method the fused planner or the
kernels' stages run in memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.merge.checkpoint import ModelFolder
from evomerge.merge.engine import merge_recipe
from evomerge.merge.materializer import Materializer, layerwise
from evomerge.merge.methods import METHODS
from evomerge.testing import llama_config, make_family

LAYERS = 2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    config = llama_config(hidden=128, intermediate=1600, vocab=2048, layers=LAYERS, heads=4)
    return make_family(tmp_path_factory.mktemp("big"), n_experts=3, seed=5, delta_scale=0.3, config=config)


@pytest.fixture(scope="module", params=[None, 65536], ids=["full-stats", "grid-stats"])
def materializer(family, request):
    base, experts = family
    return Materializer.from_folders(base, experts, device="cpu", seed=11, compile=False,
                                     order_stats_grid=request.param)


def test_the_family_has_tensors_far_above_the_grid(family):
    base = ModelFolder.open(family[0])
    sizes = [int(np.prod(base.shape(name))) for name in base.tensor_names()]
    assert max(sizes) >= 250_000 and sum(s >= 200_000 for s in sizes) >= 2 * LAYERS


def assert_scored_equals_exported(tmp_path, family, materializer, method, per_expert, settings=None):
    base, experts = family
    row = METHODS[method]
    materializer.apply(method, layerwise(LAYERS, **per_expert), **{("lambda_" if k == "lambda" else k): v
                                                                     for k, v in (settings or {}).items()})
    scored = materializer.merged_state()

    def setting(values):  # one value, or a gradient with one anchor per layer
        values = np.asarray(values, dtype=np.float64)
        return float(values) if values.ndim == 0 else [float(v) for v in values]

    models = [{"model": str(e), "parameters": {name: setting(np.asarray(values)[k])
                                               for name, values in per_expert.items() if name in row.per_model}}
              for k, e in enumerate(experts)]
    recipe = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32", "seed": 11}
    if settings:
        recipe["parameters"] = dict(settings)
    exported = ModelFolder.open(merge_recipe(recipe, tmp_path / method, progress=False).out_dir)
    for name, tensor in scored.items():
        written = exported.get_tensor(name)
        assert torch.equal(tensor, written), f"{method} {name}: {int((tensor != written).sum())} entries differ"


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7, 0.97])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_magnitude_methods_at_several_densities(tmp_path, family, materializer, method, density):
    per_expert = {"weight": [0.9, 0.5, 0.7], "density": [density, density * 0.8, min(1.0, density * 1.1)]}
    if method == "breadcrumbs_ties":
        per_expert["gamma"] = [0.01, 0.05, 0.0]
    assert_scored_equals_exported(tmp_path, family, materializer, method, per_expert)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
                                    "task_arithmetic"])
def test_every_other_task_arithmetic_method(tmp_path, family, materializer, method):
    per_expert = {"weight": [0.8, 0.6, 0.4], "density": [0.4, 0.6, 1.0]}
    if method == "breadcrumbs":
        per_expert["gamma"] = [0.02, 0.02, 0.02]
    if method.startswith("della"):
        per_expert["epsilon"] = [0.1, 0.05, 0.1]
    if method == "task_arithmetic":
        per_expert.pop("density")
    assert_scored_equals_exported(tmp_path, family, materializer, method, per_expert)


def test_per_layer_coefficients_and_settings(tmp_path, family, materializer):
    rng = np.random.default_rng(4)
    per_expert = {"weight": rng.uniform(0.2, 1.0, (3, LAYERS)), "density": rng.uniform(0.1, 0.9, (3, LAYERS))}
    assert_scored_equals_exported(tmp_path, family, materializer, "ties", per_expert,
                                  {"normalize": False, "lambda": 1.3, "rescale": True})
    assert_scored_equals_exported(tmp_path, family, materializer, "dare_ties", per_expert, {"normalize": True})


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """Base on a 1/64 grid and experts = base + k/64 for few k (as bf16 fine-tunes give): every
    threshold is shared by a long run of entries, so each window is cut inside a tie run."""
    from safetensors.torch import load_file, save_file

    config = llama_config(hidden=128, intermediate=1600, vocab=2048, layers=LAYERS, heads=4)
    base, experts = make_family(tmp_path_factory.mktemp("tied"), n_experts=3, seed=6, config=config)
    base_file = base / "model.safetensors"
    base_state = {name: (t * 64).round() / 64 for name, t in load_file(base_file).items()}
    save_file(base_state, base_file, metadata={"format": "pt"})
    g = torch.Generator().manual_seed(8)
    for index, expert in enumerate(experts):
        levels = 2 + 5 * index
        state = {name: t + torch.randint(-levels, levels + 1, t.shape, generator=g).float() / 64
                 for name, t in base_state.items()}
        save_file(state, expert / "model.safetensors", metadata={"format": "pt"})
    return base, experts


@pytest.mark.parametrize("grid", [None, 65536, 1024], ids=["full-stats", "grid-65536", "grid-1024"])
@pytest.mark.parametrize("method,settings", [("ties", None), ("ties", {"rescale": True}), ("breadcrumbs_ties", None),
                                             ("breadcrumbs", None)])
def test_tie_runs_are_cut_exactly(tmp_path, tied_family, grid, method, settings):
    materializer = Materializer.from_folders(tied_family[0], tied_family[1], device="cpu", seed=11, compile=False,
                                             order_stats_grid=grid)
    per_expert = {"weight": [0.9, 0.5, 0.7], "density": [0.3, 0.55, 0.8]}
    if method.startswith("breadcrumbs"):
        per_expert["gamma"] = [0.01, 0.1, 0.2]
    assert_scored_equals_exported(tmp_path, tied_family, materializer, method, per_expert, settings)


def test_compiled_bracket_counts_cut_tie_runs_exactly(tmp_path, tied_family):
    """The compiled path (one counting pass per tensor, merge passes split at the cuts) equals the export too."""
    materializer = Materializer.from_folders(tied_family[0], tied_family[1], device="cpu", seed=11, compile=True,
                                             order_stats_grid=1024)
    per_expert = {"weight": [0.9, 0.5, 0.7], "density": [0.3, 0.55, 0.8], "gamma": [0.01, 0.1, 0.2]}
    for method in ("ties", "breadcrumbs_ties"):
        assert_scored_equals_exported(tmp_path / method, tied_family, materializer, method, per_expert)
    assert materializer._ops.compile, "torch.compile fell back to eager"
