"""Oracle: can per-layer task-arithmetic coefficients beat task-level ones on the medium zoo at all?

Issue 14, item 2. Both arms maximise the *full* validation split's mean exact match over the
zoo's tasks (every validation item of every task, no compressed fitness, so the comparison is
about the search spaces, not the estimator) with CMA-ES (the `cma` package) under the same
budget of merges, from the same start (the zoo build's best corner, `reference_merges.best_grid`,
broadcast over the layers for the per-layer arm) and the same step size:

* ``task_level``: one weight per expert (6 genes), as `search_spaces/task_arithmetic_global.yaml`;
* ``per_layer``: one weight per expert and layer (6 x 8 genes; embeddings, final norm and LM head
  take layer 0's column, as `task_arithmetic_per_layer.yaml` decodes), bounds [0, 1.5] for both.

The test splits are never read (benchmarks/PROTOCOL.md: this is a development measurement, run
sealed). Raw results go to benchmarks/results/zoo_medium_oracle[_TAG]_seed{S}.json.

    python benchmarks/zoo_medium_oracle.py --budget 60            # zoo/medium must exist
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "medium")
    parser.add_argument("--budget", type=int, default=60, help="merges scored per arm")
    parser.add_argument("--sigma", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--arms", default="task_level,per_layer")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="recipe label, added to the file name and the record")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from evomerge.fitness.sealed import sealed_test

    with sealed_test("the medium zoo's oracle experiment chooses nothing from test"):
        result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"zoo_medium_oracle{'_' + args.tag if args.tag else ''}_seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def validation_scorers(zoo) -> dict:
    """{task: exact-match scorer over the zoo's whole validation split} (CPU, the zoo's own tokenizer)."""
    import datasets
    from transformers import AutoTokenizer

    from evomerge.fitness.scoring import ExactMatchScorer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.tokenizer_path))
    scorers = {}
    for task in zoo.tasks:
        validation = datasets.load_from_disk(str(zoo.task_path(task)))["validation"]
        scorers[task] = ExactMatchScorer(tokenizer, validation["prompt"], validation["answer"], batch_size=256,
                                         device="cpu")
    return scorers


def run(args) -> dict:
    import cma

    from evomerge.merge.materializer import Materializer
    from evomerge.zoo import Manifest

    zoo = Manifest.load(args.zoo)
    tasks = zoo.tasks
    scorers = validation_scorers(zoo)
    materializer = Materializer.from_folders(zoo.base_path, zoo.expert_paths, device="cpu")
    layers = materializer.num_layers
    start = np.asarray(zoo.reference_merges["best_grid"]["weights"], dtype=float)
    k = len(tasks)

    def score(weights: np.ndarray) -> dict[str, float]:
        model = materializer.apply("task_arithmetic", weight=weights)
        scores = {t: float(np.mean(s(model))) for t, s in scorers.items()}
        scores["mean"] = float(np.mean([scores[t] for t in tasks]))
        return scores

    shapes = {"task_level": (k,), "per_layer": (k, layers)}
    arms = {}
    for arm in args.arms.split(","):
        shape = shapes[arm]
        x0 = np.broadcast_to(start[:, None], shape).ravel() if arm == "per_layer" else start.copy()
        # the start is a corner: 0 and 1 sit on or inside the [0, 1.5] bounds
        es = cma.CMAEvolutionStrategy(x0, args.sigma, {"bounds": [0.0, 1.5], "seed": args.seed + 1,
                                                       "popsize": args.popsize, "verbose": -9})
        history, best, began = [], None, time.perf_counter()
        first = score(x0.reshape(shape))
        history.append({"eval": 0, "mean": first["mean"]})
        best = {"mean": first["mean"], "scores": first, "weights": x0.reshape(shape).tolist()}
        n = 1
        while n < args.budget:
            xs = es.ask()[: args.budget - n]
            fitness = []
            for x in xs:
                scores = score(np.asarray(x).reshape(shape))
                fitness.append(-scores["mean"])
                history.append({"eval": n, "mean": scores["mean"]})
                if scores["mean"] > best["mean"]:
                    best = {"mean": scores["mean"], "scores": scores, "weights": np.asarray(x).reshape(shape).tolist()}
                n += 1
            if len(xs) == args.popsize:
                es.tell(xs, fitness)
            print(f"{arm}: {n}/{args.budget} merges, best validation mean {100 * best['mean']:.2f} "
                  f"({time.perf_counter() - began:.0f}s)", flush=True)
        arms[arm] = {"genes": int(np.prod(shape)), "start_mean": first["mean"], "best": best, "history": history,
                     "seconds": round(time.perf_counter() - began, 1)}
    return {
        "tag": args.tag, "zoo": str(args.zoo), "content_hash": zoo.content_hash, "split": "validation (every item)",
        "items_per_task": {t: scorers[t].n_items for t in tasks}, "tasks": tasks,
        "optimizer": {"name": "cma-es", "sigma0": args.sigma, "popsize": args.popsize, "bounds": [0.0, 1.5],
                      "seed": args.seed},
        "budget": args.budget, "start": start.tolist(), "arms": arms,
    }


if __name__ == "__main__":
    main()
