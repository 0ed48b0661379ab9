"""Pickle-free, bit-exact JSON for :class:`OptimizerState`.

numpy arrays are written as ``{"__ndarray__": base64 of the little-endian bytes, "dtype", "shape"}``
so float64 values (NaN and inf included) come back bit for bit; non-finite Python floats are
tagged; everything else is ordinary JSON. Files are written atomically.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from ..._atomic import write_json_atomic
from .base import OptimizerState

__all__ = ["decode_plain", "encode_plain", "load_state", "save_state", "state_from_dict", "state_to_dict"]


def encode_plain(value: Any) -> Any:
    """Turn nested dicts/lists/arrays/numbers into JSON-safe data (exact for floats and arrays)."""
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


def state_to_dict(state: OptimizerState) -> dict[str, Any]:
    return encode_plain({f.name: getattr(state, f.name) for f in dataclasses.fields(state)})


def state_from_dict(data: dict[str, Any]) -> OptimizerState:
    fields = {f.name for f in dataclasses.fields(OptimizerState)}
    decoded = decode_plain(data)
    unknown = sorted(set(decoded) - fields)
    if unknown:
        raise ValueError(f"optimizer state has unknown fields {unknown}")
    return OptimizerState(**decoded)


def save_state(state: OptimizerState, path: str | os.PathLike) -> None:
    """Write ``state`` as JSON to ``path`` (atomically)."""
    write_json_atomic(path, state_to_dict(state), indent=None)


def load_state(path: str | os.PathLike) -> OptimizerState:
    with open(path, encoding="utf-8") as handle:
        return state_from_dict(json.load(handle))
