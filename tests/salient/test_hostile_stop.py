"""A ``salient run`` stopped with SIGTERM (a pod being stopped) ends in order: exit code 143 and one
line, its Ray and other child processes gone, the output's lease free for the next run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

from salient import builds, config
from salient.cli import EXIT_SIGTERM, STOPPED
from tests.helpers import tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _descendants(pid: int) -> dict[int, str]:
    """Every live process under ``pid`` (its children, theirs, ...), with its start time."""
    parent: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)], started[int(entry)] = int(fields[1]), fields[19]
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = started[child]
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


def test_sigterm_stops_a_run_in_order(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    cfg = tiny_pipeline(tmp_path)
    path = tmp_path / "salient.yaml"
    path.write_text(config.to_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": ROOT, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "salient.cli", "run", str(path)], cwd=ROOT, env=env,
            stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        # stopped mid-build: once an activation shard is committed, while Ray's workers run
        while not glob.glob(f"{cfg.output}/builds/*/activations/part-*.json") or not any(
            _cmdline(p).startswith("ray::") for p in _descendants(proc.pid)
        ):
            assert proc.poll() is None, (out.read_text(), err.read_text())
            assert time.monotonic() < deadline, "no stage started"
            time.sleep(0.1)
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        stderr = err.read_text()
        assert code == EXIT_SIGTERM, stderr
        assert stderr.strip().splitlines()[-1] == STOPPED
        assert stderr.count(STOPPED) == 1
        for word in ("Traceback", "SIGABRT", "Aborted", "*** "):
            assert word not in stderr + out.read_text(), word
        deadline = time.monotonic() + 30
        while left := [p for p, t in children.items() if _alive(p, t)]:
            assert time.monotonic() < deadline, f"left running: {left}"
            time.sleep(0.5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    kept = glob.glob(f"{cfg.output}/builds/*/activations/part-*.json")
    assert kept, "the shards committed before the stop stay"
    _, lease = builds._newest_lease(str(cfg.output))
    assert lease is not None and lease["released"] is True, lease
    builds.acquire_lease(str(cfg.output), "the next run", wait_s=0).release()
