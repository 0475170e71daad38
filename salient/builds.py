"""Versioned builds under an output root ``OUT`` (docs/design.md §3).

- ``OUT/builds/<build_id>/``: one build directory, every table once at its §3 path;
  ``manifest.json`` in it is written last and marks the build complete.
- ``OUT/current`` / ``OUT/latest``: ``{"build_id": ..., "path": "builds/<build_id>"}``. ``current``
  is the build single-stage commands read and write (created on first use); ``latest`` is the last
  complete, published build, moved only by ``salient run`` and ``salient publish``.
- ``OUT/cache/``: content-addressed results shared between builds.
- ``OUT/annotations/incoming/``: human answers, outside every build; clean-up never touches them.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from salient import stopping, storage, tables
from salient.errors import Busy, InputError

log = logging.getLogger(__name__)

BUILDS = "builds"
CACHE = "cache"
INCOMING = "annotations/incoming"
MANIFEST = tables.MANIFEST.path  # kept for callers outside salient/
LEASES = "lease"
# How long a hold on an output root lasts without renewal; holders renew every quarter of it.
LEASE_TTL_S = 600.0
POINTERS: tuple[str, ...] = ("current", "latest")

_BUILD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_build_id(build_id: str) -> str:
    """``build_id`` if it is a valid build id (letters, digits, ``.``, ``_``, ``-``), else ``InputError``."""
    if not isinstance(build_id, str) or not _BUILD_ID.match(build_id) or ".." in build_id:
        raise InputError(
            f"build id {build_id!r} is not valid: use 1-128 letters, digits, '.', '_' or '-' "
            "(see `salient builds OUT` for the builds there are)"
        )
    return build_id


def new_build_id(now: dt.datetime | None = None) -> str:
    """A fresh build id: the UTC time, sortable, and a random suffix (``20261128T153000Z-1a2b3c``)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def build_dir(root: str, build_id: str) -> str:
    """The directory of build ``build_id`` under the output root ``root``."""
    return storage.join(root, BUILDS, check_build_id(build_id))


def incoming(root: str) -> str:
    """Where human answers arrive: ``OUT/annotations/incoming``, outside every build."""
    return storage.join(root, INCOMING)


def cache(root: str, *parts: str) -> str:
    """A path under the content-addressed cache ``OUT/cache``."""
    return storage.join(root, CACHE, *(storage.safe_relpath(p) for p in parts))


def read_pointer(root: str, name: str) -> str | None:
    """The build id that pointer ``name`` (``current`` or ``latest``) names, or None when it is not there."""
    if name not in POINTERS:
        raise ValueError(f"pointer {name!r}: use one of {', '.join(POINTERS)}")
    uri = storage.join(root, name)
    if not storage.exists(uri):
        return None
    try:
        data = storage.read_json(uri)
        return check_build_id(str(data["build_id"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"pointer {uri!r} is damaged ({exc}); rewrite it with `salient publish OUT --build <id>` "
            "or remove it"
        ) from exc


def write_pointer(root: str, name: str, build_id: str) -> None:
    """Point ``name`` at ``build_id`` (one atomic write)."""
    if name not in POINTERS:
        raise ValueError(f"pointer {name!r}: use one of {', '.join(POINTERS)}")
    storage.write_json(storage.join(root, name), {"build_id": check_build_id(build_id), "path": f"{BUILDS}/{build_id}"})


def is_complete(root: str, build_id: str) -> bool:
    """True once the build's manifest (written last) exists."""
    return storage.exists(storage.join(build_dir(root, build_id), tables.MANIFEST.path))


def resolve(root: str, build_id: str | None = None, pointer: str = "latest") -> str:
    """The directory of ``build_id``, or of the build ``pointer`` names; ``InputError`` when there is none."""
    if build_id is None:
        build_id = read_pointer(root, pointer)
        if build_id is None:
            hint = "run `salient run CONFIG` to make and publish one" if pointer == "latest" else "run a stage first"
            raise InputError(f"{root!r} has no {pointer} build ({storage.join(root, pointer)} is missing): {hint}")
    path = build_dir(root, build_id)
    fs, p = storage.url_to_fs(path)
    if not fs.exists(p):
        raise InputError(f"build {build_id!r} does not exist under {root!r}; `salient builds {root}` lists the builds")
    return path


def current(root: str) -> str:
    """The directory of the ``current`` build, starting a new build (and the pointer) on first use."""
    build_id = read_pointer(root, "current")
    if build_id is None:
        build_id = new_build_id()
        write_pointer(root, "current", build_id)
    return build_dir(root, build_id)


@dataclass(frozen=True)
class Layout:
    """Where one build reads and writes: its directory, and the output root's shared places."""

    root: str
    build_id: str

    @property
    def build(self) -> str:
        return build_dir(self.root, self.build_id)

    @property
    def incoming(self) -> str:
        return incoming(self.root)

    def cache(self, *parts: str) -> str:
        return cache(self.root, *parts)


def open_current(root: str) -> Layout:
    """The layout of the ``current`` build for a single-stage command.

    A published build is never changed: when ``current`` is complete, a new build is started
    from a copy of its tables (cached results make the copy cheap) and ``current`` moves to it.
    """
    build_id = read_pointer(root, "current")
    if build_id is None or is_complete(root, build_id):
        new = new_build_id()
        if build_id is not None:
            storage.copy_tree(build_dir(root, build_id), build_dir(root, new), skip=(tables.MANIFEST.path,))
        write_pointer(root, "current", new)
        build_id = new
    return Layout(root, build_id)


def start_run(root: str) -> Layout:
    """The layout of a ``salient run``: the ``current`` build when it is unfinished (a run that was
    stopped resumes there), else a new build; ``current`` names it."""
    build_id = read_pointer(root, "current")
    if build_id is None or is_complete(root, build_id):
        build_id = new_build_id()
        write_pointer(root, "current", build_id)
    return Layout(root, build_id)


def cache_entries(layout: Layout) -> list[str]:
    """The cache entries (``<stage>/<key>``) a build used, as it recorded them."""
    uri = storage.join(layout.build, tables.CACHE_REFS)
    return sorted(storage.read_json(uri)) if storage.exists(uri) else []


def record_cache_use(build: str, entries: list[str]) -> None:
    """Add ``entries`` (``<stage>/<key>``) to the cache entries the build directory ``build`` uses."""
    uri = storage.join(build, tables.CACHE_REFS)
    known = set(storage.read_json(uri)) if storage.exists(uri) else set()
    if not set(entries) <= known:
        storage.write_json(uri, sorted(known | set(entries)))


def write_manifest(layout: Layout, facts: dict) -> dict:
    """Write the build's manifest (last of all its files): ``facts`` (inputs, fingerprints, counts,
    timings) with the build id, time, software versions and the build's tables."""
    written = [p for p in storage.list_files(layout.build) if p.endswith(".parquet") and not p.startswith(f"{tables.MASK_BLOCKS}/")]
    manifest = {
        "build_id": layout.build_id,
        "completed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software_versions(),
        "tables": written,
        "cache_entries": cache_entries(layout),
        **facts,
    }
    storage.write_json(storage.join(layout.build, tables.MANIFEST.path), manifest)
    return manifest


def software_versions() -> dict[str, str]:
    """Versions of Salient and the packages its results depend on."""
    out = {"python": platform.python_version()}
    for name in ("salient", "torch", "torchvision", "numpy", "pyarrow", "zarr", "ray", "prefect", "fsspec", "s3fs"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def publish(root: str, build_id: str) -> None:
    """Move ``latest`` to a complete build; ``InputError`` if it has no manifest."""
    if not is_complete(root, build_id):
        raise InputError(
            f"build {build_id!r} under {root!r} is not complete (no {tables.MANIFEST.path}); finish it with `salient run CONFIG`"
        )
    write_pointer(root, "latest", build_id)


def list_builds(root: str) -> list[dict]:
    """Every build under ``root``, oldest first: id, complete, latest/current, and its manifest's counts."""
    fs, path = storage.url_to_fs(storage.join(root, BUILDS))
    if not fs.exists(path):
        return []
    latest, current_id = read_pointer(root, "latest"), read_pointer(root, "current")
    out = []
    for entry in sorted(storage.basename(p) for p in fs.ls(path, detail=False)):
        if not _BUILD_ID.match(entry):
            continue
        manifest_uri = storage.join(root, BUILDS, entry, tables.MANIFEST.path)
        manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
        out.append({
            "build_id": entry,
            "complete": manifest is not None,
            "latest": entry == latest,
            "current": entry == current_id,
            "completed": manifest.get("completed") if manifest else None,
            "counts": manifest.get("counts", {}) if manifest else {},
        })
    return out


def gc(root: str, keep: int, dry_run: bool = False) -> dict:
    """Remove all but the newest ``keep`` complete builds (never ``latest`` or ``current``), every
    unfinished build older than the newest complete one (never ``current``), and the cache entries
    no remaining build uses. Human answers are never touched."""
    if keep < 1:
        raise InputError(f"--keep {keep}: keep at least 1 build (the latest)")
    builds = list_builds(root)
    complete = [b["build_id"] for b in builds if b["complete"]]
    kept = set(complete[-keep:]) | {b["build_id"] for b in builds if b["latest"] or b["current"]}
    newest_complete = complete[-1] if complete else ""
    removed = [
        b["build_id"] for b in builds
        if b["build_id"] not in kept and (b["complete"] or b["build_id"] < newest_complete)
    ]
    used: set[str] = set()
    for b in builds:
        if b["build_id"] not in removed:
            used |= set(cache_entries(Layout(root, b["build_id"])))
    stale = [e for e in _cache_entries_on_disk(root) if e not in used]
    if not dry_run:
        for build_id in removed:
            storage.remove(build_dir(root, build_id), recursive=True)
        for entry in stale:
            storage.remove(cache(root, entry), recursive=True)
            storage.remove(cache(root, entry) + ".json")
    return {"removed_builds": removed, "kept_builds": sorted(kept), "removed_cache_entries": len(stale)}


def _cache_entries_on_disk(root: str) -> list[str]:
    """Cache entries (``<stage>/<key>``, by their ``.json`` commit markers) under ``OUT/cache``."""
    return sorted({rel.removesuffix(".json") for rel in storage.list_files(storage.join(root, CACHE)) if rel.count("/") == 1 and rel.endswith(".json")})


def read_entry(root: str, stage: str, key: str) -> dict | None:
    """The commit marker of cache entry ``<stage>/<key>``, or None when it is not committed."""
    return read_entries(root, stage, [key])[0]


def read_entries(root: str, stage: str, keys: Sequence[str]) -> list[dict | None]:
    """The commit markers of cache entries ``<stage>/<key>`` for each of ``keys`` (read
    concurrently), None for one that is not committed."""
    found = storage.read_json_many([cache(root, stage, f"{key}.json") for key in keys])
    return [entry if isinstance(entry, dict) else None for entry in found]


def commit_entry(root: str, stage: str, key: str, meta: dict) -> None:
    """Commit cache entry ``<stage>/<key>`` (its files under ``cache/<stage>/<key>/`` are written first)."""
    storage.write_json(cache(root, stage, f"{key}.json"), meta)


class LeaseHeld(Busy):
    """Another live rebuild holds the output root."""


@dataclass
class Lease:
    """The right to build and publish under an output root, held until released or expired.

    Leases are numbered objects ``OUT/lease/<n>.json``, each created with an exclusive write (a
    conditional PUT on S3), so of two runs that race for the next number exactly one wins. The
    newest number is the lease; its holder renews the expiry in place, and a new run may take the
    next number once the newest is released or expired.
    """

    root: str
    owner: str
    number: int
    ttl_s: float

    def uri(self) -> str:
        return storage.join(self.root, LEASES, f"{self.number:010d}.json")

    def _body(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "number": self.number,
            "renewed": now, "expires": now + self.ttl_s, "released": released,
        }).encode()

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead; ``LeaseHeld`` if another run has taken the root since."""
        self.check()
        storage.write_bytes_atomic(self.uri(), self._body())

    def check(self) -> None:
        """``LeaseHeld`` unless this lease is still the newest."""
        newest, _ = _newest_lease(self.root)
        if newest != self.number:
            raise LeaseHeld(f"the lease on {self.root!r} was taken over by a later run (lease {newest}); this run stops without publishing")

    def release(self) -> None:
        storage.write_bytes_atomic(self.uri(), self._body(released=True))


def _newest_lease(root: str) -> tuple[int, dict | None]:
    fs, path = storage.url_to_fs(storage.join(root, LEASES))
    if not fs.exists(path):
        return 0, None
    numbers = [int(n.removesuffix(".json")) for n in (storage.basename(p) for p in fs.ls(path, detail=False)) if re.fullmatch(r"\d{10}\.json", n)]
    if not numbers:
        return 0, None
    newest = max(numbers)
    try:
        return newest, storage.read_json(storage.join(root, LEASES, f"{newest:010d}.json"))
    except (FileNotFoundError, ValueError):
        return newest, None


def _boot_id() -> str | None:
    """This boot of this machine (Linux), so that two machines with one hostname are told apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None if there is no such
    process (or no /proc). With the pid it names one process: pids are reused, start times not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22; the name before ")" may hold spaces


def _holder_gone(body: dict) -> bool:
    """Whether the lease's holder was a process on this machine, since this boot, that has ended."""
    boot, pid = _boot_id(), body.get("pid")
    if boot is None or body.get("boot_id") != boot or body.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return _process_start(pid) != body.get("pid_start")


def acquire_lease(root: str, owner: str, ttl_s: float = LEASE_TTL_S, wait_s: float = 0.0, poll_s: float = 2.0) -> Lease:
    """Take the output root's lease, waiting up to ``wait_s`` for a live holder; ``LeaseHeld`` otherwise."""
    deadline = time.monotonic() + wait_s
    while True:
        newest, body = _newest_lease(root)
        # An unreadable lease object cannot be renewed by anyone: it counts as expired.
        gone = body is not None and not body.get("released") and body.get("expires", 0) >= time.time() and _holder_gone(body)
        if gone:
            log.warning(
                "taking over the lease on %s of %s: its process (pid %s) on this machine has ended without releasing it",
                root, body.get("owner"), body.get("pid"),
            )
        if body is None or body.get("released") or body.get("expires", 0) < time.time() or gone:
            lease = Lease(root, owner, newest + 1, ttl_s)
            if storage.create_exclusive(lease.uri(), lease._body()):
                return lease
            continue  # another run took that number first: look at its lease
        if time.monotonic() >= deadline:
            until = dt.datetime.fromtimestamp(body["expires"], dt.timezone.utc).isoformat(timespec="seconds")
            raise LeaseHeld(
                f"another rebuild holds {root!r}: {body.get('owner')} on {body.get('host')} (pid {body.get('pid')}), "
                f"lease until {until} unless renewed. Wait for it to finish, or run again with --wait SECONDS"
            )
        with stopping.interruptible():
            time.sleep(poll_s)


def save_entry(root: str, stage: str, key: str, src: str, rels: list[str], meta: dict | None = None) -> str:
    """Keep the files ``rels`` (relative to ``src``) as cache entry ``<stage>/<key>``; returns ``<stage>/<key>``."""
    for rel in rels:
        storage.copy_file(storage.join(src, rel), cache(root, stage, key, rel))
    commit_entry(root, stage, key, {"files": rels, **(meta or {})})
    return f"{stage}/{key}"


def restore_entry(root: str, stage: str, key: str, dest: str, marker: dict | None = None) -> str | None:
    """Copy the files of committed cache entry ``<stage>/<key>`` under ``dest``; returns
    ``<stage>/<key>``, or None when there is no such entry. ``marker``: the entry's commit marker,
    when it was read already."""
    marker = marker or read_entry(root, stage, key)
    if marker is None:
        return None
    for rel in marker["files"]:
        storage.copy_file(cache(root, stage, key, rel), storage.join(dest, rel))
    return f"{stage}/{key}"


@contextmanager
def holding(root: str, owner: str, ttl_s: float = LEASE_TTL_S, wait_s: float = 0.0) -> Iterator[Lease]:
    """Hold the output root's lease while the block runs, renewing it in the background; released
    on exit. ``LeaseHeld`` when another run holds it (after ``wait_s``) or takes it over meanwhile."""
    lease = acquire_lease(root, owner, ttl_s, wait_s)
    stop = threading.Event()
    lost: list[LeaseHeld] = []

    def beat() -> None:
        while not stop.wait(ttl_s / 4):
            try:
                lease.renew()
            except LeaseHeld as exc:
                lost.append(exc)
                return
            except OSError:
                continue  # a transient store error: the next beat tries again, well within the expiry

    thread = threading.Thread(target=beat, name="salient-lease", daemon=True)
    thread.start()
    try:
        yield lease
        if lost:
            raise lost[0]
    finally:
        stop.set()
        thread.join()
        lease.release()
