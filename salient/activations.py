"""The activation stage: penultimate features and the top-1 prediction of every planned image.

A shard writes ``activations/part-NNNNN.parquet`` (the table only) and then
``activations/part-NNNNN.json`` (its stats and failure list). The JSON is the commit marker: a shard
is done when its JSON exists and names the shard's fingerprint (model weights, preprocessing, this
stage's code version, and the shard's files with their sizes and ETags or modification times).

A shard's cache key is its content key (the stage's key and the shard's files, without its number
or image ids), so a later build with the same files in a shard copies the result instead of
computing it, with this build's ids (:func:`restore`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from salient import storage, tables
from salient import plan as planmod
from salient.config import ComputeConfig, ModelConfig, PreprocessConfig
from salient.inference import Inference
from salient.stream import HostCopies, ImageStream, decode_threads

CODE_VERSION = "activations-3"
# The stored feature types (``activations.dtype``), as Arrow types.
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
DIRNAME = tables.ACTIVATIONS_DIR  # kept for callers outside salient/


def table_uri(build: str, shard: int) -> str:
    return storage.join(build, tables.activation_shard(shard))


def stats_uri(build: str, shard: int) -> str:
    return storage.join(build, tables.activation_marker(shard))


def shard_fingerprint(stage: str, shard: planmod.Shard) -> str:
    return storage.fingerprint(stage, shard.index, shard.relpaths, shard.sizes, shard.versions, shard.image_ids, shard.labels)


def content_key(stage: str, shard: planmod.Shard) -> str:
    """The cache key of a shard's result: what its features depend on (not its number or ids)."""
    return storage.fingerprint(stage, shard.relpaths, shard.sizes, shard.versions)


def output_schema(width: int, dtype: str = "float32") -> pa.Schema:
    """The schema of a shard's table: ``features`` holds ``width`` values of ``dtype`` (a key of :data:`DTYPES`)."""
    return pa.schema(
        [
            ("relpath", pa.string()),
            ("image_id", pa.int64()),
            ("label", pa.int32()),
            ("pred", pa.int32()),
            ("features", pa.list_(DTYPES[dtype], width)),
            ("orientation", pa.int8()),  # EXIF orientation, not applied: 1..8, 1 when absent, 0 when invalid
        ]
    )


@dataclass
class ShardTask:
    """Everything a worker needs to compute and write one shard: ``root`` is the dataset root,
    ``build`` the build directory."""

    shard: planmod.Shard
    root: str
    build: str
    fingerprint: str
    stage_fingerprint: str

    @property
    def cache_key(self) -> str:
        return content_key(self.stage_fingerprint, self.shard)


@dataclass
class ActivationRunner:
    """Loads the model once, then computes shards: a shard's images stream in (read and decoded
    ahead, also while the worker's other shard holds the device), the model runs them in batches,
    and the shard's table and stats are written after the device is free for the next shard.
    ``dtype`` is the stored feature type (``activations.dtype``)."""

    model: ModelConfig
    preprocess: PreprocessConfig
    compute: ComputeConfig
    threads: int | None = None
    device: str | None = None
    dtype: str = "float32"
    inference: Inference = field(init=False)

    def __post_init__(self) -> None:
        m = self.model
        self.inference = Inference.load(m.checkpoint, m.arch, m.format, self.compute, self.threads, self.device, need_discovery=True)
        self.device = self.inference.device
        self.width = self.inference.net.feature_dim
        self.decode_threads = decode_threads(self.compute, self.threads)
        self.stream = ImageStream(None, self.preprocess, self.device, self.compute.batch_size, self.decode_threads)

    def __call__(self, task: ShardTask, on_batch: Callable[[int], None] | None = None) -> dict:
        """Compute and commit one shard; returns its stats."""
        started = time.time()
        t_start = time.perf_counter()
        shard = task.shard
        feed = self.stream.open(task.shard.relpaths, root=task.root)
        copies = HostCopies(torch.device(self.device))
        positions: list[int] = []
        orientations: list[int] = []
        feats: list[torch.Tensor] = []
        preds: list[torch.Tensor] = []
        failures: list[tuple[int, str]] = []
        infer = 0.0
        with self.inference.lock:
            t_device = time.perf_counter()
            for batch in feed:
                failures.extend(batch.failures)
                if not batch.positions:
                    continue
                t0 = time.perf_counter()
                out = self.inference(batch.pixels)
                feats.append(copies.add(out.features.float()))
                preds.append(copies.add(out.logits.argmax(dim=1).to(torch.int32)))
                infer += time.perf_counter() - t0
                positions.extend(batch.positions)
                orientations.extend(batch.orientations)
                if on_batch is not None:
                    on_batch(len(batch.positions))
            t0 = time.perf_counter()
            copies.wait()
            infer += time.perf_counter() - t0
            queued = t_device - t_start

        t0 = time.perf_counter()
        kind = DTYPES[self.dtype]
        features = torch.cat(feats).numpy() if feats else np.zeros((0, self.width), np.float32)
        table = pa.table(
            {
                "relpath": pa.array([shard.relpaths[i] for i in positions], pa.string()),
                "image_id": pa.array([shard.image_ids[i] for i in positions], pa.int64()),
                "label": pa.array([shard.labels[i] for i in positions], pa.int32()),
                "pred": pa.array(torch.cat(preds).numpy() if preds else np.zeros(0, np.int32), pa.int32()),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1).astype(kind.to_pandas_dtype()), kind), self.width),
                "orientation": pa.array(orientations, pa.int8()),
            },
            schema=output_schema(self.width, self.dtype),
        )
        storage.write_parquet(table_uri(task.build, shard.index), table, task.stage_fingerprint)
        write = time.perf_counter() - t0
        total = time.perf_counter() - t_start
        feed_stats = feed.stats
        stats = {
            "shard": shard.index,
            "fingerprint": task.fingerprint,
            "planned": len(shard),
            "images": len(positions),
            "failed": len(failures),
            "failures": [{"relpath": shard.relpaths[p], "reason": reason} for p, reason in sorted(failures)],
            "first_image_id": shard.image_ids[0] if len(shard) else None,
            # read and decode add up over threads and overlap the rest; wait is the device idle for
            # want of pixels; queued the time the worker's other shard held the device.
            "seconds": {
                "read": round(feed_stats.read, 4),
                "decode": round(feed_stats.decode, 4),
                "wait": round(feed_stats.wait, 4),
                "infer": round(infer, 4),
                "write": round(write, 4),
                "queued": round(queued, 4),
                "total": round(total, 4),
            },
            "images_per_second": round(len(positions) / (total - queued), 3) if total > queued else None,
            "decoder": self.preprocess.decoder,
            "decoder_fallbacks": feed_stats.fallbacks,
            "started": started,
            "finished": time.time(),
            "worker": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "device": self.device,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "torch_threads": torch.get_num_threads(),
                "decode_threads": self.decode_threads,
                "precision": self.compute.precision,
                "compile": self.compute.compile,
                "batch_size": self.compute.batch_size,
            },
        }
        storage.write_json(stats_uri(task.build, shard.index), stats)
        return stats


def restore(task: ShardTask, src: str, cached: dict) -> dict:
    """Commit ``task``'s shard in its build from the table at ``src`` (a kept result of the same
    content, with ``cached`` its stats); returns its stats.

    The table is copied as it is when its ids and labels are this plan's, else rewritten with them.
    """
    shard = task.shard
    dst = table_uri(task.build, shard.index)
    keys = storage.read_parquet(src, ["relpath", "image_id", "label"]).to_pydict()
    ids = dict(zip(shard.relpaths, shard.image_ids))
    labels = dict(zip(shard.relpaths, shard.labels))
    if keys["image_id"] == [ids[r] for r in keys["relpath"]] and keys["label"] == [labels[r] for r in keys["relpath"]]:
        storage.copy_file(src, dst)
    else:
        table = storage.read_parquet(src)
        for name, values, kind in (("image_id", ids, pa.int64()), ("label", labels, pa.int32())):
            column = pa.array([values[r] for r in keys["relpath"]], kind)
            table = table.set_column(table.schema.get_field_index(name), name, column)
        storage.write_parquet(dst, table, task.stage_fingerprint)
    stats = {
        **cached, "shard": shard.index, "fingerprint": task.fingerprint,
        "first_image_id": shard.image_ids[0] if len(shard) else None,
    }
    storage.write_json(stats_uri(task.build, shard.index), stats)
    return stats


def all_stats(build: str) -> list[dict]:
    """The stats of every committed shard of the build ``build`` (whatever their inputs), by shard."""
    fs, path = storage.url_to_fs(storage.join(build, tables.ACTIVATIONS_DIR))
    if not fs.isdir(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json") and "/part-" in p)
    return [storage.read_json(storage.join(build, tables.ACTIVATIONS_DIR, storage.basename(p))) for p in names]


def summarize(stats: list[dict], build: str) -> dict:
    """Totals over shard stats, and where each shard's failures are listed."""
    stats = sorted(stats, key=lambda s: s["shard"])
    seconds = sum(s["seconds"]["total"] for s in stats)
    return {
        "shards": len(stats),
        "planned": sum(s["planned"] for s in stats),
        "images": sum(s["images"] for s in stats),
        "failed": sum(s["failed"] for s in stats),
        "failure_lists": [stats_uri(build, s["shard"]) for s in stats if s["failed"]],
        "worker_seconds": round(seconds, 3),
        "images_per_worker_second": round(sum(s["images"] for s in stats) / seconds, 3) if seconds else None,
    }
