"""A build on an autoscaling Ray cluster that starts with no GPU: Ray's own autoscaler, with its
fake multi-node provider on 127.0.0.1, adds one-GPU nodes when a stage asks for
``compute.request_gpus``, the build runs on them with the clean build's tables, and the nodes go
again once the request is withdrawn."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from salient import activations, builds, storage
from tests.faults import assert_same_tables, build_tables, fault_config, spawn_run, wait_run, write_config
from tests.faults.test_multinode import OBJECT_STORE_BYTES, cluster_state, kill_node, start_node
from tests.s3server import _free_ports

GPU_NODES = 2
IDLE_TIMEOUT_S = 15
START_TIMEOUT_S = 180.0


def autoscaler_config(gcs_address: str) -> dict:
    """A cluster-launcher config for Ray's fake multi-node provider: a head without GPUs and up to
    ``GPU_NODES`` nodes of 1 CPU and 1 GPU, removed when idle for ``IDLE_TIMEOUT_S``."""
    return {
        "cluster_name": "salient-test", "max_workers": GPU_NODES,
        "provider": {
            "type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
            "disable_node_updaters": True, "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {}, "min_workers": 0, "max_workers": GPU_NODES,
            },
        },
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The head of an autoscaling cluster on 127.0.0.1 with no GPU; its addresses, by the way a
    driver connects (``gcs``, ``client``). Stopped, with every node its autoscaler started, by its
    process group."""
    base = tmp_path_factory.mktemp("autoscale")
    temp_dir = tempfile.mkdtemp(prefix="sa-", dir="/tmp")  # unix socket paths must stay short
    gcs_port, client_port = _free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    config_path = base / "autoscaler.json"
    config_path.write_text(json.dumps(autoscaler_config(address)))
    head = start_node(
        temp_dir, str(base / "head.log"), gcs_port, head=True, gpus=0, client_port=client_port,
        more_args=[f"--autoscaling-config={config_path}"],
        # The fake provider starts its nodes inside the autoscaler's process, on the address Ray
        # picks there: keep that on loopback too.
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    try:
        state = cluster_state(address, 0, START_TIMEOUT_S)
        assert state["addresses"] == ["127.0.0.1"], (base / "head.log").read_text()[-3000:]
        yield {"gcs": address, "client": f"ray://127.0.0.1:{client_port}"}
    finally:
        kill_node(head.pid)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.heavy
@pytest.mark.parametrize("connect", ["gcs", "client"])
def test_build_asks_an_autoscaling_cluster_for_gpus_and_gives_them_back(connect, autoscaling_head, reference, prefect_server, tmp_path):
    head = autoscaling_head["gcs"]
    assert cluster_state(head, 0, 120 + IDLE_TIMEOUT_S)["gpus"] == 0, "the cluster starts without GPUs"
    root = str(tmp_path / "out")
    cfg = fault_config(reference.world, reference.checkpoint, root, [
        f"compute.ray_address={autoscaling_head[connect]}", f"compute.request_gpus={GPU_NODES}", "compute.gpus_per_worker=1",
        f"compute.scale_up_timeout_s={START_TIMEOUT_S}",
    ])
    path = write_config(cfg, str(tmp_path / "salient.yaml"))
    proc = spawn_run(path, str(tmp_path / "run.log"))
    status = wait_run(proc)
    log = (tmp_path / "run.log").read_text()
    assert status == 0, log[-6000:]
    assert f"asked the autoscaler for {GPU_NODES} GPUs (0 now)" in log
    assert f"on {GPU_NODES} workers x (1 GPU, 1 CPU)" in log, "the pool was sized from the GPUs that arrived"

    build = builds.resolve(root)
    stats = [storage.read_json(storage.join(build, activations.DIRNAME, rel)) for rel in storage.list_files(storage.join(build, activations.DIRNAME)) if rel.endswith(".json")]
    # The head has no GPU: every shard ran on a node the autoscaler added (which worker took
    # which shard is timing).
    assert {s["worker"]["cuda_visible_devices"] for s in stats} == {"0"}
    assert_same_tables(build_tables(root, build), reference.tables)

    # The request was withdrawn: the idle GPU nodes go.
    t0 = time.monotonic()
    state = cluster_state(head, 0, 120 + IDLE_TIMEOUT_S)
    assert state["gpus"] == 0, f"GPU nodes still up {time.monotonic() - t0:.0f} s after the build: {state}"
    assert set(state["addresses"]) == {"127.0.0.1"}
