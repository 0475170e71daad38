"""A ``salient run`` stopped with SIGTERM (a pod being stopped) ends in order: exit code 143 and one
line, its Ray and other child processes gone, the output's lease free for the next run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from salient import builds, config
from salient import cli, stopping
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


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_a_sigterm_while_ray_workers_run_stops_at_once(ray_session, capsys):
    """Waiting on Ray's workers, the stop is immediate, though Ray's ``wait`` turns the exception
    raised in the signal handler into ``SystemExit(1)``."""
    from tasks.ray_pool import ray_map

    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        with cli._sigterm_stops():
            timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
            timer.start()
            try:
                list(ray_map(_sleep, [(15,)]))
            finally:
                timer.cancel()
            raise AssertionError("the SIGTERM did not interrupt the wait")
    assert time.monotonic() - t0 < 10
    assert stop.value.code == EXIT_SIGTERM
    assert capsys.readouterr().err.strip() == STOPPED
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_elsewhere_is_noted_and_stops_the_run_at_the_next_check(capsys):
    """Outside a wait the handler raises nothing (no lock left held by an exception from nowhere):
    the run stops at its next check, between items."""
    reached = []
    with pytest.raises(SystemExit) as stop:
        with cli._sigterm_stops():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            reached.append("after the signal")
            stopping.check()
            reached.append("after the check")
    assert reached == ["after the signal"]
    assert stop.value.code == EXIT_SIGTERM
    assert capsys.readouterr().err.strip() == STOPPED


def test_a_block_that_no_sigterm_reached_ends_as_it_would(capsys):
    with pytest.raises(ValueError):
        with cli._sigterm_stops():
            raise ValueError("a bug")
    with cli._sigterm_stops():
        pass
    assert capsys.readouterr().err == ""


def test_ray_init_leaves_the_sigterm_handler_alone():
    """Ray's driver handler calls ``sys.exit`` wherever the main thread is; ``ray.init`` installs it
    through the function the pool's start-up turns off (checked here so that a Ray upgrade that
    moves it shows)."""
    import inspect

    import ray
    from tasks import ray_pool

    assert "ray._private.utils.set_sigterm_handler(sigterm_handler)" in inspect.getsource(ray.init)
    before = signal.getsignal(signal.SIGTERM)
    with ray_pool._sigterm_left_alone():
        ray._private.utils.set_sigterm_handler(lambda signum, frame: None)
    assert signal.getsignal(signal.SIGTERM) is before
