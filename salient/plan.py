"""Planning: list an ImageFolder root in ImageFolder order, assign ids and labels, cut shards.

Order: sorted class folders (the label is the folder's position), then sorted file names; only
files directly inside a class folder with extension ``.jpeg .jpg .png`` (any case) are taken.
Everything else found there (other files, nested folders, files beside the class folders, names
that could not be used as a path or are not UTF-8, entries that are no regular file) is listed as
skipped, with a reason, in the plan's metadata.
``image_id`` is the position in this listing. A shard is a run of at most ``shard_size`` images of
one class, so images added to one class change only that class's shards.
"""

from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from salient import storage, tables
from salient.config import IMAGE_EXTENSIONS
from salient.errors import InputError

PLAN_TABLE = tables.PLAN.path  # kept for callers outside salient/

PLAN_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("image_id", pa.int64()),
        ("label", pa.int32()),
        ("wnid", pa.string()),
        ("bytes", pa.int64()),
        ("version", pa.string()),  # the store's ETag, else the modification time: a change of content
        ("shard", pa.int32()),
    ]
)


# Skipped entries kept in the plan's metadata; beyond this many only their number is.
MAX_SKIPPED_LISTED = 1000


@dataclass(frozen=True)
class Listing:
    """An ImageFolder listing: class folder names in label order, one row per image, and the
    entries that are not taken, as (relpath, reason) sorted by relpath."""

    classes: list[str]
    table: pa.Table  # PLAN_SCHEMA without `shard`
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _version(entry: dict) -> str:
    """What changes when an object's content does: its ETag on object stores, else its mtime."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if entry.get(key) is not None:
            return str(entry[key])
    return ""


NOT_UTF8 = "the file name is not valid UTF-8; rename it"


def _is_utf8(name: str) -> bool:
    """Whether ``name`` can be stored as text: a local name that is not UTF-8 holds lone surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """``name`` as UTF-8 text, each byte that is not UTF-8 as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _list_class(fs, folder: str, wnid: str) -> tuple[list[tuple[str, int, str]], list[tuple[str, str]]]:
    files: list[tuple[str, int, str]] = []
    skipped: list[tuple[str, str]] = []
    for e in storage.ls_detail(fs, folder):
        name = posixpath.basename(e["name"].rstrip("/"))
        rel = f"{wnid}/{name}"
        if not _is_utf8(name):
            skipped.append((_shown(rel), NOT_UTF8))
        elif e["type"] == "directory":
            skipped.append((f"{rel}/", "a folder inside a class folder: images must sit directly in <root>/<wnid>/"))
        elif e["type"] != "file":
            skipped.append((rel, "not a regular file (a link, a pipe, a socket or a device): images must be regular files"))
        elif not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append((rel, f"not an image file name: the extension is not one of {' '.join(IMAGE_EXTENSIONS)}"))
        else:
            try:
                storage.safe_relpath(rel)
            except storage.UnsafePathError as exc:
                skipped.append((rel, f"{exc}; rename the file"))
            else:
                files.append((name, int(e.get("size") or 0), _version(e)))
    return sorted(files), skipped


def list_images(root: str, threads: int = 32) -> Listing:
    """List ``root`` in ImageFolder order, class folders in parallel on object stores."""
    fs, path = storage.url_to_fs(root)
    fs.invalidate_cache()
    if not fs.isdir(path):
        raise InputError(f"dataset root {root!r} does not exist or is not a directory")
    entries = storage.ls_detail(fs, path)
    folders: list[str] = []
    skipped: list[tuple[str, str]] = []
    for e in entries:
        name = posixpath.basename(e["name"].rstrip("/"))
        if not _is_utf8(name):
            skipped.append((_shown(name) + ("/" if e["type"] == "directory" else ""), NOT_UTF8))
        elif e["type"] == "directory":
            folders.append(name)
        else:
            skipped.append((name, "a file beside the class folders: images must sit in <root>/<wnid>/"))
    folders.sort()
    if not folders:
        raise InputError(f"dataset root {root!r} has no class folders; expected <root>/<wnid>/<image>")
    for wnid in folders:
        try:
            storage.safe_relpath(wnid)
        except storage.UnsafePathError as exc:
            raise storage.UnsafePathError(f"class folder {wnid!r} in dataset root {root!r}: {exc}; rename the folder") from None
    # A local disk is listed faster by one thread: the work is Python's, under one lock.
    threads = 1 if isinstance(fs, LocalFileSystem) else threads
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(folders)))) as pool:
        per_class = list(pool.map(lambda w: _list_class(fs, posixpath.join(path, w), w), folders))
    relpaths, labels, wnids, sizes, versions = [], [], [], [], []
    for label, (wnid, (files, not_taken)) in enumerate(zip(folders, per_class)):
        skipped.extend(not_taken)
        for name, size, version in files:
            relpaths.append(f"{wnid}/{name}")
            labels.append(label)
            wnids.append(wnid)
            sizes.append(size)
            versions.append(version)
    table = pa.table(
        {
            "relpath": pa.array(relpaths, pa.string()),
            "image_id": pa.array(range(len(relpaths)), pa.int64()),
            "label": pa.array(labels, pa.int32()),
            "wnid": pa.array(wnids, pa.string()),
            "bytes": pa.array(sizes, pa.int64()),
            "version": pa.array(versions, pa.string()),
        }
    )
    return Listing(folders, table, sorted(skipped))


def cut_shards(listing: Listing, shard_size: int) -> pa.Table:
    """The listing with a ``shard`` column: each class's images cut into runs of ``shard_size``,
    numbered in listing order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    labels = listing.table.column("label").to_numpy()
    n = len(labels)
    class_start = np.r_[0, np.flatnonzero(np.diff(labels)) + 1] if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[class_start, n])
    chunk = (np.arange(n) - np.repeat(class_start, sizes)) // shard_size
    new = np.r_[True, (np.diff(labels) != 0) | (np.diff(chunk) != 0)] if n else np.zeros(0, bool)
    return listing.table.append_column("shard", pa.array(np.cumsum(new) - 1, pa.int32()))


@dataclass(frozen=True)
class Shard:
    """One shard's planned images, in image_id order."""

    index: int
    relpaths: list[str]
    image_ids: list[int]
    labels: list[int]
    sizes: list[int]
    versions: list[str] = field(default_factory=list)  # ETags or mtimes, when listed

    def __len__(self) -> int:
        return len(self.relpaths)


def shards_of(plan: pa.Table) -> list[Shard]:
    """The plan's shards in order."""
    cols = plan.select(["relpath", "image_id", "label", "bytes", "version", "shard"]).to_pydict()
    out: dict[int, Shard] = {}
    for rel, iid, label, size, version, shard in zip(*cols.values()):
        s = out.setdefault(shard, Shard(shard, [], [], [], [], []))
        s.relpaths.append(rel)
        s.image_ids.append(iid)
        s.labels.append(label)
        s.sizes.append(size)
        s.versions.append(version)
    return [out[k] for k in sorted(out)]


def plan_uri(build: str) -> str:
    return storage.join(build, tables.PLAN.path)


def write_plan(root: str, build: str, shard_size: int) -> dict:
    """List the dataset at ``root``, cut shards and write ``plan.parquet`` into the build directory
    ``build``; returns a small summary.

    The table's metadata keeps the class folders in label order (``salient.classes``, JSON) and
    the skipped entries (``salient.skipped``, JSON: their number and the first
    :data:`MAX_SKIPPED_LISTED` as ``{relpath, reason}``).
    """
    listing = list_images(root)
    table = cut_shards(listing, shard_size)
    if table.num_rows == 0:
        raise InputError(f"dataset.root = {root!r}: no images (.jpeg .jpg .png) in any class folder")
    fp = storage.fingerprint(table.column("relpath").to_pylist(), table.column("bytes").to_pylist(), table.column("version").to_pylist(), shard_size)
    skipped = {
        "count": len(listing.skipped),
        "entries": [{"relpath": r, "reason": why} for r, why in listing.skipped[:MAX_SKIPPED_LISTED]],
    }
    storage.write_parquet(
        plan_uri(build), table, fp,
        {"root": root, "shard_size": shard_size, "classes": json.dumps(listing.classes), "skipped": json.dumps(skipped)},
    )
    return {
        "uri": plan_uri(build),
        "images": table.num_rows,
        "classes": len(listing.classes),
        "shards": int(table.column("shard").to_numpy().max()) + 1,
        "bytes": int(table.column("bytes").to_numpy().sum()),
        "skipped": len(listing.skipped),
        "skipped_examples": [r for r, _ in listing.skipped[:5]],
    }


def read_plan(build: str, columns: list[str] | None = None) -> pa.Table:
    """The plan written by :func:`write_plan` into the build directory ``build``."""
    uri = plan_uri(build)
    if not storage.exists(uri):
        raise InputError(f"no plan at {uri}; run the activation stage first (salient activations CONFIG)")
    return storage.read_parquet(uri, columns=columns)


def plan_classes(build: str) -> list[str]:
    """The class folder names (wnids) of the plan, in label order."""
    return json.loads(storage.parquet_metadata(plan_uri(build))["classes"])


def plan_skipped(build: str) -> dict:
    """What the plan of the build ``build`` did not take: ``{"count": n, "entries": [{relpath, reason}, ...]}``."""
    return json.loads(storage.parquet_metadata(plan_uri(build)).get("skipped", '{"count": 0, "entries": []}'))
