"""The sealed test split: every read of a test split is recorded, and inside `sealed_test()` it is an error.

benchmarks/PROTOCOL.md is the protocol this enforces: every choice (zoo recipes, search settings,
defaults, the member to export) is made on validation data; a test split is read once, in a final
step (`Run.verify(role="test")` / `evomerge verify`, the demo's final table, a benchmark's final
step). Code that chooses runs inside ``with sealed_test("why"):``; a test-split read there raises
`SealedSplitError` naming the task and the split. Reads outside a seal are recorded (task, split,
role) so a test can check that a code path read no test split before its final step::

    with recorded_test_reads() as reads:
        run_the_development_steps()
    assert reads == []

The one loader of task splits (`TaskSpec.load_split`) and the zoo build's loader call `note_read`.
The seal is process-wide (all threads), not per thread: a worker thread of an in-process pool is
as sealed as its caller. Worker *processes* (Ray) load only the fitness split.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

__all__ = ["SealedSplitError", "SplitRead", "is_sealed", "note_read", "recorded_test_reads", "read_log",
           "sealed_test"]


class SealedSplitError(RuntimeError):
    """A test split read where the protocol seals it (inside `sealed_test`)."""


@dataclass(frozen=True)
class SplitRead:
    task: str
    split: str  # the dataset's split name
    role: str  # the role it was read for ('test', or 'fitness' when a preset maps fitness onto the test split)


_lock = threading.Lock()
_seals: list[str] = []  # reasons of the open seals, innermost last
_reads: list[SplitRead] = []  # every test-split read of this process, in order
_recorders: list[list[SplitRead]] = []


def note_read(task: str, split: str, role: str = "test") -> None:
    """Record a read of `task`'s test split; raise `SealedSplitError` inside `sealed_test()`.

    Called by the split loaders before any data is read, and only for the split that plays the
    test role."""
    with _lock:
        if _seals:
            raise SealedSplitError(
                f"the test split of {task} (split {split!r}) is sealed here ({_seals[-1]}): choose on validation; "
                "read test only in the final step (benchmarks/PROTOCOL.md)")
        read = SplitRead(task, split, role)
        _reads.append(read)
        for recorder in _recorders:
            recorder.append(read)


@contextmanager
def sealed_test(reason: str = "development step") -> Iterator[None]:
    """Within this block, reading any test split raises `SealedSplitError` (nesting allowed)."""
    with _lock:
        _seals.append(reason)
    try:
        yield
    finally:
        with _lock:
            _seals.remove(reason)  # any equal reason: seals are counted, not told apart


def is_sealed() -> bool:
    return bool(_seals)


def read_log() -> list[SplitRead]:
    """Every test-split read of this process so far (outside seals: inside one a read raises)."""
    with _lock:
        return list(_reads)


@contextmanager
def recorded_test_reads() -> Iterator[list[SplitRead]]:
    """The test-split reads made while this block runs, as a list filled in place."""
    reads: list[SplitRead] = []
    with _lock:
        _recorders.append(reads)
    try:
        yield reads
    finally:
        with _lock:
            _recorders.remove(reads)
