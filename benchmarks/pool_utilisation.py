"""Worker-pool utilisation: the fraction of worker time spent evaluating, generations vs async.

Usage: .venv/bin/python benchmarks/pool_utilisation.py [--evaluations 240] [--scale 0.25 0.1] [--workers 2 4 8]
       [--record]

Issue 17, item 2. The real search loop (`evomerge.runs.search.Search`: the optimizer's ask/tell, the
log appended and fsynced per candidate, a checkpoint per generation or round, the Pareto file)
drives a fake pool (`SleepPool`): W worker threads that sleep for each candidate's evaluation time
instead of materialising and scoring a model (sleeping workers need no cores, so 8 workers fit on
this 2-core machine). Evaluation times are heterogeneous, as merged-model evaluations are
(generation lengths for long answers, early stopping, materialisation on a busy host): per candidate id
a seeded log-normal draw, median `scale` seconds, sigma 0.75 (a heavy-ish right tail: the slowest of 8
is about 3x the median); every schedule sees the same time for the same candidate id. The optimizer is
M2N2 (archive 2W; generations of W children, the generational schedule's best case: one
candidate per worker), objectives and per-item answers a fixed function of the genome.

busy = sum over candidates of the time a worker spent on it / (W x the search's wall time, from
`run()` to its return). Prints one line per (W, schedule) and the async / generations ratio;
`--record` writes them into benchmarks/RESULTS.md between the pool_utilisation markers.
"""
from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from evomerge.runs.config import RunConfig
from evomerge.runs.problem import Evaluation
from evomerge.runs.search import Search
from evomerge.runs.store import RunStore
from evomerge.search.optimizers import make_optimizer

TASKS = ("a", "b")
ITEMS = 8  # per task: the per-item answers M2N2 competes on
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class FakeFitness:
    """What the search reads from a compressed fitness: the task names and subset sizes."""

    task_names = list(TASKS)
    path = "<sleep pool>"

    def subset_size(self, task: str) -> int:
        return ITEMS


class FakeSpace:
    def __init__(self, dim: int):
        self.dim, self.bounds = dim, (0.0, 1.0)
        self.gene_blocks = np.arange(dim)


def evaluation(candidate_id: int, genome: np.ndarray, seconds: float, worker: str) -> Evaluation:
    """A fixed function of the genome: task a peaks at 0.3, task b at 0.7; item j is solved when the
    task's score beats j / ITEMS."""
    g = np.asarray(genome, dtype=float)
    scores = {"a": 1 - float(np.mean((g - 0.3) ** 2)), "b": 1 - float(np.mean((g - 0.7) ** 2))}
    thresholds = 0.85 + 0.15 * np.arange(ITEMS) / ITEMS
    responses = {t: [int(v > th) for th in thresholds] for t, v in scores.items()}
    return Evaluation(candidate_id, scores, {t: 0.0 for t in TASKS}, responses, ITEMS * len(TASKS),
                      seconds={"evaluate": seconds}, worker=worker)


class SleepPool:
    """A worker pool of `workers` threads; a candidate's evaluation sleeps `seconds_of(candidate_id)`.

    Both halves of the backend protocol: `evaluate(batch, on_result)` (generations) and
    `submit` / `next_result` (async). `intervals` holds each evaluation's (start, end) on
    `time.perf_counter`'s clock."""

    def __init__(self, workers: int, seconds_of: Callable[[int], float]):
        self.workers, self.seconds_of = workers, seconds_of
        self._executor = ThreadPoolExecutor(workers)
        self._done: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.intervals: list[tuple[float, float]] = []
        self.order: list[int] = []  # candidate ids in the order they finished
        self.workers_of: list[str] = []  # the thread that ran each interval

    def _work(self, candidate_id: int, genome: np.ndarray) -> Evaluation:
        seconds = self.seconds_of(candidate_id)
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        with self._lock:
            self.intervals.append((start, end))
            self.order.append(candidate_id)
            self.workers_of.append(threading.current_thread().name)
        return evaluation(candidate_id, genome, end - start, threading.current_thread().name)

    def submit(self, candidate_id: int, genome: np.ndarray) -> None:
        future = self._executor.submit(self._work, candidate_id, np.asarray(genome).copy())
        future.add_done_callback(lambda f: self._done.put(f.result()))

    def next_result(self, timeout: float | None = None) -> Evaluation | None:
        try:
            return self._done.get(timeout=timeout) if timeout != 0 else self._done.get_nowait()
        except queue.Empty:
            return None

    def evaluate(self, candidates, on_result=None) -> list[Evaluation]:
        for candidate_id, genome in candidates:
            self.submit(candidate_id, genome)
        results = []
        for _ in candidates:
            results.append(self.next_result())
            if on_result is not None:
                on_result(results[-1])
        return sorted(results, key=lambda e: e.candidate_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def sleep_search(root: Path, name: str, workers: int, schedule: str, seconds_of: Callable[[int], float],
                 evaluations: int, optimizer: str = "m2n2", settings: dict | None = None, dim: int = 6,
                 seed: int = 0) -> dict:
    """One search on a SleepPool; returns busy fraction, wall seconds, the evaluation intervals and
    the run folder."""
    settings = dict(settings if settings is not None else {"archive_size": 2 * workers, "batch_size": workers})
    config = RunConfig.model_validate({
        "name": name, "models": {"base": "base", "experts": ["e0", "e1"]}, "search_space": "sleep",
        "fitness": {"name": "sleep"}, "optimizer": {"name": optimizer, "settings": settings},
        "budget": {"evaluations": evaluations},
        "workers": {"backend": "inprocess", "num_workers": workers, "schedule": schedule},
        "seed": seed, "runs_dir": str(root)})
    store = RunStore.create(root / name, config.to_yaml())
    pool = SleepPool(workers, seconds_of)
    opt = make_optimizer(optimizer, dim, (0.0, 1.0), len(TASKS), seed=seed, **settings)
    search = Search(store, config, FakeFitness(), echo=lambda *a: None, space=FakeSpace(dim), optimizer=opt,
                    backend=pool)
    try:
        started = time.perf_counter()
        search.run(progress=False)
        wall = time.perf_counter() - started
    finally:
        search.close()
    busy = sum(end - start for start, end in pool.intervals)
    first, last = min(s for s, _ in pool.intervals), max(e for _, e in pool.intervals)
    # the drain: once a worker finds nothing left to do, it idles until the last candidate finishes
    ends = {}
    for (start, end), worker in zip(pool.intervals, pool.workers_of):
        ends[worker] = max(ends.get(worker, 0.0), end)
    drain = sum(last - e for e in ends.values()) + (workers - len(ends)) * (last - first)
    return {"workers": workers, "schedule": search.schedule, "busy": busy / (workers * wall), "wall": wall,
            "work": busy, "span": last - first, "span_busy": busy / (workers * (last - first)),
            "setup": first - started, "drain": drain / workers, "intervals": pool.intervals, "order": pool.order,
            "run_dir": root / name}


def lognormal_times(scale: float, seed: int = 0, sigma: float = 0.75) -> Callable[[int], float]:
    return lambda candidate_id: float(np.random.default_rng([seed, candidate_id]).lognormal(np.log(scale), sigma))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, default=240)
    parser.add_argument("--scale", type=float, nargs="+", default=[0.25, 0.1], help="median evaluation seconds")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--record", action="store_true", help="write the lines into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale, w in [(scale, w) for scale in args.scale for w in args.workers]:
            row = {}
            for schedule in ("generations", "async"):
                row[schedule] = sleep_search(Path(tmp), f"s{scale}_w{w}_{schedule}", w, schedule,
                                             lognormal_times(scale), args.evaluations)
            g, a = row["generations"], row["async"]
            line = (f"median {scale:g} s, W={w}: busy generations {g['busy']:.1%} ({g['wall']:.2f} s), async {a['busy']:.1%} "
                    f"({a['wall']:.2f} s); async/generations busy x{a['busy'] / g['busy']:.2f}, "
                    f"wall x{a['wall'] / g['wall']:.2f}; {args.evaluations} evaluations, "
                    f"{g['work'] / args.evaluations:.3f} s mean; async: set-up {a['setup']:.2f} s, drain "
                    f"{a['drain']:.2f} s per worker, busy between first start and last end {a['span_busy']:.1%}"
                    + ("" if a["busy"] >= 0.9 else "  [async below 90%]"))
            print(line, flush=True)
            lines.append(line)
    if args.record:
        command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pool_utilisation.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]))
        record(command.strip(), lines)


def record(command: str, lines: list[str]) -> None:
    body = "\n".join(["## Worker-pool utilisation: generations vs async (issue 17, item 2)", "",
                      "Fraction of worker time spent evaluating (sleeping workers, the real search loop; see the "
                      "module docstring of benchmarks/pool_utilisation.py). Target: async >= 90%.", "",
                      f"`{command}`", "", "```", *lines, "```", "",
                      "Where async misses 90% (fast evaluations, many workers) the driver is the bottleneck: "
                      "each result costs an fsynced log line, and every W results a checkpoint and the Pareto "
                      "file (fsynced), a few ms each on this shared 2-core machine (profiled: fsync was half "
                      "of the driver's time at a 0.1 s median with 8 workers), while with 8 workers a result "
                      "arrives every ~15 ms. The rest is the drain: workers idle while the last candidates "
                      "of the budget finish."])
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file
    from results_md import record_section

    record_section("pool_utilisation", body, RESULTS)


if __name__ == "__main__":
    main()
