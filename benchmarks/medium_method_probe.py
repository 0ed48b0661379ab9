"""Lever "method and density as genes", probed by hand on the medium zoo's validation split.

Issue 14, item 4 lists method and density as genes among the levers. Before a search space over
them is worth a study, this asks whether any TIES / DARE / breadcrumbs merge reaches above the best
task-arithmetic corner at all. Each merge is scored on the *whole* validation split of every task
(sealed: no test read); raw results go to benchmarks/results/levers_medium_methods.json.

    OMP_NUM_THREADS=1 python benchmarks/medium_method_probe.py        # zoo/medium must exist
    python benchmarks/medium_method_probe.py --report-only --record   # the RESULTS.md block from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # zoo_medium_oracle, beside this file


def merges(best_corner: np.ndarray, experts: int) -> list[tuple[str, str, dict, dict]]:
    """(label, method, per-expert parameters, method settings): every expert at once under sparsifying
    methods (TIES without and with mergekit's normalization, DARE-TIES, breadcrumbs) over a grid of
    densities and weights, and the best corner's experts under TIES."""
    ones = np.ones(experts)
    out = [("task_arithmetic, best corner", "task_arithmetic", {"weight": best_corner}, {}),
           ("ties (mergekit defaults: normalize) w=1 d=0.5", "ties", {"weight": ones, "density": 0.5 * ones}, {})]
    out += [(f"ties normalize=False w={w} d={d}", "ties", {"weight": w * ones, "density": d * ones},
             {"normalize": False}) for d in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0) for w in (1.0, 1.5, 2.0)]
    out += [(f"dare_ties w=1 d={d}", "dare_ties", {"weight": ones, "density": d * ones}, {}) for d in (0.1, 0.3)]
    out += [("breadcrumbs w=1 d=0.5", "breadcrumbs", {"weight": ones, "density": 0.5 * ones, "gamma": 0.01 * ones}, {}),
            ("ties normalize=False, best corner's weights, d=0.5", "ties",
             {"weight": best_corner, "density": 0.5 * ones}, {"normalize": False})]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "medium")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "levers_medium_methods.json")
    parser.add_argument("--report-only", action="store_true", help="the table from --out, nothing scored")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not args.report_only:
        score(args)
    markdown = report(json.loads(args.out.read_text()))
    print(markdown)
    if args.record:
        from results_md import record_section

        record_section("levers_medium_methods", markdown)


def report(record: dict) -> str:
    rows = sorted(record["merges"], key=lambda r: -r["validation_mean"])
    tasks = list(rows[0]["per_task"])
    lines = [
        "### Lever: merge method and density (hand merges, medium zoo, whole validation split)", "",
        f"`{record['command']}` (zoo `{record['content_hash'][:12]}`; raw: "
        "`benchmarks/results/levers_medium_methods.json`). No test split was read.", "",
        "| merge | validation mean | " + " / ".join(tasks) + " |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['merge']} | {100 * r['validation_mean']:.1f} | "
                     + " / ".join(f"{100 * r['per_task'][t]:.0f}" for t in tasks) + " |")
    return "\n".join(lines)


def score(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)

    from zoo_medium_oracle import validation_scorers

    from evomerge.fitness.sealed import sealed_test
    from evomerge.merge.materializer import Materializer
    from evomerge.zoo import Manifest

    zoo = Manifest.load(args.zoo)
    best = np.asarray(zoo.reference_merges["best_grid"]["weights"], dtype=float)
    rows = []
    with sealed_test("a lever probed on validation only"):
        scorers = validation_scorers(zoo)
        materializer = Materializer.from_folders(zoo.base_path, zoo.expert_paths, device="cpu")
        for label, method, per_expert, settings in merges(best, len(zoo.tasks)):
            model = materializer.apply(method, **settings, **per_expert)
            scores = {t: float(np.mean(s(model))) for t, s in scorers.items()}
            mean = float(np.mean(list(scores.values())))
            rows.append({"merge": label, "method": method, "settings": settings,
                         "per_expert": {k: np.asarray(v).tolist() for k, v in per_expert.items()},
                         "validation_mean": mean, "per_task": scores})
            print(f"{label}: validation mean {100 * mean:.1f} ("
                  + ", ".join(f"{t} {100 * v:.0f}" for t, v in scores.items()) + ")", flush=True)
    record = {"zoo": str(args.zoo), "content_hash": zoo.content_hash, "split": "validation (whole)",
              "command": "python benchmarks/medium_method_probe.py", "merges": rows}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
