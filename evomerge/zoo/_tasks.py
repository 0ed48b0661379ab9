"""The zoo's skills over digit strings, and their disjoint train / validation / test splits.

Each task is a pure function from an item's digits to (prompt, answer, difficulty features):

* ``addition``     ``"37+45="`` -> ``"82"``: operands 0-99; hard when there are carries.
* ``reversal``     ``"R30719="`` -> ``"91703"``: 4-8 digits; hard when long or with repeated digits.
* ``sorting``      ``"S30719="`` -> ``"01379"``: 4-8 digits; hard when long or far from sorted.

and, for the medium zoo only:

* ``subtraction``  ``"82-45="`` -> ``"37"``: operands 0-99, never negative; hard when it borrows.
* ``rotation``     ``"L30719="`` -> ``"07193"``: 4-8 digits rotated left by one; hard when long.
* ``maxmin``       ``"M30719="`` -> ``"90"``: the largest digit, then the smallest; hard when long.

The smol zoo's chat tasks (`_chat_tasks.CHAT_TASKS`) are drawn by the same `make_task_splits`.

Difficulty features are kept as columns (``n_digits``, ``n_carries``, ``n_borrows``,
``n_repeats``, ``n_inversions``) so that fitness code can study or stratify items. Splits are
drawn without replacement from the prompt space, so no prompt appears in two splits.

Two split formats (`make_task_splits(..., test_stream=...)`): the small and tiny zoos draw
validation, test and train from one generator, in that order (format 1; their models hash the
whole task folders, so it stays); the medium zoo draws test from a generator of its own, and
validation and train from another one, skipping the test prompts (format 2,
benchmarks/PROTOCOL.md section 7): the test items do not depend on how many items train and
validation hold, and those two splits depend on test only through the prompts they skip.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from evomerge.zoo._chat_tasks import CHAT_GENERATORS, CHAT_PROMPT_SPACE, CHAT_TASKS
from evomerge.zoo._digits import count_carries

TASKS = ("addition", "reversal", "sorting")  # the small and tiny zoos' tasks, in expert order
MEDIUM_TASKS = ("addition", "subtraction", "reversal", "sorting", "rotation", "maxmin")
ALL_TASKS = TASKS + tuple(t for t in MEDIUM_TASKS if t not in TASKS) + CHAT_TASKS


@dataclass(frozen=True)
class TaskSplitSizes:
    train: int
    validation: int
    test: int


def addition_item(a: int, b: int) -> dict:
    carries = count_carries(a, b)
    answer = str(a + b)
    return {
        "prompt": f"{a}+{b}=",
        "answer": answer,
        "n_digits": max(len(str(a)), len(str(b))),
        "n_carries": carries,
        "answer_len": len(answer),
    }


def subtraction_item(a: int, b: int) -> dict:
    if a < b:
        raise ValueError(f"subtraction_item({a}, {b}): the zoo's differences are never negative")
    borrows, borrow, x, y = 0, 0, a, b
    while x or y:
        borrow = int(x % 10 - y % 10 - borrow < 0)
        borrows += borrow
        x, y = x // 10, y // 10
    answer = str(a - b)
    return {
        "prompt": f"{a}-{b}=",
        "answer": answer,
        "n_digits": max(len(str(a)), len(str(b))),
        "n_borrows": borrows,
        "answer_len": len(answer),
    }


def _repeats(digits: str) -> int:
    return len(digits) - len(set(digits))


def reversal_item(digits: str) -> dict:
    return {"prompt": f"R{digits}=", "answer": digits[::-1], "n_digits": len(digits), "n_repeats": _repeats(digits)}


def sorting_item(digits: str) -> dict:
    inversions = sum(digits[i] > digits[j] for i in range(len(digits)) for j in range(i + 1, len(digits)))
    return {
        "prompt": f"S{digits}=",
        "answer": "".join(sorted(digits)),
        "n_digits": len(digits),
        "n_repeats": _repeats(digits),
        "n_inversions": inversions,
    }


def rotation_item(digits: str) -> dict:
    return {"prompt": f"L{digits}=", "answer": digits[1:] + digits[0], "n_digits": len(digits),
            "n_repeats": _repeats(digits)}


def maxmin_item(digits: str) -> dict:
    return {"prompt": f"M{digits}=", "answer": max(digits) + min(digits), "n_digits": len(digits),
            "n_repeats": _repeats(digits)}


def _addition_prompts(n: int, rng: np.random.Generator) -> list[dict]:
    pairs = rng.permutation(100 * 100)[:n]  # every (a, b) with 0 <= a, b <= 99, no repeats
    return [addition_item(int(p // 100), int(p % 100)) for p in pairs]


_SUBTRACTION_PAIRS = [(a, b) for a in range(100) for b in range(a + 1)]  # 5,050 prompts


def _subtraction_prompts(n: int, rng: np.random.Generator) -> list[dict]:
    order = rng.permutation(len(_SUBTRACTION_PAIRS))[:n]
    return [subtraction_item(*_SUBTRACTION_PAIRS[i]) for i in order]


def _digit_strings(n: int, rng: np.random.Generator, min_len: int = 4, max_len: int = 8) -> list[str]:
    """`n` distinct digit strings, lengths uniform in [min_len, max_len]."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        length = int(rng.integers(min_len, max_len + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=length))
        if digits not in seen:
            seen.add(digits)
            out.append(digits)
    return out


_GENERATORS: dict[str, Callable[[int, np.random.Generator], list[dict]]] = {
    "addition": _addition_prompts,
    "reversal": lambda n, rng: [reversal_item(d) for d in _digit_strings(n, rng)],
    "sorting": lambda n, rng: [sorting_item(d) for d in _digit_strings(n, rng)],
    "subtraction": _subtraction_prompts,
    "rotation": lambda n, rng: [rotation_item(d) for d in _digit_strings(n, rng)],
    "maxmin": lambda n, rng: [maxmin_item(d) for d in _digit_strings(n, rng)],
    **CHAT_GENERATORS,  # the smol zoo's (evomerge/zoo/_chat_tasks.py)
}
# the others: 10^4 + ... + 10^8 digit strings, or the chat tasks' larger spaces
PROMPT_SPACE = {"addition": 100 * 100, "subtraction": len(_SUBTRACTION_PAIRS), **CHAT_PROMPT_SPACE}


def make_task_splits(task: str, sizes: TaskSplitSizes, seed: int, test_stream: bool = False) -> dict[str, dict[str, list]]:
    """Column dictionaries for the train, validation and test splits of `task`.

    `test_stream=False` (format 1, the small and tiny zoos): one generator seeded by (seed, task
    index) draws validation, then test, then train. `test_stream=True` (format 2, the medium zoo):
    test comes from its own generator (seed, task name, "test"); validation then train from
    another one (seed, task name, "develop"), which skips every test prompt. Either way validation
    and test are drawn first, so their items do not depend on the training budget, and a task
    with a finite prompt space (addition, subtraction) gets what is left for train.
    """
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; the zoo's tasks are {', '.join(ALL_TASKS)}")
    space = PROMPT_SPACE.get(task)

    def cap(n: int) -> int:
        return n if space is None else min(n, space)

    if test_stream:
        test = _GENERATORS[task](sizes.test, _stream(seed, task, "test"))
        held_out = {item["prompt"] for item in test}
        # at most len(test) of the develop stream's prompts are test prompts: draw that many more
        develop = [item for item in _GENERATORS[task](cap(sizes.validation + sizes.train + sizes.test),
                                                      _stream(seed, task, "develop"))
                   if item["prompt"] not in held_out][: sizes.validation + sizes.train]
        chunks = {"train": develop[sizes.validation:], "validation": develop[: sizes.validation], "test": test}
    else:
        rng = np.random.default_rng([seed, TASKS.index(task)])
        n_eval = sizes.validation + sizes.test
        wanted = cap(n_eval + sizes.train)
        items = _GENERATORS[task](wanted, rng)
        chunks = {"train": items[n_eval:wanted], "validation": items[: sizes.validation],
                  "test": items[sizes.validation:n_eval]}
    keys = next(chunk[0] for chunk in chunks.values() if chunk)  # every item has the same columns
    splits = {}
    for split in ("train", "validation", "test"):
        chunk = chunks[split]
        columns = {"id": [f"{task}-{split}-{i:05d}" for i in range(len(chunk))]}
        for key in keys:
            columns[key] = [item[key] for item in chunk]
        splits[split] = columns
    return splits


def _stream(seed: int, task: str, purpose: str) -> np.random.Generator:
    """A generator for one (seed, task, purpose), independent of every other purpose's."""
    words = np.frombuffer(hashlib.sha256(f"{task}/{purpose}".encode()).digest()[:8], dtype=np.uint32)
    return np.random.default_rng([seed, *map(int, words)])
