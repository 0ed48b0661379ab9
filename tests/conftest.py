"""Session-wide fixtures: the tiny zoo, built once per test session.

`EVOMERGE_TEST_DEVICE=cuda` (benchmarks/gpu_check.sh sets it) makes the session refuse to start
without that device, calibrates `run_workspace` on it, and counts the tests that allocated memory
on it (printed at the end). The library's own defaults already pick `cuda` when present; tests that
pass `device="cpu"` (CPU references) stay on the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

TEST_DEVICE = os.environ.get("EVOMERGE_TEST_DEVICE") or None
_CUDA_TESTS = {"ran": 0, "allocated": 0}


def pytest_configure(config):
    if TEST_DEVICE is not None:
        from evomerge._device import DeviceError, resolve_device

        try:
            resolve_device(TEST_DEVICE, field="EVOMERGE_TEST_DEVICE")
        except DeviceError as exc:
            raise pytest.UsageError(str(exc)) from None


@pytest.fixture(autouse=True)
def _count_cuda_use():
    """Under EVOMERGE_TEST_DEVICE=cuda: whether this test allocated CUDA memory in this process."""
    if TEST_DEVICE is None or not TEST_DEVICE.startswith("cuda"):
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    _CUDA_TESTS["ran"] += 1
    _CUDA_TESTS["allocated"] += torch.cuda.max_memory_allocated() > 0


def pytest_terminal_summary(terminalreporter):
    if TEST_DEVICE is not None and TEST_DEVICE.startswith("cuda"):
        terminalreporter.write_line(f"EVOMERGE_TEST_DEVICE={TEST_DEVICE}: cuda_tests={_CUDA_TESTS['allocated']} "
                                    f"of {_CUDA_TESTS['ran']} allocated CUDA memory in the pytest process")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny zoo's `Manifest` (root, tasks, models, accuracies), built once into a temp folder,
    with the test splits sealed: the build chooses, so it must never read them (PROTOCOL.md).

    One thread: the tiny model gains nothing from more, and on a shared machine several
    OpenMP threads spinning on two busy cores slow training several-fold.
    """
    from evomerge.fitness.sealed import sealed_test
    from evomerge.zoo import build_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sealed_test("building the tiny zoo"):
            return build_zoo(tmp_path_factory.mktemp("zoo"), size="tiny", seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_workspace(tmp_path_factory):
    """A folder with a family of random Llama models (base + 2 experts), two multiple-choice tasks
    that such models answer differently, and a compressed fitness `fitness/mc` calibrated on them:
    real formats and the real pipeline for search tests, no training needed."""
    import datasets

    from evomerge.fitness.calibrate import calibrate
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.testing import choice_task_preset, llama_config, make_choice_task, make_family

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("runs_ws")
    base, experts = make_family(root / "fam", n_experts=2, seed=5, delta_scale=0.5, config=llama_config(layers=2))
    tasks = [TaskSpec.from_dict(choice_task_preset(make_choice_task(root / "tasks" / name, seed=i), name))
             for i, name in enumerate(["sums_a", "sums_b"])]
    from evomerge.fitness.sealed import sealed_test

    with sealed_test("calibrating a compressed fitness"):
        calibrate(tasks, str(base), [str(e) for e in experts], root / "fitness" / "mc", name="mc", random_merges=12,
                  n=8, echo=lambda *a: None, device=TEST_DEVICE)
    return root


@pytest.fixture(scope="session")
def medium_tiny_zoo(tmp_path_factory):
    """The medium zoo's test fixture (`medium_tiny`: six experts, 8 layers, a few steps), built once
    with one thread and the test splits sealed, like `tiny_zoo`."""
    from evomerge.fitness.sealed import sealed_test
    from evomerge.zoo import build_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sealed_test("building the medium_tiny zoo"):
            return build_zoo(tmp_path_factory.mktemp("zoo"), size="medium_tiny", seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
