"""Our merge kernels against mergekit 0.1.5's own functions, at tensor level.

Deterministic methods must agree to 1e-6 relative. DARE and DELLA draw from different RNGs
(mergekit: the global torch RNG; us: per-tensor generators), so they are compared twice:
exactly, by feeding mergekit's pipeline our masks, and statistically, on keep rates and the L1 rescale.

mergekit is imported, not skipped when missing: `make test` installs it (the `dev` extra), so a
missing mergekit must fail these tests rather than quietly drop the parity checks.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import mergekit.merge_methods.generalized_task_arithmetic as mk_gta
import mergekit.sparsify as mk_sparsify
import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.slerp import slerp as mk_slerp
from mergekit.sparsify import RescaleNorm, SparsificationMethod

from evomerge.merge import sparsify as S
from evomerge.merge.kernels import (
    KERNELS,
    TASK_ARITHMETIC_RECIPES,
    KernelOptions,
    generalized_task_arithmetic,
    mask_generator,
    merge_tensor,
    method_defaults,
)

RTOL = 1e-6
DETERMINISTIC_TASK_METHODS = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM_TASK_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors on a shared 2-core machine: thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(ours, theirs, rtol=RTOL):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max().clamp(min=1e-30)))


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def mergekit_merge(method, base, experts, parameters, base_index=0):
    """Run a registered mergekit method on one TensorGroup (base first, then the experts)."""
    tensors = [base, *experts] if base is not None else list(experts)
    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="w")
    (merged,) = mk_registry.get(method)([group], parameters=parameters)
    return merged


# ----------------------------------------------------------------------------- sparsifiers

@pytest.mark.parametrize("shape", [(1000,), (30, 40), (4, 5, 6)])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_matches_mergekit(shape, rescale):
    x = randn(*shape, seed=1)
    for density in (0.0, 0.0001, 0.01, 0.1, 0.5, 0.9, 1.0):
        theirs = mk_sparsify.magnitude(x, density, rescale_norm=RescaleNorm.l1 if rescale else None)
        assert_close(S.magnitude(x, density, rescale=rescale), theirs)


def test_magnitude_keeps_at_least_one_entry_like_mergekit():
    x = torch.tensor([0.1, -0.5, 0.2])  # int(0.1 * 3) = 0, both keep the largest
    theirs = mk_sparsify.magnitude(x, 0.1)
    assert theirs.tolist() == [0.0, -0.5, 0.0]
    assert torch.equal(S.magnitude(x, 0.1), theirs)


@pytest.mark.parametrize("shape", [(1000,), (25, 40)])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_outliers_matches_mergekit(shape, rescale):
    x = randn(*shape, seed=2)
    norm = RescaleNorm.l1 if rescale else None
    # includes density + gamma > 1 (outlier removal reduced) and gamma * numel < 1 (no outlier dropped)
    for density, gamma in itertools.product((0.0, 0.01, 0.3, 0.9, 1.0), (0.0, 0.0005, 0.01, 0.2)):
        theirs = mk_sparsify.magnitude_outliers(x, density, rescale_norm=norm, gamma=gamma)
        ours = S.magnitude_outliers(x, density, gamma, rescale=rescale)
        assert_close(ours, theirs)  # int(density * numel) >= 1 here, so the defaults agree too


def test_breadcrumbs_tiny_tensor_mergekit_zeroes_ours_keeps_one():
    x = torch.tensor([0.3, -0.1, 0.2, 0.5])
    # density 0.2: int(0.8) = 0 kept -> mergekit zeroes everything
    assert mk_sparsify.magnitude_outliers(x, 0.2, gamma=0.01).count_nonzero() == 0
    compat = S.magnitude_outliers(x, 0.2, 0.01, keep_at_least_one=False)
    assert torch.equal(compat, mk_sparsify.magnitude_outliers(x, 0.2, gamma=0.01))
    assert S.magnitude_outliers(x, 0.2, 0.01).tolist() == [0.0, 0.0, 0.0, 0.5]
    # density 0.3: int(1.2) = 1 kept, gamma * 4 < 1 drops no outlier: both keep the largest
    assert torch.equal(S.magnitude_outliers(x, 0.3, 0.01), mk_sparsify.magnitude_outliers(x, 0.3, gamma=0.01))
    # through the kernel
    base, experts = torch.zeros(4), x[None]
    params = {"weight": [1.0], "density": [0.2], "gamma": [0.01]}
    theirs = mergekit_merge("breadcrumbs", base, experts, params)
    assert theirs.count_nonzero() == 0
    ours_compat = merge_tensor("breadcrumbs", base, experts, options=KernelOptions.mergekit_compatible(), **params)
    assert torch.equal(ours_compat, theirs)
    assert merge_tensor("breadcrumbs", base, experts, **params).count_nonzero() == 1


def test_rescale_l1_matches_mergekit_rescaled_masked_tensor():
    x = randn(500, seed=3)
    mask = torch.rand(500, generator=torch.Generator().manual_seed(4)) < 0.3
    assert_close(S.rescale_l1(x, mask), mk_sparsify.rescaled_masked_tensor(x, mask.float(), RescaleNorm.l1))
    tiny = x * 1e-10  # L1 below eps: neither rescales
    assert_close(S.rescale_l1(tiny, mask), mk_sparsify.rescaled_masked_tensor(tiny, mask.float(), RescaleNorm.l1))


# ----------------------------------------------------------------------------- task arithmetic pipeline

TASK_CASES = [
    {},
    {"normalize": True},
    {"normalize": False, "lambda_": 0.6},
    {"rescale": True},
    {"weights": [0.5, -0.5, 0.0], "normalize": True},  # divisor 0 -> 1
    {"weights": [1.0, 2.0, -0.7], "normalize": True, "lambda_": 1.3},
]


@pytest.mark.parametrize("case", TASK_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("method", DETERMINISTIC_TASK_METHODS)
def test_deterministic_task_arithmetic_matches_mergekit(method, case):
    base = randn(20, 30, seed=5)
    experts = base + randn(3, 20, 30, seed=6)
    ours_kwargs = {"weight": case.get("weights", [0.7, 0.4, 1.1])}
    if method != "task_arithmetic":
        ours_kwargs["density"] = [0.2, 0.5, 0.8]
    if "breadcrumbs" in method:
        ours_kwargs["gamma"] = [0.0, 0.05, 0.1]
    for key in ("normalize", "rescale", "lambda_"):
        if key in case:
            ours_kwargs[key] = case[key]
    theirs_parameters = {("lambda" if k == "lambda_" else k): v for k, v in ours_kwargs.items()}
    theirs = mergekit_merge(method, base, experts, theirs_parameters)
    assert_close(merge_tensor(method, base, experts, **ours_kwargs), theirs)


def test_count_consensus_matches_mergekit():
    mergekit_ties_count = mk_gta.GeneralizedTaskArithmeticMerge(
        consensus_method=mk_gta.ConsensusMethod.count,
        sparsification_method=SparsificationMethod.magnitude,
        default_normalize=True,
        default_rescale=False,
        method_name="ties_count",
        method_pretty_name=None,
        method_reference_url=None,
    )
    base = randn(15, 16, seed=7)
    experts = base + randn(4, 15, 16, seed=8)
    weights, densities = [0.3, 1.2, 0.8, 0.5], [0.3, 0.6, 0.9, 0.5]
    group = TensorGroup.from_tensors([base, *experts], base_index=0, name="w")
    (theirs,) = mergekit_ties_count([group], parameters={"weight": weights, "density": densities})
    recipe = dataclasses.replace(TASK_ARITHMETIC_RECIPES["ties"], consensus="count")
    ours = generalized_task_arithmetic(base, experts, recipe, weight=weights, density=densities)
    assert_close(ours, theirs)
    assert not torch.allclose(ours, merge_tensor("ties", base, experts, weight=weights, density=densities))


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_sign_election_ties_match_mergekit(consensus):
    """Integer deltas make many summed signs (and sign counts) exactly 0, which elects +."""
    generator = torch.Generator().manual_seed(26)
    base = torch.zeros(200)
    experts = torch.randint(-2, 3, (4, 200), generator=generator).float()
    weights = [1.0, 1.0, 2.0, 1.0]  # density 1: no magnitude ties to break
    method = mk_gta.GeneralizedTaskArithmeticMerge(
        consensus_method=mk_gta.ConsensusMethod(consensus),
        sparsification_method=None,
        default_normalize=True,
        default_rescale=False,
        method_name=f"consensus_{consensus}",
        method_pretty_name=None,
        method_reference_url=None,
    )
    group = TensorGroup.from_tensors([base, *experts], base_index=0, name="w")
    (theirs,) = method([group], parameters={"weight": weights})
    recipe = dataclasses.replace(
        TASK_ARITHMETIC_RECIPES["task_arithmetic"], consensus=consensus, default_normalize=True
    )
    ours = generalized_task_arithmetic(base, experts, recipe, weight=weights)
    assert (torch.stack([w * e for w, e in zip(weights, experts)]).sum(0) == 0).sum() > 10
    assert_close(ours, theirs)


@pytest.mark.parametrize("method", RANDOM_TASK_METHODS)
@pytest.mark.parametrize("normalize", [None, True, False])
def test_random_task_arithmetic_matches_mergekit_given_our_masks(method, normalize, monkeypatch):
    """mergekit's pipeline, with its sparsify replaced by our masks + its own rescale, equals our kernel."""
    seed, name = 11, "model.layers.0.self_attn.q_proj.weight"
    calls = itertools.count()

    def sparsify_with_our_masks(tensor, density, method, gamma=0, epsilon=0, rescale_norm=None):
        generator = mask_generator(seed, name, next(calls), tensor.device)
        if density >= 1:
            return tensor
        if method == SparsificationMethod.random:
            mask = S.bernoulli_mask(tensor.shape, density, generator=generator)
        else:
            mask = S.della_mask(tensor, density, epsilon, generator=generator)
        return mk_sparsify.rescaled_masked_tensor(tensor, mask.to(tensor.dtype), rescale_norm)

    monkeypatch.setattr(mk_gta, "sparsify", sparsify_with_our_masks)
    base = randn(12, 40, seed=9)
    experts = base + randn(3, 12, 40, seed=10)
    kwargs = {"weight": [0.9, -0.3, 0.6], "density": [0.3, 0.5, 1.0]}
    if "della" in method:
        kwargs["epsilon"] = [0.1, 0.2, 0.15]
    if normalize is not None:
        kwargs["normalize"] = normalize
    theirs = mergekit_merge(method, base, experts, kwargs)
    assert next(calls) == 3
    ours = merge_tensor(method, base, experts, seed=seed, tensor_name=name, **kwargs)
    assert_close(ours, theirs)


def test_dare_keep_rate_and_l1_rescale_match_mergekit_statistically():
    n, density = 100_000, 0.3
    x = randn(n, seed=12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = mk_sparsify.bernoulli(x, density, rescale_norm=RescaleNorm.l1)
    ours = S.bernoulli(x, density, generator=mask_generator(0, "w", 0), rescale=True)
    standard_error = math.sqrt(density * (1 - density) / n)
    for out in (theirs, ours):
        kept = out != 0
        assert abs(kept.double().mean().item() - density) < 5 * standard_error
        torch.testing.assert_close(out.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)  # L1 norm preserved
        torch.testing.assert_close(out[kept], x[kept] * (x.abs().sum() / x[kept].abs().sum()))  # one factor


def test_della_keep_rate_by_rank_and_l1_rescale_match_mergekit_statistically():
    rows, columns, density, epsilon = 100, 1000, 0.4, 0.15
    x = randn(rows, columns, seed=13)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = mk_sparsify.della_magprune(x, density, epsilon, rescale_norm=RescaleNorm.l1)
    ours = S.della_magprune(x, density, epsilon, generator=mask_generator(0, "w", 0), rescale=True)
    # rank fraction within each row, 0 = smallest |x|; ten rank bands of 100 columns x 100 rows each
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).double() / (columns - 1)
    band = (ranks * 10).clamp(max=9.999).long()
    for out in (theirs, ours):
        kept = (out != 0).double()
        assert abs(kept.mean().item() - density) < 5 * math.sqrt(density * (1 - density) / x.numel())
        for b in range(10):
            in_band = band == b
            expected = (density - epsilon + 2 * epsilon * ranks[in_band]).mean().item()
            standard_error = math.sqrt(expected * (1 - expected) / int(in_band.sum()))
            assert abs(kept[in_band].mean().item() - expected) < 5 * standard_error
        torch.testing.assert_close(out.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "tensor, density, epsilon",
    [
        (torch.tensor(2.0), 0.5, 0.1),            # 0-d: IndexError in mergekit
        (torch.tensor([3.0]), 0.5, 0.1),          # one row of one entry: NaN probability
        (randn(3, 1, seed=23), 0.5, 0.1),         # rows of one entry
        (randn(4, 4, seed=24), 0.1, 0.15),        # density - epsilon <= 0: ValueError
        (randn(4, 4, seed=25), 0.9, 0.1),         # density + epsilon >= 1: ValueError
    ],
)
def test_della_fails_in_mergekit_exactly_where_our_strict_option_raises(tensor, density, epsilon):
    with pytest.raises(Exception):
        mk_sparsify.della_magprune(tensor, density, epsilon)
    generator = mask_generator(0, "w", 0)
    with pytest.raises(ValueError, match="mergekit"):
        S.della_magprune(tensor, density, epsilon, generator=generator, mergekit_errors=True)
    ours = S.della_magprune(tensor, density, epsilon, generator=generator)
    assert ours.shape == tensor.shape and torch.isfinite(ours).all()


@pytest.mark.parametrize("shape", [(8, 9), (50,), (3, 4, 5)])
def test_della_strict_option_accepts_what_mergekit_accepts_and_agrees_with_it(shape, monkeypatch):
    """Where mergekit runs, the strict option runs too, changes nothing, and mergekit's keep
    probabilities and (given our draws) its output are ours."""
    x = randn(*shape, seed=14)
    strict = S.della_magprune(x, 0.5, 0.2, generator=mask_generator(0, "w", 0), mergekit_errors=True)
    assert torch.equal(strict, S.della_magprune(x, 0.5, 0.2, generator=mask_generator(0, "w", 0)))
    mask = S.della_mask(x, 0.5, 0.2, generator=mask_generator(0, "w", 0))
    probabilities_seen = []

    def bernoulli_with_our_mask(probabilities):
        probabilities_seen.append(probabilities)
        return mask.reshape(probabilities.shape).to(probabilities.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli_with_our_mask)  # mergekit draws through torch.bernoulli
    theirs = mk_sparsify.della_magprune(x, 0.5, 0.2)  # no error in mergekit
    (probabilities,) = probabilities_seen
    assert_close(S.della_keep_probabilities(x, 0.5, 0.2, mergekit_errors=True), probabilities.reshape(shape))
    assert 0 < int(mask.sum()) < x.numel()
    assert torch.equal(strict, theirs)


# ----------------------------------------------------------------------------- linear and slerp

@pytest.mark.parametrize("normalize", [None, True, False])
def test_linear_over_every_listed_model_matches_mergekit(normalize):
    base = randn(10, 12, seed=15)
    others = base + randn(2, 10, 12, seed=16)
    listed = torch.cat([base[None], others])  # the base is a listed model with its own weight
    weights = [0.5, 0.2, 0.9]
    parameters = {"weight": weights} | ({} if normalize is None else {"normalize": normalize})
    theirs = mergekit_merge("linear", None, listed, parameters, base_index=None)
    assert_close(merge_tensor("linear", base, listed, **parameters), theirs)


def test_linear_half_precision_matches_mergekit():
    listed = randn(3, 64, seed=17, dtype=torch.bfloat16)
    theirs = mergekit_merge("linear", None, listed, {"weight": [1.0, 2.0, 0.5]}, base_index=None)
    ours = merge_tensor("linear", None, listed, weight=[1.0, 2.0, 0.5])
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)  # one bf16 ulp at most


def slerp_pairs():
    a = randn(30, 20, seed=18)
    return {
        "random": (a, randn(30, 20, seed=19)),
        "nearly_collinear": (a, 2 * a + 1e-3 * randn(30, 20, seed=20)),  # cos 0.9999999: lerp
        "above_threshold": (a, a + 0.025 * randn(30, 20, seed=21)),  # cos ~0.9997: lerp
        "below_threshold": (a, a + 0.04 * randn(30, 20, seed=21)),  # cos ~0.9992: the arc
        "antipodal": (a, -a),
        "zero_base": (torch.zeros(30, 20), a),
        "float64": (a.double(), randn(30, 20, seed=22).double()),
    }


@pytest.mark.parametrize("pair", list(slerp_pairs()))
def test_slerp_matches_mergekit(pair):
    v0, v1 = slerp_pairs()[pair]
    for t in (0.0, 0.3, 0.5, 1.0, 1.2):
        theirs = mk_slerp(torch.tensor([t]), v0[None], v1[None])[0]
        ours = merge_tensor("slerp", v0, v1[None], t=t)
        assert ours.dtype == theirs.dtype
        assert_close(ours, theirs)
    theirs = mergekit_merge("slerp", v0, v1[None], {"t": 0.4})
    assert_close(merge_tensor("slerp", v0, v1[None], t=0.4), theirs)


# ----------------------------------------------------------------------------- registry and defaults

@pytest.mark.parametrize("method", sorted(KERNELS))
def test_method_defaults_match_mergekit_spec(method):
    spec = mk_registry.get(method).spec
    theirs = {
        ("lambda_" if p.name == "lambda" else p.name): p.default
        for p in spec.parameters
        if not p.required and p.name != "int8_mask"
    }
    assert method_defaults(method) == theirs
