"""ImageNet scale: planning a 1,281,167-file listing and aggregating 1,281,167 activation rows.

Planning runs the stage's own code on a synthetic object store shaped like ImageNet train (1,000
class folders, 1,281 or 1,282 files each; every LIST request returns at most 1,000 keys and costs a
fixed latency): ``plan.write_plan`` (list in parallel, ImageFolder order, shards, plan.parquet)
and then the activation stage's work list (its shards not committed yet). Aggregation streams
activation shards, written to disk in the stage's format and cut by that plan, through
``aggregate.run``: in one process (``local_map``) and, with ``--ray``, on a local Ray as the stage
runs it (``ray_map``). Every run is its own process; peak memory is that process's peak RSS, and
for Ray also the peak of the summed RSS of the driver and all its child processes (Ray's daemons
and workers; shared pages count once per process).

    python -m benchmarks.scale [--images 1281167] [--width 256] [--latency-ms 20] [--ray]

The stage stores 2,048 features per row (5.2 GB of float16 at this size); the default width here
is 256 (656 MB) to keep the run to minutes on a small machine; ``--width 2048`` runs the full width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import environment, save
from benchmarks.listing import SlowListingFS
from salient import activations, aggregate, builds, plan, storage
from salient.config import AggregateConfig, ComputeConfig, Config, DatasetConfig, ModelConfig
from salient.preflight import Preflight
from salient.stage import Run, committed_result
from salient.stages.activations import Activations

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000
PAGE = 1000  # keys per LIST response (S3's maximum)
ROOT = "imagenetlist:///train"
BUILD_ID = "bench"  # the build, under a temporary output root, that the children share


class ImageNetListingFS(SlowListingFS):
    """ImageNet train's shape: ``images`` files spread over ``classes`` folders as evenly as
    possible; each LIST page of up to 1,000 keys costs ``latency`` seconds."""

    protocol = "imagenetlist"
    images = IMAGENET_TRAIN

    @classmethod
    def _strip_protocol(cls, path):
        return path.removeprefix(f"{cls.protocol}://").rstrip("/") or "/"

    @classmethod
    def class_sizes(cls) -> list[int]:
        base, extra = divmod(cls.images, cls.classes)
        return [base + (c < extra) for c in range(cls.classes)]

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if path == "/train":
            entries = [{"name": f"/train/n{c:08d}", "type": "directory", "size": 0} for c in range(self.classes)]
        else:
            wnid = path.rsplit("/", 1)[-1]
            n = self.class_sizes()[int(wnid[1:])]
            entries = [{"name": f"{path}/{wnid}_{i}.JPEG", "type": "file", "size": 110_000} for i in range(n)]
        time.sleep(self.latency * max(1, math.ceil(len(entries) / PAGE)))
        return entries if detail else [e["name"] for e in entries]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TreeRSS:
    """Samples the summed RSS of this process and all its descendants; ``peak_mb`` is the largest sum."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_mb = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        import psutil

        total = 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self) -> TreeRSS:
        self.peak_mb = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._sample())


def plan_child(root: str, images: int, latency: float, shard_size: int) -> dict:
    """The planning task and the activation stage's work list, timed, in this process, into the
    build ``BUILD_ID`` of the output root ``root``."""
    import fsspec

    fsspec.register_implementation(ImageNetListingFS.protocol, ImageNetListingFS, clobber=True)
    ImageNetListingFS.images, ImageNetListingFS.classes, ImageNetListingFS.latency = images, CLASSES, latency
    cfg = Config(
        dataset=DatasetConfig(root=ROOT), model=ModelConfig(checkpoint="unused"), compute=ComputeConfig(shard_size=shard_size), output=root,
    )
    # no checkpoint here: the digest a pre-flight would have read stands in for it in the stage's key
    run = Run(cfg, builds.Layout(root, BUILD_ID), Preflight(digests={"unused": "bench"}))
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    summary = plan.write_plan(ROOT, run.build, shard_size)
    t1 = time.perf_counter()
    items = Activations().shards(run)
    todo = [item.payload for item in items if committed_result(run, item) is None]
    t2 = time.perf_counter()
    # independent checks: every file once, in ImageFolder order, in shards of at most shard_size
    sizes = ImageNetListingFS.class_sizes()
    assert summary["images"] == images and summary["shards"] == len(todo) == len(items)
    ids = [i for t in todo for i in t.shard.image_ids]
    assert ids == list(range(images)) and max(len(t.shard) for t in todo) <= shard_size
    labels = [c for t in todo for c in t.shard.labels]
    assert labels == [c for c, n in enumerate(sizes) for _ in range(n)]
    first = todo[0].shard
    assert first.relpaths[:2] == ["n00000000/n00000000_0.JPEG", "n00000000/n00000000_1.JPEG"]
    return {
        "images": summary["images"], "shards": summary["shards"], "list_requests": 1 + sum(math.ceil(n / PAGE) for n in sizes),
        "seconds": {"write_plan": t1 - t0, "work_list": t2 - t1}, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before,
    }


def write_shards(out: str, width: int) -> tuple[list[str], int, list[int]]:
    """Activation shards in the stage's format (every column of its schema) for every shard of the
    plan under ``out``: ReLU-like float16 features; the prediction is the label 70% of the time,
    else a random class. Returns the shards, their bytes on disk and the number of images
    predicted as each class."""
    rng = np.random.default_rng(0)
    table = pq.read_table(plan.plan_uri(out), columns=["relpath", "image_id", "label", "shard"])
    bounds = np.flatnonzero(np.diff(table.column("shard").to_numpy())) + 1
    uris, nbytes, predicted = [], 0, np.zeros(CLASSES, np.int64)
    for s, (a, b) in enumerate(zip([0, *bounds], [*bounds, table.num_rows])):
        part = table.slice(a, b - a)
        labels = part.column("label").to_numpy()
        feats = np.abs(rng.standard_normal((len(labels), width), dtype=np.float32)).astype(np.float16)
        preds = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, CLASSES, len(labels))).astype(np.int32)
        predicted += np.bincount(preds, minlength=CLASSES)
        columns = {
            "relpath": part.column("relpath"), "image_id": part.column("image_id"), "label": part.column("label"),
            "pred": pa.array(preds, pa.int32()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.float16()), width),
            "orientation": pa.array(np.ones(len(labels), np.int8)),  # no EXIF orientation
        }
        schema = activations.output_schema(width)
        uri = activations.table_uri(out, s)
        storage.write_parquet(uri, pa.table([columns[f.name] for f in schema], schema=schema), "bench")
        uris.append(uri)
        nbytes += Path(uri).stat().st_size
    return uris, nbytes, predicted.tolist()


def aggregate_child(out: str, width: int, mode: str) -> dict:
    """Both aggregation passes and every table, in this process (``local``) or on a local Ray (``ray``)."""
    world = json.loads(Path(out, "world.json").read_text())
    uris = world["uris"]
    fc = np.random.default_rng(1).standard_normal((CLASSES, width)).astype(np.float32)
    inputs = aggregate.AggregateInputs(out, uris, fc, plan.plan_classes(out), "bench")
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "local":
        summary = aggregate.run(inputs, AggregateConfig())
        tree_peak = None
    else:
        from tasks.ray_pool import ray_cluster, ray_map

        with TreeRSS() as tree, ray_cluster(None):
            summary = aggregate.run(inputs, AggregateConfig(), map_fn=ray_map)
        tree_peak = tree.peak_mb
    seconds = time.perf_counter() - t0
    # independent checks: every row read; F = 5 pairs per class with images, K = 65 images each at most
    groups = [g for g in world["predicted"] if g]
    assert summary["images"] == sum(pq.ParquetFile(u).metadata.num_rows for u in uris) == sum(world["predicted"])
    assert summary["pairs"] == 5 * len(groups) and summary["topk_class_rows"] == sum(5 * min(65, g) for g in groups)
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before, "tree_peak_rss_mb": tree_peak, **summary}


def _in_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--width", type=int, default=256, help="features per row (the stage: 2048)")
    ap.add_argument("--shard-size", type=int, default=5000)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="per LIST page of up to 1,000 keys")
    ap.add_argument("--ray", action="store_true", help="also aggregate on a local Ray, as the stage does")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path = args.child[:2]  # plan: the output root; aggregate: the build directory
        if kind == "plan":
            result = plan_child(path, args.images, args.latency_ms / 1000, args.shard_size)
        else:
            result = aggregate_child(path, args.width, args.child[2])
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="salient-scale-bench-") as tmp:
        planned = _in_child("--images", str(args.images), "--latency-ms", str(args.latency_ms),
                            "--shard-size", str(args.shard_size), "--child", "plan", tmp)
        print("plan", planned, flush=True)
        out = builds.build_dir(tmp, BUILD_ID)
        t0 = time.perf_counter()
        uris, nbytes, predicted = write_shards(out, args.width)
        write_s = time.perf_counter() - t0
        Path(out, "world.json").write_text(json.dumps({"uris": uris, "predicted": predicted}))
        print(f"wrote {len(uris)} shards ({nbytes / 1e6:.0f} MB) in {write_s:.0f}s", flush=True)
        runs = {}
        for mode in ("local", "ray") if args.ray else ("local",):
            runs[mode] = _in_child("--width", str(args.width), "--child", "aggregate", out, mode)
            print(mode, runs[mode], flush=True)

    n = planned["images"]
    result = {
        "benchmark": "scale",
        "images": n, "classes": CLASSES, "features": args.width, "shard_size": args.shard_size,
        "latency_ms_per_list_page": args.latency_ms,
        "plan": planned,
        "shards_on_disk_mb": round(nbytes / 1e6, 1), "shard_write_s": round(write_s, 1),
        "aggregate": runs,
        "environment": environment(),
        "load_average_1_5_15min": os.getloadavg(),  # other work on the machine slows every figure
    }
    local = runs["local"]
    md = (
        "# ImageNet scale: planning and aggregation\n\n"
        f"{n:,} files in {CLASSES:,} class folders, `compute.shard_size` {args.shard_size:,}; "
        f"{environment()['cpus']} CPUs.\n\n"
        f"**Planning** (synthetic object store, {args.latency_ms:g} ms per LIST page of up to {PAGE:,} keys, "
        f"{planned['list_requests']:,} requests): list + order + cut {planned['shards']} shards + write plan.parquet "
        f"{planned['seconds']['write_plan']:.1f} s, the activation stage's work list "
        f"{planned['seconds']['work_list']:.1f} s; peak RSS {planned['peak_rss_mb']:,.0f} MB.\n\n"
        f"**Aggregation** of {n:,} rows x {args.width} float16 features ({nbytes / 1e6:,.0f} MB of shards on disk, "
        "streamed one shard at a time; both passes, all five tables):\n\n"
        "| run | seconds | peak RSS (MB) |\n|---|---|---|\n"
        f"| one process (`local_map`) | {local['seconds']:.1f} | {local['peak_rss_mb']:,.0f} |\n"
        + (
            f"| local Ray, {environment()['cpus']} CPUs (`ray_map`, the stage) | {runs['ray']['seconds']:.1f} | "
            f"{runs['ray']['tree_peak_rss_mb']:,.0f} (driver + Ray daemons + workers; driver alone "
            f"{runs['ray']['peak_rss_mb']:,.0f}) |\n"
            if "ray" in runs else ""
        )
        + f"\nThe stage stores 2,048 features per row; {args.width} here keeps the shards at "
        f"{nbytes / 1e6:,.0f} MB and the run to minutes (`--width 2048` runs the full width).\n"
    )
    save("scale", result, md)


if __name__ == "__main__":
    main()
