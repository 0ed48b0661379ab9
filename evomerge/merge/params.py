"""Parameter resolution: (setting, tensor name, depth fraction t) -> value, as mergekit does it.

A setting is a scalar, a gradient (a list of numbers interpolated linearly across depth), or a
list of conditional entries `{filter: substring, value: setting}` where the first entry whose
filter is absent, "*", or a substring of the tensor name wins. This mirrors
`mergekit.config.evaluate_setting` so a mergekit YAML means the same thing here; `t` comes from
`LayerMap.depth_fraction`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from evomerge.errors import ParameterError  # defined torch-free, for the CLI

Scalar = float | int | bool | str


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (float, int, bool, str))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_setting(
    setting: Any,
    tensor_name: str,
    t: float,
    *,
    field: str = "parameter",
    cast: Callable[[Any], Any] = lambda v: v,
) -> Any:
    """Evaluate one setting for one tensor; `None` when no conditional entry matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return cast(setting)
    if not isinstance(setting, Sequence):
        raise ParameterError(f"{field}: unexpected setting {setting!r}")
    if not setting:
        return None
    if all(_is_scalar(entry) for entry in setting):
        values = [cast(entry) for entry in setting]
        if not all(_is_number(v) for v in values):
            return values[int(t * (len(values) - 1))]
        # Same arithmetic as mergekit so gradients agree bit for bit.
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return cast((1 - frac) * values[i0] + frac * values[i1])
    for index, entry in enumerate(setting):
        if not isinstance(entry, Mapping) or "value" not in entry:
            raise ParameterError(
                f"{field}[{index}]: expected a number or a {{filter, value}} entry, got {entry!r}"
            )
        unknown = set(entry) - {"filter", "value"}
        if unknown:
            raise ParameterError(f"{field}[{index}]: unsupported key(s) {sorted(unknown)}; use filter and value")
        flt = entry.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return resolve_setting(entry["value"], tensor_name, t, field=f"{field}[{index}].value", cast=cast)
    return None


def to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ParameterError(f"expected a number, got {value!r}")
    return float(value)


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    raise ParameterError(f"expected true or false, got {value!r}")
