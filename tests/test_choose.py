"""How a member is chosen (`ChoiceRule`: `Run.choose`, `Run.best_balanced`, `evomerge export --choose-by`,
the marker of `evomerge pareto --choose-by`): mean (the default, the worst task breaking ties), worst
(the mean breaking ties), or weights per task (normalised, the worst task breaking ties).

The expected members are worked out by hand from a Pareto set whose numbers are written here:
binary fractions, so that means and weighted means are exact and ties are real ties.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.errors import OptionError
from evomerge.runs.run import ChoiceRule, Run

TASKS = ["sums_a", "sums_b"]
#       sums_a   sums_b     mean       worst    weighted 3:1 (.75/.25)
FRONT = {
    1: (0.875, 0.5),      # 0.6875     0.5      0.78125
    2: (0.6875, 0.6875),  # 0.6875     0.6875   0.6875
    3: (0.625, 0.71875),  # 0.671875   0.625    0.6484375
    4: (0.9375, 0.375),   # 0.65625    0.375    0.796875
}
# By hand: mean ties 1 and 2 at 0.6875, the worst task (0.6875 > 0.5) puts 2 first; worst: 2, 3, 1, 4;
# 3:1 weights: 4 (0.796875), 1 (0.78125), 2, 3; "0,1" (sums_b alone): 3, 2, 1, 4; "1,1" = mean but
# computed as a weighted mean: the same order as mean.
EXPECTED_ORDER = {
    "mean": [2, 1, 3, 4],
    "worst": [2, 3, 1, 4],
    "3,1": [4, 1, 2, 3],
    "0,1": [3, 2, 1, 4],
    "1,1": [2, 1, 3, 4],
}


def front_frame() -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(FRONT, orient="index", columns=TASKS)
    return frame.assign(mean=frame.mean(axis=1))


@pytest.mark.parametrize("by", list(EXPECTED_ORDER))
def test_each_rule_ranks_the_hand_worked_front(by):
    assert ChoiceRule.parse(by, TASKS).ranked(front_frame()) == EXPECTED_ORDER[by]


def test_weights_are_normalised_and_accept_text_or_numbers():
    assert ChoiceRule.parse("3,1", TASKS).weights == (0.75, 0.25)
    assert ChoiceRule.parse([6, 2], TASKS) == ChoiceRule.parse(" 3, 1 ", TASKS)
    assert ChoiceRule.parse("WORST", TASKS).by == "worst"
    assert "sums_a 0.75, sums_b 0.25" in ChoiceRule.parse("3,1", TASKS).describe()


@pytest.mark.parametrize("by", ["best", "1,2,3", "1", "0,0", "-1,2", "nan,1", "inf,1", "1,,2", ""])
def test_a_bad_rule_is_an_option_error_naming_the_tasks(by):
    with pytest.raises(OptionError, match=r"^by: expected mean, worst or 2 non-negative weights .*\(sums_a,sums_b\)"):
        ChoiceRule.parse(by, TASKS)


# --------------------------------------------------------------------------- on a run


@pytest.fixture(scope="module")
def front_run(run_workspace) -> tuple[Run, dict[int, int]]:
    """A small real run whose pareto.json is replaced by FRONT on four of its candidates:
    {FRONT key: candidate id}. The candidates stay real (genomes, recipes), so export works."""
    from evomerge.runs.search import start_search
    from evomerge.testing import write_run_config

    config = write_run_config(run_workspace, "choose_rules", budget={"evaluations": 12})
    run_dir = start_search(config, progress=False, echo=lambda *a: None)
    run = Run.load(run_dir)
    ok = [int(i) for i in run.evaluations.query("status == 'ok'").index]
    ids = dict(zip(FRONT, ok[-4:]))
    data = run.store.read_pareto()
    data["members"] = [{"id": ids[key], "generation": 0, "mean": float(np.mean(values)), "crowding": None,
                        "objectives": dict(zip(TASKS, values))} for key, values in FRONT.items()]
    run.store.write_pareto(data)
    return Run.load(run_dir), ids


@pytest.mark.parametrize("by", list(EXPECTED_ORDER))
def test_best_balanced_takes_the_hand_worked_member(front_run, by):
    run, ids = front_run
    assert run.best_balanced(by) == ids[EXPECTED_ORDER[by][0]]
    assert run.ranked(by) == [ids[key] for key in EXPECTED_ORDER[by]]


def test_the_default_is_the_mean_with_the_worst_task_breaking_ties(front_run):
    run, ids = front_run
    assert run.best_balanced() == ids[2]  # member 1 has the same mean and a worse worst task


@pytest.mark.parametrize("by", ["mean", "worst", "3,1"])
def test_choose_shortlists_by_the_rule_and_picks_by_it_on_the_fitness_split(front_run, by):
    run, ids = front_run
    chosen = run.choose(2, by=by, echo=lambda *a: None)
    shortlist = [ids[key] for key in EXPECTED_ORDER[by][:2]]
    scores = {i: [run.verified()["fitness"][str(i)][t] for t in TASKS] for i in shortlist}
    # the same rule, by hand, on the whole fitness split (ties keep the shortlist's order)
    def key(i):
        (a, b), rank = scores[i], shortlist.index(i)
        mean, worst = (a + b) / 2, min(a, b)
        if by == "worst":
            return worst, mean, -rank
        return (mean if by == "mean" else 0.75 * a + 0.25 * b), worst, -rank

    assert chosen == max(shortlist, key=key)


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.output.strip()
    assert "\n" not in message and message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("by", ["worst", "3,1", "0,1"])
def test_pareto_marks_and_export_takes_the_member_of_the_rule(front_run, tmp_path, by):
    run, ids = front_run
    expected = ids[EXPECTED_ORDER[by][0]]
    result = CliRunner().invoke(main, ["pareto", str(run.path), "--choose-by", by])
    assert result.exit_code == 0, result.output
    marked = [int(line.split()[0]) for line in result.output.splitlines() if line[:1].isdigit() and "*" in line]
    assert marked == [expected]
    assert f"* member {expected}: what `evomerge export --choose-by {by}` takes" in result.output
    assert ChoiceRule.parse(by, TASKS).describe() in result.output
    result = CliRunner().invoke(main, ["export", str(run.path), "--choose-by", by, "--out", str(tmp_path / "m"),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"exported member {expected} " in result.output
    assert (tmp_path / "m" / "recipe.yaml").read_text() == run.recipe_yaml(expected)


@pytest.mark.parametrize("command", ["pareto", "export"])
@pytest.mark.parametrize("by", ["best", "1,2,3", "0,0"])
def test_a_bad_choose_by_is_one_line_naming_the_flag(front_run, tmp_path, command, by):
    run, _ = front_run
    extra = ["--out", str(tmp_path / "never"), "--finalists", "2"] if command == "export" else []
    result = CliRunner().invoke(main, [command, str(run.path), "--choose-by", by, *extra])
    _one_line_error(result, "--choose-by: expected mean, worst or 2 non-negative weights", "sums_a,sums_b")
    assert not (tmp_path / "never").exists()


def test_export_refuses_member_with_choose_by(front_run, tmp_path):
    run, ids = front_run
    result = CliRunner().invoke(main, ["export", str(run.path), "--member", str(ids[1]), "--choose-by", "worst",
                                       "--out", str(tmp_path / "m")])
    _one_line_error(result, "--member or --choose-by")
