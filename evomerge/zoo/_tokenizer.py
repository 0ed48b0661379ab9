"""The zoo's character-level tokenizer, saved as ordinary Hugging Face tokenizer files.

Every character of a prompt is one token (a `tokenizers` WordLevel model over single characters),
so the models learn digit-level algorithms rather than tokenization quirks. Encoding prepends
`<bos>`, as Llama tokenizers do; answers end with `<eos>`; `<pad>` pads.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from evomerge._atomic import write_json_atomic

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = "0123456789+=RS"  # digits, the addition operator, the answer cue, the task markers
# the medium zoo's extra tasks: subtraction's operator, the rotation and max/min markers. Appended,
# so every character keeps its id and the small zoo's prompts encode alike in either vocabulary
MEDIUM_CHARACTERS = CHARACTERS + "-LM"


def vocab_for(characters: str) -> dict[str, int]:
    """Token -> id: the special tokens, then one token per character."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(characters))}


VOCAB: dict[str, int] = vocab_for(CHARACTERS)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)


def build_tokenizer(characters: str = CHARACTERS):
    """A `PreTrainedTokenizerFast` over `vocab_for(characters)`: one token per character, `<bos>` prepended."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab_for(characters), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one piece per char
    backend.decoder = decoders.Fuse()  # join characters without spaces
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`save_pretrained`, then name the class `PreTrainedTokenizerFast` so transformers 4 loads it too."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["padding_side"] = "left"  # generation-style default; training code pads by hand
    write_json_atomic(config_path, config)


def encode_chars(text: str, vocab: dict[str, int] = VOCAB) -> list[int]:
    """Token ids of `text` without `<bos>`: the same ids the saved tokenizer produces."""
    try:
        return [vocab[c] for c in text]
    except KeyError as error:
        characters = "".join(t for t in vocab if t not in SPECIAL_TOKENS)
        raise ValueError(f"character {error.args[0]!r} in {text!r} is not in the zoo vocabulary {characters!r}") from None
