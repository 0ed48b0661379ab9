"""Zoo training step: float32 vs bfloat16 autocast, SDPA vs eager attention, against the matmul floor.

Times `evomerge.zoo._train.train` itself on the small zoo's model and base-mixture batches (128 rows),
the four precision / attention combinations interleaved round by round so that the machine's drift
hits them alike, and prints each one's milliseconds per step next to the floor: the step's matmul
FLOPs (forward + backward) at this machine's large-matmul throughput in that dtype.

    python benchmarks/zoo_training_step.py [--steps 30] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from evomerge.zoo._sizes import get_size
from evomerge.zoo._tasks import TaskSplitSizes, make_task_splits
from evomerge.zoo._train import BatchPart, encode_examples, init_model, make_sampler, model_config, train

SETTINGS = (("float32", None, "sdpa"), ("float32", None, "eager"),
            ("bfloat16 autocast", torch.bfloat16, "sdpa"), ("bfloat16 autocast", torch.bfloat16, "eager"))


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    size = get_size("small")
    parts = []
    for task, rows in size.base_mix.items():
        data = make_task_splits(task, TaskSplitSizes(train=4000, validation=0, test=0), 0)["train"]
        parts.append(BatchPart(encode_examples(data["prompt"], data["answer"]), rows))
    config = model_config(size.hidden, size.layers, size.heads, size.intermediate)

    def time_one(autocast, attention: str) -> float:
        model = init_model(config, 0)
        sample = make_sampler(parts, torch.Generator().manual_seed(0))
        train(model, sample, steps=3, lr=1e-4, warmup=1, autocast=autocast, attention=attention)  # warm-up
        start = time.perf_counter()
        train(model, sample, steps=args.steps, lr=1e-4, warmup=1, autocast=autocast, attention=attention)
        return (time.perf_counter() - start) / args.steps * 1000

    times: dict[int, list[float]] = {i: [] for i in range(len(SETTINGS))}
    for _ in range(args.rounds):
        for i, (_, autocast, attention) in enumerate(SETTINGS):
            times[i].append(time_one(autocast, attention))

    sample = make_sampler(parts, torch.Generator().manual_seed(0))
    tokens = statistics.mean(sample().inputs.numel() for _ in range(50))
    linear = sum(m.weight.numel() for m in init_model(config, 0).modules() if isinstance(m, torch.nn.Linear))
    flops = 6 * tokens * linear  # forward 2, backward 4 FLOPs per weight and token
    floor = {None: flops / matmul_gflops(torch.float32) / 1e6, torch.bfloat16: flops / matmul_gflops(torch.bfloat16) / 1e6}

    print(f"small zoo model, batch {sum(size.base_mix.values())} rows x {tokens / sum(size.base_mix.values()):.1f} "
          f"tokens, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps")
    reference = statistics.median(times[0])
    for i, (precision, autocast, attention) in enumerate(SETTINGS):
        ms = statistics.median(times[i])
        print(f"  {precision:18s} {attention:5s}  {ms:6.1f} ms/step  {reference / ms:4.2f}x float32-sdpa  "
              f"matmul floor {floor[autocast]:5.1f} ms ({ms / floor[autocast]:.1f}x)")


if __name__ == "__main__":
    main()
