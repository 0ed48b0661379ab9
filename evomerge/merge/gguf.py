"""GGUF import: a llama.cpp `.gguf` file -> a merge-ready Hugging Face folder (`evomerge import-gguf`).

Fine-tunes are often published only as GGUF. transformers reads such a file
(`from_pretrained(folder, gguf_file=...)`: the config and tokenizer from its metadata, the weights
dequantized with the `gguf` package), but the model it gives refuses `save_pretrained` (it carries a
GGUF `quantization_config`). `import_gguf` therefore loads it dequantized, builds the plain model
class from the same config without that entry, loads the state dict into it (strictly: every name
and shape must match, so no packed GGUF layer can slip through) and saves that: safetensors, the
config, the tokenizer files with the chat template, the generation config, and the marker that lets
`--overwrite` replace the folder later (`outputs.MODEL_MARKER`). Tied embeddings stay tied (one
stored tensor, `tie_word_embeddings` in the config), as `save_pretrained` writes them.

Before any heavy work the file is checked: it must exist, start with the GGUF magic, have a readable
header whose tensors all lie inside the file (a truncated download fails here, naming the file), and
be of an architecture the installed transformers can dequantize into a causal LM (asked of
transformers itself, `AutoConfig.from_pretrained(..., gguf_file=...)`, so the answer follows its
own support table). The output folder is checked as `evomerge merge` checks it, and written through
`_atomic.atomic_directory`: a failure at any point leaves nothing at `out_dir`.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from evomerge._atomic import atomic_directory
from evomerge.errors import CheckpointError, OptionError

__all__ = ["GGUF_MAGIC", "GgufImport", "GgufInfo", "import_gguf", "inspect_gguf"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """What the file's header says, read without dequantizing anything."""

    path: Path
    architecture: str  # the GGUF `general.architecture` (llama, qwen2, ...)
    name: str | None  # `general.name`, when set
    tensors: int
    parameters: int  # elements over all tensors
    tensor_types: tuple[str, ...]  # the ggml types present (Q4_1, F32, ...)
    has_chat_template: bool


@dataclass(frozen=True)
class GgufImport:
    """What `import_gguf` wrote."""

    out_dir: Path
    source: Path
    architecture: str
    model_type: str  # the transformers model type of the written config
    parameters: int
    dtype: str
    bytes_written: int  # of the safetensors files
    has_chat_template: bool
    seconds: float


def inspect_gguf(path: str | os.PathLike) -> GgufInfo:
    """Read a GGUF file's header; `CheckpointError` naming the file when it is missing, not GGUF,
    unreadable or truncated (a tensor's data reaching past the end of the file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file; expected a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package: "
                              "pip install 'evomerge[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on a damaged header
        raise CheckpointError(f"{path}: cannot read the GGUF header; the file is truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from exc
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.size * tensor.data.itemsize < int(tensor.n_bytes):
            raise CheckpointError(f"{path}: truncated: tensor {tensor.name!r} needs bytes up to {end:,} but the "
                                  f"file has {size:,}; download it again")
    fields = reader.fields
    if "general.architecture" not in fields:
        raise CheckpointError(f"{path}: the GGUF header has no general.architecture field")
    name = fields["general.name"].contents() if "general.name" in fields else None
    return GgufInfo(path=path, architecture=str(fields["general.architecture"].contents()), name=name,
                    tensors=len(reader.tensors), parameters=sum(int(t.n_elements) for t in reader.tensors),
                    tensor_types=tuple(sorted({t.tensor_type.name for t in reader.tensors})),
                    has_chat_template="tokenizer.chat_template" in fields)


def _supported_architectures() -> list[str]:
    """The GGUF architectures the installed transformers reads (its legacy table and its newer loader's)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names.update(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})  # two metadata sections the legacy table lists beside them


def _gguf_config(info: GgufInfo):
    """transformers' config for the file, or `CheckpointError` naming the file and its architecture
    when transformers cannot dequantize it into a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = info.path
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError ("not supported yet"), KeyError or OSError
        import transformers

        raise CheckpointError(
            f"{path}: transformers {transformers.__version__} cannot read a GGUF file of architecture "
            f"{info.architecture!r} ({type(exc).__name__}: {exc}); architectures it dequantizes: "
            f"{', '.join(_supported_architectures())}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"{path}: architecture {info.architecture!r} becomes transformers model type "
                              f"{config.model_type!r}, which is not a causal language model; evomerge merges those")
    return config


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                dtype: str = "float32", max_shard_bytes: int | str = "5GB", progress: bool = False) -> GgufImport:
    """Dequantize the GGUF file at `path` into a Hugging Face model folder at `out_dir` (see the module docstring).

    `dtype`: the dtype the weights are written in (float32 keeps the dequantized values exactly;
    bfloat16 / float16 halve the folder). `overwrite`: replace `out_dir` only if evomerge wrote it.
    Errors: `CheckpointError` (the file: missing, not GGUF, truncated, an architecture transformers
    cannot dequantize), `OptionError` (`out_dir`, `max_shard_bytes`, `dtype`), all raised before the
    weights are read.
    """
    import torch

    from evomerge.merge.checkpoint import dtype_name, parse_dtype
    from evomerge.merge.outputs import (MODEL_MARKER, check_free_space, check_output_dir, is_model_file,
                                        marker_text, parse_shard_size, writing_errors)

    started = time.perf_counter()
    info = inspect_gguf(path)
    source = info.path.resolve()
    try:
        torch_dtype = parse_dtype(dtype, field_name="dtype")
    except CheckpointError as exc:
        raise OptionError("dtype", str(exc).removeprefix("dtype: ")) from None
    shard_bytes = parse_shard_size(max_shard_bytes, field="max_shard_bytes")
    out = check_output_dir(out_dir, inputs=[("GGUF file", source)], overwrite=overwrite, field="out_dir")
    check_free_space(out, info.parameters * torch.empty((), dtype=torch_dtype).element_size(), field="out_dir")
    config = _gguf_config(info)

    model, tokenizer = _load(info, torch_dtype, progress)
    plain = _plain_copy(model, torch_dtype)
    del model
    marker = {**json.loads(marker_text()), "imported_from": source.name, "gguf_architecture": info.architecture}
    marker.pop("recipe", None)  # an imported model has no merge recipe
    with writing_errors(out, field="out_dir"):
        with atomic_directory(out, overwrite=overwrite) as tmp:
            plain.save_pretrained(tmp, max_shard_size=shard_bytes)
            tokenizer.save_pretrained(tmp)
            (tmp / MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            foreign = sorted(name for name in os.listdir(tmp) if not is_model_file(name))
            if foreign:  # `--overwrite` could not replace such a folder later: refuse to write it now
                raise CheckpointError(f"{source}: transformers wrote files evomerge does not know as model files: "
                                      f"{foreign}")
    written = sum((out / f).stat().st_size for f in os.listdir(out) if f.endswith(".safetensors"))
    return GgufImport(out_dir=out, source=source, architecture=info.architecture, model_type=config.model_type,
                      parameters=sum(p.numel() for p in plain.parameters()), dtype=dtype_name(torch_dtype),
                      bytes_written=written, has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                      seconds=time.perf_counter() - started)


def _load(info: GgufInfo, dtype, progress: bool):
    """transformers' dequantized model and tokenizer from the file (local only, no remote code)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    kwargs = {"gguf_file": name, "local_files_only": True}
    quantization = getattr(transformers, "GgufConfig", None)  # newer releases may keep weights packed unless told
    model_kwargs = {"quantization_config": quantization(gguf_file=name, dequantize=True)} if quantization else {}
    with _maybe_quiet(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs, **model_kwargs)
        except Exception as exc:
            raise CheckpointError(f"{info.path}: transformers could not dequantize the weights "
                                  f"({type(exc).__name__}: {exc})") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"{info.path}: transformers could not build the tokenizer from the GGUF metadata "
                                  f"({type(exc).__name__}: {exc})") from exc
    return model.eval(), tokenizer


def _plain_copy(model, dtype):
    """The same architecture as an ordinary (unquantized) model holding `model`'s weights.

    The config is rebuilt without `quantization_config`; `load_state_dict(strict=True)` checks that
    every weight came out dense with the plain model's names and shapes."""
    import torch

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    plain = type(model)(config).to(dtype)
    try:
        plain.load_state_dict(model.state_dict(), strict=True)  # copies, casting to `dtype`
    except RuntimeError as exc:
        raise CheckpointError(f"the dequantized model does not fit a plain {type(model).__name__}: {exc}") from exc
    plain.generation_config = model.generation_config
    return plain.eval()


@contextlib.contextmanager
def _maybe_quiet(progress: bool) -> Iterator[None]:
    """Without `progress`: transformers' loading bars off, then as they were. (Its legacy GGUF loader's own
    "de-quantizing" bar is a plain tqdm bar it gives no switch for.)"""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
