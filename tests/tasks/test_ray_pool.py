import functools
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from salient import activations
from salient import plan as planmod
from salient.errors import Unreachable
from salient.resources import WorkerResources
from salient.stage import committed_result, local_run
from salient.stages.activations import Activations
from tests.helpers import read_activation_rows, worker_device

class _KillMidShard:
    """Runs shards, but SIGKILLs its own process after the first batch of shard 1, once."""

    def __init__(self, runner, marker):
        self.runner, self.marker = runner, marker

    def __call__(self, task):
        if task.shard.index == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            return self.runner(task, on_batch=lambda n: os.kill(os.getpid(), signal.SIGKILL))
        return self.runner(task)


def _killing_builder(cfg, marker):
    return _KillMidShard(activations.ActivationRunner(cfg.model, cfg.preprocess, cfg.compute, threads=1), marker)


def test_killed_worker_loses_and_duplicates_nothing(activation_world, tmp_path, ray_session):
    from tasks.ray_pool import run_pool

    cfg, planned = activation_world
    run = local_run(cfg)
    planmod.write_plan(cfg.dataset.root, run.build, cfg.compute.shard_size)
    items = Activations().shards(run)
    todo = [item.payload for item in items if committed_result(run, item) is None]
    assert len(todo) == len(items) == 6  # classes of 8, 9 and 8 images in runs of 5, none done
    marker = str(tmp_path / "killed-once")
    result = run_pool(
        functools.partial(_killing_builder, cfg, marker), todo, WorkerResources(2, 0.0, 1.0), max_attempts=2
    )
    assert os.path.exists(marker) and result.replaced_workers == 1 and not result.failed
    table = read_activation_rows(run.build)
    rels = table.column("relpath").to_pylist()
    assert len(rels) == len(set(rels)) == 24
    stats = sorted(result.results, key=lambda s: s["shard"])
    assert [s["shard"] for s in stats] == [0, 1, 2, 3, 4, 5]
    assert sum(s["images"] + s["failed"] for s in stats) == len(planned)


class _Rendezvous:
    """Runs a shard only once two different worker processes are inside a shard at the same time."""

    def __init__(self, runner, folder):
        self.runner, self.folder = runner, folder

    def __call__(self, task):
        open(os.path.join(self.folder, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(self.folder)) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the other GPU worker never ran at the same time")
            time.sleep(0.05)
        return self.runner(task)


def _rendezvous_builder(cfg, folder, threads):
    return _Rendezvous(activations.ActivationRunner(cfg.model, cfg.preprocess, cfg.compute, threads=threads), folder)


def test_two_gpu_workers_run_concurrently_on_their_own_devices(activation_world, tmp_path, ray_session):
    from salient.resources import plan_workers
    from tasks.ray_pool import run_pool

    cfg, _ = activation_world
    cluster = ray_session.cluster_resources()
    res = plan_workers(cfg.compute, cluster["CPU"], cluster["GPU"])
    assert (res.workers, res.gpus_per_worker) == (2, 1.0)
    run = local_run(cfg)
    planmod.write_plan(cfg.dataset.root, run.build, cfg.compute.shard_size)
    todo = [item.payload for item in Activations().shards(run)]
    folder = tmp_path / "inside"
    folder.mkdir()
    result = run_pool(functools.partial(_rendezvous_builder, cfg, str(folder), res.threads), todo[:2], res, max_attempts=1)
    assert not result.failed, result.failed
    assert len(os.listdir(folder)) == 2
    assert sorted(w["cuda_visible_devices"] for w in result.workers) == ["0", "1"]
    assert sorted(g for w in result.workers for g in w["gpu_ids"]) == ["0", "1"]
    assert all(s["worker"]["device"] == worker_device(s["worker"]["cuda_visible_devices"]) for s in result.results)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_reachable_returns_on_a_listening_port_and_gives_up_on_a_closed_one():
    from tasks.ray_pool import wait_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        wait_reachable(f"127.0.0.1:{server.getsockname()[1]}", 5.0)
        assert time.monotonic() - start < 1.0
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"'ray://127.0.0.1:{port}': nothing accepted a connection at 127.0.0.1:{port} within 1.5 s"):
        wait_reachable(f"ray://127.0.0.1:{port}", 1.5)
    assert 1.0 <= time.monotonic() - start < 3.0, "it retries until the timeout, and no longer"


def test_unreachable_ray_address_fails_within_the_connect_timeout():
    """In a fresh process (this one may hold a Ray already): ray.init alone would retry for many minutes."""
    port = _closed_port()
    code = f"from tasks.ray_pool import ray_cluster\nwith ray_cluster('127.0.0.1:{port}', connect_timeout_s=2):\n    pass\n"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    # salient.errors.Unreachable: the ConnectionError that names a configured service accepting no connection
    assert issubclass(Unreachable, ConnectionError)
    assert last.startswith(f"salient.errors.Unreachable: compute.ray_address = '127.0.0.1:{port}': nothing accepted a connection")
    assert "within 2 s" in last and "ray start --head" in last and "compute.ray_connect_timeout_s" in last
    assert elapsed < 60, f"took {elapsed:.0f} s, start-up included"


def _gpu_request() -> list[dict] | None:
    """The resource request the autoscaler reads (Ray's v1 autoscaler key in the cluster's KV store)."""
    import json

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


def test_a_gpu_stage_asks_the_autoscaler_for_its_gpus_and_withdraws_the_request(ray_session):
    from salient import config
    from tasks.ray_pool import RayExecutor

    cfg = config.load(None, ["compute.request_gpus=2", "compute.cpus_per_worker=0.5"])
    with RayExecutor(cfg.compute) as ex, ex.gpus(True) as totals:
        assert totals["GPU"] == 2  # the session's Ray declares two: nothing to wait for
        assert _gpu_request() == [{"GPU": 1.0, "CPU": 0.5}] * 2
    assert _gpu_request() == []
    with RayExecutor(cfg.compute) as ex, ex.gpus(uses_gpus=False):
        assert _gpu_request() == [], "a CPU stage asks for nothing"
    half = config.load(None, ["compute.request_gpus=2", "compute.gpus_per_worker=0.5"])
    with RayExecutor(half.compute) as ex, ex.gpus(True):
        assert _gpu_request() == [{"GPU": 0.5}] * 4
    assert _gpu_request() == []


def test_a_stage_runs_on_the_gpus_that_arrived_when_the_wait_is_over(ray_session, caplog):
    from salient import config
    from tasks.ray_pool import RayExecutor

    cfg = config.load(None, ["compute.request_gpus=3", "compute.scale_up_timeout_s=0.5"])
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="salient.pool"), RayExecutor(cfg.compute) as ex, ex.gpus(True) as totals:
        assert _gpu_request() == [{"GPU": 1.0}] * 3
    assert 0.5 <= time.monotonic() - t0 < 10
    assert totals["GPU"] == 2
    assert "2 of the 3 GPUs asked for arrived within 0.5 s" in caplog.text
    assert _gpu_request() == []


def test_waiting_for_gpus_ends_as_soon_as_they_are_there(monkeypatch):
    import ray

    from tasks import ray_pool

    arrivals = iter([{"GPU": 1.0}, {"GPU": 3.0}, {"GPU": 4.0}, {"GPU": 4.0}])
    calls = []

    def cluster_resources():
        calls.append(time.monotonic())
        return next(arrivals)

    monkeypatch.setattr(ray, "cluster_resources", cluster_resources)
    monkeypatch.setattr(ray_pool, "SCALE_POLL_S", 0.01)
    assert ray_pool.await_gpus(4, {"GPU": 0.0}, timeout_s=60) == {"GPU": 4.0}
    assert len(calls) == 3, "it stopped looking once 4 GPUs were there"
    assert ray_pool.await_gpus(2, {"GPU": 2.0, "CPU": 8.0}, timeout_s=60) == {"GPU": 2.0, "CPU": 8.0}
    assert len(calls) == 3, "enough GPUs already: no wait"


def _visible_devices_builder():
    return lambda item: os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_worker_given_no_gpu_sees_none(ray_session):
    """Ray leaves a worker that asked for no GPU every GPU of its node; it must compute on the CPU."""
    from tasks.ray_pool import run_pool

    # The session's Ray started with no CUDA_VISIBLE_DEVICES, as a cluster's node does: every GPU visible
    result = run_pool(_visible_devices_builder, [1], WorkerResources(1, 0.0, 1.0), max_attempts=1)
    assert result.results == [""] and result.workers[0]["gpu_ids"] == []
