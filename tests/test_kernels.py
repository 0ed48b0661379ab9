"""Merge kernels: hand-worked examples, a plain float64 numpy reference, and merge properties.

Parity with mergekit itself is in test_kernels_mergekit_parity.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from evomerge.merge import sparsify as S
from evomerge.merge.kernels import (
    KERNELS,
    TASK_ARITHMETIC_RECIPES,
    KernelOptions,
    generalized_task_arithmetic,
    get_kernel,
    mask_generator,
    merge_tensor,
    method_defaults,
    register_kernel,
    sign_consensus,
    task_vectors,
)

ALL_METHODS = sorted(KERNELS)
TASK_METHODS = sorted(TASK_ARITHMETIC_RECIPES)
RANDOM_METHODS = ["dare_linear", "dare_ties", "della", "della_linear"]
SPARSIFYING_METHODS = [m for m in TASK_METHODS if TASK_ARITHMETIC_RECIPES[m].sparsifier is not None]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors on a shared 2-core machine: thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def typical_kwargs(method: str, k: int) -> dict:
    """Non-trivial parameters each method accepts (densities inside DELLA's (eps, 1 - eps))."""
    if method == "slerp":
        return {"t": 0.3}
    weights = [0.7, -0.4, 1.1, 0.5][:k]
    if method == "linear":
        return {"weight": weights}
    kwargs = {"weight": weights, "density": [0.5, 0.4, 0.6, 0.45][:k], "tensor_name": "layer.0.w"}
    if "breadcrumbs" in method:
        kwargs["gamma"] = [0.05, 0.1, 0.0, 0.02][:k]
    if "della" in method:
        kwargs["epsilon"] = [0.1, 0.2, 0.15, 0.05][:k]
    return kwargs


def random_inputs(method: str, shape=(6, 7), k=3, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k = 1 if method == "slerp" else k
    base = torch.randn(shape, generator=generator).to(dtype)
    experts = (base.float() + torch.randn((k, *shape), generator=generator)).to(dtype)
    return base, experts


# ----------------------------------------------------------------------------- hand-worked examples

def test_linear_hand_worked():
    # (1 * [1, 2, -3] + 3 * [3, 0, 1]) = [10, 2, 0]; normalized by 1 + 3 = 4 -> [2.5, 0.5, 0]
    experts = t([[1, 2, -3], [3, 0, 1]])
    torch.testing.assert_close(merge_tensor("linear", None, experts, weight=[1, 3]), t([2.5, 0.5, 0.0]))
    unnormalized = merge_tensor("linear", None, experts, weight=[1, 3], normalize=False)
    torch.testing.assert_close(unnormalized, t([10.0, 2.0, 0.0]))


def test_task_arithmetic_hand_worked():
    # deltas [1, -1, 0, 2] and [-1, 1, 0, 1]; weighted by (1, 0.5) and summed: [0.5, -0.5, 0, 2.5]
    base = t([1, 1, 1, 1])
    experts = t([[2, 0, 1, 3], [0, 2, 1, 2]])
    merge = lambda **kw: merge_tensor("task_arithmetic", base, experts, weight=[1, 0.5], **kw)
    torch.testing.assert_close(merge(), t([1.5, 0.5, 1.0, 3.5]))
    torch.testing.assert_close(merge(lambda_=2.0), t([2.0, 0.0, 1.0, 6.0]))  # 1 + 2 * sum
    # normalize divides by 1.5: [1/3, -1/3, 0, 5/3]
    torch.testing.assert_close(merge(normalize=True), t([4 / 3, 2 / 3, 1.0, 8 / 3]))


def test_ties_hand_worked():
    # density 0.5 of 4 entries keeps the top 2 |delta|: [4, -3, 0, 0] and [-2, 0, 3, 0].
    # weights (1, 2): [4, -3, 0, 0], [-4, 0, 6, 0]; sums [0, -3, 6, 0] elect signs [+, -, +, +] (0 elects +).
    # Agreeing entries: e1 at 0 and 1, e2 at 2 -> mixed [4, -3, 6, 0]; agreeing weight [1, 1, 2, 0 -> 1].
    base = torch.zeros(4)
    experts = t([[4, -3, 2, -1], [-2, 1, 3, -0.5]])
    merged = merge_tensor("ties", base, experts, weight=[1, 2], density=[0.5, 0.5])
    torch.testing.assert_close(merged, t([4.0, -3.0, 3.0, 0.0]))
    unnormalized = merge_tensor("ties", base, experts, weight=[1, 2], density=[0.5, 0.5], normalize=False)
    torch.testing.assert_close(unnormalized, t([4.0, -3.0, 6.0, 0.0]))


def test_sign_consensus_sum_and_count_hand_worked():
    # weighted deltas 1, 1, -5: the sum (-3) elects -, the count of signs (+1 +1 -1) elects +
    weighted = t([[1.0], [1.0], [-5.0]])
    assert sign_consensus(weighted, "sum").squeeze(1).tolist() == [False, False, True]
    assert sign_consensus(weighted, "count").squeeze(1).tolist() == [True, True, False]
    count_ties = dataclasses.replace(TASK_ARITHMETIC_RECIPES["ties"], consensus="count")
    merged = generalized_task_arithmetic(torch.zeros(1), weighted, count_ties, weight=[1, 1, 1], normalize=False)
    torch.testing.assert_close(merged, t([2.0]))  # 1 + 1, the -5 disagrees


def test_rescale_l1_hand_worked():
    # kept |1| + |3| = 4 of a total 10 -> kept entries scaled by 2.5
    out = S.rescale_l1(t([1, -2, 3, -4]), torch.tensor([True, False, True, False]))
    torch.testing.assert_close(out, t([2.5, 0.0, 7.5, 0.0]))


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_ties_hand_worked_with_forced_masks(method):
    # density 1 keeps delta [1, -1, 2, 0] whole; density 0 drops the second expert entirely.
    # Consensus drops its weight from the divisor too: normalized result = e1 exactly.
    base = t([1, 1, 1, 1])
    experts = t([[2, 0, 3, 1], [5, 5, 5, 5]])
    merged = merge_tensor(method, base, experts, weight=[2, 1], density=[1.0, 0.0], normalize=True)
    torch.testing.assert_close(merged, t([2.0, 0.0, 3.0, 1.0]))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_linear_hand_worked_with_forced_masks(method):
    # unnormalized: base + 2 * [1, -1, 2, 0] = [3, -1, 5, 1]; normalized by 2 + 1: base + [2, -2, 4, 0] / 3
    base = t([1, 1, 1, 1])
    experts = t([[2, 0, 3, 1], [5, 5, 5, 5]])
    merge = lambda **kw: merge_tensor(method, base, experts, weight=[2, 1], density=[1.0, 0.0], **kw)
    torch.testing.assert_close(merge(), t([3.0, -1.0, 5.0, 1.0]))
    torch.testing.assert_close(merge(normalize=True), t([5 / 3, 1 / 3, 7 / 3, 1.0]))


def test_dare_keep_rate_and_l1_rescale():
    # One expert, weight 1, no normalize: result - base is the rescaled delta itself.
    n, density = 100_000, 0.3
    base = torch.zeros(n)
    delta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    out = merge_tensor("dare_linear", base, delta[None], weight=[1.0], density=[density], tensor_name="w")
    kept = out != 0
    standard_error = math.sqrt(density * (1 - density) / n)
    assert abs(kept.float().mean().item() - density) < 5 * standard_error
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    scale = delta.abs().sum() / delta[kept].abs().sum()  # one common factor, not 1 / density
    torch.testing.assert_close(out[kept], delta[kept] * scale)


def test_breadcrumbs_hand_worked():
    # 10 entries, density 0.5, gamma 0.1: keep 5, drop int(1.0) = 1 outlier, so ascending ranks 4..8.
    # e1 |.| = 1..10 keeps 5, -6, 7, -8, 9.  e2 |.| ranks: 0.1@4 0.2@3 0.3@2 0.4@1 0.5@0 0.6@5 ... 1.0@9,
    # ranks 4..8 are indices 0, 5, 6, 7, 8 -> keeps -0.5, 0.6, -0.7, 0.8, -0.9.
    base = torch.zeros(10)
    e1 = t([1, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    e2 = t([-0.5, 0.4, -0.3, 0.2, -0.1, 0.6, -0.7, 0.8, -0.9, 1.0])
    params = dict(weight=[1, 1], density=[0.5, 0.5], gamma=[0.1, 0.1])
    summed = merge_tensor("breadcrumbs", base, torch.stack([e1, e2]), **params)
    torch.testing.assert_close(summed, t([-0.5, 0, 0, 0, 5, -5.4, 6.3, -7.2, 8.1, 0]))
    # with TIES the summed signs are [-, +, +, +, +, -, +, -, +, +]; e2 agrees only at index 0
    elected = merge_tensor("breadcrumbs_ties", base, torch.stack([e1, e2]), **params)
    torch.testing.assert_close(elected, t([-0.5, 0, 0, 0, 5, -6, 7, -8, 9, 0]))


def test_della_keep_probabilities_hand_worked():
    # |row| = 0.1, 0.4, 0.2, 0.3 -> ranks 0, 3, 1, 2 of 3 -> 0.4 + 0.2 * rank / 3
    probabilities = S.della_keep_probabilities(t([0.1, -0.4, 0.2, 0.3]), 0.5, 0.1)
    torch.testing.assert_close(probabilities, t([0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3]))
    # 2-D: each row ranked on its own (along dim 1)
    probabilities = S.della_keep_probabilities(t([[3, 1], [-1, 2]]), 0.5, 0.2)
    torch.testing.assert_close(probabilities, t([[0.7, 0.3], [0.3, 0.7]]))


def test_slerp_hand_worked():
    base, other = t([2, 0]), t([0, 3])  # orthogonal: theta = pi / 2, sin(theta) = 1
    merged = merge_tensor("slerp", base, other[None], t=0.5)  # coefficients sin(pi/4) on the unnormalized inputs
    torch.testing.assert_close(merged, t([math.sqrt(2), 1.5 * math.sqrt(2)]))
    merged = merge_tensor("slerp", t([1, 0]), t([[0, 1]]), t=1 / 3)  # a third of the way round: (cos 30, sin 30)
    torch.testing.assert_close(merged, t([math.cos(math.pi / 6), 0.5]))
    # collinear (dot = 1) and antipodal (dot = -1) fall back to lerp
    torch.testing.assert_close(merge_tensor("slerp", t([1, 2]), t([[2, 4]]), t=0.25), t([1.25, 2.5]))
    torch.testing.assert_close(merge_tensor("slerp", t([1, 0]), t([[-1, 0]]), t=0.5), t([0.0, 0.0]))
    # cos = 2 / sqrt(4.0036) = 0.99955 > 0.9995: lerp [1.5, 0.03] (the arc would give 0.49997 * sum = [1.49992, ...])
    f64 = torch.float64
    torch.testing.assert_close(merge_tensor("slerp", t([1, 0], f64), t([[2, 0.06]], f64), t=0.5), t([1.5, 0.03], f64))
    # cos = 2 / sqrt(4.0049) = 0.99939 < 0.9995: the arc, theta = acos(0.99939),
    # each coefficient sin(theta / 2) / sin(theta)
    theta = math.acos(2 / math.sqrt(4.0049))
    coefficient = math.sin(theta / 2) / math.sin(theta)
    merged = merge_tensor("slerp", t([1, 0], f64), t([[2, 0.07]], f64), t=0.5)
    torch.testing.assert_close(merged, t([3 * coefficient, 0.07 * coefficient], f64))
    assert abs(merged[0].item() - 1.5) > 1e-5  # measurably not the lerp


# ----------------------------------------------------------------------------- float64 numpy reference

def reference_magnitude_mask(x: np.ndarray, density: float) -> np.ndarray:
    flat = np.abs(x).ravel()
    k = S.magnitude_keep_count(flat.size, density)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[flat.size - k:]] = True
    return keep.reshape(x.shape)


def reference_outlier_mask(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = np.abs(x).ravel()
    n = flat.size
    target = max(1, int(density * n))
    start = max(0, n - target - int(gamma * n))
    keep = np.zeros(n, bool)
    keep[np.argsort(flat, kind="stable")[start:start + target]] = True
    return keep.reshape(x.shape)


def reference_della_probabilities(x: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = np.abs(x) if x.ndim == 2 else np.abs(x).reshape(1, -1)
    out = np.empty_like(rows, dtype=np.float64)
    for r, row in enumerate(rows):
        order = np.argsort(row, kind="stable")
        for rank, column in enumerate(order):
            out[r, column] = density - epsilon + 2 * epsilon * rank / (len(row) - 1)
    return out.reshape(x.shape)


def reference_masks(method: str, deltas: np.ndarray, kwargs: dict) -> list[np.ndarray]:
    """Keep masks per expert; random ones are redrawn from the kernel's generators, probabilities from numpy."""
    sparsifier = TASK_ARITHMETIC_RECIPES[method].sparsifier
    masks = []
    for i, delta in enumerate(deltas):
        density = kwargs["density"][i]
        generator = mask_generator(0, kwargs["tensor_name"], i, "cpu")
        draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32).double().numpy()
        if sparsifier is None:
            masks.append(np.ones(delta.shape, bool))
        elif sparsifier == "magnitude":
            masks.append(reference_magnitude_mask(delta, density))
        elif sparsifier == "magnitude_outliers":
            masks.append(reference_outlier_mask(delta, density, kwargs["gamma"][i]))
        elif sparsifier == "random":
            masks.append(draws < np.float32(density))
        else:
            probabilities = reference_della_probabilities(delta, density, kwargs["epsilon"][i])
            masks.append(draws < probabilities.astype(np.float32))
    return masks


def reference_task_arithmetic(method, base, experts, kwargs, normalize, rescale, lambda_=1.0):
    recipe = TASK_ARITHMETIC_RECIPES[method]
    deltas = experts - base
    masks = reference_masks(method, deltas, kwargs)
    weights = np.asarray(kwargs["weight"], np.float64)
    weighted = []
    for delta, mask, w in zip(deltas, masks, weights):
        kept = delta * mask
        if rescale and np.abs(kept).sum() > 1e-7:
            kept = kept * np.abs(delta).sum() / np.abs(kept).sum()
        weighted.append(w * kept)
    weighted = np.stack(weighted)
    mixed = np.zeros(base.shape)
    divisor = np.zeros(base.shape)
    for index in np.ndindex(base.shape):
        column = weighted[(slice(None), *index)]
        if recipe.consensus == "sum":
            elected = 1.0 if column.sum() >= 0 else -1.0
            agree = np.sign(column) == elected
        else:
            agree = np.ones(len(column), bool)
        mixed[index] = column[agree].sum()
        divisor[index] = weights[agree].sum()
    if recipe.consensus is None:
        total = weights.sum()
        divisor[:] = 1.0 if abs(total) < 1e-8 else total
    divisor[divisor == 0] = 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("method", TASK_METHODS)
def test_task_arithmetic_family_matches_float64_reference(method, normalize):
    base, experts = random_inputs(method, shape=(9, 11), k=3, seed=2)
    kwargs = typical_kwargs(method, 3)
    rescale = TASK_ARITHMETIC_RECIPES[method].default_rescale
    ours = merge_tensor(method, base, experts, normalize=normalize, lambda_=0.8, **kwargs)
    expected = reference_task_arithmetic(method, base.double().numpy(), experts.double().numpy(), kwargs,
                                         normalize, rescale, lambda_=0.8)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", TASK_METHODS)
def test_float64_inputs_are_computed_in_float64(method):
    base, experts = random_inputs(method, shape=(5, 8), k=3, dtype=torch.float64, seed=3)
    kwargs = typical_kwargs(method, 3)
    defaults = method_defaults(method)
    ours = merge_tensor(method, base, experts, **kwargs)
    assert ours.dtype == torch.float64
    expected = reference_task_arithmetic(method, base.numpy(), experts.numpy(), kwargs,
                                         defaults["normalize"], defaults["rescale"])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_linear_and_slerp_match_float64_reference():
    base, experts = random_inputs("linear", shape=(4, 5), k=3, seed=4)
    weights = [0.2, 1.5, -0.3]
    x = experts.double().numpy()
    expected = sum(w * e for w, e in zip(weights, x)) / sum(weights)
    ours = merge_tensor("linear", base, experts, weight=weights).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)

    a, b = base.double().numpy().ravel(), experts[0].double().numpy().ravel()
    theta = math.acos(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    for fraction in (0.0, 0.3, 1.0, 1.4):  # t outside [0, 1] extrapolates along the arc
        expected = (math.sin((1 - fraction) * theta) * a + math.sin(fraction * theta) * b) / math.sin(theta)
        ours = merge_tensor("slerp", base, experts[:1], t=fraction).numpy().ravel()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_magnitude_and_outlier_masks_match_reference_on_3d_tensor():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(5))
    for density in (0.01, 0.2, 0.5, 0.93):
        assert np.array_equal(S.magnitude_mask(x, density).numpy(), reference_magnitude_mask(x.numpy(), density))
        for gamma in (0.0, 0.05, 0.5):
            ours = S.magnitude_outliers_mask(x, density, gamma).numpy()
            assert np.array_equal(ours, reference_outlier_mask(x.numpy(), density, gamma))


def test_magnitude_ties_break_by_index():
    # eight equal magnitudes, keep 3: the stable ascending order puts the last 3 indices on top
    mask = S.magnitude_mask(t([1, -1, 1, -1, 1, -1, 1, -1]), 3 / 8)
    assert mask.tolist() == [False] * 5 + [True] * 3
    x = torch.randint(-3, 4, (200,), generator=torch.Generator().manual_seed(6)).float()  # heavy ties
    for density in (0.1, 0.37, 0.8):
        assert np.array_equal(S.magnitude_mask(x, density).numpy(), reference_magnitude_mask(x.numpy(), density))
        assert np.array_equal(S.magnitude_outliers_mask(x, density, 0.1).numpy(),
                              reference_outlier_mask(x.numpy(), density, 0.1))


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("method", SPARSIFYING_METHODS)
def test_density_one_is_no_sparsification(method):
    base, experts = random_inputs(method, seed=7)
    kwargs = typical_kwargs(method, 3) | {"density": [1.0, 1.0, 1.0]}
    unsparsified = dataclasses.replace(TASK_ARITHMETIC_RECIPES[method], sparsifier=None)
    expected = generalized_task_arithmetic(base, experts, unsparsified, weight=kwargs["weight"])
    torch.testing.assert_close(merge_tensor(method, base, experts, **kwargs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", TASK_METHODS + ["linear"])
def test_one_hot_weights_with_normalize_return_that_expert(method):
    base, experts = random_inputs(method, seed=8)
    merged = merge_tensor(method, base, experts, weight=[0.0, 1.0, 0.0], normalize=True)
    torch.testing.assert_close(merged, experts[1])


@pytest.mark.parametrize("method", TASK_METHODS)
def test_single_expert(method):
    base, experts = random_inputs(method, k=1, seed=9)
    plain = merge_tensor(method, base, experts, weight=[0.7], normalize=False)
    torch.testing.assert_close(plain, base + 0.7 * (experts[0] - base))
    torch.testing.assert_close(merge_tensor(method, base, experts, weight=[0.7], normalize=True), experts[0])


def test_no_experts_returns_base_copy():
    base = torch.randn(3)
    merged = merge_tensor("ties", base, torch.empty(0, 3), weight=[])
    assert torch.equal(merged, base) and merged.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_randomness_is_keyed_by_seed_tensor_name_and_expert(method):
    base, experts = random_inputs(method, shape=(20, 30), seed=10)
    kwargs = typical_kwargs(method, 3)
    merge = lambda **kw: merge_tensor(method, base, experts, **(kwargs | kw))
    torch.testing.assert_close(merge(seed=5), merge(seed=5), rtol=0, atol=0)
    assert not torch.equal(merge(seed=5), merge(seed=6))
    assert not torch.equal(merge(seed=5, tensor_name="a"), merge(seed=5, tensor_name="b"))
    # the same expert twice gets two different masks (expert index is part of the key)
    twice = merge_tensor("dare_linear", base, experts[[0, 0]], weight=[1, 1], density=[0.5, 0.5], normalize=False)
    doubled = merge_tensor("dare_linear", base, experts[[0]], weight=[2], density=[0.5], normalize=False)
    assert not torch.equal(twice, doubled)


def test_mask_generator_is_a_stable_hash():
    # independent recomputation of the documented key: blake2b(seed, name, index), not Python's hash()
    digest = hashlib.blake2b(b"7\x00model.layers.3.mlp.up_proj.weight\x002", digest_size=8,
                             person=b"evomerge-mask").digest()
    expected_seed = int.from_bytes(digest, "little") & ((1 << 63) - 1)
    generator = mask_generator(7, "model.layers.3.mlp.up_proj.weight", 2, "cpu")
    assert generator.initial_seed() == expected_seed
    again = mask_generator(7, "model.layers.3.mlp.up_proj.weight", 2, "cpu")
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=again))
    names = {mask_generator(7, name, i).initial_seed() for name in ("a", "b") for i in range(3)}
    assert len(names) == 6


@pytest.mark.parametrize("method", ALL_METHODS)
def test_merge_leaves_global_rng_and_inputs_untouched(method):
    base, experts = random_inputs(method, seed=11)
    base_copy, experts_copy = base.clone(), experts.clone()
    rng_state = torch.get_rng_state()
    merge_tensor(method, base, experts, **typical_kwargs(method, experts.shape[0]))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(base, base_copy) and torch.equal(experts, experts_copy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_returns_input_dtype_computed_in_float32(method, dtype):
    base, experts = random_inputs(method, dtype=dtype, seed=12)
    kwargs = typical_kwargs(method, experts.shape[0])
    merged = merge_tensor(method, base, experts, **kwargs)
    assert merged.dtype == dtype
    # computed in float32: identical to merging the upcast inputs and casting the result
    expected = merge_tensor(method, base.float(), experts.float(), **kwargs).to(dtype)
    assert torch.equal(merged, expected)


# ----------------------------------------------------------------------------- errors and registry

@pytest.mark.parametrize(
    "method, kwargs, culprit",
    [
        ("ties", {"weight": [1, 1], "density": [0.5, 1.5]}, "density[1]"),
        ("dare_ties", {"weight": [1, 1], "density": [-0.1, 0.5]}, "density[0]"),
        ("breadcrumbs", {"weight": [1, 1], "density": [0.5, 0.5], "gamma": [-0.01, 0.1]}, "gamma[0]"),
        ("della", {"weight": [1, 1], "density": [0.5, 0.5], "epsilon": [0.1, -1.0]}, "epsilon[1]"),
        ("ties", {"weight": [1, 1, 1]}, "weight"),
        ("linear", {"weight": [1]}, "weight"),
        ("ties", {"weight": [1, float("nan")]}, "weight[1]"),
        ("ties", {"weight": [1, 1], "gamma": 0.1}, "gamma"),
        ("task_arithmetic", {"weight": [1, 1], "t": 0.5}, "t"),
        ("slerp", {"t": 0.5, "weight": [1]}, "weight"),
        ("slerp", {"t": 0.5}, "exactly one"),
        ("slerp", {}, "t"),
        ("linear", {"weight": [1, -1]}, "sum to 0"),
    ],
)
def test_bad_parameters_raise_naming_parameter_and_tensor(method, kwargs, culprit):
    base, experts = torch.zeros(4), torch.randn(2, 4)
    with pytest.raises(ValueError) as error:
        merge_tensor(method, base, experts, tensor_name="model.embed.weight", **kwargs)
    assert culprit in str(error.value) and "model.embed.weight" in str(error.value)


def test_shape_mismatch_names_shapes_and_tensor():
    with pytest.raises(ValueError, match=r"\(K, 4\).*\(2, 5\).*'lm_head'"):
        merge_tensor("ties", torch.zeros(4), torch.zeros(2, 5), weight=[1, 1], tensor_name="lm_head")


def test_registry_errors():
    with pytest.raises(ValueError) as error:
        get_kernel("tie")
    assert ", ".join(sorted(KERNELS)) in str(error.value)
    with pytest.raises(ValueError, match="already registered"):
        register_kernel("ties")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="unknown merge method"):
        method_defaults("nope")
    assert method_defaults("ties") == {"normalize": True, "rescale": False, "lambda_": 1.0, "density": 1.0}


# ----------------------------------------------------------------------------- deliberate differences

def test_breadcrumbs_tiny_tensor_option():
    # 64-entry bias at density 0.01: int(0.64) = 0 entries to keep
    base = torch.zeros(64)
    delta = torch.linspace(-1, 2, 64)
    kwargs = dict(weight=[1.0], density=[0.01], gamma=[0.0])
    ours = merge_tensor("breadcrumbs", base, delta[None], **kwargs)
    assert ours.count_nonzero() == 1 and ours[-1] == 2.0  # the largest survives (gamma 0 drops no outlier)
    compat = merge_tensor("breadcrumbs", base, delta[None], options=KernelOptions.mergekit_compatible(), **kwargs)
    assert compat.count_nonzero() == 0
    # gamma * numel < 1 is not a zeroing case in either: it just drops no outlier
    kept = S.magnitude_outliers_mask(delta, 0.5, 0.01, keep_at_least_one=False)
    assert kept.sum() == 32 and kept[-1]


@pytest.mark.parametrize(
    "tensor, density, epsilon, expected_probability",
    [
        (torch.tensor(2.0), 0.5, 0.1, [0.5]),              # 0-d: mergekit IndexError
        (torch.tensor([[1.0], [-2.0]]), 0.3, 0.1, [0.3, 0.3]),  # rows of one: mergekit NaN -> RuntimeError
        (torch.tensor([1.0, 3.0, 2.0]), 0.1, 0.15, [0.0, 0.2, 0.1]),  # 0.1 - 0.15 < 0: epsilon -> 0.1
        (torch.tensor([1.0, 3.0, 2.0]), 0.9, 0.15, [0.8, 1.0, 0.9]),  # 0.9 + 0.15 > 1: epsilon -> 0.1
    ],
)
def test_della_tiny_tensor_option(tensor, density, epsilon, expected_probability):
    probabilities = S.della_keep_probabilities(tensor, density, epsilon)
    torch.testing.assert_close(probabilities.reshape(-1), t(expected_probability))
    with pytest.raises(ValueError, match="mergekit"):
        S.della_keep_probabilities(tensor, density, epsilon, mergekit_errors=True)
    base, experts = torch.zeros_like(tensor), tensor[None]
    merged = merge_tensor("della_linear", base, experts, weight=[1.0], density=[density], epsilon=[epsilon],
                          tensor_name="bias")
    assert merged.shape == tensor.shape
    with pytest.raises(ValueError, match="'bias'"):
        merge_tensor("della_linear", base, experts, weight=[1.0], density=[density], epsilon=[epsilon],
                     tensor_name="bias", options=KernelOptions(della_mergekit_errors=True))


# ----------------------------------------------------------------------------- fast path: order stats

def tie_heavy_and_smooth_deltas():
    generator = torch.Generator().manual_seed(13)
    return [torch.randn(3000, generator=generator),
            torch.randint(-20, 21, (50, 60), generator=generator).float() / 4]


@pytest.mark.parametrize("delta", tie_heavy_and_smooth_deltas(), ids=["smooth", "ties"])
def test_exact_order_stats_give_the_selection_mask(delta):
    stats = S.MagnitudeOrderStats.from_delta(delta, grid=None)
    assert stats.is_exact
    for density in (0.0, 0.001, 0.1, 0.33, 0.5, 0.999, 1.0):
        assert torch.equal(S.magnitude_mask(delta, density, stats=stats), S.magnitude_mask(delta, density))
        if 0 < density < 1:
            k = S.magnitude_keep_count(delta.numel(), density)
            selected = torch.kthvalue(delta.abs().reshape(-1), delta.numel() - k + 1).values.item()
            assert stats.rank_bounds(delta, [delta.numel() - k])[0].value == selected
        for gamma in (0.0, 0.01, 0.2):
            assert torch.equal(S.magnitude_outliers_mask(delta, density, gamma, stats=stats),
                               S.magnitude_outliers_mask(delta, density, gamma))


@pytest.mark.parametrize("delta", tie_heavy_and_smooth_deltas() + [torch.randn(100_000)], ids=["smooth", "ties", "big"])
def test_grid_order_stats_give_the_exact_masks(delta):
    """Grid stats only bracket each threshold; the selection inside the bracket makes the mask exact."""
    stats = S.MagnitudeOrderStats.from_delta(delta, grid=101)
    assert not stats.is_exact
    for density in (0.003, 0.05, 0.2, 0.5, 0.77, 0.999):
        assert torch.equal(S.magnitude_mask(delta, density, stats=stats), S.magnitude_mask(delta, density))
        for gamma in (0.0, 0.02):
            assert torch.equal(S.magnitude_outliers_mask(delta, density, gamma, stats=stats),
                               S.magnitude_outliers_mask(delta, density, gamma))
        n = delta.numel()
        for rank in (0, 1, n // 3, n - 2, n - 1):
            assert stats.rank_bounds(delta, [rank]) == S.magnitude_rank_bounds(delta, [rank], sample_size=256)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_kernel_with_exact_order_stats_equals_kernel_without(method):
    base, experts = random_inputs(method, shape=(30, 40), seed=15)
    kwargs = typical_kwargs(method, 3)
    stats = [S.MagnitudeOrderStats.from_delta(d) for d in task_vectors(base, experts)]  # 1200 <= grid: exact
    with_stats = merge_tensor(method, base, experts, order_stats=stats, **kwargs)
    torch.testing.assert_close(with_stats, merge_tensor(method, base, experts, **kwargs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="order_stats"):
        merge_tensor("dare_ties", base, experts, order_stats=stats, **typical_kwargs("dare_ties", 3))
