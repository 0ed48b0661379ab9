"""Layer mapping over real transformers architectures, and parameter resolution against mergekit."""
from __future__ import annotations

import math

import pytest
import transformers

from evomerge.merge.layers import LayerMap, LayerMappingError
from evomerge.merge.params import ParameterError, resolve_setting, to_float

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=32)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=32, vocab_size=32)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=32, vocab_size=32)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(n_embd=16, n_layer=3, n_head=2, vocab_size=32)),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                 dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=32)),
    "bert": (transformers.BertConfig, transformers.BertForMaskedLM,
             dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=32)),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_tensor_of_real_architectures_is_placed(arch):
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    config = config_cls(**kwargs)
    names = list(model_cls(config).state_dict())
    layer_map = LayerMap.from_config(config.to_dict())
    positions = {name: layer_map.position(name) for name in names}
    layers = {p.layer for p in positions.values() if p.is_layer}
    assert layers == {0, 1, 2}
    groups = {p.group for p in positions.values()}
    assert "embed" in groups and "layer" in groups
    # Every name containing ".1." inside the block stack is layer 1, and nothing else is.
    for name, pos in positions.items():
        if pos.is_layer:
            assert f".{pos.layer}." in name
    assert any(p.group in {"lm_head", "final_norm"} for p in positions.values())


def test_special_groups_for_llama():
    layer_map = LayerMap.from_config({"model_type": "llama", "num_hidden_layers": 4})
    assert layer_map.position("model.embed_tokens.weight").group == "embed"
    assert layer_map.position("model.norm.weight").group == "final_norm"
    assert layer_map.position("lm_head.weight").group == "lm_head"
    assert layer_map.position("model.layers.3.self_attn.q_proj.weight").layer == 3
    assert layer_map.depth_fraction("model.layers.3.mlp.up_proj.weight") == 1.0
    assert layer_map.depth_fraction("model.layers.1.mlp.up_proj.weight") == pytest.approx(1 / 3)
    assert layer_map.depth_fraction("lm_head.weight") == 0.0  # mergekit plans post-weights with t = 0


def test_unknown_architecture_lists_patterns_and_accepts_a_custom_one():
    config = {"model_type": "mystery", "num_hidden_layers": 2}
    with pytest.raises(LayerMappingError, match=r"model_type='mystery'.*llama: .*gpt2: .*layer_pattern"):
        LayerMap.from_config(config)
    layer_map = LayerMap.from_config(config, pattern=r"^blocks\.(\d+)\.")
    assert layer_map.position("blocks.1.attn.weight").layer == 1
    with pytest.raises(LayerMappingError, match="needs one group"):
        LayerMap.from_config(config, pattern=r"^blocks\.\d+\.")
    with pytest.raises(LayerMappingError, match="matches neither"):
        layer_map.position("weird.tensor")
    with pytest.raises(LayerMappingError, match="outside 0..1"):
        layer_map.position("blocks.7.attn.weight")


SETTINGS = [
    0.5,
    [0.0, 1.0],
    [0.1, 0.9, 0.3],
    [0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 0.5],
    [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.7}],
    [{"filter": "mlp", "value": [1, 2, 3]}],
    {"filter": "*", "value": [0.25, 0.75]},
]
NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]


@pytest.mark.parametrize("setting", SETTINGS, ids=range(len(SETTINGS)))
def test_resolution_matches_mergekit_evaluate_setting(setting):
    from mergekit.config import ConditionalParameter, evaluate_setting

    def to_mergekit(value):
        if isinstance(value, dict):
            return ConditionalParameter(**value)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [ConditionalParameter(**v) for v in value]
        return value

    for name in NAMES:
        for layer in range(7):
            t = layer / 6
            ours = resolve_setting(setting, name, t, cast=to_float)
            theirs = evaluate_setting(name, to_mergekit(setting), t, validate=float)
            if theirs is None:
                assert ours is None
            else:
                assert ours == theirs, (setting, name, t)  # bit-for-bit, same arithmetic


def test_gradient_by_hand_and_errors():
    # 3 anchors over t in [0, 1]: t = 0.25 sits halfway between anchors 0 and 1.
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert math.isclose(resolve_setting([0.0, 1.0, 0.0], "x", 0.75), 0.5)
    assert resolve_setting([{"filter": "attn", "value": 1.0}], "mlp.weight", 0.0) is None
    with pytest.raises(ParameterError, match=r"weight\[0\]: unsupported key\(s\) \['vlaue'\]"):
        resolve_setting([{"filter": "a", "value": 1, "vlaue": 2}], "x", 0, field="weight")
    with pytest.raises(ParameterError, match="expected a number"):
        resolve_setting(True, "x", 0, cast=to_float)
