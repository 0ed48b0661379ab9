"""Calibration on the tiny zoo: compressed fitness storage, data checks, config errors, zoo presets.

The tiny zoo's models answer (almost) nothing right by exact match, so a calibration population
scored that way has no variance for IRT to fit. The end-to-end calibration here therefore scores
the same models on the same items as *two-way multiple choice* (the right answer against a
one-digit-off distractor, by log-likelihood), which tiny untrained-ish models get right about half
the time, item by item and merge by merge. The exact-match presets are checked separately against
the accuracies the zoo recorded in its manifest.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.fitness.calibrate import (
    DEFAULT_SUBSET_METHOD,
    calibrate,
    calibrate_from_config,
    fit_task_calibration,
    load_calibration_config,
)
from evomerge.fitness.compressed import CompressedFitness, FitnessError, TaskFitness
from evomerge.fitness.estimators import ESTIMATORS
from evomerge.fitness.tasks import TaskSpec, load_task
from evomerge.zoo import Manifest

REPO = Path(__file__).resolve().parent.parent
N_SUBSET = 5
RANDOM_MERGES = 6
FOLDS = 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Scoring tiny models: more threads only contend on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _manifest(zoo) -> Manifest:
    return zoo if isinstance(zoo, Manifest) else Manifest.load(zoo)


def _distractor(answer: str) -> str:
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def _multiple_choice_copy(manifest: Manifest, task: str, folder: Path) -> Path:
    """The zoo task's splits with `choices` (right answer and a distractor) and `gold` columns."""
    import datasets

    splits = datasets.load_from_disk(str(manifest.task_path(task)))

    def add_choices(row, i):
        pair = [row["answer"], _distractor(row["answer"])]
        gold = i % 2  # alternate the gold position so that a bias towards one slot scores 0.5
        return {"choices": pair if gold == 0 else pair[::-1], "gold": gold}

    splits = datasets.DatasetDict({name: split.map(add_choices, with_indices=True, keep_in_memory=True) for name, split in splits.items()})
    splits.save_to_disk(str(folder))
    return folder


def _mc_task(task: str, path: Path) -> TaskSpec:
    return TaskSpec.from_dict({"name": f"mc_{task}", "dataset": {"path": str(path)}, "prompt": "{prompt}",
                               "scorer": "multiple_choice", "choices": "{choices}", "choice_template": "{choice}",
                               "answer_index": "{gold}", "id_field": "id"}, source=f"test:{task}")


@pytest.fixture(scope="module")
def mc_tasks(tiny_zoo, tmp_path_factory):
    manifest = _manifest(tiny_zoo)
    root = tmp_path_factory.mktemp("mc_tasks")
    return manifest, [_mc_task(t, _multiple_choice_copy(manifest, t, root / t)) for t in manifest.tasks]


@pytest.fixture(scope="module")
def calibrated(mc_tasks, tmp_path_factory):
    manifest, tasks = mc_tasks
    out = tmp_path_factory.mktemp("fitness") / "tiny"
    path = calibrate(tasks, str(manifest.base_path), [str(p) for p in manifest.expert_paths], out, name="tiny",
                     random_merges=RANDOM_MERGES, n=N_SUBSET, n_folds=FOLDS, echo=lambda message: None)
    return manifest, tasks, path


def _responses(path: Path) -> dict[str, np.ndarray]:
    with np.load(path / "responses.npz") as data:
        return {key: data[key] for key in data.files}


def test_calibration_saves_the_population_and_fits_the_mixing_weights_on_the_random_merges(calibrated):
    manifest, tasks, path = calibrated
    k = len(manifest.experts)
    arrays = _responses(path)
    np.testing.assert_array_equal(arrays["endpoint_rows"], np.arange(k + 1))
    np.testing.assert_array_equal(arrays["mixing_rows"], np.arange(k + 1, k + 1 + RANDOM_MERGES))
    fitness = CompressedFitness.load(path)
    for task in tasks:
        y = arrays[f"task_{task.name}"]
        assert y.shape == (k + 1 + RANDOM_MERGES, 60)
        assert 0.1 < y.mean() < 0.9  # the multiple-choice scoring gives IRT something to fit
        # the saved calibration is the one the pipeline's own function makes from these answers
        refit = fit_task_calibration(y, arrays["endpoint_rows"], arrays["mixing_rows"], n=N_SUBSET, n_folds=FOLDS)
        saved = fitness.task(task.name).estimator
        assert saved.subset.method == DEFAULT_SUBSET_METHOD == "random"
        np.testing.assert_array_equal(saved.subset.items, refit.subset.items)
        assert saved.mixing_weights == refit.mixing_weights
        assert saved.mixing_method == "cv"


def test_compressed_fitness_round_trips_from_disk(calibrated, tmp_path):
    _, tasks, path = calibrated
    arrays = _responses(path)
    first = CompressedFitness.load(path)
    copy = first.save(tmp_path / "copy")
    second = CompressedFitness.load(copy)
    assert second.task_names == first.task_names == [t.name for t in tasks]
    assert json.loads((copy / "fitness.json").read_text())["tasks"] == json.loads((path / "fitness.json").read_text())["tasks"]
    for task in tasks:
        tf = first.task(task.name)
        assert second.task(task.name).item_ids == tf.item_ids
        for row in arrays[f"task_{task.name}"][:: 3]:
            y = row[tf.estimator.subset.items]
            for name in ESTIMATORS:
                a, b = first.estimate(task.name, y, name), second.estimate(task.name, y, name)
                assert (a.value, a.stderr) == (b.value, b.stderr)
        # the subset's ids name the same rows of the split the scorer will read
        rows = first.subset_items(task.name)
        assert list(rows["id"]) == tf.item_ids


def test_a_fitness_saved_before_the_mixing_weights_were_named_so_still_loads(calibrated, tmp_path):
    # fitness.json files written before the rename store each task's mixing weights as "lambdas"
    _, tasks, path = calibrated
    old = Path(shutil.copytree(path, tmp_path / "old"))
    body = json.loads((old / "fitness.json").read_text())
    for task in body["tasks"].values():
        estimator = task["estimator"]
        estimator["lambdas"], estimator["lambda_method"] = estimator.pop("mixing_weights"), estimator.pop("mixing_method")
    (old / "fitness.json").write_text(json.dumps(body))
    new, loaded = CompressedFitness.load(path), CompressedFitness.load(old)
    arrays = _responses(path)
    for task in tasks:
        assert loaded.task(task.name).estimator.to_dict() == new.task(task.name).estimator.to_dict()
        for row in arrays[f"task_{task.name}"][:: 3]:
            y = row[new.task(task.name).estimator.subset.items]
            for name in ESTIMATORS:
                a, b = new.estimate(task.name, y, name), loaded.estimate(task.name, y, name)
                assert (a.value, a.stderr) == (b.value, b.stderr)


def test_loading_a_fitness_whose_data_changed_names_the_task(calibrated, tmp_path):
    import datasets

    _, tasks, path = calibrated
    fitness = CompressedFitness.load(path)
    moved = tmp_path / "data"
    for task in tasks:
        shutil.copytree(task.dataset["path"], moved / task.name)
        tf = fitness.task(task.name)
        fitness.tasks[task.name] = TaskFitness(tf.task.with_dataset({"path": str(moved / task.name)}), tf.item_ids,
                                            tf.estimator, tf.data_hash, tf.n_total)
    target = fitness.save(tmp_path / "fitness")
    CompressedFitness.load(target)  # unchanged copies load

    victim = tasks[1].name
    splits = datasets.load_from_disk(str(moved / victim))
    splits["validation"] = splits["validation"].map(
        lambda row, i: {"answer": row["answer"] + "0"} if i == 7 else {}, with_indices=True)
    splits.save_to_disk(str(tmp_path / "edited"))  # a dataset cannot overwrite the files it maps
    shutil.rmtree(moved / victim)
    (tmp_path / "edited").rename(moved / victim)
    with pytest.raises(FitnessError, match=rf"task '{victim}': the fitness split's data changed since calibration"):
        CompressedFitness.load(target)
    assert CompressedFitness.load(target, check_data=False).task_names == fitness.task_names


def test_a_fitness_knows_the_model_weights_it_was_calibrated_on(calibrated, tmp_path):
    """The calibration records each model's weights fingerprint (for these small files: sha256 of
    the file name, size and every byte); the same folders match, other weights are named."""
    import hashlib

    from safetensors.torch import load_file, save_file

    manifest, _, path = calibrated
    fitness = CompressedFitness.load(path)
    base, experts = manifest.base_path, manifest.expert_paths

    def whole_file_sha(folder: Path) -> str:
        data = (folder / "model.safetensors").read_bytes()
        return hashlib.sha256(f"model.safetensors\0{len(data)}\0".encode() + data).hexdigest()

    assert fitness.meta["model_fingerprints"] == {"base": whole_file_sha(base),
                                                  "experts": [whole_file_sha(e) for e in experts]}
    assert fitness.model_mismatches(base, experts) == []

    edited = tmp_path / "expert_1"
    shutil.copytree(experts[1], edited)
    tensors = load_file(str(edited / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # same shapes, other weights
    save_file(tensors, str(edited / "model.safetensors"), metadata={"format": "pt"})
    assert fitness.model_mismatches(base, [experts[0], edited, *experts[2:]]) == [f"expert 1 {edited} has other weights"]
    swapped = fitness.model_mismatches(base, [experts[1], experts[0], *experts[2:]])
    assert [m.split()[:2] for m in swapped] == [["expert", "0"], ["expert", "1"]]
    assert fitness.model_mismatches(base, experts[:1]) == [f"1 experts, calibrated with {len(experts)}"]

    del fitness.meta["model_fingerprints"]  # a fitness saved before fingerprints were recorded
    assert fitness.model_mismatches(base, [edited]) == []
    assert "no weights fingerprints" in fitness.model_mismatches(base, experts, unknown_is_stale=True)[0]


def test_a_subset_larger_than_the_split_is_an_error(mc_tasks, tmp_path):
    manifest, tasks = mc_tasks
    with pytest.raises(FitnessError, match=r"field `subset.n`: 61 items per task, but task 'mc_addition' has 60 "
                                           r"items in its fitness split"):
        calibrate(tasks, str(manifest.base_path), [str(p) for p in manifest.expert_paths], tmp_path / "f",
                  name="x", n=61, echo=lambda message: None)


def test_unknown_task_field_and_estimator_are_errors(calibrated, tmp_path):
    manifest, _, path = calibrated
    fitness = CompressedFitness.load(path)
    with pytest.raises(FitnessError, match=r"has no task 'zoo_nope'; tasks: \['mc_addition', 'mc_reversal', "):
        fitness.estimate("zoo_nope", np.zeros(N_SUBSET))
    with pytest.raises(ValueError, match=r"unknown estimator 'q-IRT'; valid: \['subset', 'p-IRT'"):
        fitness.estimate("mc_addition", np.zeros(N_SUBSET), "q-IRT")

    base = {"name": "z", "models": {"base": str(manifest.base_path), "experts": [str(manifest.expert_paths[0])]},
            "tasks": [{"preset": "zoo_addition"}]}

    def config(**changes):
        file = tmp_path / "calibration.yaml"
        file.write_text(yaml.safe_dump({**base, **changes}))
        return file

    with pytest.raises(FitnessError, match=r"calibration.yaml: field `tasks\[1\]` \(zoo_nope\): unknown task 'zoo_nope'"):
        calibrate_from_config(config(tasks=[{"preset": "zoo_addition"}, {"preset": "zoo_nope"}]), out_dir=tmp_path / "o")
    with pytest.raises(FitnessError, match=r"field `subset.size` is not supported"):
        load_calibration_config(config(subset={"size": 20}))
    with pytest.raises(FitnessError, match=r"field `mixing.method`"):
        load_calibration_config(config(mixing={"method": "grid"}))
    with pytest.raises(FitnessError, match=r"field `estimator`: unknown 'q-IRT'; valid:"):
        load_calibration_config(config(estimator="q-IRT"))
    with pytest.raises(FitnessError, match=r"field `calibration.method`: unknown merge method 'soup'"):
        load_calibration_config(config(calibration={"method": "soup"}))
    with pytest.raises(FitnessError, match=r"field `irt.dims`: 2 needs `irt.model: 2pl-jmap`"):
        load_calibration_config(config(irt={"model": "2pl", "dims": 2}))


def test_the_same_seed_picks_the_same_subset(calibrated):
    _, tasks, path = calibrated
    arrays = _responses(path)
    y = arrays[f"task_{tasks[0].name}"]
    ends, rows = arrays["endpoint_rows"], arrays["mixing_rows"]
    for method in ("random", "anchors", "informative"):
        first = fit_task_calibration(y, ends, rows, n=N_SUBSET, subset_method=method, subset_seed=3, n_folds=FOLDS)
        again = fit_task_calibration(y, ends, rows, n=N_SUBSET, subset_method=method, subset_seed=3, n_folds=FOLDS)
        assert first.subset == again.subset
        assert first.mixing_weights == again.mixing_weights
    draws = {tuple(fit_task_calibration(y, ends, rows, n=N_SUBSET, subset_method="random", subset_seed=s,
                                        n_folds=FOLDS).subset.items) for s in range(4)}
    assert len(draws) > 1  # and the seed matters


def test_zoo_presets_reproduce_the_accuracies_in_the_zoo_manifest(tiny_zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = _manifest(tiny_zoo)
    tokenizer = AutoTokenizer.from_pretrained(str(manifest.tokenizer_path))
    scorers = {}
    for task in manifest.tasks:
        spec = load_task(f"zoo_{task}", {"dataset": {"path": str(manifest.task_path(task))}})
        validation = spec.load_split("fitness")  # the manifest's accuracies are on validation (PROTOCOL.md)
        assert {"id", "prompt", "answer"} <= set(validation.column_names)
        scorers[task] = spec.make_scorer(tokenizer, validation, device="cpu")
    for name in ["base", *manifest.experts]:
        model = AutoModelForCausalLM.from_pretrained(str(manifest.model_path(name)), dtype=torch.float32).eval()
        for task, scorer in scorers.items():
            assert float(np.mean(scorer(model))) == manifest.accuracy[name][task], (name, task)


def test_example_config_resolves_against_its_own_folder():
    config, root = load_calibration_config(REPO / "fitness" / "examples" / "zoo_small_calibration.yaml")
    assert root == REPO / "fitness" / "examples"
    assert (root / config.models.base).resolve() == REPO / "zoo" / "small" / "models" / "base"
    assert [Path(e).name for e in config.models.experts] == ["addition", "reversal", "sorting"]
    for entry in config.tasks:
        task = load_task(entry.preset)
        assert task.prompt == "{prompt}" and task.scorer == "exact_match" and task.id_field == "id"
        assert (root / entry.dataset["path"]).resolve() == REPO / "zoo" / "small" / "tasks" / entry.preset[4:]
        assert Path(task.dataset["path"]) == Path.cwd() / "zoo" / "small" / "tasks" / entry.preset[4:]


def test_the_demo_recalibrates_when_the_preset_no_longer_describes_the_saved_fitness(calibrated):
    """`calibrate.preset_mismatches`: a saved fitness is stale when the preset asks for another estimator,
    subset method or subset size (a changed default must not keep an old fitness), and not otherwise."""
    from types import SimpleNamespace

    from evomerge.fitness.calibrate import preset_mismatches

    _, tasks, path = calibrated
    fitness = CompressedFitness.load(path)

    def preset(estimator=fitness.estimator, method=DEFAULT_SUBSET_METHOD, n=N_SUBSET):
        return preset_mismatches(fitness, SimpleNamespace(estimator=estimator, subset=SimpleNamespace(method=method, n=n)))

    assert preset() == []
    other = [m for m in ("random", "anchors") if m != DEFAULT_SUBSET_METHOD][0]
    assert preset(method=other) == [f"{t.name}: subset {DEFAULT_SUBSET_METHOD} n={N_SUBSET}, the preset's {other} "
                                    f"n={N_SUBSET}" for t in tasks]
    assert len(preset(n=N_SUBSET + 1)) == len(tasks)
    assert preset(estimator="p-IRT") == [f"estimator {fitness.estimator}, the preset's p-IRT"]
