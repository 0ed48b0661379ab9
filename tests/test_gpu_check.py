"""benchmarks/gpu_check.sh: one line and exit 0 without a GPU; with --cpu-dry-run every check runs (on the
CPU, smallest sizes) and one `CHECK name: PASS|FAIL|SKIP key=value ...` line per check comes out, on
stdout and in $OUT/gpu_check_summary.txt."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CHECKS = ["tests", "scoring", "merge_throughput", "memory_modes", "smol_search"]
LINE = re.compile(r"CHECK (\w+): (PASS|FAIL|SKIP)((?: [a-z_]+=\S+| reason=\S+)*)")


def run_script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PY": sys.executable, **(env or {})})


def summary(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """{check: (status, {key: value})} from the CHECK lines of `text`; a name twice is an error."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    for line in text.splitlines():
        if line.startswith("CHECK "):
            match = LINE.fullmatch(line)
            assert match, f"malformed summary line {line!r}"
            assert match[1] not in out, f"check {match[1]} reported twice"
            out[match[1]] = (match[2], dict(kv.split("=", 1) for kv in match[3].split()))
    return out


def test_summary_parser_on_a_hand_written_line():
    text = "noise\nCHECK tests: FAIL reason=timeout passed=3 device=cuda secs=200\nCHECK scoring: PASS mc_equal=20/20 secs=4\n"
    assert summary(text) == {"tests": ("FAIL", {"reason": "timeout", "passed": "3", "device": "cuda", "secs": "200"}),
                             "scoring": ("PASS", {"mc_equal": "20/20", "secs": "4"})}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_one_line_and_exit_0(tmp_path):
    done = run_script(env={"OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "gpu_check: no GPU (torch.cuda.is_available() is False); nothing run\n"
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_unknown_option_is_refused():
    done = run_script("--gpu")
    assert done.returncode == 2 and "unknown option --gpu" in done.stderr


@pytest.mark.slow
def test_cpu_dry_run_one_summary_line_per_check(tmp_path):
    """Every step on the CPU at the smallest sizes (a few minutes on a busy 2-core machine)."""
    out = tmp_path / "out"
    done = run_script("--cpu-dry-run", env={"OUT": str(out), "OMP_NUM_THREADS": "1"}, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = summary(done.stdout)
    assert list(lines) == CHECKS, done.stdout[-3000:]
    assert (out / "gpu_check_summary.txt").read_text().splitlines() == [
        line for line in done.stdout.splitlines() if line.startswith("CHECK ")]
    for name, (status, kv) in lines.items():
        assert status == "PASS", (name, status, kv, sorted((out / "gpu_check_logs").iterdir()))
        assert kv["device"] == "cpu" and int(kv["secs"]) >= 0
    # the numbers each check parses out of its benchmark
    assert lines["tests"][1]["passed"] != "0" and "failed" not in lines["tests"][1]
    assert lines["scoring"][1]["mc_equal"] == "20/20" and lines["scoring"][1]["gen_equal"] == "20/20"
    for method in ("task_arithmetic", "ties", "dare_ties"):
        assert float(lines["merge_throughput"][1][f"{method}_ms"]) > 0
    for mode in ("resident", "host"):
        assert abs(float(lines["memory_modes"][1][f"{mode}_task_arithmetic_peak_vs_plan"]) - 1) <= 0.10
    smol = lines["smol_search"][1]
    assert smol["zoo"] == "smol_tiny" and smol["search_on"] == "random_family"
    assert int(smol["candidates"]) >= 4 and smol["failed"] == "0" and int(smol["pareto"]) >= 1
    # the numbers against the benchmarks' own lines in the logs, parsed here independently of the script
    logs = out / "gpu_check_logs"
    throughput = (logs / "merge_throughput.log").read_text()
    for method in ("task_arithmetic", "ties", "dare_ties"):
        ms = re.search(rf"materialize {method} +[0-9.]+ GB/s +([0-9.]+) ms/candidate", throughput)[1]
        assert lines["merge_throughput"][1][f"{method}_ms"] == ms
    for line in (logs / "memory_modes.log").read_text().splitlines():
        if line.startswith("memory_modes "):
            mode = line.split()[1]
            delta, plan = map(float, re.search(r"peak RSS delta ([0-9.]+) GB vs plan ([0-9.]+) GB", line).groups())
            assert float(lines["memory_modes"][1][f"{mode}_task_arithmetic_peak_vs_plan"]) == pytest.approx(
                delta / plan, abs=0.005)  # the GB figures are rounded to 1 MB
    done_line = re.search(r"done: (\d+) candidates \((\d+) failed\).*Pareto set of (\d+)",
                          (logs / "smol_search.log").read_text())
    assert (smol["candidates"], smol["failed"], smol["pareto"]) == done_line.groups()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, says", [("cuda", "no CUDA GPU is available here"), ("gpu", "unknown device 'gpu'")])
def test_conftest_refuses_a_test_device_this_machine_lacks(device, says):
    """EVOMERGE_TEST_DEVICE=cuda without a GPU must not quietly run the suite on the CPU."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{Path(__file__).name}::test_summary_parser_on_a_hand_written_line"],
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EVOMERGE_TEST_DEVICE": device})
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error: no test ran
    assert "EVOMERGE_TEST_DEVICE" in done.stderr and says in done.stderr, done.stderr
