"""What a person at the terminal sees: a fast `--help`, quiet `--quiet`, a Pareto table that says
what `export` would take, a readable coefficient heatmap, and a calibration that lands where a run
config looks for it.

The fixture is a two-expert family of random Llama models with two multiple-choice tasks, a small
compressed fitness and one short in-process search, as in tests/test_runs.py but smaller.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
BAR = re.compile(r"\d+%\||it/s\]|s/it\]|Loading weights")  # a tqdm bar, or transformers' loading bar


def _search_yaml(name: str) -> dict:
    return {"name": name, "models": {"base": "fam/base", "experts": ["fam/expert_0", "fam/expert_1"]},
            "search_space": "ties_per_layer", "fitness": {"name": "fitness/mc"},
            "optimizer": {"name": "nsga2", "settings": {"pop_size": 6}}, "budget": {"evaluations": 12},
            "workers": {"backend": "inprocess"}, "seed": 3, "runs_dir": "runs"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(root, CliRunner result of `evomerge search run.yaml --quiet`) on a tiny family."""
    import torch

    from evomerge.cli import main
    from evomerge.fitness.calibrate import calibrate
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.testing import choice_task_preset, llama_config, make_choice_task, make_family

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("cli_ux")
        base, experts = make_family(root / "fam", n_experts=2, seed=5, delta_scale=0.5, config=llama_config(layers=2))
        for i, name in enumerate(["sums_a", "sums_b"]):
            preset = choice_task_preset(make_choice_task(root / "tasks" / name, seed=i), name)
            (root / f"{name}.yaml").write_text(yaml.safe_dump(preset))
        tasks = [TaskSpec.from_dict(yaml.safe_load((root / f"{n}.yaml").read_text())) for n in ["sums_a", "sums_b"]]
        calibrate(tasks, str(base), [str(e) for e in experts], root / "fitness" / "mc", name="mc", random_merges=6, n=6,
                  echo=lambda *a: None)
        (root / "run.yaml").write_text(yaml.safe_dump(_search_yaml("r")))
        result = CliRunner().invoke(main, ["search", str(root / "run.yaml"), "--quiet"])
        assert result.exit_code == 0, result.output
        return root, result
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- --help
def test_the_cli_starts_without_torch():
    """`evomerge --help` and every `evomerge <command> --help` import neither torch, transformers,
    ray nor pandas (importing torch alone took 1.5 s and 255 MB)."""
    script = """
import sys
import click
from evomerge.cli import main

def commands(group, prefix):
    for name, command in group.commands.items():
        yield [*prefix, name]
        if isinstance(command, click.Group):
            yield from commands(command, [*prefix, name])

for args in [[], *commands(main, [])]:
    assert main([*args, "--help"], standalone_mode=False) == 0, args
print("HEAVY", sorted(m for m in ("torch", "transformers", "ray", "pandas", "numpy") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-2000:]
    # the user-facing errors keep their old import paths and stay one class
    from evomerge import errors
    from evomerge.merge.checkpoint import CheckpointError
    from evomerge.merge.layers import LayerMappingError
    from evomerge.merge.params import ParameterError
    from evomerge.merge.recipe import RecipeError

    assert (CheckpointError, RecipeError, LayerMappingError, ParameterError) == (
        errors.CheckpointError, errors.RecipeError, errors.LayerMappingError, errors.ParameterError)


# ------------------------------------------------------------------------------- heatmap
@pytest.mark.parametrize("layers", [2, 80])
def test_coefficient_heatmap_names_its_panels_and_shares_one_scale(layers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.runs.run import plot_coefficient_heatmap

    rng = np.random.default_rng(layers)
    values = rng.uniform(0.0, 1.5, size=(3, 2, layers))  # (groups, experts, layers)
    values[1] *= 0.2  # MLP coefficients much smaller: one scale keeps them comparable
    fig = plot_coefficient_heatmap(values, ["attention", "mlp", "rest"], ["addition", "sorting"], parameter="weight",
                                   bounds=(0.0, 1.5), title="member 7")
    try:
        fig.canvas.draw()
        images = [image for axis in fig.axes for image in axis.get_images()]
        panels = [axis for axis in fig.axes if axis.get_images()]
        assert len(panels) == 3 and len(images) == 3
        titles = [" ".join(axis.get_title(loc=loc) for loc in ("left", "center", "right")) for axis in panels]
        assert "attention" in titles[0] and "MLP" in titles[1] and "rest" in titles[2]
        for axis in panels:  # the experts name the rows of every panel
            assert [t.get_text() for t in axis.get_yticklabels()] == ["addition", "sorting"]
        assert len({id(image.norm) for image in images}) == 1  # one norm ...
        assert images[0].norm.vmin == 0.0 and images[0].norm.vmax == 1.5  # ... over the search range
        assert len(fig.axes) == 4  # three panels and one colorbar
        assert "weight" in fig.axes[3].get_ylabel()
        assert "member 7" in fig.get_suptitle()
        ticks = panels[-1].get_xticks()
        assert 2 <= len(ticks) <= 17 and all(float(t).is_integer() and 0 <= t < layers for t in ticks)
        assert not any(t.get_visible() and t.get_text() for axis in panels[:-1] for t in axis.get_xticklabels())
        assert [t.get_text() for t in panels[-1].get_xticklabels()][:2] == ["0", "1" if layers < 17 else "5"]
        width, height = fig.get_size_inches()
        assert 5 <= width <= 16 and 3 <= height <= 12
    finally:
        plt.close(fig)

    # without bounds, the scale spans the data of all panels
    fig = plot_coefficient_heatmap(values[:1], ["all"], ["addition", "sorting"], parameter="density")
    try:
        (image,) = fig.axes[0].get_images()
        assert image.norm.vmin == pytest.approx(values[0].min()) and image.norm.vmax == pytest.approx(values[0].max())
        assert "all" in fig.axes[0].get_title(loc="left")
    finally:
        plt.close(fig)


def test_run_plot_coefficients_uses_the_search_range(workspace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.runs.run import Run

    run = Run.load(workspace[0] / "runs" / "r")
    fig = run.plot_coefficients(run.best_balanced(), "density")
    try:
        (image,) = fig.axes[0].get_images()
        assert (image.norm.vmin, image.norm.vmax) == (0.1, 1.0)  # ties_per_layer: density in [0.1, 1.0]
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["expert_0", "expert_1"]
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------- pareto
def test_pareto_marks_the_member_export_takes(workspace):
    from evomerge.cli import main
    from evomerge.runs.run import Run

    run_dir = workspace[0] / "runs" / "r"
    run = Run.load(run_dir)
    frame = run.pareto
    assert not frame["crowding"].isna().any()
    assert (np.isinf(frame["crowding"]).sum()) == 2  # the two boundary members of a two-task front
    chosen = run.best_balanced()
    result = CliRunner().invoke(main, ["pareto", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.output and "nan" not in result.output
    rows = {int(line.split()[0]): line for line in result.output.splitlines() if re.match(r"^\d+\s", line)}
    assert set(rows) == set(frame.index)
    assert [i for i, line in rows.items() if "*" in line] == [chosen]
    assert f"* member {chosen}: what `evomerge export` takes" in result.output
    assert "--finalists N" in result.output


# ------------------------------------------------------------------------------- --quiet
def test_quiet_search_shows_no_loading_bars(workspace):
    _, result = workspace
    assert "done: 12 candidates" in result.output
    assert not BAR.search(result.stderr), result.stderr[:500]


def test_quiet_verify_and_export_show_no_bars(workspace, tmp_path):
    from evomerge.cli import main
    from evomerge.runs.run import Run

    run_dir = workspace[0] / "runs" / "r"
    result = CliRunner().invoke(main, ["verify", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "recorded in" in result.output and not BAR.search(result.stderr), result.stderr[:500]
    member = Run.load(run_dir).best_balanced()
    result = CliRunner().invoke(main, ["export", str(run_dir), "--member", str(member), "--out", str(tmp_path / "m"),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "recipe.yaml").is_file() and not BAR.search(result.stderr), result.stderr[:500]


# ------------------------------------------------------------------------------- fitness calibrate
def test_calibrate_writes_where_a_run_config_beside_it_looks(workspace, tmp_path, monkeypatch):
    """Relative paths in a calibration config, its task preset files and its output folder
    (`fitness_dir`, default `fitness`) resolve against the config's folder, whatever the working
    directory, as a run config's do; the command prints the absolute path it wrote."""
    from evomerge.cli import main
    from evomerge.fitness.compressed import CompressedFitness, resolve_fitness_path
    from evomerge.runs.config import load_run_config

    root = workspace[0]
    project = tmp_path / "project"
    project.mkdir()
    for name in ["sums_a", "sums_b"]:
        (project / f"{name}.yaml").write_text((root / f"{name}.yaml").read_text())
    fam = root / "fam"
    (project / "calibration.yaml").write_text(yaml.safe_dump({
        "name": "mine", "models": {"base": str(fam / "base"), "experts": [str(fam / "expert_0"), str(fam / "expert_1")]},
        "tasks": [{"preset": "sums_a.yaml"}, {"preset": "sums_b.yaml"}],
        "calibration": {"random_merges": 6}, "subset": {"n": 6}, "mixing": {"folds": 3}}))
    run_config = {**_search_yaml("mine"), "fitness": {"name": "fitness/mine"},
                  "models": {"base": str(fam / "base"), "experts": [str(fam / "expert_0"), str(fam / "expert_1")]}}
    (project / "run.yaml").write_text(yaml.safe_dump(run_config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    result = CliRunner().invoke(main, ["fitness", "calibrate", "../project/calibration.yaml", "--quiet"])
    assert result.exit_code == 0, result.output
    expected = project / "fitness" / "mine"
    assert f"compressed fitness saved to {expected}\n" in result.output  # absolute
    assert not (elsewhere / "fitness").exists()
    assert resolve_fitness_path(load_run_config(project / "run.yaml").fitness.name) == expected
    assert CompressedFitness.load(expected).name == "mine"
    assert not BAR.search(result.stderr), result.stderr[:500]


def test_example_calibration_lands_where_the_example_run_looks(monkeypatch, tmp_path):
    from evomerge.fitness.calibrate import calibration_output_path
    from evomerge.runs.config import load_run_config

    monkeypatch.chdir(tmp_path)
    target = calibration_output_path(REPO / "fitness" / "examples" / "zoo_small_calibration.yaml")
    run = load_run_config(REPO / "search_spaces" / "examples" / "zoo_small_run.yaml")
    assert target == Path(run.fitness.name) == REPO / "fitness" / "zoo_small"  # also where the demo looks
    medium = load_run_config(REPO / "search_spaces" / "examples" / "zoo_medium_run.yaml")
    assert calibration_output_path(REPO / "fitness" / "examples" / "zoo_medium_calibration.yaml") == \
        Path(medium.fitness.name) == REPO / "fitness" / "zoo_medium"
    assert medium.optimizer.name == "stitch" and medium.optimizer.settings["parts"] == "windows"
    # an explicit name: a bare name goes in the config's fitness_dir, a path is taken as given
    assert calibration_output_path(REPO / "fitness" / "examples" / "zoo_small_calibration.yaml", name="other") == \
        REPO / "fitness" / "other"
    assert calibration_output_path(REPO / "fitness" / "examples" / "zoo_small_calibration.yaml",
                                   name=str(tmp_path / "x" / "y")) == tmp_path / "x" / "y"
