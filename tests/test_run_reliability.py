"""Runs survive interruptions and misuse: Ctrl-C at any point then `resume` equals an uninterrupted
run for every optimizer; torn log lines are repaired; one process per run folder; `--overwrite`
deletes only run folders; bad values and whole-generation failures stop the run with the reason.

Each test compares against an uninterrupted run of the same config (the independent reference):
the same candidate ids, genomes and scores in the log, the same Pareto set.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.runs.config import ConfigError
from evomerge.runs.problem import MergeProblem
from evomerge.runs.search import SearchFailed, SearchInterrupted, resume_search, start_search
from evomerge.runs.store import RunLockedError, RunStore, RunStoreError
from evomerge.testing import write_run_config

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
QUIET = dict(progress=False, echo=lambda *a: None)

# Two generations of six per optimizer (MAP searches the two task-level weights: its design must fit).
OPTIMIZERS = {
    "random": dict(batch_size=6),
    "nsga2": dict(pop_size=6),
    "nsga3": dict(pop_size=6),
    "ga": dict(pop_size=6),
    "de": dict(pop_size=6),
    "cma": dict(batch_size=6),
    "twopointsde": dict(batch_size=6),
    "ngopt": dict(batch_size=6, budget=12),
    "m2n2": dict(archive_size=6, batch_size=6),
    "map": dict(batch_size=6, terms="auto", front_pop_size=12, front_generations=5),
}


def _config(root: Path, name: str, optimizer: str, **changes) -> Path:
    space = "task_arithmetic_global" if optimizer == "map" else "ties_per_layer"
    return write_run_config(root, name, optimizer={"name": optimizer, "settings": OPTIMIZERS[optimizer]},
                            search_space=space, budget={"evaluations": 12}, **changes)


def log_of(run_dir: Path) -> list[tuple]:
    """What a run computed, per logged candidate (timings and worker names left out)."""
    rows = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    return sorted((r["id"], r["generation"], tuple(r["genome"]), r["status"], tuple(sorted(r["objectives"].items())))
                  for r in rows)


def pareto_of(run_dir: Path) -> list[tuple]:
    data = json.loads((run_dir / "pareto.json").read_text())
    return sorted((m["id"], tuple(sorted(m["objectives"].items()))) for m in data["members"])


_REFERENCES: dict[str, Path] = {}


def reference(root: Path, optimizer: str) -> Path:
    if optimizer not in _REFERENCES:
        _REFERENCES[optimizer] = start_search(_config(root, f"ref_{optimizer}", optimizer), **QUIET)
    return _REFERENCES[optimizer]


def _interrupt_once(monkeypatch, target, attribute: str, when):
    """Make `target.attribute` raise KeyboardInterrupt (as Ctrl-C does) on the first call where `when(...)`."""
    original = getattr(target, attribute)
    fired = []

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(True)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapper)
    return fired


def _after(original):
    """`original`'s effect happens, then Ctrl-C arrives."""
    def run_then_interrupt(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt
    return run_then_interrupt


POINTS = {
    # in the middle of generation 1's evaluations (two of six logged)
    "during evaluations": lambda mp: _interrupt_once(mp, MergeProblem, "evaluate", lambda self, cid, g: cid == 8),
    # generation 1 asked, nothing evaluated yet
    "before evaluations": lambda mp: _interrupt_once(
        mp, __import__("evomerge.runs.backends", fromlist=["x"]).InProcessBackend, "evaluate",
        lambda self, todo, on_result=None: min(c for c, _ in todo) >= 6),
    # while generation 0's checkpoint is written
    "during checkpoint write": lambda mp: _interrupt_once(
        mp, __import__("evomerge.runs.store", fromlist=["x"]), "write_text_atomic",
        lambda path, text: "checkpoints" in str(path)),
    # the last generation checkpointed, its Pareto file not yet written (the resume has nothing left to run)
    "after checkpoint": lambda mp: _interrupt_once(mp, RunStore, "write_pareto",
                                                   lambda self, pareto: pareto["evaluations"] >= 12),
}

CASES = [(name, "during evaluations") for name in OPTIMIZERS] + [
    (name, point) for name in ("nsga2", "map", "cma") for point in POINTS if point != "during evaluations"]


@pytest.mark.parametrize("optimizer,point", CASES)
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(run_workspace, monkeypatch, optimizer, point):
    ref = reference(run_workspace, optimizer)
    name = f"int_{optimizer}_{point.replace(' ', '_')}"
    with monkeypatch.context() as mp:
        fired = POINTS[point](mp)
        with pytest.raises(SearchInterrupted):
            start_search(_config(run_workspace, name, optimizer), **QUIET)
        assert fired, "the interruption did not happen"
    run_dir = run_workspace / "runs" / name
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    logged = len(log_of(run_dir))
    resume_search(run_dir, **QUIET)
    assert log_of(run_dir) == log_of(ref)
    assert pareto_of(run_dir) == pareto_of(ref)
    # the interrupt wrote no checkpoint of its own: the resumed run added the later generations only
    assert set(checkpoints) <= {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert logged <= len(log_of(run_dir))


def test_a_failed_resume_keeps_the_salvaged_evaluations(run_workspace, monkeypatch):
    """Ctrl-C mid-generation, then a resume that itself fails before evaluating: the log keeps every
    evaluation the first process finished, and a later resume still ends like an uninterrupted run."""
    ref = reference(run_workspace, "nsga2")
    with monkeypatch.context() as mp:
        POINTS["during evaluations"](mp)
        with pytest.raises(SearchInterrupted):
            start_search(_config(run_workspace, "salvage", "nsga2"), **QUIET)
    run_dir = run_workspace / "runs" / "salvage"
    before = log_of(run_dir)
    assert len(before) == 8
    with monkeypatch.context() as mp:
        mp.setattr("evomerge.runs.backends.make_backend", lambda *a: (_ for _ in ()).throw(RuntimeError("no workers")))
        with pytest.raises(RuntimeError, match="no workers"):
            resume_search(run_dir, **QUIET)
    assert log_of(run_dir) == before
    checkpoint = (run_dir / "checkpoints" / "ckpt-000001.json").read_bytes()
    with monkeypatch.context() as mp:  # and a second Ctrl-C, before anything is evaluated
        _interrupt_once(mp, MergeProblem, "evaluate", lambda self, cid, g: True)
        with pytest.raises(SearchInterrupted):
            resume_search(run_dir, **QUIET)
    assert log_of(run_dir) == before
    assert (run_dir / "checkpoints" / "ckpt-000001.json").read_bytes() == checkpoint  # never overwritten
    resume_search(run_dir, **QUIET)
    assert log_of(run_dir) == log_of(ref) and pareto_of(run_dir) == pareto_of(ref)


def _ctrl_c_as_in_a_shell() -> None:
    """In the child: SIGINT handled and not blocked, whatever the test runner's process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _sigint_run(root: Path, name: str, **changes) -> Path:
    """A real `evomerge search` process, sent SIGINT (Ctrl-C) in the middle of its third generation."""
    path = write_run_config(root, name, **changes)
    env = {**os.environ, "EVOMERGE_TEST_EVAL_DELAY": "0.3"}
    proc = subprocess.Popen([*EVOMERGE, "search", str(path), "--quiet"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_ctrl_c_as_in_a_shell)
    log = root / "runs" / name / "evaluations.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 14):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "evomerge resume" in out
    return root / "runs" / name


@pytest.mark.parametrize("workers", [{"backend": "inprocess"}, {"backend": "ray", "num_workers": 2}],
                         ids=["inprocess", "ray"])
def test_sigint_then_resume_cli(run_workspace, workers):
    ref = start_search(write_run_config(run_workspace, "sigint_ref"), **QUIET) if not (
        run_workspace / "runs" / "sigint_ref").exists() else run_workspace / "runs" / "sigint_ref"
    run_dir = _sigint_run(run_workspace, f"sigint_{workers['backend']}", workers=workers)
    assert 14 <= len(log_of(run_dir)) < 24
    result = subprocess.run([*EVOMERGE, "resume", str(run_dir), "--quiet"], cwd=run_workspace, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert log_of(run_dir) == log_of(ref)
    assert pareto_of(run_dir) == pareto_of(ref)


# ------------------------------------------------------------------------------- torn log lines
@pytest.mark.parametrize("keep_lines", [0, 9], ids=["first line torn", "last line torn"])
def test_a_torn_line_is_repaired_before_appending(run_workspace, keep_lines):
    """A crash or a full disk during a write leaves part of a record without its newline; the
    resume cuts it off (one warning naming the file and the bytes) and ends like an uninterrupted run."""
    ref = reference(run_workspace, "nsga2")
    run_dir = run_workspace / "runs" / f"torn_{keep_lines}"
    shutil.copytree(ref, run_dir)
    log = run_dir / "evaluations.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    torn = lines[keep_lines][:57]
    log.write_text("".join(lines[:keep_lines]) + torn)
    keep_generations = keep_lines // 6
    for path in (run_dir / "checkpoints").iterdir():
        if int(path.stem.split("-")[1]) > keep_generations:
            path.unlink()
    (run_dir / "pareto.json").unlink()
    with pytest.warns(UserWarning, match=rf"evaluations.jsonl: dropped a torn last line \({len(torn)} bytes\)"):
        resume_search(run_dir, **QUIET)
    assert log_of(run_dir) == log_of(ref)
    assert pareto_of(run_dir) == pareto_of(ref)


def test_a_complete_last_line_without_newline_is_not_glued_to_the_next(tmp_path):
    store = RunStore.create(tmp_path / "r", "name: r\n")
    try:
        store.append({"id": 0})
        with open(store.root / "evaluations.jsonl", "a") as handle:
            handle.write('{"id":1')
        assert [r["id"] for r in store.records()] == [0]
        with pytest.warns(UserWarning, match="7 bytes"):
            assert store.repair_log() == 7
        store.append({"id": 1})
        assert [r["id"] for r in store.records()] == [0, 1]
    finally:
        store.unlock()


# ------------------------------------------------------------------------------- one process per folder
def test_two_processes_never_share_a_run_folder(run_workspace):
    path = write_run_config(run_workspace, "locked")
    env = {**os.environ, "EVOMERGE_TEST_EVAL_DELAY": "0.5"}
    first = subprocess.Popen([*EVOMERGE, "search", str(path), "--quiet"], cwd=run_workspace, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = run_workspace / "runs" / "locked"
    log = run_dir / "evaluations.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 1):
        time.sleep(0.05)
    try:
        second = subprocess.run([*EVOMERGE, "resume", str(run_dir), "--quiet"], cwd=run_workspace, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another evomerge process (PID {first.pid})" in second.stderr
        third = subprocess.run([*EVOMERGE, "search", str(path), "--quiet", "--overwrite"], cwd=run_workspace,
                               capture_output=True, text=True, timeout=300)
        assert third.returncode == 2 and f"PID {first.pid}" in third.stderr, third.stdout + third.stderr
    finally:
        out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert ids == list(range(24))
    assert (run_dir / ".lock").read_text() == ""  # released, PID cleared


def test_a_stale_lock_is_taken_over_and_reported(run_workspace, caplog):
    ref = reference(run_workspace, "nsga2")
    run_dir = run_workspace / "runs" / "stale"
    shutil.copytree(ref, run_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(str(dead.pid))
    with caplog.at_level("WARNING", logger="evomerge.runs.store"):
        resume_search(run_dir, **QUIET)
    assert f"stale lock left by PID {dead.pid} (no longer running)" in caplog.text
    assert pareto_of(run_dir) == pareto_of(ref)


def test_a_lock_held_in_this_process_refuses_a_second_store(tmp_path):
    store = RunStore.create(tmp_path / "r", "name: r\n")
    try:
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            RunStore.open(tmp_path / "r").lock()
    finally:
        store.unlock()
    RunStore.open(tmp_path / "r").lock()  # free again


def test_restore_checks_the_checkpoint_belongs_to_the_run(run_workspace):
    """Two searches mixed in one folder: a checkpoint of another config (seed) is refused on restore."""
    ref = reference(run_workspace, "nsga2")
    other = start_search(_config(run_workspace, "other_seed", "nsga2", seed=4), **QUIET)
    run_dir = run_workspace / "runs" / "mixed"
    shutil.copytree(ref, run_dir)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    shutil.copy(other / "checkpoints" / newest.name, newest)
    with pytest.raises(RunStoreError, match="written by a search with another config"):
        resume_search(run_dir, **QUIET)


# ------------------------------------------------------------------------------- --overwrite
def test_search_overwrite_refuses_a_folder_that_is_not_a_run(run_workspace):
    path = write_run_config(run_workspace, "thesis")
    folder = run_workspace / "runs" / "thesis"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    result = CliRunner().invoke(main, ["search", str(path), "--quiet", "--overwrite"])
    assert result.exit_code == 2 and "is not a run folder" in result.output, result.output
    assert (folder / "thesis.tex").read_text() == "\\documentclass{article}"


def test_search_overwrite_refuses_a_run_folder_holding_other_files(run_workspace):
    ref = reference(run_workspace, "nsga2")
    run_dir = run_workspace / "runs" / "with_notes"
    shutil.copytree(ref, run_dir)
    (run_dir / "notes.md").write_text("mine")
    config = _config(run_workspace, "with_notes", "nsga2")
    with pytest.raises(RunStoreError, match=r"holds files evomerge did not write \(notes.md\)"):
        start_search(config, overwrite=True, **QUIET)
    assert (run_dir / "notes.md").read_text() == "mine"
    (run_dir / "notes.md").unlink()
    start_search(config, overwrite=True, **QUIET)  # a run folder of ours is replaced
    assert pareto_of(run_dir) == pareto_of(ref)


def test_a_run_folder_may_not_be_an_input(run_workspace):
    path = write_run_config(run_workspace, "base", runs_dir="fam")
    result = CliRunner().invoke(main, ["search", str(path), "--quiet", "--overwrite"])
    assert result.exit_code == 2 and "overlaps the run's input models.base" in result.output, result.output
    assert (run_workspace / "fam" / "base" / "config.json").is_file()


# ------------------------------------------------------------------------------- bad values, failures
def test_a_typo_in_the_estimator_stops_before_the_run_folder(run_workspace):
    path = write_run_config(run_workspace, "typo", fitness={"name": "fitness/mc", "estimator": "gp-irt"})
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "field `fitness.estimator`: unknown estimator 'gp-irt'; valid: [" in result.output
    assert not (run_workspace / "runs" / "typo").exists()


def test_a_generation_in_which_every_candidate_fails_stops_the_run(run_workspace, monkeypatch):
    def broken(self, candidate_id, genome):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(MergeProblem, "evaluate", broken)
    path = write_run_config(run_workspace, "all_fail")
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "every candidate of generation 0 failed (6 of 6)" in result.output
    assert "RuntimeError: CUDA out of memory (simulated)" in result.output
    run_dir = run_workspace / "runs" / "all_fail"
    assert not list((run_dir / "checkpoints").iterdir())  # nothing told: resume retries the generation
    monkeypatch.undo()
    resume_search(run_dir, **QUIET)
    ref = start_search(write_run_config(run_workspace, "all_fail_ref"), **QUIET)
    assert log_of(run_dir) == log_of(ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_fails_fast_before_the_run_folder(run_workspace):
    address = f"127.0.0.1:{_free_port()}"
    path = write_run_config(run_workspace, "unreachable", workers={"backend": "ray", "address": address})
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"field `workers.address`: cannot reach a Ray cluster at {address}"):
        start_search(path, **QUIET)
    assert time.perf_counter() - started < 30
    assert not (run_workspace / "runs" / "unreachable").exists()
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        start_search(write_run_config(run_workspace, "unreachable", workers={"backend": "ray", "address": "nowhere"}),
                     **QUIET)


def test_the_worker_address_can_change_on_resume(run_workspace):
    """Where the workers run is not part of the run's identity; everything else still is."""
    ref = reference(run_workspace, "nsga2")
    run_dir = run_workspace / "runs" / "moved"
    shutil.copytree(ref, run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("address: null", "address: 127.0.0.1:6379"))
    resume_search(run_dir, **QUIET)  # in-process workers: the address is recorded, not used
    resume_search(run_dir, address="", **QUIET)
    assert "address: null" in config.read_text()
    result = CliRunner().invoke(main, ["resume", str(run_dir), "--quiet", "--address", "127.0.0.1:6380"])
    assert result.exit_code == 0, result.output
    assert "address: 127.0.0.1:6380" in config.read_text()
    config.write_text(config.read_text().replace("seed: 3", "seed: 4"))
    with pytest.raises(RunStoreError, match="was edited after the run started"):
        resume_search(run_dir, **QUIET)


def test_a_run_that_calibrates_first_reuses_what_it_calibrated(run_workspace, monkeypatch, tmp_path):
    """`fitness: {calibrate: CAL.yaml}`: the first search calibrates (beside CAL.yaml, as
    `evomerge fitness calibrate` would), a later one from another working directory reuses it."""
    import yaml

    from evomerge.testing import choice_task_preset

    cal_dir = run_workspace / "cal"
    cal_dir.mkdir()
    for name in ("sums_a", "sums_b"):
        (cal_dir / f"{name}.yaml").write_text(yaml.safe_dump(choice_task_preset(run_workspace / "tasks" / name, name)))
    (cal_dir / "cal.yaml").write_text(yaml.safe_dump({
        "name": "mc_again", "models": {"base": "../fam/base", "experts": ["../fam/expert_0", "../fam/expert_1"]},
        "tasks": [{"preset": "sums_a.yaml"}, {"preset": "sums_b.yaml"}],
        "calibration": {"random_merges": 12}, "subset": {"n": 8}}))
    calibrations = []
    import evomerge.fitness.calibrate as calibrate_module

    original = calibrate_module.calibrate_from_config
    monkeypatch.setattr(calibrate_module, "calibrate_from_config",
                        lambda *a, **k: calibrations.append(a) or original(*a, echo=lambda *x: None, **k))
    monkeypatch.chdir(tmp_path)
    for name in ("calibrating", "calibrated"):
        start_search(write_run_config(run_workspace, name, fitness={"calibrate": "cal/cal.yaml"},
                                      budget={"evaluations": 6}), **QUIET)
    assert len(calibrations) == 1
    assert (cal_dir / "fitness" / "mc_again" / "fitness.json").is_file()


def test_a_search_steps_one_generation_at_a_time(run_workspace, monkeypatch):
    """`Search.step()` from Python: generation by generation, the same log and Pareto set as `run()`;
    a step interrupted after its ask starts that generation again from the checkpoint."""
    from evomerge.runs.search import Search

    ref = reference(run_workspace, "nsga2")
    with Search.create(_config(run_workspace, "stepped", "nsga2")) as search:
        first = search.step()
        assert (first.index, len(first.records), first.reused, first.failed) == (0, 6, 0, 0)
        assert search.progress.evaluations == 6 and not search.finished
        with monkeypatch.context() as mp:
            _interrupt_once(mp, MergeProblem, "evaluate", lambda self, cid, g: cid == 8)
            with pytest.raises(KeyboardInterrupt):
                search.step()
        second = search.step()
        assert (second.index, second.reused) == (1, 2)  # ids 6 and 7 were logged before the interrupt
        assert search.finished
        with pytest.raises(RunLockedError):
            Search.resume(search.root)
    assert log_of(search.root) == log_of(ref) and pareto_of(search.root) == pareto_of(ref)


def test_a_run_folder_that_cannot_be_written_fails_before_anything_starts(run_workspace):
    (run_workspace / "a_file").write_text("not a folder")
    path = write_run_config(run_workspace, "unwritable", runs_dir="a_file/runs")
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "field `runs_dir`: " in result.output and "a_file is not a folder" in result.output
    assert "Traceback" not in result.output
