"""Pickle-free, bit-exact JSON for optimizer states, by one generic pair of functions.

:func:`encode_plain` turns nested dataclasses, dicts, lists and numpy arrays into JSON-safe data:
a dataclass becomes the dict of its fields (in declaration order), a numpy array
``{"__ndarray__": base64 of the little-endian bytes, "dtype", "shape"}`` so float64 values (NaN
and inf included) come back bit for bit, and a non-finite Python float is tagged.
:func:`decode_plain` undoes the array and float encodings; :func:`from_plain` then rebuilds
dataclasses from their type hints (``np.ndarray``, ``X | None``, ``list[X]``, nested dataclasses).
The only thing not in a type hint is which ``State`` class holds an :class:`OptimizerState`'s
``strategy`` part: that is the registered optimizer's, looked up by the state's ``name``.

No strategy writes or reads its own fields: a new field in a ``State`` dataclass is checkpointed
by declaring it. Files are written atomically.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

import numpy as np

from ..._atomic import write_json_atomic
from ._base import OptimizerState
from ._registry import OPTIMIZERS

__all__ = [
    "decode_plain",
    "encode_plain",
    "from_plain",
    "load_state",
    "save_state",
    "state_from_dict",
    "state_to_dict",
]


def encode_plain(value: Any) -> Any:
    """Turn nested dataclasses/dicts/lists/arrays/numbers into JSON-safe data (exact for floats and arrays)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("object arrays cannot be checkpointed")
        arr = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        return {
            "__ndarray__": base64.b64encode(arr.tobytes()).decode("ascii"),
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
        }
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint dict keys must be strings; got {bad[:3]}")
        return {k: encode_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}  # 'nan', 'inf', '-inf'
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a value of type {type(value).__name__}")


def decode_plain(value: Any) -> Any:
    """Inverse of :func:`encode_plain` up to dataclasses, which stay dicts (see :func:`from_plain`)."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            raw = base64.b64decode(value["__ndarray__"])
            return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        if "__float__" in value:
            return float(value["__float__"])
        return {k: decode_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_plain(v) for v in value]
    return value


def from_plain(hint: Any, value: Any) -> Any:
    """Rebuild a value of type ``hint`` from decoded plain data (dataclasses from dicts, recursively)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return from_plain(options[0], value) if len(options) == 1 else value
    if origin is list:
        (item,) = typing.get_args(hint)
        return [from_plain(item, v) for v in value]
    if dataclasses.is_dataclass(hint):
        return _dataclass_from_plain(hint, value)
    if hint is np.ndarray:
        return np.asarray(value)
    return value


def _dataclass_from_plain(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a dict of its fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; its fields are {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{cls.__name__}: missing fields {missing}")
    hints = typing.get_type_hints(cls)
    if cls is OptimizerState:  # the dataclass of the strategy part depends on who wrote the state
        hints["strategy"] = OPTIMIZERS[data["name"]].State or type(None)
    return cls(**{name: from_plain(hints[name], value) for name, value in data.items()})


def state_to_dict(state: OptimizerState) -> dict[str, Any]:
    """JSON-safe data for ``state`` (see :func:`encode_plain`)."""
    return encode_plain(state)


def state_from_dict(data: dict[str, Any]) -> OptimizerState:
    """Inverse of :func:`state_to_dict`."""
    return from_plain(OptimizerState, decode_plain(data))


def save_state(state: OptimizerState, path: str | os.PathLike) -> None:
    """Write ``state`` as JSON to ``path`` (atomically)."""
    write_json_atomic(path, state_to_dict(state), indent=None)


def load_state(path: str | os.PathLike) -> OptimizerState:
    with open(path, encoding="utf-8") as handle:
        return state_from_dict(json.load(handle))
