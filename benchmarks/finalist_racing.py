"""Finalist racing in `Run.choose` (issue 16, item 3) against the whole-split finalists, on an existing run.

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finalist_racing.py              # measure
    .venv/bin/python benchmarks/finalist_racing.py --record     # RESULTS.md block from the JSON

Reads runs/zoo_small (the small zoo's MAP search; read only: the run folder is never written) and
scores the `--pool` best Pareto members by each rule on the whole fitness split once, per item
(validation only; no test split is read). From those answers, every race below is exact and cheap
(`race_finalists` with the recorded answers): for finalists K, batch b and seeds 0..S-1, which member
racing picks against the whole-split choice, and the item evaluations and materializations against
K x the whole split. One race per (rule, K) also goes through the real path (`Run.choose(racing=True)`
on a copy of the run without its verify.json, under a temporary folder) to check that batched scoring
gives the same answers and the same choice as the offline race.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "benchmarks"
OUT = ROOT / "results" / "finalist_racing.json"
RULES = ("mean", "worst")
FINALISTS = (3, 5, 10)
BATCHES = (25, 50, 100, 200)
CONFIDENCE = 0.95


def score_pool(run, pool: int) -> dict:
    """{member id: {task: '0101...'}} on the whole fitness split, for the `pool` best by each rule."""
    import torch

    from evomerge.runs.run import ChoiceRule

    torch.set_num_threads(1)
    ids: list[int] = []
    for by in RULES:
        for c in ChoiceRule.parse(by, run.tasks).ranked(run.pareto)[:pool]:
            if c not in ids:
                ids.append(c)
    fitness, problem = run._verify_problem("cpu")
    scorers = fitness.full_scorers(problem.tokenizer, role="fitness", device=problem.materializer.device)
    out = {}
    for c in ids:
        model = problem.materialize(run.genome(c))
        out[str(c)] = {t: "".join(str(int(x)) for x in np.asarray(scorers[t](model))) for t in run.tasks}
        print(f"  member {c}: " + " ".join(f"{t}={np.mean([ch == '1' for ch in v]):.3f}" for t, v in out[str(c)].items()),
              flush=True)
    return out


def vectors_of(answers: dict, ids) -> dict[int, dict[str, np.ndarray]]:
    return {int(c): {t: np.frombuffer(v.encode(), dtype=np.uint8) - ord("0") for t, v in answers[str(c)].items()}
            for c in ids}


def offline_race(vectors, shortlist, tasks, by, batch, seed):
    from evomerge.runs.racing import RacingSettings, race_finalists
    from evomerge.runs.run import ChoiceRule

    n = {t: int(vectors[shortlist[0]][t].size) for t in tasks}
    answers = lambda c, items: {t: vectors[c][t][idx] for t, idx in items.items()}  # noqa: E731
    return race_finalists(shortlist, n, ChoiceRule.parse(by, tasks), answers,
                          RacingSettings(batch=batch, confidence=CONFIDENCE, seed=seed))


def measure(run_dir: Path, pool: int, seeds: int) -> dict:
    from evomerge.runs.run import ChoiceRule, Run

    run = Run.load(run_dir)
    tasks = run.tasks
    t0 = time.perf_counter()
    answers = score_pool(run, pool)
    score_seconds = time.perf_counter() - t0
    rows = []
    for by in RULES:
        rule = ChoiceRule.parse(by, tasks)
        ranked = rule.ranked(run.pareto)
        for k in FINALISTS:
            shortlist = ranked[:k]
            vectors = vectors_of(answers, shortlist)
            frame = pd.DataFrame({t: {c: float(vectors[c][t].mean()) for c in shortlist} for t in tasks})
            whole = rule.ranked(frame)[0]
            primary = rule.keys(frame)["primary"]
            for batch in BATCHES:
                for seed in range(seeds):
                    r = offline_race(vectors, shortlist, tasks, by, batch, seed)
                    rows.append({"by": by, "finalists": k, "batch": batch, "seed": seed, "chosen": r.chosen,
                                 "whole_split_choice": whole, "same": r.chosen == whole,
                                 "primary_gap": float(primary[whole] - primary[r.chosen]),
                                 "item_evaluations": r.item_evaluations,
                                 "full_split_item_evaluations": r.full_split_item_evaluations,
                                 "materializations": sum(m["round"] for m in r.members.values()),
                                 "rounds": r.rounds, "stops": {str(c): m["stop"] for c, m in r.members.items()}})
    real = real_path(run_dir, answers, tasks)
    return {"run": str(run_dir.relative_to(REPO)), "tasks": tasks, "pool": pool, "seeds": seeds,
            "confidence": CONFIDENCE, "score_seconds": score_seconds,
            "n_items": {t: len(next(iter(answers.values()))[t]) for t in tasks},
            "answers": answers, "rows": rows, "real_path": real}


def real_path(run_dir: Path, answers: dict, tasks) -> list[dict]:
    """Run.choose(racing=True) on a copy of the run (no verify.json): the same choice and item count as
    the offline race with the recorded answers, batch 100 and the run's seed."""
    from evomerge.runs.run import ChoiceRule, Run

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("verify.json", "checkpoints"))
        run = Run.load(copy)
        for by in RULES:
            k = 5
            shortlist = ChoiceRule.parse(by, tasks).ranked(run.pareto)[:k]
            t0 = time.perf_counter()
            chosen = run.choose(k, by=by, racing=True, batch=100, device="cpu", echo=lambda *a: None)
            seconds = time.perf_counter() - t0
            record = run.store.read_verify()["choose"]
            offline = offline_race(vectors_of(answers, shortlist), shortlist, tasks, by, 100, run.config.seed)
            out.append({"by": by, "finalists": k, "batch": 100, "seed": run.config.seed, "chosen": chosen,
                        "offline_chosen": offline.chosen, "item_evaluations": record["item_evaluations"],
                        "offline_item_evaluations": offline.item_evaluations,
                        "full_split_item_evaluations": record["full_split_item_evaluations"],
                        "members": record["members"], "seconds": seconds})
            print(f"  real path {by}: chose {chosen} (offline {offline.chosen}), {record['item_evaluations']} "
                  f"item evaluations (offline {offline.item_evaluations}) in {seconds:.1f}s", flush=True)
    return out


def table() -> str:
    data = json.loads(OUT.read_text())
    rows = pd.DataFrame(data["rows"])
    n_total = sum(data["n_items"].values())
    lines = [f"**{data['run']}** (`.venv/bin/python benchmarks/finalist_racing.py`; tasks {', '.join(data['tasks'])}, "
             f"{n_total} fitness-split items per member, validation only; confidence {data['confidence']}; "
             f"{data['seeds']} item-order seeds per row). Racing against the whole-split finalists "
             f"(today's `choose`): how often it picks the same member, the worst shortfall of the picked "
             f"member's whole-split score (the rule's primary statistic), and item evaluations and "
             f"materializations as a share of the whole-split choice's:", "",
             "| rule | finalists | batch | same member | worst shortfall | item evaluations (share) | "
             "materializations (x whole) | finalists dropped (mean) |", "|---|---|---|---|---|---|---|---|"]
    summary = []
    for by, g in rows.groupby("by", sort=False):
        share = g["item_evaluations"] / g["full_split_item_evaluations"]
        at100 = g[g["batch"] == 100]
        summary.append(f"{by}: the same member in {g['same'].sum()} of {len(g)} races, item evaluations "
                       f"{share.min():.2f}-{share.max():.2f} of the whole split's (batch 100: "
                       f"{(at100['item_evaluations'] / at100['full_split_item_evaluations']).mean():.2f}, with "
                       f"{(at100['materializations'] / at100['finalists']).mean():.1f}x the materializations)")
    lines[1:1] = ["", "**Summary**: " + "; ".join(summary) + "."]
    for (by, k, batch), g in rows.groupby(["by", "finalists", "batch"], sort=False):
        share = g["item_evaluations"].sum() / g["full_split_item_evaluations"].sum()
        dropped = g["stops"].map(lambda s: sum(v == "dropped" for v in s.values())).mean()
        lines.append(f"| {by} | {k} | {batch} | {g['same'].sum()}/{len(g)} | {g['primary_gap'].max():.4f} | "
                     f"{g['item_evaluations'].mean():.0f} of {g['full_split_item_evaluations'].iloc[0]} "
                     f"({share:.2f}) | {g['materializations'].mean() / k:.2f} | {dropped:.1f} |")
    per_member = data["score_seconds"] / len(data["answers"])
    lines += ["", "Real path (`Run.choose(racing=True, batch=100)` on a copy of the run, the run's seed) against "
              f"the offline race on the recorded answers (scoring one member on the whole split took "
              f"{per_member:.1f}s here, so {5 * per_member:.0f}s for 5 whole-split finalists):", ""]
    for r in data["real_path"]:
        lines.append(f"- {r['by']}, {r['finalists']} finalists: chose {r['chosen']} (offline {r['offline_chosen']}), "
                     f"{r['item_evaluations']} item evaluations (offline {r['offline_item_evaluations']}; whole split "
                     f"{r['full_split_item_evaluations']}), {r['seconds']:.1f}s on one CPU thread; stops: "
                     + ", ".join(f"{c} {m['stop']} (round {m['round']})" for c, m in r["members"].items()))
    return "\n".join(lines) + "\n"


def record() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file
    from results_md import record_section

    record_section("finalist_racing", table(), ROOT / "RESULTS.md", heading="## Finalist racing (issue 16, item 3)")
    print(table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "zoo_small")
    parser.add_argument("--pool", type=int, default=max(FINALISTS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--record", action="store_true", help="regenerate the RESULTS.md block from the JSON and exit")
    args = parser.parse_args()
    if args.record:
        record()
        return
    data = measure(args.run.resolve(), args.pool, args.seeds)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(table())


if __name__ == "__main__":
    main()
