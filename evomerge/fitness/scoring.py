"""Exact-match scoring of greedy-decoded answers, for any Hugging Face causal language model.

The search scores thousands of candidate merges on the same few hundred prompts, so the prompts
are tokenized once (`ExactMatchScorer`) and every call only runs the model. Decoding is a
hand-written greedy loop over the KV cache: left padding, an attention mask, position ids
derived from the mask (so a left-padded row sees the same positions as an unpadded one), one
token per step for the whole batch, and an early exit once every row has produced an end of
sequence. Rows are batched by prompt length so that little padding is ever computed.

An item is correct when the generated text up to the first end-of-sequence token, decoded
without special tokens and stripped of surrounding whitespace, equals the stripped answer --
the usual greedy exact-match metric (as in lm-evaluation-harness's `exact_match` on
`generate_until` tasks).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from evomerge._device import default_device

__all__ = ["ExactMatchScorer", "exact_match"]


@dataclass(frozen=True)
class _Batch:
    rows: np.ndarray  # (B,) positions of these prompts in the caller's order
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    if not ids:
        raise ValueError(
            f"neither the tokenizer ({type(tokenizer).__name__}) nor the model's generation_config "
            "defines eos_token_id; greedy decoding needs one to know where an answer ends"
        )
    return sorted(ids)


class ExactMatchScorer:
    """Scores models on fixed prompts and answers; tokenization happens once, here.

    `scorer(model)` returns a boolean array, one entry per item, in the order given.
    `scorer.decode(model)` returns the extracted answers themselves.

    `max_new_tokens=None` means the longest answer's token count plus 2 (its end-of-sequence
    token and one token of slack for tokenizers that split an answer differently in context):
    a longer generation cannot be an exact match, so decoding further would be wasted work.
    """

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        batch_size: int = 256,
        max_new_tokens: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        prompts = list(prompts)
        if answers is not None:
            answers = [str(a).strip() for a in answers]
            if len(answers) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers; they must pair up")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.answers = answers
        self.n_items = len(prompts)
        self.device = default_device(device)
        if max_new_tokens is None:
            if answers is None:
                raise ValueError("max_new_tokens is required when no answers are given")
            longest = max((len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers), default=0)
            max_new_tokens = longest + 2
        self.max_new_tokens = int(max_new_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
        self._batches = self._encode(prompts, batch_size)

    def _encode(self, prompts: list[str], batch_size: int) -> list[_Batch]:
        encoded = self.tokenizer(prompts, add_special_tokens=True).input_ids
        # Bucket by length so each batch is (nearly) unpadded; a stable sort keeps runs reproducible.
        order = np.argsort(np.array([len(ids) for ids in encoded], dtype=np.int64), kind="stable")
        batches = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[r]) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids = encoded[r]
                input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, width - len(ids) :] = 1
            batches.append(
                _Batch(rows=rows, input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            )
        return batches

    @torch.inference_mode()
    def generate_ids(self, model: torch.nn.Module) -> list[list[int]]:
        """Greedy token ids per item (up to, not including, the first end of sequence)."""
        was_training = model.training
        model.eval()
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        eos = torch.tensor(_eos_ids(model, self.tokenizer), device=self.device)
        forward_parameters = inspect.signature(model.forward).parameters
        keep_last_logits = "logits_to_keep" in forward_parameters
        # Recent transformers 5 releases (5.24 here) name the KV cache `cache`, in and out; `past_key_values`
        # still works there but warns and goes away in 5.40. Older releases and remote-code models know only it.
        cache_name = "cache" if "cache" in forward_parameters else "past_key_values"
        outputs: list[list[int] | None] = [None] * self.n_items
        try:
            for batch in self._batches:
                tokens = _greedy_batch(
                    model, batch, eos, self.pad_id, self.max_new_tokens, keep_last_logits, cache_name
                )
                for r, row in zip(batch.rows, tokens.tolist()):
                    outputs[r] = row
        finally:
            model.train(was_training)
        eos_set = set(eos.tolist())
        return [_until_eos(row, eos_set) for row in outputs]

    def decode(self, model: torch.nn.Module) -> list[str]:
        """The extracted answers: text up to the first end of sequence, without special tokens, stripped."""
        ids = self.generate_ids(model)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        if self.answers is None:
            raise ValueError("this scorer was built without answers; use decode() or pass answers")
        predictions = self.decode(model)
        return np.array([p == a for p, a in zip(predictions, self.answers)], dtype=bool)


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row


def _greedy_batch(
    model: torch.nn.Module,
    batch: _Batch,
    eos: torch.Tensor,
    pad_id: int,
    max_new_tokens: int,
    keep_last_logits: bool,
    cache_name: str,
) -> torch.Tensor:
    """Greedy continuation of one left-padded batch; returns (B, n_steps) token ids.

    `cache_name` is the model's keyword (and output field) for the KV cache: "cache" or "past_key_values".
    """
    extra = {"logits_to_keep": 1} if keep_last_logits else {}
    attention_mask = batch.attention_mask  # (B, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): pads repeat position 0
    out = model(
        input_ids=batch.input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra
    )
    cache = getattr(out, cache_name)
    next_token = out.logits[:, -1].argmax(-1)  # (B,)
    finished = torch.isin(next_token, eos)
    generated = [next_token]
    position = position_ids[:, -1:]  # (B, 1)
    ones = torch.ones_like(attention_mask[:, :1])
    for _ in range(max_new_tokens - 1):
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, ones], dim=1)  # (B, T + step)
        position = position + 1
        out = model(
            input_ids=next_token[:, None],
            attention_mask=attention_mask,
            position_ids=position,
            use_cache=True,
            **{cache_name: cache},
            **extra,
        )
        cache = getattr(out, cache_name)
        # Rows that already ended keep emitting padding; only the text before the first eos counts.
        next_token = torch.where(finished, pad_id, out.logits[:, -1].argmax(-1))
        finished |= torch.isin(next_token, eos)
        generated.append(next_token)
    return torch.stack(generated, dim=1)


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Per-item exact match (bool array) of the greedy-decoded answer; see `ExactMatchScorer`.

    For repeated scoring on the same items build an `ExactMatchScorer` once and call it.
    The model is moved to `device` (default: CUDA when present) in place, as `model.to` does.
    """
    scorer = ExactMatchScorer(
        tokenizer, prompts, answers, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
    )
    return scorer(model)
