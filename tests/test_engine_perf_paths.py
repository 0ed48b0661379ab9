"""The fast paths of `evomerge merge` give the pure kernels' numbers.

* `sparsify.rank_window` (sampled bracket + count + kthvalue on the bracket) selects exactly the
  entries of `magnitude_mask` / `magnitude_outliers_mask`, ties broken by flat index;
* the engine's fused path (pread into reused buffers, exact rank windows, fused chunked passes on
  a thread pool) writes the same tensors as the engine's pure-kernel path, bit for bit (up to the
  L1 rescale's summation order), which tests/test_merge_yaml.py checks against mergekit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge import engine, masked
from evomerge.merge.checkpoint import ModelFolder
from evomerge.merge.checkpoint import SafetensorsReader
from evomerge.merge.engine import FUSED_METHODS, merge_recipe
from evomerge.merge.sparsify import (
    _magnitudes,
    _rank_window_mask,
    magnitude_keep_count,
    magnitude_mask,
    magnitude_outliers_mask,
    magnitude_rank_bounds,
    outlier_window,
    rank_window,
)
from evomerge.testing import llama_config, make_family

# vocab 4096 x hidden 64 = 262144-entry embedding and head: above 4 x the default sample size of
# 65536 would be needed for the sampled bracket, so the engine tests lower it (see `small_sample`).
MID_CONFIG = dict(hidden=64, layers=3, heads=4, intermediate=160, vocab=4096)


def tied_tensor(n: int, levels: int, generator: torch.Generator) -> torch.Tensor:
    """Integers in [-levels, levels] / 8: few distinct magnitudes, so every threshold is a tie."""
    return torch.randint(-levels, levels + 1, (n,), generator=generator).float() / 8


# ----------------------------------------------------------------------------- rank windows

@pytest.mark.parametrize("seed", range(8))
def test_rank_window_selects_the_top_k_mask_exactly_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(100, 1_200, (1,), generator=g))
    x = tied_tensor(rows * 50, levels=int(torch.randint(1, 40, (1,), generator=g)), generator=g).reshape(rows, 50)
    for density in (0.01, 0.3, 0.5, 0.77, 0.999):
        k = magnitude_keep_count(x.numel(), density)
        window = rank_window(x, x.numel() - k, x.numel(), sample_size=256)  # sampled path: numel > 4 * 256
        assert torch.equal(window.mask(x), magnitude_mask(x, density))
        assert int(window.mask(x).sum()) == k


@pytest.mark.parametrize("seed", range(6))
def test_rank_window_selects_the_breadcrumbs_window_exactly_with_many_ties(seed):
    g = torch.Generator().manual_seed(100 + seed)
    x = tied_tensor(40_000, levels=int(torch.randint(1, 30, (1,), generator=g)), generator=g)
    for density, gamma in ((0.5, 0.01), (0.9, 0.05), (0.2, 0.3), (0.0001, 0.5)):
        start, stop = outlier_window(x.numel(), density, gamma)
        window = rank_window(x, start, stop, sample_size=512)
        assert torch.equal(window.mask(x), magnitude_outliers_mask(x, density, gamma))


def test_rank_window_matches_the_selection_path_on_continuous_values():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300_001, generator=g)
    for start, stop in ((0, 300_001), (150_000, 300_001), (1, 2), (299_999, 300_000), (10, 290_000), (5, 5)):
        window = rank_window(x, start, stop, sample_size=4096)
        expected = _rank_window_mask(_magnitudes(x), start, stop)
        assert torch.equal(window.mask(x), expected)
        assert window.cuts(x.numel()) == []  # no ties: only thresholds


def test_rank_bounds_fall_back_to_full_selection_when_the_bracket_misses():
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(50_000, generator=g), torch.full((50_000,), 7.0)])  # half the mass tied
    ranks = [0, 1_000, 49_999, 50_000, 77_777, 99_999]
    sorted_magnitudes = x.abs().sort().values
    for z in (0.0, 5.0):  # z = 0: a bracket of a few sample ranks, which mostly misses
        for bound in magnitude_rank_bounds(x, ranks, sample_size=1024, z=z):
            value = sorted_magnitudes[bound.rank]
            assert bound.value == float(value)
            assert bound.below == int((x.abs() < value).sum())
            assert bound.equal == int((x.abs() == value).sum())


def test_rank_bounds_reject_ranks_out_of_range():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 10\)"):
        magnitude_rank_bounds(torch.ones(10), [10])


# ----------------------------------------------------------------------------- the engine's fused path

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("perf"), n_experts=3, seed=5, delta_scale=0.2,
                       config=llama_config(**MID_CONFIG))


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """Base on a 1/64 grid and experts = base + k/64 with few k: expert - base is exact and tied everywhere."""
    base, experts = make_family(tmp_path_factory.mktemp("tied"), n_experts=3, seed=6,
                                config=llama_config(**MID_CONFIG))
    base_file = base / "model.safetensors"
    base_state = {name: (t * 64).round() / 64 for name, t in load_file(base_file).items()}
    save_file(base_state, base_file, metadata={"format": "pt"})
    g = torch.Generator().manual_seed(7)
    for index, expert in enumerate(experts):
        levels = 2 + 3 * index
        state = {name: t + torch.randint(-levels, levels + 1, t.shape, generator=g).float() / 64
                 for name, t in base_state.items()}
        save_file(state, expert / "model.safetensors", metadata={"format": "pt"})
    return base, experts


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks and random-draw chunks far smaller than the tensors, and a sample small enough that
    the 262144-entry tensors take the sampled-bracket path."""
    monkeypatch.setattr(engine, "FUSED_CHUNK_SIZE", 10_000)
    defaults = list(magnitude_rank_bounds.__kwdefaults__.items())
    monkeypatch.setattr(magnitude_rank_bounds, "__kwdefaults__", {**dict(defaults), "sample_size": 4096})


def recipe(method: str, base: Path, experts: list[Path], params: dict | None = None, dtype: str = "float32") -> dict:
    weights = ([0.9, 0.3, 0.6], [0.2, 1.0], 0.5)
    densities = ([0.3, 0.7, 0.5], 0.6, [0.9, 0.1])
    models = [{"model": str(base)}]
    for e, w, d in zip(experts, weights, densities):
        p = {"weight": w, "density": d}
        if method.startswith("breadcrumbs"):
            p["gamma"] = 0.02
        models.append({"model": str(e), "parameters": p})
    config = {"merge_method": method, "base_model": str(base), "models": models, "dtype": dtype, "seed": 9}
    if method == "task_arithmetic":
        for m in models[1:]:
            m["parameters"].pop("density")
    if params:
        config["parameters"] = params
    return config


def merge_both(tmp_path: Path, config: dict, **kwargs) -> tuple[ModelFolder, ModelFolder]:
    fused = merge_recipe(config, tmp_path / "fused", progress=False, fused_min_elements=1, workers=2, **kwargs)
    pure = merge_recipe(config, tmp_path / "pure", progress=False, fused_min_elements=None)
    return ModelFolder.open(fused.out_dir), ModelFolder.open(pure.out_dir)


def assert_same(fused: ModelFolder, pure: ModelFolder, exact: bool = True) -> None:
    assert fused.tensor_names() == pure.tensor_names()
    for name in pure.tensor_names():
        a, b = fused.get_tensor(name), pure.get_tensor(name)
        assert a.dtype == b.dtype
        if exact:
            assert torch.equal(a, b), f"{name}: {int((a != b).sum())} entries differ"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_fused_methods_are_the_task_arithmetic_rows_it_can_run():
    assert set(FUSED_METHODS) == {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                  "breadcrumbs_ties"}


@pytest.mark.parametrize("method", sorted(FUSED_METHODS))
def test_fused_engine_equals_the_pure_kernels(tmp_path, family, small_chunks, method):
    base, experts = family
    params = {"rescale": False} if method.startswith("dare") else None  # rescale: see the next test
    assert_same(*merge_both(tmp_path, recipe(method, base, experts, params)))


@pytest.mark.parametrize("method,params", [
    ("ties", {"normalize": False, "lambda": 1.3}),
    ("ties", {"rescale": True}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("dare_ties", None),  # rescale on by default
    ("dare_linear", {"normalize": True}),
    ("breadcrumbs_ties", {"rescale": True, "normalize": True}),
])
def test_fused_engine_shared_parameters(tmp_path, family, small_chunks, method, params):
    base, experts = family
    rescaled = (params or {}).get("rescale", method.startswith("dare"))
    assert_same(*merge_both(tmp_path, recipe(method, base, experts, params)), exact=not rescaled)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs"])
def test_fused_engine_breaks_threshold_ties_like_the_pure_kernel(tmp_path, tied_family, small_chunks, monkeypatch,
                                                                  method):
    base, experts = tied_family
    name = "model.embed_tokens.weight"
    delta = ModelFolder.open(experts[0]).get_tensor(name) - ModelFolder.open(base).get_tensor(name)
    assert delta.abs().unique().numel() <= 3  # every threshold is shared by many entries
    cuts = []

    def spy(tensor, start, stop, **options):
        window = rank_window(tensor, start, stop, **options)
        cuts.extend(window.cuts(tensor.numel()))
        return window

    monkeypatch.setattr(masked, "rank_window", spy)  # the planner's windows: ties split at a cut index
    fused, pure = merge_both(tmp_path, recipe(method, base, experts))
    assert cuts, "no threshold tie was split at a cut"
    assert_same(fused, pure)


def test_fused_engine_half_precision_checkpoints(tmp_path, small_chunks):
    base, experts = make_family(tmp_path / "bf16", n_experts=3, seed=8, delta_scale=0.2, dtype=torch.bfloat16,
                                config=llama_config(**MID_CONFIG))
    for dtype in ("bfloat16", "float32"):
        config = recipe("ties", base, experts, dtype=dtype)
        assert_same(*merge_both(tmp_path / dtype, config))


def test_fused_engine_tied_embeddings_and_shards(tmp_path, small_chunks):
    base, experts = make_family(tmp_path / "tied_head", n_experts=2, seed=9, max_shard_size="300KB",
                                config=llama_config(tie_word_embeddings=True, **MID_CONFIG))
    assert (base / "model.safetensors.index.json").is_file()
    config = recipe("dare_linear", base, experts, {"rescale": False})
    assert_same(*merge_both(tmp_path, config))


def test_reader_reads_what_the_model_folder_reads(tmp_path):
    base, _ = make_family(tmp_path, n_experts=1, seed=2, max_shard_size="200KB", dtype=torch.bfloat16,
                          config=llama_config(**MID_CONFIG))
    folder = ModelFolder.open(base)
    reader = SafetensorsReader(folder)
    try:
        for name in folder.tensor_names():
            expected = folder.get_tensor(name)
            out = torch.empty(expected.numel(), dtype=reader.dtype(name))
            reader.read(name, out)
            assert torch.equal(out.view(expected.shape), expected)
    finally:
        reader.close()


def test_random_draws_in_chunks_are_one_draw():
    """The fused path draws DARE's uniforms chunk by chunk from each expert's generator; torch's
    CPU generator must give the same stream as one `torch.rand(n)` (the pure kernel's draw)."""
    from evomerge.merge.kernels import mask_generator

    n = 100_003
    whole = torch.rand(n, generator=mask_generator(1, "t", 0))
    generator = mask_generator(1, "t", 0)
    parts = [torch.rand(min(7_919, n - s), generator=generator) for s in range(0, n, 7_919)]
    assert torch.equal(torch.cat(parts), whole)


def test_engine_restores_torch_threads(tmp_path, family):
    base, experts = family
    before = torch.get_num_threads()
    merge_recipe(recipe("ties", base, experts), tmp_path / "out", progress=False, fused_min_elements=1, workers=2)
    assert torch.get_num_threads() == before
