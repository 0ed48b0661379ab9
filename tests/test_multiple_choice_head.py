"""MultipleChoiceScorer computes the LM head and log-softmax only where a continuation token is
predicted: its log-likelihoods equal a float64 computation from the full logits of each unpadded
sequence, and, exactly, the float32 full-vocabulary-at-every-position computation it replaces."""
from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.fitness.tasks import MultipleChoiceScorer, TaskSpec

# prompts of different lengths, choices of 1 to 7 characters (one token each): batches of 4 mix
# lengths, so rows are right-padded and continuations end at different positions
ITEMS = [
    {"prompt": "Q: 2+2?\nA:", "options": [" 4", " four", " 22"], "answer_index": 0},
    {"prompt": "Which is a gas?", "options": [" steam", " rock"], "answer_index": 0},
    {"prompt": "Pick", "options": [" x", " yy", " zzz", " wwwwww"], "answer_index": 2},
    {"prompt": "Capital of France, in one word:", "options": [" Paris", " Lyon", " Rome!!"], "answer_index": 0},
]


def ascii_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(string.printable))},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def mc_task(batch_size: int = 4) -> TaskSpec:
    return TaskSpec.from_dict({"name": "mc", "dataset": {"path": "unused"}, "prompt": "{prompt}",
                               "scorer": "multiple_choice", "choices": "{options}", "choice_template": "{choice}",
                               "answer_index": "{answer_index}", "batch_size": batch_size})


def llama(vocab_size: int, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=vocab_size, tie_word_embeddings=tied, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def float64_reference(model, tokenizer) -> list[float]:
    """Each choice alone (no padding): full logits, log-softmax in float64, summed over the continuation."""
    expected = []
    for item in ITEMS:
        prompt_ids = tokenizer(item["prompt"]).input_ids
        for choice in item["options"]:
            cont = tokenizer(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt_ids + cont])).logits[0].double(), -1)  # (T, V)
            expected.append(sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(cont)))
    return expected


def float32_full(model, scorer) -> np.ndarray:
    """The computation the scorer replaced: head and log-softmax at every position of every batch."""
    out = np.zeros(len(scorer._owners))
    with torch.no_grad():
        for rows, ids, mask, target in scorer._batches:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            token_lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out[rows] = (token_lp * target[:, 1:]).sum(dim=1).numpy()
    return out


def head_inputs(model):
    """Record the shape of every input the LM head sees."""
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    return shapes, handle


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_head_only_at_continuations_equals_float64_full_logits(tied):
    tokenizer = ascii_tokenizer()
    model = llama(len(tokenizer), tied)
    scorer = MultipleChoiceScorer(mc_task(), tokenizer, ITEMS, device="cpu")
    assert len(scorer._batches) == 3  # 12 choices in batches of 4
    assert any(bool((mask == 0).any()) for _, _, mask, _ in scorer._batches)  # some rows are padded

    shapes, handle = head_inputs(model)
    try:
        ours = scorer.loglikelihoods(model)
    finally:
        handle.remove()
    # the head saw only the continuation positions: (P, hidden) per batch, P = its continuation tokens
    assert shapes == [(int(target[:, 1:].sum()), 32) for _, _, _, target in scorer._batches]
    assert sum(s[0] for s in shapes) == sum(len(c) for item in ITEMS for c in item["options"])

    np.testing.assert_allclose(ours, float64_reference(model, tokenizer), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours, float32_full(model, scorer))  # identical to the full computation
    expected = float64_reference(model, tokenizer)
    per_item, start = [], 0
    for item in ITEMS:
        k = len(item["options"])
        per_item.append(int(np.argmax(expected[start:start + k]) == item["answer_index"]))
        start += k
    assert scorer(model).tolist() == per_item


def test_models_without_an_output_embedding_take_the_full_path():
    tokenizer = ascii_tokenizer()
    model = llama(len(tokenizer), tied=False)
    scorer = MultipleChoiceScorer(mc_task(), tokenizer, ITEMS, device="cpu")
    fast = scorer.loglikelihoods(model)
    model.get_output_embeddings = lambda: None  # as for a model that does not expose its head
    shapes, handle = head_inputs(model)
    try:
        full = scorer.loglikelihoods(model)
    finally:
        handle.remove()
    assert all(len(s) == 3 for s in shapes) and len(shapes) == len(scorer._batches)  # (B, T, hidden): full path
    np.testing.assert_allclose(full, float64_reference(model, tokenizer), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(full, fast)


def test_post_head_processing_is_kept():
    """Gemma 2 soft-caps the logits after its head: gathering the head's input keeps that step."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = ascii_tokenizer()
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                           vocab_size=len(tokenizer), final_logit_softcapping=0.5,
                                           pad_token_id=0)).eval()
    scorer = MultipleChoiceScorer(mc_task(), tokenizer, ITEMS, device="cpu")
    shapes, handle = head_inputs(model)
    try:
        ours = scorer.loglikelihoods(model)
    finally:
        handle.remove()
    assert all(len(s) == 2 for s in shapes)
    with torch.no_grad():  # a cap this low changes the log-likelihoods a lot: skipping it would show
        capped = model(torch.tensor([tokenizer("Pick").input_ids])).logits
    assert float(capped.abs().max()) <= 0.5
    np.testing.assert_allclose(ours, float64_reference(model, tokenizer), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours, float32_full(model, scorer))
    model.config.final_logit_softcapping = None  # the same model without its cap scores differently
    assert np.abs(scorer.loglikelihoods(model) - ours).max() > 1e-3
