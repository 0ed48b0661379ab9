"""A subset as large as the fitness split (issue 16, "Bad input"): n = N items per task is the natural way
to ask for an exact fitness. It used to crash calibration (`cannot reshape array of size 0 into shape
(0,newaxis)` in p-IRT's extrapolation over no unseen items; `anchors` could not form N clusters when
items share IRT parameters). Now every subset method keeps the whole split with weights 1/N and every
estimator is exact; n > N is an error naming `subset.n`."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from evomerge.fitness.calibrate import calibrate, calibrate_from_config
from evomerge.fitness.compressed import CompressedFitness, FitnessError
from evomerge.fitness.estimators import ESTIMATORS
from evomerge.fitness.sealed import sealed_test
from evomerge.fitness.subsets import select_items
from evomerge.fitness.tasks import TaskSpec
from evomerge.testing import choice_task_preset, llama_config, make_choice_task, make_family

N = 24


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("whole_split")
    base, experts = make_family(root / "fam", n_experts=2, seed=5, delta_scale=0.5, config=llama_config(layers=2))
    task_dir = make_choice_task(root / "tasks" / "sums", n_validation=N, n_test=8, seed=3)
    return root, base, experts, task_dir


@pytest.mark.parametrize("method", ["random", "anchors", "informative"])
def test_subset_of_the_whole_split_is_every_item_at_weight_one_over_n(method):
    rng = np.random.default_rng(0)
    responses = (rng.random((12, 10)) < 0.5).astype(float)
    responses[:, :4] = 1.0  # items with identical columns (and IRT parameters): anchors could not cluster them apart
    from evomerge.fitness.irt import fit_irt

    params = fit_irt(responses, "2pl-jmap", dims=1, seed=0)
    subset = select_items(10, method, seed=0, responses=responses, item_params=params)
    assert subset.items.tolist() == list(range(10)) and np.allclose(subset.weights, 0.1) and subset.method == method


@pytest.mark.parametrize("method", ["random", "anchors"])
def test_calibration_with_n_equal_to_the_split_is_exact(family, tmp_path, method):
    root, base, experts, task_dir = family
    task = TaskSpec.from_dict(choice_task_preset(task_dir, "sums"))
    with sealed_test("calibrating"):
        out = calibrate([task], str(base), [str(e) for e in experts], tmp_path / method, name="exact", random_merges=6,
                        n=N, subset_method=method, echo=lambda *a: None)
        fitness = CompressedFitness.load(out)
    responses = np.load(out / "responses.npz")["task_sums"]  # (models, N): the full split, in split order
    assert fitness.task("sums").item_ids == task.item_ids(task.load_split("fitness"))  # every item, in order
    for row in responses:
        truth = row.mean()
        for name in ESTIMATORS:
            estimate = fitness.estimate("sums", row, name)
            assert estimate.value == pytest.approx(truth, abs=1e-12), name  # estimated accuracy == true accuracy
            assert estimate.stderr == pytest.approx(0.0, abs=1e-12), name  # nothing left unseen


def test_n_larger_than_the_split_is_an_error_naming_the_field(family, tmp_path):
    root, base, experts, task_dir = family
    (tmp_path / "sums.yaml").write_text(yaml.safe_dump(choice_task_preset(task_dir, "sums")))
    config = {"name": "too_many", "models": {"base": str(base), "experts": [str(e) for e in experts]},
              "tasks": [{"preset": "sums.yaml"}], "subset": {"n": N + 1}}
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(FitnessError, match=rf"field `subset.n`: {N + 1} items per task.*'sums'.*{N} items"):
        calibrate_from_config(path, echo=lambda *a: None)
