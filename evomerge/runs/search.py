"""A search run as one object: `Search.create(config)` / `Search.resume(run_dir)`, then `.step()` one
generation at a time or `.run()` to the budget (optuna's `Study`, Ray's `Tuner`). `Run` is the read side.

One generation (`step`):
    genomes = optimizer.ask()                 ids next_id .. next_id + n - 1
    evaluations = backend.evaluate(batch)     decoded, materialised and scored on the workers,
                                              each logged (fsynced) the moment it finishes
    optimizer.tell(...); Pareto archive update
    checkpoint (optimizer, archive, progress) atomically; rewrite pareto.json

A resumed search restores the newest good checkpoint (the state after the last finished
generation: an interrupt never writes one), re-asks the generation that was in flight (the
restored optimizer asks the same genomes) and reuses every evaluation of it already in the log,
so an interruption costs at most the evaluations that were running; a logged evaluation that
cannot be reused (a failure, or another genome) is dropped only when its replacement is about to
be computed. Because evaluation is deterministic, an interrupted-and-resumed run ends with the
same log and Pareto set as an uninterrupted one. The log is read once, when the search is
opened. Budgets are counted in candidate evaluations and in item evaluations; `run` stops after
the generation that reaches `budget.evaluations` or `budget.wall_time`.

Asynchronous schedule (`workers.schedule: async`, steady state): the search keeps
`workers.num_workers` candidates in flight; each one that finishes is logged, told to the optimizer
at once (`tell_one`) and replaced by the next genome (`ask_one`), so a worker never waits for the
slowest candidate of a generation. Only optimizers that take results out of order
(`takes_out_of_order`: random, M2N2, MAP, CMA / TwoPointsDE / NGOpt, and NSGA-II / NSGA-III / GA
with `steady_state: true`; none of them pre-screened) run so; the others run generations, and the
search says so in one line. Which genomes are asked depends on the order the
results arrive in, and the log records it: each record holds `told` (its position in the order of
results told) and `asked_after` (how many results had been told when it was asked). Given that
order the run is reproducible, because the rest is fixed: `num_workers` in flight, one ask after
each tell. A checkpoint is written every `num_workers` results (a "round", counted as
`generation`) and holds, besides the optimizer (with the genomes it handed out and those it asked
but has not handed out yet), archive and counters, the candidates in flight: id, genome and
`asked_after`. A resume restores it, replays the logged results past it in their recorded order
(reusing them: nothing is evaluated again while the replayed run asks the same genomes the log
holds), and from the first result that does not fit (a failure, another genome) on, drops the
rest of the log and evaluates live again; the candidates then in flight go to the workers. A run
folder whose checkpoints are deleted replays its whole log the same way.

Racing (`fitness.adaptive.racing`): a candidate races against the Pareto set fixed when it is
handed out, and that set (its objective vectors) travels with the job to whichever worker scores
it, so every backend gives the same results. With `schedule: generations` every candidate of a
generation races against the set as it stood before that generation (none of the generation's own
results, even on one in-process worker that scores them one after another); with `schedule: async`
against the set after the `asked_after` results told before it was asked. A resume restores the
first from the checkpoint's archive and rebuilds the second, for the candidates in flight, from
the logged results in their recorded order.

The search talks to its optimizer only through the ask/tell protocol: the search space's
structure (`gene_blocks`) and known genomes (`initial_genomes: corners`, as many as the
optimizer's first population holds) are settings every optimizer accepts.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge._atomic import write_json_atomic, write_text_atomic
from evomerge.runs import preflight
from evomerge.runs.config import ConfigError, RunConfig, load_run_config
from evomerge.runs.problem import Evaluation, bind_space
from evomerge.runs.store import RunStore, RunStoreError
from evomerge.search.optimizers import (OPTIMIZERS, Optimizer, decode_plain, encode_plain, make_prescreened,
                                        state_from_dict, state_to_dict)
from evomerge.search.pareto import ParetoArchive, crowding_distance

log = logging.getLogger(__name__)
RUN_META = "run.json"
# Known genomes given to an optimizer whose first population sets no limit: every expert subset up
# to six experts. Chosen on validation (RESULTS.md, "Search levers on validation"): on the medium zoo
# (6 experts) the best merge any method found is a three-expert corner, which the first 20 corners
# (base, singles, pairs, all) do not hold (their best scores 75.2 on validation against 76.4); a
# seeded per-layer MAP search of 120 candidates chose 73.7 from 8 corners and 76.4 (the best corner)
# from all 64, at 146,400 item evaluations against the corners baseline's 384,000.
MAX_CORNERS = 64


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the last checkpoint and the log hold everything; `evomerge resume` continues."""


class SearchFailed(RunStoreError):
    """Every candidate of a generation failed: the run stops with the reason (resume retries it)."""


@dataclass
class Progress:
    """The counters a checkpoint records after each generation."""

    generation: int = 0
    next_id: int = 0
    evaluations: int = 0
    failed: int = 0
    item_evaluations: int = 0
    elapsed: float = 0.0  # seconds spent in generations


@dataclass
class Generation:
    """What one `Search.step()` did: the generation's index and its evaluation records, by id."""

    index: int
    records: list[dict[str, Any]]
    reused: int  # evaluations taken from the log of an interrupted process

    @property
    def failed(self) -> int:
        return sum(r["status"] != "ok" for r in self.records)


class Search:
    """One search in its run folder, held (locked) by this process until `close()`.

        with Search.create("run.yaml") as search:     # or Search.resume("runs/NAME")
            while not search.finished:
                generation = search.step()
            # or: search.run()
    """

    def __init__(self, store: RunStore, config: RunConfig, fitness, *, echo=print, space=None,
                 optimizer: Optimizer | None = None, backend=None):
        """Use `create` or `resume`. Takes over `store`'s lock; `optimizer`: the new one to start
        with when the folder holds no checkpoint; `backend`: a worker pool to use instead of the
        config's (benchmarks: anything with `evaluate`, `submit`, `next_result` and `close`)."""
        self.store = store
        self.config = config
        self.fitness = fitness
        self.echo = echo
        self.tasks = list(fitness.task_names)
        self.space = space or bind_space(config)
        self._results_hash = preflight.results_hash(store.config_text)
        self._backend = backend
        self.schedule = resolve_schedule(config, echo)
        self._adaptive = config.fitness.adaptive is not None  # items differ per candidate (fitness/adaptive.py)
        self._racing = self._adaptive and config.fitness.adaptive.racing  # candidates race against the Pareto set
        self._load_state(optimizer)

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, config: str | os.PathLike | RunConfig, *, overwrite: bool = False, echo=print) -> "Search":
        """Validate the config and everything it names, then create (and lock) `runs/<name>/`."""
        source = None
        if not isinstance(config, RunConfig):
            source = str(Path(config).resolve())
            config = load_run_config(config)
        run_dir = Path(config.runs_dir) / config.name
        preflight.check_ray_address(config)  # an unreachable cluster fails now, before anything is written
        preflight.check_run_dir_is_no_input(run_dir, config, source)
        preflight.check_run_dir_writable(run_dir)
        preflight.check_memory(config, echo)  # prints the memory plan; models that fit nowhere fail here
        fitness = preflight.load_fitness(config)
        space = bind_space(config)
        optimizer = new_optimizer(config, space, len(fitness.task_names))  # a bad space or optimizer fails here
        snapshot = config.to_yaml()
        store = RunStore.create(run_dir, snapshot, overwrite=overwrite)  # locked by this process from here on
        try:
            meta = {"config_sha256": preflight.sha256_text(snapshot), "results_sha256": preflight.results_hash(snapshot),
                    "source": source, "fitness": str(fitness.path), "created": time.time()}
            write_json_atomic(run_dir / RUN_META, meta)
            search = cls(store, config, fitness, echo=echo, space=space, optimizer=optimizer)
        except BaseException:
            store.unlock()
            raise
        echo(f"run folder: {run_dir}")
        echo(f"resume after an interruption with: evomerge resume {run_dir}")
        return search

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, address: str | None = None, echo=print) -> "Search":
        """Open a run to continue it from its newest good checkpoint; refuses a run whose config changed.

        `address`: run the workers on this Ray cluster instead of the one the run used (where the
        workers run does not change the results; "" for a local pool)."""
        store = RunStore.open(run_dir)
        meta_path = store.root / RUN_META
        if not meta_path.is_file():
            raise RunStoreError(f"{store.root}: {RUN_META} missing (the run was interrupted while it was created); "
                                "start it again with `evomerge search CONFIG --overwrite`")
        meta = json.loads(meta_path.read_text())
        if not preflight.same_run(meta, store.config_text):
            raise RunStoreError(f"{store.root / 'config.yaml'} was edited after the run started; resuming would mix "
                                "two searches. Start a new run with the new config instead.")
        source = meta.get("source")
        if source and Path(source).is_file() and not preflight.source_unchanged(meta, source, store.config_text):
            raise RunStoreError(f"{source} changed since this run started (the run's snapshot is "
                                f"{store.root / 'config.yaml'}); start a new run, or restore the file to resume.")
        try:
            config = RunConfig.model_validate(yaml.safe_load(store.config_text))
        except Exception as exc:
            raise ConfigError(f"{store.root / 'config.yaml'}: {exc}") from exc
        if address is not None and address != config.workers.address:
            config = config.model_copy(update={"workers": config.workers.model_copy(update={"address": address or None})})
        preflight.check_ray_address(config)
        preflight.check_memory(config, echo)  # prints the memory plan; models that fit nowhere fail here
        from evomerge.fitness.compressed import CompressedFitness

        fitness = CompressedFitness.load(meta["fitness"])
        preflight.check_estimator(config, meta["fitness"])
        store.lock()  # refuses while another process searches in this folder
        try:
            if config.to_yaml() != store.config_text:  # a new worker address: the snapshot says where it runs now
                write_text_atomic(store.root / "config.yaml", config.to_yaml())
            search = cls(store, config, fitness, echo=echo)
        except BaseException:
            store.unlock()
            raise
        echo(f"resuming {store.root}")
        if search._salvage:
            echo(f"reusing {sum(r['status'] == 'ok' for r in search._salvage.values())} evaluations of the "
                 "interrupted generation")
        return search

    def _load_state(self, optimizer: Optimizer | None = None) -> None:
        """Optimizer, archive and progress from the newest good checkpoint (or new ones), and the log
        once: records of finished generations, and those logged after the checkpoint to reuse."""
        self.store.repair_log()
        restored = self.store.load_latest_checkpoint()
        # asynchronous schedule: candidates asked and not yet told, id -> (genome, asked_after); submitted
        self._flight: dict[int, tuple[np.ndarray, int]] = {}
        self._submitted: set[int] = set()
        self._fronts: dict[int, np.ndarray] = {}  # racing: id -> the Pareto set it races against (fixed at its ask)
        if restored is None:
            self.optimizer = optimizer or new_optimizer(self.config, self.space, len(self.tasks))
            self.archive, self.progress = ParetoArchive(len(self.tasks)), Progress()
        else:
            generation, state = restored
            self.optimizer, self.archive, self.progress = _restore(state, self.store, self._results_hash,
                                                                   self.store.checkpoint_path(generation))
            self._flight = {int(i): (np.asarray(g, dtype=np.float64), int(a)) for i, g, a in state.get("in_flight", [])}
        self._records: dict[int, dict] = {}  # finished generations' records, by id
        self._salvage: dict[int, dict] = {}  # logged past the checkpoint: the generation(s) in flight
        for r in self.store.records():
            if self.schedule == "async":  # told before the checkpoint, or to replay past it
                finished = r.get("told", math.inf) < self.progress.evaluations
            else:
                finished = r["id"] < self.progress.next_id
            (self._records if finished else self._salvage)[r["id"]] = r
        if self._racing and self._flight:
            self._fronts = self._fronts_at_ask()
        self._in_generation = False

    def _fronts_at_ask(self) -> dict[int, np.ndarray]:
        """Racing, asynchronous schedule, after a resume: the Pareto set each candidate in flight was
        asked against, rebuilt as the archive of the first `asked_after` results told (the log's
        records in their recorded order, added as `_tell_one` adds them)."""
        told = sorted((r for r in self._records.values() if "told" in r), key=lambda r: r["told"])
        archive, position, fronts = ParetoArchive(len(self.tasks)), 0, {}
        for candidate_id, (_, asked_after) in sorted(self._flight.items(), key=lambda item: item[1][1]):
            while position < len(told) and told[position]["told"] < asked_after:
                r = told[position]
                if r["status"] == "ok":
                    archive.add(r["id"], [r["objectives"].get(t, np.nan) for t in self.tasks])
                position += 1
            fronts[candidate_id] = archive.objectives
        return fronts

    # ---------------------------------------------------------------- running
    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def finished(self) -> bool:
        """The budget is spent (evaluations or wall time)."""
        b, p = self.config.budget, self.progress
        return ((b.evaluations is not None and p.evaluations >= b.evaluations)
                or (b.wall_time is not None and p.elapsed >= b.wall_time)) and not self._flight

    def _pool(self):
        if self._backend is None:
            from evomerge.runs.backends import make_backend

            self._backend = make_backend(self.config, self.fitness)
        return self._backend

    def step(self) -> Generation:
        """Run one generation: ask, evaluate (reusing logged evaluations), log, tell, checkpoint
        (asynchronous schedule: one round, `num_workers` results told as they arrive)."""
        if self._in_generation:  # the last step was interrupted after its ask: start again from the checkpoint
            if self.schedule == "async" and self._backend is not None:  # it holds candidates submitted before
                backend, self._backend = self._backend, None
                backend.close()
            self._load_state()
        if self.schedule == "async":
            return self._step_async()
        self._pool()
        started = time.perf_counter()
        self._in_generation = True
        genomes = self.optimizer.ask()
        ids = list(range(self.progress.next_id, self.progress.next_id + len(genomes)))
        genome_of = dict(zip(ids, genomes))
        reused, todo, stale = {}, [], set()
        for candidate_id, genome in genome_of.items():
            old = self._salvage.pop(candidate_id, None)
            if old is not None and old["status"] == "ok" and np.array_equal(np.asarray(old["genome"]), genome):
                reused[candidate_id] = old
            else:
                todo.append((candidate_id, genome))
                if old is not None:
                    stale.add(candidate_id)
        if stale:
            self.store.drop_records(stale)
        written: dict[int, dict] = {}

        def log_result(evaluation: Evaluation) -> None:
            # Each evaluation is logged the moment it finishes: an interruption loses only those in flight.
            candidate_id = evaluation.candidate_id
            written[candidate_id] = _record(evaluation, genome_of[candidate_id], self.progress.generation)
            self.store.append(written[candidate_id])

        if todo:  # racing: the whole generation races against the Pareto set before it
            self._backend.evaluate(todo, on_result=log_result, **self._race_front())
        records = [reused[candidate_id] if candidate_id in reused else written[candidate_id] for candidate_id in ids]
        n_ok = sum(r["status"] == "ok" for r in records)
        if n_ok == 0:
            first = (records[0].get("error") or "unknown").strip().splitlines()[0]
            raise SearchFailed(
                f"every candidate of generation {self.progress.generation} failed ({len(records)} of {len(records)}); "
                f"the search stops (the failures are in {self.store.root / 'evaluations.jsonl'}; `evomerge resume` "
                f"retries them once the cause is fixed). First error: {first}")
        objectives = np.array([[r["objectives"].get(t, np.nan) if r["status"] == "ok" else np.nan for t in self.tasks]
                               for r in records], dtype=np.float64)
        self.optimizer.tell(genomes, objectives, _response_matrix(records, self.tasks, self.fitness, self._adaptive))
        for r, row in zip(records, objectives):
            if r["status"] == "ok":
                self.archive.add(r["id"], row)
        self._records.update((r["id"], r) for r in records)
        p = self.progress
        p.generation += 1
        p.next_id += len(genomes)
        p.evaluations += len(genomes)
        p.failed += len(genomes) - n_ok
        p.item_evaluations += sum(int(r["item_evaluations"]) for r in records)
        p.elapsed += time.perf_counter() - started
        self.store.save_checkpoint(p.generation, self._checkpoint_state())
        self._in_generation = False
        self.store.write_pareto(self.pareto_summary())
        return Generation(p.generation - 1, records, len(reused))

    def _step_async(self) -> Generation:
        """One round of the asynchronous schedule: results told one at a time as they arrive, each
        free worker given the next genome at once, until `num_workers` more are told (or the budget
        is spent); then a checkpoint. Logged results past the checkpoint are replayed first."""
        started = time.perf_counter()
        self._in_generation = True
        p = self.progress
        replay = sorted(self._salvage.values(), key=lambda r: r["told"])  # recorded order past the checkpoint
        records: list[dict] = []
        reused = 0
        # Live results told and not yet logged: the log is written (fsynced) once every finished result
        # is told and its worker has its next genome (when the pool can say nothing else has finished),
        # so the writes do not keep a worker waiting; always before the round's checkpoint.
        unlogged: list[dict] = []
        end = p.evaluations + self.config.workers.num_workers
        while True:
            self._fill(started)
            if not replay:
                self._submit_flight()
            if p.evaluations >= end or not self._flight:
                break  # the round is complete (its successors asked and at work), or the budget is spent
            record = None
            if replay:
                r = replay[0]
                flight = self._flight.get(r["id"])
                if (r["told"] == p.evaluations and r["status"] == "ok" and flight is not None
                        and r.get("asked_after") == flight[1] and np.array_equal(np.asarray(r["genome"]), flight[0])):
                    record = replay.pop(0)
                    self._salvage.pop(record["id"])
                    reused += 1
                else:  # the replayed run goes another way from here: evaluate again what follows
                    self.store.drop_records({r["id"] for r in replay})
                    replay = []
                    self._salvage.clear()
                    self._submit_flight()
            if record is None:
                evaluation = self._next_result(poll=bool(unlogged))
                if evaluation is None:  # nothing else has finished: write the log while every worker works
                    self._append(unlogged)
                    continue
                genome, asked_after = self._flight[evaluation.candidate_id]
                record = _record(evaluation, genome, p.generation)
                record.update(told=p.evaluations, asked_after=asked_after)
                unlogged.append(record)
            self._tell_one(record)
            records.append(record)
        self._append(unlogged)
        if not records:
            self._in_generation = False
            return Generation(p.generation, [], 0)
        if not any(r["status"] == "ok" for r in records):
            first = (records[0].get("error") or "unknown").strip().splitlines()[0]
            raise SearchFailed(
                f"every candidate of round {p.generation} failed ({len(records)} of {len(records)}); the search "
                f"stops (the failures are in {self.store.root / 'evaluations.jsonl'}; `evomerge resume` retries "
                f"them once the cause is fixed). First error: {first}")
        p.generation += 1
        p.elapsed += time.perf_counter() - started
        self.store.save_checkpoint(p.generation, self._checkpoint_state())
        self._in_generation = False
        self.store.write_pareto(self.pareto_summary())
        return Generation(p.generation - 1, records, reused)

    def _next_result(self, poll: bool) -> Evaluation | None:
        """The next live result; with `poll`, None unless one has finished already (pools whose
        `next_result` takes no timeout are waited for)."""
        backend = self._pool()
        if not poll:
            return backend.next_result()
        if "timeout" not in inspect.signature(backend.next_result).parameters:
            return None
        return backend.next_result(timeout=0)

    def _race_front(self, candidate_id: int | None = None) -> dict:
        """Racing (`fitness.adaptive.racing`): the backend's `front=` keyword, the Pareto set a job
        races against: the archive as it stands (a generation), or the set fixed when candidate
        `candidate_id` was asked (asynchronous schedule). Without racing no keyword."""
        if not self._racing:
            return {}
        return {"front": self.archive.objectives if candidate_id is None else self._fronts[candidate_id]}

    def _append(self, records: list[dict]) -> None:
        while records:
            self.store.append(records.pop(0))

    def _submit_flight(self) -> None:
        for candidate_id, (genome, _) in self._flight.items():
            if candidate_id not in self._submitted:  # the pool is made only when something is to be evaluated
                self._pool().submit(candidate_id, genome, **self._race_front(candidate_id))
                self._submitted.add(candidate_id)

    def _fill(self, started: float) -> None:
        """Ask genomes until `num_workers` are in flight, the budget allows no more, or the optimizer
        needs a result first."""
        b, p = self.config.budget, self.progress
        while len(self._flight) < self.config.workers.num_workers:
            if b.evaluations is not None and p.next_id >= b.evaluations:
                return
            if b.wall_time is not None and p.elapsed + time.perf_counter() - started >= b.wall_time:
                return
            genome = self.optimizer.ask_one()
            if genome is None:
                if not self._flight:
                    raise RuntimeError(f"optimizer {self.optimizer.name} proposes nothing with no result pending")
                return
            self._flight[p.next_id] = (genome, p.evaluations)
            if self._racing:
                self._fronts[p.next_id] = self.archive.objectives  # fixed now: the job carries it
            p.next_id += 1

    def _tell_one(self, record: dict) -> None:
        genome, _ = self._flight.pop(record["id"])
        self._submitted.discard(record["id"])
        self._fronts.pop(record["id"], None)
        ok = record["status"] == "ok"
        row = np.array([record["objectives"].get(t, np.nan) if ok else np.nan for t in self.tasks], dtype=np.float64)
        self.optimizer.tell_one(genome, row, _response_matrix([record], self.tasks, self.fitness, self._adaptive)[0])
        if ok:
            self.archive.add(record["id"], row)
        self._records[record["id"]] = record
        p = self.progress
        p.evaluations += 1
        p.failed += not ok
        p.item_evaluations += int(record["item_evaluations"])

    def run(self, *, progress: bool = True) -> Path:
        """Generations until the budget is spent; Ctrl-C raises `SearchInterrupted` (resume continues)."""
        from tqdm.auto import tqdm

        total = self.config.budget.evaluations
        bar = tqdm(total=total, initial=min(self.progress.evaluations, total or 0), disable=not progress, unit="eval",
                   desc="search", dynamic_ncols=True, file=sys.stderr)
        best = {t: max((m.objectives[i] for m in self.archive.members), default=float("nan"))
                for i, t in enumerate(self.tasks)}
        try:
            while not self.finished:
                generation = self.step()
                for r in generation.records:
                    for t in self.tasks:
                        if r["status"] == "ok" and np.isfinite(r["objectives"][t]):
                            best[t] = float(np.nanmax([best[t], r["objectives"][t]]))
                bar.update(len(generation.records))
                bar.set_postfix_str(f"gen {self.progress.generation} | "
                                    f"{self.progress.evaluations / max(self.progress.elapsed, 1e-9):.2f} eval/s | "
                                    + " ".join(f"{t}={v:.3f}" for t, v in best.items()))
        except KeyboardInterrupt:
            bar.close()
            last = max((int(p.stem.split("-")[1]) for p in self.store.checkpoints()), default=0)
            self.echo(f"\ninterrupted: the last checkpoint is after generation {last}; evaluations finished since "
                      f"are kept in the log. Continue with: evomerge resume {self.store.root}")
            raise SearchInterrupted() from None
        finally:
            bar.close()
        if self._salvage:  # logged past the budget by an earlier process (a wall-time budget): not part of this run
            self.store.drop_records(set(self._salvage))
            self._salvage.clear()
        # Written again even when no generation ran: an interrupt may have come between checkpoint and Pareto file.
        self.store.write_pareto(self.pareto_summary())
        p = self.progress
        self.echo(f"done: {p.evaluations} candidates ({p.failed} failed), {p.item_evaluations} item evaluations, "
                  f"Pareto set of {len(self.archive)} in {self.store.root / 'pareto.json'}")
        return self.store.root

    def close(self) -> None:
        """Stop the workers and release the run folder."""
        backend, self._backend = self._backend, None
        try:
            if backend is not None:
                backend.close()
        finally:
            self.store.unlock()

    def __enter__(self) -> "Search":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- state
    def _checkpoint_state(self) -> dict:
        state = {"optimizer": state_to_dict(self.optimizer.state()), "archive": encode_plain(self.archive.to_dict()),
                 "counters": asdict(self.progress), "results_sha256": self._results_hash}
        if self.schedule == "async":  # the candidates in flight: the optimizer handed them out, no result yet
            state["in_flight"] = [[i, [float(x) for x in g], a] for i, (g, a) in sorted(self._flight.items())]
        return state

    def pareto_summary(self) -> dict[str, Any]:
        return pareto_summary(self.archive, self._records, self.tasks, asdict(self.progress))


# ------------------------------------------------------------------------------- module API
def start_search(config: str | os.PathLike | RunConfig, *, overwrite: bool = False, progress: bool = True,
                 echo=print) -> Path:
    """`evomerge search`: create the run and search to its budget; returns the run folder."""
    with Search.create(config, overwrite=overwrite, echo=echo) as search:
        return search.run(progress=progress)


def resume_search(run_dir: str | os.PathLike, *, address: str | None = None, progress: bool = True,
                  echo=print) -> Path:
    """`evomerge resume`: continue a run to its budget; returns the run folder."""
    with Search.resume(run_dir, address=address, echo=echo) as search:
        return search.run(progress=progress)


def resolve_schedule(config: RunConfig, echo=print) -> str:
    """"async" when the config asks for it and its optimizer takes results out of order, else
    "generations" (with one line saying why, when async was asked for)."""
    if config.workers.schedule != "async":
        return "generations"
    from evomerge.search.optimizers import PRESCREEN_DEFAULTS

    name, factor = config.optimizer.name, config.optimizer.prescreen
    if factor is None:
        factor = PRESCREEN_DEFAULTS.get(name)
    screened = factor not in (None, 1)
    if OPTIMIZERS[name].takes_out_of_order(config.optimizer.settings) and not screened:
        return "async"
    takers = ", ".join(n for n in OPTIMIZERS if OPTIMIZERS[n].out_of_order)
    steady = ", ".join(n for n in OPTIMIZERS if not OPTIMIZERS[n].out_of_order
                       and OPTIMIZERS[n].takes_out_of_order({"steady_state": True}))
    who = f"optimizer {name} with pre-screening (optimizer.prescreen: {factor:g})" if screened else f"optimizer {name}"
    echo(f"workers.schedule: async: {who} takes results only as whole generations, so this run evaluates "
         f"generations (async: {takers}; {steady} with settings.steady_state: true; each with optimizer.prescreen: 1)")
    return "generations"


def new_optimizer(config: RunConfig, space, n_objectives: int) -> Optimizer:
    """The configured optimizer for this space, through the protocol's shared settings: the genome's
    block structure, and `initial_genomes: corners` as many as its first population holds."""
    settings = {"gene_blocks": space.gene_blocks.tolist(), **config.optimizer.settings}
    name = config.optimizer.name
    try:
        if settings.get("initial_genomes") == "corners":  # the seed models and their obvious merges
            capacity = OPTIMIZERS[name].initial_capacity(settings) or MAX_CORNERS
            try:
                corners = space.corner_genomes(capacity)
            except ValueError as exc:
                raise ConfigError(f"field `optimizer.settings.initial_genomes`: {exc}") from None
            settings["initial_genomes"] = [tuple(g) for g in corners.tolist()]
        if settings.get("parts") == "windows":  # localize and stitch: each expert in each depth window
            try:
                parts, experts = space.window_parts(int(settings.get("window") or 0), int(settings.get("window_stride", 1)))
                empty = space.empty_genome()
            except ValueError as exc:
                raise ConfigError(f"field `optimizer.settings.parts: windows` (window, window_stride): {exc}") from None
            settings.update(parts=[tuple(g) for g in parts.tolist()], part_groups=experts.tolist(),
                            empty=tuple(empty.tolist()))
        return make_prescreened(name, space.dim, space.bounds, n_objectives, seed=config.seed,
                                factor=config.optimizer.prescreen, **settings)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"field `optimizer`: {exc}") from None


def _restore(state: dict, store: RunStore, config_hash: str, path: Path) -> tuple[Optimizer, ParetoArchive, Progress]:
    saved = state.get("results_sha256")
    if saved is None:  # checkpoints written before the address could change hash the whole snapshot
        ok = state.get("config_sha256") in (None, preflight.sha256_text(store.config_text))
    else:
        ok = saved == config_hash
    if not ok:
        raise RunStoreError(f"{path} was written by a search with another config than {store.root / 'config.yaml'}; "
                            "two searches have shared this folder. Start a new run (another `name`).")
    optimizer = Optimizer.from_state(state_from_dict(state["optimizer"]))
    return optimizer, ParetoArchive.from_dict(decode_plain(state["archive"])), Progress(**state["counters"])


def _record(evaluation: Evaluation, genome: np.ndarray, generation: int) -> dict:
    record = asdict(evaluation)
    record["id"] = record.pop("candidate_id")
    record.update({"generation": generation, "genome": [float(x) for x in genome], "time": time.time()})
    return record


def _response_matrix(records: list[dict], tasks: list[str], fitness, adaptive: bool = False) -> np.ndarray:
    """(n, items) subset answers concatenated over tasks; failed candidates answer nothing (zeros).
    Adaptive evaluation: over the whole fitness splits, NaN where an item was not given."""
    if adaptive:
        from evomerge.fitness.adaptive import response_rows

        return response_rows(records, tasks, [fitness.task(t).n_total for t in tasks])
    widths = [fitness.subset_size(t) for t in tasks]
    rows = []
    for r in records:
        if r["status"] == "ok":
            rows.append(np.concatenate([np.asarray(r["responses"][t], dtype=np.float64) for t in tasks]))
        else:
            rows.append(np.zeros(sum(widths)))
    return np.vstack(rows)


def pareto_summary(archive: ParetoArchive, records: dict[int, dict], tasks: list[str], counters: dict) -> dict[str, Any]:
    members = archive.members
    F = archive.objectives
    crowd = crowding_distance(F) if len(members) else np.zeros(0)
    out = []
    for m, c in zip(members, crowd):
        r = records.get(m.candidate_id, {})
        out.append({"id": int(m.candidate_id), "objectives": dict(zip(tasks, map(float, m.objectives))),
                    "stderr": r.get("stderr", {}), "mean": float(np.mean(m.objectives)),
                    "crowding": float(c) if np.isfinite(c) else None, "generation": r.get("generation")})
    out.sort(key=lambda m: -m["mean"])
    return {"tasks": tasks, "members": out, "hypervolume": float(archive.hypervolume(0.0)) if len(members) else 0.0,
            "evaluations": counters["evaluations"], "item_evaluations": counters["item_evaluations"],
            "generation": counters["generation"]}
