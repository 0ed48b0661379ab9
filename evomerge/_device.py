"""Device choice shared by every module: CUDA when present, else CPU."""
from __future__ import annotations

import torch


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """Return `requested` if given, else `cuda` when a GPU is visible, else `cpu`."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
