"""`evomerge score MODEL_DIR --fitness NAME` (`evomerge.fitness.score.score_model`).

On the session's small model family and its compressed fitness (`run_workspace`): a short search,
then exported members scored from disk. `--split subset` must give exactly the answers (and the
estimates) the search logged for that member; `--split fitness` and `--split test` must equal an
independent scorer (`evomerge.testing.hand_scored_accuracy`: one unpadded float64 forward per
choice); a test-split read is recorded, and refused inside a seal.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.errors import CheckpointError, OptionError
from evomerge.fitness.compressed import CompressedFitness
from evomerge.fitness.score import score_model
from evomerge.fitness.sealed import SealedSplitError, SplitRead, recorded_test_reads, sealed_test
from evomerge.runs.run import Run
from evomerge.testing import hand_scored_accuracy, write_run_config

MEMBERS = 3  # exported and scored: the best by mean, and two more of the Pareto set


@pytest.fixture(scope="module")
def exported(run_workspace, tmp_path_factory):
    """(workspace, run, {member id: exported folder}) of a 12-evaluation in-process search."""
    config = write_run_config(run_workspace, "score_check", budget={"evaluations": 12})
    result = CliRunner().invoke(main, ["search", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    run = Run.load(run_workspace / "runs" / "score_check")
    members = run.ranked()[:MEMBERS]
    out = tmp_path_factory.mktemp("exported")
    return run_workspace, run, {m: run.export(m, out / f"m{m}") for m in members}


def test_subset_answers_reproduce_the_logged_evaluation_exactly(exported):
    workspace, run, folders = exported
    assert len(folders) >= 2
    loaded = CompressedFitness.load(workspace / "fitness" / "mc")
    for i, (member, folder) in enumerate(folders.items()):
        record = run.record(member)
        scored = score_model(folder, workspace / "fitness" / "mc" if i == 0 else loaded, split="subset")
        assert scored.responses == record["responses"], member
        assert {t: s.estimate for t, s in scored.tasks.items()} == record["objectives"], member
        assert {t: s.stderr for t, s in scored.tasks.items()} == record["stderr"], member
        for task, score in scored.tasks.items():
            assert score.accuracy == sum(record["responses"][task]) / len(record["responses"][task])
            assert score.n_items == len(score.item_ids) == 8  # the fixture's subset size (n=8)


@pytest.mark.parametrize("split,dataset_split", [("fitness", "validation"), ("test", "test")])
def test_full_split_accuracies_equal_a_hand_scorer(exported, split, dataset_split):
    workspace, run, folders = exported
    member, folder = next(iter(folders.items()))
    with recorded_test_reads() as reads:
        scored = score_model(folder, workspace / "fitness" / "mc", split=split)
    for task in run.tasks:
        assert scored.accuracy[task] == hand_scored_accuracy(folder, workspace / "tasks" / task, dataset_split), task
        assert scored.tasks[task].n_items == 40
    assert scored.mean == sum(scored.accuracy.values()) / len(run.tasks)
    assert reads == ([SplitRead(t, "test", "test") for t in run.tasks] if split == "test" else [])


def test_the_test_split_is_sealed_during_development(exported):
    workspace, _, folders = exported
    folder = next(iter(folders.values()))
    with sealed_test("choosing a merge"), pytest.raises(SealedSplitError, match="sums_a"):
        score_model(folder, workspace / "fitness" / "mc", split="test")
    score_model(folder, workspace / "fitness" / "mc", split="subset")  # the fitness split is not sealed


def test_cli_prints_per_task_accuracy_and_writes_every_answer(exported, tmp_path):
    workspace, run, folders = exported
    member, folder = next(iter(folders.items()))
    json_path = tmp_path / "score.json"
    result = CliRunner().invoke(main, ["score", str(folder), "--fitness", str(workspace / "fitness" / "mc"),
                                       "--split", "subset", "--json", str(json_path), "--quiet"])
    assert result.exit_code == 0, result.output
    record = run.record(member)
    lines = result.output.splitlines()
    for task in run.tasks:
        answers = "".join(map(str, record["responses"][task]))
        line = next(line for line in lines if line.startswith(task))
        assert f"answers {answers}" in line and f"estimate {record['objectives'][task]:.3f}" in line
    assert lines[-1].startswith("mean") and "subset split of mc" in lines[-1]
    written = json.loads(json_path.read_text())
    assert {t: s["answers"] for t, s in written["tasks"].items()} == record["responses"]


def test_bad_input_is_one_clear_line(exported, tmp_path):
    workspace, _, folders = exported
    folder = next(iter(folders.values()))
    fitness = str(workspace / "fitness" / "mc")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty"), "--fitness", fitness], "no config.json; is this a Hugging Face model folder?"),
        ([str(tmp_path / "missing"), "--fitness", fitness], "model folder not found"),
        ([str(folder), "--fitness", "no_such_fitness"], "no compressed fitness 'no_such_fitness'"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["score", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1, result.output
    with pytest.raises(CheckpointError, match="no config.json"):
        score_model(tmp_path / "empty", fitness)
    with pytest.raises(OptionError, match="split: 'validation' is not one of fitness, test, subset"):
        score_model(folder, fitness, split="validation")
