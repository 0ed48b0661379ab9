"""`build_zoo` and its stages, in dependency order: tokenizer, tasks, base, experts, evaluation.

The builder (`_build._Builder`: keys, reuse, the manifest) knows nothing of the stages; this
module runs them, in order, through it. Each stage computes its component's key from its
settings and its inputs' hashes, then asks the builder to reuse or build the folder. Models are
always read back from their saved folders before they are used downstream, so a reused
component and a freshly built one behave alike.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from evomerge._atomic import atomic_file
from evomerge.fitness.scoring import ExactMatchScorer
from evomerge.zoo._build import (
    BAR_BASE_GAP,
    BAR_EXPERT_OWN_TASK,
    BAR_HEADROOM,
    BAR_MERGE_OVER_BASE,
    BAR_MERGE_OVER_BEST_EXPERT,
    BASE,
    Manifest,
    _Builder,
    _hash_json,
    derive_seed,
    folder_files,
    grid_search,
    score_tasks,
)
from evomerge.zoo._sizes import ZooSize, get_size
from evomerge.zoo._tasks import TaskSplitSizes, make_task_splits
from evomerge.zoo._tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, save_tokenizer, vocab_for
from evomerge.zoo._train import (
    BatchPart, encode_examples, init_model, make_sampler, model_config, train, with_teacher,
)

MAX_ANSWER_TOKENS = 12  # longest zoo answer is 8 digits; generation_config's default budget


# --------------------------------------------------------------------------- tokenizer and tasks


def build_tokenizer_stage(b: _Builder) -> None:
    vocab = vocab_for(b.spec.characters)
    key = _hash_json({"stage": "tokenizer/1", "vocab": vocab})

    def build(folder: Path) -> dict:
        save_tokenizer(build_tokenizer(b.spec.characters), folder)
        return {"vocab": list(vocab)}

    b.data["tokenizer"] = b.ensure("tokenizer", b.root / "tokenizer", key, b.previous_entry("tokenizer"), build)
    b.save()


def build_task_stages(b: _Builder) -> None:
    import datasets

    sizes = TaskSplitSizes(b.spec.train_items, b.spec.validation_items, b.spec.test_items)
    test_stream = b.spec.split_format == 2
    for task in b.spec.tasks:
        # format 2 (test from its own generator) is task/2; the small zoo's folders keep task/1
        settings = {"stage": "task/2", "test_stream": True} if test_stream else {"stage": "task/1"}
        key = _hash_json({**settings, "task": task, "sizes": sizes.__dict__, "seed": b.seed})

        def build(folder: Path, task: str = task, key: str = key) -> dict:
            columns = make_task_splits(task, sizes, b.seed, test_stream=test_stream)
            splits = {}
            for split, cols in columns.items():
                table = datasets.Dataset.from_dict(cols)
                # a fingerprint derived from the key (not a random one) keeps the saved bytes reproducible
                splits[split] = datasets.Dataset(table.data, info=table.info, fingerprint=f"{key[:16]}-{split}")
            datasets.DatasetDict(splits).save_to_disk(str(folder))
            return {
                "description": _TASK_DESCRIPTIONS[task],
                "splits": {split: len(cols["id"]) for split, cols in columns.items()},
                "columns": list(columns["test"]),
            }

        b.data["tasks"][task] = b.ensure(f"task {task}", b.root / "tasks" / task, key, b.previous_entry("tasks", task), build)
        b.save()


_TASK_DESCRIPTIONS = {
    "addition": "a+b= -> the sum, operands 0-99",
    "reversal": "R<4-8 digits>= -> the digits reversed",
    "sorting": "S<4-8 digits>= -> the digits sorted ascending",
    "subtraction": "a-b= -> the difference, 0 <= b <= a <= 99",
    "rotation": "L<4-8 digits>= -> the digits rotated left by one",
    "maxmin": "M<4-8 digits>= -> the largest digit, then the smallest",
}


def _load_split(b: _Builder, task: str, split: str):
    import datasets

    from evomerge.fitness.sealed import note_read

    if split == "test":  # the build chooses (recipes, early stops, the grid merge): it never reads test
        note_read(f"zoo {b.spec.name} {task}", split)
    return datasets.load_from_disk(str(b.root / b.data["tasks"][task]["path"]))[split]


# --------------------------------------------------------------------------- models


def _model_shape(b: _Builder) -> dict:
    s = b.spec
    return {"hidden": s.hidden, "layers": s.layers, "heads": s.heads, "intermediate": s.intermediate}


def _save_model(model, folder: Path, characters: str) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS
    )
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(build_tokenizer(characters), folder)


def _with_zoo_tokenizer(b: _Builder, label: str, entry: dict) -> dict:
    """Model folders built before the fix carried the small zoo's tokenizer whatever the zoo's
    characters (the medium zoo's models then mapped `-`, `L`, `M` to <unk>). The weights do not
    depend on it, so a reused folder gets the zoo's tokenizer files in place instead of a retrain."""
    folder = b.root / entry["path"]
    tokenizer_folder = b.root / b.data["tokenizer"]["path"]
    names = [n for n in entry["files"] if n.startswith("tokenizer")]
    if all((folder / n).read_bytes() == (tokenizer_folder / n).read_bytes() for n in names):
        return entry
    for name in names:
        with atomic_file(folder / name, "wb") as handle:
            handle.write((tokenizer_folder / name).read_bytes())
    b.log(f"{label}: tokenizer files replaced by the zoo's (built before the vocabulary fix)")
    files = folder_files(folder)
    return {**entry, "files": files, "hash": _hash_json(files)}


def _load_model(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def _task_hashes(b: _Builder) -> dict[str, str]:
    """What the models and the evaluation depend on, per task: the whole folder (format 1, as the
    small zoo was built), or its train and validation splits only (format 2), so that a test split
    is never an input of anything the build chooses."""
    if b.spec.split_format == 1:
        return {t: b.data["tasks"][t]["hash"] for t in b.spec.tasks}
    return {t: _hash_json({f: h for f, h in b.data["tasks"][t]["files"].items() if not f.startswith("test/")})
            for t in b.spec.tasks}


def _upstream_hashes(b: _Builder) -> dict:
    return {"tokenizer": b.data["tokenizer"]["hash"], "tasks": _task_hashes(b)}


def _optimization(s) -> dict:
    """What `train` does the same for every model, as recorded in the manifest and stage keys."""
    return {"schedule": "linear warm-up, cosine decay to 0",
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0), grad-norm clip 1.0",
            "autocast": s.train_autocast}


def build_base_stage(b: _Builder) -> None:
    s = b.spec
    training = {
        "objective": "mixture of all task formats, answer tokens only",
        "steps": s.base_steps,
        "lr": s.base_lr,
        "warmup": s.base_warmup,
        **_optimization(s),
        "batch_mix": s.base_mix,
        "limits": {t: f"{col} <= {lim}" for t, (col, lim) in s.base_limits.items()},
        "init_seed": derive_seed(b.seed, BASE, "init"),
        "batch_seed": derive_seed(b.seed, BASE, "batches"),
    }
    key = _hash_json({"stage": "base/1", "shape": _model_shape(b), "training": training, **_upstream_hashes(b)})

    def build(folder: Path) -> dict:
        config = model_config(**_model_shape(b), vocab_size=len(vocab_for(s.characters)))
        model = init_model(config, training["init_seed"]).to(b.device)
        parts = []
        for task, count in s.base_mix.items():
            train_split = _load_split(b, task, "train")
            column, limit = s.base_limits.get(task, ("n_digits", float("inf")))
            rows = [(p, a) for p, a, n in zip(train_split["prompt"], train_split["answer"], train_split[column])
                    if n <= limit]
            parts.append(BatchPart(encode_examples(*zip(*rows), vocab=vocab_for(s.characters)), count))
        generator = torch.Generator().manual_seed(training["batch_seed"])
        losses = train(model, make_sampler(parts, generator), steps=s.base_steps, lr=s.base_lr,
                       warmup=s.base_warmup, autocast=s.autocast_dtype(), stage="base", log=b.log,
                       log_every=max(1, s.base_steps // 5))
        _save_model(model.cpu(), folder, s.characters)
        return _model_info(model, "base", None, None, {**training, "final_loss": round(float(np.mean(losses[-10:])), 4)})

    entry = b.ensure("model base", b.root / "models" / BASE, key, b.previous_entry("models", BASE), build)
    b.data["models"][BASE] = _with_zoo_tokenizer(b, "model base", entry)
    b.save()


def _model_info(model, role: str, task: str | None, parent: str | None, training: dict) -> dict:
    return {
        "role": role,
        "task": task,
        "parent": parent,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "config": {k: getattr(model.config, k) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
        "training": training,
    }


def tokenizer_for(b: _Builder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(b.root / b.data["tokenizer"]["path"])


def _replay_pools(b: _Builder, base_model, tokenizer) -> dict:
    """Per task: `replay_pool` training prompts with the base's own greedy answers and, when the
    replay is distilled, the base's next-token distributions along them."""
    pools = {}
    for task in b.spec.tasks:
        prompts = _load_split(b, task, "train")["prompt"][: b.spec.replay_pool]
        scorer = ExactMatchScorer(tokenizer, prompts, batch_size=b.spec.eval_batch,
                                  max_new_tokens=MAX_ANSWER_TOKENS, device=b.device)
        pools[task] = encode_examples(prompts, scorer.decode(base_model), vocab=vocab_for(b.spec.characters))
        if b.spec.replay_distill > 0:
            pools[task] = with_teacher(pools[task], base_model)
    return pools


def _layer_lr_scale(training: dict) -> Callable[[str], float] | None:
    """Full learning rate in the expert's own decoder layers, `other_lr_scale` x it elsewhere."""
    if "layers" not in training:
        return None
    own, other = set(training["layers"]), training["other_lr_scale"]

    def scale(name: str) -> float:
        match = re.search(r"\.layers\.(\d+)\.", name)
        return 1.0 if match and int(match.group(1)) in own else other

    return scale


def build_expert_stages(b: _Builder) -> None:
    s = b.spec
    base_path = b.root / b.data["models"][BASE]["path"]
    cache: dict = {}  # the base model and replay pools, loaded only if some expert needs building

    def base_and_pools():
        if not cache:
            cache["tokenizer"] = tokenizer_for(b)
            base_model = _load_model(base_path, b.device)
            b.log("experts: labelling replay prompts with the base's greedy answers")
            cache["base"], cache["pools"] = base_model, _replay_pools(b, base_model, cache["tokenizer"])
        return cache["base"], cache["pools"]

    for task in s.tasks:
        others = [t for t in s.tasks if t != task]
        lr, target = s.expert_lr_for(task), s.expert_target_for(task)
        training = {
            "objective": f"{task}, plus replay of {', '.join(others)} " + (
                f"distilled from the base (KL to its next-token distributions, weight {s.replay_distill})"
                if s.replay_distill > 0 else "labelled by the base's greedy answers"),
            "max_steps": s.expert_steps[task],
            "early_stop": (f"own-task exact match >= {target} on the first {s.grid_items} validation "
                           f"items, checked every {s.expert_check_every} steps") if target else None,
            "lr": lr,
            "warmup": s.expert_warmup,
            **_optimization(s),
            "batch": s.expert_batch,
            "replay_rows": s.replay_rows,
            "replay_pool": s.replay_pool,
            "replay_distill": s.replay_distill,
            "batch_seed": derive_seed(b.seed, task, "batches"),
        }
        if s.expert_layers is not None:  # recorded only when set, so the small zoo's keys stay
            training["layers"] = list(s.expert_layers[task])
            training["other_lr_scale"] = s.expert_other_lr_scale
        key = _hash_json({"stage": "expert/3", "task": task, "training": training,
                          "base": b.data["models"][BASE]["hash"], **_upstream_hashes(b)})

        def build(folder: Path, task: str = task, others: list = others, training: dict = training,
                  lr: float = lr, target: float = target) -> dict:
            base_model, pools = base_and_pools()
            model = _load_model(base_path, b.device)
            train_split = _load_split(b, task, "train")
            per_other = s.replay_rows // len(others)
            parts = [BatchPart(encode_examples(train_split["prompt"], train_split["answer"], vocab=vocab_for(s.characters)),
                               s.expert_batch - per_other * len(others))]
            parts += [BatchPart(pools[o], per_other) for o in others if per_other > 0]
            generator = torch.Generator().manual_seed(training["batch_seed"])
            checks: list[tuple[int, float]] = []
            on_step = None
            if target:
                # Stop as soon as the expert has its skill: a longer run only grows the task vector,
                # and a bigger task vector interferes more with the others in a merge.
                own = _scorers(b, cache["tokenizer"], "validation", s.grid_items, tasks=[task])[task]

                def on_step(step: int) -> bool:
                    if step % s.expert_check_every:
                        return False
                    checks.append((step, float(np.mean(own(model)))))
                    return checks[-1][1] >= target

            losses = train(model, make_sampler(parts, generator), steps=training["max_steps"], lr=lr,
                           warmup=s.expert_warmup, distill_weight=s.replay_distill, autocast=s.autocast_dtype(),
                           stage=f"expert {task}", log=b.log,
                           log_every=max(1, training["max_steps"] // 4), on_step=on_step,
                           lr_scale=_layer_lr_scale(training))
            _save_model(model.cpu(), folder, s.characters)
            return _model_info(model, "expert", task, BASE, {
                **training, "steps": len(losses), "final_loss": round(float(np.mean(losses[-10:])), 4),
                "validation_checks": [[step, round(acc, 4)] for step, acc in checks]})

        entry = b.ensure(f"model {task}", b.root / "models" / task, key, b.previous_entry("models", task), build)
        b.data["models"][task] = _with_zoo_tokenizer(b, f"model {task}", entry)
        b.save()


# --------------------------------------------------------------------------- evaluation


def evaluate_stage(b: _Builder) -> None:
    s = b.spec
    key = _hash_json({
        "stage": "evaluation/4",  # 4: on validation; 3 and earlier scored the test splits
        "models": {name: m["hash"] for name, m in b.data["models"].items()},
        "tasks": _task_hashes(b),
        "grid": list(s.grid), "refine_step": s.refine_step, "eval_batch": s.eval_batch,
        "grid_items": s.grid_items, "grid_finalists": s.grid_finalists,
    })
    previous = b.previous_entry("evaluation")
    if previous is not None and previous.get("key") == key:
        b.reused.append("evaluation")
        b.log("evaluation: reused")
        b.data["evaluation"] = previous
        return
    b.log("evaluation: scoring every model on every validation split")
    began = time.perf_counter()
    evaluation = _evaluate(b)
    evaluation = {"key": key, "seconds": round(time.perf_counter() - began, 2), **evaluation}
    b.data["evaluation"] = evaluation
    b.built.append("evaluation")


def _scorers(b: _Builder, tokenizer, split: str, items: int | None = None,
             tasks: list[str] | None = None) -> dict[str, ExactMatchScorer]:
    """One scorer per task (every task of the zoo by default) over `split` (its first `items` rows when given)."""
    out = {}
    for task in b.spec.tasks if tasks is None else tasks:
        data = _load_split(b, task, split)
        if items is not None and items < len(data):
            data = data.select(range(items))
        out[task] = ExactMatchScorer(tokenizer, data["prompt"], data["answer"], batch_size=b.spec.eval_batch,
                                     device=b.device)
    return out


def _evaluate(b: _Builder) -> dict:
    from evomerge.merge.materializer import Materializer

    s = b.spec
    tasks = list(s.tasks)
    tokenizer = tokenizer_for(b)
    validation = _scorers(b, tokenizer, "validation")
    screening = _scorers(b, tokenizer, "validation", s.grid_items)
    accuracy = {}
    for name, entry in b.data["models"].items():
        accuracy[name] = {t: v for t, v in score_tasks(_load_model(b.root / entry["path"], b.device), validation).items()
                          if t != "mean"}
    b.log("evaluation: " + "; ".join(
        f"{name} " + " ".join(f"{100 * acc[t]:.0f}" for t in tasks) for name, acc in accuracy.items()))

    materializer = Materializer.from_folders(
        b.root / b.data["models"][BASE]["path"], [b.root / b.data["models"][t]["path"] for t in tasks], device=b.device
    )

    def scores_on(scorers: dict) -> Callable[[tuple[float, ...]], dict[str, float]]:
        return lambda weights: score_tasks(materializer.apply("task_arithmetic", weight=list(weights)), scorers)

    # The grid is ranked on the first `grid_items` validation items per task (a big validation split
    # is the fitness split and would make a full-split grid the slowest part of the build); the
    # finalists are then re-scored on the whole validation split, which makes the choice.
    b.log(f"evaluation: grid over task-arithmetic weights {list(s.grid)}^{len(tasks)}"
          + (" and refinement" if s.refine_step > 0 else "")
          + f" on {s.grid_items} validation items per task, then the best {s.grid_finalists} on all of them")
    screen = scores_on(screening)
    grid = grid_search(lambda w: screen(w)["mean"], len(tasks), s.grid, s.refine_step)
    n_points, seen = grid.n_evaluated, grid.seen
    finalists = sorted(seen, key=lambda w: -seen[w])[: s.grid_finalists]  # stable: ties keep grid order
    final_scores = {w: scores_on(validation)(w) for w in finalists}
    best = max(finalists, key=lambda w: final_scores[w]["mean"])
    n_items = {t: validation[t].n_items for t in tasks}
    screened_items = {t: min(s.grid_items, n) for t, n in n_items.items()}
    merges = {}
    for name, method, weights in (
        ("best_grid", "task_arithmetic", list(best)),
        ("uniform_task_arithmetic", "task_arithmetic", [1.0] * len(tasks)),
        ("averaging", "linear", [1.0] * len(tasks)),
    ):
        model = materializer.apply(method, weight=weights)
        # the chosen grid point was already scored on the whole validation split as a finalist
        on_validation = final_scores[best] if name == "best_grid" else score_tasks(model, validation)
        merges[name] = {"method": method, "weights": weights, "validation": on_validation}
    merges["averaging"]["note"] = "mean of the experts' weights (linear, normalized)"
    merges["best_grid"]["grid"] = {
        "values": list(s.grid), "refine_step": s.refine_step, "n_evaluated": n_points,
        "screened_on": f"first {s.grid_items} validation items per task", "finalists": len(finalists),
        "chosen_on": "validation mean over tasks (all items), among the finalists",
        "item_evaluations": n_points * sum(screened_items.values()) + len(finalists) * sum(n_items.values()),
    }
    b.log("evaluation: " + "; ".join(
        f"{name} {merges[name]['weights'] if name == 'best_grid' else ''} validation mean {100 * m['validation']['mean']:.1f}"
        for name, m in merges.items()))
    return {"split": "validation", "accuracy": accuracy, "reference_merges": merges,
            "quality_bars": _quality_bars(accuracy, merges, tasks)}


def _quality_bars(accuracy: dict, merges: dict, tasks: list[str]) -> list[dict]:
    """The issue's bars, in points on the validation splits (build time is added by `build_zoo`).

    The best grid merge was chosen on the same validation split, so its margin is optimistic by
    the selection; benchmarks/PROTOCOL.md keeps test for the final report."""
    def mean(name: str) -> float:
        return 100 * float(np.mean([accuracy[name][t] for t in tasks]))

    own = {t: 100 * accuracy[t][t] for t in tasks}
    best_merge = 100 * merges["best_grid"]["validation"]["mean"]
    best_expert = max(tasks, key=mean)
    rows = [
        ("expert_own_task_min", min(own.values()), BAR_EXPERT_OWN_TASK,
         "lowest expert score on its own task: " + ", ".join(f"{t} {v:.1f}" for t, v in own.items())),
        ("experts_own_mean_minus_base_mean", float(np.mean(list(own.values()))) - mean(BASE), BAR_BASE_GAP,
         f"experts' own-task mean {np.mean(list(own.values())):.1f}, base mean {mean(BASE):.1f}"),
        ("best_merge_minus_base_mean", best_merge - mean(BASE), BAR_MERGE_OVER_BASE,
         f"best merge {best_merge:.1f}, base {mean(BASE):.1f}"),
        ("best_merge_minus_best_expert_mean", best_merge - mean(best_expert), BAR_MERGE_OVER_BEST_EXPERT,
         f"best merge {best_merge:.1f}, best single expert ({best_expert}) {mean(best_expert):.1f}"),
        ("best_merge_minus_uniform_task_arithmetic", best_merge - 100 * merges["uniform_task_arithmetic"]["validation"]["mean"],
         BAR_HEADROOM, f"uniform task arithmetic {100 * merges['uniform_task_arithmetic']['validation']['mean']:.1f}"),
        ("best_merge_minus_averaging", best_merge - 100 * merges["averaging"]["validation"]["mean"], BAR_HEADROOM,
         f"averaging {100 * merges['averaging']['validation']['mean']:.1f}"),
    ]
    return [{"bar": bar, "value": round(value, 2), "threshold": threshold, "passed": bool(value >= threshold),
             "detail": detail} for bar, value, threshold, detail in rows]


# --------------------------------------------------------------------------- the build, stage by stage


def build_zoo(
    out_dir: str | os.PathLike, size: str = "small", seed: int = 0, progress: bool = True
) -> Manifest:
    """Build the zoo into `out_dir/size` (or reuse what is already there) and return its manifest.

    `out_dir/small` and `out_dir/tiny` can live side by side; the manifest is `out_dir/size/zoo.json`.
    Deterministic for a given (size, seed) on one machine, torch version and thread count.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    spec = get_size(size)
    root = Path(out_dir) / spec.name
    root.mkdir(parents=True, exist_ok=True)
    # per-file loading and saving bars would drown the build's own progress lines
    hf_bars, ds_bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        return _build(root, spec, int(seed), progress)
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()


def _build(root: Path, spec: ZooSize, seed: int, progress: bool) -> Manifest:
    builder = _Builder(root, spec, seed, progress)
    builder.log(f"zoo size={spec.name} seed={seed} -> {root} (device {builder.device}, {torch.get_num_threads()} threads)")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    build_tokenizer_stage(builder)
    build_task_stages(builder)
    build_base_stage(builder)
    build_expert_stages(builder)
    evaluate_stage(builder)

    data = builder.data
    components = [data["tokenizer"]] + list(data["tasks"].values()) + list(data["models"].values())
    data["content_hash"] = _hash_json(sorted(c["hash"] for c in components))
    run_seconds = round(time.perf_counter() - builder.start, 2)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    previous_build = builder.previous.get("build", {})
    from_scratch = not builder.reused
    components_seconds = sum(c["seconds"] for c in components) + data["evaluation"]["seconds"]
    data["build"] = {
        # wall-clock time of the last build from scratch (imports included), with the machine's
        # 1-minute load average before and after it; a partial rebuild keeps those figures
        "seconds": run_seconds if from_scratch else previous_build.get("seconds", round(components_seconds, 2)),
        "load_average": [load_before, load_after] if from_scratch else previous_build.get("load_average"),
        "threads": torch.get_num_threads() if from_scratch else previous_build.get("threads"),
        "last_run": {"seconds": run_seconds, "built": builder.built, "reused": builder.reused},
    }
    _set_build_bar(data)
    builder.save()
    builder.log(f"done in {run_seconds:.1f}s: built {len(builder.built)}, reused {len(builder.reused)}")
    return Manifest.load(root)  # exactly what a later reader sees (tuples become lists)


def _set_build_bar(data: dict) -> None:
    bars = [b for b in data["evaluation"]["quality_bars"] if b["bar"] != "build_seconds"]
    seconds = data["build"]["seconds"]
    limit = data["settings"]["max_build_seconds"]
    bars.append({"bar": "build_seconds", "value": seconds, "threshold": limit, "passed": seconds <= limit,
                 "detail": f"wall-clock build from scratch; 1-min load average before/after {data['build']['load_average']}"})
    data["evaluation"]["quality_bars"] = bars
