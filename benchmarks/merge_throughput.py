"""Merge throughput: in-memory materialization vs a plain copy, and `evomerge merge` vs `mergekit-yaml`.

Usage: .venv/bin/python benchmarks/merge_throughput.py [--params 134M] [--reps 3] [--skip-disk]

(a) The search's per-candidate path: GB/s of weight bytes read and written by the materializer
    for task_arithmetic, ties and dare_ties, next to a plain `torch` copy of the same number of
    bytes in the same process (the hardware floor for touching those bytes).
(b) The file-to-file path: wall time and peak resident memory of `evomerge merge` and
    `mergekit-yaml` on the same YAML, and the max relative difference of their outputs.
Targets (issue 2): (a) >= 0.5 of copy bandwidth for task_arithmetic, >= 0.35 for ties;
(b) >= 3x faster than mergekit end to end, with equal outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
VENV_BIN = Path(sys.executable).parent


def build_family(n_experts: int = 3) -> tuple[Path, list[Path], int]:
    """A ~134M-parameter Llama (hidden 768, 12 layers, vocab 32000) and 3 experts, cached on disk."""
    from evomerge.testing import llama_config, make_family

    folder = CACHE / "llama134m"
    done = folder / "done.json"
    if not done.is_file():
        config = llama_config(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000)
        config.max_position_embeddings = 512
        started = time.perf_counter()
        make_family(folder, n_experts=n_experts, seed=0, delta_scale=0.05, config=config, max_shard_size="200MB")
        done.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    from evomerge.merge.checkpoint import ModelFolder

    base = ModelFolder.open(folder / "base")
    n_params = sum(int(np.prod(base.shape(n))) for n in base.tensor_names())
    return folder / "base", [folder / f"expert_{i}" for i in range(n_experts)], n_params


def copy_bandwidth(n_bytes: int, reps: int) -> float:
    """GB/s of a plain in-place torch copy moving n_bytes (half read, half written)."""
    n = n_bytes // 8
    src = torch.randn(n)
    dst = torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return n * 8 / best / 1e9


def materializer_bandwidth(base: Path, experts: list[Path], reps: int) -> list[tuple[str, float, float]]:
    from evomerge.merge.materializer import Materializer

    t0 = time.perf_counter()
    mat = Materializer.from_folders(base, experts, device="cpu", compile=True)
    print(f"materializer load: {time.perf_counter() - t0:.1f}s, compile={mat.compile}, "
          f"bytes per candidate {mat.weight_bytes / 1e9:.2f} GB")
    rng = np.random.default_rng(0)
    k, layers = len(experts), mat.num_layers
    results = []
    for method in ("task_arithmetic", "ties", "dare_ties"):
        def coefficients():
            c = {"weight": rng.uniform(0.2, 1.0, (k, layers))}
            if method != "task_arithmetic":
                c["density"] = rng.uniform(0.2, 0.9, (k, layers))
            return c

        t0 = time.perf_counter()
        mat.apply(method, **coefficients())  # compiles on first use
        warm = time.perf_counter() - t0
        best = float("inf")
        for _ in range(reps):
            c = coefficients()
            t0 = time.perf_counter()
            mat.apply(method, **c)
            best = min(best, time.perf_counter() - t0)
        results.append((method, mat.weight_bytes / best / 1e9, best))
        print(f"  {method}: first call {warm:.1f}s, best of {reps} {best * 1e3:.0f} ms")
    return results, mat.weight_bytes


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a subprocess, via GNU time."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return wall, rss_kb / 1e6


def max_relative_difference(a: Path, b: Path) -> float:
    from evomerge.merge.checkpoint import ModelFolder

    fa, fb = ModelFolder.open(a), ModelFolder.open(b)
    worst = 0.0
    for name in fa.tensor_names():
        x, y = fa.get_tensor(name).double(), fb.get_tensor(name).double()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
    return worst


def disk_merge(base: Path, experts: list[Path]) -> list[str]:
    layers = 12
    rng = np.random.default_rng(1)
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(base)}] + [
            {"model": str(e), "parameters": {"weight": [round(float(x), 3) for x in rng.uniform(0.3, 1.0, 4)],
                                             "density": [round(float(x), 3) for x in rng.uniform(0.3, 0.8, 3)]}}
            for e in experts
        ],
        "dtype": "float32",
    }
    work = CACHE / "disk"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "ties.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    lines = []
    import shutil

    for out in ("evomerge_out", "mergekit_out"):
        shutil.rmtree(work / out, ignore_errors=True)
    ours = timed([str(VENV_BIN / "evomerge"), "merge", str(path), "--out", str(work / "evomerge_out"), "--quiet",
                  "--shard-size", "2GB"], env)
    theirs = timed([str(VENV_BIN / "mergekit-yaml"), str(path), str(work / "mergekit_out"), "--no-write-model-card",
                    "--quiet"], env)
    diff = max_relative_difference(work / "evomerge_out", work / "mergekit_out")
    lines.append(f"(b) evomerge merge   ties per-layer YAML: {ours[0]:6.1f} s   peak RSS {ours[1]:.2f} GB")
    lines.append(f"(b) mergekit-yaml    ties per-layer YAML: {theirs[0]:6.1f} s   peak RSS {theirs[1]:.2f} GB")
    lines.append(f"(b) speed-up {theirs[0] / ours[0]:.2f}x (target >= 3x); max relative difference {diff:.2e} "
                 f"(target <= 1e-6); one model is {sum(f.stat().st_size for f in base.glob('*.safetensors')) / 1e9:.2f} GB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-disk", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, experts, n_params = build_family()
    print(f"model: Llama, {n_params / 1e6:.0f}M parameters, {len(experts)} experts; torch threads {torch.get_num_threads()}")
    results, n_bytes = materializer_bandwidth(base, experts, args.reps)
    floor = copy_bandwidth(n_bytes, args.reps)
    lines = [f"(a) plain torch copy of the same bytes: {floor:6.2f} GB/s"]
    targets = {"task_arithmetic": 0.5, "ties": 0.35}
    for method, gbps, seconds in results:
        target = f" (target >= {targets[method]})" if method in targets else ""
        lines.append(f"(a) materialize {method:16s} {gbps:6.2f} GB/s  {seconds * 1e3:5.0f} ms/candidate  "
                     f"ratio to copy {gbps / floor:.2f}{target}")
    if not args.skip_disk:
        lines += disk_merge(base, experts)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
