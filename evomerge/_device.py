"""Device choice shared by every module: CUDA when present, else CPU; a requested device is checked
up front (its spelling, then that this machine has it), so a typo or a missing GPU fails before any
work, with an error naming the option."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from evomerge.errors import OptionError

if TYPE_CHECKING:
    import torch

DEVICE_FORMS = "cpu, cuda, cuda:N (e.g. cuda:1) or mps"
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


class DeviceError(OptionError):
    """A device that is misspelled or not present on this machine."""


def check_device_name(requested: "str | torch.device", *, field: str = "device") -> str:
    """`requested` as a string if it is spelled as a device we run on; no check that it is present."""
    name = str(requested).strip()
    if not _DEVICE.fullmatch(name):
        raise DeviceError(field, f"unknown device {name!r}; use {DEVICE_FORMS}")
    return name


def resolve_device(requested: "str | torch.device", *, field: str = "device") -> "torch.device":
    """The torch device `requested` names; DeviceError when it is misspelled or this machine lacks it."""
    import torch

    name = check_device_name(requested, field=field)
    kind, index = _DEVICE.fullmatch(name).groups()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(field, f"{name!r} requested but no CUDA GPU is available here "
                                     "(torch.cuda.is_available() is False); use cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise DeviceError(field, f"{name!r} requested but this machine has {count} CUDA GPU(s): "
                                     f"cuda:0 to cuda:{count - 1}")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(field, f"{name!r} requested but MPS (Apple GPU) is not available here; use cpu")
    return torch.device(name)


def default_device(requested: "str | torch.device | None" = None) -> "torch.device":
    """Return `requested` (checked by `resolve_device`) if given, else `cuda` when a GPU is visible, else `cpu`."""
    import torch

    if requested is not None:
        return resolve_device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
