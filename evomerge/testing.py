"""Synthetic model families for tests and benchmarks: a random base plus experts = base + small deltas.

Real formats at tiny sizes: each model is a `transformers` Llama folder written with
`save_pretrained` (safetensors), so the loading code under test is the code users run on 7B models.
"""
from __future__ import annotations

from pathlib import Path

import torch


def llama_config(hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64, vocab: int = 64,
                 tie_word_embeddings: bool = False, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        **extra,
    )


def make_family(
    out_dir: str | Path,
    *,
    n_experts: int = 3,
    seed: int = 0,
    delta_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    config=None,
) -> tuple[Path, list[Path]]:
    """Write `base/` and `expert_{i}/` under `out_dir`; returns (base path, expert paths).

    Experts are the base plus Gaussian deltas of relative size `delta_scale`, drawn from a
    generator seeded by (seed, expert index), so the family is reproducible.
    """
    from transformers import LlamaForCausalLM

    from evomerge.zoo._tokenizer import build_tokenizer, save_tokenizer

    out_dir = Path(out_dir)
    config = config or llama_config()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = model.to(dtype)
    tokenizer = build_tokenizer()

    def save(path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, path)

    save(out_dir / "base")
    expert_paths = []
    for i in range(n_experts):
        gen.manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                ref = base_state[name]
                noise = torch.randn(ref.shape, generator=gen) * (ref.float().std().clamp_min(1e-3) * delta_scale)
                param.copy_((ref.float() + noise).to(dtype))
        path = out_dir / f"expert_{i}"
        save(path)
        expert_paths.append(path)
    return out_dir / "base", expert_paths


def make_choice_task(out_dir: str | Path, *, n_validation: int = 40, n_test: int = 40, n_choices: int = 3,
                     seed: int = 0) -> Path:
    """A `datasets.DatasetDict` of multiple-choice sums over the zoo vocabulary, saved to disk.

    Even randomly initialised models answer these differently from one another (argmax over the
    choices' log-likelihoods), so they give search and calibration tests a real, varied signal
    without any training.
    """
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    splits = {}
    used = set()
    for split, n in (("validation", n_validation), ("test", n_test)):
        rows = {"id": [], "prompt": [], "choices": [], "label": []}
        while len(rows["id"]) < n:
            a, b = (int(x) for x in rng.integers(0, 100, size=2))
            if (a, b) in used:
                continue
            used.add((a, b))
            wrong = set()
            while len(wrong) < n_choices - 1:
                candidate = a + b + int(rng.integers(-9, 10))
                if candidate != a + b and candidate >= 0:
                    wrong.add(candidate)
            choices = [str(c) for c in sorted(wrong | {a + b})]
            rows["id"].append(f"{split}-{len(rows['id']):04d}")
            rows["prompt"].append(f"{a}+{b}=")
            rows["choices"].append(choices)
            rows["label"].append(choices.index(str(a + b)))
        splits[split] = datasets.Dataset.from_dict(rows)
    path = Path(out_dir)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def choice_task_preset(dataset_path: str | Path, name: str = "sums") -> dict:
    """The task preset (as a dict) for `make_choice_task` data."""
    return {"name": name, "dataset": {"path": str(dataset_path)}, "prompt": "{prompt}", "scorer": "multiple_choice",
            "choices": "{choices}", "choice_template": "{choice}", "answer_index": "{label}", "batch_size": 64}


def write_run_config(root: str | Path, file_name: str, **changes) -> Path:
    """`root/<file_name>.yaml`: a run named `file_name`, a small in-process search (TIES per layer,
    NSGA-II, 24 evaluations) over the `fam/` models and the `fitness/mc` compressed fitness under
    `root`; `changes` replace top-level fields (`name` included)."""
    import yaml

    config = {
        "name": file_name,
        "models": {"base": "fam/base", "experts": ["fam/expert_0", "fam/expert_1"]},
        "search_space": "ties_per_layer",
        "fitness": {"name": "fitness/mc"},
        "optimizer": {"name": "nsga2", "settings": {"pop_size": 6}},
        "budget": {"evaluations": 24},
        "workers": {"backend": "inprocess"},
        "seed": 3,
        "runs_dir": "runs",
        **changes,
    }
    path = Path(root) / f"{file_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def hand_scored_accuracy(model_dir: str | Path, task_dir: str | Path, split: str) -> float:
    """Multiple-choice accuracy, one unpadded forward per choice in float64: the gold choice must have
    the highest summed log-probability of its tokens after the prompt (independent of evomerge's scorer)."""
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    correct = []
    for item in datasets.load_from_disk(str(task_dir))[split]:
        prompt_ids = tokenizer(item["prompt"]).input_ids
        scores = []
        for choice in item["choices"]:
            choice_ids = tokenizer(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + choice_ids])).logits[0].double()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)
            scores.append(sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(choice_ids)))
        correct.append(int(np.argmax(scores)) == item["label"])
    return float(np.mean(correct))


def one_torch_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with one torch thread (as the zoo fixtures build), then the count as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
