"""A medium-zoo recipe variant, probed on validation: can per-layer coefficients beat every task-level merge?

Issue 14, item 2 ("if they cannot, change the recipe until they can, and write down what you
tried"). The variant is built beside the adopted zoo (its tokenizer, tasks and base are copied and
reused: the build keys them on their inputs, not on the size's name), then scored on the *whole*
validation split, sealed (no test read), with hand-made merges that say whether per-layer
coefficients have anything task-level ones cannot reach:

* the build's own references: the best of the 2^K corners, uniform task arithmetic, averaging;
* per-layer merges that give each expert its own layer(s) at weight 1 and the layers every expert
  trained ("shared") a weight `s` each, for several `s`, with the remaining layers at 0.

Variant ``shared`` (the one tried here): each expert trains one decoder layer of its own (addition 1,
subtraction 2, reversal 3, sorting 4, rotation 5, maxmin 6) *and* the first and last layers (0, 7),
which all six train, at the full rate; every other parameter (other layers, embeddings, final norm,
head) at 0.1x. Real fine-tunes of one base share most of their change in some layers (embeddings,
first and last blocks) while their skills sit elsewhere; in the shared layers six task vectors
collide, which a single weight per expert cannot avoid and a per-layer weight can.

    OMP_NUM_THREADS=1 python benchmarks/zoo_medium_recipe_probe.py --out /tmp/zoo_probe
    python benchmarks/zoo_medium_oracle.py --zoo /tmp/zoo_probe/medium_shared --tag v5_shared --budget 40
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # zoo_medium_oracle, beside this file
OWN = {"addition": (1,), "subtraction": (2,), "reversal": (3,), "sorting": (4,), "rotation": (5,), "maxmin": (6,)}
SHARED = (0, 7)
# Variant ``drift``: disjoint own blocks (addition 0-1, subtraction 2-3, then one layer each), the
# skill learnt with every other parameter frozen, then a drift stage that trains everything *but*
# the own block on the same objective (ZooSize.expert_drift_steps)
BLOCKS = {"addition": (0, 1), "subtraction": (2, 3), "reversal": (4,), "sorting": (5,), "rotation": (6,),
          "maxmin": (7,)}
# Variant ``preserve``: the drift recipe on a 10-layer model, two own layers for each of the four
# harder skills, and a skill stage that also keeps the replay rows' residual stream after the own
# layers equal to the base's (ZooSize.expert_preserve_hidden), so that own layers compose
BLOCKS10 = {"addition": (0, 1), "subtraction": (2, 3), "reversal": (4, 5), "rotation": (6, 7), "sorting": (8,),
            "maxmin": (9,)}
# Variant ``private``: the adopted zoo's shape and overlapping three-layer blocks, each skill learnt in
# its block alone (everything else frozen) with the replay rows' hidden state kept at the base's, then
# a drift that carries no skill: the other decoder layers learn a private random-label task while
# the own task is distilled from the expert itself (ZooSize.expert_drift_private)
MEDIUM_BLOCKS = {t: tuple(range(i, i + 3)) for i, t in enumerate(OWN)}
VARIANTS = {
    "shared": {"expert_layers": {t: tuple(sorted(OWN[t] + SHARED)) for t in OWN}, "expert_other_lr_scale": 0.1},
    "drift": {"expert_layers": BLOCKS, "expert_other_lr_scale": 0.0,
              "expert_lr": {t: 1e-3 for t in BLOCKS}, "expert_drift_steps": 150, "expert_drift_lr": 3e-4},
    "preserve": {"layers": 10, "expert_layers": BLOCKS10, "expert_other_lr_scale": 0.0,
                 "expert_lr": {t: 1e-3 for t in BLOCKS10}, "expert_drift_steps": 150, "expert_drift_lr": 3e-4,
                 "expert_preserve_hidden": 10.0},
    "private": {"expert_layers": MEDIUM_BLOCKS, "expert_other_lr_scale": 0.0, "expert_lr": {t: 1e-3 for t in OWN},
                "expert_steps": {t: 800 for t in OWN}, "expert_preserve_hidden": 10.0, "expert_drift_steps": 200,
                "expert_drift_lr": 1e-3, "expert_drift_private": 512, "expert_drift_private_rows": 32},
}


def register(variant: str):
    from evomerge.zoo._sizes import SIZES

    name = f"medium_{variant}"
    SIZES[name] = dataclasses.replace(SIZES["medium"], name=name, **VARIANTS[variant])
    return name


def per_layer_weights(tasks: list[str], layers: int, shared_weight: float, rest: float = 0.0) -> np.ndarray:
    """(K, L): expert k at 1 in its own layers, `shared_weight` in the shared ones, `rest` elsewhere."""
    w = np.full((len(tasks), layers), rest)
    for k, task in enumerate(tasks):
        w[k, list(SHARED)] = shared_weight
        w[k, list(OWN[task])] = 1.0
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="shared", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, required=True, help="folder the variant is built in")
    parser.add_argument("--source", type=Path, default=ROOT / "zoo" / "medium", help="the adopted medium zoo")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from evomerge.fitness.sealed import sealed_test
    from evomerge.zoo import build_zoo

    name = register(args.variant)
    target = args.out / name
    if not target.exists():  # the tokenizer, tasks and base are reused from the adopted zoo
        shutil.copytree(args.source, target)
    began = time.perf_counter()
    with sealed_test("a medium-zoo recipe probe chooses on validation only"):
        zoo = build_zoo(args.out, size=name, seed=0)
        build_seconds = time.perf_counter() - began
        merges = probe(zoo, args.variant)
    result = {"variant": args.variant, "recipe": {k: (dict(v) if isinstance(v, dict) else v)
                                                 for k, v in VARIANTS[args.variant].items()},
              "zoo": str(target), "content_hash": zoo.content_hash, "build_seconds": round(build_seconds, 1),
              "accuracy": zoo.accuracy, "bars": zoo.quality_bars, "reference_merges": zoo.reference_merges,
              "hand_merges": merges}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"zoo_medium_recipe_{args.variant}_seed0.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


def probe(zoo, variant: str) -> list[dict]:
    from zoo_medium_oracle import validation_scorers

    from evomerge.merge.materializer import Materializer

    tasks = zoo.tasks
    scorers = validation_scorers(zoo)
    materializer = Materializer.from_folders(zoo.base_path, zoo.expert_paths, device="cpu")
    layers = materializer.num_layers
    merges = [("best corner (task-level)", np.asarray(zoo.reference_merges["best_grid"]["weights"], dtype=float)),
              ("uniform task arithmetic", np.ones(len(tasks)))]
    if variant in ("drift", "preserve", "private"):
        blocks = VARIANTS[variant]["expert_layers"]
        for rest in (0.0, 0.25, 0.5, 1.0):
            w = np.full((len(tasks), layers), rest)
            for k, task in enumerate(tasks):
                w[k, list(blocks[task])] = 1.0
            merges.append((f"own block 1, rest {rest:.2f}", w))
        # do two experts' blocks compose? each pair's blocks alone (rest 0) against the whole pair
        for pair in (("addition", "subtraction"), ("subtraction", "sorting"), ("reversal", "sorting")):
            own, whole = np.zeros((len(tasks), layers)), np.zeros((len(tasks), layers))
            for k, task in enumerate(tasks):
                if task in pair:
                    own[k, list(blocks[task])], whole[k] = 1.0, 1.0
            merges += [(f"blocks of {' + '.join(pair)} only", own), (f"{' + '.join(pair)} whole", whole)]
        for k, task in enumerate(tasks):
            w = np.zeros((len(tasks), layers))
            w[k, list(blocks[task])] = 1.0
            merges.append((f"block of {task} only", w))
    else:
        for s in (1 / 6, 1 / 3, 0.5, 1.0):
            merges.append((f"own layer 1, shared layers {s:.2f}, rest 0", per_layer_weights(tasks, layers, s)))
        merges.append(("own layer 1, shared layers 0.33, rest 1", per_layer_weights(tasks, layers, 1 / 3, rest=1.0)))
    out = []
    for label, weights in merges:
        model = materializer.apply("task_arithmetic", weight=weights)
        scores = {t: float(np.mean(s(model))) for t, s in scorers.items()}
        mean = float(np.mean(list(scores.values())))
        out.append({"merge": label, "weights": weights.tolist(), "per_task": scores, "mean": mean})
        print(f"{label}: validation mean {100 * mean:.1f} ("
              + ", ".join(f"{t} {100 * v:.0f}" for t, v in scores.items()) + ")", flush=True)
    return out


if __name__ == "__main__":
    main()
