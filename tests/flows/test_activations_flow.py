import os

from salient import activations, storage
from tests.helpers import current_build, read_activation_rows, run_stages, worker_device


def test_flow_runs_every_image_once_on_two_gpu_workers_then_skips(activation_world, ray_session, prefect_server):
    cfg, planned = activation_world
    summary = run_stages(cfg, "activations")
    # shards never span classes: 8, 9 and 8 images in runs of 5
    assert (summary["planned"], summary["images"], summary["failed"], summary["shards"]) == (25, 24, 1, 6)
    out = current_build(cfg.output)
    table = read_activation_rows(out)
    rels = table.column("relpath").to_pylist()
    assert sorted(rels) == sorted(r for r in planned if r != "n0001/zero.JPEG") and len(set(rels)) == len(rels)
    assert sorted(table.column("image_id").to_pylist()) == [i for i, r in enumerate(planned) if r != "n0001/zero.JPEG"]

    stats = [storage.read_json(activations.stats_uri(out, i)) for i in range(6)]
    assert summary["failure_lists"] == [activations.stats_uri(out, 3)], "zero.JPEG is the 9th image of class 1"
    # Which worker takes which shard depends on timing (one may take them all on a busy machine; that
    # two run at once is proven in tests/tasks/test_ray_pool.py): each worker sees one device of its own.
    devices: dict[int, set[str]] = {}
    for s in stats:
        devices.setdefault(s["worker"]["pid"], set()).add(s["worker"]["cuda_visible_devices"])
    assert all(len(d) == 1 for d in devices.values()), "a worker keeps its one device"
    seen = [d for ds in devices.values() for d in ds]
    assert len(seen) == len(set(seen)) and set(seen) <= {"0", "1"}, "each GPU worker sees its own device"
    # The session's Ray declares two GPUs whatever the machine has: a worker whose device the
    # machine lacks falls back to the CPU, one whose GPU exists runs on it.
    for s in stats:
        assert s["worker"]["device"] == worker_device(s["worker"]["cuda_visible_devices"]), s["worker"]

    mtimes = {p: os.stat(p).st_mtime_ns for p in storage.url_to_fs(out)[0].glob(f"{out}/activations/*")}
    again = run_stages(cfg, "activations")
    assert again["images"] == 24
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes, "a rerun with nothing changed recomputes nothing"
