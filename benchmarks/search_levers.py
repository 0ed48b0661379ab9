"""Search levers, measured on validation only (issue 14, item 4; benchmarks/PROTOCOL.md).

A *lever* is one change to the recommended search (a warm start, a search space, a setting). Each
arm is one row of a `search_quality.py zoo` study run with ``--development-only`` (or the
development records of a full study: this script never reads their ``test`` field), so no test
split is read to choose. The metric is what a user sees before any test split: the chosen
member's mean (and worst task) on the whole validation split, from the finalists' re-scoring.
It is optimistic for every arm alike (the finalists are chosen on that split); arms are compared
paired by search seed, against a reference arm, with the 95% percentile bootstrap interval of
`evomerge.stats.paired_difference`; the corners baseline's validation mean is shown for scale.

    python benchmarks/search_levers.py \\
        --arm "warm start 8 corners=benchmarks/results/search_quality_medium_7781c7b3_b120:layer-map-seeded" \\
        --arm "warm start 64 corners=benchmarks/results/levers_medium_warm64:layer-map-seeded" \\
        --corners benchmarks/results/search_quality_medium_7781c7b3_b120 --out benchmarks/results/search_levers_medium.json --record

The first ``--arm`` is the reference. Tables are generated from the records (``--record`` writes
the block between ``<!-- search_levers:begin -->`` and ``<!-- search_levers:end -->`` in RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.stats import mean_sd, paired_difference  # noqa: E402


def arm_records(spec: str) -> tuple[str, Path, str, dict[int, dict]]:
    """'label=results_dir:row' -> (label, folder, row, {seed: development record})."""
    label, _, where = spec.partition("=")
    folder, _, row = where.rpartition(":")
    if not (label and folder and row):
        raise SystemExit(f"--arm {spec!r}: expected 'label=RESULTS_DIR:ROW'")
    paths = sorted((Path(folder) / row).glob("seed*.json"))
    if not paths:
        raise SystemExit(f"--arm {spec!r}: no records in {Path(folder) / row}")
    records = {}
    for path in paths:
        record = json.loads(path.read_text())
        if record.get("chosen_validation"):
            records[int(record["seed"])] = record
    return label, Path(folder), row, records


def validation_of(record: dict) -> tuple[float, float]:
    """(mean, worst task) of the chosen member on the whole validation split."""
    values = np.array(list(record["chosen_validation"].values()), dtype=float)
    return float(values.mean()), float(values.min())


def corners_validation(folder: Path) -> dict | None:
    path = folder / "corners" / "deterministic.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    chosen = np.array(list(record["validation"][record["chosen_id"]].values()), dtype=float)
    return {"weights": record["weights"][record["chosen_id"]], "mean": float(chosen.mean()),
            "worst": float(chosen.min()), "item_evaluations": record["item_evaluations"]["total"]}


def compare(arms: list[tuple[str, Path, str, dict[int, dict]]], corners: dict | None) -> dict:
    reference_label, _, _, reference = arms[0]
    out = {"reference": reference_label, "corners": corners, "arms": []}
    for label, folder, row, records in arms:
        seeds = sorted(records)
        means = [validation_of(records[s])[0] for s in seeds]
        worsts = [validation_of(records[s])[1] for s in seeds]
        items = [records[s]["item_evaluations"]["total"] for s in seeds]
        arm = {"label": label, "results": str(folder), "row": row, "seeds": seeds,
               "validation_mean": mean_sd(means).to_json(), "validation_worst": mean_sd(worsts).to_json(),
               "item_evaluations": int(max(items)), "per_seed": {str(s): {"mean": m, "worst": w}
                                                              for s, m, w in zip(seeds, means, worsts)}}
        common = sorted(set(seeds) & set(reference))
        if label != reference_label and len(common) >= 2:
            a = [validation_of(records[s])[0] for s in common]
            b = [validation_of(reference[s])[0] for s in common]
            arm["vs_reference_mean"] = paired_difference(a, b).to_json()
            a = [validation_of(records[s])[1] for s in common]
            b = [validation_of(reference[s])[1] for s in common]
            arm["vs_reference_worst"] = paired_difference(a, b).to_json()
        if corners is not None:
            arm["vs_corners_mean"] = {"mean": float(np.mean(means)) - corners["mean"]}
        out["arms"].append(arm)
    return out


def markdown(result: dict, command: str) -> str:
    def ms(d: dict) -> str:
        return f"{100 * d['mean']:.1f} ({100 * d['sd']:.1f})" if d["n"] > 1 else f"{100 * d['mean']:.1f}"

    def pd(d: dict | None) -> str:
        if not d:
            return "reference" if d is None else ""
        return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"

    lines = ["### Search levers on validation (issue 14, item 4)", "", f"`{command}`", "",
             "Each arm: the chosen member's mean and worst task on the whole validation split (the finalists' "
             "re-scoring; optimistic alike for every arm), mean (sd, ddof = 1) over search seeds; paired "
             "difference against the first arm with a 95% percentile bootstrap CI (10,000 resamples, seed 0). "
             "No test split was read for this table.", ""]
    corners = result["corners"]
    if corners:
        lines += [f"Corners baseline (a), chosen on the whole validation split: {100 * corners['mean']:.1f} "
                  f"(worst task {100 * corners['worst']:.1f}), weights {corners['weights']}, "
                  f"{corners['item_evaluations']:,} item evaluations.", ""]
    lines += ["| arm | seeds | item evaluations | validation mean (sd) | worst task (sd) | mean vs reference | "
              "worst vs reference | mean - corners |", "|---|---|---|---|---|---|---|---|"]
    for arm in result["arms"]:
        vs_corners = f"{100 * arm['vs_corners_mean']['mean']:+.1f}" if "vs_corners_mean" in arm else ""
        lines.append(f"| {arm['label']} | {len(arm['seeds'])} | {arm['item_evaluations']:,} | "
                     f"{ms(arm['validation_mean'])} | {ms(arm['validation_worst'])} | "
                     f"{pd(arm.get('vs_reference_mean')) if arm['label'] != result['reference'] else 'reference'} | "
                     f"{pd(arm.get('vs_reference_worst')) if arm['label'] != result['reference'] else 'reference'} | "
                     f"{vs_corners} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="label=RESULTS_DIR:ROW (the first is the reference)")
    parser.add_argument("--corners", default=None, help="a study folder holding the corners baseline's record")
    parser.add_argument("--out", default=None, help="write the comparison as JSON")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    arms = [arm_records(spec) for spec in args.arm]
    result = compare(arms, corners_validation(Path(args.corners)) if args.corners else None)
    command = "python benchmarks/search_levers.py " + " ".join(
        f'--arm "{a}"' if i < len(args.arm) else a for i, a in enumerate(args.arm)) + (
        f" --corners {args.corners}" if args.corners else "")
    text = markdown(result, command)
    print(text)
    if args.out:
        from evomerge._atomic import write_json_atomic

        write_json_atomic(args.out, {"command": command, **result})
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from search_quality import record_section

        record_section("search_levers", text)


if __name__ == "__main__":
    main()
