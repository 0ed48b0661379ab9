"""Tasks: a `datasets.Dataset` of items plus a scorer returning one 0/1 answer per item.

A task is described by a YAML preset (`fitness/*.yaml`, resolved by name or path):

```yaml
name: gsm8k
dataset: {hub: openai/gsm8k, config: main}   # or {path: DIR} for a `save_to_disk` folder,
                                              # or {files: {validation: a.jsonl}, format: json}
splits: {fitness: train, test: test}          # fitness = where subsets and calibration live
id_field: null                                # a unique id column; null -> "<split>-<row>"
prompt: "Question: {question}\nAnswer:"       # Python format over the item's columns
scorer: exact_match                           # or multiple_choice
answer: "{answer}"                            # gold answer template
answer_regex: "####\\s*(.+)"                  # optional: extract the gold from the template
prediction_regex: "(-?[\\d,]*\\.?\\d+)(?!.*\\d)"  # optional: extract the prediction (last number)
normalize: [strip, remove_commas]             # applied to both before comparing
max_new_tokens: 256
```

Multiple choice (`scorer: multiple_choice`) scores each choice's continuation by its summed
log-likelihood after the prompt (lm-evaluation-harness's `acc`; `length_normalize: true` for
`acc_norm`-style per-character normalisation) and is correct when the gold choice ranks first:
```yaml
choices: "{choices[text]}"        # a field holding the list of choice strings
choice_template: " {choice}"
answer_index: "{answerKey}"       # gold, mapped through choice_labels when given
choice_labels: "{choices[label]}"
```

An lm-evaluation-harness task (`lm_eval: {task: NAME, include_path: DIR}`, nothing else but `name`,
`splits`, `id_field` and `batch_size`) takes its data, prompts, filters and per-item metric from
lm-eval itself: `evomerge.fitness.lm_eval_tasks`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import yaml

from evomerge._device import default_device
from evomerge.fitness._task_error import TaskError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "fitness"
SCORERS = ("exact_match", "multiple_choice")
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": str.lower,
    "remove_commas": lambda s: s.replace(",", ""),
    "remove_trailing_period": lambda s: s[:-1] if s.endswith(".") else s,
    "number": lambda s: _canonical_number(s),
}


def _canonical_number(s: str) -> str:
    try:
        value = float(s.replace(",", ""))
    except ValueError:
        return s
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: Mapping[str, Any]
    prompt: str
    scorer: str = "exact_match"
    splits: Mapping[str, str] = field(default_factory=lambda: {"fitness": "validation", "test": "test"})
    id_field: str | None = "id"
    answer: str | None = "{answer}"
    answer_regex: str | None = None
    prediction_regex: str | None = None
    normalize: tuple[str, ...] = ("strip",)
    max_new_tokens: int | None = None
    choices: str | None = None
    choice_template: str = " {choice}"
    answer_index: str | None = None
    choice_labels: str | None = None
    length_normalize: bool = False
    batch_size: int = 256
    source: str = "<task>"
    lm_eval: Mapping[str, Any] | None = None  # an lm-eval task (evomerge.fitness.lm_eval_tasks)
    lm_eval_info: Any = field(default=None, compare=False, repr=False)  # what `lm_eval` resolved to

    FIELDS = ("name", "dataset", "prompt", "scorer", "splits", "id_field", "answer", "answer_regex",
              "prediction_regex", "normalize", "max_new_tokens", "choices", "choice_template", "answer_index",
              "choice_labels", "length_normalize", "batch_size", "lm_eval")
    LM_EVAL_FIELDS = ("name", "lm_eval", "splits", "id_field", "batch_size", "scorer")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<task>", root: Path | None = None) -> "TaskSpec":
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise TaskError(f"{source}: field `{unknown[0]}` is not supported; fields: {list(cls.FIELDS)}")
        if "lm_eval" in data:
            return cls._from_lm_eval(data, source, root)
        for required in ("name", "dataset", "prompt"):
            if required not in data:
                raise TaskError(f"{source}: field `{required}` is required")
        scorer = data.get("scorer", "exact_match")
        if scorer not in SCORERS:
            raise TaskError(f"{source}: field `scorer`: {scorer!r} is not one of {list(SCORERS)}")
        dataset = dict(data["dataset"])
        kinds = {"path", "hub", "files"} & set(dataset)
        if len(kinds) != 1:
            raise TaskError(f"{source}: field `dataset` needs exactly one of path, hub or files; got {sorted(dataset)}")
        if "path" in dataset and root is not None and not Path(dataset["path"]).is_absolute():
            dataset["path"] = str((root / dataset["path"]).resolve())
        normalize = tuple(data.get("normalize", ("strip",)))
        for n in normalize:
            if n not in NORMALIZERS:
                raise TaskError(f"{source}: field `normalize`: unknown normalizer {n!r}; valid: {sorted(NORMALIZERS)}")
        if scorer == "multiple_choice" and (not data.get("choices") or not data.get("answer_index")):
            raise TaskError(f"{source}: multiple_choice needs fields `choices` and `answer_index`")
        splits = {"fitness": "validation", "test": "test", **dict(data.get("splits") or {})}
        unknown_splits = set(splits) - {"fitness", "test"}
        if unknown_splits:
            raise TaskError(f"{source}: field `splits.{sorted(unknown_splits)[0]}`: only fitness and test are used")
        kwargs = {k: data[k] for k in cls.FIELDS if k in data and k not in ("dataset", "normalize", "splits")}
        return cls(dataset=dataset, normalize=normalize, splits=splits, source=source, **kwargs)

    @classmethod
    def _from_lm_eval(cls, data: Mapping[str, Any], source: str, root: Path | None) -> "TaskSpec":
        """A preset naming an lm-eval task: checked against lm-eval's task index now, before any data
        or model is loaded (the include path resolves against the preset file's folder)."""
        from evomerge.fitness.lm_eval_tasks import resolve_spec

        name = data.get("name")
        label = f"{source} (task {name!r})" if name else source
        if not name:
            raise TaskError(f"{label}: field `name` is required")
        extra = sorted(set(data) - set(cls.LM_EVAL_FIELDS))
        if extra:
            raise TaskError(f"{label}: field `{extra[0]}` does not apply to an lm-eval task (lm-eval builds its prompts, "
                            f"answers and data); fields: {list(cls.LM_EVAL_FIELDS)}")
        if data.get("scorer", "lm_eval") != "lm_eval":
            raise TaskError(f"{label}: field `scorer`: an lm-eval task is scored by lm-eval's metric; drop `scorer`")
        source_path = Path(source)
        preset_root = source_path.resolve().parent if source_path.suffix in (".yaml", ".yml") else root
        block, info = resolve_spec(data["lm_eval"], data.get("splits"), label, preset_root)
        return cls(name=name, dataset={}, prompt="", scorer="lm_eval", splits=dict(info.splits),
                   id_field=data.get("id_field"), batch_size=int(data.get("batch_size", 64)), source=source,
                   lm_eval=block, lm_eval_info=info)

    def with_dataset(self, dataset: Mapping[str, Any]) -> "TaskSpec":
        if self.lm_eval is not None:
            raise TaskError(f"task {self.name!r}: field `dataset` does not apply to an lm-eval task (its data comes from "
                            "the lm-eval task YAML)")
        return TaskSpec.from_dict({**self.to_dict(), "dataset": dict(dataset)}, source=self.source)

    def to_dict(self) -> dict[str, Any]:
        if self.lm_eval is not None:
            return {"name": self.name, "lm_eval": dict(self.lm_eval), "splits": dict(self.splits),
                    "id_field": self.id_field, "batch_size": self.batch_size}
        out = {}
        for name in self.FIELDS:
            if name == "lm_eval":
                continue
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, Mapping) else value)
        return out

    # --------------------------------------------------------------- data
    def load_split(self, role: str) -> "datasets.Dataset":  # noqa: F821
        """The dataset split playing `role` ('fitness' or 'test'), with the real `datasets` loaders.

        Every read of the split that plays the test role is recorded, and refused inside
        `evomerge.fitness.sealed.sealed_test()` (benchmarks/PROTOCOL.md)."""
        import datasets

        from evomerge.fitness.sealed import note_read

        if role not in self.splits:
            raise TaskError(f"task {self.name!r}: unknown split role {role!r}; roles: {sorted(self.splits)}")
        split = self.splits[role]
        if split is None:
            raise TaskError(f"task {self.name!r}: no split plays the {role} role (field `splits.{role}`)")
        if split == self.splits["test"]:
            note_read(self.name, split, role)
        ds = self.dataset
        if self.lm_eval is not None:
            from evomerge.fitness.lm_eval_tasks import load_docs

            loaded = load_docs(self.lm_eval_info, split, f"task {self.name!r}")
            if self.id_field and self.id_field not in loaded.column_names:
                raise TaskError(f"task {self.name!r}: id field {self.id_field!r} not in columns {loaded.column_names}")
            return loaded
        try:
            if "path" in ds:
                path = Path(ds["path"])
                if not path.exists():
                    raise TaskError(f"task {self.name!r}: dataset folder {path} not found")
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise TaskError(f"task {self.name!r}: {path} has no split {split!r} (has {list(loaded)})")
                    loaded = loaded[split]
            elif "files" in ds:
                files = ds["files"]
                if split not in files:
                    raise TaskError(f"task {self.name!r}: dataset.files has no entry for split {split!r}")
                loaded = datasets.load_dataset(ds.get("format", "json"), data_files={split: files[split]}, split=split)
            else:
                loaded = datasets.load_dataset(ds["hub"], ds.get("config"), split=split,
                                               revision=ds.get("revision"), trust_remote_code=False)
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"task {self.name!r}: cannot load split {split!r} of {dict(ds)} ({type(exc).__name__}: {exc})") from exc
        if self.id_field and self.id_field not in loaded.column_names:
            raise TaskError(f"task {self.name!r}: id field {self.id_field!r} not in columns {loaded.column_names}")
        return loaded

    def item_ids(self, data) -> list[str]:
        if self.id_field:
            ids = [str(x) for x in data[self.id_field]]
        else:
            ids = [f"{self.splits['fitness']}-{i}" for i in range(len(data))]
        if len(set(ids)) != len(ids):
            raise TaskError(f"task {self.name!r}: item ids are not unique")
        return ids

    # --------------------------------------------------------------- scoring
    def render(self, template: str, item: Mapping[str, Any], what: str) -> Any:
        try:
            if template.startswith("{") and template.endswith("}") and template.count("{") == 1:
                return _lookup(item, template[1:-1])  # a bare field: keep its type (lists for choices)
            return template.format_map(_FormatItem(item))
        except (KeyError, IndexError, TypeError) as exc:
            raise TaskError(f"task {self.name!r}: {what} template {template!r} does not fit item "
                            f"{_item_id(item, self.id_field)} ({type(exc).__name__}: {exc})") from exc

    def normalize_text(self, text: str) -> str:
        for name in self.normalize:
            text = NORMALIZERS[name](text)
        return text

    def gold_answer(self, item: Mapping[str, Any]) -> str:
        text = str(self.render(self.answer or "{answer}", item, "answer"))
        if self.answer_regex:
            match = re.search(self.answer_regex, text, flags=re.DOTALL)
            if not match:
                raise TaskError(f"task {self.name!r}: answer_regex {self.answer_regex!r} finds no answer in "
                                f"item {_item_id(item, self.id_field)}: {text[:80]!r}")
            text = match.group(1) if match.groups() else match.group(0)
        return self.normalize_text(text)

    def extract_prediction(self, text: str) -> str:
        if self.prediction_regex:
            match = re.search(self.prediction_regex, text, flags=re.DOTALL)
            text = (match.group(1) if match.groups() else match.group(0)) if match else ""
        return self.normalize_text(text)

    def make_scorer(self, tokenizer, items, *, device=None) -> "Callable[[torch.nn.Module], np.ndarray]":
        """A scorer for these items: tokenizes once, then `scorer(model)` -> (n,) 0/1 answers."""
        if self.lm_eval is not None:
            from evomerge.fitness.lm_eval_tasks import LMEvalScorer

            return LMEvalScorer(self, tokenizer, items, device=device)
        check_tokenizer(tokenizer, self, items)
        if self.scorer == "exact_match":
            return GenerationScorer(self, tokenizer, items, device=device)
        return MultipleChoiceScorer(self, tokenizer, items, device=device)


class _FormatItem(dict):
    """`str.format_map` over an item's columns."""


def _lookup(item: Mapping[str, Any], path: str) -> Any:
    value: Any = item
    for part in re.findall(r"[^\[\]]+", path):
        value = value[int(part)] if isinstance(value, (list, tuple)) and part.isdigit() else value[part]
    return value


def _item_id(item: Mapping[str, Any], id_field: str | None) -> str:
    return str(item.get(id_field, "?")) if id_field else "?"


def check_tokenizer(tokenizer, task: TaskSpec, items) -> None:
    """A tokenizer that cannot represent the task's text cannot score it: say so up front."""
    unk = getattr(tokenizer, "unk_token_id", None)
    sample = [task.render(task.prompt, items[i], "prompt") for i in range(min(len(items), 32))]
    if unk is not None:
        for text in sample:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if unk in ids:
                bad = [c for c in text if unk in tokenizer(c, add_special_tokens=False).input_ids][:5]
                raise TaskError(f"task {task.name!r}: the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) maps "
                                f"characters {bad} of prompt {text[:60]!r} to the unknown token; it cannot score this task")
    if task.scorer == "exact_match" and tokenizer.eos_token_id is None:
        raise TaskError(f"task {task.name!r}: the tokenizer has no eos token, so generated answers never end")


class GenerationScorer:
    """Exact match of the greedy-decoded answer (after the task's extraction and normalisation)."""

    def __init__(self, task: TaskSpec, tokenizer, items, *, device=None):
        from evomerge.fitness.scoring import ExactMatchScorer

        self.task = task
        prompts = [task.render(task.prompt, items[i], "prompt") for i in range(len(items))]
        self.gold = [task.gold_answer(items[i]) for i in range(len(items))]
        max_new = task.max_new_tokens
        if max_new is None:
            longest = max((len(tokenizer(a, add_special_tokens=False).input_ids) for a in self.gold), default=0)
            max_new = longest + 2
        self._scorer = ExactMatchScorer(tokenizer, prompts, None, batch_size=task.batch_size,
                                        max_new_tokens=max_new, device=device)

    @property
    def n_items(self) -> int:
        return len(self.gold)

    def predictions(self, model: torch.nn.Module) -> list[str]:
        return [self.task.extract_prediction(text) for text in self._scorer.decode(model)]

    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        return np.array([p == g for p, g in zip(self.predictions(model), self.gold)], dtype=np.int8)


class MultipleChoiceScorer:
    """Log-likelihood of each choice's continuation after the prompt; correct when the gold ranks first."""

    def __init__(self, task: TaskSpec, tokenizer, items, *, device=None):
        self.task = task
        self.device = default_device(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        sequences, spans, owners, lengths = [], [], [], []
        self.gold = []
        for i in range(len(items)):
            item = items[i]
            prompt = task.render(task.prompt, item, "prompt")
            choices = list(task.render(task.choices, item, "choices"))
            if not choices:
                raise TaskError(f"task {task.name!r}: item {_item_id(item, task.id_field)} has no choices")
            gold = task.render(task.answer_index, item, "answer_index")
            if task.choice_labels:
                labels = [str(x) for x in task.render(task.choice_labels, item, "choice_labels")]
                if str(gold) not in labels:
                    raise TaskError(f"task {task.name!r}: gold {gold!r} not among labels {labels} of item "
                                    f"{_item_id(item, task.id_field)}")
                gold = labels.index(str(gold))
            self.gold.append(int(gold))
            prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
            for choice in choices:
                continuation = task.choice_template.format(choice=choice)
                cont_ids = tokenizer(continuation, add_special_tokens=False).input_ids
                sequences.append(prompt_ids + cont_ids)
                spans.append((len(prompt_ids), len(prompt_ids) + len(cont_ids)))
                owners.append(i)
                lengths.append(max(len(continuation), 1))
        self.n_items = len(items)
        self._owners = np.array(owners)
        self._char_lengths = np.array(lengths, dtype=np.float64)
        order = np.argsort([len(s) for s in sequences], kind="stable")
        self._batches = []
        self._targets = []
        for start in range(0, len(order), task.batch_size):
            rows = order[start:start + task.batch_size]
            width = max(len(sequences[r]) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            target = torch.zeros((len(rows), width), dtype=torch.bool)
            for j, r in enumerate(rows):
                seq = sequences[r]
                ids[j, :len(seq)] = torch.tensor(seq)  # right padding: positions stay 0..len-1
                mask[j, :len(seq)] = 1
                lo, hi = spans[r]
                target[j, lo:hi] = True
            self._batches.append((rows, ids.to(self.device), mask.to(self.device), target.to(self.device)))
            # the (row, position) pairs whose next token is a continuation token, and those tokens
            where = target[:, 1:].nonzero(as_tuple=True)  # ((P,), (P,)), row-major
            self._targets.append((tuple(w.to(self.device) for w in where), ids[:, 1:][where].to(self.device)))

    @torch.inference_mode()
    def loglikelihoods(self, model: torch.nn.Module) -> np.ndarray:
        """Summed log p(continuation token | everything before it) per choice (float32 sums).

        The LM head and the log-softmax run only at the positions that predict a continuation token:
        a pre-hook on the model's output embeddings (`get_output_embeddings()`, the head its forward
        calls once on the (batch, length, hidden) final states) hands it those rows only, so the model's
        own forward still runs the base and whatever follows the head (logit scaling, soft-capping).
        The hidden states are those of the same forward call, the log-probabilities are row-wise and
        they are summed over the same (batch, length - 1) layout as the full computation: the result
        equals the full-vocabulary-at-every-position one. A model without such a head, or one whose
        forward does not call it exactly once on those states, takes the full path.
        """
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = head if isinstance(head, torch.nn.Module) else None
        out = np.zeros(len(self._owners))
        for (rows, ids, mask, _), (where, tokens) in zip(self._batches, self._targets):
            token_lp, logits = (None, None) if head is None else self._at_targets(model, head, ids, mask, where, tokens)
            if token_lp is None:  # the full path: head and log-softmax at every position
                if logits is None:
                    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
                token_lp = torch.log_softmax(logits.float()[:, :-1], dim=-1)[where].gather(
                    -1, tokens[:, None]).squeeze(-1)  # (P,)
            dense = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=token_lp.dtype, device=token_lp.device)
            dense[where] = token_lp  # (B, T-1): log p(token t + 1 | <= t) at the continuation tokens, else 0
            out[rows] = dense.sum(dim=1).cpu().numpy()
        return out

    @staticmethod
    def _at_targets(model, head, ids, mask, where, tokens):
        """One forward with `head` fed the final hidden states at the (row, position) pairs `where`
        only. Returns (log p(tokens) there (P,), None); (None, the forward's (B, T, V) logits) when the
        forward never called `head` on (batch, length, hidden) states; (None, None) when it called it
        otherwise (more than once, or its output is not (P, V)): the caller then runs the full path."""
        batch, length = ids.shape
        calls = []

        def gather(module, args, kwargs):
            hidden = args[0] if args else None
            ok = (isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.dim() == 3
                  and tuple(hidden.shape[:2]) == (batch, length))
            calls.append(ok)
            return ((hidden[where], *args[1:]), kwargs) if ok else None  # hidden[where]: (P, H)

        handle = head.register_forward_pre_hook(gather, with_kwargs=True)
        try:
            logits = model(input_ids=ids, attention_mask=mask).logits
        except Exception:
            if any(calls):  # the forward may not take the gathered shape after the head: the full path
                return None, None
            raise
        finally:
            handle.remove()
        if not any(calls):
            return None, logits
        if calls != [True] or logits.dim() != 2 or logits.shape[0] != len(tokens):
            return None, None
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1), None

    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        scores = self.loglikelihoods(model)
        if self.task.length_normalize:
            scores = scores / self._char_lengths
        correct = np.zeros(self.n_items, dtype=np.int8)
        for i in range(self.n_items):
            choice_scores = scores[self._owners == i]
            correct[i] = int(np.argmax(choice_scores) == self.gold[i])
        return correct


# ------------------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_task(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
              root: Path | None = None) -> TaskSpec:
    """A task preset by name (`fitness/<name>.yaml`, the project's own folder first) or path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        candidates = [Path.cwd() / "fitness" / f"{name_or_path}.yaml", PRESET_DIR / f"{name_or_path}.yaml"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise TaskError(f"unknown task {str(name_or_path)!r}; presets: {preset_names()}")
        path = found[0]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected a mapping")
    data = {**data, **dict(overrides or {})}
    # Relative dataset paths resolve against the working directory, as model paths do.
    return TaskSpec.from_dict(data, source=str(path), root=root or Path.cwd())


def dataset_hash(data, columns: Sequence[str] | None = None) -> str:
    """SHA-256 over the rows of a split (its columns in order): detects changed fitness data."""
    h = hashlib.sha256()
    columns = list(columns or data.column_names)
    for row in data.select_columns(columns):
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()

