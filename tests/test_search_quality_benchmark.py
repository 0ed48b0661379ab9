"""benchmarks/search_quality.py zoo, its pure parts (benchmarks/search_quality_table.py): matched
item budgets worked by hand, paired comparisons against `evomerge.stats`, the budget rule, and the
RESULTS.md block generated from per-seed records (no model, no split: fast)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_modules import load_benchmark

from evomerge.stats import paired_difference

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


_load = load_benchmark


sq = _load("search_quality_table")

# The small zoo: 3 experts, 3 tasks x 1,000 validation items, 4 + 10 calibration models, 20 items per task.
SMALL = sq.ItemCosts(experts=3, tasks=3, validation_items=3000, smallest_validation_split=1000,
                     calibration=14 * 3000, items_per_candidate=60)
# The medium zoo: 6 experts, 6 tasks x 1,000 validation items, 7 + 10 calibration models.
MEDIUM = sq.ItemCosts(experts=6, tasks=6, validation_items=6000, smallest_validation_split=1000,
                      calibration=17 * 6000, items_per_candidate=120)


# ------------------------------------------------------------------------------- budgets
def test_search_total_counts_calibration_search_and_finalists():
    # 42,000 + 150 x 60 + 5 x 3,000 (the small zoo's table before issue 14: 66,000)
    assert sq.search_total(42_000, 150, 60, 5, 3000) == 66_000


def test_candidates_to_reach_rounds_up_and_within_rounds_down():
    assert sq.candidates_to_reach(66_000, 12_000, 60) == 900  # exact
    assert sq.candidates_to_reach(66_001, 12_000, 60) == 901  # one item more needs a whole candidate
    assert sq.candidates_within(66_001, 12_000, 60) == 900
    assert sq.candidates_within(10_000, 12_000, 60) == 0
    assert sq.candidates_to_reach(10_000, 12_000, 60) == 1  # at least one candidate
    with pytest.raises(ValueError):
        sq.candidates_to_reach(1, 0, 0)


def test_items_to_reach_caps_at_the_split_and_adds_candidates():
    assert sq.items_to_reach(66_000, 150, 3, 1000) == (147, 150)  # ceil(66,000 / 450) = 147
    # 16 candidates would need 1,208 items per task: capped at 1,000, then ceil(57,960 / 3,000) = 20 candidates
    assert sq.items_to_reach(57_960, 16, 3, 1000) == (1000, 20)


def test_plan_matches_each_baseline_by_hand_on_the_small_zoo():
    plan = sq.plan_budgets(SMALL, budget=150, finalists=5)
    assert plan.search == {"candidates": 150, "items_per_task": 20, "finalists": 5, "calibration": 42_000,
                           "total": 66_000}
    # (c) no calibration, no finalists: 150 candidates x 3 tasks x 147 items = 66,150 >= 66,000
    assert plan.mergekit["items_per_task"] == 147 and plan.mergekit["candidates"] == 150
    assert plan.mergekit["total"] == 66_150
    # (d) endpoints (4 x 3,000 = 12,000) + 900 candidates x 60 items = 66,000
    assert plan.mergenetic["calibration"] == 12_000 and plan.mergenetic["candidates"] == 900
    assert plan.mergenetic["total"] == 66_000
    # (a) 2^3 x 3,000 = 24,000 < 66,000: the search spends more, and even calibration alone does
    assert plan.corners["total"] == 24_000
    assert len(plan.notes) == 1 and "calibration alone exceeds" in plan.notes[0]


def test_plan_on_the_medium_zoo_keeps_the_search_within_the_corners():
    plan = sq.plan_budgets(MEDIUM, budget=120, finalists=5)
    assert plan.search["total"] == 102_000 + 120 * 120 + 5 * 6000 == 146_400
    assert plan.corners["total"] == 64 * 6000 == 384_000
    assert plan.notes == []
    assert plan.mergenetic["candidates"] == -(-(146_400 - 42_000) // 120) == 870
    for baseline in (plan.mergekit, plan.mergenetic):  # never less than the search (rounded up)
        assert plan.search["total"] <= baseline["total"] < plan.search["total"] + 6 * 1000 * baseline["candidates"]


def test_study_rows_label_seeding_and_share_the_search_budget():
    plan = sq.plan_budgets(SMALL, budget=16, finalists=5)
    rows = sq.study_rows(["random", "map"], [False, True], plan, per_layer_space="L", task_level_space="G",
                         mergekit_space="M", mergenetic_space="N", experts=["a", "b", "c"])
    keys = [r.key for r in rows]
    assert keys[:8] == ["layer-random-unseeded", "layer-random-seeded", "layer-map-unseeded", "layer-map-seeded",
                        "global-random-unseeded", "global-random-seeded", "global-map-unseeded", "global-map-seeded"]
    assert {"mergekit-evolve", "mergenetic", "corners", "fixed-uniform", "fixed-ties", "fixed-averaging",
            "fixed-base", "fixed-expert-a", "fixed-expert-c"} <= set(keys)
    by_key = {r.key: r for r in rows}
    assert by_key["layer-map-seeded"].seeded and "seeded" in by_key["layer-map-seeded"].label
    assert by_key["global-map-seeded"].candidates == by_key["layer-map-seeded"].candidates == 16
    assert by_key["mergekit-evolve"].estimator == "subset" and by_key["mergekit-evolve"].optimizer == "cma"
    assert by_key["mergenetic"].optimizer == "ga" and by_key["mergenetic"].items_per_task == 20
    assert by_key["fixed-expert-b"].recipe["params"]["weight"] == [0.0, 1.0, 0.0]
    only = sq.study_rows(["random"], [False], plan, per_layer_space="L", task_level_space="G", mergekit_space="M",
                         mergenetic_space="N", experts=["a"], baselines=False)
    assert [r.key for r in only] == ["layer-random-unseeded"]


def test_item_evaluations_total_is_the_sum_of_the_parts():
    assert sq.item_evaluations(calibration=42_000, search=960, finalists=15_000) == {
        "calibration": 42_000, "search": 960, "finalists": 15_000, "full_split": 0, "total": 57_960}


# ------------------------------------------------------------------------------- records and comparisons
def test_test_summary_chosen_worst_and_hypervolume_by_hand():
    test = {"1": {"x": 0.8, "y": 0.4}, "2": {"x": 0.5, "y": 0.6}}
    s = sq.test_summary(test, [1, 2], 2, ["x", "y"])
    assert s["chosen_mean"] == pytest.approx(0.55) and s["chosen_worst"] == pytest.approx(0.5)
    # union of [0, 0.8] x [0, 0.4] and [0, 0.5] x [0, 0.6]: 0.32 + 0.30 - 0.20
    assert s["hv"] == pytest.approx(0.42)
    assert s["best_mean"] == pytest.approx(0.6) and s["pareto_size"] == 2


def record(row: str, seed, mean: float, hv: float, total: int) -> dict:
    return {"row": row, "seed": seed, "item_evaluations": sq.item_evaluations(search=total),
            "test": {"chosen_mean": mean, "chosen_worst": mean - 0.1, "hv": hv, "pareto_size": 3}}


def test_compare_pairs_seeds_and_matches_evomerge_stats():
    a = [0.80, 0.82, 0.79, 0.85]
    b = [0.78, 0.80, 0.80, 0.81]
    rows = sq.by_row([record("A", s, m, 0.5, 100) for s, m in enumerate(a)]
                     + [record("B", s, m, 0.4, 100) for s, m in reversed(list(enumerate(b)))])  # order does not matter
    c = sq.compare(rows, "A", "B", "chosen_mean")
    assert c.matched and c.difference == paired_difference(a, b)
    assert c.cell() == paired_difference(a, b).format(100, 1)


def test_compare_broadcasts_a_deterministic_baseline_and_applies_the_budget_rule():
    a = [0.80, 0.82, 0.79]
    rows = sq.by_row([record("A", s, m, 0.5, 66_000) for s, m in enumerate(a)]
                     + [record("corners", None, 0.78, 0.4, 24_000), record("cheap", None, 0.70, 0.3, 70_000),
                        record("fixed-uniform", None, 0.74, 0.3, 0)])
    spent_more = sq.compare(rows, "A", "corners", "chosen_mean")
    assert not spent_more.matched and spent_more.difference is None
    assert spent_more.cell() == "n/a: spent more (66,000 > 24,000)"
    ok = sq.compare(rows, "A", "cheap", "hv")
    assert ok.difference == paired_difference([0.5] * 3, [0.3] * 3)
    fixed = sq.compare(rows, "A", "fixed-uniform", "chosen_mean", fixed_recipe=True)
    assert fixed.difference == paired_difference(a, [0.74] * 3) and fixed.cell().endswith(" ‡")
    assert not ok.cell().endswith("‡")
    assert sq.compare(rows, "A", "missing", "hv").cell() == "no records"


def test_compare_uses_only_common_seeds():
    rows = sq.by_row([record("A", s, 0.8 + s / 100, 0.5, 1) for s in range(4)]
                     + [record("B", s, 0.7, 0.4, 1) for s in (1, 3)])
    c = sq.compare(rows, "A", "B", "chosen_mean")
    assert c.difference.n == 2 and c.difference.mean == pytest.approx(np.mean([0.11, 0.13]))


# ------------------------------------------------------------------------------- the generated block
def small_study(seeds: int = 3):
    plan = sq.plan_budgets(SMALL, budget=16, finalists=5)
    rows = sq.study_rows(["random", "map"], [False, True], plan, per_layer_space="L", task_level_space="G",
                         mergekit_space="M", mergenetic_space="N", experts=["a", "b", "c"])
    rng = np.random.default_rng(0)
    records = []
    for row in rows:
        if row.deterministic:
            total = 24_000 if row.key == "corners" else 0
            records.append(record(row.key, None, 0.75, 0.35, total))
            continue
        total = plan.search["total"] if row.family in ("per-layer", "task-level") else plan.mergenetic["total"]
        bonus = 0.05 if row.optimizer == "map" and row.family == "per-layer" else 0.0
        for seed in range(seeds):
            records.append(record(row.key, seed, 0.76 + bonus + 0.01 * rng.random(), 0.40 + bonus + 0.01 * rng.random(),
                                  total))
    study = {"zoo_size": "small", "zoo_hash": "0123456789abcdef", "seeds": seeds, "warm_start": 8,
             "command": "python benchmarks/search_quality.py zoo --seeds 3", "plan": plan.to_json(),
             "costs": vars(SMALL) | {"endpoint_calibration": SMALL.endpoint_calibration, "corners": SMALL.corners}}
    return rows, records, study


def test_report_is_generated_from_the_records():
    rows, records, study = small_study()
    markdown, comparisons = sq.report(rows, records, study)
    assert markdown.startswith("### Search quality on the small zoo (`0123456789ab`, 16 candidates per searched row, 3 seeds)")
    assert "`python benchmarks/search_quality.py zoo --seeds 3`" in markdown
    line = next(l for l in markdown.splitlines() if l.startswith("| per-layer map, seeded |"))
    assert line.split(" | ")[1:3] == ["3", "16"]
    # the corners spend 24,000 < 57,960: no comparison, both totals shown
    assert "n/a: spent more (57,960 > 24,000)" in markdown
    # task-level rows are compared with the same optimizer and seeding
    same = [c for c in comparisons if c.row == "layer-map-seeded" and c.baseline == "global-map-seeded"]
    assert len(same) == 2 and all(c.matched for c in same)
    targets = [l for l in markdown.splitlines() if l.startswith("* map vs random")]
    assert len(targets) == 2 and all("**PASS**" in l for l in targets)
    m2n2 = [l for l in markdown.splitlines() if l.startswith("* m2n2")]
    assert m2n2 == []  # no M2N2 rows in this study


def test_a_study_extended_with_more_seeds_says_so_and_lists_every_command():
    rows, records, study = small_study(seeds=5)
    # the per-layer rows got seeds 3-4 from a second command; the others kept seeds 0-2
    records = [r for r in records if r["seed"] is None or r["seed"] < 3 or r["row"].startswith("layer-")]
    study = dict(study, commands=["python benchmarks/search_quality.py zoo --seeds 3",
                                  "python benchmarks/search_quality.py zoo --seeds 5 --skip-baselines"])
    markdown, _ = sq.report(rows, records, study)
    assert markdown.startswith("### Search quality on the small zoo (`0123456789ab`, 16 candidates per searched row, "
                               "3-5 seeds per row (column *seeds*))")
    assert markdown.splitlines()[2:4] == ["`python benchmarks/search_quality.py zoo --seeds 3`  ",
                                          "`python benchmarks/search_quality.py zoo --seeds 5 --skip-baselines`"]
    seeds = {}  # the rows table comes first; the comparison tables repeat the row labels
    for line in markdown.splitlines():
        if line.startswith(("| per-layer ", "| task-level ")):
            seeds.setdefault(line.split(" | ")[0], line.split(" | ")[1])
    assert seeds["| per-layer map, seeded"] == "5" and seeds["| task-level map, seeded"] == "3"


def test_report_ignores_records_without_the_final_step_and_is_deterministic():
    rows, records, study = small_study()
    unfinished = [dict(r, test=None) if r["row"] == "layer-random-seeded" else r for r in records]
    markdown, _ = sq.report(rows, unfinished, study)
    assert "| per-layer random, seeded |" not in markdown
    assert sq.report(rows, records, study)[0] == sq.report(rows, list(reversed(records)), study)[0]


def test_record_section_replaces_only_its_block(tmp_path):
    sq_main = _load("search_quality")
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n<!-- search_quality:zoo:begin -->\nold\n<!-- search_quality:zoo:end -->\n\nafter\n")
    sq_main.record_section("search_quality:zoo", "new table\n", path)
    assert path.read_text() == ("# R\n\n<!-- search_quality:zoo:begin -->\nnew table\n<!-- search_quality:zoo:end -->"
                                "\n\nafter\n")


def test_the_final_step_caps_a_pareto_set_at_the_chosen_member_and_the_best_by_fitness():
    import pandas as pd

    sys.path.insert(0, str(BENCHMARKS))
    search_quality = _load("search_quality")
    record = {"pareto_ids": [3, 7, 9, 12, 20], "chosen_id": 12}
    fitness_mean = pd.Series({3: 0.50, 7: 0.80, 9: 0.70, 12: 0.10, 20: 0.80})
    # chosen first, then by fitness mean, ties in Pareto order (7 before 20)
    assert search_quality._members_to_test(record, fitness_mean, 3) == [12, 7, 20]
    assert search_quality._members_to_test(record, fitness_mean, 0) == [3, 7, 9, 12, 20]
    assert search_quality._members_to_test(record, fitness_mean, 5) == [3, 7, 9, 12, 20]


def test_levers_compare_chosen_validation_means_paired_by_seed(tmp_path):
    levers = _load("search_levers")

    def write(folder, row, seed, per_task, total=100):
        path = tmp_path / folder / row / f"seed{seed:02d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seed": seed, "chosen_validation": per_task,
                                    "item_evaluations": {"total": total}, "test": {"never": "read"}}))

    for seed, (a, b) in enumerate([((0.5, 0.7), (0.6, 0.7)), ((0.4, 0.8), (0.5, 0.9)), ((0.6, 0.6), (0.6, 0.8))]):
        write("ref", "layer-map-seeded", seed, {"x": a[0], "y": a[1]})
        write("lever", "layer-map-seeded", seed, {"x": b[0], "y": b[1]}, total=120)
    write("lever", "layer-map-seeded", 7, {"x": 1.0, "y": 1.0})  # no partner: not paired
    corners = tmp_path / "ref" / "corners" / "deterministic.json"
    corners.parent.mkdir(parents=True)
    corners.write_text(json.dumps({"weights": [[0, 0], [1, 0]], "chosen_id": 1, "item_evaluations": {"total": 500},
                                   "validation": [{"x": 0.1, "y": 0.1}, {"x": 0.6, "y": 0.7}]}))
    result = levers.compare([levers.arm_records(f"ref={tmp_path / 'ref'}:layer-map-seeded"),
                             levers.arm_records(f"lever={tmp_path / 'lever'}:layer-map-seeded")],
                            levers.corners_validation(tmp_path / "ref"))
    ref, lever = result["arms"]
    assert ref["validation_mean"]["mean"] == pytest.approx(np.mean([0.6, 0.6, 0.6]))
    # hand: per-seed mean differences 0.05, 0.10, 0.10; worst-task differences 0.1, 0.1, 0.0
    assert lever["vs_reference_mean"]["mean"] == pytest.approx(0.25 / 3)
    expected = paired_difference([0.65, 0.7, 0.7], [0.6, 0.6, 0.6]).to_json()
    assert lever["vs_reference_mean"] == pytest.approx(expected)  # the same function, differences in float order
    assert lever["vs_reference_worst"]["mean"] == pytest.approx(0.2 / 3)
    assert lever["item_evaluations"] == 120 and result["corners"]["mean"] == pytest.approx(0.65)
    assert "| lever | 4 |" in levers.markdown(result, "cmd")


def test_levers_on_test_pair_every_seed_with_a_deterministic_baseline_reference_minus_arm(tmp_path):
    levers = _load("search_levers")
    for seed, mean in enumerate([0.70, 0.74, 0.72]):
        path = tmp_path / "study" / "layer-map-seeded" / f"seed{seed:02d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seed": seed, "item_evaluations": {"total": 10},
                                    "test": {"chosen_mean": mean, "chosen_worst": 0.5}}))
    corners = tmp_path / "study" / "corners" / "deterministic.json"
    corners.parent.mkdir(parents=True)
    corners.write_text(json.dumps({"item_evaluations": {"total": 99}, "test": {"chosen_mean": 0.71, "chosen_worst": 0.6}}))
    result = levers.compare([levers.arm_records(f"recommended={tmp_path / 'study'}:layer-map-seeded"),
                             levers.arm_records(f"corners={tmp_path / 'study'}:corners")], None, "test",
                            reference_minus_arm=True)
    corners_arm = result["arms"][1]
    # hand: recommended - corners per seed: -0.01, +0.03, +0.01; worst: -0.1 each
    assert corners_arm["vs_reference_mean"]["mean"] == pytest.approx(0.01)
    assert corners_arm["vs_reference_worst"]["mean"] == pytest.approx(-0.1)
    assert corners_arm["vs_reference_mean"]["n"] == 3
    text = levers.markdown(result, "cmd", "t")
    assert "| corners | 1 (deterministic) | 99 | 71.0 | 60.0 | +1.0 [" in text and "reference - arm" in text


def test_a_pool_process_ends_soon_after_its_parent_is_killed(tmp_path):
    """`exit_with_parent`: a grandchild that watches its parent outlives it by about the poll
    interval; without the watch it would sleep its whole minute (the check at the end)."""
    import os
    import subprocess
    import time

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    child = ("import os, subprocess, sys\n"
             "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]])\n"
             "print(p.pid, flush=True)\n"
             "import time; time.sleep(0.5)\n"
             "os._exit(0)  # the parent dies without cleaning up\n")
    grandchild = (f"import sys, os, time; sys.path.insert(0, {str(bench)!r}); sys.path.insert(0, {str(bench.parent)!r})\n"
                  "from search_quality import exit_with_parent\n"
                  "exit_with_parent(os.getppid(), poll_seconds=0.1)\n"
                  "time.sleep(60)\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", child, grandchild], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    while time.monotonic() - started < 20:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the grandchild outlived its parent by 20 s")


def test_comparisons_of_a_partial_run_replace_only_their_own_entries(tmp_path):
    """`write_comparisons`: a run over some rows replaces those rows' (row, baseline, metric) entries and
    keeps the rest, so the file stays complete whichever subset of the study ran last."""
    study = _load("search_quality")

    class Comparison:
        def __init__(self, row, baseline, metric, mean):
            self.data = {"row": row, "baseline": baseline, "metric": metric, "difference": {"mean": mean}}

        def to_json(self):
            return self.data

    path = tmp_path / "comparisons.json"
    study.write_comparisons(path, [Comparison("a", "corners", "chosen_mean", 1.0), Comparison("b", "corners", "chosen_mean", 2.0)])
    study.write_comparisons(path, [Comparison("b", "corners", "chosen_mean", 3.0), Comparison("b", "corners", "hv", 4.0)])
    got = [(c["row"], c["metric"], c["difference"]["mean"]) for c in json.loads(path.read_text())]
    assert got == [("a", "chosen_mean", 1.0), ("b", "chosen_mean", 3.0), ("b", "hv", 4.0)]


def test_a_resumed_partial_run_keeps_the_earlier_rows_in_study_json(tmp_path):
    """`open_results --resume` over some rows: study.json lists every row run so far (a partial run used to
    overwrite the rows, prescreen settings and fitnesses of the earlier ones), the latest command last."""
    study = _load("search_quality")
    identity = {"zoo_hash": "h", "plan": {}, "costs": {}, "warm_start": 8, "spaces": {}, "finalists": 5,
                "pareto_test_cap": 40, "subset_method": "random"}

    def run(command, rows, fitness):
        return {**identity, "command": command, "seeds": 10, "rows": [{"key": k, "label": k} for k in rows],
                "prescreen": {k: 1.0 for k in rows}, "fitness": fitness}

    study.open_results(tmp_path, run("first", ["a", "b"], {"main": "m", "mergekit": "k"}), resume=False)
    study.open_results(tmp_path, run("second", ["b", "c"], {"main": "m"}), resume=True)
    got = json.loads((tmp_path / "study.json").read_text())
    assert [r["key"] for r in got["rows"]] == ["a", "b", "c"]
    assert got["prescreen"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert got["fitness"] == {"main": "m", "mergekit": "k"}
    assert got["command"] == "second" and got["commands"] == ["first", "second"]


def test_a_study_from_before_the_subset_method_setting_is_resumed_with_anchors_only(tmp_path):
    """study.json without `subset_method` (the committed small and 7781c7b3 medium studies) ran with
    anchors: resumed with anchors (unless asked otherwise), and a resume with random items is refused;
    a new folder takes the library's default."""
    from evomerge.fitness.calibrate import DEFAULT_SUBSET_METHOD

    study = _load("search_quality")
    assert study.study_subset_method(tmp_path / "new", None) == DEFAULT_SUBSET_METHOD == "random"
    identity = {"zoo_hash": "h", "plan": {}, "costs": {}, "warm_start": 8, "spaces": {}, "finalists": 5,
                "pareto_test_cap": 40, "command": "c", "seeds": 10, "rows": [], "prescreen": {}, "fitness": {}}
    (tmp_path / "study.json").write_text(json.dumps(identity))
    (tmp_path / "row").mkdir()
    (tmp_path / "row" / "seed00.json").write_text("{}")
    assert study.study_subset_method(tmp_path, None) == "anchors"
    study.open_results(tmp_path, {**identity, "subset_method": "anchors"}, resume=True)
    with pytest.raises(SystemExit, match="subset_method differ"):
        study.open_results(tmp_path, {**identity, "subset_method": "random"}, resume=True)


def test_a_run_folder_left_with_another_warm_start_is_not_resumed_as_this_studys(tmp_path):
    """`refuse_other_optimizer`: a study that seeds with other genomes (or other strategy settings) than the
    run folder of the same row and seed was made with refuses it (it used to resume that run silently and
    report it as its own); the same settings pass, and a folder that is not a run is left to the caller."""
    import yaml

    from evomerge.runs.config import load_run_config
    from evomerge.runs.store import RunStore

    study = _load("search_quality")

    def config(initial):
        return load_run_config({
            "name": "layer-map-seeded_s0", "models": {"base": "base", "experts": ["a", "b"]},
            "search_space": "task_arithmetic_per_layer", "fitness": {"name": "f"},
            "optimizer": {"name": "map", "settings": {"batch_size": 8, "initial_genomes": initial}},
            "budget": {"evaluations": 8}, "seed": 0, "runs_dir": str(tmp_path)}, root=tmp_path)

    made = config([[1.0, 0.0], [0.0, 1.0]])
    store = RunStore.create(tmp_path / made.name, yaml.safe_dump(made.model_dump()))
    store.unlock()
    study.refuse_other_optimizer(tmp_path / made.name, config([[1.0, 0.0], [0.0, 1.0]]))  # same: passes
    with pytest.raises(RuntimeError, match="other optimizer settings"):
        study.refuse_other_optimizer(tmp_path / made.name, config([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    study.refuse_other_optimizer(tmp_path / "not_a_run", made)  # unreadable: the caller restarts it
