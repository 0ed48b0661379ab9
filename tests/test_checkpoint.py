"""Checkpoint I/O: memory-mapped reading, sharding, dtypes, pickle refusal, compatibility, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge.checkpoint import (
    CheckpointError,
    ModelFolder,
    check_compatible,
    parse_size,
    write_model,
)
from evomerge.testing import llama_config, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n_experts=2, seed=1)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_read_matches_transformers_state_dict(tmp_path, dtype):
    base, _ = make_family(tmp_path, n_experts=0, seed=2, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).state_dict()
    folder = ModelFolder.open(base)
    assert set(folder.tensor_names()) == set(reference)
    for name in folder.tensor_names():
        tensor = folder.get_tensor(name)
        assert tensor.dtype == dtype, name
        assert folder.dtype(name) == dtype
        assert folder.shape(name) == tuple(reference[name].shape)
        assert torch.equal(tensor, reference[name]), name


def test_sharded_read_and_write_round_trip(tmp_path):
    base, _ = make_family(tmp_path / "src", n_experts=0, seed=3, max_shard_size="20KB")
    folder = ModelFolder.open(base)
    assert (base / "model.safetensors.index.json").is_file()
    assert len(set(folder.weight_map.values())) > 1

    out = write_model(tmp_path / "out", ((n, folder.get_tensor(n)) for n in folder.tensor_names()),
                      base=folder, max_shard_bytes="25KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(f"-of-{len(shards):05d}" in s for s in shards)
    assert all((out / s).stat().st_size <= 25_000 + 10_000 for s in shards)  # header slack
    again = ModelFolder.open(out)
    for name in folder.tensor_names():
        assert torch.equal(again.get_tensor(name), folder.get_tensor(name))


def test_written_model_reloads_with_same_logits(tmp_path, family):
    base, experts = family
    folder = ModelFolder.open(experts[0])
    # A modified state dict, as a merge would produce: scale every tensor.
    merged = {name: folder.get_tensor(name) * 0.5 for name in folder.tensor_names()}
    out = write_model(tmp_path / "merged", merged.items(), base=ModelFolder.open(base))

    in_memory = AutoModelForCausalLM.from_config(llama_config())
    in_memory.load_state_dict(merged)
    in_memory.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(10).reshape(1, 10)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(in_memory, ids), rtol=0, atol=0)


def test_tied_embeddings_are_aliased_and_not_written_twice(tmp_path):
    base, experts = make_family(tmp_path, n_experts=1, seed=4, config=llama_config(tie_word_embeddings=True))
    folder = ModelFolder.open(base)
    assert "lm_head.weight" not in folder.tensor_names()
    assert folder.has_tensor("lm_head.weight")
    assert torch.equal(folder.get_tensor("lm_head.weight"), folder.get_tensor("model.embed_tokens.weight"))
    check_compatible(folder, [ModelFolder.open(experts[0])])
    out = write_model(tmp_path / "out", ((n, folder.get_tensor(n)) for n in folder.tensor_names()), base=folder)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_pickle_refused_unless_opted_in(tmp_path, family):
    base, _ = family
    src = ModelFolder.open(base)
    state = {n: src.get_tensor(n).clone() for n in src.tensor_names()}
    target = tmp_path / "pickled"
    target.mkdir()
    (target / "config.json").write_text((base / "config.json").read_text())
    torch.save(state, target / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match=r"pickled: only pickle weights .*allow_pickle=True"):
        ModelFolder.open(target)
    folder = ModelFolder.open(target, allow_pickle=True)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(folder.get_tensor(name), state[name])
    assert folder.shape(name) == tuple(state[name].shape)


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path, family):
    base, _ = family
    target = tmp_path / "evil"
    target.mkdir()
    (target / "config.json").write_text((base / "config.json").read_text())

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, target / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        ModelFolder.open(target, allow_pickle=True)


def test_shape_mismatch_names_folder_tensor_and_shapes(tmp_path, family):
    base, _ = family
    _, wider = make_family(tmp_path / "wider", n_experts=1, seed=5, config=llama_config(intermediate=48))
    with pytest.raises(CheckpointError) as info:
        check_compatible(ModelFolder.open(base), [ModelFolder.open(wider[0])])
    assert str(info.value) == (f"{wider[0] / 'config.json'}: intermediate_size is 48 but the base model's "
                               f"({base / 'config.json'}) is 64: a different depth or width cannot be merged")
    # a config without the field: the first tensor of another shape, in file order, is named instead
    config = json.loads((wider[0] / "config.json").read_text())
    del config["intermediate_size"]
    (wider[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        check_compatible(ModelFolder.open(base), [ModelFolder.open(wider[0])])
    message = str(info.value)
    assert str(wider[0]) in message
    assert "model.layers.0.mlp.down_proj.weight" in message  # first mismatching tensor in file order
    assert "[32, 48]" in message and "[32, 64]" in message


def test_missing_tensor_and_architecture_mismatch(tmp_path, family):
    base, _ = family
    _, deeper = make_family(tmp_path / "deeper", n_experts=1, seed=6, config=llama_config(layers=3))
    with pytest.raises(CheckpointError, match=r"config\.json: num_hidden_layers is 3 but the base model's .* is 2"):
        check_compatible(ModelFolder.open(base), [ModelFolder.open(deeper[0])])
    config = json.loads((deeper[0] / "config.json").read_text())
    del config["num_hidden_layers"]
    (deeper[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..* is not in the base model"):
        check_compatible(ModelFolder.open(base), [ModelFolder.open(deeper[0])])
    other = ModelFolder.open(deeper[0])
    other.config = {**other.config, "architectures": ["MistralForCausalLM"]}
    with pytest.raises(CheckpointError, match="architecture 'MistralForCausalLM' differs"):
        check_compatible(ModelFolder.open(base), [other])


def test_failed_write_leaves_no_output_folder(tmp_path, family):
    base, _ = family
    folder = ModelFolder.open(base)

    def exploding():
        for i, name in enumerate(folder.tensor_names()):
            if i == 3:
                raise RuntimeError("disk full")
            yield name, folder.get_tensor(name)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        write_model(out, exploding(), base=folder, max_shard_bytes=1000)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_existing_output_is_kept_unless_overwrite(tmp_path, family):
    base, _ = family
    folder = ModelFolder.open(base)
    out = tmp_path / "out"
    write_model(out, ((n, folder.get_tensor(n)) for n in folder.tensor_names()), base=folder)
    with pytest.raises(FileExistsError):
        write_model(out, iter(()), base=folder)
    write_model(out, ((n, folder.get_tensor(n) * 0) for n in folder.tensor_names()), base=folder, overwrite=True)
    assert ModelFolder.open(out).get_tensor("model.norm.weight").abs().sum() == 0


def test_missing_or_broken_folders(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        ModelFolder.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelFolder.open(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        ModelFolder.open(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"\x10garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        ModelFolder.open(tmp_path / "empty")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500kb") == 500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")
