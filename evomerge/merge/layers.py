"""Tensor name -> position in the network (layer index, or embeddings / final norm / LM head).

Per-layer merge coefficients need to know which transformer block a tensor belongs to. The
patterns follow the parameter names `transformers` uses for each family; a config can supply its
own pattern (a regular expression with one group capturing the layer index) for anything else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from evomerge.errors import LayerMappingError  # defined torch-free, for the CLI

# model_type -> regex whose first group is the layer index.
LAYER_PATTERNS: dict[str, str] = {
    "llama": r"^model\.layers\.(\d+)\.",
    "mistral": r"^model\.layers\.(\d+)\.",
    "qwen2": r"^model\.layers\.(\d+)\.",
    "qwen3": r"^model\.layers\.(\d+)\.",
    "gemma": r"^model\.layers\.(\d+)\.",
    "gemma2": r"^model\.layers\.(\d+)\.",
    "phi3": r"^model\.layers\.(\d+)\.",
    "gpt2": r"^(?:transformer\.)?h\.(\d+)\.",
    "gpt_neox": r"^gpt_neox\.layers\.(\d+)\.",
    "bert": r"^(?:bert\.)?encoder\.layer\.(\d+)\.",
}

EMBEDDING_PATTERNS = (
    r"^model\.embed_tokens\.",
    r"^(?:transformer\.)?wte\.",
    r"^(?:transformer\.)?wpe\.",
    r"^gpt_neox\.embed_in\.",
    r"^(?:bert\.)?embeddings\.",
)
FINAL_NORM_PATTERNS = (
    r"^model\.norm\.",
    r"^(?:transformer\.)?ln_f\.",
    r"^gpt_neox\.final_layer_norm\.",
    r"^(?:bert\.)?pooler\.",
)
LM_HEAD_PATTERNS = (
    r"^lm_head\.",
    r"^embed_out\.",
    r"^cls\.",
    r"^score\.",
)

NUM_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class TensorPosition:
    """Where a tensor sits: `group` is 'layer', 'embed', 'final_norm' or 'lm_head'."""

    group: str
    layer: int | None = None

    @property
    def is_layer(self) -> bool:
        return self.group == "layer"


@dataclass(frozen=True)
class LayerMap:
    """Maps tensor names of one architecture to positions; built from a model config."""

    pattern: str
    num_layers: int
    source: str  # which model_type or config field supplied the pattern

    @classmethod
    def from_config(cls, config: Mapping, pattern: str | None = None) -> "LayerMap":
        num_layers = next((int(config[f]) for f in NUM_LAYER_FIELDS if f in config), None)
        if num_layers is None:
            raise LayerMappingError(f"model config has none of {list(NUM_LAYER_FIELDS)}; cannot count layers")
        if pattern is not None:
            _validate_pattern(pattern)
            return cls(pattern=pattern, num_layers=num_layers, source="layer_pattern")
        model_type = str(config.get("model_type", ""))
        if model_type in LAYER_PATTERNS:
            return cls(pattern=LAYER_PATTERNS[model_type], num_layers=num_layers, source=model_type)
        raise LayerMappingError(
            f"unknown architecture model_type={model_type!r}: no layer pattern. Tried: "
            + "; ".join(f"{k}: {v}" for k, v in LAYER_PATTERNS.items())
            + ". Supply `layer_pattern` (a regex with one group capturing the layer index)."
        )

    def position(self, tensor_name: str) -> TensorPosition:
        match = re.search(self.pattern, tensor_name)
        if match:
            layer = int(match.group(1))
            if not 0 <= layer < self.num_layers:
                raise LayerMappingError(
                    f"tensor {tensor_name!r}: layer {layer} outside 0..{self.num_layers - 1}"
                )
            return TensorPosition("layer", layer)
        for group, patterns in (
            ("embed", EMBEDDING_PATTERNS),
            ("final_norm", FINAL_NORM_PATTERNS),
            ("lm_head", LM_HEAD_PATTERNS),
        ):
            if any(re.search(p, tensor_name) for p in patterns):
                return TensorPosition(group)
        raise LayerMappingError(
            f"tensor {tensor_name!r} matches neither the layer pattern {self.pattern!r} ({self.source}) "
            f"nor the embedding, final-norm or LM-head patterns"
        )

    def depth_fraction(self, tensor_name: str) -> float:
        """mergekit's `t` for gradient parameters: layer / (L - 1) inside the stack, 0 outside it.

        mergekit plans embeddings, final norm and LM head with t = 0 (its `ConfigReader(t=0)`), so
        we do the same to reproduce its gradients exactly.
        """
        pos = self.position(tensor_name)
        if not pos.is_layer:
            return 0.0
        if self.num_layers <= 1:
            return 1.0
        return pos.layer / (self.num_layers - 1)


def _validate_pattern(pattern: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise LayerMappingError(f"layer_pattern {pattern!r} is not a valid regex ({exc})") from exc
    if compiled.groups < 1:
        raise LayerMappingError(f"layer_pattern {pattern!r} needs one group capturing the layer index")
