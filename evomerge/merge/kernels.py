"""Merge kernels: pure functions from (base, stacked experts, per-expert coefficients) to one tensor.

Semantics follow mergekit 0.1.5 (`merge_methods/registry.py`, `generalized_task_arithmetic.py`,
`linear.py`, `slerp.py`). Which method runs which kernel, with which parameters and defaults, is
its row in `evomerge.merge.methods.METHODS`; the eight task-arithmetic rows (sparsifier, sign
consensus, default normalize, default rescale; viewed here as `TASK_ARITHMETIC_RECIPES`) drive one
pipeline of small stages, each usable alone:

    task_vectors -> sparsify_task_vectors -> weight_task_vectors -> combine_task_vectors
    (delta = expert - base; sparsify each; multiply by weight; optional sign consensus on the
    weighted deltas, sum, optional division by the (consensus-masked) weight sum) -> * lambda -> + base

Every kernel takes `base` (*shape), `experts` stacked as (K, *shape) and its `KernelArgs`; a
parameter the method's row does not list must stay unset. It computes in float32
(float64 if an input is float64), returns a new tensor in base's dtype, never mutates its inputs
and never touches the global torch RNG: every random mask draws from
`mask_generator(seed, tensor_name, expert_index, device)`.

Deliberate differences from mergekit (the switchable ones are `KernelOptions` fields; the rest
are documented where they happen):
* `KernelOptions.breadcrumbs_keep_at_least_one` (default True): mergekit's breadcrumbs keeps
  int(density * numel) entries, so a tensor with density * numel < 1 (e.g. a 64-entry bias at
  density 0.01) has its whole delta zeroed; we keep its one best-ranked entry.
* `KernelOptions.della_mergekit_errors` (default False): mergekit's DELLA fails on 0-d tensors
  (IndexError), rows of one element (NaN probability -> RuntimeError) and density +/- epsilon
  outside (0, 1) (ValueError); we give a one-element row probability `density` and shrink epsilon
  to min(epsilon, density, 1 - density). True raises ValueError in those cases.
* mergekit's task arithmetic runs in the inputs' dtype (bf16 arithmetic for bf16 models); we
  compute in float32 and cast back.
* `linear` with normalize and weights summing to 0 raises ValueError (mergekit divides by zero).
* magnitude ties are broken by flat index (mergekit's unstable argsort leaves them unspecified).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import torch

from evomerge.merge.methods import EPSILON, GAMMA, METHODS, MergeMethod, method_row
from evomerge.merge.sparsify import MagnitudeOrderStats, check_fraction, sparsify, work_dtype

__all__ = [
    "KERNELS",
    "Kernel",
    "KernelArgs",
    "KernelOptions",
    "TASK_ARITHMETIC_RECIPES",
    "TaskArithmeticRecipe",
    "combine_task_vectors",
    "generalized_task_arithmetic",
    "get_kernel",
    "linear",
    "mask_generator",
    "merge_task_vectors",
    "merge_tensor",
    "method_defaults",
    "register_kernel",
    "sign_consensus",
    "slerp",
    "slerp_tensors",
    "sparsify_task_vectors",
    "task_vectors",
    "weight_task_vectors",
]

PerExpert = Sequence[float] | torch.Tensor | float


@dataclass(frozen=True)
class KernelOptions:
    """Switches for our deliberate differences from mergekit 0.1.5 (defaults: ours)."""

    breadcrumbs_keep_at_least_one: bool = True
    della_mergekit_errors: bool = False

    @classmethod
    def mergekit_compatible(cls) -> "KernelOptions":
        """Reproduce mergekit 0.1.5 in both cases (zeroed tiny tensors, DELLA errors)."""
        return cls(breadcrumbs_keep_at_least_one=False, della_mergekit_errors=True)


@dataclass(frozen=True)
class KernelArgs:
    """Everything a kernel reads besides the tensors. None takes the method's default (its row).

    Per-expert parameters (weight, density, gamma, epsilon) are length-K sequences or 1-D tensors
    (a scalar is broadcast). For exact mergekit keep counts pass densities as Python floats:
    int(density * numel) of a float32 0.7 is not that of 0.7. `order_stats` (one per expert, from
    `MagnitudeOrderStats.from_delta` of that expert's delta) lets magnitude sparsifiers look their
    thresholds up; the result is the same with or without.
    """

    weight: PerExpert | None = None
    density: PerExpert | None = None
    gamma: PerExpert | None = None
    epsilon: PerExpert | None = None
    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float | None = None
    t: float | None = None
    seed: int = 0
    tensor_name: str = ""
    options: KernelOptions | None = None
    order_stats: Sequence[MagnitudeOrderStats | None] | None = None


# KernelArgs field -> the parameter's name in a method row (and in recipes).
METHOD_PARAMETER_FIELDS = {"weight": "weight", "density": "density", "gamma": "gamma", "epsilon": "epsilon",
                           "normalize": "normalize", "rescale": "rescale", "lambda_": "lambda", "t": "t"}


class Kernel(Protocol):
    """Signature shared by every registered kernel."""

    def __call__(self, base: torch.Tensor | None, experts: torch.Tensor, args: KernelArgs,
                 row: MergeMethod) -> torch.Tensor: ...


_KERNEL_FUNCTIONS: dict[str, Kernel] = {}  # a row's `kernel` name -> its function
KERNELS: dict[str, Callable[..., torch.Tensor]] = {}  # method name -> merge function, one per row


def register_kernel(name: str) -> Callable[[Kernel], Kernel]:
    """Decorator registering a kernel function under `name` (a `MergeMethod.kernel`, or a new method's name)."""

    def decorator(kernel: Kernel) -> Kernel:
        if name in _KERNEL_FUNCTIONS or name in KERNELS:
            raise ValueError(f"merge kernel {name!r} is already registered")
        _KERNEL_FUNCTIONS[name] = kernel
        return kernel

    return decorator


def get_kernel(name: str) -> Callable[..., torch.Tensor]:
    """`merge(base, experts, **KernelArgs fields)` for method `name`; ValueError listing the valid names otherwise."""
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(KERNELS))}") from None


def method_defaults(name: str) -> dict[str, Any]:
    """mergekit's defaults for the method's optional parameters, e.g. ties -> normalize True, rescale False.

    Keyed by `KernelArgs` field (`lambda_`).
    """
    get_kernel(name)
    return {("lambda_" if key == "lambda" else key): value for key, value in method_row(name).defaults().items()}


def mask_generator(
    seed: int, tensor_name: str, expert_index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded from blake2b(seed, tensor_name, expert_index): the same on every run and process.

    (Python's `hash` of a str changes per process, so it is not used.)
    """
    key = f"{int(seed)}\x00{tensor_name}\x00{int(expert_index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"evomerge-mask").digest()
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def merge_tensor(method: str, base: torch.Tensor | None, experts: torch.Tensor, **arguments: Any) -> torch.Tensor:
    """Merge one tensor with method `method`'s kernel; `arguments` are `KernelArgs` fields."""
    return get_kernel(method)(base, experts, **arguments)


# ----------------------------------------------------------------------------- argument checks

def _error(tensor_name: str, message: str) -> ValueError:
    return ValueError(f"{message} (tensor {tensor_name!r})")


def _check_tensors(base: torch.Tensor | None, experts: torch.Tensor, tensor_name: str) -> None:
    if not isinstance(experts, torch.Tensor) or experts.dim() < 1:
        raise _error(tensor_name, "experts must be a tensor stacked as (K, *shape)")
    if not experts.is_floating_point():
        raise _error(tensor_name, f"experts must be floating point; got {experts.dtype}")
    if base is None:
        return
    if not base.is_floating_point():
        raise _error(tensor_name, f"base must be floating point; got {base.dtype}")
    if tuple(experts.shape[1:]) != tuple(base.shape):
        raise _error(
            tensor_name,
            f"experts must have shape (K, {', '.join(map(str, base.shape))}) to match base {tuple(base.shape)}; "
            f"got {tuple(experts.shape)}",
        )
    if experts.device != base.device:
        raise _error(tensor_name, f"base is on {base.device} but experts are on {experts.device}")


def _per_expert(
    value: PerExpert | None,
    k: int,
    parameter: str,
    tensor_name: str,
    default: float | None = None,
    fraction: bool = False,
) -> list[float]:
    """Length-k list of finite floats (scalars broadcast); None takes `default`, or is an error without one."""
    if value is None:
        if default is None:
            raise _error(tensor_name, f"{parameter} is required")
        value = default
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise _error(tensor_name, f"{parameter} must be 1-D (one value per expert); got shape {tuple(value.shape)}")
        value = value.item() if value.dim() == 0 else value.detach().cpu().tolist()
    values = [float(value)] * k if isinstance(value, numbers.Real) else [float(v) for v in value]
    if len(values) != k:
        raise _error(tensor_name, f"{parameter} has {len(values)} values but experts stack K={k} tensors")
    for index, number in enumerate(values):
        if fraction:
            check_fraction(number, f"{parameter}[{index}]", tensor_name)
        elif not math.isfinite(number):
            raise _error(tensor_name, f"{parameter}[{index}] must be finite; got {number}")
    return values


def _reject_unused(row: MergeMethod, args: KernelArgs) -> None:
    """ValueError naming the first parameter set in `args` that method `row` does not read."""
    for field, parameter in METHOD_PARAMETER_FIELDS.items():
        value = getattr(args, field)
        unused = value is not None and not (field == "lambda_" and value == 1.0)
        if unused and row.parameter(parameter) is None:
            raise _error(args.tensor_name, f"{row.name} does not use {field} (got {value!r})")
    if args.order_stats is not None and row.sparsifier not in ("magnitude", "magnitude_outliers"):
        raise _error(args.tensor_name, f"{row.name} does not use order_stats (only magnitude sparsifiers do)")


# ----------------------------------------------------------------------------- task arithmetic stages

@dataclass(frozen=True)
class TaskArithmeticRecipe:
    """The stages of one task-arithmetic method (a view of its `MergeMethod` row, replaceable in tests)."""

    sparsifier: Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
    consensus: Literal["sum", "count"] | None  # TIES sign election on the weighted deltas; None = plain sum
    default_normalize: bool
    default_rescale: bool

    @classmethod
    def of(cls, row: MergeMethod) -> "TaskArithmeticRecipe":
        return cls(row.sparsifier, row.consensus, bool(row.settings["normalize"].default),
                   bool(row.settings["rescale"].default))


TASK_ARITHMETIC_RECIPES: Mapping[str, TaskArithmeticRecipe] = MappingProxyType(
    {name: TaskArithmeticRecipe.of(row) for name, row in METHODS.items() if row.kernel == "task_arithmetic"}
)


def task_vectors(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(K, *shape) deltas expert - base, in float32 (float64 if an input is float64)."""
    dtype = work_dtype(base, experts)
    return experts.to(dtype) - base.to(dtype)


def sparsify_task_vectors(
    deltas: torch.Tensor,
    sparsifier: str,
    densities: Sequence[float],
    *,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    rescale: bool = False,
    seed: int = 0,
    tensor_name: str = "",
    options: KernelOptions | None = None,
    order_stats: Sequence[MagnitudeOrderStats | None] | None = None,
) -> torch.Tensor:
    """A new (K, *shape) tensor: delta i sparsified with its own density and `mask_generator(seed, tensor_name, i)`."""
    options = options or KernelOptions()
    random = sparsifier in ("random", "della_magprune")
    out = torch.empty_like(deltas)
    for index in range(deltas.shape[0]):
        out[index] = sparsify(
            deltas[index],
            sparsifier,
            densities[index],
            gamma=gammas[index] if gammas is not None else GAMMA.default,
            epsilon=epsilons[index] if epsilons is not None else EPSILON.default,
            rescale=rescale,
            generator=mask_generator(seed, tensor_name, index, deltas.device) if random else None,
            stats=order_stats[index] if order_stats is not None else None,
            keep_at_least_one=options.breadcrumbs_keep_at_least_one,
            mergekit_errors=options.della_mergekit_errors,
        )
    return out


def weight_task_vectors(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """deltas (K, *shape) times weights (K,), broadcast over *shape."""
    return deltas * weights.reshape((-1,) + (1,) * (deltas.dim() - 1))


def sign_consensus(weighted: torch.Tensor, method: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """(K, *shape) bool: entries whose sign equals the elected sign (mergekit `get_mask`).

    "sum" elects the sign of the summed weighted deltas (TIES), "count" the majority of signs;
    ties elect +. Zero entries never match, so they drop out of the normalizing weight sum.
    """
    sign = weighted.sign()
    if method == "sum":
        elected = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1  # (*shape)
    elif method == "count":
        elected = (sign.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus method {method!r}; valid: count, sum")
    return sign == elected


def combine_task_vectors(
    weighted: torch.Tensor,
    weights: torch.Tensor,
    *,
    consensus: Literal["sum", "count"] | None,
    normalize: bool,
) -> torch.Tensor:
    """Sum the weighted deltas (K, *shape) -> (*shape), with mergekit's consensus and normalization.

    With consensus, only entries agreeing with the elected sign are summed and normalization divides
    by the weight sum of those entries (1 where none agree). Without, it divides by the total weight
    (1 if |total| < 1e-8).
    """
    weights = weights.reshape((-1,) + (1,) * (weighted.dim() - 1)).to(weighted.dtype)
    if consensus is not None:
        agree = sign_consensus(weighted, consensus)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return mixed / divisor if normalize else mixed


def generalized_task_arithmetic(
    base: torch.Tensor,
    experts: torch.Tensor,
    recipe: TaskArithmeticRecipe,
    *,
    method: str = "task arithmetic",
    **arguments: Any,
) -> torch.Tensor:
    """base + lambda * combine(weight * sparsify(expert - base)); `recipe` picks the stages.

    `arguments` are `KernelArgs` fields. Any recipe works, e.g.
    `dataclasses.replace(TASK_ARITHMETIC_RECIPES["ties"], consensus="count")`.
    """
    args = KernelArgs(**arguments)
    if base is None:
        raise _error(args.tensor_name, f"{method} needs a base tensor")
    _check_tensors(base, experts, args.tensor_name)
    return merge_task_vectors(base, task_vectors(base, experts), recipe, args, method)


def merge_task_vectors(
    base: torch.Tensor,
    deltas: torch.Tensor,
    recipe: TaskArithmeticRecipe,
    args: KernelArgs,
    method: str = "task arithmetic",
) -> torch.Tensor:
    """`generalized_task_arithmetic` from the deltas (K, *shape) = task_vectors(base, experts) themselves.

    For callers that keep the deltas rather than the experts (the in-memory materializer): the
    same stages on the same deltas, so the same numbers.
    """
    name = args.tensor_name
    _check_tensors(base, deltas, name)
    if recipe.sparsifier != "magnitude_outliers" and args.gamma is not None:
        raise _error(name, f"{method} does not use gamma (got {args.gamma!r})")
    if recipe.sparsifier != "della_magprune" and args.epsilon is not None:
        raise _error(name, f"{method} does not use epsilon (got {args.epsilon!r})")
    if recipe.sparsifier not in ("magnitude", "magnitude_outliers") and args.order_stats is not None:
        raise _error(name, f"{method} does not use order_stats (only magnitude sparsifiers do)")
    k = deltas.shape[0]
    weights = _per_expert(args.weight, k, "weight", name)
    densities = _per_expert(args.density, k, "density", name, default=1.0, fraction=True)
    gammas = _per_expert(args.gamma, k, "gamma", name, default=GAMMA.default, fraction=True)
    epsilons = _per_expert(args.epsilon, k, "epsilon", name, default=EPSILON.default, fraction=True)
    lambda_ = 1.0 if args.lambda_ is None else args.lambda_
    if not math.isfinite(float(lambda_)):
        raise _error(name, f"lambda_ must be finite; got {lambda_}")
    if args.order_stats is not None and len(args.order_stats) != k:
        raise _error(name, f"order_stats has {len(args.order_stats)} entries but experts stack K={k} tensors")
    normalize = recipe.default_normalize if args.normalize is None else bool(args.normalize)
    rescale = recipe.default_rescale if args.rescale is None else bool(args.rescale)
    if k == 0:
        return base.clone()

    if recipe.sparsifier is not None:
        try:
            deltas = sparsify_task_vectors(
                deltas, recipe.sparsifier, densities, gammas=gammas, epsilons=epsilons, rescale=rescale,
                seed=args.seed, tensor_name=name, options=args.options, order_stats=args.order_stats,
            )
        except ValueError as error:
            raise _error(name, str(error)) from error
    weight_tensor = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)  # (K,)
    weighted = weight_task_vectors(deltas, weight_tensor)
    del deltas
    mixed = combine_task_vectors(weighted, weight_tensor, consensus=recipe.consensus, normalize=normalize)
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base.to(mixed.dtype) + mixed).to(base.dtype)


@register_kernel("task_arithmetic")
def _task_arithmetic_kernel(base, experts, args: KernelArgs, row: MergeMethod) -> torch.Tensor:
    """mergekit's generalized task arithmetic with the row's stages."""
    if base is None:
        raise _error(args.tensor_name, f"{row.name} needs a base tensor")
    _check_tensors(base, experts, args.tensor_name)
    return merge_task_vectors(base, task_vectors(base, experts), TaskArithmeticRecipe.of(row), args, row.name)


# ----------------------------------------------------------------------------- linear

@register_kernel("linear")
def linear(base, experts, args: KernelArgs, row: MergeMethod) -> torch.Tensor:
    """Weighted average of every listed model (mergekit `linear`): sum_i w_i x_i / sum_i w_i.

    `experts` must hold every listed model, including the base if it is listed with a weight;
    `base` only fixes the output dtype and is checked for shape (it may be None: then the
    experts' dtype is used). normalize defaults to True; weights summing to 0 then raise.
    """
    tensor_name = args.tensor_name
    _check_tensors(base, experts, tensor_name)
    try:
        weights = _per_expert(args.weight, experts.shape[0], "weight", tensor_name)
    except ValueError as error:
        raise ValueError(
            f"{error}; linear merges exactly the stacked experts (stack the base in if it is listed)"
        ) from None
    normalize = bool(row.settings["normalize"].default) if args.normalize is None else bool(args.normalize)
    dtype = work_dtype(experts) if base is None else work_dtype(base, experts)
    out_dtype = experts.dtype if base is None else base.dtype
    result = torch.zeros(experts.shape[1:], dtype=dtype, device=experts.device)
    for expert, coefficient in zip(experts, weights):  # one expert at a time: no float32 copy of the stack
        result.add_(expert.to(dtype), alpha=coefficient)
    if normalize:
        total = float(torch.tensor(weights, dtype=dtype).sum())
        if total == 0:
            raise _error(tensor_name, f"linear: weights {weights} sum to 0 and cannot be normalized")
        result.div_(total)
    return result.to(out_dtype)


# ----------------------------------------------------------------------------- slerp

def slerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), each tensor taken as one flat vector.

    mergekit `merge_methods.slerp.slerp`: norms at or below eps count as 1; when the cosine
    |dot| > dot_threshold (nearly collinear or antipodal) it falls back to linear interpolation.
    Computed in float32 (float64 for float64 inputs); returned in v0's dtype. Norms and angle are
    taken over the entries finite in both, so a NaN / inf entry only makes its own output non-finite.
    """
    dtype = work_dtype(v0, v1)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    t = torch.tensor(float(t), dtype=dtype, device=a.device)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    if not bool(torch.isfinite(norm_a) & torch.isfinite(norm_b)):  # a non-finite entry: measure the rest
        finite = torch.isfinite(a) & torch.isfinite(b)
        a_stat, b_stat = torch.where(finite, a, 0), torch.where(finite, b, 0)
        norm_a, norm_b = torch.linalg.vector_norm(a_stat), torch.linalg.vector_norm(b_stat)
    else:
        a_stat, b_stat = a, b
    norm_a = torch.where(norm_a > eps, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > eps, norm_b, torch.ones_like(norm_b))
    dot = ((a_stat / norm_a) * (b_stat / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


@register_kernel("slerp")
def slerp(base, experts, args: KernelArgs, row: MergeMethod) -> torch.Tensor:
    """mergekit `slerp`: from base (t=0) to the single expert (t=1) over the whole tensor."""
    tensor_name, t = args.tensor_name, args.t
    if base is None:
        raise _error(tensor_name, "slerp needs a base tensor")
    _check_tensors(base, experts, tensor_name)
    if experts.shape[0] != 1:
        raise _error(
            tensor_name, f"slerp merges the base with exactly one other model; experts stack K={experts.shape[0]}"
        )
    if t is None or not math.isfinite(float(t)):
        raise _error(tensor_name, f"slerp needs a finite t; got {t!r}")
    return slerp_tensors(float(t), base, experts[0]).to(base.dtype)


def _bind(row: MergeMethod) -> Callable[..., torch.Tensor]:
    kernel = _KERNEL_FUNCTIONS[row.kernel]

    def merge(base: torch.Tensor | None, experts: torch.Tensor, **arguments: Any) -> torch.Tensor:
        args = KernelArgs(**arguments)
        _reject_unused(row, args)
        return kernel(base, experts, args, row)

    merge.__name__ = merge.__qualname__ = row.name
    merge.__doc__ = f"Merge method {row.name!r}: kernel {row.kernel!r} with {row}."
    return merge


KERNELS.update({name: _bind(row) for name, row in METHODS.items()})
