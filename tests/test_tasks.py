"""Task presets and scorers on small local data of the real benchmarks' schemas."""
from __future__ import annotations

import json
import logging
import string
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.fitness.tasks import TaskError, TaskSpec, load_task, preset_names


def ascii_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 1,200 pens; 200 are sold. How many are left?", "answer": "1,200 - 200 = 1,000\n#### 1,000"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
]
ARC_ROWS = [
    {"id": "q1", "question": "Which is a gas?", "answerKey": "B",
     "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]}},
    {"id": "q2", "question": "What do plants need?", "answerKey": "1",
     "choices": {"text": ["light", "sand"], "label": ["1", "2"]}},
]


def test_presets_exist_and_load():
    names = preset_names()
    for required in ("gsm8k", "arc_challenge"):
        assert required in names
        load_task(required)


def test_gsm8k_extraction_on_local_data(tmp_path):
    task = load_task("gsm8k", {"dataset": {"files": {"train": write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)},
                                           "format": "json"}})
    data = task.load_split("fitness")
    assert [task.gold_answer(data[i]) for i in range(3)] == ["7", "1000", "4.5"]
    assert task.extract_prediction(" 3 + 4 makes 7 apples.") == "7"
    assert task.extract_prediction("so 1,000 pens remain") == "1000"
    assert task.extract_prediction("the answer is 4.50") == "4.5"
    assert task.extract_prediction("no idea") == ""
    assert task.item_ids(data) == ["train-0", "train-1", "train-2"]

    scorer = task.make_scorer(ascii_tokenizer(), data, device="cpu")
    scorer._scorer.decode = lambda model: ["It is 7.", "I think 999", " 4.5"]  # what a model generated
    assert scorer(None).tolist() == [1, 0, 1]
    assert scorer._scorer.max_new_tokens == 256


def test_multiple_choice_matches_an_independent_loglikelihood(tmp_path):
    task = load_task("arc_challenge", {"dataset": {"files": {"validation": write_jsonl(tmp_path / "v.jsonl", ARC_ROWS)},
                                                   "format": "json"}})
    data = task.load_split("fitness")
    tokenizer = ascii_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=len(tokenizer))).eval()
    scorer = task.make_scorer(tokenizer, data, device="cpu")
    ours = scorer.loglikelihoods(model)

    expected = []
    for i in range(len(data)):
        item = data[i]
        prompt_ids = tokenizer(f"Question: {item['question']}\nAnswer:").input_ids
        for choice in item["choices"]["text"]:
            cont = tokenizer(" " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt_ids + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            expected.append(sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(cont)))
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
    per_item = [np.argmax(expected[0:3]) == 1, np.argmax(expected[3:5]) == 0]
    assert scorer(model).tolist() == [int(x) for x in per_item]


def test_greedy_scoring_raises_no_transformers_deprecation_and_matches_generate():
    """Scoring uses transformers' current KV-cache API: no FutureWarning or DeprecationWarning (the
    `past_key_values` keyword goes away in 5.40) and no deprecation log line (`out.past_key_values`),
    while the cached batched loop still decodes exactly what `generate` does one prompt at a time."""
    from evomerge.fitness.scoring import ExactMatchScorer

    tokenizer = ascii_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=len(tokenizer), bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0)).eval()
    prompts = ["12+7=", "a", "Question: why?\nAnswer:"]  # three lengths, so rows are left-padded
    scorer = ExactMatchScorer(tokenizer, prompts, batch_size=3, max_new_tokens=6, device="cpu")

    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # a line already logged once in this session would hide
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = scorer.generate_ids(model)
    finally:
        transformers_logger.removeHandler(handler)
    assert [record.getMessage() for record in logged] == []

    reference = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             eos_token_id=2, pad_token_id=0)
        row = out[0, ids.shape[1]:].tolist()
        reference.append(row[: row.index(2)] if 2 in row else row)
    assert ours == reference


def test_tokenizer_that_cannot_score_a_task_is_an_error(tmp_path):
    from evomerge.zoo._tokenizer import build_tokenizer

    task = load_task("arc_challenge", {"dataset": {"files": {"validation": write_jsonl(tmp_path / "v.jsonl", ARC_ROWS)},
                                                   "format": "json"}})
    with pytest.raises(TaskError, match=r"maps characters \['Q', 'u', 'e', 's', 't'\] of prompt 'Question: Which.*unknown token"):
        task.make_scorer(build_tokenizer(), task.load_split("fitness"))


def test_unknown_task_and_fields(tmp_path):
    with pytest.raises(TaskError, match=r"unknown task 'nope'; presets: \["):
        load_task("nope")
    with pytest.raises(TaskError, match="field `promtp` is not supported"):
        TaskSpec.from_dict({"name": "x", "dataset": {"path": "d"}, "prompt": "{q}", "promtp": 1}, source="t.yaml")
    with pytest.raises(TaskError, match="field `scorer`: 'bleu' is not one of"):
        TaskSpec.from_dict({"name": "x", "dataset": {"path": "d"}, "prompt": "{q}", "scorer": "bleu"})
    with pytest.raises(TaskError, match="needs exactly one of path, hub or files"):
        TaskSpec.from_dict({"name": "x", "dataset": {}, "prompt": "{q}"})
    task = TaskSpec.from_dict({"name": "x", "dataset": {"path": str(tmp_path / "missing")}, "prompt": "{q}"})
    with pytest.raises(TaskError, match="dataset folder .*missing not found"):
        task.load_split("fitness")
    task = load_task("gsm8k", {"dataset": {"files": {"train": write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS)},
                                           "format": "json"}, "prompt": "Q: {qestion}"})
    with pytest.raises(TaskError, match=r"prompt template 'Q: \{qestion\}' does not fit item"):
        task.make_scorer(ascii_tokenizer(), task.load_split("fitness"))
