"""Planning: list an ImageFolder root in ImageFolder order, assign ids and labels, cut shards.

Order: sorted class folders (the label is the folder's position), then sorted file names; only
files directly inside a class folder with extension ``.jpeg .jpg .png`` (any case) are taken.
``image_id`` is the position in this listing; shards are consecutive runs of ``shard_size`` ids.
"""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from salient import storage
from salient.config import IMAGE_EXTENSIONS

PLAN_TABLE = "plan.parquet"

PLAN_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("image_id", pa.int64()),
        ("label", pa.int32()),
        ("wnid", pa.string()),
        ("bytes", pa.int64()),
        ("shard", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Listing:
    """An ImageFolder listing: class folder names in label order and one row per image."""

    classes: list[str]
    table: pa.Table  # PLAN_SCHEMA without `shard`


def _list_class(fs, folder: str) -> list[tuple[str, int]]:
    entries = fs.ls(folder, detail=True)
    files = [
        (posixpath.basename(e["name"].rstrip("/")), int(e.get("size") or 0))
        for e in entries
        if e["type"] == "file" and e["name"].lower().endswith(IMAGE_EXTENSIONS)
    ]
    return sorted(files)


def list_images(root: str, threads: int = 32) -> Listing:
    """List ``root`` in ImageFolder order, class folders in parallel."""
    fs, path = storage.url_to_fs(root)
    fs.invalidate_cache()
    if not fs.isdir(path):
        raise ValueError(f"dataset root {root!r} does not exist or is not a directory")
    folders = sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "directory"
    )
    if not folders:
        raise ValueError(f"dataset root {root!r} has no class folders; expected <root>/<wnid>/<image>")
    for wnid in folders:
        storage.safe_relpath(wnid)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(folders)))) as pool:
        per_class = list(pool.map(lambda w: _list_class(fs, posixpath.join(path, w)), folders))
    relpaths, labels, wnids, sizes = [], [], [], []
    for label, (wnid, files) in enumerate(zip(folders, per_class)):
        for name, size in files:
            relpaths.append(f"{wnid}/{name}")
            labels.append(label)
            wnids.append(wnid)
            sizes.append(size)
    table = pa.table(
        {
            "relpath": pa.array(relpaths, pa.string()),
            "image_id": pa.array(range(len(relpaths)), pa.int64()),
            "label": pa.array(labels, pa.int32()),
            "wnid": pa.array(wnids, pa.string()),
            "bytes": pa.array(sizes, pa.int64()),
        }
    )
    return Listing(folders, table)


def cut_shards(listing: Listing, shard_size: int) -> pa.Table:
    """The listing with a ``shard`` column: image_id // shard_size."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    ids = listing.table.column("image_id").to_numpy()
    return listing.table.append_column("shard", pa.array(ids // shard_size, pa.int32()))


@dataclass(frozen=True)
class Shard:
    """One shard's planned images, in image_id order."""

    index: int
    relpaths: list[str]
    image_ids: list[int]
    labels: list[int]
    sizes: list[int]

    def __len__(self) -> int:
        return len(self.relpaths)


def shards_of(plan: pa.Table) -> list[Shard]:
    """The plan's shards in order."""
    cols = plan.select(["relpath", "image_id", "label", "bytes", "shard"]).to_pydict()
    out: dict[int, Shard] = {}
    for rel, iid, label, size, shard in zip(cols["relpath"], cols["image_id"], cols["label"], cols["bytes"], cols["shard"]):
        s = out.setdefault(shard, Shard(shard, [], [], [], []))
        s.relpaths.append(rel)
        s.image_ids.append(iid)
        s.labels.append(label)
        s.sizes.append(size)
    return [out[k] for k in sorted(out)]


def plan_uri(out: str) -> str:
    return storage.join(out, PLAN_TABLE)


def write_plan(root: str, out: str, shard_size: int) -> dict:
    """List the dataset, cut shards and write ``plan.parquet``; returns a small summary.

    The table's metadata keeps the class folders in label order (``salient.classes``, JSON).
    """
    listing = list_images(root)
    table = cut_shards(listing, shard_size)
    if table.num_rows == 0:
        raise ValueError(f"dataset.root = {root!r}: no images (.jpeg .jpg .png) in any class folder")
    fp = storage.fingerprint(table.column("relpath").to_pylist(), table.column("bytes").to_pylist(), shard_size)
    storage.write_parquet(
        plan_uri(out), table, fp, {"root": root, "shard_size": shard_size, "classes": json.dumps(listing.classes)}
    )
    return {
        "uri": plan_uri(out),
        "images": table.num_rows,
        "classes": len(listing.classes),
        "shards": int(table.column("shard").to_numpy().max()) + 1,
        "bytes": int(table.column("bytes").to_numpy().sum()),
    }


def read_plan(out: str, columns: list[str] | None = None) -> pa.Table:
    """The plan written by :func:`write_plan` under ``out``."""
    uri = plan_uri(out)
    if not storage.exists(uri):
        raise ValueError(f"no plan at {uri}; run the activation stage first (salient activations CONFIG)")
    return storage.read_parquet(uri, columns=columns)


def plan_classes(out: str) -> list[str]:
    """The class folder names (wnids) of the plan, in label order."""
    return json.loads(storage.parquet_metadata(plan_uri(out))["classes"])
