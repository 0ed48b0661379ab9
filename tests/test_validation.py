"""Issue 12 (reliability): every recipe value and CLI flag is checked before any tensor is read, with
one line naming the field; `--overwrite` only replaces a folder evomerge wrote, never an input."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.merge import checkpoint, engine
from evomerge.merge.checkpoint import ModelFolder
from evomerge.testing import llama_config, make_family

LAYERS = 2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two experts with two layers (read-only for the tests: copy before harming it)."""
    return make_family(tmp_path_factory.mktemp("fam"), n_experts=2, seed=3, config=llama_config(layers=LAYERS))


@pytest.fixture
def copied_family(tmp_path, family):
    """A private copy of the family, for tests that would destroy it if the code under test were wrong."""
    base, experts = family
    root = tmp_path / "models"
    shutil.copytree(base.parent, root)
    return root / base.name, [root / e.name for e in experts]


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor is read (headers and config.json may be)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the error")

    monkeypatch.setattr(ModelFolder, "get_tensor", refuse)
    monkeypatch.setattr(checkpoint.SafetensorsReader, "read", refuse)


def _write_recipe(path: Path, method: str, base: Path, experts: list[Path], model_params: list[dict],
                  params: dict | None = None, text: str | None = None) -> Path:
    config = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(base)}] + [{"model": str(e), "parameters": p} for e, p in zip(experts, model_params)]}
    if params:
        config["parameters"] = params
    path.write_text(text if text is not None else yaml.safe_dump(config))
    return path


def _merge(*args: str):
    return CliRunner().invoke(main, ["merge", *args, "--quiet"])


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    message = result.output.strip()
    assert "Traceback" not in message and "\n" not in message, message
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- recipe values

BAD_VALUES = {
    "density_below_0": ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": -0.1}], None,
                        "models[2].parameters.density", "[0, 1]"),
    "density_above_1": ("ties", [{"weight": 1.0, "density": 1.5}, {"weight": 1.0, "density": 0.5}], None,
                        "models[1].parameters.density", "1.5"),
    "weight_nan": ("task_arithmetic", [{"weight": float("nan")}, {"weight": 1.0}], None,
                   "models[1].parameters.weight", "finite"),
    "epsilon_above_1": ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 1.5}, {"weight": 1.0}], None,
                        "models[1].parameters.epsilon", "[0, 1]"),
    "gamma_below_0": ("breadcrumbs", [{"weight": 1.0, "gamma": -0.2}, {"weight": 1.0}], None,
                      "models[1].parameters.gamma", "[0, 1]"),
    "global_density": ("ties", [{"weight": 1.0}, {"weight": 1.0}], {"density": 2.0},
                       "parameters.density", "[0, 1]"),
    "lambda_inf": ("task_arithmetic", [{"weight": 1.0}, {"weight": 1.0}], {"lambda": float("inf")},
                   "parameters.lambda", "finite"),
    "normalize_not_bool": ("ties", [{"weight": 1.0}, {"weight": 1.0}], {"normalize": "maybe"},
                           "parameters.normalize", "true or false"),
    # A gradient whose later anchor is out of range: checked per tensor, it failed only at the deep layers.
    "gradient_anchor": ("ties", [{"weight": 1.0, "density": [0.5, 1.5]}, {"weight": 1.0}], None,
                        "models[1].parameters.density[1]", "[0, 1]"),
    "gradient_nested": ("task_arithmetic", [{"weight": [0.5, [1.0]]}, {"weight": 1.0}], None,
                        "models[1].parameters.weight", "value"),
    "gradient_too_long": ("task_arithmetic", [{"weight": [0.1, 0.2, 0.3, 0.4, 0.5]}, {"weight": 1.0}], None,
                          "models[1].parameters.weight", f"{LAYERS} layers"),
    "gradient_empty": ("task_arithmetic", [{"weight": []}, {"weight": 1.0}], None,
                       "models[1].parameters.weight", "empty"),
    "filter_not_text": ("task_arithmetic", [{"weight": [{"filter": 3, "value": 1.0}, {"value": 0.5}]}, {"weight": 1.0}],
                        None, "models[1].parameters.weight[0].filter", "text"),
    "filter_entry_out_of_range": ("ties", [{"weight": 1.0, "density": [{"filter": "mlp", "value": 7}, {"value": 0.5}]},
                                           {"weight": 1.0}], None, "models[1].parameters.density[0].value", "[0, 1]"),
    # No entry matches the attention tensors and weight has no default: found before the first tensor.
    "filter_no_match": ("task_arithmetic", [{"weight": [{"filter": "mlp", "value": 1.0}]}, {"weight": 1.0}], None,
                        "models[1].parameters.weight", "matches"),
    "slerp_t": ("slerp", [{}], {"t": 1.5}, "parameters.t", "[0, 1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_out_of_range_recipe_values_fail_first_naming_the_field(tmp_path, family, no_tensor_reads, case):
    method, model_params, params, field, detail = BAD_VALUES[case]
    base, experts = family
    recipe = _write_recipe(tmp_path / "r.yaml", method, base, experts[: len(model_params)], model_params, params)
    result = _merge(str(recipe), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, f"`{field}", detail, str(recipe))
    assert not (tmp_path / "out").exists()


def test_yaml_nan_weight_is_refused(tmp_path, family, no_tensor_reads):
    base, experts = family
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {base}\n"
            f"  - model: {experts[0]}\n    parameters: {{weight: .nan}}\n")
    recipe = _write_recipe(tmp_path / "r.yaml", "", base, [], [], text=text)
    _assert_one_line_error(_merge(str(recipe), "--out", str(tmp_path / "out")), "models[1].parameters.weight", "finite")


def test_gradient_of_one_anchor_per_layer_is_accepted(tmp_path, family):
    base, experts = family
    recipe = _write_recipe(tmp_path / "r.yaml", "ties", base, experts,
                           [{"weight": [0.2, 1.0], "density": [0.3, 0.9]}, {"weight": 0.5, "density": 1.0}])
    result = _merge(str(recipe), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- CLI flags

@pytest.fixture
def good_recipe(tmp_path, family):
    base, experts = family
    return _write_recipe(tmp_path / "r.yaml", "ties", base, experts, [{"weight": 1.0, "density": 0.5}] * 2)


@pytest.mark.parametrize("flags,fragments", [
    (["--shard-size", "5XB"], ["--shard-size", "5XB", "5GB"]),
    (["--shard-size", "0"], ["--shard-size", "at least 1 byte"]),
    (["--device", "gpu"], ["--device", "'gpu'", "cpu, cuda, cuda:N"]),
])
def test_bad_flags_fail_first_naming_the_flag(tmp_path, good_recipe, no_tensor_reads, flags, fragments):
    result = _merge(str(good_recipe), "--out", str(tmp_path / "out"), *flags)
    _assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_fails_first(tmp_path, good_recipe, no_tensor_reads, device):
    result = _merge(str(good_recipe), "--out", str(tmp_path / "out"), "--device", device)
    _assert_one_line_error(result, "--device", f"'{device}'", "CUDA")


def test_resolve_device_forms():
    from evomerge._device import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^workers\.device: unknown device 'gpu'"):
        resolve_device("gpu", field="workers.device")


def test_run_config_checks_workers_device(tmp_path):
    from evomerge.runs.config import ConfigError, load_run_config

    config = {"name": "r", "models": {"base": "b", "experts": ["e"]}, "search_space": "ties_per_layer",
              "fitness": {"name": "f"}, "optimizer": {"name": "random"}, "budget": {"evaluations": 1},
              "workers": {"backend": "inprocess", "device": "gpu"}}
    with pytest.raises(ConfigError, match=r"field `workers\.device`: unknown device 'gpu'; use cpu, cuda"):
        load_run_config(config)
    if not torch.cuda.is_available():
        config["workers"]["device"] = "cuda"
        with pytest.raises(ConfigError, match=r"field `workers\.device`: .*CUDA"):
            load_run_config(config)
        # a remote Ray cluster may have the GPU this machine lacks
        config["workers"] = {"backend": "ray", "address": "10.0.0.1:6379", "device": "cuda"}
        assert load_run_config(config).workers.device == "cuda"


# ----------------------------------------------------------------------------- output location

def test_unwritable_output_location_names_out_before_reading(tmp_path, good_recipe, no_tensor_reads):
    if os.geteuid() == 0:  # root writes through chmod 0o555: make the parent a regular file instead
        blocker = tmp_path / "not_a_folder"
        blocker.write_text("x")
        out = blocker / "merged"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "merged"
    result = _merge(str(good_recipe), "--out", str(out))
    message = _assert_one_line_error(result, "--out", str(out))
    assert ".partial" not in message


def test_disk_full_while_writing_names_out_not_a_temp_path(tmp_path, good_recipe, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "out"
    message = _assert_one_line_error(_merge(str(good_recipe), "--out", str(out)), "--out", str(out), "No space left")
    assert ".partial" not in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_too_little_free_space_fails_before_reading(tmp_path, good_recipe, no_tensor_reads, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    _assert_one_line_error(_merge(str(good_recipe), "--out", str(tmp_path / "out")), "--out", "free")


# ----------------------------------------------------------------------------- --overwrite

def test_overwrite_refuses_a_foreign_folder(tmp_path, good_recipe, no_tensor_reads):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _merge(str(good_recipe), "--out", str(out), "--overwrite")
    _assert_one_line_error(result, "--out", "notes.txt", "not written by evomerge")
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]


def test_overwrite_refuses_an_evomerge_folder_holding_other_files(tmp_path, good_recipe):
    out = tmp_path / "out"
    assert _merge(str(good_recipe), "--out", str(out)).exit_code == 0
    (out / "README.md").write_text("my notes")
    _assert_one_line_error(_merge(str(good_recipe), "--out", str(out), "--overwrite"), "README.md")
    assert (out / "README.md").read_text() == "my notes"


def test_existing_out_without_overwrite_is_refused(tmp_path, good_recipe, no_tensor_reads):
    out = tmp_path / "out"
    out.mkdir()
    _assert_one_line_error(_merge(str(good_recipe), "--out", str(out)), "--out", "already exists", "--overwrite")


@pytest.mark.parametrize("where", ["base", "expert", "inside_base", "contains_base"])
def test_overwrite_refuses_an_input(tmp_path, copied_family, no_tensor_reads, where):
    base, experts = copied_family
    recipe = _write_recipe(tmp_path / "r.yaml", "ties", base, experts, [{"weight": 1.0, "density": 0.5}] * 2)
    out = {"base": base, "expert": experts[1], "inside_base": base / "merged", "contains_base": base.parent}[where]
    before = _snapshot(base.parent)
    result = _merge(str(recipe), "--out", str(out), "--overwrite")
    _assert_one_line_error(result, "--out", "input")
    assert _snapshot(base.parent) == before


def test_out_equal_to_an_input_through_a_symlink_is_refused(tmp_path, copied_family, no_tensor_reads):
    base, experts = copied_family
    recipe = _write_recipe(tmp_path / "r.yaml", "ties", base, experts, [{"weight": 1.0, "density": 0.5}] * 2)
    link = tmp_path / "link"
    link.symlink_to(base)
    _assert_one_line_error(_merge(str(recipe), "--out", str(link), "--overwrite"), "--out", "base model")
    assert (base / "model.safetensors").is_file()


def test_overwrite_replaces_a_folder_evomerge_wrote(tmp_path, family, good_recipe):
    from evomerge.merge.outputs import MODEL_MARKER

    out = tmp_path / "out"
    assert _merge(str(good_recipe), "--out", str(out)).exit_code == 0
    marker = json.loads((out / MODEL_MARKER).read_text())
    assert marker["written_by"] == "evomerge"
    first = (out / "model.safetensors").read_bytes()
    base, experts = family
    other = _write_recipe(tmp_path / "other.yaml", "ties", base, experts, [{"weight": 0.3, "density": 0.9}] * 2)
    result = _merge(str(other), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() != first
    assert "0.3" in (out / "recipe.yaml").read_text()


def test_overwrite_replaces_a_folder_written_before_the_marker(tmp_path, family, good_recipe):
    """An export from before this change holds recipe.yaml, config.json, weights and tokenizer files only."""
    from evomerge.merge.outputs import MODEL_MARKER

    out = tmp_path / "out"
    assert _merge(str(good_recipe), "--out", str(out)).exit_code == 0
    (out / MODEL_MARKER).unlink()
    result = _merge(str(good_recipe), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / MODEL_MARKER).is_file()


def test_a_plain_model_folder_is_not_replaceable(tmp_path, copied_family, good_recipe):
    """A Hugging Face folder evomerge did not write (no recipe.yaml, no marker), not an input of the merge."""
    base, experts = copied_family
    before = _snapshot(base)
    _assert_one_line_error(_merge(str(good_recipe), "--out", str(base), "--overwrite"), "not written by evomerge")
    assert _snapshot(base) == before


# ----------------------------------------------------------------------------- export

@pytest.fixture
def run_dir(tmp_path, copied_family):
    """A minimal run folder: config.yaml, one finished candidate and a Pareto set (no fitness needed)."""
    base, experts = copied_family
    root = tmp_path / "run"
    root.mkdir()
    config = {"name": "run", "models": {"base": str(base), "experts": [str(e) for e in experts]},
              "search_space": "ties_per_layer", "fitness": {"name": "none"}, "optimizer": {"name": "random"},
              "budget": {"evaluations": 1}, "workers": {"backend": "inprocess"}}
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(base)}] + [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}}
                                                  for e in experts]}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "run.json").write_text(json.dumps({"fitness": "none"}))
    record = {"id": 0, "generation": 0, "status": "ok", "item_evaluations": 1, "genome": [0.5],
              "objectives": {"a": 0.5, "b": 0.5}, "recipe": recipe}
    (root / "evaluations.jsonl").write_text(json.dumps(record) + "\n")
    (root / "pareto.json").write_text(json.dumps({"tasks": ["a", "b"], "members": [
        {"id": 0, "generation": 0, "mean": 0.5, "objectives": {"a": 0.5, "b": 0.5}}]}))
    return root


@pytest.fixture
def scoring_calls(monkeypatch):
    from evomerge.runs.run import Run

    calls = []

    def choose(self, finalists=5, **kwargs):
        calls.append(finalists)
        return 0

    monkeypatch.setattr(Run, "choose", choose)
    monkeypatch.setattr(Run, "verify", lambda self, *a, **k: calls.append("verify"))
    return calls


def _export(run_dir: Path, *args: str):
    return CliRunner().invoke(main, ["export", str(run_dir), "--finalists", "2", *args])


def test_export_finalists_refuses_an_existing_out_before_scoring(tmp_path, run_dir, scoring_calls):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _assert_one_line_error(_export(run_dir, "--out", str(out)), "--out", "already exists")
    _assert_one_line_error(_export(run_dir, "--out", str(out), "--overwrite"), "--out", "notes.txt")
    assert scoring_calls == [] and (out / "notes.txt").read_text() == "mine"


def test_export_finalists_refuses_an_input_or_bad_shard_size_before_scoring(run_dir, copied_family, scoring_calls):
    base, _ = copied_family
    _assert_one_line_error(_export(run_dir, "--out", str(base), "--overwrite"), "--out", "input")
    _assert_one_line_error(_export(run_dir, "--out", str(run_dir / "x"), "--shard-size", "5XB"), "--shard-size")
    assert scoring_calls == []


def test_export_writes_a_replaceable_folder(tmp_path, run_dir, scoring_calls):
    from evomerge.merge.outputs import MODEL_MARKER

    out = tmp_path / "out"
    for extra in ([], ["--overwrite"]):
        result = _export(run_dir, "--out", str(out), *extra)
        assert result.exit_code == 0, result.output
    assert scoring_calls == [2, 2] and (out / MODEL_MARKER).is_file()


# ----------------------------------------------------------------------------- the Python API

def test_api_errors_name_the_arguments(tmp_path, good_recipe, no_tensor_reads):
    """The API names its own arguments (the CLI renames them to its flags)."""
    import pickle

    from evomerge._device import DeviceError
    from evomerge.merge.engine import merge_recipe
    from evomerge.merge.outputs import OutputError

    with pytest.raises(DeviceError, match=r"^device: unknown device 'gpu'"):
        merge_recipe(good_recipe, tmp_path / "out", device="gpu", progress=False)
    with pytest.raises(ValueError, match=r"^max_shard_bytes: cannot read '5XB'"):
        merge_recipe(good_recipe, tmp_path / "out", max_shard_bytes="5XB", progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match=r"^out_dir: .*already exists") as info:
        merge_recipe(good_recipe, tmp_path / "out", progress=False)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is OutputError and str(again) == str(info.value)
    assert str(info.value.renamed({"out_dir": "--out"})).startswith("--out: ")


def test_every_parameter_has_a_rule():
    from evomerge.merge.methods import METHODS

    for row in METHODS.values():
        for name, parameter in {**row.per_model, **row.settings}.items():
            assert parameter.kind in ("number", "bool"), (row.name, name)
            assert parameter.low <= parameter.high, (row.name, name)
