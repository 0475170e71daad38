"""A three-node Ray cluster on loopback (a head and two more nodes, one GPU declared on each): the
build runs on it through ``compute.ray_address`` with one worker actor per node, a worker node is
SIGKILLed mid-build with its whole process group, and the build still completes with exactly the
clean local build's tables."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from salient import activations, builds, storage
from tests.faults import ROOT, assert_same_tables, build_tables, fault_config, spawn_run, wait_run, write_config
from tests.s3server import _free_ports

NODES = 3
OBJECT_STORE_BYTES = 100 * 2**20
START_TIMEOUT_S = 180.0
SHARD_PAUSE_S = 1.0
# `ray start` joins a node to a cluster only where multi-node clusters are enabled, and then turns
# --node-ip-address 127.0.0.1 into the host's outward address, listening on every interface. This
# runs `ray start` with that one step left out, so every node stays on loopback.
RAY_START = (
    "import sys; from ray._private import services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.exit(main())"
)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _processes() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def node_group(pid: int) -> int:
    """The process group of the node whose raylet started worker ``pid`` (workers have sessions of their own)."""
    return os.getpgid(_parent(pid))


def kill_node(group: int) -> None:
    """SIGKILL a node: its process group (``ray start``, raylet, agents) and the workers its raylet started."""
    members = set()
    for pid in _processes():
        try:
            if os.getpgid(pid) == group:
                members.add(pid)
        except ProcessLookupError:
            continue
    workers = []
    for pid in _processes():
        try:
            if _parent(pid) in members:
                workers.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Cluster:
    address: str
    groups: list[int]  # process group of each node, the head first
    temp_dir: str


def start_node(
    temp_dir: str, log: str, head_port: int, head: bool, gpus: int = 1, more_args: Sequence[str] = (),
    env: dict[str, str] | None = None, client_port: int | None = None,
) -> subprocess.Popen:
    """``ray start --block`` for one node on 127.0.0.1 with 1 CPU and ``gpus`` GPUs (declared), every
    port chosen (a head's Ray Client port is ``client_port`` when given), in a process group of its own."""
    ports = _free_ports(7)
    args = [
        sys.executable, "-c", RAY_START, "start", "--block", "--node-ip-address=127.0.0.1",
        "--num-cpus=1", f"--num-gpus={gpus}", f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
        f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
    ]
    if head:
        args += ["--head", f"--port={head_port}", f"--ray-client-server-port={client_port or ports[6]}", "--include-dashboard=false"]
    else:
        args += [f"--address=127.0.0.1:{head_port}"]
    # a node sees the machine's GPUs, as a real one does (the suite hides them from its own process)
    machine = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env = {**machine, "PYTHONPATH": ROOT, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [*args, *more_args], env=full_env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )


_CLUSTER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[3])
while ray.cluster_resources().get("GPU", 0) != float(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.2)
alive = [n for n in ray.nodes() if n["Alive"]]
print("STATE", json.dumps({"gpus": ray.cluster_resources().get("GPU", 0), "addresses": sorted(n["NodeManagerAddress"] for n in alive)}))
"""


def cluster_state(address: str, gpus: int, timeout_s: float) -> dict:
    """The cluster's GPUs and its live nodes' addresses once it has ``gpus`` GPUs, or after ``timeout_s``."""
    done = subprocess.run(
        [sys.executable, "-c", _CLUSTER, address, str(gpus), str(timeout_s)],
        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=timeout_s + 60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The driver also prints the autoscaler's events.
    [state] = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("STATE ")]
    return json.loads(state)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray head and two more nodes on 127.0.0.1, each with 1 CPU, 1 GPU (declared) and a small
    object store; stopped by their process groups."""
    logs = tmp_path_factory.mktemp("ray-nodes")
    temp_dir = tempfile.mkdtemp(prefix="sr-", dir="/tmp")  # unix socket paths must stay short
    head_port = _free_ports(1)[0]
    address = f"127.0.0.1:{head_port}"
    procs: list[subprocess.Popen] = []
    try:
        # one node at a time: nodes starting together in one temporary directory can pick the same socket names
        for i in range(NODES):
            procs.append(start_node(temp_dir, str(logs / f"node{i}.log"), head_port, head=i == 0))
            up = len(cluster_state(address, i + 1, START_TIMEOUT_S)["addresses"])  # one GPU a node
            if up != i + 1:
                tails = "\n".join((logs / f"node{k}.log").read_text()[-1500:] for k in range(i + 1))
                raise RuntimeError(f"{up} of {i + 1} Ray nodes came up\n{tails}")
        yield Cluster(address, [p.pid for p in procs], temp_dir)
    finally:
        for proc in procs:
            kill_node(proc.pid)
            proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


class _MeetFirst:
    """Runs items with ``fn``; each worker's first item waits until ``n`` workers are inside one,
    and every later item takes ``SHARD_PAUSE_S`` longer, so that the stage outlasts the loss of a
    node being noticed (a couple of seconds) with shards still waiting."""

    def __init__(self, fn: Callable[[Any], Any], folder: str, n: int) -> None:
        self.fn, self.folder, self.n, self.met = fn, folder, n, False

    def __call__(self, item: Any) -> Any:
        if self.met:
            time.sleep(SHARD_PAUSE_S)
        else:
            open(os.path.join(self.folder, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 120
            while len(os.listdir(self.folder)) < self.n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(os.listdir(self.folder))} of {self.n} workers started")
                time.sleep(0.05)
            self.met = True
        return self.fn(item)


def _meeting(folder: str, n: int, builder: Callable[[], Callable[[Any], Any]]) -> _MeetFirst:
    return _MeetFirst(builder(), folder, n)


def drive(config_path: str, record: str, folder: str, victim: int) -> int:
    """``salient run CONFIG`` in this process, with the activation stage's pool (the run's first) watched: its workers
    meet before their first shard (so every node computes one), the node ``victim`` (a process
    group) is SIGKILLed as soon as its worker has committed a shard, and what the pool saw is
    written to ``record`` as JSON."""
    import ray

    import tasks.ray_pool
    from salient import cli

    run_pool = tasks.ray_pool.run_pool
    calls: list[int] = []

    def watched(builder, items, resources, *, on_result=None, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            return run_pool(builder, items, resources, on_result=on_result, **kwargs)
        killed: list[int] = []

        def kill_after_its_shard(item, stats: dict) -> None:
            if on_result is not None:
                on_result(item, stats)
            if not killed and node_group(stats["worker"]["pid"]) == victim:
                kill_node(victim)
                killed.append(stats["shard"])

        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        meeting = functools.partial(_meeting, folder, resources.workers, builder)
        result = run_pool(meeting, items, resources, on_result=kill_after_its_shard, **kwargs)
        with open(record, "w") as fh:
            json.dump({
                "nodes": nodes, "workers": result.workers, "replaced_workers": result.replaced_workers,
                "failed": len(result.failed), "killed_after_shard": killed, "planned_workers": resources.workers,
            }, fh)
        return result

    tasks.ray_pool.run_pool = watched
    return cli.main(["run", config_path])


@pytest.mark.heavy
def test_build_on_three_nodes_survives_losing_one(cluster, reference, prefect_server, tmp_path):
    root = str(tmp_path / "out")
    cfg = fault_config(reference.world, reference.checkpoint, root, [f"compute.ray_address={cluster.address}"])
    path = write_config(cfg, str(tmp_path / "salient.yaml"))
    record, folder = tmp_path / "pool.json", tmp_path / "met"
    folder.mkdir()
    victim = cluster.groups[2]
    code = f"from tests.faults.test_multinode import drive; import sys; sys.exit(drive({path!r}, {str(record)!r}, {str(folder)!r}, {victim}))"
    proc = spawn_run(path, str(tmp_path / "run.log"), argv=["-c", code])
    status = wait_run(proc)
    log = (tmp_path / "run.log").read_text()
    assert status == 0, log[-6000:]

    pool = json.loads(record.read_text())
    # one worker actor per node, each given that node's one GPU
    assert len(pool["nodes"]) == NODES and pool["planned_workers"] == NODES
    started = pool["workers"]
    assert len(started) == NODES and sorted(w["node_id"] for w in started) == pool["nodes"], started
    assert all(w["gpu_ids"] == ["0"] and w["cuda_visible_devices"] == "0" for w in started), started
    # the victim node went down mid-stage: its worker was replaced, the shard handed to it ran on another node
    assert pool["killed_after_shard"] and pool["replaced_workers"] >= 1 and pool["failed"] == 0, pool
    assert "published as latest" in log

    build = builds.resolve(root)
    stats = [storage.read_json(storage.join(build, activations.DIRNAME, rel)) for rel in storage.list_files(storage.join(build, activations.DIRNAME)) if rel.endswith(".json")]
    pids = {w["pid"] for w in started}
    assert sorted(s["shard"] for s in stats) == list(range(12)), "every shard committed once"
    assert {s["worker"]["pid"] for s in stats} <= pids, "every shard was computed by one of the started workers"
    assert len({s["worker"]["pid"] for s in stats}) == NODES, "each node's worker computed shards"
    assert {s["worker"]["cuda_visible_devices"] for s in stats} == {"0"}
    assert_same_tables(build_tables(root, build), reference.tables)
