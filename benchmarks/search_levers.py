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
    deterministic = Path(folder) / row / "deterministic.json"
    if not paths and deterministic.is_file():  # corners, fixed recipes: one record, every seed's partner
        return label, Path(folder), row, {DETERMINISTIC: json.loads(deterministic.read_text())}
    if not paths:
        raise SystemExit(f"--arm {spec!r}: no records in {Path(folder) / row}")
    records = {}
    for path in paths:
        record = json.loads(path.read_text())
        if record.get("chosen_validation") or record.get("test"):
            records[int(record["seed"])] = record
    return label, Path(folder), row, records


DETERMINISTIC = -1  # the seed key of a deterministic record


def test_of(record: dict) -> tuple[float, float]:
    """(mean, worst task) of the chosen member on the whole test splits (the final step's record)."""
    return float(record["test"]["chosen_mean"]), float(record["test"]["chosen_worst"])


def paired_seeds(records: dict[int, dict], reference: dict[int, dict]) -> list[tuple[int, int]]:
    """(seed here, seed in reference) pairs: common seeds, or every seed against a deterministic record."""
    if DETERMINISTIC in reference:
        return [(s, DETERMINISTIC) for s in sorted(records) if s != DETERMINISTIC]
    if DETERMINISTIC in records:
        return [(DETERMINISTIC, s) for s in sorted(reference) if s != DETERMINISTIC]
    return [(s, s) for s in sorted(set(records) & set(reference))]


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


def compare(arms: list[tuple[str, Path, str, dict[int, dict]]], corners: dict | None, split: str = "validation",
            reference_minus_arm: bool = False) -> dict:
    """Each arm's chosen-member mean and worst task on `split` (validation: the finalists' re-scoring;
    test: the final step's record), paired against the first arm: arm - reference (a lever's gain), or
    with `reference_minus_arm` reference - arm (the reference is the configuration that must win)."""
    score = validation_of if split == "validation" else test_of
    reference_label, _, _, reference = arms[0]
    out = {"reference": reference_label, "split": split, "corners": corners, "arms": [],
           "difference": "reference - arm" if reference_minus_arm else "arm - reference"}
    for label, folder, row, records in arms:
        seeds = sorted(records)
        means = [score(records[s])[0] for s in seeds]
        worsts = [score(records[s])[1] for s in seeds]
        items = [records[s]["item_evaluations"]["total"] for s in seeds]
        arm = {"label": label, "results": str(folder), "row": row, "seeds": seeds,
               "validation_mean": mean_sd(means).to_json(), "validation_worst": mean_sd(worsts).to_json(),
               "item_evaluations": int(max(items)), "per_seed": {str(s): {"mean": m, "worst": w}
                                                              for s, m, w in zip(seeds, means, worsts)}}
        pairs = paired_seeds(reference, records)  # (reference seed, this arm's seed)
        if label != reference_label and len(pairs) >= 2:
            a = [score(records[s])[0] for _, s in pairs]
            b = [score(reference[r])[0] for r, _ in pairs]
            arm["vs_reference_mean"] = (paired_difference(b, a) if reference_minus_arm else paired_difference(a, b)).to_json()
            a = [score(records[s])[1] for _, s in pairs]
            b = [score(reference[r])[1] for r, _ in pairs]
            arm["vs_reference_worst"] = (paired_difference(b, a) if reference_minus_arm else paired_difference(a, b)).to_json()
        if corners is not None:
            arm["vs_corners_mean"] = {"mean": float(np.mean(means)) - corners["mean"]}
        out["arms"].append(arm)
    return out


def markdown(result: dict, command: str, title: str | None = None) -> str:
    def ms(d: dict) -> str:
        return f"{100 * d['mean']:.1f} ({100 * d['sd']:.1f})" if d["n"] > 1 else f"{100 * d['mean']:.1f}"

    def pd(d: dict | None) -> str:
        return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else ""

    split = result.get("split", "validation")
    difference = result.get("difference", "arm - reference")
    if split == "validation":
        what = ("the chosen member's mean and worst task on the whole validation split (the finalists' "
                "re-scoring; optimistic alike for every arm)")
        sealed = "No test split was read for this table."
    else:
        what = "the chosen member (chosen on validation) on the whole test splits, from each record's final step"
        sealed = "The test numbers come from the final steps that read test once (benchmarks/PROTOCOL.md)."
    lines = [f"### {title or 'Search levers on validation (issue 14, item 4)'}", "", f"`{command}`", "",
             f"Each arm: {what}, mean (sd, ddof = 1) over search seeds (a deterministic row, one record, is every "
             f"seed's partner); paired difference ({difference}, reference = {result['reference']}) with a 95% "
             f"percentile bootstrap CI (10,000 resamples, seed 0). {sealed}", ""]
    corners = result["corners"]
    if corners:
        lines += [f"Corners baseline (a), chosen on the whole validation split: {100 * corners['mean']:.1f} "
                  f"(worst task {100 * corners['worst']:.1f}), weights {corners['weights']}, "
                  f"{corners['item_evaluations']:,} item evaluations.", ""]
    lines += [f"| arm | seeds | item evaluations | {split} mean (sd) | worst task (sd) | mean: {difference} | "
              f"worst: {difference} |" + (" mean - corners |" if corners else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if corners else "")]
    for arm in result["arms"]:
        ref = arm["label"] == result["reference"]
        vs_corners = f" {100 * arm['vs_corners_mean']['mean']:+.1f} |" if corners and "vs_corners_mean" in arm else (
            " |" if corners else "")
        n = "1 (deterministic)" if arm["seeds"] == [DETERMINISTIC] else str(len(arm["seeds"]))
        lines.append(f"| {arm['label']} | {n} | {arm['item_evaluations']:,} | "
                     f"{ms(arm['validation_mean'])} | {ms(arm['validation_worst'])} | "
                     f"{'reference' if ref else pd(arm.get('vs_reference_mean'))} | "
                     f"{'reference' if ref else pd(arm.get('vs_reference_worst'))} |{vs_corners}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="label=RESULTS_DIR:ROW (the first is the reference)")
    parser.add_argument("--corners", default=None, help="a study folder holding the corners baseline's record")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="test: the records' final-step numbers (only for the reported table)")
    parser.add_argument("--reference-minus-arm", action="store_true",
                        help="differences as reference - arm (the reference must beat every arm)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--key", default="search_levers", help="RESULTS.md section key")
    parser.add_argument("--out", default=None, help="write the comparison as JSON")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    arms = [arm_records(spec) for spec in args.arm]
    result = compare(arms, corners_validation(Path(args.corners)) if args.corners else None, args.split,
                     args.reference_minus_arm)
    command = ("python benchmarks/search_levers.py " + " ".join(f'--arm "{a}"' for a in args.arm)
               + (f" --corners {args.corners}" if args.corners else "")
               + (f" --split {args.split}" if args.split != "validation" else "")
               + (" --reference-minus-arm" if args.reference_minus_arm else "")
               + (f' --title "{args.title}"' if args.title else "") + (f" --key {args.key}" if args.key != "search_levers" else ""))
    text = markdown(result, command, args.title)
    print(text)
    if args.out:
        from evomerge._atomic import write_json_atomic

        write_json_atomic(args.out, {"command": command, **result})
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from search_quality import record_section

        record_section(args.key, text)


if __name__ == "__main__":
    main()
