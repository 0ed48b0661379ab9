"""Reliability of opening models for a merge (issue 12): non-finite weights, old pickles, tokenizers.

* A NaN or inf in any model is refused when the merge engine, the materializer or a calibration
  reads it, naming the file and the tensor; `allow_nonfinite=True` merges it anyway, and then the
  fused and pure paths agree and the non-finite entry stays local (whole-tensor statistics are taken
  over the finite entries: every other entry is what it would be if that delta were zero).
* Old-format (non-zip) `pytorch_model.bin` files load with allow_pickle (never memory-mapped).
* Tokenizers that map tokens differently are refused; differing added tokens only warn.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge.checkpoint import CheckpointError, ModelFolder
from evomerge.merge.engine import FUSED_METHODS, merge_recipe
from evomerge.merge.kernels import merge_tensor
from evomerge.merge.materializer import Materializer
from evomerge.merge.tokenizers import TokenizerMismatchWarning, check_tokenizers
from evomerge.testing import make_family

NAME = "model.embed_tokens.weight"  # (64, 32): 2048 entries
POSITION = 77  # flat index of the poisoned entry


@pytest.fixture(scope="module")
def family_source(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n_experts=2, seed=3, delta_scale=0.2)


@pytest.fixture
def family(family_source, tmp_path):
    """A private copy of the family (tests poison and rewrite its files)."""
    base, experts = family_source
    root = tmp_path / "models"
    shutil.copytree(base.parent, root)
    return root / base.name, [root / e.name for e in experts]


def poison(folder: Path, value: float, name: str = NAME, index: int = POSITION) -> Path:
    file = folder / "model.safetensors"
    state = load_file(file)
    state[name].view(-1)[index] = value
    save_file(state, file, metadata={"format": "pt"})
    return file


def recipe(method: str, base: Path, experts: list[Path], params: dict | None = None) -> dict:
    weights, densities = (0.8, 0.0), (0.6, 0.4)  # weight 0: IEEE still carries its NaN into the sum
    models = [{"model": str(base)}]
    for expert, weight, density in zip(experts, weights, densities):
        p = {"weight": weight}
        if method not in ("task_arithmetic", "linear", "slerp"):
            p["density"] = density
        if method.startswith("breadcrumbs"):
            p["gamma"] = 0.05
        models.append({"model": str(expert), "parameters": p})
    config = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32", "seed": 4}
    if method == "slerp":
        config["models"] = models[:2]
        del models[1]["parameters"]
        config["parameters"] = {"t": 0.3}
    if params:
        config["parameters"] = {**config.get("parameters", {}), **params}
    return config


def merged(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


# ----------------------------------------------------------------------------- refused by default

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pure"])
def test_merge_refuses_a_nonfinite_expert_naming_file_and_tensor(family, tmp_path, value, fused):
    base, experts = family
    file = poison(experts[1], value)
    with pytest.raises(CheckpointError) as error:
        merge_recipe(recipe("ties", base, experts), tmp_path / "out", progress=False,
                     fused_min_elements=1 if fused else None)
    message = str(error.value)
    assert str(file) in message and repr(NAME) in message and "allow_nonfinite" in message
    assert "1 non-finite" in message
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_nonfinite_base(family, tmp_path):
    base, experts = family
    file = poison(base, math.inf, name="model.norm.weight", index=3)
    with pytest.raises(CheckpointError, match="model.norm.weight") as error:
        merge_recipe(recipe("dare_ties", base, experts), tmp_path / "out", progress=False)
    assert str(file) in str(error.value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_materializer_refuses_a_nonfinite_expert_naming_file_and_tensor(family, value):
    base, experts = family
    file = poison(experts[0], value)
    with pytest.raises(CheckpointError) as error:
        Materializer.from_folders(base, experts, device="cpu", compile=False)
    assert str(file) in str(error.value) and repr(NAME) in str(error.value)


def test_calibration_with_a_nan_expert_names_the_model_not_the_items(family, tmp_path):
    from evomerge.fitness.calibrate import calibrate
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.testing import choice_task_preset, make_choice_task

    base, experts = family
    file = poison(experts[1], math.nan)
    task = TaskSpec.from_dict(choice_task_preset(make_choice_task(tmp_path / "sums", n_validation=12, n_test=12)))
    with pytest.raises(CheckpointError) as error:
        calibrate([task], str(base), [str(e) for e in experts], tmp_path / "fitness", name="nan", random_merges=2,
                  n=4, echo=lambda *_: None)
    assert str(file) in str(error.value) and repr(NAME) in str(error.value)


# ----------------------------------------------------------------------------- allow_nonfinite

def assert_same(a: torch.Tensor, b: torch.Tensor, exact: bool, name: str) -> None:
    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN positions differ"
    if exact:
        assert torch.equal(a.nan_to_num(nan=0.0), b.nan_to_num(nan=0.0)), f"{name}: values differ"
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("method,params", [(m, None) for m in sorted(FUSED_METHODS)]
                         + [("ties", {"rescale": True}), ("dare_ties", {"rescale": False})])
def test_allow_nonfinite_fused_and_pure_agree(family, tmp_path, method, params, value):
    base, experts = family
    poison(experts[0], value)
    poison(experts[1], math.nan, index=POSITION + 1)  # weight 0: its NaN still lands in the output
    config = recipe(method, base, experts, params)
    for out, fused in (("fused", 1), ("pure", None)):
        merge_recipe(config, tmp_path / out, progress=False, allow_nonfinite=True, fused_min_elements=fused, workers=2)
    fused, pure = merged(tmp_path / "fused"), merged(tmp_path / "pure")
    rescaled = (params or {}).get("rescale", method.startswith("dare"))
    for name in pure:
        assert_same(fused[name], pure[name], exact=not rescaled, name=name)
    bad = (~torch.isfinite(pure[NAME])).view(-1).nonzero().view(-1).tolist()
    assert bad == [POSITION, POSITION + 1]  # the non-finite entries stay where they were
    assert all(torch.isfinite(t).all() for n, t in pure.items() if n != NAME)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "slerp", "task_arithmetic"])
def test_allow_nonfinite_keeps_a_nonfinite_entry_local(family, tmp_path, method):
    """Whole-tensor statistics (L1 rescale, slerp's angle) skip the entry: the rest is the merge of
    the model with that delta zeroed (DELLA ranks it, so there only locality is checked)."""
    base, experts = family
    clean = tmp_path / "clean"
    merge_recipe(recipe(method, base, experts), clean, progress=False)
    base_value = float(load_file(base / "model.safetensors")[NAME].view(-1)[POSITION])
    poison(experts[0], base_value)  # zero delta at the position
    if method == "slerp":
        poison(base, 0.0)
        poison(experts[0], 0.0)
    merge_recipe(recipe(method, base, experts), tmp_path / "zeroed", progress=False)
    poison(experts[0], math.nan)
    merge_recipe(recipe(method, base, experts), tmp_path / "nan", progress=False, allow_nonfinite=True)
    out, zeroed = merged(tmp_path / "nan")[NAME].view(-1), merged(tmp_path / "zeroed")[NAME].view(-1)
    assert out[POSITION].isnan() and int(out.isnan().sum()) == 1
    others = torch.arange(out.numel()) != POSITION
    if method != "della":
        assert torch.equal(out[others], zeroed[others])
    if method == "task_arithmetic":  # no statistic at all: every other entry is the clean merge's
        assert torch.equal(out[others], merged(clean)[NAME].view(-1)[others])


@pytest.mark.parametrize("method,kwargs", [
    ("task_arithmetic", {}),
    ("ties", {"density": [0.5, 0.3]}),
    ("dare_ties", {"density": [0.6, 0.4]}),  # L1 rescale on by default
    ("breadcrumbs", {"density": [0.6, 0.4], "gamma": [0.05, 0.05]}),
])
def test_materializer_allow_nonfinite_matches_the_pure_kernels(family, method, kwargs):
    base, experts = family
    poison(experts[0], math.nan)
    poison(experts[1], math.inf, index=POSITION + 5)
    m = Materializer.from_folders(base, experts, device="cpu", compile=False, allow_nonfinite=True,
                                  order_stats_grid=None)
    weight = [0.7, 0.0]
    model = m.apply(method, weight=weight, **kwargs)
    params = dict(model.named_parameters())
    folders = [ModelFolder.open(p, allow_nonfinite=True) for p in (base, *experts)]
    for name in (NAME, "model.layers.0.mlp.up_proj.weight"):
        stacked = torch.stack([f.get_tensor(name) for f in folders[1:]])
        expected = merge_tensor(method, folders[0].get_tensor(name), stacked, weight=weight, seed=0,
                                tensor_name=name, **kwargs)
        assert_same(params[name].detach(), expected, exact=method != "dare_ties", name=name)
    out = params[NAME].detach().view(-1)
    assert (~torch.isfinite(out)).nonzero().view(-1).tolist() == [POSITION, POSITION + 5]


# ----------------------------------------------------------------------------- old pickles

def to_legacy_pickle(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (folder / "model.safetensors").unlink()
    return state


def test_old_format_pickle_loads_with_allow_pickle(family, tmp_path):
    base, experts = family
    reference = merge_recipe(recipe("ties", base, experts), tmp_path / "reference", progress=False).out_dir
    state = to_legacy_pickle(experts[1])
    with pytest.raises(CheckpointError, match="allow_pickle"):
        ModelFolder.open(experts[1])
    with ModelFolder.open(experts[1], allow_pickle=True) as folder:
        assert folder.is_pickle and folder.tensor_names() == list(state)
        for name, tensor in state.items():
            assert torch.equal(folder.get_tensor(name), tensor)
    out = merge_recipe(recipe("ties", base, experts), tmp_path / "out", progress=False, allow_pickle=True).out_dir
    expected = merged(reference)
    assert all(torch.equal(t, expected[n]) for n, t in merged(out).items())


def test_old_format_pickle_is_still_checked_for_nonfinite_weights(family):
    base, experts = family
    state = to_legacy_pickle(experts[0])
    state[NAME].view(-1)[POSITION] = math.nan
    torch.save(state, experts[0] / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with ModelFolder.open(experts[0], allow_pickle=True) as folder, pytest.raises(CheckpointError, match=NAME):
        folder.get_tensor(NAME)


# ----------------------------------------------------------------------------- tokenizers

def edit_tokenizer(folder: Path, edit) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def swap_digits(data: dict) -> None:
    vocab = data["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]


def test_a_permuted_vocabulary_is_refused_by_merge_and_materializer(family, tmp_path):
    base, experts = family
    edit_tokenizer(experts[1], swap_digits)  # same size, two tokens exchanged
    for run in (lambda: merge_recipe(recipe("ties", base, experts), tmp_path / "out", progress=False),
                lambda: Materializer.from_folders(base, experts, device="cpu", compile=False)):
        with pytest.raises(CheckpointError) as error:
            run()
        message = str(error.value)
        assert str(base) in message and str(experts[1]) in message
        assert "token '1' is id 5" in message and "id 6" in message
    assert not (tmp_path / "out").exists()


def test_only_added_tokens_differing_is_a_warning(family, tmp_path):
    base, experts = family

    def add_token(data: dict) -> None:
        data["added_tokens"].append({"id": 18, "content": "<tool>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})

    edit_tokenizer(experts[0], add_token)
    with pytest.warns(TokenizerMismatchWarning, match="<tool>") as record:
        merge_recipe(recipe("task_arithmetic", base, experts), tmp_path / "out", progress=False)
    assert str(base) in str(record[0].message) and str(experts[0]) in str(record[0].message)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_added_token_with_another_id_is_refused(family):
    base, experts = family
    edit_tokenizer(experts[0], lambda data: data["added_tokens"][1].update(id=5))  # <bos> at the id of '1'
    with pytest.raises(CheckpointError, match="'<bos>' is id 1"):
        check_tokenizers(base, experts)


def test_models_without_tokenizer_files_are_not_compared(family):
    base, experts = family
    (experts[0] / "tokenizer.json").unlink()
    (experts[0] / "tokenizer_config.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizers(base, experts)


def test_cli_merge_reports_nonfinite_weights_in_one_line_and_allows_them_on_request(family, tmp_path):
    import yaml
    from click.testing import CliRunner

    from evomerge.cli import main

    base, experts = family
    file = poison(experts[0], math.inf)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe("dare_ties", base, experts)))
    refused = CliRunner().invoke(main, ["merge", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"error: {file}: tensor {NAME!r} holds 1 non-finite values" in refused.output
    allowed = CliRunner().invoke(main, ["merge", str(config), "--out", str(tmp_path / "out"), "--quiet",
                                        "--allow-nonfinite"])
    assert allowed.exit_code == 0, allowed.output
    out = merged(tmp_path / "out")[NAME].view(-1)
    assert (~torch.isfinite(out)).nonzero().view(-1).tolist() == [POSITION]
