"""Session-wide fixtures: the tiny zoo, built once per test session."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny zoo's `Manifest` (root, tasks, models, accuracies), built once into a temp folder.

    One thread: the tiny model gains nothing from more, and on a shared machine several
    OpenMP threads spinning on two busy cores slow training several-fold.
    """
    from evomerge.zoo import build_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_zoo(tmp_path_factory.mktemp("zoo"), size="tiny", seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
