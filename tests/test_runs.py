"""Runs end to end: CLI search, kill -9 + resume, worker crashes, corrupt checkpoints, export, notebook.

The fixture builds a small family of random Llama models and two multiple-choice tasks that such
models answer differently from one another, calibrates a compressed fitness on them, and writes
run configs: real formats and the real pipeline, no training needed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.merge.checkpoint import ModelFolder
from evomerge.runs.config import ConfigError, load_run_config
from evomerge.runs.run import Run
from evomerge.testing import hand_scored_accuracy

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


@pytest.fixture(scope="module")
def workspace(run_workspace):
    return run_workspace


def write_config(root: Path, file_name: str, **changes) -> Path:
    from evomerge.testing import write_run_config

    return write_run_config(root, file_name, **changes)


def pareto_of(run_dir: Path) -> list[tuple[int, dict]]:
    data = json.loads((run_dir / "pareto.json").read_text())
    return sorted((m["id"], m["objectives"]) for m in data["members"])


@pytest.fixture(scope="module")
def reference_run(workspace):
    """An uninterrupted in-process run: the baseline the other runs must reproduce."""
    path = write_config(workspace, "reference")
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    return workspace / "runs" / "reference"


def test_cli_search_writes_the_run_folder(reference_run):
    run = Run.load(reference_run)
    assert (reference_run / "config.yaml").is_file() and (reference_run / "run.json").is_file()
    assert len(list((reference_run / "checkpoints").glob("ckpt-*.json"))) == 3  # 4 generations, last 3 kept
    evaluations = run.evaluations
    assert len(evaluations) == 24 and set(evaluations["status"]) == {"ok"}
    assert (evaluations["item_evaluations"] == 16).all()  # 8 subset items x 2 tasks
    record = run.record(5)
    assert record["recipe"]["merge_method"] == "ties" and len(record["genome"]) == 2 * 2 * 2  # layers x params x experts
    assert set(record["responses"]) == {"sums_a", "sums_b"} and len(record["responses"]["sums_a"]) == 8
    # The Pareto file is the non-dominated set of the log, computed here independently; of candidates
    # with equal objectives the archive keeps the first evaluated (the lowest id).
    F = evaluations[["sums_a", "sums_b"]].to_numpy()
    front: dict[tuple[float, ...], int] = {}
    for i, f in zip(evaluations.index, F):  # ascending id
        if not any(np.all(g >= f) and np.any(g > f) for g in F):
            front.setdefault(tuple(f), int(i))
    members = pareto_of(reference_run)
    assert members and sorted(front.values()) == [m for m, _ in members]
    for m, objectives in members:
        assert [objectives["sums_a"], objectives["sums_b"]] == F[evaluations.index.get_loc(m)].tolist(), m
    result = CliRunner().invoke(main, ["pareto", str(reference_run)])
    assert result.exit_code == 0 and "sums_a" in result.output


def test_existing_run_folder_is_not_reused(workspace, reference_run):
    path = workspace / "reference.yaml"
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 2 and "already holds a run" in result.output and "evomerge resume" in result.output


def test_kill_9_then_resume_gives_the_uninterrupted_pareto_set(workspace, reference_run):
    path = write_config(workspace, "killed")
    env = {**os.environ, "EVOMERGE_TEST_EVAL_DELAY": "0.3"}
    proc = subprocess.Popen([*EVOMERGE, "search", str(path), "--quiet"], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = workspace / "runs" / "killed" / "evaluations.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill in the middle of the second generation
        if log.is_file() and sum(1 for _ in open(log)) >= 9:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_dir = workspace / "runs" / "killed"
    logged = sum(1 for _ in open(log))
    assert 9 <= logged < 24
    result = subprocess.run([*EVOMERGE, "resume", str(run_dir), "--quiet"], cwd=workspace, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reusing" in result.stdout  # the interrupted generation's finished evaluations were kept
    assert pareto_of(run_dir) == pareto_of(reference_run)
    ids = [json.loads(line)["id"] for line in open(log)]
    assert ids == list(range(24))


def test_corrupt_latest_checkpoint_falls_back(workspace, reference_run):
    import shutil

    run_dir = workspace / "runs" / "corrupt"
    shutil.copytree(reference_run, run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["source"] = None
    (run_dir / "run.json").write_text(json.dumps(meta))
    # Keep the log only up to generation 2 and truncate the newest checkpoint mid-file.
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))
    newest = checkpoints[-1]
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    with pytest.warns(UserWarning, match="corrupt checkpoint"):
        from evomerge.runs.search import resume_search

        resume_search(run_dir, progress=False, echo=lambda *a: None)
    assert pareto_of(run_dir) == pareto_of(reference_run)


def test_resume_refuses_a_changed_config(workspace, reference_run):
    import shutil

    run_dir = workspace / "runs" / "edited"
    shutil.copytree(reference_run, run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("evaluations: 24", "evaluations: 30"))
    result = CliRunner().invoke(main, ["resume", str(run_dir)])
    assert result.exit_code == 2 and "was edited after the run started" in result.output


def test_ray_pool_with_a_crashing_worker_gives_the_same_results(workspace, reference_run):
    path = write_config(workspace, "ray_crash", workers={"backend": "ray", "num_workers": 2})
    marker = workspace / "crash.marker"
    env = {**os.environ, "EVOMERGE_CRASH_ONCE": f"7:{marker}"}
    result = subprocess.run([*EVOMERGE, "search", str(path), "--quiet"], cwd=workspace, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert marker.is_file(), "the injected crash did not happen"
    run = Run.load(workspace / "runs" / "ray_crash")
    reference = Run.load(reference_run)
    assert set(run.evaluations["status"]) == {"ok"}
    assert len(set(run.evaluations["worker"])) >= 2
    ours, theirs = run.evaluations, reference.evaluations
    assert np.array_equal(ours[["sums_a", "sums_b"]].to_numpy(), theirs[["sums_a", "sums_b"]].to_numpy())
    assert pareto_of(run.path) == pareto_of(reference_run)


def test_local_ray_stays_on_loopback():
    from evomerge.runs.backends import init_ray

    import ray

    init_ray(None, num_cpus=1)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    finally:
        ray.shutdown()


def test_export_reloads_and_its_recipe_reproduces_the_weights(workspace, reference_run, tmp_path):
    run = Run.load(reference_run)
    member = run.best_balanced()
    result = CliRunner().invoke(main, ["export", str(reference_run), "--member", str(member), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    recipe = tmp_path / "m" / "recipe.yaml"
    assert yaml.safe_load(recipe.read_text())["merge_method"] == "ties"
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "again"), "--quiet"])
    assert result.exit_code == 0, result.output
    again = ModelFolder.open(tmp_path / "again")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.get_tensor(name)), name
    # ... and equals what the search scored: the materializer's weights for that genome.
    from evomerge.fitness.compressed import CompressedFitness
    from evomerge.runs.problem import MergeProblem

    problem = MergeProblem(run.config, CompressedFitness.load(workspace / "fitness" / "mc"))
    live = problem.materialize(run.genome(member)).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, live[name], rtol=1e-6, atol=1e-7)


def test_verify_records_full_test_split_scores(workspace, reference_run, tmp_path):
    import shutil

    run_dir = workspace / "runs" / "verified"
    shutil.copytree(reference_run, run_dir)
    result = CliRunner().invoke(main, ["verify", str(run_dir)])
    assert result.exit_code == 0, result.output
    verified = json.loads((run_dir / "verify.json").read_text())["splits"]
    run = Run.load(run_dir)
    assert set(verified["test"]) == {str(i) for i in run.pareto.index}
    # verify's numbers equal an independent scoring: each member exported to disk (the streaming
    # merge, not the in-memory materializer verify uses), reloaded, and scored item by item by hand
    for member in run.pareto.index:
        exported = run.export(int(member), tmp_path / f"m{member}")
        for task in run.tasks:
            expected = hand_scored_accuracy(exported, workspace / "tasks" / task, "test")
            assert verified["test"][str(member)][task] == expected, (member, task)
    assert "sums_a_test" in run.pareto.columns
    # choosing on the fitness split keeps the test scores and picks the best full-fitness-split mean
    chosen = run.choose(finalists=3, echo=lambda *a: None)
    verified = Run.load(run_dir).verified()
    assert set(verified["test"]) == {str(i) for i in run.pareto.index}
    assert len(verified["fitness"]) == min(3, len(run.pareto))
    means = {int(i): np.mean(list(scores.values())) for i, scores in verified["fitness"].items()}
    assert means[chosen] == max(means.values())
    assert "sums_a_fitness" in Run.load(run_dir).pareto.columns


BAD_CONFIGS = [
    ({"budget": {}}, r"field `budget`: .*give `evaluations`, `wall_time`"),
    ({"optimizer": {"nam": "nsga2"}}, r"field `optimizer.name` is required; field `optimizer.nam` is not supported"),
    ({"workers": {"backend": "slurm"}}, r"field `workers.backend`"),
    ({"name": "bad name!"}, r"field `name`"),
    ({"extra": 1}, r"field `extra` is not supported"),
    ({"models": {"base": "fam/base"}}, r"field `models.experts` is required"),
]


@pytest.mark.parametrize("change,error", BAD_CONFIGS)
def test_bad_run_configs_name_the_field(workspace, change, error):
    path = write_config(workspace, "bad", **change)
    with pytest.raises(ConfigError, match=error) as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_a_search_refuses_a_fitness_calibrated_on_other_models(workspace):
    """Swapping the experts (other weights in the same shapes) makes the fitness stale for the run;
    the search stops before creating its folder and says which models differ."""
    from evomerge.runs.search import start_search

    path = write_config(workspace, "other_models", models={"base": "fam/base", "experts": ["fam/expert_1", "fam/expert_0"]})
    with pytest.raises(ConfigError, match=r"field `fitness`: .*fitness/mc was calibrated on other models than this "
                                          r"run's `models` \(expert 0 .*expert_1 has other weights; expert 1 "):
        start_search(path, progress=False, echo=lambda *a: None)
    assert not (workspace / "runs" / "other_models").exists()


def test_cli_reports_unknown_optimizer_and_space(workspace):
    path = write_config(workspace, "bad_opt", optimizer={"name": "hillclimb"})
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code != 0 and "unknown optimizer 'hillclimb'" in str(result.output) + str(result.exception)
    path = write_config(workspace, "bad_space", search_space="nope")
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 2 and "unknown search space 'nope'" in result.output
    path = write_config(workspace, "bad_corners",
                        optimizer={"name": "nsga2", "settings": {"initial_genomes": [[0.5, 0.5]]}})
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 2 and "nsga2: initial_genomes must have shape (n, " in result.output


@pytest.mark.parametrize("optimizer", [{"name": "nsga2", "settings": {"pop_size": 6}},
                                       {"name": "cma", "settings": {"batch_size": 3}},
                                       {"name": "random", "settings": {"batch_size": 5}}])
def test_every_optimizer_starts_from_the_corner_merges(workspace, optimizer):
    """`initial_genomes: corners`: the base, each expert, and both experts at weight 1 are the
    first genomes asked, whatever the optimizer (pymoo's first population, nevergrad's
    suggestions, random search's first rows)."""
    from evomerge.runs.problem import bind_space
    from evomerge.runs.search import new_optimizer

    settings = {**optimizer["settings"], "initial_genomes": "corners"}
    config = load_run_config(write_config(workspace, "corners", optimizer={**optimizer, "settings": settings}))
    space = bind_space(config)
    opt = new_optimizer(config, space, 2)
    asked = []
    while len(asked) < 4:
        genomes = opt.ask()
        asked += list(genomes)
        opt.tell(genomes, np.full((len(genomes), 2), 0.5))
    corners = space.corner_genomes()
    assert len(corners) == 4  # two experts: none, either, both
    np.testing.assert_allclose(np.array(asked[:4]), corners)


def test_a_stitch_search_starts_from_each_expert_in_each_window_and_resolves_its_parts(workspace):
    """`parts: windows` with `window: 1`: after the corners, the search asks each expert alone in each
    layer (the space's window genomes, in order), then stitched merges; the run reaches its budget. A window wider than the model is a config error naming the field."""
    from evomerge.runs.problem import bind_space
    from evomerge.runs.search import new_optimizer

    settings = {"parts": "windows", "window": 1, "initial_genomes": "corners", "stitches": 3, "batch_size": 4}
    path = write_config(workspace, "stitched", search_space="task_arithmetic_per_layer",
                        optimizer={"name": "stitch", "settings": settings})
    config = load_run_config(path)
    space = bind_space(config)
    opt = new_optimizer(config, space, 2)
    corners, (parts, experts) = space.corner_genomes(), space.window_parts(1)
    assert opt.parts.tolist() == parts.tolist() and opt.groups.tolist() == experts.tolist() == [0, 1] * space.num_layers
    result = CliRunner().invoke(main, ["search", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    run = Run.load(workspace / "runs" / "stitched")
    genomes = np.array([run.genome(int(i)) for i in run.evaluations.index])
    expected = np.vstack([corners, parts])  # the empty genome is corner 0: asked once
    np.testing.assert_allclose(genomes[: len(expected)], expected)
    assert len(genomes) >= 24  # the budget; the inner optimizer's last batch may overshoot it, as NSGA-II's does
    bad = write_config(workspace, "stitched_bad", search_space="task_arithmetic_per_layer",
                       optimizer={"name": "stitch", "settings": {**settings, "window": 99}})
    result = CliRunner().invoke(main, ["search", str(bad), "--quiet"])
    assert result.exit_code == 2 and "optimizer.settings.parts: windows" in result.output and "window width 99" in result.output


def test_notebook_runs(workspace, reference_run):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "inspect_pareto.ipynb", as_version=4)
    os.environ["EVOMERGE_RUN"] = str(reference_run)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workspace)}}).execute()
    finally:
        del os.environ["EVOMERGE_RUN"]
    outputs = "".join(str(o.get("text", "")) for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "tasks: ['sums_a', 'sums_b']" in outputs
    assert any(p.name.startswith("member_") for p in reference_run.iterdir())
    assert (reference_run / "front.png").is_file()
    # Figures show inline when the notebook is opened in Jupyter: each plotting cell shows one PNG.
    plot_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and ".plot_" in cell.source]
    assert len(plot_cells) == 3
    for cell in plot_cells:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, (cell.source, [sorted(o.get("data", {})) for o in cell.outputs])
