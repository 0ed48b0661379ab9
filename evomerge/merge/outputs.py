"""Where a merged model goes: `--out` is checked before any tensor is read, and `--overwrite` only
replaces a folder a merge wrote.

`merge_recipe` (behind `evomerge merge` and `evomerge export`) writes its folder atomically
(`_atomic.atomic_directory`), but a wrong `--out` could still destroy data or fail an hour in. So
`check_output_dir`, before any work:

* refuses an `--out` that is one of the command's inputs (the base model or an expert), lies inside
  one, or contains one (paths compared resolved, so symlinks do not hide them);
* refuses an existing `--out` without `overwrite`, and with it replaces only a folder evomerge wrote:
  one holding the marker `MODEL_MARKER` (written into every folder a merge writes) or, for folders
  written before the marker existed, `recipe.yaml` — and nothing but the files a merge writes
  (`is_model_file`). Anything else (notes, a README, a subfolder) is named, and the folder kept;
* refuses a location whose nearest existing folder is not a folder we can write in.

`check_free_space` then compares the model's size (known from the checkpoint headers) with the free
space there, and `writing_errors` reports an error while writing (disk full, permission, read-only)
naming `--out`, never the temporary sibling the folder is built in.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

from evomerge.errors import OptionError
from evomerge.merge.checkpoint import GENERATION_CONFIG, SAFE_INDEX, SAFE_SINGLE, TOKENIZER_FILES, parse_size

__all__ = ["MODEL_MARKER", "RECIPE_FILE", "OutputError", "check_free_space", "check_output_dir", "is_model_file",
           "marker_text", "parse_shard_size", "reads", "writing_errors"]

MODEL_MARKER = ".evomerge-model.json"  # written into every model folder a merge writes
RECIPE_FILE = "recipe.yaml"  # the mergekit recipe beside the weights
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MODEL_FILES = frozenset({MODEL_MARKER, RECIPE_FILE, "config.json", SAFE_SINGLE, SAFE_INDEX, GENERATION_CONFIG,
                          *TOKENIZER_FILES})
T = TypeVar("T")


class OutputError(OptionError):
    """An output folder that cannot or must not be written; the message says why."""


def is_model_file(name: str) -> bool:
    """Whether a merge writes a file of this name into its folder."""
    return name in _MODEL_FILES or bool(_SHARD.fullmatch(name))


def marker_text() -> str:
    """The contents of `MODEL_MARKER`: who wrote the folder (what `--overwrite` checks)."""
    from evomerge import __version__

    return json.dumps({"written_by": "evomerge", "version": __version__, "recipe": RECIPE_FILE}, indent=2) + "\n"


def parse_shard_size(value: int | str, *, field: str = "max_shard_bytes") -> int:
    """Bytes per safetensors shard from '5GB', '500MB', '2GiB' or a byte count; OptionError naming `field`."""
    try:
        size = parse_size(value)
    except (TypeError, ValueError):
        raise OptionError(field, f"cannot read {value!r} as a size; use e.g. 5GB, 500MB, 2GiB or a byte count"
                          ) from None
    if size < 1:
        raise OptionError(field, f"{value!r} is {size} bytes; a shard needs at least 1 byte (e.g. 5GB)")
    return size


def _why_not_replaceable(folder: Path) -> str | None:
    """None when `folder` is a model folder a merge wrote (so `--overwrite` may replace it), else why not."""
    entries = sorted(os.listdir(folder))
    if not entries:
        return None  # an empty folder holds nothing to lose
    foreign = [name for name in entries
               if not is_model_file(name) or (folder / name).is_symlink() or not (folder / name).is_file()]
    if foreign:
        listed = ", ".join(repr(name) for name in foreign[:3])
        if len(foreign) > 3:
            listed += f" and {len(foreign) - 3} more"
        return f"it holds {listed}, which evomerge did not write"
    if MODEL_MARKER in entries:
        try:
            if json.loads((folder / MODEL_MARKER).read_text()).get("written_by") == "evomerge":
                return None
        except (OSError, ValueError, AttributeError):
            pass
        return f"its {MODEL_MARKER} is not one evomerge wrote"
    if RECIPE_FILE in entries:  # a folder written before the marker: weights, config, tokenizer, recipe.yaml
        return None
    return f"it has neither {MODEL_MARKER} nor {RECIPE_FILE}"


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out_dir: str | os.PathLike, *, inputs: Sequence[tuple[str, str | os.PathLike]],
                     overwrite: bool = False, field: str = "out_dir") -> Path:
    """Check that a model may be written to `out_dir` (see the module docstring); returns it as a Path.

    `inputs`: (role, path) of everything the command reads, e.g. ("base model", ".../base").
    Raises OutputError naming `field` and `out_dir`; touches nothing (a probe file aside).
    """
    out = Path(out_dir).expanduser()
    target = out.resolve()
    for role, path in inputs:
        source = Path(path).expanduser().resolve()
        named = role if Path(path) == out else f"{role} {path}"
        if target == source:
            why = f"it is the {named}"
        elif source in target.parents:
            why = f"it lies inside the {named}"
        elif target in source.parents:
            why = f"it contains the {named}"
        else:
            continue
        raise OutputError(field, f"{out}: {why}, an input of this command; writing there would damage it. "
                                 "Choose another folder")
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputError(field, f"{out} exists and is not a folder")
        if not overwrite:
            raise OutputError(field, f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        why = _why_not_replaceable(out)
        if why is not None:
            raise OutputError(field, f"{out} was not written by evomerge ({why}); --overwrite only replaces a model "
                                     "folder evomerge wrote. Remove it yourself or choose another folder")
    check_can_write(out, field=field)
    return out


def check_can_write(out: Path, *, field: str) -> None:
    """OutputError naming `field` unless `out` (a folder, existing or not) can be created or written in."""
    parent = out if out.is_dir() else _nearest_existing(out.parent)
    if not parent.is_dir():
        raise OutputError(field, f"{out}: cannot create it, {parent} is not a folder")
    try:  # os.access says yes to root on a read-only mount or chmod 555: try it
        fd, probe = tempfile.mkstemp(prefix=".evomerge-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(field, f"{out}: cannot write in {parent} ({exc.strerror or exc})") from None


def check_free_space(out_dir: str | os.PathLike, needed_bytes: int, *, field: str = "out_dir") -> None:
    """OutputError when the filesystem `out_dir` goes on has less than `needed_bytes` free.

    (An overwritten folder is removed only once the new one is complete, so it does not count.)
    """
    out = Path(out_dir).expanduser()
    try:
        usage = shutil.disk_usage(_nearest_existing(out.parent))
    except OSError:
        return  # no figure to compare with: the write itself will tell
    if usage.total > 0 and usage.free < needed_bytes:
        raise OutputError(field, f"{out}: the merged model needs about {needed_bytes / 1e9:.2f} GB but only "
                                 f"{usage.free / 1e9:.2f} GB are free there")


class _ReadFailure(Exception):
    """Carries an error raised while producing tensors (reading inputs, merging) past `writing_errors`."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def reads(items: Iterable[T]) -> Iterator[T]:
    """`items`, with any error it raises marked as not a write error (see `writing_errors`)."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise _ReadFailure(exc) from exc
        yield item


@contextlib.contextmanager
def writing_errors(out_dir: str | os.PathLike, *, field: str = "out_dir") -> Iterator[None]:
    """Report an OSError while writing (disk full, permission, read-only) as OutputError naming `out_dir`.

    Errors from the tensors fed through `reads` pass through unchanged.
    """
    from safetensors import SafetensorError  # the writer's own I/O errors (e.g. "No space left on device")

    failed = None
    try:
        yield
    except _ReadFailure as failure:
        failed = failure.error
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(field, f"{Path(out_dir)}: cannot write the model ({reason}); nothing was written there"
                          ) from exc
    if failed is not None:
        raise failed  # outside the handler, so it keeps its own cause and context
