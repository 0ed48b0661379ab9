"""The medium zoo's structure, through its seconds-long variant `medium_tiny` (same tasks, depth and
split format; no quality promise): six experts, eight layers, test splits from their own
generators, models and evaluation that never depend on a test split, bars on validation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from evomerge.testing import one_torch_thread
from evomerge.zoo import BASE, Manifest, build_zoo, get_size, make_task_splits
from evomerge.zoo._build import grid_search
from evomerge.zoo._tasks import MEDIUM_TASKS, TaskSplitSizes, maxmin_item, rotation_item, subtraction_item
from evomerge.zoo._tokenizer import CHARACTERS, MEDIUM_CHARACTERS, VOCAB, vocab_for

SOLVE = {
    "addition": lambda p: str(sum(int(x) for x in p[:-1].split("+"))),
    "subtraction": lambda p: str(int(p[:-1].split("-")[0]) - int(p[:-1].split("-")[1])),
    "reversal": lambda p: p[1:-1][::-1],
    "sorting": lambda p: "".join(sorted(p[1:-1])),
    "rotation": lambda p: p[2:-1] + p[1],
    "maxmin": lambda p: max(p[1:-1]) + min(p[1:-1]),
}




def test_medium_and_its_fixture_share_their_structure():
    medium, fixture = get_size("medium"), get_size("medium_tiny")
    for spec in (medium, fixture):
        assert len(spec.tasks) >= 6 and spec.tasks == MEDIUM_TASKS
        assert spec.layers >= 8 and spec.split_format == 2
        assert set(spec.base_mix) == set(spec.base_limits) == set(spec.expert_steps) == set(spec.tasks)
    assert fixture.layers == medium.layers and fixture.grid == medium.grid and fixture.refine_step == 0


def test_hand_worked_items_of_the_new_tasks():
    assert subtraction_item(82, 45) == {"prompt": "82-45=", "answer": "37", "n_digits": 2, "n_borrows": 1,
                                       "answer_len": 2}
    assert subtraction_item(57, 31)["n_borrows"] == 0 and subtraction_item(7, 7)["answer"] == "0"
    with pytest.raises(ValueError, match="never negative"):
        subtraction_item(3, 4)
    assert rotation_item("30719") == {"prompt": "L30719=", "answer": "07193", "n_digits": 5, "n_repeats": 0}
    assert maxmin_item("30770") == {"prompt": "M30770=", "answer": "70", "n_digits": 5, "n_repeats": 2}


def test_the_medium_vocabulary_extends_the_small_one():
    """The small zoo's characters keep their ids; the new tasks' characters are appended."""
    medium = vocab_for(MEDIUM_CHARACTERS)
    assert MEDIUM_CHARACTERS.startswith(CHARACTERS) and vocab_for(CHARACTERS) == VOCAB
    assert all(medium[token] == i for token, i in VOCAB.items()) and len(medium) == len(VOCAB) + 3


def test_test_splits_come_from_their_own_generator():
    """Format 2: test does not move when train or validation grow; those skip every test prompt;
    everything depends on the seed only."""
    for task in MEDIUM_TASKS:
        small = make_task_splits(task, TaskSplitSizes(train=40, validation=10, test=15), 0, test_stream=True)
        large = make_task_splits(task, TaskSplitSizes(train=90, validation=30, test=15), 0, test_stream=True)
        assert small["test"] == large["test"]
        assert small["validation"]["prompt"] == large["validation"]["prompt"][:10]
        assert small == make_task_splits(task, TaskSplitSizes(train=40, validation=10, test=15), 0, test_stream=True)
        other = make_task_splits(task, TaskSplitSizes(train=40, validation=10, test=15), 1, test_stream=True)
        assert other["test"]["prompt"] != small["test"]["prompt"]
        test = set(large["test"]["prompt"])
        assert not test & set(large["train"]["prompt"]) and not test & set(large["validation"]["prompt"])
    # a finite prompt space (subtraction: 5,050 prompts) leaves train what validation and test do not take
    full = make_task_splits("subtraction", TaskSplitSizes(train=10_000, validation=1000, test=300), 0, test_stream=True)
    assert len(full["train"]["id"]) == 5050 - 1300


def test_the_fixture_has_six_experts_of_eight_layers_that_load(medium_tiny_zoo: Manifest):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = medium_tiny_zoo
    assert zoo.size == "medium_tiny" and zoo.tasks == list(MEDIUM_TASKS) and zoo.experts == list(MEDIUM_TASKS)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.tokenizer_path))
    assert len(tokenizer("82-45=").input_ids) == 7 and tokenizer.unk_token_id not in tokenizer("L1M2-").input_ids
    for name in [BASE, *zoo.experts]:
        model = AutoModelForCausalLM.from_pretrained(str(zoo.model_path(name)))
        own = AutoTokenizer.from_pretrained(str(zoo.model_path(name)))  # what `evomerge merge` and a search load
        assert own.get_vocab() == tokenizer.get_vocab() and own("82-45=").input_ids == tokenizer("82-45=").input_ids
        assert model.config.num_hidden_layers == 8 and model.config.vocab_size == len(vocab_for(MEDIUM_CHARACTERS))
    for task in zoo.tasks:
        splits = datasets.load_from_disk(str(zoo.task_path(task)))
        prompts = {name: split["prompt"] for name, split in splits.items()}
        assert all(len(set(p)) == len(p) for p in prompts.values()), task
        assert not set(prompts["test"]) & (set(prompts["train"]) | set(prompts["validation"])), task
        assert not set(prompts["train"]) & set(prompts["validation"]), task
        for name in ("train", "validation"):  # the build's own splits; test is left unread
            assert all(SOLVE[task](p) == a for p, a in zip(prompts[name], splits[name]["answer"])), (task, name)


def test_the_fixture_evaluates_on_validation_over_every_corner(medium_tiny_zoo: Manifest):
    evaluation = medium_tiny_zoo.data["evaluation"]
    assert evaluation["split"] == "validation"
    merges = medium_tiny_zoo.reference_merges
    assert all("test" not in merge for merge in merges.values())
    grid = merges["best_grid"]["grid"]
    assert grid["n_evaluated"] == 2 ** 6 and set(merges["best_grid"]["weights"]) <= {0.0, 1.0}
    assert merges["uniform_task_arithmetic"]["weights"] == [1.0] * 6
    bars = {b["bar"] for b in medium_tiny_zoo.quality_bars}
    assert {"expert_own_task_min", "experts_own_mean_minus_base_mean", "best_merge_minus_uniform_task_arithmetic",
            "best_merge_minus_averaging", "build_seconds"} <= bars
    assert set(evaluation["accuracy"]) == {BASE, *MEDIUM_TASKS}


def test_a_changed_test_split_retrains_nothing(medium_tiny_zoo: Manifest, tmp_path):
    """Models and evaluation hash train and validation only: a damaged test split is rewritten
    (identically, from its own generator) and nothing downstream is redone."""
    copy = tmp_path / "zoo"
    shutil.copytree(medium_tiny_zoo.root, copy / "medium_tiny")
    arrow = sorted((copy / "medium_tiny" / "tasks" / "rotation" / "test").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[:-7] + b"corrupt")
    rebuilt = one_torch_thread(build_zoo, copy, size="medium_tiny", seed=0, progress=False)
    assert rebuilt.built == ["task rotation"] and "evaluation" in rebuilt.reused
    assert rebuilt.content_hash == medium_tiny_zoo.content_hash
    # and the model keys do not change when the test files do
    manifest = json.loads((copy / "medium_tiny" / "zoo.json").read_text())
    assert manifest["models"]["rotation"]["key"] == medium_tiny_zoo.data["models"]["rotation"]["key"]


@pytest.mark.slow
def test_a_model_folder_with_the_small_vocabulary_gets_the_zoos_tokenizer_without_a_retrain(
        medium_tiny_zoo: Manifest, tmp_path):
    """Folders built before the fix carried the small zoo's tokenizer (`-`, `L`, `M` unknown)."""
    from evomerge.zoo._tokenizer import build_tokenizer, save_tokenizer

    copy = tmp_path / "zoo"
    shutil.copytree(medium_tiny_zoo.root, copy / "medium_tiny")
    stale = copy / "medium_tiny" / "models" / "subtraction"
    save_tokenizer(build_tokenizer(CHARACTERS), stale)
    weights = (stale / "model.safetensors").read_bytes()
    rebuilt = one_torch_thread(build_zoo, copy, size="medium_tiny", seed=0, progress=False)
    assert rebuilt.content_hash == medium_tiny_zoo.content_hash
    assert (stale / "model.safetensors").read_bytes() == weights  # reused, not retrained
    assert (stale / "tokenizer.json").read_bytes() == (rebuilt.tokenizer_path / "tokenizer.json").read_bytes()


def test_two_medium_tiny_builds_are_byte_identical(medium_tiny_zoo: Manifest, tmp_path):
    second = one_torch_thread(build_zoo, tmp_path, size="medium_tiny", seed=0, progress=False)
    assert second.content_hash == medium_tiny_zoo.content_hash


def test_a_grid_without_refinement_scores_every_corner_once():
    calls = []

    def score(w):
        calls.append(w)
        return sum(w)

    result = grid_search(score, 6, (0.0, 1.0), 0.0)
    assert result.n_evaluated == len(calls) == 64 and result.weights == (1.0,) * 6


def test_zoo_presets_reproduce_the_fixtures_validation_accuracies(medium_tiny_zoo: Manifest):
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.tasks import load_task

    zoo = medium_tiny_zoo
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.tokenizer_path))
    scorers = {}
    for task in zoo.tasks:
        spec = load_task(zoo.task_preset(task), {"dataset": {"path": str(zoo.task_path(task))}})
        scorers[task] = spec.make_scorer(tokenizer, spec.load_split("fitness"), device="cpu")
    for name in [BASE, zoo.experts[1]]:
        model = AutoModelForCausalLM.from_pretrained(str(zoo.model_path(name)), dtype=torch.float32).eval()
        for task, scorer in scorers.items():
            assert float(np.mean(scorer(model))) == zoo.accuracy[name][task], (name, task)


def test_each_expert_changes_mostly_its_own_layers(medium_tiny_zoo: Manifest):
    """`expert_layers`: an expert trains its own decoder layers at the full learning rate and the
    rest at a tenth of it, so its task vector is largest where its skill is meant to live."""
    from safetensors.torch import load_file

    spec = get_size("medium_tiny")
    base = load_file(str(medium_tiny_zoo.base_path / "model.safetensors"))
    for task in medium_tiny_zoo.experts:
        expert = load_file(str(medium_tiny_zoo.model_path(task) / "model.safetensors"))
        own, other = [], []
        for name, tensor in base.items():
            layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
            change = float((expert[name] - tensor).abs().mean())
            (own if layer is not None and int(layer) in spec.expert_layers[task] else other).append(change)
        assert min(own) > 0 and np.mean(own) > 3 * np.mean(other), task
        assert medium_tiny_zoo.data["models"][task]["training"]["layers"] == list(spec.expert_layers[task])


def test_a_zero_learning_rate_scale_freezes_a_parameter():
    from evomerge.zoo._train import BatchPart, encode_examples, init_model, make_sampler, model_config, train

    data = make_task_splits("rotation", TaskSplitSizes(train=64, validation=0, test=0), 0, test_stream=True)["train"]
    examples = encode_examples(data["prompt"], data["answer"], vocab=vocab_for(MEDIUM_CHARACTERS))
    model = init_model(model_config(16, 2, 2, 32, vocab_size=len(vocab_for(MEDIUM_CHARACTERS))), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = make_sampler([BatchPart(examples, 8)], torch.Generator().manual_seed(0))
    one_torch_thread(train, model, sample, steps=3, lr=1e-2, warmup=1,
                lr_scale=lambda name: 1.0 if ".layers.1." in name else 0.0)
    after = model.state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) != (".layers.1." in name), name
    assert all(p.requires_grad for p in model.parameters())


def test_hidden_preservation_keeps_the_replayed_tasks_hidden_states_and_still_trains_the_own_task():
    """`train(preserve=...)`: with only layer 1 trained, the replay rows' residual stream after
    layer 1 moves far less from the untrained reference than the same training without it, and
    the change it makes falls on the own task's rows rather than on the replayed ones."""
    from evomerge.zoo._train import (
        BatchPart, HiddenPreservation, encode_examples, init_model, make_sampler, model_config, train, with_teacher,
    )

    vocab = vocab_for(MEDIUM_CHARACTERS)
    splits = {t: make_task_splits(t, TaskSplitSizes(train=64, validation=0, test=0), 0, test_stream=True)["train"]
              for t in ("rotation", "sorting")}
    config = model_config(16, 3, 2, 32, vocab_size=len(vocab))
    reference = init_model(config, 0).eval()
    own = encode_examples(splits["rotation"]["prompt"], splits["rotation"]["answer"], vocab=vocab)
    replay = with_teacher(encode_examples(splits["sorting"]["prompt"], splits["sorting"]["answer"], vocab=vocab),
                          reference)

    def moved(preserve: HiddenPreservation | None) -> tuple[float, float]:
        model = init_model(config, 0)
        sample = make_sampler([BatchPart(own, 6), BatchPart(replay, 6)], torch.Generator().manual_seed(0))
        one_torch_thread(train, model, sample, steps=30, lr=3e-3, warmup=1, preserve=preserve,
                         lr_scale=lambda name: 1.0 if ".layers.1." in name else 0.0)
        out = []
        with torch.no_grad():
            for examples in (replay, own):
                ids = examples.inputs
                after = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
                before = reference(input_ids=ids, output_hidden_states=True).hidden_states[2]
                out.append(float((after - before).norm() / before.norm()))
        return out[0], out[1]

    free_replay, free_own = moved(None)
    kept_replay, kept_own = moved(HiddenPreservation(reference, layer=1, weight=10.0))
    # measured: replay 2.23 -> 0.020 of the reference's norm; own / replay 1.02 -> 1.98
    assert kept_replay < 0.1 * free_replay, (kept_replay, free_replay)
    assert kept_own / kept_replay > 1.5 * free_own / free_replay, (kept_own, kept_replay, free_own, free_replay)


def test_experts_trained_two_at_a_time_are_the_bytes_of_one_after_another(medium_tiny_zoo: Manifest, tmp_path):
    """`build_zoo(workers=2)`: the experts to build train in two forked processes, and each expert's
    weights are byte-identical to the fixture's, built one after another; the manifest lists them in
    the task order, as built."""
    copy = tmp_path / "medium_tiny"
    shutil.copytree(medium_tiny_zoo.root, copy)
    manifest = json.loads((copy / "zoo.json").read_text())
    for task in MEDIUM_TASKS:
        manifest["models"][task]["key"] = "stale"
    (copy / "zoo.json").write_text(json.dumps(manifest))
    rebuilt = one_torch_thread(build_zoo, tmp_path, size="medium_tiny", seed=0, progress=False, workers=2)
    assert rebuilt.built == [f"model {task}" for task in MEDIUM_TASKS] and "evaluation" in rebuilt.reused  # same hashes
    assert list(rebuilt.data["models"]) == ["base", *MEDIUM_TASKS]
    for task in MEDIUM_TASKS:
        assert (rebuilt.model_path(task) / "model.safetensors").read_bytes() == \
            (medium_tiny_zoo.model_path(task) / "model.safetensors").read_bytes(), task
    assert rebuilt.content_hash == medium_tiny_zoo.content_hash


def test_the_drift_stage_changes_only_what_the_skill_stage_left_frozen(medium_tiny_zoo: Manifest, tmp_path):
    """`expert_drift_steps`: the skill is learnt in the own layers with everything else frozen, then
    the drift trains everything else with the own layers frozen. Reference: the same build without
    the drift stage; its own layers must be equal bit for bit to the drifted expert's, and its other
    parameters equal to the base's."""
    import dataclasses

    from safetensors.torch import load_file

    from evomerge.zoo._sizes import SIZES

    variants = {"medium_tiny_frozen": {}, "medium_tiny_drift": {"expert_drift_steps": 3, "expert_drift_lr": 1e-3},
                "medium_tiny_private": {"expert_drift_steps": 3, "expert_drift_lr": 1e-3, "expert_drift_private": 16,
                                        "expert_drift_private_rows": 4}}
    built = {}
    try:
        for name, extra in variants.items():
            SIZES[name] = dataclasses.replace(SIZES["medium_tiny"], name=name, expert_other_lr_scale=0.0,
                                              expert_target=0.0, **extra)
            shutil.copytree(medium_tiny_zoo.root, tmp_path / name)  # the tokenizer, tasks and base are reused
            built[name] = one_torch_thread(build_zoo, tmp_path, size=name, seed=0)
    finally:
        for name in variants:
            SIZES.pop(name, None)
    frozen, drift, private = built["medium_tiny_frozen"], built["medium_tiny_drift"], built["medium_tiny_private"]
    # experts rebuilt with another recipe beside the copied base: the copied from-scratch time no
    # longer describes the zoo; the build bar sums the components' own times and says so
    data = private.data
    summed = sum(c["seconds"] for c in [data["tokenizer"], *data["tasks"].values(), *data["models"].values()])
    assert data["build"]["measured"] == "components" and data["build"]["content_hash"] == private.content_hash
    assert data["build"]["seconds"] == pytest.approx(summed + data["evaluation"]["seconds"], abs=0.01)
    bar = next(b for b in private.quality_bars if b["bar"] == "build_seconds")
    assert bar["value"] == data["build"]["seconds"] and "summed" in bar["detail"]
    assert medium_tiny_zoo.data["build"]["measured"] == "from_scratch"
    assert "drift" not in frozen.data["models"]["addition"]["training"]
    assert drift.data["models"]["addition"]["training"]["drift"]["steps"] == 3
    assert private.data["models"]["addition"]["training"]["drift"]["private"]["items"] == 16
    base = load_file(str(frozen.base_path / "model.safetensors"))
    own_layers = get_size("medium_tiny").expert_layers
    for task in frozen.experts:
        skill = load_file(str(frozen.model_path(task) / "model.safetensors"))
        drifted = load_file(str(drift.model_path(task) / "model.safetensors"))
        privately = load_file(str(private.model_path(task) / "model.safetensors"))
        for name, tensor in base.items():
            own = ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) in own_layers[task]
            if own:
                assert not torch.equal(skill[name], tensor) and torch.equal(drifted[name], skill[name]), (task, name)
                assert torch.equal(privately[name], skill[name]), (task, name)
            else:
                assert torch.equal(skill[name], tensor) and not torch.equal(drifted[name], tensor), (task, name)
                # the private drift moves the other decoder layers only: embeddings, norm and head stay the base's
                assert torch.equal(privately[name], tensor) == (".layers." not in name), (task, name)


def test_private_task_is_seeded_random_labels_in_a_format_no_skill_uses():
    from evomerge.zoo._tokenizer import MEDIUM_CHARACTERS, vocab_for
    from evomerge.zoo._train import private_task

    vocab = vocab_for(MEDIUM_CHARACTERS)
    a, b, c = private_task(64, 7, vocab), private_task(64, 7, vocab), private_task(64, 8, vocab)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    ids = {v: k for k, v in vocab.items()}
    for row, target, n in zip(a.inputs, a.targets, a.lengths):
        text = "".join(ids[int(t)] for t in row[1:n])  # after <bos>: prompt and answer (its last token predicts <eos>)
        prompt, answer = text.split("=")
        assert prompt.isdigit() and 4 <= len(prompt) <= 8 and answer.isdigit() and len(answer) == 3
        assert int((target != -100).sum()) == 4  # three digits and the end token are scored
