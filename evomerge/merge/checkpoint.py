"""Hugging Face checkpoint folders: memory-mapped reading, compatibility checks, atomic sharded writing.

Reading follows the layout `transformers` writes (`model.safetensors`, or shards named
`model-XXXXX-of-YYYYY.safetensors` listed in `model.safetensors.index.json`). Tensors are read one
at a time through `safetensors.safe_open`, which memory-maps the file, so a 7B checkpoint costs no
more resident memory than the tensor being read. Pickle checkpoints (`pytorch_model*.bin`) are
refused unless the caller opts in, and are then loaded with `torch.load(weights_only=True)`
(memory-mapped when zip-format; the old non-zip format cannot be mapped and is read whole).

Every floating-point tensor is checked once as it is read: a NaN or inf raises `NonFiniteError`
naming the file and the tensor (a diverged or corrupt fine-tune would otherwise spread NaN through
every merge that touches it), unless the folder was opened with `allow_nonfinite=True`.

`SafetensorsReader` reads a tensor into a caller's buffer with `os.preadv` instead (nothing stays
mapped), for the streaming merge.

Writing mirrors `transformers.PreTrainedModel.save_pretrained`: shards above a size limit plus an
index, `config.json`, and the base model's tokenizer and generation config. Everything is written
into a temporary folder that is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge._atomic import atomic_directory
from evomerge.errors import CheckpointError  # defined torch-free, for the CLI

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Files copied from the base model so the written folder loads with AutoTokenizer / generate().
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"

# Heads that `transformers` ties to the input embeddings when `tie_word_embeddings` is set.
TIED_HEAD_ALIASES = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class NonFiniteError(CheckpointError):
    """A stored tensor holds NaN or inf."""


def check_finite(tensor: torch.Tensor, file: Path, name: str) -> None:
    """Raise `NonFiniteError` naming `file` and tensor `name` if a floating-point `tensor` holds NaN or inf.

    Usually one sum: a finite sum means no NaN / inf (IEEE: either makes the sum non-finite); only a
    non-finite sum (or an overflow) is checked entry by entry, and the message's counts only on failure.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    flat = tensor.detach().reshape(-1)
    nan, posinf, neginf = (int(flat.isnan().sum()), int(flat.isposinf().sum()), int(flat.isneginf().sum()))
    first = int((~torch.isfinite(flat)).nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(tensor.shape))) if tensor.dim() else ()
    raise NonFiniteError(
        f"{file}: tensor {name!r} holds {nan + posinf + neginf} non-finite values ({nan} NaN, {posinf} +inf, "
        f"{neginf} -inf; the first at index {list(index)}); the checkpoint is corrupt or its training diverged. "
        "Pass allow_nonfinite=True (CLI: --allow-nonfinite) to merge it anyway."
    )


def parse_dtype(name: str | torch.dtype | None, *, field_name: str = "dtype") -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise CheckpointError(f"{field_name}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ModelFolder:
    """A read-only view of one Hugging Face model folder; tensors are loaded lazily by name."""

    path: Path
    config: dict
    weight_map: dict[str, str]  # tensor name -> file name inside `path`
    is_pickle: bool = False
    allow_nonfinite: bool = False  # False: reading a tensor with NaN / inf raises NonFiniteError
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> stored name
    _handles: dict[str, object] = field(default_factory=dict, repr=False)
    _pickled: dict[str, dict] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_pickle: bool = False,
             allow_nonfinite: bool = False) -> "ModelFolder":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: model folder not found")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no config.json; is this a Hugging Face model folder?")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc

        pickled = {}  # file -> state dict, for a single pickle read here to list its tensors
        if (path / SAFE_INDEX).is_file():
            weight_map, is_pickle = _read_index(path / SAFE_INDEX), False
        elif (path / SAFE_SINGLE).is_file():
            weight_map, is_pickle = _single_file_map(path / SAFE_SINGLE), False
        elif (path / PICKLE_INDEX).is_file() or (path / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: only pickle weights (pytorch_model*.bin) were found. Pickle files can run "
                    "arbitrary code when loaded, so they are refused by default. Convert the model to "
                    "safetensors, or pass allow_pickle=True (CLI: --allow-pickle) to load them with "
                    "torch.load(weights_only=True)."
                )
            is_pickle = True
            if (path / PICKLE_INDEX).is_file():
                weight_map = _read_index(path / PICKLE_INDEX)
            else:
                pickled[PICKLE_SINGLE] = _load_pickle(path / PICKLE_SINGLE)
                weight_map = {name: PICKLE_SINGLE for name in pickled[PICKLE_SINGLE]}
        else:
            raise CheckpointError(
                f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX} or, with allow_pickle, "
                f"{PICKLE_SINGLE})"
            )
        for name, file in weight_map.items():
            if not (path / file).is_file():
                raise CheckpointError(f"{path}: tensor {name!r} is mapped to missing file {file!r}")
        folder = cls(path=path, config=config, weight_map=weight_map, is_pickle=is_pickle,
                     allow_nonfinite=allow_nonfinite, _pickled=pickled)
        folder.aliases = folder._tied_aliases()
        return folder

    def weights_fingerprint(self, samples: int = 64, chunk: int = 1 << 16) -> str:
        """A cheap content fingerprint of the weight files: each file's name, size and `samples`
        evenly spaced `chunk`-byte reads (the whole file when smaller), hashed. Fine-tuning changes
        nearly every byte of a checkpoint, so a different model of the same shapes differs here;
        reading 4 MiB per file keeps this fast for a 7B model, where a full sha256 would not be."""
        digest = hashlib.sha256()
        for file in sorted(set(self.weight_map.values())):
            path = self.path / file
            size = path.stat().st_size
            digest.update(f"{file}\0{size}\0".encode())
            with path.open("rb") as handle:
                if size <= samples * chunk:
                    digest.update(handle.read())
                    continue
                for i in range(samples):
                    handle.seek((size - chunk) * i // (samples - 1))
                    digest.update(handle.read(chunk))
        return digest.hexdigest()

    def _tied_aliases(self) -> dict[str, str]:
        if not self.config.get("tie_word_embeddings", False):
            return {}
        aliases = {}
        for head, sources in TIED_HEAD_ALIASES.items():
            if head in self.weight_map:
                continue
            for source in sources:
                if source in self.weight_map:
                    aliases[head] = source
                    break
        return aliases

    # ------------------------------------------------------------- inspecting
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    def tensor_names(self) -> list[str]:
        """Names of the tensors stored in the checkpoint, in file order (tied heads excluded)."""
        return list(self.weight_map)

    def has_tensor(self, name: str) -> bool:
        return name in self.weight_map or name in self.aliases

    def stored_name(self, name: str) -> str:
        """The name `name` is stored under (a tied head's embedding)."""
        return self._resolve(name)

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`."""
        return self.path / self.weight_map[self._resolve(name)]

    def _resolve(self, name: str) -> str:
        if name in self.weight_map:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise CheckpointError(f"{self.path}: tensor {name!r} not found")

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._resolve(name)
        file = self.weight_map[stored]
        if self.is_pickle:
            return tuple(self._pickle_shard(file)[stored].shape)
        return tuple(self._handle(file).get_slice(stored).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._resolve(name)
        file = self.weight_map[stored]
        if self.is_pickle:
            return self._pickle_shard(file)[stored].dtype
        return _SAFETENSORS_DTYPES[self._handle(file).get_slice(stored).get_dtype()]

    def get_tensor(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Load one tensor (memory-mapped for safetensors); optionally cast and move it.

        Checked for NaN / inf in its stored dtype (on `device`) unless the folder allows them.
        """
        stored = self._resolve(name)
        file = self.weight_map[stored]
        if self.is_pickle:
            tensor = self._pickle_shard(file)[stored]
        else:
            tensor = self._handle(file).get_tensor(stored)
        if torch.device(device).type != "cpu":
            tensor = tensor.to(device=device)
        if not self.allow_nonfinite:
            check_finite(tensor, self.path / file, stored)
        if dtype is not None:
            tensor = tensor.to(dtype=dtype)
        return tensor

    def _pickle_shard(self, file: str) -> dict:
        if file not in self._pickled:
            self._pickled[file] = _load_pickle(self.path / file)
        return self._pickled[file]

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()

    def __enter__(self) -> "ModelFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ------------------------------------------------------------------ reading into a buffer (no mmap)

class SafetensorsReader:
    """Reads one tensor of a safetensors model folder into a caller's buffer with `os.preadv`.

    Memory-mapped reads leave every page they touched counted in the process's resident memory
    until the map closes, and need a copy out of the map; `preadv` copies from the page cache
    straight into the destination (`evomerge merge` reads each tensor of every model once this way).
    """

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self._files: dict[str, tuple[int, int, dict]] = {}  # file -> (fd, data offset, header)

    def _entry(self, name: str) -> tuple[int, int, dict]:
        stored = name if name in self.folder.weight_map else self.folder.aliases[name]
        file = self.folder.weight_map[stored]
        if file not in self._files:
            fd = os.open(self.folder.path / file, os.O_RDONLY)
            try:
                (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, length, 8))
            except Exception:
                os.close(fd)
                raise
            self._files[file] = (fd, 8 + length, header)
        fd, data_start, header = self._files[file]
        if stored not in header:
            raise ValueError(f"{self.folder.path / file}: tensor {stored!r} is in the index but not in the file")
        return fd, data_start, header[stored]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype if it is floating point, else None."""
        dtype = _SAFETENSORS_DTYPES.get(self._entry(name)[2]["dtype"])
        return dtype if dtype is not None and dtype.is_floating_point else None

    def read(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, of the stored dtype and element count) with the stored bytes."""
        fd, data_start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        if end - begin != len(view):
            raise ValueError(f"{self.folder.path}: tensor {name!r} holds {end - begin} bytes, expected {len(view)}")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], data_start + begin + done)
            if got <= 0:
                raise ValueError(f"{self.folder.path}: unexpected end of file reading tensor {name!r}")
            done += got

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: malformed index, expected a 'weight_map' object ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' is empty or not an object")
    return dict(weight_map)


def _single_file_map(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from exc
    return {name: file.name for name in names}


def _load_pickle(file: Path) -> dict:
    # Only the zip format (torch >= 1.6's default) can be memory-mapped; the old format is read whole.
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot load with weights_only=True ({exc})") from exc


# ------------------------------------------------------------------ compatibility
# config.json fields that fix the tensors' number and shapes (Llama-style names; others are caught by
# the tensor checks)
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")


def check_compatible(base: ModelFolder, others: Sequence[ModelFolder]) -> list[str]:
    """Check that every model has the base's architecture, tensor names and shapes.

    Returns the tensor names to merge (the base's, in its file order). Tied heads count as present.
    """
    names = base.tensor_names()
    for other in others:
        if other.architecture != base.architecture:
            raise CheckpointError(
                f"{other.path}: architecture {other.architecture!r} differs from the base model "
                f"{base.path} ({base.architecture!r})"
            )
        # the shape fields of config.json first: "num_hidden_layers is 3 but the base's is 2" says more
        # than the first tensor that is missing or of another shape (checked below all the same)
        for field in SHAPE_FIELDS:
            if field in other.config and field in base.config and other.config[field] != base.config[field]:
                raise CheckpointError(
                    f"{other.path / 'config.json'}: {field} is {other.config[field]!r} but the base model's "
                    f"({base.path / 'config.json'}) is {base.config[field]!r}: a different depth or width "
                    "cannot be merged"
                )
        missing = [name for name in names if not other.has_tensor(name)]
        if missing:
            raise CheckpointError(
                f"{other.path}: tensor {missing[0]!r} of the base model {base.path} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = [name for name in other.tensor_names() if not base.has_tensor(name)]
        if extra:
            raise CheckpointError(
                f"{other.path}: tensor {extra[0]!r} is not in the base model {base.path}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name in names:
            if other.shape(name) != base.shape(name):
                raise CheckpointError(
                    f"{other.path}: tensor {name!r} has shape {list(other.shape(name))} but the base model "
                    f"{base.path} has {list(base.shape(name))}"
                )
    return names


# ------------------------------------------------------------------ writing
def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units as transformers uses)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"shard size: cannot parse {size!r}; use e.g. '5GB', '500MB' or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * factor)


class ShardedWriter:
    """Accumulates tensors into shards of at most `max_shard_bytes` and writes them to `folder`.

    Holds at most one shard in memory. Shard names get their final `-of-NNNNN` suffix in
    `finish()`, once the count is known, exactly as `save_pretrained` names them.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 10**9):
        self.folder = Path(folder)
        self.max_shard_bytes = max(1, int(max_shard_bytes))
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        temp_name = f"shard-{len(self._shards):05d}.partial"
        save_file(self._buffer, str(self.folder / temp_name), metadata={"format": "pt"})
        self._shards.append((temp_name, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def finish(self) -> list[str]:
        """Flush, give shards their final names and write the index when there is more than one."""
        self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / SAFE_SINGLE)
            return [SAFE_SINGLE]
        weight_map, files = {}, []
        for i, (temp_name, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temp_name, self.folder / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def write_model(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    base: ModelFolder,
    max_shard_bytes: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a Hugging Face model folder atomically from a stream of (name, tensor) pairs.

    `config.json`, tokenizer files and the generation config come from `base`; `dtype` (the dtype
    the tensors were written in) is recorded in the config. `extra_files` maps file names to text
    (e.g. the mergekit recipe). A failure at any point leaves no folder at `out_dir`.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, parse_size(max_shard_bytes))
        written_dtype = None
        for name, tensor in tensors:
            writer.add(name, tensor)
            if tensor.is_floating_point():
                written_dtype = tensor.dtype
        writer.finish()
        config = dict(base.config)
        if dtype is not None or written_dtype is not None:
            name = dtype_name(dtype or written_dtype)
            # transformers 5 writes `dtype`, 4 wrote `torch_dtype`: keep whichever the base used.
            if "torch_dtype" in config:
                config["torch_dtype"] = name
            if "dtype" in config or "torch_dtype" not in config:
                config["dtype"] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(base.path, tmp)
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
    return out_dir
