"""The in-memory materializer equals the pure kernels, writes in place, and matches `evomerge merge`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.merge.checkpoint import ModelFolder
from evomerge.merge.engine import merge_recipe
from evomerge.merge.kernels import merge_tensor
from evomerge.merge.layers import LayerMap
from evomerge.merge.fused import FusedOps
from evomerge.merge.materializer import Materializer, layerwise
from evomerge.merge.sparsify import MagnitudeOrderStats
from evomerge.testing import llama_config, make_family

GRID = 512  # smaller than the 2048-element MLP tensors, so the grid/fused path runs on them


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("mat"), n_experts=3, seed=21, delta_scale=0.3,
                       config=llama_config(layers=3))


@pytest.fixture(scope="module")
def materializer(family):
    base, experts = family
    return Materializer.from_folders(base, experts, device="cpu", seed=7, order_stats_grid=GRID, compile=False)


def reference_state(family, method, coeff_fn, seed=7, **shared):
    """Per-tensor pure kernels on the checkpoints, with the same order stats the materializer uses."""
    base_dir, expert_dirs = family
    base = ModelFolder.open(base_dir)
    experts = [ModelFolder.open(p) for p in expert_dirs]
    layer_map = LayerMap.from_config(base.config)
    out = {}
    for name in base.tensor_names():
        b = base.get_tensor(name).float()
        stacked = torch.stack([e.get_tensor(name).float() for e in experts])
        c = coeff_fn(name, layer_map.position(name))
        stats = None
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
            stats = [MagnitudeOrderStats.from_delta(stacked[k] - b, grid=GRID) for k in range(len(experts))]
        kwargs = dict(weight=c.weight, density=c.density, gamma=c.gamma, epsilon=c.epsilon, order_stats=stats, **shared)
        if method == "linear":
            kwargs = dict(weight=c.weight)
        out[name] = merge_tensor(method, b, stacked, seed=seed, tensor_name=name,
                                 **{k: v for k, v in kwargs.items() if v is not None})
    return out


def assert_state_close(materializer, reference, rtol=2e-6):
    merged = materializer.merged_state()
    assert set(merged) == set(reference)
    for name, ref in reference.items():
        err = ((merged[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert err <= rtol, f"{name}: relative error {err:.3g}"


RNG = np.random.default_rng(0)
PER_LAYER_WEIGHT = RNG.uniform(0.1, 1.2, size=(3, 3))
PER_LAYER_DENSITY = RNG.uniform(0.2, 0.9, size=(3, 3))
CASES = {
    "task_arithmetic": dict(weight=PER_LAYER_WEIGHT),
    "linear": dict(weight=[0.5, 0.3, 0.2]),
    "ties": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY),
    "dare_ties": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY),
    "dare_linear": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY),
    "breadcrumbs": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY, gamma=[0.05, 0.01, 0.1]),
    "breadcrumbs_ties": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY, gamma=[0.05, 0.01, 0.1]),
    "della": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY, epsilon=[0.1, 0.1, 0.05]),
    "della_linear": dict(weight=PER_LAYER_WEIGHT, density=PER_LAYER_DENSITY, epsilon=[0.1, 0.1, 0.05]),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_materializer_equals_pure_kernels(family, materializer, method):
    coeffs = layerwise(3, **CASES[method])
    materializer.apply(method, coeffs)
    assert_state_close(materializer, reference_state(family, method, coeffs))


def test_shared_parameters_follow_the_kernels(family, materializer):
    coeffs = layerwise(3, **CASES["ties"])
    materializer.apply("ties", coeffs, normalize=False, lambda_=0.7, rescale=True)
    assert_state_close(materializer, reference_state(family, "ties", coeffs, normalize=False, lambda_=0.7, rescale=True))


def test_compiled_fused_paths_equal_eager(family):
    base, experts = family
    compiled = Materializer.from_folders(base, experts, device="cpu", seed=7, order_stats_grid=GRID, compile=True)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        coeffs = layerwise(3, **CASES[method])
        compiled.apply(method, coeffs)
        assert compiled._ops.compile, "torch.compile fell back to eager"
        assert_state_close(compiled, reference_state(family, method, coeffs))


def test_candidates_are_written_in_place_without_reallocation(materializer):
    pointers = {n: p.data_ptr() for n, p in materializer.model.named_parameters()}
    for method in ("task_arithmetic", "ties", "dare_ties"):
        materializer.apply(method, **{k: v for k, v in CASES[method].items()})
    assert {n: p.data_ptr() for n, p in materializer.model.named_parameters()} == pointers


def test_one_hot_weights_give_that_expert_and_zero_gives_base(family, materializer):
    base, experts = family
    materializer.apply("task_arithmetic", weight=[0.0, 1.0, 0.0])
    expert = AutoModelForCausalLM.from_pretrained(experts[1]).state_dict()
    for name, tensor in materializer.merged_state().items():
        torch.testing.assert_close(tensor, expert[name], rtol=0, atol=1e-6)
    materializer.apply("task_arithmetic", weight=[0.0, 0.0, 0.0])
    reference = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for name, tensor in materializer.merged_state().items():
        assert torch.equal(tensor, reference[name])


def test_live_model_logits_equal_evomerge_merge_of_the_same_recipe(tmp_path, family, materializer):
    """Per-layer coefficients as a mergekit gradient list reproduce the materializer's model."""
    base, experts = family
    weights = PER_LAYER_WEIGHT
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": [float(x) for x in weights[k]]}}
                   for k, e in enumerate(experts)],
        "dtype": "float32",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = merge_recipe(path, tmp_path / "merged", progress=False).out_dir
    live = materializer.apply("task_arithmetic", weight=weights)
    disk = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 3, 4, 7, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(live(input_ids=ids).logits, disk(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_are_cast_back(tmp_path, dtype):
    base, experts = make_family(tmp_path, n_experts=2, seed=3, dtype=dtype, delta_scale=0.3)
    mat = Materializer.from_folders(base, experts, device="cpu", compile=False)
    model = mat.apply("task_arithmetic", weight=[0.6, 0.4])
    assert next(model.parameters()).dtype == dtype
    name = "model.layers.0.mlp.up_proj.weight"
    b = ModelFolder.open(base).get_tensor(name).float()
    e = [ModelFolder.open(p).get_tensor(name).float() for p in experts]
    expected = (b + ((e[0] - b) * 0.6 + (e[1] - b) * 0.4)).to(dtype)  # the kernel's order: sum, then + base
    assert torch.equal(mat.merged_state()[name], expected)


def test_tied_embeddings(tmp_path):
    base, experts = make_family(tmp_path, n_experts=2, seed=4, config=llama_config(tie_word_embeddings=True))
    mat = Materializer.from_folders(base, experts, device="cpu", compile=False)
    model = mat.apply("task_arithmetic", weight=[1.0, 0.0])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expert = ModelFolder.open(experts[0])
    assert torch.allclose(model.lm_head.weight, expert.get_tensor("model.embed_tokens.weight"), atol=1e-6)


def test_wrong_number_of_coefficients_is_an_error(materializer):
    with pytest.raises(ValueError, match="2 weights for 3 experts"):
        materializer.apply("task_arithmetic", weight=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"expected shape \(K,\) or \(K, 3\)"):
        materializer.apply("task_arithmetic", weight=np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"density\[0\] must be in \[0, 1\]"):
        materializer.apply("ties", weight=[1, 1, 1], density=[1.5, 0.5, 0.5])


# ----------------------------------------------------------------------------- fast paths

def assert_state_equal(materializer, reference):
    merged = materializer.merged_state()
    for name, ref in reference.items():
        assert torch.equal(merged[name], ref), f"{name}: {int((merged[name] != ref).sum())} entries differ"


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear"])
def test_eager_fused_path_is_bit_identical_to_the_pure_kernels(family, materializer, method):
    """Without rescaling the chunked eager pass runs the pure kernel's operations in its order."""
    coeffs = layerwise(3, **CASES[method])
    shared = {"rescale": False, "normalize": True, "lambda_": 0.9}
    materializer.apply(method, coeffs, **shared)
    assert_state_equal(materializer, reference_state(family, method, coeffs, **shared))


def test_eager_fused_path_in_small_chunks_on_a_pool(family):
    base, experts = family
    mat = Materializer.from_folders(base, experts, device="cpu", seed=7, order_stats_grid=GRID, compile=False)
    mat._ops = FusedOps(compile=False, chunk_size=100, workers=2)  # 2048-entry tensors: 21 chunks each
    for method in ("ties", "dare_ties", "breadcrumbs_ties"):
        coeffs = layerwise(3, **CASES[method])
        mat.apply(method, coeffs, rescale=False)
        assert_state_equal(mat, reference_state(family, method, coeffs, rescale=False))
    mat._ops.close()


@pytest.mark.parametrize("cache", [True, False])
def test_cached_random_draws_give_the_kernels_masks(family, cache):
    base, experts = family
    mat = Materializer.from_folders(base, experts, device="cpu", seed=7, compile=False, cache_random_draws=cache)
    rng = np.random.default_rng(1)
    for method in ("dare_ties", "dare_linear", "dare_ties"):  # later candidates reuse the draws
        coeffs = layerwise(3, weight=rng.uniform(0.1, 1.2, (3, 3)), density=rng.uniform(0.2, 1.0, (3, 3)))
        mat.apply(method, coeffs)
        assert_state_close(mat, reference_state(family, method, coeffs))
    numel = sum(s.task_vectors.numel() for s in mat.tensors)
    assert mat.random_draws_bytes == (4 * numel if cache else 0)


def test_automatic_draw_caching_follows_the_budget(family):
    base, experts = family
    small = Materializer.from_folders(base, experts, device="cpu", compile=False, random_draws_budget_bytes=1024)
    large = Materializer.from_folders(base, experts, device="cpu", compile=False, random_draws_budget_bytes=2**30)
    for mat in (small, large):
        mat.apply("dare_ties", weight=[0.5, 0.5, 0.5], density=[0.5, 0.5, 0.5])
    assert small.random_draws_bytes == 0
    assert large.random_draws_bytes == 4 * sum(s.task_vectors.numel() for s in large.tensors)
    with pytest.raises(ValueError, match="cache_random_draws must be True, False or 'auto'"):
        Materializer.from_folders(base, experts, device="cpu", compile=False, cache_random_draws="yes")


@pytest.mark.parametrize("grid", [None, 7, 4096])
def test_radix_order_stats_equal_the_sorted_ones(grid):
    g = torch.Generator().manual_seed(2)
    delta = torch.cat([torch.randn(3000, generator=g), torch.zeros(50), -torch.zeros(50),
                       torch.full((30,), 0.25), torch.tensor([float("inf"), -float("inf")])])
    stats = MagnitudeOrderStats.from_delta(delta, grid)
    ordered = torch.sort(delta.abs()).values
    if grid is None or delta.numel() <= grid:
        assert stats.ranks is None and torch.equal(stats.values, ordered)
    else:
        assert torch.equal(stats.values, ordered[stats.ranks])
        assert torch.equal(stats.below, torch.searchsorted(ordered, stats.values))


def test_compile_failure_falls_back_to_the_eager_path(family, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    base, experts = family
    mat = Materializer.from_folders(base, experts, device="cpu", seed=7, order_stats_grid=GRID, compile=True)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        coeffs = layerwise(3, **CASES[method])
        mat.apply(method, coeffs)
        assert_state_close(mat, reference_state(family, method, coeffs))
    assert not mat._ops.compile


def test_one_compiled_graph_per_variant_not_per_tensor(family):
    """Every tensor shape shares the dynamic-shape graph of its variant (fused_masked: TIES; bracket_counts)."""
    from torch._dynamo.utils import counters

    base, experts = family
    mat = Materializer.from_folders(base, experts, device="cpu", seed=7, order_stats_grid=GRID, compile=True)
    sizes = {s.base.numel() for s in mat.tensors if s.base.numel() > GRID}
    assert len(sizes) >= 2  # several shapes take the fused path
    torch._dynamo.reset()
    counters.clear()
    rng = np.random.default_rng(3)
    for _ in range(2):
        mat.apply("ties", weight=rng.uniform(0.1, 1, (3, 3)), density=rng.uniform(0.2, 0.9, (3, 3)))
    assert mat._ops.compile
    # dynamic shapes, no graph per tensor size: one for fused_masked (TIES), one for the bracket counts
    assert counters["stats"]["unique_graphs"] == 2


def test_num_threads_is_set_while_applying_and_restored(family):
    base, experts = family
    mat = Materializer.from_folders(base, experts, device="cpu", compile=False, num_threads=1)
    before = torch.get_num_threads()
    seen = []
    original = mat._apply_tensor

    def spy(*args):
        seen.append(torch.get_num_threads())
        return original(*args)

    mat._apply_tensor = spy
    mat.apply("task_arithmetic", weight=[0.3, 0.3, 0.3])
    assert set(seen) == {1}
    assert torch.get_num_threads() == before
