"""Command-line interface: a thin shell over the Python API (STYLE rule 5).

Every command parses its arguments, calls one API function and prints the result; errors from
the API (bad recipes, incompatible checkpoints, ...) are shown as one clear line, not a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

# Only torch-free imports at the top: `evomerge --help` must not pay for torch (1.5 s, 255 MB).
# Each command imports what it needs when it runs.
from evomerge.errors import USER_ERRORS, OptionError

# API argument -> the flag that sets it, so an OptionError from the API names what the user typed.
FLAGS = {"out_dir": "--out", "max_shard_bytes": "--shard-size", "device": "--device", "by": "--choose-by"}


def _fail(exc: Exception) -> None:
    if isinstance(exc, OptionError):
        exc = exc.renamed(FLAGS)
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(2)


# For workers this process starts (Ray's inherit the environment) and libraries imported later.
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_VERBOSITY": "error"}


def _quiet_libraries(ctx: click.Context, param: click.Parameter, quiet: bool) -> bool:
    """`--quiet` on a command that loads models: silence transformers too (its "Loading weights" bar
    for every model it loads, and its warnings) and datasets' bars, until the command ends."""
    if not quiet:
        return quiet
    import datasets  # both are imported by the command anyway
    from transformers.utils import logging as hf_logging

    saved_env = {key: os.environ.get(key) for key in _QUIET_ENV}
    bars, verbosity, dataset_bars = (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(),
                                     datasets.is_progress_bar_enabled())
    os.environ.update(_QUIET_ENV)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()

    def restore() -> None:  # matters when the CLI runs inside another program (tests, notebooks)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if dataset_bars:
            datasets.enable_progress_bars()

    ctx.call_on_close(restore)
    return quiet


def quiet_option(loads_models: bool = True):
    """`--quiet`: no progress bars; for commands that load models, none from transformers either."""
    return click.option("--quiet", is_flag=True, callback=_quiet_libraries if loads_models else None,
                        help="No progress bars" + (" (nor transformers' loading bars and warnings)." if loads_models else "."))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evomerge")
def main() -> None:
    """evomerge: search for the best way to merge fine-tuned models."""


@main.command("merge")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--shard-size", default="5GB", show_default=True, help="Maximum safetensors shard size.")
@click.option("--device", default="cpu", show_default=True, help="Device to merge on (cpu, cuda, cuda:1).")
@click.option("--allow-pickle", is_flag=True, help="Load pickle (*.bin) checkpoints with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge models holding NaN / inf weights instead of refusing them (they stay non-finite in the output).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a model folder evomerge wrote (once the new model is complete); "
                   "never a folder holding other files, nor an input model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge_command(config: Path, out_dir: Path, shard_size: str, device: str, allow_pickle: bool, allow_nonfinite: bool,
                  overwrite: bool, quiet: bool) -> None:
    """Merge models as a mergekit-style YAML CONFIG describes and write a Hugging Face folder."""
    from evomerge.merge.engine import merge_recipe

    try:
        report = merge_recipe(config, out_dir, max_shard_bytes=shard_size, allow_pickle=allow_pickle,
                              allow_nonfinite=allow_nonfinite, device=device, overwrite=overwrite, progress=not quiet)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"wrote {report.out_dir} ({report.tensors} tensors, {report.bytes_written / 1e6:.1f} MB) in {report.seconds:.1f}s")


# ------------------------------------------------------------------------------- zoo
@main.group("zoo")
def zoo_group() -> None:
    """The built-in demo models and tasks."""


@zoo_group.command("build")
@click.option("--out", "out_dir", default="zoo", show_default=True, type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "small", "medium_tiny", "medium", "smol_tiny", "smol"]), default="small",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="experts trained at a time on a CPU, one torch thread each (the same bytes)")
def zoo_build(out_dir: Path, size: str, seed: int, workers: int) -> None:
    """Build (or reuse) the demo base model, task experts and task data under OUT/SIZE."""
    from evomerge.zoo import build_zoo

    manifest = build_zoo(out_dir, size=size, seed=seed, progress=True, workers=workers)
    click.echo(f"zoo ready: {getattr(manifest, 'root', out_dir)}")


# ------------------------------------------------------------------------------- fitness
@main.group("fitness")
def fitness_group() -> None:
    """Calibrate and inspect compressed fitness functions."""


@fitness_group.command("calibrate")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None,
              help="Save as NAME in the config's fitness_dir (default: the config's name), or at NAME if it is a path.")
@click.option("--overwrite", is_flag=True, help="Replace an existing compressed fitness of that name.")
@quiet_option()
def fitness_calibrate(config: Path, name: str | None, overwrite: bool, quiet: bool) -> None:
    """Score endpoint models and random merges, fit IRT, choose subsets, and save a compressed fitness.

    It is saved in CONFIG's `fitness_dir` (default: `fitness/` beside CONFIG), so that a run config
    beside CONFIG names it as `fitness: {name: fitness/NAME}`, whatever the working directory.
    """
    from evomerge.fitness.calibrate import calibrate_from_config
    from evomerge.fitness.compressed import FitnessError
    from evomerge.fitness.tasks import TaskError

    try:
        path = calibrate_from_config(config, name=name, overwrite=overwrite, echo=click.echo)
    except (*USER_ERRORS, FitnessError, TaskError) as exc:
        _fail(exc)
    click.echo(f"compressed fitness saved to {Path(path).resolve()}")


# ------------------------------------------------------------------------------- runs
def _run_errors():
    from evomerge.fitness.compressed import FitnessError
    from evomerge.fitness.tasks import TaskError
    from evomerge.runs.config import ConfigError
    from evomerge.runs.store import RunStoreError
    from evomerge.search.space import SearchSpaceError

    return (*USER_ERRORS, ConfigError, RunStoreError, SearchSpaceError, FitnessError, TaskError)


@main.command("search")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True,
              help="Delete an existing run of the same name and start over (only a run folder no process holds).")
@quiet_option()
def search_command(config: Path, overwrite: bool, quiet: bool) -> None:
    """Run a merge search as CONFIG (a run YAML) describes; writes runs/<name>/."""
    from evomerge.runs.search import SearchInterrupted, start_search

    try:
        start_search(config, overwrite=overwrite, progress=not quiet, echo=click.echo)
    except (SearchInterrupted, KeyboardInterrupt):
        sys.exit(130)
    except _run_errors() as exc:
        _fail(exc)


@main.command("resume")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--address", default=None,
              help="Run the workers on this Ray cluster (HOST:PORT) instead of the run's; results do not change.")
@quiet_option()
def resume_command(run_dir: Path, address: str | None, quiet: bool) -> None:
    """Continue an interrupted search from its last good checkpoint."""
    from evomerge.runs.search import SearchInterrupted, resume_search

    try:
        resume_search(run_dir, address=address, progress=not quiet, echo=click.echo)
    except (SearchInterrupted, KeyboardInterrupt):
        sys.exit(130)
    except _run_errors() as exc:
        _fail(exc)


@main.command("plan")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def plan_command(config: Path) -> None:
    """Per worker, the bytes each memory mode needs on device and host for CONFIG's models (from the
    safetensors headers: nothing is loaded), and the mode chosen; fails when no mode fits."""
    from evomerge.runs.plan import plan_run

    try:
        plan = plan_run(config)
    except _run_errors() as exc:
        _fail(exc)
    click.echo(plan.format())
    if plan.chosen is None and not plan.remote:
        _fail(plan.error())


CHOOSE_BY_HELP = ("How the default member is chosen: mean (the highest mean over tasks, the worst task breaking "
                  "ties), worst (the highest worst task, the mean breaking ties), or W1,W2,... (one weight per task "
                  "in the run's task order, normalised; the worst task breaking ties).")


@main.command("pareto")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--choose-by", "choose_by", default="mean", show_default=True, help=CHOOSE_BY_HELP)
def pareto_command(run_dir: Path, choose_by: str) -> None:
    """Print the run's Pareto set (estimated accuracy per task; test scores once verified)."""
    import pandas as pd

    from evomerge.runs.run import ChoiceRule, Run

    try:
        run = Run.load(run_dir)
        rule = ChoiceRule.parse(choose_by, run.tasks)
        frame = run.pareto
        chosen = run.best_balanced(rule) if not frame.empty else None
    except _run_errors() as exc:
        _fail(exc)
    if frame.empty:
        click.echo(f"{run_dir}: the Pareto set is empty")
        return
    # Crowding (NSGA-II's spacing, infinite at the ends of the front) steers the optimizer; it does
    # not help a person choose a merge, so the table leaves it out (Run.pareto keeps it).
    table = frame.drop(columns="crowding")
    table.insert(0, "export", ["*" if member == chosen else "" for member in table.index])
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.precision", 3):
        click.echo(table.to_string())
    flag = "" if rule.by == "mean" else f" --choose-by {choose_by}"
    click.echo(f"\n* member {chosen}: what `evomerge export{flag}` takes by default ({rule.describe()});\n"
               f"  `evomerge export{flag} --finalists N` re-scores the N best on the whole fitness split and may "
               "take another.")


@main.command("verify")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--member", "members", type=int, multiple=True, help="Only these member ids (default: the Pareto set).")
@click.option("--split", "role", type=click.Choice(["test", "fitness"]), default="test", show_default=True)
@quiet_option()
def verify_command(run_dir: Path, members: tuple[int, ...], role: str, quiet: bool) -> None:
    """Score Pareto members on the full test split and record it in verify.json."""
    from evomerge.runs.run import Run

    try:
        run = Run.load(run_dir)
        run.verify(list(members) or None, role=role, echo=click.echo)
    except _run_errors() as exc:
        _fail(exc)
    click.echo(f"recorded in {run_dir / 'verify.json'}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--member", "member", type=int, default=None,
              help="Candidate id (default: the best Pareto member by --choose-by on the compressed fitness).")
@click.option("--finalists", type=int, default=None,
              help="Without --member: score this many best Pareto members on the whole fitness split and "
                   "export the best of them there (recorded in verify.json).")
@click.option("--choose-by", "choose_by", default=None, help=CHOOSE_BY_HELP + "  [default: mean]")
@click.option("--racing", is_flag=True,
              help="With --finalists: score the finalists on the fitness split a batch of items at a time and drop "
                   "those confidently worse than the leader (paired bound; recorded in verify.json).")
@click.option("--racing-batch", "racing_batch", type=int, default=None,
              help="With --racing: items per task per round  [default: 100]")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a model folder evomerge wrote; never a folder holding other files, "
                   "nor an input model.")
@click.option("--shard-size", default="5GB", show_default=True)
@quiet_option(loads_models=False)
def export_command(run_dir: Path, member: int | None, finalists: int | None, choose_by: str | None, racing: bool,
                   racing_batch: int | None, out_dir: Path, overwrite: bool, shard_size: str, quiet: bool) -> None:
    """Write a Pareto member as a Hugging Face model folder plus recipe.yaml (mergekit format)."""
    from evomerge.runs.run import ChoiceRule, Run

    if member is not None and finalists is not None:
        _fail(click.UsageError("give --member or --finalists, not both"))
    if member is not None and choose_by is not None:
        _fail(click.UsageError("give --member or --choose-by, not both"))
    if (racing or racing_batch is not None) and not finalists:
        _fail(click.UsageError("--racing and --racing-batch need --finalists"))
    if racing_batch is not None and not racing:
        _fail(click.UsageError("--racing-batch needs --racing"))
    if racing_batch is not None and racing_batch < 1:
        _fail(click.UsageError(f"--racing-batch: expected at least 1 item per task, got {racing_batch}"))
    try:
        run = Run.load(run_dir)
        rule = ChoiceRule.parse(choose_by or "mean", run.tasks)  # before any scoring
        run.check_export(out_dir, overwrite=overwrite, max_shard_bytes=shard_size)
        if member is None:
            member = (run.choose(finalists, by=rule, echo=click.echo, racing=racing, batch=racing_batch)
                      if finalists else run.best_balanced(rule))
        path = run.export(member, out_dir, overwrite=overwrite, max_shard_bytes=shard_size, progress=not quiet)
    except _run_errors() as exc:
        _fail(exc)
    click.echo(f"exported member {member} to {path} (recipe: {path / 'recipe.yaml'})")


# ------------------------------------------------------------------------------- models from outside, scores
@main.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--dtype", default="float32", show_default=True,
              help="Dtype of the written weights (float32 keeps the dequantized values exactly; bfloat16, float16).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a model folder evomerge wrote; never a folder holding other files.")
@quiet_option()
def import_gguf_command(gguf_file: Path, out_dir: Path, dtype: str, overwrite: bool, quiet: bool) -> None:
    """Dequantize a llama.cpp GGUF_FILE into a merge-ready Hugging Face folder (safetensors, tokenizer, chat template)."""
    from evomerge.merge.gguf import import_gguf

    try:
        report = import_gguf(gguf_file, out_dir, dtype=dtype, overwrite=overwrite, progress=not quiet)
    except USER_ERRORS as exc:
        _fail(exc)
    template = "with" if report.has_chat_template else "without"
    click.echo(f"wrote {report.out_dir} ({report.architecture} -> {report.model_type}, {report.parameters / 1e6:.1f}M "
               f"parameters in {report.dtype}, {report.bytes_written / 1e6:.1f} MB, {template} a chat template) "
               f"in {report.seconds:.1f}s")


@main.command("score")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--fitness", "fitness", required=True,
              help="Compressed fitness: a name under ./fitness/ or the packaged presets, or its folder.")
@click.option("--split", type=click.Choice(["fitness", "test", "subset"]), default="fitness", show_default=True,
              help="fitness: the whole fitness split; test: the sealed test split (the read is recorded); subset: "
                   "the fitness's subset items, the answers and estimates a search records.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present).")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=Path),
              help="Also write every per-item answer (and, for subset, the item ids and estimates) to this file.")
@quiet_option()
def score_command(model_dir: Path, fitness: str, split: str, device: str | None, json_path: Path | None,
                  quiet: bool) -> None:
    """Score the model in MODEL_DIR on a compressed fitness's tasks: accuracy per task and the mean."""
    from evomerge._atomic import write_json_atomic
    from evomerge.fitness.score import score_model

    try:
        result = score_model(model_dir, fitness, split=split, device=device)
    except _run_errors() as exc:
        _fail(exc)
    width = max(len(task) for task in result.tasks)
    for task, score in result.tasks.items():
        line = f"{task:<{width}}  {score.accuracy:.3f}  ({sum(score.answers)}/{score.n_items} items)"
        if split == "subset":
            line += f"  estimate {score.estimate:.3f} +- {score.stderr:.3f}  answers {''.join(map(str, score.answers))}"
        click.echo(line)
    click.echo(f"{'mean':<{width}}  {result.mean:.3f}  ({split} split of {result.fitness}, {result.seconds:.1f}s)")
    if json_path is not None:
        write_json_atomic(json_path, result.to_dict())


if __name__ == "__main__":
    main()
