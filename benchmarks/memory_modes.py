"""Memory modes of the materializer (issue 17, item 1): peak memory against the plan, and speed against a copy.

Random Llama weights of SmolLM2-135M's shape (30 layers, hidden 576, intermediate 1536, 9 heads /
3 KV heads, vocab 49152, tied embeddings), bf16 checkpoints, base + 3 experts, written to a temporary
folder. Each mode runs in a fresh process:

* peak memory: the process's resident set (VmRSS / VmHWM) before loading, and its peak while
  candidates are written (the high-water mark is reset after loading, and freed heap is returned to
  the system first, so the figure is what the mode holds plus each candidate's transients), against
  `memory_plan.mode_needs` for the same shapes and method. Without a GPU the "device" is host
  memory: the plan's device and host bytes are compared, summed, with the RSS delta.
* time: per candidate, `Materializer.apply` against a plain copy of the same stored bytes out of the
  same place (device blocks, host blocks, or the cache's map) into one reused buffer, alternated in
  one process; the ratio is materialisation / copy.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_modes.py [--methods task_arithmetic,ties]

`--device cuda` puts the materializer on the GPU: the device peak is then `torch.cuda.max_memory_allocated`
against the plan's device bytes, and the RSS delta against its host bytes. `--layers N` shrinks the model
(30 is SmolLM2-135M's; benchmarks/gpu_check.sh --cpu-dry-run uses 1).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_135M = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)
MODES = ("resident", "host", "disk")


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def release_heap() -> None:
    """Return freed heap pages to the system (glibc), so the RSS counts what is held, not what was."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS


def build_family(root: Path, layers: int = SMOLLM2_135M["layers"]) -> tuple[Path, list[Path]]:
    import torch
    from transformers import LlamaConfig

    from evomerge.testing import make_family

    s = SMOLLM2_135M
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=layers,
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                         tie_word_embeddings=s["tied"], max_position_embeddings=2048)
    return make_family(root, n_experts=3, seed=0, delta_scale=0.02, dtype=torch.bfloat16, config=config)


def child(args: argparse.Namespace) -> None:
    """One mode in this process; prints one JSON line."""
    import torch

    from evomerge.merge.materializer import Materializer
    from evomerge.merge.memory_plan import ModelShapes, mode_needs

    import transformers.models.llama.modeling_llama  # noqa: F401  (loaded before the baseline, not counted)

    base, experts = Path(args.base), [Path(p) for p in args.experts.split(",")]
    torch.ones(1 << 20).add_(1).sum()  # torch's first kernels: code pages, before the baseline
    release_heap()
    before, _ = rss()
    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    mat = Materializer.from_folders(base, experts, device=args.device, memory=args.mode, compile=False,
                                    cache_dir=args.cache_dir, cache_random_draws=False, seed=0)
    load_s = time.perf_counter() - t0
    release_heap()
    held, _ = rss()
    reset_peak()
    if cuda:
        torch.cuda.synchronize()
        device_held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    weights = [[0.5, 0.3, 0.4]]
    kwargs = {"weight": weights[0]}
    if args.method != "task_arithmetic":
        kwargs["density"] = [0.5, 0.6, 0.4]
    first = time.perf_counter()
    mat.apply(args.method, **kwargs)  # builds the method's per-tensor caches (order statistics, ...)
    first_s = time.perf_counter() - first
    mat.apply(args.method, **kwargs)
    _, peak = rss()
    device_peak = torch.cuda.max_memory_allocated() if cuda else 0

    store = mat.store
    buffer = torch.empty((store.num_experts + 1) * store.max_numel, dtype=store.dtype, device=store.device)

    def plain_copy() -> None:  # the same stored bytes, out of the same place, into one reused buffer
        for i, n in enumerate(store.numels):
            source = store._blocks[i].view(-1) if store.mode != "disk" else store._source(i)
            buffer[:source.numel()].copy_(source)
            store._release(i)

    materialize, copy = [], []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.reps):  # alternated: both see the same machine load
        sync()
        t = time.perf_counter()
        mat.apply(args.method, **kwargs)
        sync()
        materialize.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain_copy()
        sync()
        copy.append(time.perf_counter() - t)
    shapes = ModelShapes.from_folders(base, experts)
    need = mode_needs(shapes, args.method, cuda=cuda, sort_workers=torch.get_num_threads())[args.mode]
    copied = sum((store.num_experts + 1) * n for n in store.numels) * torch.tensor([], dtype=store.dtype).element_size()
    print(json.dumps({"mode": args.mode, "method": args.method, "before": before, "held": held, "peak": peak,
                      "plan_device": need.device_bytes, "plan_host": need.host_bytes, "plan_disk": need.disk_bytes,
                      "load_s": load_s, "first_s": first_s, "materialize_s": statistics.median(materialize),
                      "copy_s": statistics.median(copy), "copied_bytes": copied,
                      "threads": torch.get_num_threads(), "device": args.device,
                      "device_held": device_held if cuda else 0, "device_peak": device_peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (the device is host memory) or cuda")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["layers"], help="30: SmolLM2-135M's shape")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--experts", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="memory_modes_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        base, experts = build_family(root / "family", args.layers)
        print(f"# models: random Llama weights of SmolLM2-135M's shape ({args.layers} layers), bf16, base + 3 experts "
              f"({time.perf_counter() - t:.0f} s to write)", flush=True)
        lines = []
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                command = [sys.executable, __file__, "--child", "--mode", mode, "--method", method, "--base", str(base),
                           "--experts", ",".join(map(str, experts)), "--cache-dir", str(root / "cache"),
                           "--reps", str(args.reps), "--device", args.device]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                delta = r["peak"] - r["before"]
                plan = r["plan_device"] + r["plan_host"]
                if r["device"].startswith("cuda"):  # device and host measured apart
                    line = (f"memory_modes {mode:<8} {method:<15} {r['device']} peak {r['device_peak'] / 1e9:.3f} GB vs "
                            f"plan {r['plan_device'] / 1e9:.3f} GB = {r['device_peak'] / r['plan_device']:.3f}x; host "
                            f"peak RSS delta {delta / 1e9:.3f} GB vs plan {r['plan_host'] / 1e9:.3f} GB | per candidate "
                            f"{r['materialize_s'] * 1e3:.1f} ms vs plain copy of the same {r['copied_bytes'] / 1e9:.2f} GB "
                            f"{r['copy_s'] * 1e3:.1f} ms = {r['materialize_s'] / r['copy_s']:.1f}x (first candidate "
                            f"{r['first_s']:.1f} s, load {r['load_s']:.1f} s)")
                    print(line, flush=True)
                    lines.append(line)
                    continue
                line = (f"memory_modes {mode:<8} {method:<15} peak RSS delta {delta / 1e9:.3f} GB vs plan "
                        f"{plan / 1e9:.3f} GB (device {r['plan_device'] / 1e9:.3f} + host {r['plan_host'] / 1e9:.3f}; "
                        f"CPU: the device is host memory) = {delta / plan:.3f}x; held after load "
                        f"{(r['held'] - r['before']) / 1e9:.3f} GB | per candidate {r['materialize_s']:.2f} s vs plain "
                        f"copy of the same {r['copied_bytes'] / 1e9:.2f} GB {r['copy_s']:.3f} s = "
                        f"{r['materialize_s'] / r['copy_s']:.1f}x (first candidate {r['first_s']:.1f} s, load "
                        f"{r['load_s']:.1f} s, {r['threads']} thread)")
                print(line, flush=True)
                lines.append(line)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
