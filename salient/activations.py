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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from salient import images, models, storage, tables
from salient import plan as planmod
from salient.config import ComputeConfig, ModelConfig, PreprocessConfig
from salient.errors import ConfigError

CODE_VERSION = "activations-2"
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


def output_schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            ("relpath", pa.string()),
            ("image_id", pa.int64()),
            ("label", pa.int32()),
            ("pred", pa.int32()),
            ("features", pa.list_(pa.float16(), width)),
            ("orientation", pa.int8()),  # EXIF orientation, not applied: 1..8, 1 when absent, 0 when invalid
        ]
    )


@dataclass
class _Timings:
    read: float = 0.0
    decode: float = 0.0
    infer: float = 0.0
    write: float = 0.0


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
class _Loaded:
    position: int
    tensor: torch.Tensor | None
    error: str | None
    read_s: float
    decode_s: float
    orientation: int = 1


@dataclass
class ActivationRunner:
    """Loads the model once, then computes shards: reads and decodes in a thread pool while the
    model runs batches, and writes the shard's table and stats itself."""

    model: ModelConfig
    preprocess: PreprocessConfig
    compute: ComputeConfig
    threads: int | None = None
    device: str | None = None
    net: models.SalientModel = field(init=False)

    def __post_init__(self) -> None:
        m = self.model
        self.net, self.device = models.load_for_worker(m.checkpoint, m.arch, m.format, self.device, self.threads, need_discovery=True)
        if self.compute.precision == "fp16" and self.device == "cpu":
            raise ConfigError(["compute.precision = 'fp16' needs a CUDA device; use fp32 (or bf16) on the CPU"])
        self.width = self.net.feature_dim

    def _autocast(self):
        if self.compute.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.compute.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (float32) and top-1 predictions of a ``[N, 3, H, W]`` batch."""
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self.net(x)
        return out.features.float().cpu().numpy(), out.logits.argmax(dim=1).cpu().numpy()

    def _load_all(self, task: ShardTask, pool: ThreadPoolExecutor, threads: int) -> Iterator[_Loaded]:
        fs, root = storage.url_to_fs(task.root)
        resize, crop, max_pixels = self.preprocess.resize, self.preprocess.crop, self.preprocess.max_pixels

        def load(pos: int) -> _Loaded:
            rel = task.shard.relpaths[pos]
            t0 = time.perf_counter()
            try:
                data = fs.cat_file(f"{root.rstrip('/')}/{storage.safe_relpath(rel)}")
            except FileNotFoundError:
                return _Loaded(pos, None, "FileNotFoundError: file disappeared after planning", time.perf_counter() - t0, 0.0)
            except PermissionError as exc:
                return _Loaded(pos, None, f"{images.describe_error(exc)}; the file cannot be read with these credentials", time.perf_counter() - t0, 0.0)
            t1 = time.perf_counter()
            try:
                tensor, orientation = images.read_image(data, resize, crop, max_pixels)
            except images.DECODE_ERRORS as exc:
                return _Loaded(pos, None, images.describe_error(exc), t1 - t0, time.perf_counter() - t1)
            return _Loaded(pos, tensor, None, t1 - t0, time.perf_counter() - t1, orientation)

        lookahead = 2 * self.compute.batch_size + 2 * threads
        pending: deque[Future[_Loaded]] = deque()
        positions = iter(range(len(task.shard)))
        for pos in positions:
            pending.append(pool.submit(load, pos))
            if len(pending) >= lookahead:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(positions, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))

    def __call__(self, task: ShardTask, on_batch: Callable[[int], None] | None = None) -> dict:
        """Compute and commit one shard; returns its stats."""
        started = time.time()
        t_start = time.perf_counter()
        shard = task.shard
        timings = _Timings()
        rows: list[int] = []
        feats: list[np.ndarray] = []
        preds: list[np.ndarray] = []
        failures: list[dict[str, str]] = []
        orientations = [1] * len(shard)
        batch: list[torch.Tensor] = []
        batch_pos: list[int] = []

        def flush() -> None:
            t0 = time.perf_counter()
            f, p = self.infer(torch.stack(batch))
            timings.infer += time.perf_counter() - t0
            feats.append(f.astype(np.float16))
            preds.append(p.astype(np.int32))
            rows.extend(batch_pos)
            if on_batch is not None:
                on_batch(len(batch))
            batch.clear()
            batch_pos.clear()

        decode_threads = self.compute.decode_threads or max(1, self.threads or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode") as pool:
            for item in self._load_all(task, pool, decode_threads):
                timings.read += item.read_s
                timings.decode += item.decode_s
                if item.error is not None:
                    failures.append({"relpath": shard.relpaths[item.position], "reason": item.error})
                    continue
                orientations[item.position] = item.orientation
                batch.append(item.tensor)
                batch_pos.append(item.position)
                if len(batch) == self.compute.batch_size:
                    flush()
            if batch:
                flush()

        t0 = time.perf_counter()
        features = np.concatenate(feats) if feats else np.zeros((0, self.width), np.float16)
        table = pa.table(
            {
                "relpath": pa.array([shard.relpaths[i] for i in rows], pa.string()),
                "image_id": pa.array([shard.image_ids[i] for i in rows], pa.int64()),
                "label": pa.array([shard.labels[i] for i in rows], pa.int32()),
                "pred": pa.array(np.concatenate(preds) if preds else np.zeros(0, np.int32), pa.int32()),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float16()), self.width),
                "orientation": pa.array([orientations[i] for i in rows], pa.int8()),
            },
            schema=output_schema(self.width),
        )
        storage.write_parquet(table_uri(task.build, shard.index), table, task.stage_fingerprint)
        timings.write += time.perf_counter() - t0
        total = time.perf_counter() - t_start
        stats = {
            "shard": shard.index,
            "fingerprint": task.fingerprint,
            "planned": len(shard),
            "images": len(rows),
            "failed": len(failures),
            "failures": failures,
            "first_image_id": shard.image_ids[0] if len(shard) else None,
            "seconds": {
                "read": round(timings.read, 4),
                "decode": round(timings.decode, 4),
                "infer": round(timings.infer, 4),
                "write": round(timings.write, 4),
                "total": round(total, 4),
            },
            "images_per_second": round(len(rows) / total, 3) if total > 0 else None,
            "started": started,
            "finished": time.time(),
            "worker": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "device": self.device,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "torch_threads": torch.get_num_threads(),
                "decode_threads": decode_threads,
                "precision": self.compute.precision,
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
