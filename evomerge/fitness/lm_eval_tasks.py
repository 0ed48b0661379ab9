"""lm-evaluation-harness tasks as fitness tasks: lm-eval's prompts, filters and metric, on the live model.

A task preset names an lm-eval task instead of describing one (see fitness/README.md, "lm-eval
tasks as fitness tasks"):

```yaml
name: sums_mc
lm_eval:
  task: evomerge_sums_mc        # a task name lm-eval knows (built in, or found under include_path)
  include_path: lm_eval_tasks   # optional: a folder of lm-eval task YAMLs (relative to this preset's folder)
  metric: acc                   # optional: default the task's first metric
  filter: none                  # optional: default the task's first filter pipeline
  threshold: null               # only for a continuous metric in [0, 1]: correct when value >= threshold
  num_fewshot: null             # optional: override the task's num_fewshot
  fewshot_seed: 1234            # optional: seeds each item's few-shot draw (with the item's content)
splits: {fitness: validation, test: test}   # optional: default the task's validation_split / test_split
```

Split roles: evomerge's `fitness` split (calibration, subsets, the search) is the task's
`validation_split`, and its sealed `test` split is the task's `test_split`; a preset's `splits`
names other splits of the task's dataset. Reads of the test split go through
`evomerge.fitness.sealed.note_read` like every other task's, and so does a few-shot context drawn
from it. lm-eval itself evaluates `test_split` when a task has one; evomerge never does so implicitly.

Per-item correctness is lm-eval's own: the task's `Instance` requests are built once per scorer
(`Task.fewshot_context` + `Task.construct_requests`), and every call runs them through lm-eval's
`HFLM` wrapped around the candidate model (`HFLM(pretrained=<module>, tokenizer=...)`), applies
the task's filter pipelines and reads the chosen metric from `Task.process_results`, exactly as
`lm_eval.evaluator.evaluate` does. A few-shot context is drawn with a generator seeded by the
document's content, so an item gets the same prompt in a subset as in the whole split (lm-eval
draws from one generator in document order, so with `num_fewshot > 0` its contexts differ).

Why HFLM rather than evomerge's own batched scorers fed with lm-eval's prompts
(`benchmarks/lm_eval_scoring.py`, CPU, one thread, 1,000 items each): the small zoo's addition
expert generating its answers took 0.62 s through HFLM and 0.38 s through `ExactMatchScorer` (the
same 0.962, every item alike); a random 4-layer, 256-wide Llama took 1.31 against 1.17 s for 6-token
generations and 1.54 s through `HFLM.loglikelihood` against 2.72 s through `MultipleChoiceScorer`
for three-way multiple choice (HFLM runs one forward per shared context and a log-softmax only
over continuation positions; measured before `MultipleChoiceScorer` computed its head only at those
positions too, commit 63f3400, not re-measured). At most 1.6x faster, 1.8x slower on multiple choice, and not
lm-eval's own tokenization and stopping rules: HFLM it is. `simple_evaluate` rebuilds the requests
on every call (3.35 s for those multiple-choice items); a scorer builds them once.

Everything that can be checked without a model is checked when the preset is read
(`resolve_spec`): the task name, the include path's YAML files, the output type, the metric (per
item, aggregated by `mean`, binary -- acc, acc_norm, acc_mutual_info, exact_match -- or, with a
`threshold`, continuous in [0, 1]), the filter and the splits. Values are checked again per item
when a model is scored.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evomerge.fitness._task_error import TaskError

__all__ = ["BINARY_METRICS", "LMEvalScorer", "LMEvalTaskInfo", "load_docs", "resolve_spec"]

BINARY_METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match")
OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "generate_until")
SPEC_FIELDS = ("task", "include_path", "metric", "filter", "threshold", "num_fewshot", "fewshot_seed")
# Metrics whose per-item values are not in [0, 1] or are not per item at all.
_NOT_UNIT_INTERVAL = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "bleu", "chrf", "ter")

_lock = threading.Lock()
_managers: dict[tuple[str, ...], Any] = {}
_tasks: dict[tuple[str, str | None], Any] = {}


def _error(message: str) -> Exception:
    return TaskError(message)


def _import_lm_eval(where: str = "lm-eval task"):
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise _error(f"{where}: field `lm_eval` needs lm-evaluation-harness: pip install 'evomerge[lm_eval]' "
                     f"(lm-eval==0.4.13) ({exc})") from exc
    return TaskManager


@dataclass(frozen=True)
class LMEvalTaskInfo:
    """What a preset's `lm_eval` block resolved to, before any data or model is loaded."""

    task: str
    include_path: str | None
    output_type: str
    metric: str
    filter: str
    binary: bool
    threshold: float | None
    splits: dict[str, str | None]  # role -> the dataset split playing it
    fewshot_split: str | None  # the split few-shot examples come from (None: zero-shot or fixed samples)


def _task_manager(include_path: str | None, with_defaults: bool):
    """One TaskManager per (include path, defaults) per process: indexing lm-eval's own ~15k task
    YAMLs takes ~6 s, a custom folder alone milliseconds."""
    key = (include_path or "", str(with_defaults))
    with _lock:
        if key not in _managers:
            task_manager = _import_lm_eval()
            _managers[key] = task_manager(include_path=include_path, include_defaults=with_defaults)
        return _managers[key]


def _check_include_path(path: Path, where: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.exists():
        raise _error(f"{where}: field `lm_eval.include_path`: {path} not found")
    files = [path] if path.is_file() else sorted(path.glob("**/*.yaml"))
    if not files:
        raise _error(f"{where}: field `lm_eval.include_path`: {path} holds no lm-eval task YAML (*.yaml)")
    for file in files:
        try:
            load_yaml(file, resolve_func=False, recursive=True)
        except Exception as exc:  # lm-eval's index skips such files silently; a fitness task must not
            raise _error(f"{where}: field `lm_eval.include_path`: {file} does not parse as an lm-eval task YAML "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _metric_aggregation(entry: Mapping[str, Any]) -> str | None:
    """The aggregation's name: as written in the metric_list entry, else lm-eval's registered default."""
    aggregation = entry.get("aggregation")
    if isinstance(aggregation, str):
        return aggregation
    if aggregation is not None:
        return getattr(aggregation, "__name__", str(aggregation))
    from lm_eval.api.registry import get_metric_aggregation

    try:
        function = get_metric_aggregation(entry["metric"])
    except Exception:
        return None
    return getattr(function, "__name__", None)


def resolve_spec(block: Mapping[str, Any], splits: Mapping[str, str] | None, where: str,
                 root: Path | None = None) -> tuple[dict[str, Any], LMEvalTaskInfo]:
    """Check a preset's `lm_eval` block (and its `splits`) against lm-eval's task index.

    Returns (the block with include_path made absolute, what it resolved to). Every error names
    the preset (`where`), the task and the field, and comes before any data or model is loaded."""
    _import_lm_eval(where)
    if not isinstance(block, Mapping):
        raise _error(f"{where}: field `lm_eval` must be a mapping with at least `task`; got {block!r}")
    unknown = sorted(set(block) - set(SPEC_FIELDS))
    if unknown:
        raise _error(f"{where}: field `lm_eval.{unknown[0]}` is not supported; fields: {list(SPEC_FIELDS)}")
    name = block.get("task")
    if not isinstance(name, str) or not name:
        raise _error(f"{where}: field `lm_eval.task` is required (an lm-eval task name)")
    block = dict(block)
    include = block.get("include_path")
    if include is not None:
        path = Path(str(include)).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        path = path.resolve()
        _check_include_path(path, where)
        block["include_path"] = str(path)
    manager = _task_manager(block.get("include_path"), with_defaults=False) if include is not None else None
    if manager is None or name not in manager.task_index:
        manager = _task_manager(block.get("include_path"), with_defaults=True)
    entry = manager.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=5)
        hint = f"; close matches: {close}" if close else ""
        raise _error(f"{where}: field `lm_eval.task`: lm-eval has no task {name!r}"
                     f"{' (searched ' + str(block['include_path']) + ' and the built-in tasks)' if include else ''}{hint}")
    from lm_eval.tasks._index import Kind

    if entry.kind not in (Kind.TASK,):
        kind = {Kind.GROUP: "a group", Kind.TAG: "a tag", Kind.PY_TASK: "a Python-class task"}.get(entry.kind, str(entry.kind))
        raise _error(f"{where}: field `lm_eval.task`: {name!r} is {kind}, not a single YAML task; name one of its tasks")
    cfg = dict(entry.cfg or {})
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise _error(f"{where}: lm-eval task {name!r}: output_type {output_type!r} gives no per-item correctness "
                     f"in [0, 1]; supported: {list(OUTPUT_TYPES)}")
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    entries = cfg.get("metric_list") or [{"metric": m} for m in DEFAULT_METRIC_REGISTRY[output_type]]
    metrics = {str(e["metric"]): e for e in entries if isinstance(e, Mapping) and "metric" in e}
    metric = block.get("metric") or next(iter(metrics), None)
    if metric not in metrics:
        raise _error(f"{where}: field `lm_eval.metric`: lm-eval task {name!r} has no metric {metric!r}; "
                     f"its metrics: {list(metrics)}")
    aggregation = _metric_aggregation(metrics[metric])
    threshold = block.get("threshold")
    if metric in _NOT_UNIT_INTERVAL or aggregation != "mean":
        raise _error(f"{where}: field `lm_eval.metric`: metric {metric!r} of lm-eval task {name!r} (aggregation "
                     f"{aggregation!r}) is not a per-item score in [0, 1] averaged over items; a fitness task needs "
                     f"a per-item binary metric ({list(BINARY_METRICS)}) or, with `lm_eval.threshold`, a continuous "
                     "one in [0, 1]")
    binary = metric in BINARY_METRICS
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise _error(f"{where}: field `lm_eval.threshold`: {threshold!r} is not a number in (0, 1]")
        threshold = float(threshold)
    elif not binary:
        raise _error(f"{where}: field `lm_eval.metric`: metric {metric!r} of lm-eval task {name!r} is not known to be "
                     f"binary per item ({list(BINARY_METRICS)}); the compressed fitness needs 0/1 answers: if its "
                     "per-item values lie in [0, 1], set `lm_eval.threshold` (correct when value >= threshold)")
    filters = [str(f.get("name")) for f in cfg.get("filter_list") or [] if isinstance(f, Mapping)] or ["none"]
    chosen_filter = block.get("filter") or filters[0]
    if chosen_filter not in filters:
        raise _error(f"{where}: field `lm_eval.filter`: lm-eval task {name!r} has no filter {chosen_filter!r}; "
                     f"its filters: {filters}")
    fewshot_seed = block.get("fewshot_seed")
    if fewshot_seed is not None and (isinstance(fewshot_seed, bool) or not isinstance(fewshot_seed, int)):
        raise _error(f"{where}: field `lm_eval.fewshot_seed`: {fewshot_seed!r} is not an integer")
    num_fewshot = block.get("num_fewshot")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise _error(f"{where}: field `lm_eval.num_fewshot`: {num_fewshot!r} is not a count >= 0")
    role_splits = {"fitness": cfg.get("validation_split"), "test": cfg.get("test_split")}
    for role, split in dict(splits or {}).items():
        if role not in role_splits:
            raise _error(f"{where}: field `splits.{role}`: only fitness and test are used")
        role_splits[role] = split
    if not role_splits["fitness"]:
        raise _error(f"{where}: field `splits.fitness`: lm-eval task {name!r} has no validation_split; name the split "
                     "of its dataset that plays evomerge's fitness role")
    shots = num_fewshot if num_fewshot is not None else (cfg.get("num_fewshot") or 0)
    fewshot_split = None
    if shots:
        fewshot_cfg = cfg.get("fewshot_config") or {}
        if fewshot_cfg.get("samples") is None:
            fewshot_split = (fewshot_cfg.get("split") or cfg.get("fewshot_split") or cfg.get("training_split")
                             or cfg.get("validation_split") or cfg.get("test_split"))
    info = LMEvalTaskInfo(name, block.get("include_path"), output_type, metric, chosen_filter, binary, threshold,
                          role_splits, fewshot_split)
    return block, info


def _instantiate(info: LMEvalTaskInfo, where: str):
    """The lm-eval Task object (its dataset loaded by lm-eval's own `download`), once per process."""
    key = (info.task, info.include_path)
    with _lock:
        if key in _tasks:
            return _tasks[key]
    manager = _task_manager(info.include_path, with_defaults=False) if info.include_path else None
    if manager is None or info.task not in manager.task_index:
        manager = _task_manager(info.include_path, with_defaults=True)
    try:
        task = manager.load([info.task])["tasks"][info.task]
    except Exception as exc:
        raise _error(f"{where}: lm-eval task {info.task!r} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    with _lock:
        _tasks[key] = task
    return task


def load_docs(info: LMEvalTaskInfo, split: str, where: str):
    """The documents of one split of the task's dataset, after its `process_docs`, as a `datasets.Dataset`."""
    import datasets

    task = _instantiate(info, where)
    dataset = getattr(task, "dataset", None)
    if dataset is None or split not in dataset:
        have = list(dataset) if dataset is not None else []
        raise _error(f"{where}: lm-eval task {info.task!r} has no split {split!r} (its dataset has {have})")
    docs = dataset[split]
    if task.config.process_docs is not None:
        docs = task.config.process_docs(docs)
    if not isinstance(docs, datasets.Dataset):
        docs = datasets.Dataset.from_list(list(docs))
    return docs


def _doc_seed(doc: Mapping[str, Any], seed: int) -> int:
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).digest()
    return (int.from_bytes(digest[:8], "little") + seed) % 2**63


class LMEvalScorer:
    """lm-eval's per-item metric for fixed documents: requests built once, `scorer(model)` -> (n,) 0/1.

    `values(model)` gives the metric itself per item (before any threshold)."""

    def __init__(self, spec, tokenizer, docs, *, device=None):
        from evomerge._device import default_device
        from evomerge.fitness.sealed import note_read

        self.spec = spec
        self.info: LMEvalTaskInfo = spec.lm_eval_info
        self.tokenizer = tokenizer
        self.device = default_device(device)
        self.batch_size = spec.batch_size
        info, where = self.info, spec.source
        task = _instantiate(info, where)
        self._task = task
        shots = self.spec.lm_eval.get("num_fewshot")
        shots = task.config.num_fewshot if shots is None else shots
        shots = int(shots or 0)
        if shots and info.fewshot_split is not None and info.fewshot_split == info.splits.get("test"):
            note_read(spec.name, info.fewshot_split, "fewshot")
        seed = self.spec.lm_eval.get("fewshot_seed")
        seed = 1234 if seed is None else int(seed)  # lm-eval's default fewshot_random_seed
        self.docs = [docs[i] for i in range(len(docs))]
        self._per_doc: list[list] = []
        with _quiet():
            for doc_id, doc in enumerate(self.docs):
                if shots:
                    task.set_fewshot_seed(seed=_doc_seed(doc, seed))
                context = task.fewshot_context(doc, num_fewshot=shots, gen_prefix=task.doc_to_prefix(doc))
                requests = task.construct_requests(doc=doc, ctx=context, metadata=(info.task, doc_id, task.config.repeats))
                self._per_doc.append(requests if isinstance(requests, list) else [requests])
        self._instances = [r for group in self._per_doc for r in group]
        self._lm = None
        self._lm_model = None

    @property
    def n_items(self) -> int:
        return len(self.docs)

    def _hflm(self, model):
        if self._lm is None or self._lm_model is None or self._lm_model() is not model:
            from lm_eval.models.huggingface import HFLM

            with _quiet():
                self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                                device=str(self.device))
            self._lm_model = weakref.ref(model)
        return self._lm

    def values(self, model) -> np.ndarray:
        """The chosen metric per document, as lm-eval's `process_results` reports it."""
        import torch

        lm = self._hflm(model)
        was_training = model.training
        model.eval()
        for instance in self._instances:
            instance.resps = []
            instance.filtered_resps = {}
        by_type: dict[str, list] = {}
        for instance in self._instances:
            by_type.setdefault(instance.request_type, []).append(instance)
        try:
            with _quiet(), torch.inference_mode():
                for request_type, requests in by_type.items():
                    cloned = [r for r in requests for _ in range(r.repeats)]
                    for response, request in zip(getattr(lm, request_type)(cloned, disable_tqdm=True), cloned):
                        request.resps.append(response)
                for ensemble in getattr(self._task, "_filters", []):
                    ensemble.apply(self._instances)
                out = np.empty(len(self.docs), dtype=np.float64)
                for i, (doc, requests) in enumerate(zip(self.docs, self._per_doc)):
                    metrics = self._task.process_results(doc, [r.filtered_resps[self.info.filter] for r in requests])
                    out[i] = float(metrics[self.info.metric])
        except (AssertionError, KeyError, ValueError) as exc:  # lm-eval's checks (e.g. max_gen_toks >= the model's length)
            raise _error(f"lm-eval task {self.info.task!r} (preset {self.spec.name!r}) cannot score this model "
                         f"({type(exc).__name__}: {exc})") from exc
        finally:
            model.train(was_training)
        return out

    def __call__(self, model) -> np.ndarray:
        values = self.values(model)
        info = self.info
        outside = np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))
        if outside.size:
            raise _error(f"lm-eval task {info.task!r} (preset {self.spec.name!r}): metric {info.metric!r} gave "
                         f"{values[outside[0]]!r} on item {int(outside[0])}, outside [0, 1]; it cannot be a fitness")
        if info.threshold is not None:
            return (values >= info.threshold).astype(np.int8)
        fractional = np.flatnonzero((values != 0.0) & (values != 1.0))
        if fractional.size:
            raise _error(f"lm-eval task {info.task!r} (preset {self.spec.name!r}): metric {info.metric!r} gave "
                         f"{values[fractional[0]]!r} on item {int(fractional[0])}, not 0 or 1; set field "
                         "`lm_eval.threshold` to count an item correct when value >= threshold")
        return values.astype(np.int8)


class _quiet:
    """lm-eval logs a line or a warning per request batch and per model wrap, and HFLM's `generate` call
    draws a transformers warning per batch (max_length beside max_new_tokens); keep them out of a
    search's output."""

    _NAMES = ("lm_eval", "transformers")

    def __enter__(self):
        self._levels = {name: logging.getLogger(name).level for name in self._NAMES}
        for name in self._NAMES:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
