"""Permission denied on the output mid-build: `salient run` stops with one clear line (what failed,
what to do) and no traceback, `latest` stays on the last published build, and once the output is
writable again the next run finishes the same build with the clean build's tables."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from salient import builds, masks
from tests.faults import assert_same_tables, build_tables, fault_config, spawn_run, wait_run, write_config


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` refuses every change (new, removed or renamed entries) inside the block.

    Root ignores permission bits, so as root the directory is made immutable instead."""
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        done = chattr and subprocess.run([chattr, "+i", str(directory)], capture_output=True).returncode == 0
        if not done:
            pytest.skip("running as root where `chattr +i` is not available: no way to make a directory read-only")
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", str(directory)], check=True)
    else:
        mode = directory.stat().st_mode
        directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield
        finally:
            directory.chmod(mode)


def _run(path: str, log: Path) -> tuple[int, str]:
    proc = spawn_run(path, str(log))
    code = wait_run(proc, timeout_s=600)
    return code, log.read_text()


@pytest.mark.heavy
def test_permission_denied_mid_build_is_one_clear_line_and_latest_stays(reference, tmp_path):
    # the clean build's output root, with everything it computed in its cache
    root = tmp_path / "out"
    shutil.copytree(reference.root, root)
    published = builds.read_pointer(str(root), "latest")
    cfg = fault_config(reference.world, reference.checkpoint, str(root))
    path = write_config(cfg, str(tmp_path / "salient.yaml"))

    # the next build's mask folder turns read-only: the stages before it go through, generalize cannot write
    build_id = builds.new_build_id()
    builds.write_pointer(str(root), "current", build_id)
    blocked = root / "builds" / build_id / masks.DIRNAME
    blocked.mkdir(parents=True)
    (blocked / "placed-by-the-test").write_bytes(b"")
    with read_only(blocked):
        code, out = _run(path, tmp_path / "denied.log")

    assert code != 0, out[-4000:]
    lines = out.strip().splitlines()
    assert "Traceback" not in out, out[-6000:]
    last = lines[-1]
    assert last.startswith("salient: error: ") and str(blocked) in last, last
    assert "ermission denied" in last or "ot permitted" in last, last
    assert "run again" in last, "it says what to do"
    assert builds.read_pointer(str(root), "latest") == published
    assert builds.read_pointer(str(root), "current") == build_id and not builds.is_complete(str(root), build_id)

    # writable again: the next run resumes that build and publishes it, with nothing lost or doubled
    code, out = _run(path, tmp_path / "resumed.log")
    assert code == 0, out[-4000:]
    assert builds.read_pointer(str(root), "latest") == build_id
    assert_same_tables(build_tables(str(root), builds.resolve(str(root))), reference.tables)
