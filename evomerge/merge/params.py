"""Parameter resolution: (setting, tensor name, depth fraction t) -> value, as mergekit does it.

A setting is a scalar, a gradient (a list of numbers interpolated linearly across depth), or a
list of conditional entries `{filter: substring, value: setting}` where the first entry whose
filter is absent, "*", or a substring of the tensor name wins. This mirrors
`mergekit.config.evaluate_setting` so a mergekit YAML means the same thing here; `t` comes from
`LayerMap.depth_fraction`.

`check_setting` walks a setting once, before any tensor is read, and checks every value it can
resolve to for any tensor (every gradient anchor, every filtered value) against a `ParameterRule`,
so a bad value fails at once, naming its field, instead of at the layer that first uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

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


@dataclass(frozen=True)
class ParameterRule:
    """What one parameter's values may be: a finite number in [low, high], or true / false."""

    kind: Literal["number", "bool"] = "number"
    low: float = -math.inf
    high: float = math.inf

    def check(self, value: Any) -> None:
        """ParameterError (without the field, which the caller adds) unless `value` obeys the rule."""
        if self.kind == "bool":
            to_bool(value)
            return
        try:
            number = to_float(value)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"expected a number, got {value!r}") from exc
        if not math.isfinite(number):
            raise ParameterError(f"must be a finite number, got {value!r}")
        if not self.low <= number <= self.high:
            bounds = f"[{self.low:g}, {self.high:g}]" if math.isfinite(self.low) and math.isfinite(self.high) else (
                f">= {self.low:g}" if math.isfinite(self.low) else f"<= {self.high:g}")
            raise ParameterError(f"must be in {bounds}, got {number:g}")


def check_setting(setting: Any, rule: ParameterRule, *, field: str, num_layers: int | None = None) -> None:
    """Check every value `setting` can resolve to (see `resolve_setting`), for any tensor and depth.

    Raises ParameterError naming the exact field, e.g. field `models[1].parameters.density[2]`.
    Checking the anchors suffices for a gradient: interpolated values lie between them. With `num_layers` (the
    base model's), a gradient may hold at most max(2, num_layers) anchors.
    """
    if isinstance(setting, Mapping):
        _check_entry(setting, rule, field, num_layers)
        return
    if _is_scalar(setting):
        try:
            rule.check(setting)
        except ParameterError as exc:
            raise ParameterError(f"field `{field}`: {exc}") from None
        return
    if not isinstance(setting, Sequence):
        raise ParameterError(f"field `{field}`: expected a number, a list of numbers (a gradient) or a list of "
                             f"{{filter, value}} entries; got {setting!r}")
    if not setting:
        raise ParameterError(f"field `{field}`: empty list; give a value, a gradient or {{filter, value}} entries")
    if any(isinstance(entry, Mapping) for entry in setting):  # conditional entries: the first match wins
        for index, entry in enumerate(setting):
            if not isinstance(entry, Mapping):
                raise ParameterError(
                    f"field `{field}[{index}]`: expected a {{filter, value}} entry like the others, got {entry!r}")
            _check_entry(entry, rule, f"{field}[{index}]", num_layers)
        return
    for index, entry in enumerate(setting):  # a gradient
        if not _is_scalar(entry):
            raise ParameterError(f"field `{field}[{index}]`: expected a number (a gradient anchor) or a "
                                 f"{{filter, value}} entry, got {entry!r}")
        check_setting(entry, rule, field=f"{field}[{index}]")
    if num_layers is not None and len(setting) > max(2, num_layers):
        raise ParameterError(
            f"field `{field}`: a gradient of {len(setting)} values for a base model of {num_layers} layers; give at "
            f"most {max(2, num_layers)} (values are interpolated across depth: more anchors than layers are never "
            "all reached)"
        )


def _check_entry(entry: Mapping, rule: ParameterRule, field: str, num_layers: int | None) -> None:
    if "value" not in entry:
        raise ParameterError(
            f"field `{field}`: a conditional entry needs `value` (and optionally `filter`), got {dict(entry)!r}")
    unknown = set(entry) - {"filter", "value"}
    if unknown:
        raise ParameterError(f"field `{field}`: unsupported key(s) {sorted(unknown)}; use filter and value")
    flt = entry.get("filter")
    if flt is not None and (not isinstance(flt, str) or not flt):
        raise ParameterError(
            f"field `{field}.filter`: expected text (a substring of tensor names, or `*`), got {flt!r}")
    check_setting(entry["value"], rule, field=f"{field}.value", num_layers=num_layers)
