"""Transient store errors are retried a bounded number of times, other errors never; a failed write
leaves no partial object and no commit marker without its table. The store is an in-memory
filesystem under the test protocol ``flaky://`` that fails the calls it is told to."""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable

import aiohttp
import fsspec
import pyarrow as pa
import pytest
from botocore.exceptions import EndpointConnectionError
from fsspec.implementations.memory import MemoryFileSystem

from salient import activations, storage
from salient import plan as planmod
from salient.stage import committed_result, local_run
from salient.stages.activations import Activations

Fault = Callable[[str], BaseException | None]
METHODS = ("pipe_file", "cat_file", "exists", "find", "rm", "cp_file", "open")


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory store whose calls fail as ``faults`` says (method -> path -> error or None).

    A fault of ``after`` carries out the call, then raises: the store did the work, the answer was lost."""

    protocol = "flaky"
    store: dict = {}
    pseudo_dirs = [""]
    faults: dict[str, Fault] = {}
    after: dict[str, Fault] = {}
    calls: Counter = Counter()

    def _call(self, method: str, path: str, do: Callable[[], object]) -> object:
        self.calls[method] += 1
        if (fault := self.faults.get(method)) and (exc := fault(path)):
            raise exc
        result = do()
        if (fault := self.after.get(method)) and (exc := fault(path)):
            raise exc
        return result

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self._call("cat_file", path, lambda: super(FlakyFileSystem, self).cat_file(path, start, end, **kwargs))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        return self._call("pipe_file", path, lambda: super(FlakyFileSystem, self).pipe_file(path, value, mode, **kwargs))

    def exists(self, path, **kwargs):
        return self._call("exists", path, lambda: super(FlakyFileSystem, self).exists(path, **kwargs))

    def find(self, path, *args, **kwargs):
        return self._call("find", path, lambda: super(FlakyFileSystem, self).find(path, *args, **kwargs))

    def rm(self, path, recursive=False, maxdepth=None):
        return self._call("rm", path, lambda: super(FlakyFileSystem, self).rm(path, recursive, maxdepth))

    def cp_file(self, path1, path2, **kwargs):
        return self._call("cp_file", path1, lambda: super(FlakyFileSystem, self).cp_file(path1, path2, **kwargs))

    def _open(self, path, mode="rb", *args, **kwargs):
        if "r" in mode:
            return self._call("open", path, lambda: super(FlakyFileSystem, self)._open(path, mode, *args, **kwargs))
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def first(n: int, exc: BaseException) -> Fault:
    """Fail the first ``n`` calls with ``exc``."""
    left = [n]

    def fault(path: str) -> BaseException | None:
        left[0] -= 1
        return exc if left[0] >= 0 else None

    return fault


def on(suffix: str, exc: BaseException) -> Fault:
    """Fail every call on a path ending with ``suffix``."""
    return lambda path: exc if path.endswith(suffix) else None


TRANSIENT = [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    TimeoutError("read timed out"),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket/key"),
    aiohttp.ServerDisconnectedError(),
    OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs's 503 SlowDown
    OSError(errno.EREMOTEIO, "We encountered an internal error."),  # s3fs's 500 InternalError
]
PERMANENT = [
    (OSError, errno.ENOSPC, "No space left on device"),
    (PermissionError, errno.EACCES, "Access Denied"),
    (FileNotFoundError, errno.ENOENT, "No such key"),
    (OSError, errno.EINVAL, "InvalidArgument"),
]


@pytest.fixture
def flaky(monkeypatch):
    """A fresh ``flaky://`` store and no waiting between retries."""
    FlakyFileSystem.store.clear()
    FlakyFileSystem.pseudo_dirs[:] = [""]
    monkeypatch.setattr(FlakyFileSystem, "faults", {})
    monkeypatch.setattr(FlakyFileSystem, "after", {})
    monkeypatch.setattr(FlakyFileSystem, "calls", Counter())
    pauses: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", pauses.append)
    return FlakyFileSystem, pauses


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__ + str(getattr(e, "errno", "") or ""))
def test_each_transient_error_is_retried_until_the_store_answers(flaky, exc):
    fs, pauses = flaky
    table = pa.table({"x": [1, 2, 3]})
    for method in METHODS:
        fs.faults[method] = first(2, exc)
    storage.write_parquet("flaky://b/t.parquet", table, "fp")
    for method in ("cat_file", "exists", "find", "cp_file", "open"):
        fs.faults[method] = first(2, exc)
    assert storage.read_parquet("flaky://b/t.parquet").equals(table)
    assert storage.exists("flaky://b/t.parquet")
    assert storage.list_files("flaky://b") == ["t.parquet"]
    storage.copy_file("flaky://b/t.parquet", "flaky://b/u.parquet")
    assert storage.sha256("flaky://b/u.parquet") == storage.sha256("flaky://b/t.parquet")
    for method in ("exists", "rm"):
        fs.faults[method] = first(2, exc)
    storage.remove("flaky://b/u.parquet")
    assert storage.list_files("flaky://b") == ["t.parquet"]
    assert all(fs.calls[m] >= 3 for m in METHODS), f"each store method failed twice, then answered: {fs.calls}"
    assert len(pauses) >= 2 * len(METHODS)
    assert all(storage.RETRY_BASE_S / 2 <= p <= 2 * storage.RETRY_BASE_S for p in pauses), "the first two pauses of a retry are short"


def test_retries_are_bounded(flaky):
    fs, pauses = flaky
    fs.faults["cat_file"] = lambda path: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    storage.write_bytes_atomic("flaky://b/x", b"x")
    with pytest.raises(ConnectionResetError):
        storage.read_bytes("flaky://b/x")
    assert fs.calls["cat_file"] == storage.RETRY_ATTEMPTS
    assert len(pauses) == storage.RETRY_ATTEMPTS - 1
    ceilings = [min(storage.RETRY_MAX_S, storage.RETRY_BASE_S * 2**k) for k in range(storage.RETRY_ATTEMPTS - 1)]
    assert all(c / 2 <= p <= c for p, c in zip(pauses, ceilings)), (pauses, ceilings)
    assert sum(pauses) <= 16.0, "about 15 s of pauses at most, on top of the client's own retries"


@pytest.mark.parametrize("kind, code, message", PERMANENT, ids=lambda v: getattr(v, "__name__", None) or str(v)[:12])
def test_other_errors_are_raised_at_once_and_a_failed_write_leaves_nothing(flaky, kind, code, message):
    fs, pauses = flaky
    exc = kind(code, message)
    fs.faults["pipe_file"] = lambda path: exc
    with pytest.raises(kind) as raised:
        storage.write_parquet("flaky://b/t.parquet", pa.table({"x": [1]}), "fp")
    assert raised.value is exc and fs.calls["pipe_file"] == 1 and pauses == []
    assert exc.__notes__ == ["while trying to write flaky://b/t.parquet"], "the error says what it was doing"
    assert storage.list_files("flaky://b") == [] and not storage.exists("flaky://b/t.parquet")


def test_a_local_write_that_fails_midway_leaves_nothing_visible(tmp_path, monkeypatch):
    target = tmp_path / "t.parquet"
    storage.write_parquet(str(target), pa.table({"x": [1]}), "old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the data went into the temporary file; flushing it fails
    with pytest.raises(OSError, match="No space left"):
        storage.write_parquet(str(target), pa.table({"x": [2, 3]}), "new")
    assert os.listdir(tmp_path) == ["t.parquet"], "no temporary file left behind"
    assert storage.read_parquet(str(target)).column("x").to_pylist() == [1], "the previous object, whole"


def test_a_create_whose_answer_was_lost_is_still_won(flaky):
    fs, _ = flaky
    fs.after["pipe_file"] = first(1, ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert storage.create_exclusive("flaky://b/lease/0000000001.json", b"mine")
    assert fs.calls["pipe_file"] == 2 and storage.read_bytes("flaky://b/lease/0000000001.json") == b"mine"
    assert not storage.create_exclusive("flaky://b/lease/0000000001.json", b"another run's")


def test_no_commit_marker_without_its_table(flaky, activation_world):
    fs, _ = flaky
    cfg, planned = activation_world
    cfg.output = "flaky://out"
    run = local_run(cfg)
    out = run.build
    planmod.write_plan(cfg.dataset.root, out, cfg.compute.shard_size)
    item = Activations().shards(run)[0]
    task = item.payload
    runner = activations.ActivationRunner(cfg.model, cfg.preprocess, cfg.compute, threads=1)
    table, marker = activations.table_uri(out, 0), activations.stats_uri(out, 0)

    fs.faults["pipe_file"] = on(".parquet", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        runner(task)
    assert not storage.exists(table) and not storage.exists(marker)

    fs.faults["pipe_file"] = on(".json", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        runner(task)
    assert storage.exists(table) and not storage.exists(marker)
    assert committed_result(run, item) is None, "a table without its marker is not committed"

    fs.faults["pipe_file"] = first(2, OSError(errno.EBUSY, "Please reduce your request rate."))
    stats = runner(task)
    assert committed_result(run, item) == stats
    rows = storage.read_parquet(table).column("relpath").to_pylist()
    assert rows == [r for r in task.shard.relpaths if r not in {f["relpath"] for f in stats["failures"]}]
    assert len(rows) == stats["images"] and stats["images"] + stats["failed"] == len(task.shard.relpaths)
