import os

from salient import activations, storage
from tests.helpers import read_activation_rows


def test_flow_runs_every_image_once_on_two_gpu_workers_then_skips(activation_world, ray_session, prefect_server):
    from flows.activations import activations_flow

    cfg, planned = activation_world
    summary = activations_flow(cfg)
    assert (summary["planned"], summary["images"], summary["failed"], summary["shards"]) == (25, 24, 1, 5)
    table = read_activation_rows(cfg.output)
    rels = table.column("relpath").to_pylist()
    assert sorted(rels) == sorted(r for r in planned if r != "n0001/zero.JPEG") and len(set(rels)) == len(rels)
    assert sorted(table.column("image_id").to_pylist()) == [i for i, r in enumerate(planned) if r != "n0001/zero.JPEG"]

    stats = [storage.read_json(activations.stats_uri(cfg.output, i)) for i in range(5)]
    assert summary["failure_lists"] == [activations.stats_uri(cfg.output, planned.index("n0001/zero.JPEG") // 5)]
    by_worker: dict[str, list[dict]] = {}
    for s in stats:
        by_worker.setdefault(s["worker"]["cuda_visible_devices"], []).append(s)
    assert set(by_worker) == {"0", "1"}, "each GPU worker sees its own device"
    assert all(s["worker"]["device"] == "cpu" for s in stats), "no CUDA here: workers fall back to the CPU"

    mtimes = {p: os.stat(p).st_mtime_ns for p in storage.url_to_fs(cfg.output)[0].glob(f"{cfg.output}/activations/*")}
    again = activations_flow(cfg)
    assert again["images"] == 24
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes, "a rerun with nothing changed recomputes nothing"
