"""The smol zoo's skills: short English instructions a 135M chat model can learn on a CPU.

Each task is a pure function from an item's draw to (prompt, answer, difficulty features); the
prompt is the *user message* only. The zoo build renders it through the base tokenizer's chat
template (`_chat.render_prompts`) and stores both: ``question`` (this text) and ``prompt`` (the
rendered chat, ending with the assistant cue), so presets and scorers read ``prompt`` as for the
character-level zoos.

* ``arithmetic``       "What is 47 + 38? ..." -> ``85``: operands 0-99 (10,000 prompts); carries are hard.
* ``word_reversal``    "Reverse the order of these words: cat lemon ruler. ..." -> ``ruler lemon cat``:
                       3-5 distinct words from `WORDS` (a text transformation).
* ``category_choice``  "Which of these is a fruit: chair, mango, red, bus? ..." -> ``mango``: one word of
                       the category and three from three other categories (multiple choice, answered
                       with the word: with letters A-D no expert learnt it, docs/zoo.md).
* ``json_record``      'Write a JSON object with the key "name" set to "mango" and the key "count" set
                       to 7. ...' -> ``{"name": "mango", "count": 7}`` (format following; 96 x 99 prompts).

Generators take (n, rng) and return n items with distinct prompts, as `_tasks._GENERATORS` does;
`make_task_splits` draws the splits from them (format 2: test from its own stream).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from evomerge.zoo._digits import count_carries

CHAT_TASKS = ("arithmetic", "word_reversal", "category_choice", "json_record")  # the smol zoo's, in expert order

# category -> (the noun a question uses, its article, 16 common one-word members); every word is
# in exactly one category
CATEGORIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "animal": ("animal", "an", ("horse", "tiger", "rabbit", "eagle", "whale", "mouse", "camel", "zebra",
                                "sheep", "goat", "wolf", "bear", "duck", "frog", "snake", "monkey")),
    "fruit": ("fruit", "a", ("apple", "mango", "banana", "cherry", "grape", "lemon", "peach", "pear",
                             "plum", "melon", "orange", "kiwi", "papaya", "apricot", "lime", "fig")),
    "colour": ("colour", "a", ("red", "blue", "green", "yellow", "purple", "brown", "black", "white",
                               "pink", "grey", "violet", "gold", "silver", "beige", "indigo", "maroon")),
    "tool": ("tool", "a", ("hammer", "wrench", "saw", "drill", "chisel", "shovel", "rake", "pliers",
                           "axe", "ladder", "scissors", "needle", "ruler", "spade", "file", "screwdriver")),
    "vehicle": ("vehicle", "a", ("car", "bus", "truck", "bicycle", "train", "tram", "boat", "ship",
                                 "plane", "taxi", "van", "tractor", "scooter", "canoe", "yacht", "jeep")),
    "body_part": ("part of the body", "a", ("hand", "knee", "elbow", "shoulder", "ankle", "wrist", "finger",
                                            "nose", "ear", "chin", "thumb", "neck", "heel", "toe", "lip", "cheek")),
}
WORDS: tuple[str, ...] = tuple(w for _, _, members in CATEGORIES.values() for w in members)  # 96 words


def arithmetic_item(a: int, b: int) -> dict:
    answer = str(a + b)
    return {"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": answer,
            "n_carries": count_carries(a, b), "answer_len": len(answer)}


def word_reversal_item(words: tuple[str, ...]) -> dict:
    return {"prompt": f"Reverse the order of these words: {' '.join(words)}. Reply with the words only, "
                      "separated by spaces.",
            "answer": " ".join(reversed(words)), "n_words": len(words)}


def category_choice_item(category: str, options: tuple[str, ...], correct: int) -> dict:
    noun, article, members = CATEGORIES[category]
    if options[correct] not in members or any(o in members for i, o in enumerate(options) if i != correct):
        raise ValueError(f"category_choice_item: exactly option {correct + 1} must be a {category}; got {options}")
    # The word, not its letter: SmolLM2-135M knows the categories (the base names the right word in
    # about half of its free-form answers) but, as small models do, cannot bind an option to its
    # letter: 150 steps of fine-tuning on letter answers stayed at chance (docs/zoo.md)
    return {"prompt": f"Which of these is {article} {noun}: {', '.join(options)}? Reply with the word only.",
            "answer": options[correct], "category": category, "answer_index": correct, "options": list(options)}


def json_record_item(word: str, count: int) -> dict:
    return {"prompt": f'Write a JSON object with the key "name" set to "{word}" and the key "count" set to '
                      f"{count}. Reply with the JSON only, on one line.",
            "answer": f'{{"name": "{word}", "count": {count}}}', "count_digits": len(str(count))}


def _distinct(n: int, rng: np.random.Generator, draw: Callable[[np.random.Generator], dict]) -> list[dict]:
    """`n` items with distinct prompts, drawn one by one (a repeated prompt is drawn again)."""
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        item = draw(rng)
        if item["prompt"] not in seen:
            seen.add(item["prompt"])
            out.append(item)
    return out


def _arithmetic(n: int, rng: np.random.Generator) -> list[dict]:
    pairs = rng.permutation(100 * 100)[:n]  # every (a, b) with 0 <= a, b <= 99, no repeats
    return [arithmetic_item(int(p // 100), int(p % 100)) for p in pairs]


def _word_reversal(rng: np.random.Generator) -> dict:
    length = int(rng.integers(3, 6))
    return word_reversal_item(tuple(WORDS[i] for i in rng.choice(len(WORDS), size=length, replace=False)))


def _category_choice(rng: np.random.Generator) -> dict:
    names = list(CATEGORIES)
    picked = [names[i] for i in rng.choice(len(names), size=4, replace=False)]  # the answer's, then 3 others
    words = [CATEGORIES[c][2][int(rng.integers(16))] for c in picked]
    correct = int(rng.integers(4))
    options = words[1:]
    options.insert(correct, words[0])
    return category_choice_item(picked[0], tuple(options), correct)


_COUNTS = 99  # json_record counts are 1-99


def _json_record(n: int, rng: np.random.Generator) -> list[dict]:
    order = rng.permutation(len(WORDS) * _COUNTS)[:n]
    return [json_record_item(WORDS[int(i // _COUNTS)], int(i % _COUNTS) + 1) for i in order]


CHAT_GENERATORS: dict[str, Callable[[int, np.random.Generator], list[dict]]] = {
    "arithmetic": _arithmetic,
    "word_reversal": lambda n, rng: _distinct(n, rng, _word_reversal),
    "category_choice": lambda n, rng: _distinct(n, rng, _category_choice),
    "json_record": _json_record,
}
# finite prompt spaces (word_reversal: 96*95*94 + ... prompts; category_choice: 6*5*4*3 * 16^4 * 4)
CHAT_PROMPT_SPACE = {"arithmetic": 100 * 100, "json_record": len(WORDS) * _COUNTS}

# a task whose items changed form carries a version in its stage key, so a zoo built before the
# change rebuilds it (and every model trained on it); unlisted tasks keep their keys
CHAT_TASK_VERSIONS = {"category_choice": 2}  # 2: answered with the word, not the letter

CHAT_TASK_DESCRIPTIONS = {
    "arithmetic": "What is a + b? -> the sum, operands 0-99",
    "word_reversal": "reverse the order of 3-5 words -> the words reversed, space-separated",
    "category_choice": "which of four words is a <category>? -> that word",
    "json_record": 'a JSON object with "name" and "count" -> {"name": "<word>", "count": <n>} on one line',
}
