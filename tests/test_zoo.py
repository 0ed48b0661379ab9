"""The zoo: real Hugging Face folders and datasets, honest manifest numbers, reproducible, cached."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.fitness.scoring import ExactMatchScorer, exact_match
from evomerge.testing import one_torch_thread
from evomerge.zoo import BASE, MANIFEST_NAME, TASKS, Manifest, build_zoo, make_task_splits
from evomerge.zoo._build import grid_search
from evomerge.zoo._tasks import TaskSplitSizes, addition_item, reversal_item, sorting_item
from evomerge.zoo._train import IGNORE, BatchPart, encode_examples, init_model, make_sampler, model_config, train


@pytest.fixture(autouse=True)
def _single_thread():
    """One thread, like the fixture's build: byte comparisons stay valid, and on a busy two-core
    machine a second OpenMP thread spinning at barriers makes these tiny models several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- files load through the libraries


def test_every_folder_loads_through_transformers_and_datasets(tiny_zoo: Manifest):
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert tiny_zoo.root.name == "tiny" and (tiny_zoo.root / MANIFEST_NAME).exists()
    assert tiny_zoo.experts == list(TASKS) and tiny_zoo.tasks == list(TASKS)
    for folder in [tiny_zoo.tokenizer_path, tiny_zoo.base_path, *tiny_zoo.expert_paths]:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # what transformers 4 can load
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
        ids = tokenizer("12+34=").input_ids
        assert ids[0] == tokenizer.bos_token_id and len(ids) == 7  # one token per character
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "12+34="
    for folder in [tiny_zoo.base_path, *tiny_zoo.expert_paths]:
        assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in folder.iterdir()}
        model = _model(folder)
        assert isinstance(model, LlamaForCausalLM)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    for task in TASKS:
        splits = datasets.load_from_disk(str(tiny_zoo.task_path(task)))
        assert set(splits) == {"train", "validation", "test"}
        assert {"id", "prompt", "answer", "n_digits"} <= set(splits["test"].column_names)
        sizes = tiny_zoo.data["tasks"][task]["splits"]
        assert {name: len(split) for name, split in splits.items()} == sizes


def test_split_items_are_disjoint_and_answers_are_right(tiny_zoo: Manifest):
    import datasets

    solve = {"addition": lambda p: str(sum(int(x) for x in p[:-1].split("+"))),
             "reversal": lambda p: p[1:-1][::-1],
             "sorting": lambda p: "".join(sorted(p[1:-1]))}
    for task in TASKS:
        splits = datasets.load_from_disk(str(tiny_zoo.task_path(task)))
        prompts = {name: set(split["prompt"]) for name, split in splits.items()}
        for name, split in splits.items():
            assert len(prompts[name]) == len(split), f"{task}/{name} repeats a prompt"
            assert all(solve[task](p) == a for p, a in zip(split["prompt"], split["answer"]))
        assert not prompts["train"] & prompts["validation"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["validation"] & prompts["test"]


def test_difficulty_features_on_hand_worked_items():
    assert addition_item(57, 68) == {"prompt": "57+68=", "answer": "125", "n_digits": 2, "n_carries": 2,
                                     "answer_len": 3}
    assert addition_item(5, 31)["n_carries"] == 0 and addition_item(5, 31)["n_digits"] == 2
    assert addition_item(9, 1)["n_carries"] == 1
    assert reversal_item("30070") == {"prompt": "R30070=", "answer": "07003", "n_digits": 5, "n_repeats": 2}
    assert sorting_item("3102") == {"prompt": "S3102=", "answer": "0123", "n_digits": 4, "n_repeats": 0,
                                    "n_inversions": 4}  # 3>1, 3>0, 3>2, 1>0


def test_task_splits_depend_on_the_seed_only():
    sizes = TaskSplitSizes(train=50, validation=10, test=10)
    for task in TASKS:
        assert make_task_splits(task, sizes, 0) == make_task_splits(task, sizes, 0)
        assert make_task_splits(task, sizes, 0)["test"]["prompt"] != make_task_splits(task, sizes, 1)["test"]["prompt"]


# --------------------------------------------------------------------------- the manifest tells the truth


def test_manifest_accuracies_match_a_fresh_scoring(tiny_zoo: Manifest):
    """The manifest's accuracies are on the validation splits (the build never reads test)."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_zoo.tokenizer_path))
    assert Manifest.load(tiny_zoo.root).data == tiny_zoo.data
    assert tiny_zoo.data["evaluation"]["split"] == "validation"
    tests = {task: datasets.load_from_disk(str(tiny_zoo.task_path(task)))["validation"] for task in TASKS}
    for name in [BASE, *tiny_zoo.experts]:
        model = _model(tiny_zoo.model_path(name))
        for task, test in tests.items():
            correct = exact_match(model, tokenizer, test["prompt"], test["answer"], device="cpu")
            assert correct.dtype == bool and correct.shape == (len(test),)
            assert float(correct.mean()) == tiny_zoo.accuracy[name][task], (name, task)


def test_reference_merges_match_an_independent_state_dict_merge(tiny_zoo: Manifest):
    """Recompute the recorded merges by plain state-dict arithmetic, not through the Materializer."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_zoo.tokenizer_path))
    base = _model(tiny_zoo.base_path).state_dict()
    experts = [_model(p).state_dict() for p in tiny_zoo.expert_paths]
    merged = _model(tiny_zoo.base_path)
    merges = tiny_zoo.reference_merges
    tests = {task: datasets.load_from_disk(str(tiny_zoo.task_path(task)))["validation"] for task in TASKS}
    assert all("test" not in merge for merge in merges.values())
    assert merges["uniform_task_arithmetic"]["weights"] == [1.0] * len(TASKS)
    for name, merge in merges.items():
        if merge["method"] == "task_arithmetic":
            state = {k: base[k] + sum(w * (e[k] - base[k]) for w, e in zip(merge["weights"], experts)) for k in base}
        else:  # averaging
            state = {k: sum(e[k] for e in experts) / len(experts) for k in base}
        merged.load_state_dict(state)
        for task, test in tests.items():
            score = float(exact_match(merged, tokenizer, test["prompt"], test["answer"], device="cpu").mean())
            assert score == pytest.approx(merge["validation"][task], abs=1.5 / len(test)), (name, task)
    bars = {b["bar"]: b for b in tiny_zoo.quality_bars}
    assert set(bars) >= {"expert_own_task_min", "best_merge_minus_averaging", "build_seconds"}
    assert all(b["passed"] == (b["value"] <= b["threshold"] if b["bar"] == "build_seconds"
                               else b["value"] >= b["threshold"]) for b in bars.values())


# --------------------------------------------------------------------------- the scorer


def test_scorer_matches_transformers_generate_one_prompt_at_a_time(tiny_zoo: Manifest):
    """Left padding, masks and the KV cache must not change a single greedy token."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_zoo.tokenizer_path))
    model = _model(tiny_zoo.model_path("sorting"))
    prompts = []
    for task in TASKS:
        prompts += datasets.load_from_disk(str(tiny_zoo.task_path(task)))["test"]["prompt"][:6]
    reference = []
    for prompt in prompts:  # unpadded, one by one, through generate
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        reference.append(tokenizer.decode(_until(out[0, ids.shape[1]:].tolist(), tokenizer.eos_token_id),
                                          skip_special_tokens=True).strip())
    scorer = ExactMatchScorer(tokenizer, prompts, reference, batch_size=7, max_new_tokens=10, device="cpu")
    assert scorer.decode(model) == reference
    assert scorer(model).all()
    wrong = [r + "1" for r in reference]
    assert not exact_match(model, tokenizer, prompts, wrong, max_new_tokens=10, device="cpu").any()


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_scorer_rejects_mismatched_inputs(tiny_zoo: Manifest):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_zoo.tokenizer_path))
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        ExactMatchScorer(tokenizer, ["1+1=", "2+2="], ["2"])


# --------------------------------------------------------------------------- reproducible and cached


def test_base_training_is_deterministic_given_the_seed():
    sizes = TaskSplitSizes(train=200, validation=0, test=0)
    data = make_task_splits("addition", sizes, 0)["train"]
    examples = encode_examples(data["prompt"], data["answer"])

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = init_model(model_config(16, 1, 2, 32), seed)
        sample = make_sampler([BatchPart(examples, 8)], torch.Generator().manual_seed(seed))
        train(model, sample, steps=4, lr=1e-3, warmup=1)
        return model.state_dict()

    first, again, other = one_torch_thread(run, 0), one_torch_thread(run, 0), one_torch_thread(run, 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_mixed_precision_training_keeps_float32_weights_and_the_models_attention():
    """bfloat16 autocast changes the arithmetic (weights end near, not equal to, a float32 run),
    stays deterministic, keeps weights and optimizer in float32 and gives the model back with the
    attention implementation it came with."""
    sizes = TaskSplitSizes(train=200, validation=0, test=0)
    data = make_task_splits("reversal", sizes, 0)["train"]
    examples = encode_examples(data["prompt"], data["answer"])

    def run(autocast) -> dict[str, torch.Tensor]:
        model = init_model(model_config(32, 1, 2, 64), 0)
        model.set_attn_implementation("sdpa")
        sample = make_sampler([BatchPart(examples, 8)], torch.Generator().manual_seed(0))
        losses = train(model, sample, steps=6, lr=1e-3, warmup=1, autocast=autocast)
        assert model.config._attn_implementation == "sdpa" and not model.training
        assert all(np.isfinite(losses))
        return model.state_dict()

    start = init_model(model_config(32, 1, 2, 64), 0).state_dict()
    full, mixed, mixed_again = run(None), run(torch.bfloat16), run(torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in mixed.values())
    assert all(torch.equal(mixed[k], mixed_again[k]) for k in mixed)
    assert not all(torch.equal(mixed[k], full[k]) for k in mixed)
    for k in full:  # both runs moved the weights the same way, up to bfloat16 rounding
        moved_full, moved_mixed = full[k] - start[k], mixed[k] - start[k]
        if moved_full.norm() > 0:
            assert (moved_mixed - moved_full).norm() < 0.25 * moved_full.norm(), k


def test_distilled_replay_loss_is_the_teachers_kl_and_hard_rows_cross_entropy():
    """batch_loss: hard rows' token-mean cross-entropy plus weight x KL(teacher || model) on the
    distilled rows, each weighted by its share of the batch, against a hand computation."""
    from evomerge.zoo._train import Batch, batch_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 7, generator=gen)
    targets = torch.tensor([[1, 2, IGNORE, IGNORE], [3, IGNORE, IGNORE, IGNORE], [IGNORE, 4, 5, IGNORE],
                            [IGNORE, 6, IGNORE, IGNORE], [0, 1, 2, 3]])
    teacher = torch.log_softmax(torch.randn(2, 3, 7, generator=gen), -1)  # narrower than the batch
    batch = Batch(torch.zeros(5, 4, dtype=torch.long), targets, ((2, 4, teacher),))

    hard_rows = [0, 1, 4]
    nll = [-torch.log_softmax(logits[r, t], -1)[targets[r, t]] for r in hard_rows for t in range(4)
           if targets[r, t] != IGNORE]
    kl = [(teacher[r - 2, t].exp() * (teacher[r - 2, t] - torch.log_softmax(logits[r, t], -1))).sum()
          for r in (2, 3) for t in range(3) if targets[r, t] != IGNORE]
    expected = 3 / 5 * torch.stack(nll).mean() + 2.5 * 2 / 5 * torch.stack(kl).mean()
    assert torch.allclose(batch_loss(logits, batch, distill_weight=2.5), expected, atol=1e-6)
    # a model that already matches its teacher pays nothing on the distilled rows
    matched = logits.clone()
    matched[2:4, :3] = teacher
    only_hard = 3 / 5 * torch.stack(nll).mean()
    assert torch.allclose(batch_loss(matched, batch, distill_weight=2.5), only_hard, atol=1e-6)
    # without distilled parts it is the plain token-mean cross-entropy of the whole batch
    plain = Batch(batch.inputs, targets)
    assert torch.allclose(batch_loss(logits, plain), torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE))


def test_hidden_preservation_loss_against_a_float64_hand_computation():
    """HiddenPreservation: weight x (sum of squared differences of layer `layer`'s output over the
    distilled rows' real positions) / (the reference's sum of squares there), each part weighted by
    its share of the batch; hard rows and padding do not count, and a model equal to its reference
    pays nothing."""
    from evomerge.zoo._tokenizer import PAD_ID
    from evomerge.zoo._train import Batch, HiddenPreservation, hidden_preservation_loss

    reference = init_model(model_config(hidden=16, layers=3, heads=2, intermediate=32), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(4, 12, (5, 6), generator=gen)
    inputs[2, 4:], inputs[3, 2:] = PAD_ID, PAD_ID  # padding at two distilled rows' ends
    targets = torch.full((5, 6), IGNORE)
    batch = Batch(inputs, targets, ((2, 4, torch.zeros(2, 6, 3)),))
    with torch.no_grad():
        ref_hidden = reference(input_ids=inputs, output_hidden_states=True).hidden_states[2]  # after layer 1
    trained = ref_hidden + 0.1 * torch.randn(ref_hidden.shape, generator=gen)
    preserve = HiddenPreservation(reference, layer=1, weight=3.0)

    diff, ref = trained.double(), ref_hidden.double()
    squared = sum(float(((diff[r, t] - ref[r, t]) ** 2).sum()) for r, n in ((2, 4), (3, 2)) for t in range(n))
    scale = sum(float((ref[r, t] ** 2).sum()) for r, n in ((2, 4), (3, 2)) for t in range(n))
    expected = 3.0 * 2 / 5 * squared / scale
    assert hidden_preservation_loss(trained, batch, preserve).item() == pytest.approx(expected, rel=1e-5)
    assert hidden_preservation_loss(ref_hidden, batch, preserve).item() == pytest.approx(0.0, abs=1e-12)
    changed_elsewhere = ref_hidden.clone()
    changed_elsewhere[[0, 1, 4]] += 5.0  # hard rows
    changed_elsewhere[2, 4:] += 5.0  # padding
    assert hidden_preservation_loss(changed_elsewhere, batch, preserve).item() == pytest.approx(0.0, abs=1e-12)


def test_second_build_reuses_everything(tiny_zoo: Manifest, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo.root, copy / "tiny")
    again = one_torch_thread(build_zoo, copy, size="tiny", seed=0, progress=False)
    assert again.built == []
    assert "model base" in again.reused and "evaluation" in again.reused
    assert again.content_hash == tiny_zoo.content_hash
    assert again.accuracy == tiny_zoo.accuracy
    # the same content: the from-scratch build time still describes it
    assert again.data["build"]["measured"] == "from_scratch"
    assert again.data["build"]["seconds"] == tiny_zoo.data["build"]["seconds"]


def test_deleted_and_corrupted_files_are_rebuilt_identically(tiny_zoo: Manifest, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo.root, copy / "tiny")
    (copy / "tiny" / "models" / "addition" / "model.safetensors").unlink()
    arrow = sorted((copy / "tiny" / "tasks" / "sorting" / "test").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[:-7] + b"corrupt")
    rebuilt = one_torch_thread(build_zoo, copy, size="tiny", seed=0, progress=False)
    assert sorted(rebuilt.built) == ["model addition", "task sorting"]
    # same seed, same machine: the same bytes, so nothing downstream had to be redone
    assert (copy / "tiny" / "models" / "addition" / "model.safetensors").read_bytes() == \
        (tiny_zoo.model_path("addition") / "model.safetensors").read_bytes()
    assert rebuilt.content_hash == tiny_zoo.content_hash
    assert "evaluation" in rebuilt.reused


def test_a_component_with_a_stale_key_is_rebuilt(tiny_zoo: Manifest, tmp_path):
    """A changed setting shows up as a changed key; the component is rebuilt even with intact files."""
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo.root, copy / "tiny")
    manifest = json.loads((copy / "tiny" / MANIFEST_NAME).read_text())
    manifest["tasks"]["addition"]["key"] = "stale"
    (copy / "tiny" / MANIFEST_NAME).write_text(json.dumps(manifest))
    rebuilt = one_torch_thread(build_zoo, copy, size="tiny", seed=0, progress=False)
    assert rebuilt.built == ["task addition"]  # regenerated identically, so the models stay valid


@pytest.mark.slow
def test_two_builds_from_scratch_are_byte_identical(tiny_zoo: Manifest, tmp_path):
    second = one_torch_thread(build_zoo, tmp_path, size="tiny", seed=0, progress=False)
    for name in [BASE, *tiny_zoo.experts]:
        assert (second.model_path(name) / "model.safetensors").read_bytes() == \
            (tiny_zoo.model_path(name) / "model.safetensors").read_bytes(), name
    assert second.content_hash == tiny_zoo.content_hash


def test_per_expert_settings_reach_training_and_the_manifest(tiny_zoo: Manifest):
    """`expert_lr` / `expert_target` may differ per expert (the small zoo's experts stop at different
    accuracies; sorting trains all its steps); what each expert was trained with is what its
    manifest entry says."""
    from evomerge.zoo._sizes import get_size

    spec = get_size("tiny")
    assert isinstance(spec.expert_lr, dict) and len(set(spec.expert_lr.values())) > 1
    for task in TASKS:
        training = tiny_zoo.data["models"][task]["training"]
        assert training["lr"] == spec.expert_lr[task]
        if spec.expert_target[task]:
            assert f">= {spec.expert_target[task]}" in training["early_stop"]
        else:
            assert training["early_stop"] is None and training["steps"] == spec.expert_steps[task]
    small = get_size("small")
    assert small.expert_target_for("reversal") == small.expert_target["reversal"]
    assert small.expert_lr_for("sorting") == small.expert_lr  # one value for every expert


def test_grid_search_finds_the_peak_of_a_known_function():
    peak = (0.45, 0.9, 0.3)
    calls = []

    def score(w):
        calls.append(w)
        return -sum((a - b) ** 2 for a, b in zip(w, peak))

    result = grid_search(score, 3, (0.3, 0.6, 0.9, 1.2), 0.15)
    assert result.weights == peak and result.score == pytest.approx(0.0)
    assert result.n_evaluated == len(calls) == len(set(calls))  # no point is scored twice
    assert list(result.seen) == calls and result.seen[peak] == pytest.approx(0.0)
