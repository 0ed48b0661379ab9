"""lm-evaluation-harness tasks as fitness tasks (issue 16, item 4), offline: custom lm-eval YAML tasks
over local JSONL files, scored on a small random Llama family (the zoo tokenizer), compared with
lm-eval's own `simple_evaluate` on the same model and documents.

Why the comparisons are exact: evomerge's scorer builds the same `Instance` requests lm-eval builds
(zero-shot, so no few-shot draw differs), runs them through the same `HFLM` with the same batch size
(HFLM sorts requests by length, so the batches are the same), and reads the same `process_results`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")

from evomerge.fitness.sealed import SealedSplitError, recorded_test_reads, sealed_test  # noqa: E402
from evomerge.fitness.tasks import TaskError, TaskSpec, load_task  # noqa: E402

N_ITEMS = 30


def _rows(rng, n):
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        choices = sorted({a + b, a + b + 1, a + b + 11})
        rows.append({"prompt": f"{a}+{b}=", "choices": [str(c) for c in choices], "label": choices.index(a + b),
                     "answer": str(a + b)})
    return rows


def _task_yaml(name, data, output_type, metric, **extra):
    body = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data / "validation.jsonl"),
                                              "test": str(data / "test.jsonl")}},
            "output_type": output_type, "validation_split": "validation", "test_split": "test",
            "doc_to_text": "{{prompt}}", "target_delimiter": "", "metric_list": [{"metric": metric}], **extra}
    return yaml.safe_dump(body, sort_keys=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A random Llama family, and two lm-eval tasks over JSONL files: `sums_mc` (multiple choice, acc by
    log-likelihood) and `sums_gen` (greedy generation, exact_match). The generation targets of the even
    items are the base model's own greedy answers (from `model.generate`, independently of lm-eval), so
    about half the items are right and the accuracies compared below are not all zeros."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.testing import llama_config, make_family

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("lm_eval_ws")
    base, experts = make_family(root / "fam", n_experts=2, seed=5, delta_scale=0.5, config=llama_config(layers=2))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    rng = np.random.default_rng(0)
    data = root / "tasks"
    data.mkdir()
    for split in ("validation", "test"):
        rows = _rows(rng, N_ITEMS)
        for i, row in enumerate(rows):
            if i % 2 == 0:
                ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                row["answer"] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("=")[0]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "mc.yaml").write_text(_task_yaml("sums_mc", data, "multiple_choice", "acc",
                                             doc_to_choice="{{choices}}", doc_to_target="{{label}}"))
    (data / "gen.yaml").write_text(_task_yaml(
        "sums_gen", data, "generate_until", "exact_match", doc_to_target="{{answer}}",
        generation_kwargs={"until": ["="], "max_gen_toks": 3, "do_sample": False}))
    return {"root": root, "data": data, "base": base, "experts": experts, "tokenizer": tokenizer, "model": model}


def _spec(ws, task):
    return TaskSpec.from_dict({"name": task, "lm_eval": {"task": task, "include_path": str(ws["data"])}})


def _simple_evaluate(ws, task, metric, samples=None):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=ws["model"], tokenizer=ws["tokenizer"], batch_size=64)
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0, log_samples=True,
                                      task_manager=TaskManager(include_path=str(ws["data"]), include_defaults=False),
                                      samples={task: samples} if samples is not None else None)
    per_item = [float(s[metric]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
    return float(results["results"][task][f"{metric},none"]), per_item


@pytest.mark.parametrize("task, metric", [("sums_gen", "exact_match"), ("sums_mc", "acc")])
def test_per_item_correctness_equals_simple_evaluate(workspace, task, metric):
    """simple_evaluate scores the task's test_split (lm-eval prefers it); evomerge's test role is the same split."""
    spec = _spec(workspace, task)
    with recorded_test_reads() as reads:
        docs = spec.load_split("test")
    assert [(r.task, r.split, r.role) for r in reads] == [(task, "test", "test")]
    ours = spec.make_scorer(workspace["tokenizer"], docs, device="cpu")(workspace["model"])
    accuracy, per_item = _simple_evaluate(workspace, task, metric)
    assert ours.dtype == np.int8 and ours.tolist() == per_item
    assert ours.mean() == pytest.approx(accuracy, abs=1e-12)  # both means of the same 0/1 values
    assert 0.0 < accuracy < 1.0
    if task == "sums_gen":  # the even items' targets are the model's own greedy answers
        assert ours[0::2].mean() >= 0.8 and ours[1::2].sum() <= 2


def test_multiple_choice_equals_a_hand_loglikelihood(workspace):
    """An independent check of the multiple-choice path: float64 log-likelihoods, one unpadded forward per choice."""
    spec = _spec(workspace, "sums_mc")
    docs = spec.load_split("fitness")
    tokenizer, model = workspace["tokenizer"], workspace["model"]
    expected = []
    for doc in docs:
        prompt = tokenizer(doc["prompt"]).input_ids
        scores = []
        for choice in doc["choices"]:
            cont = tokenizer(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].double(), -1)
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
        expected.append(int(np.argmax(scores) == doc["label"]))
    assert spec.make_scorer(tokenizer, docs, device="cpu")(model).tolist() == expected


def test_fitness_role_is_the_validation_split_and_subsets_score_as_in_the_whole_split(workspace):
    spec = _spec(workspace, "sums_gen")
    assert spec.splits == {"fitness": "validation", "test": "test"}
    with recorded_test_reads() as reads:
        docs = spec.load_split("fitness")
    assert reads == [] and len(docs) == N_ITEMS
    assert docs[0] == json.loads((workspace["data"] / "validation.jsonl").read_text().splitlines()[0])
    full = spec.make_scorer(workspace["tokenizer"], docs, device="cpu")(workspace["model"])
    rows = [3, 4, 10, 17, 28]
    subset = spec.make_scorer(workspace["tokenizer"], docs.select(rows), device="cpu")(workspace["model"])
    assert subset.tolist() == full[rows].tolist()
    with sealed_test("choosing"), pytest.raises(SealedSplitError, match="sums_gen"):
        spec.load_split("test")


def test_spec_round_trips_through_to_dict(workspace):
    spec = _spec(workspace, "sums_mc")
    again = TaskSpec.from_dict(spec.to_dict(), source="fitness.json")
    assert again.to_dict() == spec.to_dict() and again.lm_eval_info == spec.lm_eval_info


def test_calibrate_and_estimate_with_lm_eval_tasks(workspace):
    """The whole pipeline: calibration on the full fitness splits, a saved fitness that reloads (data hash
    checked), and subset scorers whose answers equal the calibration's responses of the base model."""
    from transformers import AutoTokenizer

    from evomerge.fitness.calibrate import calibrate
    from evomerge.fitness.compressed import CompressedFitness

    ws = workspace
    tasks = [_spec(ws, "sums_mc"), _spec(ws, "sums_gen")]
    out = ws["root"] / "fitness" / "lm"
    with sealed_test("calibrating"):
        calibrate(tasks, str(ws["base"]), [str(e) for e in ws["experts"]], out, name="lm", random_merges=5,
                  n=N_ITEMS, subset_method="random", mixing_method="bias-variance", echo=lambda *a: None)
        fitness = CompressedFitness.load(out)
        responses = np.load(out / "responses.npz")
        scorers = fitness.subset_scorers(AutoTokenizer.from_pretrained(ws["base"]), device="cpu")
        for name in ("sums_mc", "sums_gen"):
            answers = scorers[name](ws["model"])
            assert answers.tolist() == responses[f"task_{name}"][0].tolist()  # row 0: the base model
            assert fitness.estimate(name, answers, "subset").value == pytest.approx(answers.mean())


# ------------------------------------------------------------------------------------- bad input
def _calibration_config(ws, tmp_path, preset: dict) -> str:
    """A calibration config whose models do not exist: an error about the task proves nothing was loaded."""
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(preset))
    config = {"name": "bad", "models": {"base": "missing/base", "experts": ["missing/expert"]},
              "tasks": [{"preset": "task.yaml"}]}
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _calibration_error(ws, tmp_path, preset):
    from evomerge.fitness.calibrate import calibrate_from_config
    from evomerge.fitness.compressed import FitnessError

    with pytest.raises(FitnessError) as info:
        calibrate_from_config(_calibration_config(ws, tmp_path, preset), echo=lambda *a: None)
    return str(info.value)


def test_unknown_lm_eval_task_is_an_error_naming_task_and_field(workspace, tmp_path):
    message = _calibration_error(workspace, tmp_path, {"name": "mine", "lm_eval": {
        "task": "sums_mcq", "include_path": str(workspace["data"])}})
    assert "`lm_eval.task`" in message and "'sums_mcq'" in message and "mine" in message
    assert "sums_mc" in message  # the close match


def test_metric_that_is_not_per_item_in_unit_interval_is_an_error(workspace, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "bleu.yaml").write_text(_task_yaml("sums_bleu", workspace["data"], "generate_until", "bleu",
                                                doc_to_target="{{answer}}"))
    (tasks / "ppl.yaml").write_text(_task_yaml("sums_ppl", workspace["data"], "loglikelihood_rolling",
                                               "word_perplexity", doc_to_target="{{prompt}}"))
    (tasks / "f1.yaml").write_text(_task_yaml("sums_f1", workspace["data"], "multiple_choice", "f1",
                                              doc_to_choice="{{choices}}", doc_to_target="{{label}}"))
    bleu = _calibration_error(workspace, tmp_path, {"name": "b", "lm_eval": {"task": "sums_bleu", "include_path": str(tasks)}})
    assert "`lm_eval.metric`" in bleu and "'bleu'" in bleu and "'sums_bleu'" in bleu and "[0, 1]" in bleu
    ppl = _calibration_error(workspace, tmp_path, {"name": "p", "lm_eval": {"task": "sums_ppl", "include_path": str(tasks)}})
    assert "'sums_ppl'" in ppl and "loglikelihood_rolling" in ppl
    # f1 over multiple choice is aggregated over the corpus, not averaged per item
    f1 = _calibration_error(workspace, tmp_path, {"name": "f", "lm_eval": {"task": "sums_f1", "include_path": str(tasks)}})
    assert "`lm_eval.metric`" in f1 and "'f1'" in f1 and "aggregation 'f1_score'" in f1
    # a metric lm-eval has no such metric for, and a binary metric the task does not compute
    with pytest.raises(TaskError, match=r"`lm_eval.metric`.*'acc_norm'.*its metrics: \['acc'\]"):
        TaskSpec.from_dict({"name": "m", "lm_eval": {"task": "sums_mc", "include_path": str(workspace["data"]),
                                                     "metric": "acc_norm"}})


def test_include_path_that_does_not_parse_is_an_error_naming_the_file(workspace, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: sums_broken\ndoc_to_text: [unclosed\n")
    message = _calibration_error(workspace, tmp_path, {"name": "x", "lm_eval": {"task": "sums_broken",
                                                                                "include_path": "tasks"}})
    assert "`lm_eval.include_path`" in message and "broken.yaml" in message and "does not parse" in message
    missing = _calibration_error(workspace, tmp_path, {"name": "x", "lm_eval": {"task": "t", "include_path": "nowhere"}})
    assert "`lm_eval.include_path`" in missing and "nowhere" in missing and "not found" in missing


def test_preset_fields_that_do_not_apply_to_lm_eval_tasks(workspace):
    block = {"task": "sums_mc", "include_path": str(workspace["data"])}
    with pytest.raises(TaskError, match="field `prompt` does not apply to an lm-eval task"):
        TaskSpec.from_dict({"name": "x", "lm_eval": block, "prompt": "{prompt}"})
    with pytest.raises(TaskError, match="field `lm_eval.shots` is not supported"):
        TaskSpec.from_dict({"name": "x", "lm_eval": {**block, "shots": 2}})
    with pytest.raises(TaskError, match="field `splits.fitness`.*no validation_split"):
        TaskSpec.from_dict({"name": "x", "lm_eval": block, "splits": {"fitness": None}})


def test_packaged_example_preset_resolves(monkeypatch):
    """fitness/examples/lm_eval_sums.yaml: the README's example, read from the project root."""
    from pathlib import Path

    project = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(project)
    spec = load_task(str(project / "fitness" / "examples" / "lm_eval_sums.yaml"))
    assert spec.lm_eval_info.metric == "acc" and spec.splits == {"fitness": "validation", "test": "test"}
    docs = spec.load_split("fitness")
    assert len(docs) > 0 and set(docs.column_names) >= {"prompt", "choices", "label"}


def test_continuous_metric_needs_a_threshold_and_values_in_the_unit_interval(workspace, tmp_path):
    """A custom per-item metric (a `process_results` function, aggregated by mean): continuous values in
    [0, 1] count as correct at or above `lm_eval.threshold`; without one, or outside [0, 1], it is an error."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(
        "def closeness(doc, results):\n"
        "    return {'closeness': 1.0 / (1.0 + abs(len(results[0]) - len(doc['answer'])))}\n"
        "def length(doc, results):\n"
        "    return {'length': float(len(results[0]) + 1)}\n")
    for name in ("closeness", "length"):
        text = _task_yaml(f"sums_{name}", workspace["data"], "generate_until", name, doc_to_target="{{answer}}",
                          generation_kwargs={"until": ["="], "max_gen_toks": 3, "do_sample": False})
        text = text.replace(f"- metric: {name}\n", f"- metric: {name}\n  aggregation: mean\n  higher_is_better: true\n")
        (tasks / f"{name}.yaml").write_text(text + f"process_results: !function utils.{name}\n")
    block = {"task": "sums_closeness", "include_path": str(tasks)}
    with pytest.raises(TaskError, match=r"`lm_eval.metric`: metric 'closeness' .* set `lm_eval.threshold`"):
        TaskSpec.from_dict({"name": "c", "lm_eval": block})
    with pytest.raises(TaskError, match=r"`lm_eval.threshold`: 1.5 is not a number in \(0, 1\]"):
        TaskSpec.from_dict({"name": "c", "lm_eval": {**block, "threshold": 1.5}})
    spec = TaskSpec.from_dict({"name": "c", "lm_eval": {**block, "threshold": 0.5}})
    docs = spec.load_split("fitness")
    scorer = spec.make_scorer(workspace["tokenizer"], docs, device="cpu")
    values = scorer.values(workspace["model"])
    from lm_eval.models.huggingface import HFLM  # the generated texts, through HFLM directly, into the formula by hand

    lm = HFLM(pretrained=workspace["model"], tokenizer=workspace["tokenizer"], batch_size=64)
    texts = lm.generate_until(scorer._instances, disable_tqdm=True)
    lm_eval_values = [1.0 / (1.0 + abs(len(t) - len(d["answer"]))) for t, d in zip(texts, docs)]
    assert values.tolist() == pytest.approx(lm_eval_values) and len(set(values.tolist())) > 1
    assert scorer(workspace["model"]).tolist() == [int(v >= 0.5) for v in lm_eval_values]
    length = TaskSpec.from_dict({"name": "l", "lm_eval": {"task": "sums_length", "include_path": str(tasks),
                                                          "threshold": 0.5}})
    with pytest.raises(TaskError, match=r"'sums_length'.*metric 'length' gave .* outside \[0, 1\]"):
        length.make_scorer(workspace["tokenizer"], docs, device="cpu")(workspace["model"])


def test_few_shot_contexts_are_per_item_and_test_shots_are_sealed(workspace, tmp_path):
    """With num_fewshot > 0 an item's context depends only on the item (a subset sees the prompts of the whole
    split), and few-shot examples drawn from the test split are a test read."""
    spec = TaskSpec.from_dict({"name": "s", "lm_eval": {"task": "sums_mc", "include_path": str(workspace["data"]),
                                                        "num_fewshot": 2}})
    assert spec.lm_eval_info.fewshot_split == "validation"  # no training_split: lm-eval falls back to validation
    docs = spec.load_split("fitness")
    full = spec.make_scorer(workspace["tokenizer"], docs, device="cpu")
    part = spec.make_scorer(workspace["tokenizer"], docs.select([7, 2]), device="cpu")
    contexts = [group[0].args[0] for group in full._per_doc]
    assert [group[0].args[0] for group in part._per_doc] == [contexts[7], contexts[2]]
    assert contexts[7].endswith(docs[7]["prompt"]) and contexts[7].count("=") == 3  # two shots, then the item
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(_task_yaml("sums_test_shots", workspace["data"], "multiple_choice", "acc",
                                             doc_to_choice="{{choices}}", doc_to_target="{{label}}",
                                             num_fewshot=1, fewshot_config={"sampler": "first_n"}, fewshot_split="test"))
    shots = TaskSpec.from_dict({"name": "t", "lm_eval": {"task": "sums_test_shots", "include_path": str(tasks)}})
    assert shots.lm_eval_info.fewshot_split == "test"
    with sealed_test("choosing"), pytest.raises(SealedSplitError, match=r"test split of t \(split 'test'\)"):
        shots.make_scorer(workspace["tokenizer"], shots.load_split("fitness"), device="cpu")
    with recorded_test_reads() as reads:  # outside the seal: logged, and the shot is indeed the first test item
        scorer = shots.make_scorer(workspace["tokenizer"], shots.load_split("fitness"), device="cpu")
    first_test = json.loads((workspace["data"] / "test.jsonl").read_text().splitlines()[0])
    assert [(r.task, r.split, r.role) for r in reads] == [("t", "test", "fewshot")]
    assert scorer._per_doc[0][0].args[0].startswith(first_test["prompt"])
