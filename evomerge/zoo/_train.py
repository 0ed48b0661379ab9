"""Training the zoo's models: a small Llama pretrained on a mixture of the tasks, then experts.

The recipe is the one that makes experts *merge* (see docs/zoo.md for the experiments behind it):

* the base is pretrained briefly on a mixture of all task formats and stopped at moderate
  accuracy, so that each expert's change from it is small and lies in a shared basin;
* each expert is fully fine-tuned, gently (low learning rate, cosine decay), on its own task,
  while a fraction of every batch replays the *other* tasks' prompts labelled with the base's
  own greedy answers. The expert therefore neither learns nor forgets the other tasks, and its
  task vector carries its own skill only -- which is what task arithmetic adds up.

Everything is seeded explicitly: model initialisation under a forked global RNG, batches from a
`torch.Generator`, so one seed on one machine and torch version gives identical weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from evomerge.zoo._tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode_chars

IGNORE = -100


@dataclass(frozen=True)
class EncodedExamples:
    """Right-padded training sequences: `<bos> prompt answer <eos>`, loss on answer and `<eos>`."""

    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next-token ids, IGNORE outside the answer
    lengths: torch.Tensor  # (N,) real (unpadded) length of each input row

    def __len__(self) -> int:
        return self.inputs.shape[0]


def encode_examples(prompts: Sequence[str], answers: Sequence[str]) -> EncodedExamples:
    sequences = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = [BOS_ID] + encode_chars(prompt)
        answer_ids = encode_chars(answer) + [EOS_ID]
        sequences.append((prompt_ids, answer_ids))
    width = max(len(p) + len(a) for p, a in sequences) - 1
    inputs = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    lengths = torch.empty(len(sequences), dtype=torch.long)
    for i, (prompt_ids, answer_ids) in enumerate(sequences):
        full = prompt_ids + answer_ids
        n = len(full) - 1
        inputs[i, :n] = torch.tensor(full[:-1])
        # position t predicts token t + 1; only the answer's tokens (and eos) are scored
        targets[i, len(prompt_ids) - 1 : n] = torch.tensor(answer_ids)
        lengths[i] = n
    return EncodedExamples(inputs, targets, lengths)


def model_config(hidden: int, layers: int, heads: int, intermediate: int, max_positions: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def init_model(config, seed: int):
    """A freshly initialised `LlamaForCausalLM`; the global torch RNG is restored afterwards."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers initialises weights from the global RNG
        model = LlamaForCausalLM(config)
    return model


@dataclass(frozen=True)
class BatchPart:
    """Draw `count` rows per batch from `examples`."""

    examples: EncodedExamples
    count: int


def make_sampler(parts: Sequence[BatchPart], generator: torch.Generator) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Batches mixing fixed counts from each part, trimmed to the longest row they contain."""
    width = max(p.examples.inputs.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    def sample():
        inputs, targets, lengths = [], [], []
        for part in parts:
            idx = torch.randint(len(part.examples), (part.count,), generator=generator)
            inputs.append(pad(part.examples.inputs[idx], PAD_ID))
            targets.append(pad(part.examples.targets[idx], IGNORE))
            lengths.append(part.examples.lengths[idx])
        longest = int(torch.cat(lengths).max())
        return torch.cat(inputs)[:, :longest], torch.cat(targets)[:, :longest]

    return sample


def train(
    model,
    sample: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.0,
    stage: str = "train",
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay to zero; returns the loss of every step.

    Padding sits at the end of each row, so causal attention never lets it reach a scored
    position and no attention mask is needed (which keeps the fast SDPA causal path).
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    device = next(model.parameters()).device
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        inputs, targets = sample()  # (B, T), (B, T)
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(input_ids=inputs).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
        if log is not None and (step + 1) % log_every == 0 or (log is not None and step + 1 == steps):
            recent = losses[-log_every:]
            log(f"{stage}: step {step + 1}/{steps}  loss {sum(recent) / len(recent):.3f}  ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return losses
