"""Training the zoo's models: a small Llama pretrained on a mixture of the tasks, then experts.

The recipe is the one that makes experts *merge* (see docs/zoo.md for the experiments behind it):

* the base is pretrained briefly on a mixture of all task formats and stopped at moderate
  accuracy, so that each expert's change from it is small and lies in a shared basin;
* each expert is fully fine-tuned, gently (low learning rate, cosine decay), on its own task,
  while a fraction of every batch replays the *other* tasks' prompts along the base's own greedy
  answers, trained towards the base's next-token distributions (`with_teacher`). The expert therefore neither learns nor forgets the other tasks, and its
  task vector carries its own skill only -- which is what task arithmetic adds up.

The zoo trains in bfloat16 autocast with float32 weights (`train(autocast=...)`): on a CPU with
bfloat16 arithmetic a step takes 0.56x the float32 time, and the saved models are float32 as ever.

Everything is seeded explicitly: model initialisation under a forked global RNG, batches from a
`torch.Generator`, so one seed on one machine and torch version gives identical weights.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from evomerge.zoo._tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode_chars

IGNORE = -100


@dataclass(frozen=True)
class EncodedExamples:
    """Right-padded training sequences: `<bos> prompt answer <eos>`, loss on answer and `<eos>`."""

    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next-token ids, IGNORE outside the answer
    lengths: torch.Tensor  # (N,) real (unpadded) length of each input row
    # (N, T, V) a teacher's next-token log-probabilities; rows that carry them are trained towards
    # the teacher's whole distribution (KL) instead of the hard targets
    teacher_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]


@torch.inference_mode()
def with_teacher(examples: EncodedExamples, teacher, batch_size: int = 512) -> EncodedExamples:
    """`examples` plus `teacher`'s log-probabilities at every position (teacher-forced)."""
    device = next(teacher.parameters()).device
    chunks = [torch.log_softmax(teacher(input_ids=examples.inputs[i : i + batch_size].to(device)).logits.float(), -1).cpu()
              for i in range(0, len(examples), batch_size)]
    return EncodedExamples(examples.inputs, examples.targets, examples.lengths, torch.cat(chunks))


def encode_examples(prompts: Sequence[str], answers: Sequence[str], vocab: dict[str, int] = VOCAB) -> EncodedExamples:
    """Character-level examples: `<bos> prompt answer <eos>`."""
    return encode_token_examples(
        [[BOS_ID] + encode_chars(prompt, vocab) for prompt in prompts],
        [encode_chars(answer, vocab) + [EOS_ID] for answer in answers], pad_id=PAD_ID)


def encode_token_examples(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                          pad_id: int = PAD_ID) -> EncodedExamples:
    """Right-padded rows `prompt answer` from token ids, the loss on the answer's ids only (any
    tokenizer: the character-level one above, a chat template's in `_chat`)."""
    sequences = list(zip(prompt_ids, answer_ids, strict=True))
    width = max(len(p) + len(a) for p, a in sequences) - 1
    inputs = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    lengths = torch.empty(len(sequences), dtype=torch.long)
    for i, (prompt, answer) in enumerate(sequences):
        full = list(prompt) + list(answer)
        n = len(full) - 1
        inputs[i, :n] = torch.tensor(full[:-1])
        # position t predicts token t + 1; only the answer's tokens (and its end token) are scored
        targets[i, len(prompt) - 1 : n] = torch.tensor(list(answer))
        lengths[i] = n
    return EncodedExamples(inputs, targets, lengths)


def model_config(hidden: int, layers: int, heads: int, intermediate: int, max_positions: int = 64,
                 vocab_size: int = len(VOCAB)):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
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


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    # rows [start, stop) of the batch that carry teacher log-probs (R, T, V), one entry per such part
    distilled: tuple[tuple[int, int, torch.Tensor], ...] = ()


def make_sampler(parts: Sequence[BatchPart], generator: torch.Generator) -> Callable[[], Batch]:
    """Batches mixing fixed counts from each part, trimmed to the longest row they contain."""
    width = max(p.examples.inputs.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    def sample() -> Batch:
        inputs, targets, lengths, teachers = [], [], [], []
        row = 0
        for part in parts:
            idx = torch.randint(len(part.examples), (part.count,), generator=generator)
            inputs.append(pad(part.examples.inputs[idx], PAD_ID))
            targets.append(pad(part.examples.targets[idx], IGNORE))
            lengths.append(part.examples.lengths[idx])
            if part.examples.teacher_logprobs is not None:
                logprobs = part.examples.teacher_logprobs[idx]
                teachers.append((row, row + part.count, logprobs))
            row += part.count
        longest = int(torch.cat(lengths).max())
        distilled = tuple((a, b, t[:, :longest]) for a, b, t in teachers)  # a teacher may be narrower
        return Batch(torch.cat(inputs)[:, :longest], torch.cat(targets)[:, :longest], distilled)

    return sample


def batch_loss(logits: torch.Tensor, batch: Batch, distill_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy on the hard-target rows (token mean) plus `distill_weight` x KL(teacher || model)
    on each distilled part (token mean), each term weighted by its share of the batch's rows."""
    rows = batch.inputs.shape[0]
    hard = torch.ones(rows, dtype=torch.bool)
    loss = logits.new_zeros(())
    for start, stop, teacher in batch.distilled:
        hard[start:stop] = False
        width = teacher.shape[1]  # the teacher's rows end where their padding starts
        scored = (batch.targets[start:stop, :width] != IGNORE).to(logits.device)  # (R, W)
        student = torch.log_softmax(logits[start:stop, :width], -1)
        teacher = teacher.to(logits.device)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # (R, W)
        loss = loss + distill_weight * (stop - start) / rows * (kl * scored).sum() / scored.sum()
    if hard.any():
        hard_logits, hard_targets = (logits, batch.targets) if hard.all() else (logits[hard], batch.targets[hard])
        ce = torch.nn.functional.cross_entropy(hard_logits.flatten(0, 1), hard_targets.flatten().to(logits.device),
                                               ignore_index=IGNORE)
        loss = loss + int(hard.sum()) / rows * ce
    return loss


def private_task(n: int, seed: int, vocab: dict[str, int] = VOCAB) -> EncodedExamples:
    """`n` prompts `<4-8 digits>=` with random 3-digit answers from `seed`: a task with no rule to
    learn (memorised labels) in a format none of the zoo's skills uses. An expert's drift stage
    learns one such set of its own (`ZooSize.expert_drift_private`): weight changes that carry no
    skill, as the parts of a real fine-tune that have nothing to do with the skill it was made for."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 9, (n,), generator=generator).tolist()
    digits = torch.randint(0, 10, (n, 8), generator=generator).tolist()
    answers = torch.randint(0, 10, (n, 3), generator=generator).tolist()
    prompts = ["".join(map(str, row[:k])) + "=" for row, k in zip(digits, lengths)]
    return encode_examples(prompts, ["".join(map(str, a)) for a in answers], vocab=vocab)


@dataclass(frozen=True)
class HiddenPreservation:
    """Keep the residual stream after decoder layer `layer` equal to `reference`'s on the batch's
    distilled (replay) rows: `weight` x the mean squared difference over their real positions,
    relative to the reference's mean square there (scale-free). With every other parameter frozen
    this confines what the trained layers do to the rows that are *not* replayed: an expert's own
    layers then leave the other tasks' hidden states alone, and experts trained in different
    layers compose."""

    reference: object  # a model of the same shape, not trained
    layer: int  # the last decoder layer whose output is compared
    weight: float


def hidden_preservation_loss(hidden: torch.Tensor, batch: Batch, preserve: HiddenPreservation) -> torch.Tensor:
    """`hidden`: (B, T, H) the trained model's output of layer `preserve.layer` on the whole batch."""
    loss = hidden.new_zeros(())
    rows = batch.inputs.shape[0]
    for start, stop, _ in batch.distilled:
        inputs = batch.inputs[start:stop].to(hidden.device)
        with torch.no_grad():
            reference = preserve.reference(input_ids=inputs, output_hidden_states=True).hidden_states[
                preserve.layer + 1].float()
        real = (inputs != PAD_ID).unsqueeze(-1)  # (R, T, 1): padding sits at the rows' ends
        squared = ((hidden[start:stop].float() - reference) ** 2 * real).sum()
        scale = (reference ** 2 * real).sum().clamp_min(1e-12)
        loss = loss + preserve.weight * (stop - start) / rows * squared / scale
    return loss


@contextmanager
def _attention(model, implementation: str | None) -> Iterator[None]:
    """Train with `implementation` (None: the model's own); the model's setting is restored after."""
    saved = model.config._attn_implementation
    if implementation is not None:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def train(
    model,
    sample: Callable[[], Batch],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.0,
    distill_weight: float = 1.0,
    autocast: torch.dtype | None = None,
    attention: str | None = None,
    stage: str = "train",
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    on_step: Callable[[int], bool | None] | None = None,
    lr_scale: Callable[[str], float] | None = None,
    preserve: HiddenPreservation | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay to zero over `steps`; returns the loss of every
    step. `on_step(step)` returning True stops training after that step (early stopping).

    `autocast` (e.g. `torch.bfloat16`) runs the forward pass in mixed precision; the weights, their
    gradients, the optimizer state and the loss stay float32. `attention` is the attention
    implementation to train with; by default "eager" under autocast on CPU (there the bfloat16 SDPA
    backward is slower than a whole float32 step: benchmarks/zoo_training_step.py), else the model's;
    `on_step` sees the model with it too (in float32, outside autocast).

    `lr_scale(parameter_name)` multiplies the learning rate of each parameter (0 freezes it); by
    default every parameter trains at `lr`. `preserve` adds `hidden_preservation_loss` (the
    replay rows' hidden states after some layer kept at a reference model's).

    Padding sits at the end of each row, so causal attention never lets it reach a scored
    position and no attention mask is needed.
    """
    if lr_scale is None:
        groups = [{"params": list(model.parameters()), "lr": lr}]
    else:
        by_scale: dict[float, list] = {}
        for name, param in model.named_parameters():
            by_scale.setdefault(float(lr_scale(name)), []).append(param)
        groups = [{"params": params, "lr": lr * scale} for scale, params in sorted(by_scale.items()) if scale > 0]
    trained = [p for group in groups for p in group["params"]]  # frozen parameters get no gradient
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    device = next(model.parameters()).device
    losses = []
    start = time.perf_counter()
    model.train()
    if attention is None and autocast is not None and device.type == "cpu":
        attention = "eager"
    with _attention(model, attention):
        for step in range(steps):
            batch = sample()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                output = model(input_ids=batch.inputs.to(device), output_hidden_states=preserve is not None)
                logits = output.logits  # (B, T, V)
                if preserve is not None:
                    extra = hidden_preservation_loss(output.hidden_states[preserve.layer + 1], batch, preserve)
            loss = batch_loss(logits.float(), batch, distill_weight)
            if preserve is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)  # frozen parameters' gradients too
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            stop = bool(on_step(step + 1)) if on_step is not None else False
            if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps or stop):
                recent = losses[-log_every:]
                log(f"{stage}: step {step + 1}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                    f"({time.perf_counter() - start:.0f}s)" + ("  stopping early" if stop else ""))
            if stop:
                break
    model.eval()
    return losses


def autocast_for(requested: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """`requested` where the device computes in it natively, else None (float32): a CPU without
    bfloat16 instructions (AVX512-BF16 / AMX, as oneDNN reports them) would emulate it, slower than float32."""
    if requested is None or device.type != "cpu" or requested != torch.bfloat16:
        return requested
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = False
    return requested if supported else None
