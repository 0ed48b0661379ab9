"""The zoo's skills over digit strings, and their disjoint train / validation / test splits.

Three tasks, each a pure function from an item's digits to (prompt, answer, difficulty features):

* ``addition``  ``"37+45="`` -> ``"82"``: operands 0-99; hard when there are carries.
* ``reversal``  ``"R30719="`` -> ``"91703"``: 4-8 digits; hard when long or with repeated digits.
* ``sorting``   ``"S30719="`` -> ``"01379"``: 4-8 digits; hard when long or far from sorted.

Difficulty features are kept as columns (``n_digits``, ``n_carries``, ``n_repeats``,
``n_inversions``) so that fitness code can study or stratify items. Splits are drawn without
replacement from the prompt space, so no prompt appears in two splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

TASKS = ("addition", "reversal", "sorting")


@dataclass(frozen=True)
class TaskSplitSizes:
    train: int
    validation: int
    test: int


def addition_item(a: int, b: int) -> dict:
    carries, carry, x, y = 0, 0, a, b
    while x or y:
        carry = int(x % 10 + y % 10 + carry >= 10)
        carries += carry
        x, y = x // 10, y // 10
    answer = str(a + b)
    return {
        "prompt": f"{a}+{b}=",
        "answer": answer,
        "n_digits": max(len(str(a)), len(str(b))),
        "n_carries": carries,
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


def _addition_prompts(n: int, rng: np.random.Generator) -> list[dict]:
    pairs = rng.permutation(100 * 100)[:n]  # every (a, b) with 0 <= a, b <= 99, no repeats
    return [addition_item(int(p // 100), int(p % 100)) for p in pairs]


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
}


def make_task_splits(task: str, sizes: TaskSplitSizes, seed: int) -> dict[str, dict[str, list]]:
    """Column dictionaries for the train, validation and test splits of `task`.

    The validation and test splits are drawn first so that their size does not depend on the
    training budget; addition's train split is capped by its 10,000 possible prompts.
    """
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; the zoo's tasks are {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    n_eval = sizes.validation + sizes.test
    wanted = n_eval + sizes.train
    if task == "addition":
        wanted = min(wanted, 100 * 100)
    items = _GENERATORS[task](wanted, rng)
    bounds = {"validation": (0, sizes.validation), "test": (sizes.validation, n_eval), "train": (n_eval, wanted)}
    splits = {}
    for split in ("train", "validation", "test"):
        lo, hi = bounds[split]
        chunk = items[lo:hi]
        columns = {"id": [f"{task}-{split}-{i:05d}" for i in range(len(chunk))]}
        for key in items[0]:
            columns[key] = [item[key] for item in chunk]
        splits[split] = columns
    return splits
