"""The sealed protocol (benchmarks/PROTOCOL.md): the split-read guard, the demo's order, and the
statistics the evidence rules ask for.

* `sealed_test()` refuses a test-split read and names the task and split; every read outside a
  seal is recorded;
* the demo's steps 1-4 (fitness, search, choice, export) read no test split; its final report does;
* `evomerge.stats` against a hand-computed example (a two-valued sample whose bootstrap
  distribution is binomial) and against `scipy.stats.bootstrap`.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from evomerge.fitness.sealed import SealedSplitError, is_sealed, read_log, recorded_test_reads, sealed_test
from evomerge.fitness.tasks import TaskSpec
from evomerge.stats import bootstrap_interval, mean_sd, paired_difference
from evomerge.testing import choice_task_preset, hand_scored_accuracy, make_choice_task


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory) -> TaskSpec:
    path = make_choice_task(tmp_path_factory.mktemp("sealed") / "sums", n_validation=8, n_test=8)
    return TaskSpec.from_dict(choice_task_preset(path, "sums"))


# --------------------------------------------------------------------------- the guard


def test_reading_a_test_split_inside_a_seal_raises_and_names_task_and_split(choice_task):
    with sealed_test("choosing a member"):
        assert is_sealed()
        assert len(choice_task.load_split("fitness")) == 8  # validation stays open
        with pytest.raises(SealedSplitError, match=r"the test split of sums \(split 'test'\) is sealed here "
                                                   r"\(choosing a member\): choose on validation"):
            choice_task.load_split("test")
    assert not is_sealed()


def test_test_split_reads_are_recorded_outside_a_seal(choice_task):
    before = len(read_log())
    with recorded_test_reads() as reads:
        choice_task.load_split("fitness")
        assert reads == []
        assert len(choice_task.load_split("test")) == 8
    assert [(r.task, r.split, r.role) for r in reads] == [("sums", "test", "test")]
    assert read_log()[before:] == reads
    choice_task.load_split("test")
    assert len(reads) == 1  # the recorder stops at the end of its block


def test_a_preset_that_maps_fitness_onto_the_test_split_is_sealed_too(choice_task):
    leaky = TaskSpec.from_dict({**choice_task.to_dict(), "splits": {"fitness": "test", "test": "test"}})
    with sealed_test(), pytest.raises(SealedSplitError, match="sums"):
        leaky.load_split("fitness")


def test_seals_nest_and_an_error_inside_one_still_unseals():
    with sealed_test("outer"):
        with sealed_test("inner"):
            pass
        assert is_sealed()
        with pytest.raises(ZeroDivisionError), sealed_test("raises"):
            1 / 0
        assert is_sealed()
    assert not is_sealed()


def test_the_zoo_build_reads_no_test_split(tiny_zoo):
    """The fixture builds the zoo inside a seal (conftest); its numbers are on validation."""
    assert tiny_zoo.data["evaluation"]["split"] == "validation"
    assert all(set(m) == {"method", "weights", "validation"} | ({"grid"} if n == "best_grid" else set())
               | ({"note"} if n == "averaging" else set()) for n, m in tiny_zoo.reference_merges.items())


# --------------------------------------------------------------------------- the demo


def merged_on_disk(workspace: Path, out: Path, method: str, weights, density=None) -> Path:
    """A baseline written by the streaming `merge` engine from a mergekit YAML (not the demo's
    in-memory materializer), so the test's numbers come by another path."""
    from evomerge.merge.engine import merge_recipe

    parameters = [{"weight": float(w), **({"density": density} if density is not None else {})} for w in weights]
    experts = [{"model": str(workspace / "fam" / f"expert_{i}"), "parameters": p} for i, p in enumerate(parameters)]
    if method == "linear":  # a weighted mean of the experts (normalised: mergekit's default)
        recipe = {"merge_method": method, "dtype": "float32", "models": experts}
    else:
        recipe = {"merge_method": method, "base_model": str(workspace / "fam" / "base"), "dtype": "float32",
                  "models": [{"model": str(workspace / "fam" / "base")}] + experts}
    return merge_recipe(recipe, out).out_dir


def test_demo_reads_test_only_in_its_final_report_and_its_verdicts_are_right(run_workspace, tmp_path, capsys):
    """The demo's steps 1-4 read no test split, its report does; the report's last block ("beats X by
    +N.N points" / "does not beat X (-N.N)") equals differences computed here from models written
    to disk by the streaming engine (or exported) and scored by hand."""
    import re

    from evomerge.demo import DemoPaths, develop, report
    from evomerge.testing import write_run_config

    config = write_run_config(run_workspace, "demo_protocol", budget={"evaluations": 12})
    paths = DemoPaths(calibration=tmp_path / "never_needed.yaml", fitness=run_workspace / "fitness" / "mc",
                      run_config=config, export=tmp_path / "export", zoo_dir=None)
    with recorded_test_reads() as reads:
        run, member, corner = develop(paths)  # sealed: a test read in steps 1-4 would raise
        assert reads == []
        assert not is_sealed()
        assert (paths.export / "recipe.yaml").is_file()
        assert set(run.verified()) == {"fitness"}  # the choice scored finalists on the fitness split only
        text = report(run, member, corner)
    assert {r.task for r in reads} == {"sums_a", "sums_b"} and {r.role for r in reads} == {"test"}
    assert set(run.verified()) == {"fitness", "test"}
    assert set(run.verified()["test"]) == {str(i) for i in run.pareto.index}  # all verified, a few printed
    out = capsys.readouterr().out
    assert out.index("4/6 choose") < out.index("5/6 verify") < out.index("6/6")

    tasks = ["sums_a", "sums_b"]
    task_dirs = [run_workspace / "tasks" / t for t in tasks]

    def score(model_dir: Path, split: str) -> list[float]:
        return [hand_scored_accuracy(model_dir, d, split) for d in task_dirs]

    # the best corner, chosen on validation: the highest mean (then worst task) of base, each expert, both
    corners = [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    validation = {c: score(merged_on_disk(run_workspace, tmp_path / f"corner{c}", "task_arithmetic", c), "validation")
                  for c in corners}
    best = max(validation.values(), key=lambda v: (np.mean(v), min(v)))
    assert validation[tuple(corner)] == best

    fam = run_workspace / "fam"
    models = {"base": fam / "base", "expert: expert_0": fam / "expert_0", "expert: expert_1": fam / "expert_1",
              "uniform task arithmetic (w=1)": merged_on_disk(run_workspace, tmp_path / "uniform", "task_arithmetic", [1, 1]),
              "averaging (w=1/K)": merged_on_disk(run_workspace, tmp_path / "average", "linear", [1, 1]),
              "TIES (w=1, density 0.5)": merged_on_disk(run_workspace, tmp_path / "ties", "ties", [1, 1], density=0.5)}
    taken = "+".join(f"expert_{i}" for i, w in enumerate(corner) if w) or "base"
    models[f"best corner on validation ({taken})"] = merged_on_disk(run_workspace, tmp_path / "corner", "task_arithmetic",
                                                                      corner)
    test = {label: score(path, "test") for label, path in models.items()}
    chosen = score(run.export(member, tmp_path / "member"), "test")
    expected = []
    for label, scores in test.items():
        diff = 100 * (np.mean(chosen) - np.mean(scores))
        expected.append(f"beats {label} by {diff:+.1f} points (test mean)" if diff > 0
                        else f"does not beat {label} ({diff:+.1f})")
    lines = text.splitlines()
    verdicts = lines[lines.index(f"evomerge member {member}, chosen on validation, on the full test split:") + 1:]
    assert [line.strip() for line in verdicts] == expected
    # the table's rows (per task, mean, worst) agree with the hand-scored numbers too
    table = text.split("\n\n")[0].splitlines()[2:]  # below the header and its rule
    rows = {re.split(r"\s{2,}", line)[0]: line.split()[-4:] for line in table}
    assert len(rows) == len(test) + 1
    for label, scores in {**test, f"evomerge member {member}": chosen}.items():
        assert rows[label] == [f"{v:.3f}" for v in [*scores, np.mean(scores), min(scores)]], label
    shutil.rmtree(run.path)


def test_fitness_estimation_checks_the_manifest_on_validation_under_a_seal(tiny_zoo):
    from benchmark_modules import load_benchmark

    module = load_benchmark("fitness_estimation")
    with sealed_test("fitness_estimation"):
        manifest, tasks = module.zoo_tasks(tiny_zoo.root)
        assert module.manifest_accuracy_gaps(manifest, tasks) == []


# --------------------------------------------------------------------------- statistics


def test_mean_sd_uses_ddof_1():
    summary = mean_sd([2, 4, 4, 4, 5, 5, 7, 9])  # sum of squares about the mean 5 is 32
    assert summary.mean == 5.0 and summary.n == 8
    assert summary.sd == pytest.approx(math.sqrt(32 / 7), rel=1e-12)  # not sqrt(32 / 8) = 2
    assert math.isnan(mean_sd([3.0]).sd)
    assert mean_sd([0.71, 0.75]).format(scale=100) == "73.0 (2.8)"


def test_paired_interval_equals_the_hand_computed_binomial_percentiles():
    """Differences: five 1s and five 0s. A bootstrap resample's mean is K / 10 with K ~ Binomial(10, 1/2):
    P(K <= 1) = 11/1024 = 1.1%, P(K <= 2) = 56/1024 = 5.5% -> the 2.5th percentile is 0.2; by symmetry,
    the 97.5th is 0.8. With 10,000 resamples the 2.5% point (order statistic 250) lies ~14 standard
    errors inside the K = 2 block, so the Monte Carlo answer is the exact one."""
    from math import comb

    cdf = np.cumsum([comb(10, k) for k in range(11)]) / 2 ** 10
    assert cdf[1] < 0.025 < cdf[2] and cdf[7] < 0.975 < cdf[8]  # the hand computation, checked
    a = np.array([1, 1, 1, 1, 1, 0.7, 0.4, 0.9, 0.2, 0.5])
    b = a - np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])  # paired: a - b is five 1s and five 0s
    d = paired_difference(a, b, seed=3)
    assert (d.mean, d.n, d.method, d.resamples, d.confidence) == (0.5, 10, "percentile", 10_000, 0.95)
    assert d.sd == pytest.approx(math.sqrt(10 * 0.25 / 9), rel=1e-12)
    assert (d.low, d.high) == pytest.approx((0.2, 0.8), abs=1e-12)
    assert d.excludes_zero and d.format(scale=100) == "+50.0 [+20.0, +80.0]"
    assert paired_difference(a, b, seed=3) == d  # seeded: the same interval every time


def test_paired_interval_agrees_with_scipy_bootstrap():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(11)
    b = rng.uniform(0.6, 0.8, 12)
    a = b + rng.normal(0.02, 0.03, 12)
    ours = paired_difference(a, b, seed=0)
    theirs = bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                       method="percentile", confidence_level=0.95, n_resamples=100_000,
                       random_state=np.random.default_rng(1)).confidence_interval
    se = np.std(a - b, ddof=1) / math.sqrt(len(a))
    # Monte Carlo error of a 2.5% percentile from 10,000 resamples is about 0.03 standard errors
    assert ours.low == pytest.approx(theirs.low, abs=0.15 * se)
    assert ours.high == pytest.approx(theirs.high, abs=0.15 * se)
    assert ours.low < ours.mean < ours.high


def test_bootstrap_interval_takes_any_reduction_and_refuses_bad_input():
    values = np.arange(20.0)
    low, high = bootstrap_interval(values, np.median, seed=1)
    assert low < np.median(values) < high
    with pytest.raises(ValueError, match="pair up"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        mean_sd([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(values, confidence=95)
