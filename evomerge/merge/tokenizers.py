"""Do the base model and its experts read token ids the same way? Checked from the tokenizer files alone.

A merge adds embedding and LM-head rows by token id, so it is only meaningful when every model
gives every token the same id. An expert whose tokenizer maps tokens differently at the same
vocabulary size would merge without any shape error into a model that scrambles those tokens
(mergekit's `tokenizer_source` exists for this). So, when a merge or a search opens its models:

* a token with different ids in two models (vocabulary or added tokens), or a vocabulary token one
  model lacks, raises `TokenizerMismatchError` naming both folders and one such token;
* added tokens present in only one model, or special-token roles (bos, eos, pad, ...) naming
  different tokens, warn (`TokenizerMismatchWarning`): rows the base does not know, or a different
  stop token, which a fine-tune often adds on purpose;
* a model without tokenizer files is not compared.

The files are read as JSON / text (`tokenizer.json`; else `vocab.json` or `vocab.txt`; plus
`added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder`); no tokenizer is built.
A sentencepiece `tokenizer.model` alone is compared byte for byte, and only warns when it differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from evomerge.merge.checkpoint import CheckpointError

__all__ = ["TokenizerMismatchError", "TokenizerMismatchWarning", "TokenizerVocabulary", "check_tokenizers",
           "read_vocabulary"]

SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TokenizerMismatchError(CheckpointError):
    """Two models give a token different ids: their embedding rows do not line up."""


class TokenizerMismatchWarning(UserWarning):
    """Two models' tokenizers differ only in added tokens or special-token roles."""


@dataclass(frozen=True)
class TokenizerVocabulary:
    """What one folder's tokenizer files say about token ids."""

    vocab: dict[str, int]  # the tokenizer model's own vocabulary (empty when only `sentencepiece` is known)
    added: dict[str, int]  # added tokens
    special: dict[str, str]  # role -> token content ("additional_special_tokens" joined by spaces)
    sentencepiece: str | None = None  # sha256 of tokenizer.model when no vocabulary file could be read


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read tokenizer file ({exc})") from exc


def _content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _model_vocab(model) -> dict[str, int]:
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        return {str(token): int(i) for token, i in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        return {str(entry[0]): i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    return {}


def read_vocabulary(folder: str | os.PathLike) -> TokenizerVocabulary | None:
    """The token -> id maps and special tokens of `folder`'s tokenizer files; None when it has none."""
    folder = Path(folder)
    vocab: dict[str, int] = {}
    added: dict[str, int] = {}
    special: dict[str, str] = {}
    sentencepiece = None
    found = False
    if (folder / "tokenizer.json").is_file():
        found = True
        data = _load_json(folder / "tokenizer.json")
        vocab = _model_vocab(data.get("model"))
        for entry in data.get("added_tokens") or []:
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and "id" in entry:
                added[entry["content"]] = int(entry["id"])
    elif (folder / "vocab.json").is_file():
        found = True
        vocab = {str(token): int(i) for token, i in _load_json(folder / "vocab.json").items()}
    elif (folder / "vocab.txt").is_file():
        found = True
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = {token: i for i, token in enumerate(lines)}
    elif (folder / "tokenizer.model").is_file():
        found = True
        sentencepiece = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
    if (folder / "added_tokens.json").is_file():
        found = True
        added.update({str(token): int(i) for token, i in _load_json(folder / "added_tokens.json").items()})
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as transformers reads it
        if not (folder / name).is_file():
            continue
        found = True
        data = _load_json(folder / name)
        for role in SPECIAL_ROLES:
            if _content(data.get(role)) is not None:
                special[role] = _content(data[role])
        extra = [_content(v) for v in data.get("additional_special_tokens") or []]
        if extra:
            special["additional_special_tokens"] = " ".join(t for t in extra if t is not None)
        decoder = data.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for i, entry in decoder.items():
                if _content(entry) is not None:
                    added.setdefault(_content(entry), int(i))
    return TokenizerVocabulary(vocab, added, special, sentencepiece) if found else None


def check_tokenizers(base: str | os.PathLike, others: Sequence[str | os.PathLike]) -> list[str]:
    """Compare each of `others`' tokenizer files with `base`'s (see the module docstring).

    Raises `TokenizerMismatchError` when token ids differ; warns and returns the warning messages
    when only added tokens or special-token roles differ. Folders without tokenizer files are skipped.
    """
    base = Path(base)
    base_vocab = read_vocabulary(base)
    if base_vocab is None:
        return []
    messages = []
    for other in map(Path, others):
        other_vocab = read_vocabulary(other)
        if other_vocab is None or other.resolve() == base.resolve():
            continue
        message = _compare(base, base_vocab, other, other_vocab)
        if message:
            warnings.warn(message, TokenizerMismatchWarning, stacklevel=2)
            messages.append(message)
    return messages


def _compare(base: Path, a: TokenizerVocabulary, other: Path, b: TokenizerVocabulary) -> str | None:
    """Raise on differing ids; return a warning message (or None) for milder differences."""
    where = f"the tokenizer of {other} differs from the base model {base}'s"
    for ours in (a.vocab, a.added):
        for theirs in (b.vocab, b.added):
            clash = next(((token, i) for token, i in sorted(ours.items(), key=lambda item: item[1])
                          if theirs.get(token, i) != i), None)
            if clash:
                token, i = clash
                raise TokenizerMismatchError(
                    f"{where}: token {token!r} is id {i} in the base but id {theirs[token]} in this model, so "
                    "their embedding rows do not line up. Merge models that share one tokenizer."
                )
    for first, x, second, y in ((base, a, other, b), (other, b, base, a)):
        missing = sorted((i, token) for token, i in x.vocab.items() if token not in y.vocab and token not in y.added)
        if missing and y.vocab:
            i, token = missing[0]
            raise TokenizerMismatchError(
                f"{where}: {len(a.vocab)} vs {len(b.vocab)} vocabulary tokens; token "
                f"{token!r} (id {i}) of {first} is not in {second}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ". Merge models that share one tokenizer."
            )
    notes = []
    only_a = sorted((i, t) for t, i in a.added.items() if t not in b.added and t not in b.vocab)
    only_b = sorted((i, t) for t, i in b.added.items() if t not in a.added and t not in a.vocab)
    for folder, only in ((base, only_a), (other, only_b)):
        if only:
            shown = ", ".join(f"{t!r} (id {i})" for i, t in only[:3]) + (" ..." if len(only) > 3 else "")
            notes.append(f"added tokens only in {folder}: {shown}")
    for role in sorted(set(a.special) | set(b.special)):
        if role in a.special and role in b.special and a.special[role] != b.special[role]:
            notes.append(f"{role} is {a.special[role]!r} in {base} but {b.special[role]!r} in {other}")
    if a.sentencepiece and b.sentencepiece and a.sentencepiece != b.sentencepiece:
        notes.append("their tokenizer.model files differ (not compared token by token)")
    if not notes:
        return None
    return f"{where} (the merged model gets the base's): " + "; ".join(notes)
