"""A search on a real two-node Ray cluster (`workers.address`), started on loopback with `ray start`.

The head (`ray start --head --node-ip-address 127.0.0.1 --port P`) and a second node
(`ray start --address 127.0.0.1:P`, with its own custom resource) have one CPU each, so the two
workers of a run land one on each node. Each node runs in its own process session, which is how
the tests kill a node (every process of it, as a lost machine would) and how they stop everything
they started, also on failure. Ray's processes and the driver must listen on loopback only.

Checked against an uninterrupted in-process run of the same config (the independent reference:
where a candidate is scored does not change its scores):
- a node killed mid-run: the run completes on the remaining node, the candidates the lost worker
  was scoring are retried there and their records say so, and the log and Pareto set equal the
  reference's;
- the driver killed with SIGKILL mid-run, then `evomerge resume`: the same log and Pareto set.

`ray start` (Ray 2.60) replaces a loopback `--node-ip-address` by the machine's external address
when the node may join others (`ray._private.services.resolve_ip_for_localhost`), and its servers
then listen on every interface; the nodes here are started through a two-line launcher that keeps
127.0.0.1 (a real cluster has real addresses, so it needs none of this).
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from evomerge.runs.search import start_search
from evomerge.testing import write_run_config

pytestmark = pytest.mark.slow

RAY_START = [sys.executable, "-c", "import sys; from ray._private import services; "
             "services.resolve_ip_for_localhost = lambda host: host; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()", "start"]
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
QUIET = dict(progress=False, echo=lambda *a: None)
EVAL_DELAY = "0.4"  # seconds added to every evaluation on the cluster's workers, to kill things mid-run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            if _session_of(int(entry)) == sid:
                pids.append(int(entry))
    return pids


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])  # field 6: session id
    except OSError:
        return None


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session `sid` (one we started with start_new_session)."""
    for _ in range(50):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on and of their bound UDP sockets."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family, listening in (("tcp", socket.AF_INET, "0A"), ("tcp6", socket.AF_INET6, "0A"),
                                     ("udp", socket.AF_INET, "07"), ("udp6", socket.AF_INET6, "07")):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes or state != listening:
                continue
            raw = bytes.fromhex(local.split(":")[0])
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc/net words are host order
            found.append(socket.inet_ntop(family, raw))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class LoopbackCluster:
    """A Ray head and one more node on 127.0.0.1, each `ray start --block` in its own session."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="emray", dir="/tmp")  # short: Ray's socket paths must fit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        token = secrets.token_hex(16)
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # The cluster's own token (not ~/.ray's), for the nodes and the drivers alike.
        self.driver_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"}
        # Workers inherit their node's environment: the evaluation delay is set here.
        self.node_env = {**self.driver_env, "RAY_USAGE_STATS_ENABLED": "0", "EVOMERGE_TEST_EVAL_DELAY": EVAL_DELAY}
        self.nodes: list[subprocess.Popen] = []
        self.head = self._start("head", ["--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
                                         "--include-dashboard=false", "--dashboard-port", str(_free_port())])
        self.second = self._start("second", ["--address", self.address,
                                             "--resources", json.dumps({"evomerge_second_node": 1})])

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = Path(self.temp_dir) / f"{name}.log"
        ports = [f"--{option}={_free_port()}" for option in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port")]
        with open(log, "w") as out:
            node = subprocess.Popen([*RAY_START, *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                                     "--num-gpus", "0", "--object-store-memory", str(80 * 2**20), "--block",
                                     "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0",
                                     *ports], env=self.node_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.nodes.append(node)
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if node.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return node

    def pids(self, node: subprocess.Popen) -> set[int]:
        return set(_session_pids(node.pid))

    def kill(self, node: subprocess.Popen) -> None:
        _kill_session(node.pid)
        node.wait(timeout=30)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
                try:
                    node.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            _kill_session(node.pid)  # and whatever it left
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def cluster():
    started = LoopbackCluster()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def reference(run_workspace):
    """The uninterrupted in-process run the cluster runs must reproduce."""
    return start_search(write_run_config(run_workspace, "cluster_ref"), **QUIET)


def records_of(run_dir: Path) -> list[dict]:
    """The log in the order evaluations finished."""
    log = run_dir / "evaluations.jsonl"
    text = log.read_text() if log.is_file() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]  # complete lines only: the driver may be writing


def log_of(run_dir: Path) -> list[tuple]:
    """What a run computed, per logged candidate (timings, workers and retries left out)."""
    return sorted((r["id"], r["generation"], tuple(r["genome"]), r["status"], tuple(sorted(r["objectives"].items())))
                  for r in records_of(run_dir))


def pareto_of(run_dir: Path) -> list[tuple]:
    data = json.loads((run_dir / "pareto.json").read_text())
    return sorted((m["id"], tuple(sorted(m["objectives"].items()))) for m in data["members"])


def _pid(record: dict) -> int:
    return int(record["worker"].split("-pid", 1)[1].split("@", 1)[0])  # ray-<index>-pid<pid>@<node ip>


def _search(cluster: LoopbackCluster, root: Path, name: str) -> subprocess.Popen:
    path = write_run_config(root, name, workers={"backend": "ray", "num_workers": 2, "address": cluster.address})
    return subprocess.Popen([*EVOMERGE, "search", str(path), "--quiet"], cwd=root, env=cluster.driver_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_node_lost_mid_run_costs_only_its_candidates(cluster, run_workspace, reference):
    run_dir = run_workspace / "runs" / "cluster_node_lost"
    driver = _search(cluster, run_workspace, "cluster_node_lost")
    try:
        def second_node_just_took_a_candidate() -> bool:
            # mid-generation, right after the second node's worker logged one: it is scoring the next
            records = records_of(run_dir)
            return (len(records) >= 7 and len(records) % 6 not in (0, 5)
                    and _session_of(_pid(records[-1])) == cluster.second.pid)

        _wait_for(second_node_just_took_a_candidate, "the second node scored candidates", driver)
        on_cluster = cluster.pids(cluster.head) | cluster.pids(cluster.second) | {driver.pid}
        addresses = _listening_addresses(sorted(on_cluster))
        assert addresses and all(_is_loopback(a) for a in addresses), addresses
        before = records_of(run_dir)
        node_of = {_pid(r): _session_of(_pid(r)) for r in before}  # while the workers live
        cluster.kill(cluster.second)
        out, _ = driver.communicate(timeout=300)
    finally:
        _kill_session(driver.pid)
    assert driver.returncode == 0, out[-4000:]
    assert set(node_of.values()) == {cluster.head.pid, cluster.second.pid}  # a worker on each node
    lost = {r["worker"] for r in before if node_of[_pid(r)] == cluster.second.pid}
    head = {pid for pid, node in node_of.items() if node == cluster.head.pid}
    records = records_of(run_dir)
    assert log_of(run_dir) == log_of(reference)
    assert pareto_of(run_dir) == pareto_of(reference)
    assert all(_pid(r) in head for r in records[len(before) + 1:])  # after the loss: the head's worker only
    retried = [r for r in records if r["retries"]]
    assert retried, "no candidate was in flight on the lost node"
    for r in retried:
        assert r["status"] == "ok" and _pid(r) in head
        assert len(r["retries"]) == 1 and r["retries"][0].split(" lost (")[0] in lost, r["retries"]


def test_kill_9_of_the_driver_then_resume_gives_the_uninterrupted_pareto_set(cluster, run_workspace, reference):
    run_dir = run_workspace / "runs" / "cluster_kill_9"
    driver = _search(cluster, run_workspace, "cluster_kill_9")
    try:
        _wait_for(lambda: len(records_of(run_dir)) >= 9, "nine evaluations", driver)  # mid generation 1
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        _kill_session(driver.pid)
    assert driver.returncode == -signal.SIGKILL
    assert 9 <= len(records_of(run_dir)) < 24
    resumed = subprocess.run([*EVOMERGE, "resume", str(run_dir), "--quiet"], cwd=run_workspace,
                             env=cluster.driver_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-4000:]
    assert "reusing" in resumed.stdout  # the interrupted generation's finished evaluations were kept
    assert pareto_of(run_dir) == pareto_of(reference)
    assert log_of(run_dir) == log_of(reference)
    assert sorted(r["id"] for r in records_of(run_dir)) == list(range(24))
