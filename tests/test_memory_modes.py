"""Memory modes of the materializer and the memory plan (issue 17, item 1).

References: the materializer as it was before the modes (`legacy_materializer`, a frozen copy that
held float32 base and task vectors resident), bit for bit; hand-computed byte counts; the store's own
allocations.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import legacy_materializer as legacy
from evomerge.merge import memory_plan
from evomerge.merge.materializer import Materializer, MaterializerOutOfMemory
from evomerge.merge.memory_plan import MemoryPlan, ModelShapes, choose_mode, mode_needs
from evomerge.merge.methods import METHODS
from evomerge.testing import llama_config, make_family, write_run_config

GRID = 512  # below the 2048-entry MLP tensors: the grid order statistics run too
MODES = ("resident", "host", "disk")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        out[dtype] = make_family(root / name, n_experts=3, seed=21, delta_scale=0.3, dtype=dtype,
                                 config=llama_config(layers=2, tie_word_embeddings=dtype == torch.bfloat16))
    out["slerp"] = make_family(root / "pair", n_experts=1, seed=4, delta_scale=0.3, dtype=torch.bfloat16,
                               config=llama_config(layers=2))
    return root, out


def bits(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous().view(torch.int16 if v.element_size() == 2 else torch.int32) for k, v in state.items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert a.keys() == b.keys()
    a, b = bits(a), bits(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{where}: tensor {name} differs"


def candidates(method: str, k: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(2):  # the second reuses the caches the first built (order stats, draws, windows)
        if method == "slerp":
            out.append({"t": float(rng.uniform(0.2, 0.8)), "weight": [1.0]})
            continue
        kw = {"weight": rng.uniform(0.1, 1.0, (k, 2))}
        if method not in ("linear", "task_arithmetic"):
            kw["density"] = rng.uniform(0.2, 0.9, (k, 2))
        out.append(kw)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_mode_writes_the_pre_mode_materializers_bits(families, dtype):
    root, fams = families
    base, experts = fams[dtype]
    common = dict(device="cpu", seed=7, order_stats_grid=GRID, compile=False, cache_random_draws=True)
    reference = legacy.Materializer.from_folders(base, experts, **common)
    mats = {m: Materializer.from_folders(base, experts, memory=m, cache_dir=root / "cache", **common) for m in MODES}
    assert {m: mat.memory for m, mat in mats.items()} == {m: m for m in MODES}
    rng = np.random.default_rng(0)
    for method in METHODS:
        if method == "slerp":
            continue  # one expert: below
        for kw in candidates(method, 3, rng):
            reference.apply(method, **kw)
            want = reference.merged_state()
            for mode, mat in mats.items():
                mat.apply(method, **kw)
                assert_bit_equal(mat.merged_state(), want, f"{method} in mode {mode} ({dtype})")
    if dtype != torch.bfloat16:
        return
    # slerp merges one expert
    base, experts = fams["slerp"]
    reference = legacy.Materializer.from_folders(base, experts, **common)
    for mode in MODES:
        mat = Materializer.from_folders(base, experts, memory=mode, cache_dir=root / "cache", **common)
        for kw in candidates("slerp", 1, np.random.default_rng(1)):
            reference.apply("slerp", **kw)
            mat.apply("slerp", **kw)
            assert_bit_equal(mat.merged_state(), reference.merged_state(), f"slerp in mode {mode}")


# ----------------------------------------------------------------------------- the plan's bytes

def test_plan_bytes_equal_a_hand_computation():
    shapes = ModelShapes((100, 1000, 40), dtype_bytes=2, num_experts=2)  # P = 1140, N = 1000, K = 2, bf16
    cpu = mode_needs(shapes, "task_arithmetic", cuda=False)
    live, stored, work, out, staging = 1140 * 2, 3 * 1140 * 2, 3 * 1000 * 4, 1000 * 4, 2 * 3 * 1000 * 2
    assert (cpu["resident"].device_bytes, cpu["resident"].host_bytes) == (live + stored + work + out, 0)
    assert (cpu["host"].device_bytes, cpu["host"].host_bytes) == (live + staging + work + out, stored)
    in_flight = 3 * 1000 * 2  # the mapped pages of the largest block
    assert (cpu["disk"].device_bytes, cpu["disk"].host_bytes, cpu["disk"].disk_bytes) == (
        live + staging + work + out, in_flight, stored)
    gpu = mode_needs(shapes, "task_arithmetic", cuda=True)
    assert gpu["resident"].host_bytes == live  # the model loads through host memory
    assert gpu["disk"].host_bytes == staging + in_flight  # pinned bounce buffers
    # ties: order statistics (100 and 40 kept whole; 1000 > grid 256: 3 points) and the first sorts
    ties = mode_needs(shapes, "ties", cuda=False, order_stats_grid=256, sort_workers=4)["resident"]
    stats_device, stats_host, sorts = 2 * (100 + 40) * 4 + 2 * 3 * 4, 2 * 3 * 12, 2 * 1000 * 28
    assert ties.device_bytes == live + stored + work + out + stats_device + sorts
    assert ties.host_bytes == stats_host
    gpu_ties = mode_needs(shapes, "ties", cuda=True, order_stats_grid=256)
    assert gpu_ties["resident"].device_bytes == live + stored + work + out + stats_device + 1000 * 28
    assert gpu_ties["host"].device_bytes == live + staging + work + out + stats_device  # sorted on the host
    assert gpu_ties["host"].host_bytes == stored + stats_host + 1000 * 32
    dare = mode_needs(shapes, "dare_ties", cuda=False)["resident"]
    assert dare.device_bytes == live + stored + work + out + 2 * 1000 * 4  # draws of the largest tensor
    float32 = mode_needs(ModelShapes((100, 1000, 40), 4, 2), "task_arithmetic", cuda=False)["resident"]
    assert float32.device_bytes == 1140 * 4 + 3 * 1140 * 4  # task vectors used in place, output in the param


def test_plan_reads_headers_only_and_matches_the_stores_allocations(families, monkeypatch):
    from evomerge.merge.checkpoint import ModelFolder

    root, fams = families
    base, experts = fams[torch.bfloat16]
    cfg = llama_config(layers=2, tie_word_embeddings=True)  # hidden 32, intermediate 64, vocab 64, 4 heads
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = [h * h] * 4 + [h * i] * 3 + [h, h]
    monkeypatch.setattr(ModelFolder, "get_tensor", lambda *a, **k: pytest.fail("the plan loaded a tensor"))
    shapes = ModelShapes.from_folders(base, experts)
    monkeypatch.undo()
    assert sorted(shapes.numels) == sorted([v * h] + per_layer * 2 + [h])  # tied head counted once
    synthetic = ModelShapes.from_llama(hidden=h, intermediate=i, layers=2, heads=4, kv_heads=4, vocab=v, tied=True,
                                       dtype_bytes=2, num_experts=3)
    assert sorted(synthetic.numels) == sorted(shapes.numels)  # docs/scale.md's shapes come from the same code
    assert (shapes.dtype_bytes, shapes.num_experts) == (synthetic.dtype_bytes, synthetic.num_experts)
    for mode in MODES:
        mat = Materializer.from_folders(base, experts, device="cpu", memory=mode, compile=False,
                                        cache_dir=root / "cache")
        terms = mode_needs(shapes, "task_arithmetic", cuda=False)[mode].terms
        planned = sum(b for label, (where, b) in terms.items()
                      if where == "device" and label not in ("live model", "output buffer"))
        assert mat.store.device_bytes() == planned
        assert mat.store.host_bytes() == sum(b for label, (where, b) in terms.items()
                                             if where == "host" and label != "cache pages in flight")
        live = sum(p.numel() * p.element_size() for p in mat.model.parameters())
        assert live == terms["live model"][1]


# ----------------------------------------------------------------------------- choosing a mode

def plan_with(needs_cuda: bool, device_free: int, host_free: int, requested: str = "auto") -> MemoryPlan:
    shapes = ModelShapes((10**6,) * 10, dtype_bytes=2, num_experts=3)  # 10M parameters, bf16
    needs = mode_needs(shapes, "ties", cuda=needs_cuda)
    return choose_mode(MemoryPlan(shapes, "ties", "cuda:0" if needs_cuda else "cpu", needs, device_free, host_free,
                                  requested=requested))


def test_auto_takes_the_first_mode_that_fits_the_free_memory():
    gb = 10**9
    assert plan_with(True, 80 * gb, 100 * gb).chosen == "resident"
    # resident needs ~0.12 GB on the device; host and disk ~0.06 GB
    needs = plan_with(True, 0, 0).needs
    assert needs["resident"].device_bytes > needs["host"].device_bytes == needs["disk"].device_bytes
    between = int((needs["resident"].device_bytes + needs["host"].device_bytes) / 2 / memory_plan.HEADROOM)
    assert plan_with(True, between, 100 * gb).chosen == "host"
    assert plan_with(True, between, needs["disk"].host_bytes * 2).chosen == "disk"  # host RAM too small for host
    assert plan_with(True, 1000, 100 * gb).chosen is None
    cpu_needs = plan_with(False, 0, 0).needs
    cpu_between = int((cpu_needs["resident"].device_bytes + cpu_needs["disk"].device_bytes) / 2 / memory_plan.HEADROOM)
    assert plan_with(False, cpu_between, cpu_between).chosen == "disk"  # on CPU host mode saves nothing


def test_auto_materializer_follows_the_mocked_free_memory(families, monkeypatch):
    root, fams = families
    base, experts = fams[torch.bfloat16]
    shapes = ModelShapes.from_folders(base, experts)
    needs = mode_needs(shapes, "ties", cuda=False, order_stats_grid=GRID, sort_workers=torch.get_num_threads())
    disk = needs["disk"].device_bytes + needs["disk"].host_bytes  # on CPU both are host memory
    monkeypatch.setattr(memory_plan, "host_available", lambda: int(disk / memory_plan.HEADROOM) + 1)
    mat = Materializer.from_folders(base, experts, device="cpu", method="ties", order_stats_grid=GRID, compile=False,
                                    cache_dir=root / "cache")
    assert mat.memory == "disk"
    monkeypatch.setattr(memory_plan, "host_available", lambda: 10**12)
    mat = Materializer.from_folders(base, experts, device="cpu", method="ties", order_stats_grid=GRID, compile=False)
    assert mat.memory == "resident"


def test_a_run_that_fits_nowhere_is_refused_naming_the_numbers(families, monkeypatch):
    from evomerge.cli import main
    from evomerge.runs.config import ConfigError
    from evomerge.runs.search import Search

    root, fams = families
    base, experts = fams[torch.bfloat16]
    monkeypatch.setattr(memory_plan, "host_available", lambda: 50_000)  # 50 kB free
    config = write_run_config(root, "nowhere", models={"base": str(base), "experts": [str(e) for e in experts]})
    printed = []
    with pytest.raises(ConfigError) as error:
        Search.create(config, echo=printed.append)
    message = str(error.value)
    needs = mode_needs(ModelShapes.from_folders(base, experts), "ties", cuda=False, sort_workers=1)  # 1 thread each
    assert "fit in no memory mode" in message and "50.0 kB of host memory free per worker" in message
    for mode in MODES:
        assert f"{mode} {memory_plan.format_bytes(needs[mode].device_bytes + needs[mode].host_bytes)}" in message
    assert "chosen: none" in printed[0]
    assert not (root / "runs" / "nowhere").exists()  # refused before anything was written or loaded
    result = CliRunner().invoke(main, ["plan", str(config)])
    assert result.exit_code == 2 and "fit in no memory mode" in result.output and "resident" in result.output
    # a mode named in the config that does not fit, while another does
    disk = needs["disk"].device_bytes + needs["disk"].host_bytes  # on CPU both are host memory
    monkeypatch.setattr(memory_plan, "host_available", lambda: int(disk / memory_plan.HEADROOM) + 1)
    forced = write_run_config(root, "forced", models={"base": str(base), "experts": [str(e) for e in experts]},
                              workers={"backend": "inprocess", "memory": "resident"})
    with pytest.raises(ConfigError, match=r"mode 'resident' needs .* modes that fit: disk \(or auto\)"):
        Search.create(forced, echo=lambda *a: None)


# ----------------------------------------------------------------------------- the disk cache

def test_disk_cache_is_reused_and_rebuilt_when_a_model_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    base, experts = make_family(tmp_path / "fam", n_experts=2, seed=3, delta_scale=0.3, dtype=torch.bfloat16,
                                config=llama_config(layers=1))
    cache = tmp_path / "cache"
    kw = dict(device="cpu", memory="disk", compile=False, cache_dir=cache)
    first = Materializer.from_folders(base, experts, **kw)
    assert first.store.cache_written
    again = Materializer.from_folders(base, experts, **kw)
    assert not again.store.cache_written and again.store.cache.path == first.store.cache.path
    assert sorted(p.name for p in cache.iterdir()) == [first.store.cache.path.name]  # no temporary left behind
    path = first.store.cache.path
    first.close()
    again.close()
    path.write_bytes(path.read_bytes()[:-8])  # a cache cut short (a full disk, a copy that stopped) is rebuilt
    assert Materializer.from_folders(base, experts, **kw).store.cache_written
    # change one expert's weights (same shapes): a new key, a new cache, the new model's merges
    weights = experts[1] / "model.safetensors"
    state = load_file(weights)
    state = {k: (v.float() * 1.5).to(v.dtype) for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    changed = Materializer.from_folders(base, experts, **kw)
    assert changed.store.cache_written and changed.store.cache.path != first.store.cache.path
    reference = legacy.Materializer.from_folders(base, experts, device="cpu", compile=False)
    for mat in (changed, reference):
        mat.apply("task_arithmetic", weight=[0.4, 0.7])
    assert_bit_equal(changed.merged_state(), reference.merged_state(), "disk mode after a model changed")


# ----------------------------------------------------------------------------- bad input and faults

def test_a_memory_typo_names_the_field(tmp_path):
    from evomerge.runs.config import ConfigError, load_run_config

    path = write_run_config(tmp_path, "typo", workers={"backend": "inprocess", "memory": "resdent"})
    with pytest.raises(ConfigError, match=r"field `workers\.memory`: Input should be 'auto', 'resident', 'host' or "
                                          r"'disk'"):
        load_run_config(path)
    path = write_run_config(tmp_path, "typo2", workers={"backend": "inprocess", "memroy": "disk"})
    with pytest.raises(ConfigError, match=r"field `workers\.memroy` is not supported"):
        load_run_config(path)


def test_out_of_memory_on_one_candidate_fails_it_and_the_next_one_runs(families, monkeypatch):
    from evomerge.runs.backends import InProcessBackend

    root, fams = families
    base, experts = fams[torch.bfloat16]
    mat = Materializer.from_folders(base, experts, device="cpu", memory="host", compile=False, cache_random_draws=True)
    reference = legacy.Materializer.from_folders(base, experts, device="cpu", compile=False)
    kw = {"weight": [0.5, 0.2, 0.8], "density": [0.6, 0.5, 0.7]}
    mat.apply("dare_ties", **kw)
    assert mat.random_draws_bytes > 0
    real = mat._apply_tensor
    calls = {"n": 0}

    def fails_once(stored, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(stored, *args)

    monkeypatch.setattr(mat, "_apply_tensor", fails_once)
    with pytest.raises(MaterializerOutOfMemory, match=r"out of cpu memory writing tensor '.+' of a dare_ties "
                                                      r"candidate \(memory mode host\): CUDA out of memory"):
        mat.apply("dare_ties", **kw)
    assert mat.random_draws_bytes == 0  # the cache that grows is dropped
    mat.apply("dare_ties", **kw)
    reference.apply("dare_ties", **kw)
    assert_bit_equal(mat.merged_state(), reference.merged_state(), "the candidate after an out-of-memory")

    class Problem:  # a worker whose second candidate runs out of memory
        def evaluate(self, candidate_id, genome):
            from evomerge.runs.problem import Evaluation

            if candidate_id == 1:
                raise MaterializerOutOfMemory("out of cuda:0 memory writing tensor 'lm_head.weight'")
            return Evaluation(candidate_id, {"a": 0.5}, {"a": 0.1}, {"a": [1]}, 1, memory="host")

    backend = InProcessBackend.__new__(InProcessBackend)
    backend.problem, backend.fitness = Problem(), type("F", (), {"task_names": ["a"]})()
    results = backend.evaluate([(0, np.zeros(1)), (1, np.zeros(1)), (2, np.zeros(1))])
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].error.startswith("MaterializerOutOfMemory: out of cuda:0 memory") and math.isnan(
        results[1].objectives["a"])


def test_order_statistics_sorted_on_the_host_are_the_same_bits(families, monkeypatch):
    """The streaming modes on a GPU sort a host copy of each task vector; forced here on CPU."""
    root, fams = families
    base, experts = fams[torch.bfloat16]
    monkeypatch.setattr(Materializer, "sorts_on_host", property(lambda self: True))
    mat = Materializer.from_folders(base, experts, device="cpu", memory="host", order_stats_grid=GRID, compile=False)
    reference = legacy.Materializer.from_folders(base, experts, device="cpu", order_stats_grid=GRID, compile=False)
    for method in ("ties", "breadcrumbs_ties"):
        for m in (mat, reference):
            m.apply(method, weight=[0.5, 0.9, 0.3], density=[0.3, 0.6, 0.8])
        assert_bit_equal(mat.merged_state(), reference.merged_state(), f"{method}, sorted on the host")


def test_docs_scale_tables_are_the_plan_codes_output():
    from evomerge.merge.memory_plan import scale_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "scale.md").read_text()
    block = text.split("<!-- scale:begin -->\n", 1)[1].split("<!-- scale:end -->", 1)[0]
    assert block == scale_table()
    assert "| host | 18.38 GB | 58.63 GB | - | fits | fits | fits |" in block  # 7B TIES on a 24 GB card


def test_a_search_records_its_workers_memory_mode_and_every_mode_scores_the_same(run_workspace):
    import json

    from evomerge.runs.search import start_search

    records, printed = {}, []
    for mode in ("resident", "disk"):
        config = write_run_config(run_workspace, f"memory_{mode}", budget={"evaluations": 6},
                                  workers={"backend": "inprocess", "memory": mode, "cache_dir": "cache"})
        run_dir = start_search(config, progress=False, echo=printed.append)
        records[mode] = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert any("chosen: disk (workers.memory: disk)" in line for line in printed)  # the plan, printed at the start
    assert [r["memory"] for r in records["resident"]] == ["resident"] * 6
    assert [r["memory"] for r in records["disk"]] == ["disk"] * 6
    assert [(r["id"], r["objectives"], r["responses"]) for r in records["disk"]] == [
        (r["id"], r["objectives"], r["responses"]) for r in records["resident"]]
