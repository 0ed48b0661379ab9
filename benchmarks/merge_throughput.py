"""Merge throughput: in-memory materialization vs a plain copy, and `evomerge merge` vs `mergekit-yaml`.

Usage: .venv/bin/python benchmarks/merge_throughput.py [--reps 3] [--threads default,1] [--skip-disk]
       [--order-stats-grid 65536|none] [--stats-memory] [--json benchmarks/results/merge_throughput_<label>.json]

P1 The search's per-candidate path: GB/s of weight bytes read and written by the materializer
    for task_arithmetic, ties and dare_ties, next to a plain `torch` copy of the same number of
    bytes in the same process and with the same torch thread count (the hardware floor for
    touching those bytes). Rounds alternate between thread counts; each number is the best round.
P2 The file-to-file path: wall time and peak resident memory of `evomerge merge` and
    `mergekit-yaml` on the same YAML (ties and task_arithmetic, per-layer gradients), run with the
    same OMP_NUM_THREADS, and how their outputs differ. For ties the differences are classified:
    an entry whose |delta| equals an expert's top-k threshold value shared by several entries is
    a tie mergekit's unstable argsort orders arbitrarily; the rest must agree to 1e-6.
Targets (issue 2): P1 >= 0.5 of copy bandwidth for task_arithmetic, >= 0.35 for ties;
P2 >= 3x faster than mergekit end to end, with equal outputs. Since issue 13 the materializer's
magnitude thresholds are exact (the same tensors `evomerge merge` writes), so P1 includes that cost.
`--order-stats-grid` sets the materializer's order statistics for P1 (default: its default grid;
`none`: full sorted statistics). `--stats-memory` adds P1 memory lines: for full and grid statistics,
in a fresh process each, the bytes the statistics take and the peak resident memory after loading
and one ties candidate (the statistics are built at the first magnitude-pruned candidate).
`--json` writes every number (and the printed lines) to a file.
`--device cuda` runs P1 on the GPU (the copy and the candidates timed with CUDA synchronisation);
`--layers N` shrinks the model (12 by default; benchmarks/gpu_check.sh --cpu-dry-run uses 1).
Every section prints the 1-minute load average: on a shared machine the numbers move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
DEFAULT_THREADS = torch.get_num_threads()


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def build_family(n_experts: int = 3, layers: int = 12) -> tuple[Path, list[Path], int]:
    """A ~134M-parameter Llama (hidden 768, 12 layers, vocab 32000) and 3 experts, cached on disk."""
    from evomerge.testing import llama_config, make_family

    folder = CACHE / ("llama134m" if layers == 12 else f"llama134m_layers{layers}")
    done = folder / "done.json"
    if not done.is_file():
        config = llama_config(hidden=768, layers=layers, heads=12, intermediate=2048, vocab=32000)
        config.max_position_embeddings = 512
        started = time.perf_counter()
        make_family(folder, n_experts=n_experts, seed=0, delta_scale=0.05, config=config, max_shard_size="200MB")
        done.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    from evomerge.merge.checkpoint import ModelFolder

    base = ModelFolder.open(folder / "base")
    n_params = sum(int(np.prod(base.shape(n))) for n in base.tensor_names())
    return folder / "base", [folder / f"expert_{i}" for i in range(n_experts)], n_params


# ----------------------------------------------------------------------------- P1 materializer

def sync(device: str = "cpu") -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    sync(str(src.device))
    t0 = time.perf_counter()
    dst.copy_(src)
    sync(str(src.device))
    return time.perf_counter() - t0


RESULTS: dict = {"P1": {}, "P2": {}}


def grid_option(value: str | None) -> dict:
    """Materializer keyword for --order-stats-grid (empty: its default)."""
    if value is None:
        return {}
    return {"order_stats_grid": None if value.lower() == "none" else int(value)}


def materializer_bandwidth(base: Path, experts: list[Path], reps: int, thread_counts: list[int],
                           grid: str | None = None, device: str = "cpu") -> list[str]:
    from evomerge.merge.materializer import Materializer

    t0 = time.perf_counter()
    mat = Materializer.from_folders(base, experts, device=device, compile=True, **grid_option(grid))
    n_bytes = mat.weight_bytes
    print(f"materializer load: {time.perf_counter() - t0:.1f}s, device {mat.device}, compile={mat.compile}, "
          f"order_stats_grid={mat.order_stats_grid}, bytes per candidate {n_bytes / 1e9:.2f} GB ({load()})", flush=True)
    RESULTS["P1"]["order_stats_grid"] = mat.order_stats_grid
    rng = np.random.default_rng(0)
    k, layers = len(experts), mat.num_layers
    methods = ("task_arithmetic", "ties", "dare_ties")

    def coefficients(method: str) -> dict:
        c = {"weight": rng.uniform(0.2, 1.0, (k, layers))}
        if method != "task_arithmetic":
            c["density"] = rng.uniform(0.2, 0.9, (k, layers))
        return c

    for method in methods:  # first calls: compile, order statistics, random draws
        t0 = time.perf_counter()
        mat.apply(method, **coefficients(method))
        sync(device)
        print(f"  {method}: first call {time.perf_counter() - t0:.1f}s ({load()})", flush=True)
    print(f"  cached random draws: {mat.random_draws_bytes / 1e9:.2f} GB", flush=True)

    src = torch.randn(n_bytes // 8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best: dict[tuple[int, str], float] = {}
    loads = []
    for _ in range(reps):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            best[threads, "copy"] = min(best.get((threads, "copy"), 1e9), copy_seconds(src, dst))
            for method in methods:
                c = coefficients(method)
                sync(device)
                t0 = time.perf_counter()
                mat.apply(method, **c)
                sync(device)
                best[threads, method] = min(best.get((threads, method), 1e9), time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
    torch.set_num_threads(DEFAULT_THREADS)
    del src, dst, mat

    targets = {"task_arithmetic": 0.5, "ties": 0.35}
    lines = [f"P1 best of {reps} rounds alternating torch thread counts {thread_counts}; "
             f"load {min(loads):.1f}-{max(loads):.1f} during the rounds"]
    for threads in thread_counts:
        floor = n_bytes / best[threads, "copy"] / 1e9
        RESULTS["P1"][f"threads={threads}"] = {
            "copy_gbps": floor,
            **{method: {"ms_per_candidate": best[threads, method] * 1e3,
                        "ratio_to_copy": n_bytes / best[threads, method] / 1e9 / floor} for method in methods},
        }
        lines.append(f"P1 threads={threads}: plain torch copy of the same bytes: {floor:6.2f} GB/s")
        for method in methods:
            gbps = n_bytes / best[threads, method] / 1e9
            target = f" (target >= {targets[method]})" if method in targets else ""
            lines.append(f"P1 threads={threads}: materialize {method:16s} {gbps:6.2f} GB/s  "
                         f"{best[threads, method] * 1e3:5.0f} ms/candidate  ratio to copy {gbps / floor:.2f}{target}")
    return lines


def memory_probe(base: Path, experts: list[Path], grid: str) -> dict:
    """In this (fresh) process: statistics bytes and peak RSS after loading and one ties candidate."""
    import resource

    from evomerge.merge.materializer import Materializer

    mat = Materializer.from_folders(base, experts, device="cpu", compile=False, **grid_option(grid))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    rng = np.random.default_rng(0)
    k, layers = len(experts), mat.num_layers
    mat.apply("ties", weight=rng.uniform(0.2, 1.0, (k, layers)), density=rng.uniform(0.2, 0.9, (k, layers)))

    def nbytes(stats) -> int:
        return sum(t.numel() * t.element_size() for t in (stats.values, stats.ranks, stats.below, stats.not_above)
                   if t is not None)

    return {"order_stats_grid": mat.order_stats_grid,
            "task_vector_gb": sum(s.task_vectors.numel() * 4 for s in mat.tensors) / 1e9,
            "order_stats_gb": sum(nbytes(st) for s in mat.tensors for st in s.magnitude_stats) / 1e9,
            "peak_rss_loaded_gb": rss_loaded,
            "peak_rss_after_ties_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def stats_memory(grids: list[str]) -> list[str]:
    lines = []
    for grid in grids:
        done = subprocess.run([sys.executable, __file__, "--memory-probe", grid], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe failed:\n{done.stderr[-3000:]}")
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        RESULTS["P1"][f"memory order_stats_grid={probe['order_stats_grid']}"] = probe
        lines.append(f"P1 memory, order_stats_grid={probe['order_stats_grid']}: statistics "
                     f"{probe['order_stats_gb']:.3f} GB next to {probe['task_vector_gb']:.2f} GB of task vectors; "
                     f"peak RSS {probe['peak_rss_loaded_gb']:.2f} GB loaded, "
                     f"{probe['peak_rss_after_ties_gb']:.2f} GB after the first ties candidate")
        print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- P2 file to file

def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a subprocess, via GNU time."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return wall, rss_kb / 1e6


def compare_outputs(ours: Path, theirs: Path, recipe_path: Path | None = None) -> dict:
    """Max relative difference (per tensor, scaled by the reference's max |value|) and, for a
    top-k recipe, how many differing entries sit at an expert's tied top-k threshold."""
    from evomerge.merge.checkpoint import ModelFolder
    from evomerge.merge.engine import resolve_tensor_params
    from evomerge.merge.layers import LayerMap
    from evomerge.merge.recipe import load_recipe, resolve_model_path
    from evomerge.merge.sparsify import magnitude_keep_count

    fa, fb = ModelFolder.open(ours), ModelFolder.open(theirs)
    loaded = load_recipe(recipe_path) if recipe_path is not None else None
    stats = {"max_rel": 0.0, "differing": 0, "at_tie": 0, "max_rel_rest": 0.0}
    for name in fa.tensor_names():
        x, y = fa.get_tensor(name).double(), fb.get_tensor(name).double()
        scale = y.abs().max().clamp_min(1e-12)
        stats["max_rel"] = max(stats["max_rel"], ((x - y).abs().max() / scale).item())
        differ = (x != y).reshape(-1)
        if loaded is None or not bool(differ.any()):
            continue
        stats["differing"] += int(differ.sum())
        spec = loaded.recipe
        base = ModelFolder.open(resolve_model_path(spec.base_model, loaded))
        layer_map = LayerMap.from_config(base.config, spec.layer_pattern)
        params = resolve_tensor_params(spec, name, layer_map.depth_fraction(name))  # noqa: the density lists
        b = base.get_tensor(name).float().reshape(-1)
        at_tie = torch.zeros_like(differ)
        for entry, density in zip(spec.experts(), params.density):
            delta = (ModelFolder.open(resolve_model_path(entry.model, loaded)).get_tensor(name).float().reshape(-1)
                     - b).abs()
            keep = magnitude_keep_count(delta.numel(), density)
            if 0 < keep < delta.numel():
                threshold = torch.kthvalue(delta, delta.numel() - keep + 1).values
                tied = delta == threshold
                if int(tied.sum()) > 1:
                    at_tie |= tied
        stats["at_tie"] += int((differ & at_tie).sum())
        rest = differ & ~at_tie
        if bool(rest.any()):
            diff = (x.reshape(-1)[rest] - y.reshape(-1)[rest]).abs().max()
            stats["max_rel_rest"] = max(stats["max_rel_rest"], (diff / scale).item())
    return stats


def disk_recipes(base: Path, experts: list[Path]) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    work = CACHE / "disk"
    work.mkdir(parents=True, exist_ok=True)
    ties = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(base)}] + [
            {"model": str(e), "parameters": {"weight": [round(float(x), 3) for x in rng.uniform(0.3, 1.0, 4)],
                                             "density": [round(float(x), 3) for x in rng.uniform(0.3, 0.8, 3)]}}
            for e in experts
        ],
        "dtype": "float32",
    }
    task_arithmetic = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(base)}] + [
            {"model": str(e), "parameters": {"weight": [round(float(x), 3) for x in rng.uniform(0.2, 0.8, 4)]}}
            for e in experts
        ],
        "dtype": "float32",
    }
    paths = {}
    for name, recipe in (("ties", ties), ("task_arithmetic", task_arithmetic)):
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe))
    return paths


def disk_merge(base: Path, experts: list[Path], thread_settings: list[str]) -> list[str]:
    work = CACHE / "disk"
    lines = []
    model_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    for name, path in disk_recipes(base, experts).items():
        for threads in thread_settings:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            if threads != "default":
                env["OMP_NUM_THREADS"] = threads
            label = f"{name} per-layer YAML, threads={threads}"
            for out in ("evomerge_out", "mergekit_out"):
                shutil.rmtree(work / out, ignore_errors=True)
            load_before = os.getloadavg()[0]
            ours = timed([str(VENV_BIN / "evomerge"), "merge", str(path), "--out", str(work / "evomerge_out"),
                          "--quiet", "--shard-size", "2GB"], env)
            theirs = timed([str(VENV_BIN / "mergekit-yaml"), str(path), str(work / "mergekit_out"),
                            "--no-write-model-card", "--quiet"], env)
            load_after = os.getloadavg()[0]
            diff = compare_outputs(work / "evomerge_out", work / "mergekit_out", path if name == "ties" else None)
            RESULTS["P2"][label] = {"evomerge_s": ours[0], "evomerge_rss_gb": ours[1], "mergekit_s": theirs[0],
                                    "mergekit_rss_gb": theirs[1], "speedup": theirs[0] / ours[0], "outputs": diff}
            lines.append(f"P2 {label}: load {load_before:.1f} -> {load_after:.1f}")
            lines.append(f"P2   evomerge merge: {ours[0]:6.1f} s   peak RSS {ours[1]:.2f} GB")
            lines.append(f"P2   mergekit-yaml:  {theirs[0]:6.1f} s   peak RSS {theirs[1]:.2f} GB")
            lines.append(f"P2   speed-up {theirs[0] / ours[0]:.2f}x (target >= 3x); one model is {model_gb:.2f} GB")
            if name == "ties":
                lines.append(f"P2   outputs: {diff['differing']} entries differ, {diff['at_tie']} of them at a tied "
                             f"top-k threshold (mergekit's argsort order among equal |delta| is unspecified); "
                             f"max relative difference {diff['max_rel']:.2e} overall, "
                             f"{diff['max_rel_rest']:.2e} over the rest (target <= 1e-6)")
            else:
                lines.append(f"P2   outputs: max relative difference {diff['max_rel']:.2e} (target <= 1e-6)")
            print("\n".join(lines[-5:]), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="P1's device: cpu or cuda")
    parser.add_argument("--layers", type=int, default=12, help="the model's depth (12: 134M parameters)")
    parser.add_argument("--threads", default="default,1",
                        help="torch thread counts for P1 and OMP_NUM_THREADS for P2, comma-separated")
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--order-stats-grid", help="materializer order statistics for P1: a grid size or 'none' (full)")
    parser.add_argument("--stats-memory", action="store_true", help="P1 memory lines: full vs grid statistics")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one process of --stats-memory
    parser.add_argument("--json", type=Path, help="write the results here (e.g. benchmarks/results/merge_throughput_after.json)")
    args = parser.parse_args()
    if args.memory_probe is not None:
        base, experts, _ = build_family()
        print(json.dumps(memory_probe(base, experts, args.memory_probe)))
        return
    settings = list(dict.fromkeys(s.strip() for s in args.threads.split(",")))
    torch.manual_seed(0)
    base, experts, n_params = build_family(layers=args.layers)
    print(f"model: Llama, {n_params / 1e6:.0f}M parameters, {len(experts)} experts; "
          f"torch threads {DEFAULT_THREADS}; {load()}", flush=True)
    lines = []
    if not args.skip_memory:
        counts = list(dict.fromkeys(DEFAULT_THREADS if s == "default" else int(s) for s in settings))
        lines += materializer_bandwidth(base, experts, args.reps, counts, args.order_stats_grid, args.device)
        print("\n".join(lines), flush=True)
    if args.stats_memory:
        lines += stats_memory(["none", "65536"])
    if not args.skip_disk:
        lines += disk_merge(base, experts, settings)  # prints each comparison as it finishes
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.update(command=" ".join(sys.argv), torch_threads=DEFAULT_THREADS, cpus=os.cpu_count(), lines=lines)
        args.json.write_text(json.dumps(RESULTS, indent=2) + "\n")


if __name__ == "__main__":
    main()
