"""The search loop: ask the optimizer, score the batch on the workers, log, tell, checkpoint.

One generation at a time:
    genomes = optimizer.ask()                 ids next_id .. next_id + n - 1
    evaluations = backend.evaluate(batch)     ordered by id, whatever ran them
    append each record to evaluations.jsonl (fsynced)
    optimizer.tell(...); Pareto archive update
    checkpoint (optimizer, archive, counters) atomically; rewrite pareto.json

A resumed run restores the newest good checkpoint, re-asks the generation that was in flight
(the restored optimizer asks the same genomes) and reuses every evaluation of it already in the
log, so an interruption costs at most the evaluations that were running. Because evaluation is
deterministic, an interrupted-and-resumed run ends with the same Pareto set as an uninterrupted
one. Budgets are counted in candidate evaluations and in item evaluations; the loop stops after
the generation that reaches `budget.evaluations` or `budget.wall_time`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge._atomic import write_json_atomic, write_text_atomic
from evomerge.runs.config import ConfigError, RunConfig, load_run_config
from evomerge.runs.problem import Evaluation, bind_space
from evomerge.runs.store import RunStore, RunStoreError
from evomerge.search.optimizers import Optimizer, state_from_dict, state_to_dict
from evomerge.search.pareto import ParetoArchive, crowding_distance

log = logging.getLogger(__name__)
RUN_META = "run.json"


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the state is checkpointed; `evomerge resume` continues."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_fitness(config: RunConfig) -> str:
    """The compressed fitness to use, calibrating it first when the config asks for that.

    A fitness that exists is checked, before anything runs, against the task data on disk (data
    hashes) and against the run's models (weights fingerprints): either changing makes it stale.
    """
    from evomerge.fitness.compressed import resolve_fitness_path

    fit = config.fitness
    if fit.calibrate:
        from evomerge.fitness.calibrate import calibrate_from_config, calibration_output_path
        from evomerge.fitness.compressed import FITNESS_FILE

        # Where calibrating saves (beside the calibration config, or `name`): made once, then reused.
        target = calibration_output_path(fit.calibrate, name=fit.name)
        if (target / FITNESS_FILE).is_file():
            return _checked_fitness(target, config)
        return str(calibrate_from_config(fit.calibrate, name=fit.name))
    return _checked_fitness(resolve_fitness_path(fit.name), config)


def _checked_fitness(path: Path, config: RunConfig) -> str:
    from evomerge.fitness.compressed import CompressedFitness

    fitness = CompressedFitness.load(path)  # a stale source-data hash is an error here
    models = config.models
    mismatches = fitness.model_mismatches(models.base, models.experts, allow_pickle=models.allow_pickle)
    if mismatches:
        raise ConfigError(f"field `fitness`: {path} was calibrated on other models than this run's `models` "
                          f"({'; '.join(mismatches)}); recalibrate it for these models "
                          "(`evomerge fitness calibrate CONFIG --overwrite`) or name a fitness made for them")
    return str(path)


# ------------------------------------------------------------------------------- config identity
def results_hash(config_text: str) -> str:
    """SHA-256 of what decides a run's results: the config snapshot less `workers.address`.

    Where the workers run does not change what they compute, so a resume may point at another
    Ray cluster; every other field (models, space, fitness, optimizer, budget, seed, ...) is fixed."""
    data = yaml.safe_load(config_text) or {}
    (data.get("workers") or {}).pop("address", None)
    return _sha(json.dumps(data, sort_keys=True, default=str))


def _same_run(meta: dict, config_text: str) -> bool:
    if "results_sha256" in meta:
        return meta["results_sha256"] == results_hash(config_text)
    return meta.get("config_sha256") == _sha(config_text)  # runs started before the address could change


def _check_ray_address(config: RunConfig) -> None:
    if config.workers.backend == "ray" and config.workers.address:
        from evomerge.runs.backends import check_ray_address

        check_ray_address(config.workers.address)


def _check_estimator(config: RunConfig, fitness_path: str) -> None:
    from evomerge.fitness.estimators import ESTIMATORS

    name = config.fitness.estimator
    if name is not None and name not in ESTIMATORS:
        raise ConfigError(f"field `fitness.estimator`: unknown estimator {name!r}; valid: {sorted(ESTIMATORS)} "
                          f"(or leave it out for the one {fitness_path} recommends)")


# ------------------------------------------------------------------------------- starting
def start_search(config: str | os.PathLike | RunConfig, *, overwrite: bool = False, progress: bool = True,
                 echo=print) -> Path:
    """Validate the config, create `runs/<name>/`, and run the search to its budget."""
    source = None
    if not isinstance(config, RunConfig):
        source = str(Path(config).resolve())
        config = load_run_config(config)
    run_dir = Path(config.runs_dir) / config.name
    _check_ray_address(config)  # an unreachable cluster fails now, before anything is written
    _check_run_dir_is_no_input(run_dir, config, source)
    fitness_path = resolve_fitness(config)
    _check_estimator(config, fitness_path)
    # Fail on a bad space or optimizer before anything is written.
    from evomerge.fitness.compressed import CompressedFitness

    space = bind_space(config)
    _new_state(config, space, len(CompressedFitness.load(fitness_path, check_data=False).task_names))
    snapshot = config.to_yaml()
    store = RunStore.create(run_dir, snapshot, overwrite=overwrite)  # locked by this process from here on
    try:
        meta = {"config_sha256": _sha(snapshot), "results_sha256": results_hash(snapshot), "source": source,
                "fitness": fitness_path, "created": time.time()}
        write_json_atomic(run_dir / RUN_META, meta)
        echo(f"run folder: {run_dir}")
        echo(f"resume after an interruption with: evomerge resume {run_dir}")
        return _run(store, config, fitness_path, progress=progress, echo=echo)
    finally:
        store.unlock()


def _check_run_dir_is_no_input(run_dir: Path, config: RunConfig, source: str | None) -> None:
    """A run folder must not be, hold, or sit inside one of the run's inputs (`--overwrite` would delete it)."""
    target = run_dir.resolve()
    inputs = {"models.base": config.models.base, "config": source,
              **{f"models.experts[{i}]": e for i, e in enumerate(config.models.experts)}}
    for field_name, value in inputs.items():
        if not value:
            continue
        path = Path(value).resolve()
        if path == target or target in path.parents or path in target.parents:
            raise ConfigError(f"the run folder {run_dir} (`runs_dir`/`name`) overlaps the run's input {field_name} "
                              f"({path}); choose another `runs_dir` or `name`")


def resume_search(run_dir: str | os.PathLike, *, address: str | None = None, progress: bool = True,
                  echo=print) -> Path:
    """Continue a run from its newest good checkpoint; refuses a run whose config changed.

    `address`: run the workers on this Ray cluster instead of the one the run used (where the
    workers run does not change the results)."""
    store = RunStore.open(run_dir)
    meta_path = store.root / RUN_META
    if not meta_path.is_file():
        raise RunStoreError(f"{store.root}: {RUN_META} missing (the run was interrupted while it was created); "
                            "start it again with `evomerge search CONFIG --overwrite`")
    meta = json.loads(meta_path.read_text())
    if not _same_run(meta, store.config_text):
        raise RunStoreError(f"{store.root / 'config.yaml'} was edited after the run started; resuming would mix two "
                            "searches. Start a new run with the new config instead.")
    source = meta.get("source")
    if source and Path(source).is_file() and not _source_unchanged(meta, source, store.config_text):
        raise RunStoreError(f"{source} changed since this run started (the run's snapshot is "
                            f"{store.root / 'config.yaml'}); start a new run, or restore the file to resume.")
    try:
        config = RunConfig.model_validate(yaml.safe_load(store.config_text))
    except Exception as exc:
        raise ConfigError(f"{store.root / 'config.yaml'}: {exc}") from exc
    if address is not None and address != config.workers.address:
        config = config.model_copy(update={"workers": config.workers.model_copy(update={"address": address or None})})
    _check_ray_address(config)
    store.lock()  # refuses while another process searches in this folder
    try:
        if config.to_yaml() != store.config_text:  # a new worker address: the snapshot says where it runs now
            write_text_atomic(store.root / "config.yaml", config.to_yaml())
        echo(f"resuming {store.root}")
        return _run(store, config, meta["fitness"], progress=progress, echo=echo)
    finally:
        store.unlock()


def _source_unchanged(meta: dict, source: str, snapshot: str) -> bool:
    if "results_sha256" not in meta:
        return _sha(Path(source).read_text()) == meta.get("source_sha256")
    try:
        return results_hash(load_run_config(source).to_yaml()) == results_hash(snapshot)
    except ConfigError:
        return False


# ------------------------------------------------------------------------------- the loop
def _new_state(config: RunConfig, space, n_objectives: int):
    dim, bounds = space.dim, space.bounds
    settings = dict(config.optimizer.settings)
    if config.optimizer.name == "m2n2":
        settings.setdefault("gene_layer_index", space.gene_blocks.tolist())
    if settings.get("initial_genomes") == "corners":  # the seed models and their obvious merges
        try:
            # at most one archive (M2N2) or population (pymoo) of them
            corners = space.corner_genomes(settings.get("archive_size", settings.get("pop_size", 20)))
        except ValueError as exc:
            raise ConfigError(f"field `optimizer.settings.initial_genomes`: {exc}") from None
        settings["initial_genomes"] = [tuple(g) for g in corners.tolist()]
    from evomerge.search.optimizers import make_prescreened

    try:
        optimizer = make_prescreened(config.optimizer.name, dim, bounds, n_objectives, seed=config.seed,
                                     factor=config.optimizer.prescreen, **settings)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"field `optimizer`: {exc}") from None
    return optimizer, ParetoArchive(n_objectives), {"generation": 0, "next_id": 0, "evaluations": 0,
                                                     "failed": 0, "item_evaluations": 0, "elapsed": 0.0}


def _checkpoint_state(optimizer: Optimizer, archive: ParetoArchive, counters: dict, config_hash: str) -> dict:
    from evomerge.search.optimizers import encode_plain

    return {"optimizer": state_to_dict(optimizer.state()), "archive": encode_plain(archive.to_dict()),
            "counters": dict(counters), "results_sha256": config_hash}


def _restore(state: dict, store: RunStore, config_hash: str, path: Path) -> tuple[Optimizer, ParetoArchive, dict]:
    from evomerge.search.optimizers import decode_plain

    saved = state.get("results_sha256")
    if saved is None:  # checkpoints written before the address could change hash the whole snapshot
        ok = state.get("config_sha256") in (None, _sha(store.config_text))
    else:
        ok = saved == config_hash
    if not ok:
        raise RunStoreError(f"{path} was written by a search with another config than {store.root / 'config.yaml'}; "
                            "two searches have shared this folder. Start a new run (another `name`).")
    optimizer = Optimizer.from_state(state_from_dict(state["optimizer"]))
    return optimizer, ParetoArchive.from_dict(decode_plain(state["archive"])), dict(state["counters"])


def _budget_left(config: RunConfig, counters: dict, started: float) -> bool:
    b = config.budget
    if b.evaluations is not None and counters["evaluations"] >= b.evaluations:
        return False
    elapsed = counters["elapsed"] + (time.perf_counter() - started)
    return not (b.wall_time is not None and elapsed >= b.wall_time)


def _record(evaluation: Evaluation, genome: np.ndarray, generation: int) -> dict:
    record = asdict(evaluation)
    record["id"] = record.pop("candidate_id")
    record.update({"generation": generation, "genome": [float(x) for x in genome], "time": time.time()})
    return record


class SearchFailed(RunStoreError):
    """Every candidate of a generation failed: the run stops with the reason (resume retries it)."""


def _run(store: RunStore, config: RunConfig, fitness_path: str, *, progress: bool, echo) -> Path:
    """The generation loop, for a store this process holds locked.

    Nothing already on disk is destroyed on the way in: the newest checkpoint is the state after
    the last finished generation (an interrupt never writes one), and the log's evaluations past
    it are reused when the restored optimizer asks the same genomes again. A logged evaluation
    that cannot be reused (a failure, or another genome) is dropped only when its replacement is
    about to be computed."""
    try:
        return _loop(store, config, fitness_path, progress=progress, echo=echo)
    except KeyboardInterrupt:
        generation = max((int(p.stem.split("-")[1]) for p in store.checkpoints()), default=0)
        echo(f"\ninterrupted: the last checkpoint is after generation {generation}; evaluations finished since are "
             f"kept in the log. Continue with: evomerge resume {store.root}")
        raise SearchInterrupted() from None


def _loop(store: RunStore, config: RunConfig, fitness_path: str, *, progress: bool, echo) -> Path:
    from tqdm.auto import tqdm

    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.runs.backends import make_backend

    fitness = CompressedFitness.load(fitness_path)
    tasks = list(fitness.task_names)
    space = bind_space(config)
    config_hash = results_hash(store.config_text)
    store.repair_log()
    restored = store.load_latest_checkpoint()
    if restored is None:
        optimizer, archive, counters = _new_state(config, space, len(tasks))
    else:
        generation, state = restored
        optimizer, archive, counters = _restore(state, store, config_hash, store.checkpoint_path(generation))
    done: dict[int, dict] = {}  # the log's records of finished generations, by id
    salvage: dict[int, dict] = {}  # evaluations logged after the checkpoint: the generation(s) in flight
    for r in store.records():
        (done if r["id"] < counters["next_id"] else salvage)[r["id"]] = r
    if salvage:
        echo(f"reusing {sum(r['status'] == 'ok' for r in salvage.values())} evaluations of the interrupted generation")

    backend = make_backend(config, fitness_path)
    started = time.perf_counter()
    total = config.budget.evaluations
    bar = tqdm(total=total, initial=min(counters["evaluations"], total or 0), disable=not progress, unit="eval",
               desc="search", dynamic_ncols=True, file=sys.stderr)
    best = {t: max((m.objectives[i] for m in archive.members), default=float("nan")) for i, t in enumerate(tasks)}
    try:
        while _budget_left(config, counters, started):
            genomes = optimizer.ask()
            ids = list(range(counters["next_id"], counters["next_id"] + len(genomes)))
            reused, todo, stale = {}, [], set()
            for cid, genome in zip(ids, genomes):
                old = salvage.pop(cid, None)
                if old is not None and old["status"] == "ok" and np.array_equal(np.asarray(old["genome"]), genome):
                    reused[cid] = old
                else:
                    todo.append((cid, genome))
                    if old is not None:
                        stale.add(cid)
            if stale:
                store.drop_records(stale)
            genome_of = dict(zip(ids, genomes))
            written: dict[int, dict] = {}

            def log_result(evaluation: Evaluation) -> None:
                # Each evaluation is logged the moment it finishes: an interruption loses only those in flight.
                cid = evaluation.candidate_id
                written[cid] = _record(evaluation, genome_of[cid], counters["generation"])
                store.append(written[cid])

            if todo:
                backend.evaluate(todo, on_result=log_result)
            records = [reused[cid] if cid in reused else written[cid] for cid in ids]
            n_ok = sum(r["status"] == "ok" for r in records)
            if records and n_ok == 0:
                raise SearchFailed(
                    f"every candidate of generation {counters['generation']} failed ({len(records)} of "
                    f"{len(records)}); the search stops (the failures are in {store.root / 'evaluations.jsonl'}; "
                    f"`evomerge resume` retries them once the cause is fixed). First error: "
                    f"{(records[0].get('error') or '').strip().splitlines()[0] if records[0].get('error') else 'unknown'}")
            objectives = np.array([[r["objectives"].get(t, np.nan) if r["status"] == "ok" else np.nan for t in tasks]
                                   for r in records], dtype=np.float64)
            responses = _response_matrix(records, tasks, fitness)
            optimizer.tell(genomes, objectives, responses)
            for r, row in zip(records, objectives):
                if r["status"] == "ok":
                    archive.add(r["id"], row)
            done.update((r["id"], r) for r in records)
            counters["generation"] += 1
            counters["next_id"] += len(genomes)
            counters["evaluations"] += len(genomes)
            counters["failed"] += len(genomes) - n_ok
            counters["item_evaluations"] += sum(int(r["item_evaluations"]) for r in records)
            now = time.perf_counter()
            counters["elapsed"] += now - started
            started = now
            store.save_checkpoint(counters["generation"], _checkpoint_state(optimizer, archive, counters, config_hash))
            store.write_pareto(pareto_summary(archive, done, tasks, counters))
            for i, t in enumerate(tasks):
                column = objectives[:, i][np.isfinite(objectives[:, i])]
                if column.size:
                    best[t] = float(np.nanmax([best[t], column.max()]))
            bar.update(len(genomes))
            bar.set_postfix_str(f"gen {counters['generation']} | {counters['evaluations'] / max(counters['elapsed'], 1e-9):.2f} eval/s | "
                                + " ".join(f"{t}={v:.3f}" for t, v in best.items()))
    finally:
        bar.close()
        backend.close()
    if salvage:  # logged past the budget by an earlier process (a wall-time budget): not part of this run
        store.drop_records(set(salvage))
    # Written again even when no generation ran: an interrupt may have come between checkpoint and Pareto file.
    store.write_pareto(pareto_summary(archive, done, tasks, counters))
    echo(f"done: {counters['evaluations']} candidates ({counters['failed']} failed), "
         f"{counters['item_evaluations']} item evaluations, Pareto set of {len(archive)} in {store.root / 'pareto.json'}")
    return store.root


def _response_matrix(records: list[dict], tasks: list[str], fitness) -> np.ndarray:
    """(n, items) subset answers concatenated over tasks; failed candidates answer nothing (zeros)."""
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
        r = records.get(m.record_id, {})
        out.append({"id": int(m.record_id), "objectives": dict(zip(tasks, map(float, m.objectives))),
                    "stderr": r.get("stderr", {}), "mean": float(np.mean(m.objectives)),
                    "crowding": float(c) if np.isfinite(c) else None, "generation": r.get("generation")})
    out.sort(key=lambda m: -m["mean"])
    return {"tasks": tasks, "members": out, "hypervolume": float(archive.hypervolume(0.0)) if len(members) else 0.0,
            "evaluations": counters["evaluations"], "item_evaluations": counters["item_evaluations"],
            "generation": counters["generation"]}
