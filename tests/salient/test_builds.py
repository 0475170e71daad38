import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from salient import builds, storage


def test_pointers_resolve_and_refuse_bad_ids(tmp_path):
    root = str(tmp_path / "out")
    with pytest.raises(ValueError, match="has no latest build.*salient run"):
        builds.resolve(root)
    layout = builds.open_current(root)
    assert json.loads((tmp_path / "out" / "current").read_text()) == {"build_id": layout.build_id, "path": f"builds/{layout.build_id}"}
    os.makedirs(layout.build)
    assert builds.resolve(root, pointer="current") == layout.build
    assert builds.resolve(root, layout.build_id) == layout.build
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 129):
        with pytest.raises(ValueError, match="not valid"):
            builds.build_dir(root, bad)
    with pytest.raises(ValueError, match="does not exist"):
        builds.resolve(root, "20990101T000000Z-000000")
    (tmp_path / "out" / "latest").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        builds.resolve(root)


def test_a_published_build_is_never_changed_by_stage_commands(tmp_path):
    root = str(tmp_path / "out")
    first = builds.open_current(root)
    storage.write_bytes_atomic(storage.join(first.build, "pairs.parquet"), b"v1")
    with pytest.raises(ValueError, match="not complete"):
        builds.publish(root, first.build_id)
    builds.write_manifest(first, {"counts": {"pairs": 1}})
    builds.publish(root, first.build_id)
    assert builds.open_current(root).build_id != first.build_id
    second = builds.open_current(root)
    assert (tmp_path / "out" / "builds" / second.build_id / "pairs.parquet").read_bytes() == b"v1"
    assert not os.path.exists(os.path.join(second.build, builds.MANIFEST)), "the copy is a new, unfinished build"
    storage.write_bytes_atomic(storage.join(second.build, "pairs.parquet"), b"v2")
    assert (tmp_path / "out" / "builds" / first.build_id / "pairs.parquet").read_bytes() == b"v1"
    assert builds.read_pointer(root, "latest") == first.build_id


def test_start_run_resumes_an_unfinished_build(tmp_path):
    root = str(tmp_path / "out")
    run = builds.start_run(root)
    assert builds.start_run(root) == run, "a stopped run resumes in its build"
    builds.write_manifest(run, {})
    assert builds.start_run(root).build_id != run.build_id


def test_gc_keeps_latest_current_and_answers(tmp_path):
    root = str(tmp_path / "out")
    ids = []
    for k in range(4):
        layout = builds.Layout(root, f"2026010{k}T000000Z-00000{k}")
        entry = f"e{k}"
        builds.save_entry(root, "stage", entry, str(tmp_path), [], {})
        builds.save_entry(root, "stage", "shared", str(tmp_path), [], {})
        builds.record_cache_use(layout.build, [f"stage/{entry}", "stage/shared"])
        builds.write_manifest(layout, {})
        ids.append(layout.build_id)
    builds.publish(root, ids[1])  # latest is an older build
    builds.write_pointer(root, "current", ids[0])
    unfinished = builds.Layout(root, "20260101T120000Z-aaaaaa")  # older than the newest complete build
    builds.record_cache_use(unfinished.build, ["stage/e0"])
    storage.write_bytes_atomic(storage.join(builds.incoming(root), "answers.csv"), b"answers")

    dry = builds.gc(root, keep=1, dry_run=True)
    assert sorted(os.listdir(tmp_path / "out" / "builds")) == sorted([*ids, unfinished.build_id])
    summary = builds.gc(root, keep=1)
    assert summary == dry
    assert sorted(summary["removed_builds"]) == sorted([ids[2], unfinished.build_id])
    assert sorted(os.listdir(tmp_path / "out" / "builds")) == sorted([ids[0], ids[1], ids[3]])
    assert summary["removed_cache_entries"] == 1
    assert builds.read_entry(root, "stage", "e2") is None
    assert all(builds.read_entry(root, "stage", e) is not None for e in ("e0", "e1", "e3", "shared"))
    assert (tmp_path / "out" / "annotations" / "incoming" / "answers.csv").read_bytes() == b"answers"
    with pytest.raises(ValueError, match="keep at least 1"):
        builds.gc(root, keep=0)


def test_save_and_restore_cache_entry(tmp_path):
    root, src, dst = str(tmp_path / "out"), tmp_path / "src", tmp_path / "dst"
    (src / "a").mkdir(parents=True)
    (src / "a" / "t.parquet").write_bytes(b"table")
    assert builds.restore_entry(root, "stage", "k", str(dst)) is None
    assert builds.save_entry(root, "stage", "k", str(src), ["a/t.parquet"]) == "stage/k"
    assert builds.restore_entry(root, "stage", "k", str(dst)) == "stage/k"
    assert (dst / "a" / "t.parquet").read_bytes() == b"table"


def _race(root: str, n: int) -> list[builds.Lease | Exception]:
    barrier = threading.Barrier(n)
    results: list[builds.Lease | Exception] = [None] * n  # type: ignore[list-item]

    def take(k: int) -> None:
        barrier.wait()
        try:
            results[k] = builds.acquire_lease(root, f"run-{k}", ttl_s=60)
        except builds.LeaseHeld as exc:
            results[k] = exc

    threads = [threading.Thread(target=take, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("store", ["local", "s3"])
def test_only_one_of_many_racing_runs_gets_the_lease(store, tmp_path, request):
    if store == "s3":
        server = request.getfixturevalue("s3_server")
        root = f"s3://{server.bucket}/{uuid.uuid4().hex}/out"
    else:
        root = str(tmp_path / "out")
    for round_ in range(5):
        results = _race(f"{root}{round_}", 6)
        winners = [r for r in results if isinstance(r, builds.Lease)]
        losers = [r for r in results if isinstance(r, builds.LeaseHeld)]
        assert len(winners) == 1 and len(losers) == 5, f"round {round_}: {results}"
    assert "another rebuild holds" in str(losers[0]) and "--wait" in str(losers[0])
    lease = winners[0]
    lease.renew()
    lease.release()
    nxt = builds.acquire_lease(lease.root, "next", ttl_s=60)
    assert nxt.number == lease.number + 1
    with pytest.raises(builds.LeaseHeld, match="taken over"):
        lease.check()


def test_an_expired_lease_is_taken_over_and_a_waiter_gets_a_released_one(tmp_path):
    root = str(tmp_path / "out")
    stale = builds.acquire_lease(root, "crashed", ttl_s=0.2)
    time.sleep(0.3)
    fresh = builds.acquire_lease(root, "next", ttl_s=60)
    assert fresh.number == stale.number + 1
    with pytest.raises(builds.LeaseHeld):
        stale.renew()
    threading.Timer(0.5, fresh.release).start()
    waited = builds.acquire_lease(root, "waiter", ttl_s=60, wait_s=10, poll_s=0.1)
    assert waited.number == fresh.number + 1


def test_a_lease_whose_process_on_this_machine_was_killed_is_taken_over_at_once(tmp_path, caplog):
    root = str(tmp_path / "out")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from salient import builds; builds.acquire_lease(sys.argv[1], 'killed', ttl_s=600); "
         "print('held', flush=True); time.sleep(120)", root],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(builds.LeaseHeld, match=r"killed on .* \(pid \d+\)"):  # alive: it holds the root
            builds.acquire_lease(root, "next", ttl_s=60)
    finally:
        holder.kill()  # SIGKILL: no release
        holder.wait()
    with caplog.at_level("WARNING", logger="salient.builds"):
        lease = builds.acquire_lease(root, "next", ttl_s=60)
    assert lease.number == 2 and f"pid {holder.pid}" in caplog.text and "has ended" in caplog.text


def test_a_lease_of_a_process_on_another_machine_waits_for_its_expiry(tmp_path):
    root = str(tmp_path / "out")
    lease = builds.acquire_lease(root, "elsewhere", ttl_s=600)
    body = storage.read_json(lease.uri())
    # the same pid and start time, but another machine (or this one before a reboot)
    for other in ({"host": "another-host"}, {"boot_id": "0" * 32}):
        storage.write_bytes_atomic(lease.uri(), json.dumps({**body, "pid": 2**22 + 1, **other}).encode())
        with pytest.raises(builds.LeaseHeld, match="elsewhere"):
            builds.acquire_lease(root, "next", ttl_s=60)
    # on this machine, a pid that no longer exists
    storage.write_bytes_atomic(lease.uri(), json.dumps({**body, "pid": 2**22 + 1}).encode())
    assert builds.acquire_lease(root, "next", ttl_s=60).number == lease.number + 1
