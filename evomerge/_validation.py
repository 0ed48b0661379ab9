"""Turning pydantic validation errors into one line that names the file and the field."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Base for config models: an unknown field is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<top>"
        if err["type"] == "extra_forbidden":
            parts.append(f"field `{where}` is not supported (unknown field)")
        elif err["type"] == "missing":
            parts.append(f"field `{where}` is required")
        else:
            # A validator's ValueError reads "Value error, <message>": keep the message.
            parts.append(f"field `{where}`: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
