"""Command-line interface: a thin shell over the Python API (STYLE rule 5).

Every command parses its arguments, calls one API function and prints the result; errors from
the API (bad recipes, incompatible checkpoints, ...) are shown as one clear line, not a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from evomerge.merge.checkpoint import CheckpointError
from evomerge.merge.layers import LayerMappingError
from evomerge.merge.params import ParameterError
from evomerge.merge.recipe import RecipeError

USER_ERRORS = (CheckpointError, RecipeError, LayerMappingError, ParameterError, FileExistsError, FileNotFoundError)


def _fail(exc: Exception) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(2)


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
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new model is complete).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge_command(config: Path, out_dir: Path, shard_size: str, device: str, allow_pickle: bool, overwrite: bool, quiet: bool) -> None:
    """Merge models as a mergekit-style YAML CONFIG describes and write a Hugging Face folder."""
    from evomerge.merge.engine import merge_recipe

    try:
        report = merge_recipe(config, out_dir, max_shard_bytes=shard_size, allow_pickle=allow_pickle,
                              device=device, overwrite=overwrite, progress=not quiet)
    except USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"wrote {report.out_dir} ({report.tensors} tensors, {report.bytes_written / 1e6:.1f} MB) in {report.seconds:.1f}s")


if __name__ == "__main__":
    main()
