"""Aggregation memory and time: 20k vs 200k synthetic images (2048 features, 1000 classes).

Each size runs in its own process (so peak RSS is that run's alone) through the same streaming
merge the stage uses, shards read one at a time.

    python -m benchmarks.aggregate [--sizes 20000 200000] [--shard-size 5000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.common import environment, save
from salient import aggregate, plan, storage
from salient.config import AggregateConfig

CLASSES, WIDTH = 1000, 2048


def write_world(out: Path, n: int, shard_size: int) -> list[str]:
    """A plan and committed-looking activation shards of ``n`` synthetic images."""
    rng = np.random.default_rng(0)
    labels = (np.arange(n) * CLASSES // n).astype(np.int32)  # class-contiguous, like ImageFolder
    wnids = [f"n{c:08d}" for c in range(CLASSES)]
    relpaths = [f"{wnids[labels[i]]}/{wnids[labels[i]]}_{i}.JPEG" for i in range(n)]
    shards = (np.arange(n) // shard_size).astype(np.int32)
    storage.write_parquet(
        plan.plan_uri(str(out)),
        pa.table({
            "relpath": relpaths, "image_id": pa.array(np.arange(n), pa.int64()), "label": labels,
            "wnid": [wnids[c] for c in labels], "bytes": pa.array(np.full(n, 110_000), pa.int64()), "shard": shards,
        }),
        "bench", {"classes": json.dumps(wnids)},
    )
    uris = []
    for s in range(int(shards.max()) + 1):
        rows = np.flatnonzero(shards == s)
        feats = np.abs(rng.standard_normal((len(rows), WIDTH), dtype=np.float32)).astype(np.float16)
        preds = np.where(rng.random(len(rows)) < 0.7, labels[rows], rng.integers(0, CLASSES, len(rows))).astype(np.int32)
        uri = storage.join(str(out), "activations", f"part-{s:05d}.parquet")
        storage.write_parquet(uri, pa.table({
            "relpath": [relpaths[i] for i in rows], "image_id": pa.array(rows, pa.int64()),
            "label": labels[rows], "pred": preds,
            "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.float16()), WIDTH),
        }), "bench")
        uris.append(uri)
    return uris


def child(out: str) -> None:
    uris = json.loads(Path(out, "uris.json").read_text())
    w = np.random.default_rng(1).standard_normal((CLASSES, WIDTH)).astype(np.float32)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    summary = aggregate.run(
        aggregate.AggregateInputs(out, uris, w, [f"n{c:08d}" for c in range(CLASSES)], "bench"), AggregateConfig()
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "rss_before_mb": base_rss / 1024, "pairs": summary["pairs"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    ap.add_argument("--shard-size", type=int, default=5000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    runs = {}
    with tempfile.TemporaryDirectory(prefix="salient-agg-bench-") as tmp:
        for n in args.sizes:
            out = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            uris = write_world(out, n, args.shard_size)
            (out / "uris.json").write_text(json.dumps(uris))
            print(f"wrote {n} synthetic images in {time.perf_counter() - t0:.0f}s", flush=True)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.aggregate", "--child", str(out)], capture_output=True, text=True, check=True)
            runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(n, runs[n], flush=True)
    small, large = args.sizes
    mem_ratio = runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"]
    time_ratio = runs[large]["seconds"] / runs[small]["seconds"]
    result = {
        "benchmark": "aggregate",
        "classes": CLASSES, "features": WIDTH, "shard_size": args.shard_size,
        "runs": {str(k): v for k, v in runs.items()},
        "peak_memory_ratio": round(mem_ratio, 3),
        "time_ratio": round(time_ratio, 2),
        "size_ratio": large / small,
        "environment": environment(),
    }
    md = (
        "# Aggregation: memory bounded by the output\n\n"
        f"{CLASSES} classes, {WIDTH} features, shards of {args.shard_size}, both passes, all five tables.\n\n"
        "| images | seconds | peak RSS (MB) |\n|---|---|---|\n"
        + "".join(f"| {n:,} | {runs[n]['seconds']:.1f} | {runs[n]['peak_rss_mb']:.0f} |\n" for n in args.sizes)
        + f"\nPeak memory ratio {mem_ratio:.3f} for {large // small}x the images; time ratio {time_ratio:.2f}.\n"
    )
    save("aggregate", result, md)


if __name__ == "__main__":
    main()
