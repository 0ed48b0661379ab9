"""benchmarks/fitness_estimation.py --accounting, its pure parts: item evaluations at a search's budget
worked by hand, the random-mean baseline's items at equal total cost, the error metrics against
hand-computed values, and the RESULTS.md block regenerated from the committed JSON (no model: fast)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_modules import load_benchmark

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


_load = load_benchmark


fe = _load("fitness_estimation")
SMALL = {"zoo_addition": 1000, "zoo_reversal": 1000, "zoo_sorting": 1000}


def budget(candidates, n, calibration_models=14, finalists=5):
    return {"candidates": candidates, "n": n, "calibration_models": calibration_models, "finalists": finalists}


def test_demo_budget_by_hand():
    a = fe.item_accounting(budget(320, 60), SMALL)
    # 14 x 3,000 = 42,000; 320 x 60 x 3 = 57,600; 5 x 3,000 = 15,000
    assert (a["calibration"], a["search"], a["finalists"], a["total"]) == (42_000, 57_600, 15_000, 114_600)
    assert a["all_full"] == 960_000
    assert a["saving"] == pytest.approx(960_000 / 114_600)  # 8.38x, not 10x
    assert a["saving_without_finalists"] == pytest.approx(960_000 / 99_600)
    # the random mean spends 14 x 1,000 / 320 = 43.75 -> 43 more items per task per candidate
    assert a["random_mean_n"] == 103
    assert a["random_mean_total"] == 320 * 103 * 3 + 15_000 == 113_880
    assert a["random_mean_total"] <= a["total"]


@pytest.mark.parametrize("candidates,n,expected_n,total", [(150, 20, 113, 66_000), (500, 20, 48, 87_000)])
def test_other_budgets_by_hand(candidates, n, expected_n, total):
    a = fe.item_accounting(budget(candidates, n), SMALL)
    assert a["total"] == total
    assert a["random_mean_n"] == expected_n  # 20 + floor(14,000 / B)


def test_random_mean_items_capped_at_the_split():
    a = fe.item_accounting(budget(2, 900), SMALL)  # 900 + 7,000 items per task would exceed 1,000
    assert a["random_mean_n"] == 1000


def test_demo_settings_read_from_the_presets(tmp_path):
    (tmp_path / fe.DEMO_CALIBRATION).parent.mkdir(parents=True)
    (tmp_path / fe.DEMO_RUN).parent.mkdir(parents=True)
    (tmp_path / fe.DEMO_CALIBRATION).write_text(
        "calibration: {random_merges: 7}\nsubset: {n: 33, method: random}\nestimator: subset\n")
    (tmp_path / fe.DEMO_RUN).write_text(
        "search_space: s\noptimizer: {name: m2n2}\nbudget: {evaluations: 123}\n")
    demo = fe.demo_settings(tmp_path)
    assert (demo["random_merges"], demo["n"], demo["subset_method"], demo["estimator"], demo["candidates"],
            demo["optimizer"]) == (7, 33, "random", "subset", 123, "m2n2")
    rows = fe.budgets(demo, n_endpoints=4)
    assert [r["calibration_models"] for r in rows] == [11, 11, 14, 14]
    assert [r["candidates"] for r in rows] == [123, 123, 150, 500]


def test_error_metrics_by_hand():
    truth = {"a": np.array([0.1, 0.2, 0.3, 0.4]), "b": np.array([0.5, 0.6, 0.7, 0.8])}
    # a: two middle candidates swapped (Spearman 1 - 6 * 2 / (4 * 15) = 0.8); b: exact
    est = {"a": np.array([0.1, 0.35, 0.25, 0.4]), "b": truth["b"].copy()}
    m = fe.error_metrics(est, truth)
    assert m["mae"] == pytest.approx((0.15 + 0.05) / 8)
    assert m["spearman_task"] == pytest.approx((0.8 + 1.0) / 2)
    # task means: truth 0.3 0.4 0.5 0.6; estimates 0.3 0.475 0.475 0.6 (a tie: ranks 2.5, 2.5)
    assert m["spearman_mean"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 2.5, 2.5, 4])[0, 1])
    pairs = fe.error_metrics(est, truth, pairs={"a": np.array([1]), "b": np.array([], int)})
    assert pairs == {"mae": pytest.approx(0.15), "count": 1}
    assert fe.error_metrics(est, truth, pairs={"a": np.array([], int), "b": np.array([], int)})["mae"] is None


def test_record_rewrites_only_the_marked_block(tmp_path, monkeypatch):
    raw = BENCHMARKS / "results" / "fitness_accounting_small.json"
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# head\n{fe.MARK_BEGIN}\nold\n{fe.MARK_END}\n# tail\n")
    monkeypatch.setattr(fe, "RESULTS_MD", results)
    fe.record([raw])
    text = results.read_text()
    assert text == f"# head\n{fe.MARK_BEGIN}\n{fe.render(json.loads(raw.read_text())).rstrip()}\n{fe.MARK_END}\n# tail\n"
    assert "| demo | 320 | 60 | 42,000 | 57,600 | 15,000 | 114,600 | 960,000 | 8.4x |" in text
    results.write_text("no markers\n")
    with pytest.raises(SystemExit):
        fe.record([raw])
