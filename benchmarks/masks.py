"""Mask storage: bytes per mask and one core's time to compress and decompress it for each
``generalize.compression`` (the stage's own shard encoder), next to PNG, JPEG q=90 and the index's
``nam``; masks written per second into the Zarr store (local disk and S3) as the stage writes them;
and the latency of reading one mask through zarr.

The masks are NAMs of a random-weight ResNet-50 at 224 px on photo-like JPEGs: for each image its
most active last-conv channels, as a feature's top images are. S3 is a local SeaweedFS server
started (and stopped) here.

    python -m benchmarks.masks [--images 256] [--features-per-image 4] [--reads 100]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from benchmarks.common import environment, save, write_photo_folder
from salient import images, masks, models, nam, storage
from salient.config import GeneralizeConfig
from tests.s3server import aws_environment, seaweed_s3

ARCH, RESIZE, CROP = "resnet50", 256, 224
SHARD = 256
WRITE_REPEATS = 3


def make_masks(root: Path, per_image: int, batch: int = 16) -> tuple[np.ndarray, np.ndarray, pa.Table, float]:
    """(uint8 masks ``[n, 224, 224]``, normalised low-resolution maps ``[n, h, w]``, their rows
    (relpath, feature_index), seconds) for the ``per_image`` most active channels of every JPEG under ``root``."""
    torch.manual_seed(0)
    net = models.prepare_for_inference(models.SalientModel(models.build_arch(ARCH, 1000), ARCH))
    files = sorted(root.rglob("*.JPEG"))
    ups, lows, features = [], [], []
    t0 = time.perf_counter()
    for s in range(0, len(files), batch):
        x = torch.stack([images.load_image(f.read_bytes(), RESIZE, CROP) for f in files[s : s + batch]])
        with torch.inference_mode():
            maps = net(x.contiguous(memory_format=torch.channels_last)).maps
            top = maps.mean(dim=(2, 3)).topk(per_image, dim=1).indices
            low, up = nam.nams(maps.repeat_interleave(per_image, dim=0), top.reshape(-1), CROP)
        ups.append(nam.to_uint8(up.numpy()))
        lows.append(low.numpy())
        features += top.reshape(-1).tolist()
    seconds = time.perf_counter() - t0
    rels = [f.relative_to(root).as_posix() for f in files for _ in range(per_image)]
    rows = pa.table({"relpath": rels, "feature_index": pa.array(features, pa.int32())})
    return np.concatenate(ups), np.concatenate(lows), rows, seconds


def encoded_sizes(m: np.ndarray, lows: np.ndarray) -> dict:
    """Mean bytes per mask as single PNG and JPEG (q=90) files, JPEG's error, and the ``nam`` both
    raw and as the index's zstd Parquet column."""
    png, jpeg, err = [], [], []
    for mask in m:
        for fmt, sizes in (("PNG", png), ("JPEG", jpeg)):
            buf = io.BytesIO()
            Image.fromarray(mask).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            sizes.append(buf.tell())
            if fmt == "JPEG":
                back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.int16)
                err.append(np.abs(back - mask.astype(np.int16)).max())
    flat = lows.reshape(len(lows), -1).astype(np.float16)
    buf = io.BytesIO()
    pq.write_table(pa.table({"nam": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float16()), flat.shape[1])}), buf, compression="zstd")
    return {
        "png": statistics.fmean(png),
        "jpeg_q90": statistics.fmean(jpeg),
        "jpeg_q90_max_abs_error_median": float(np.median(err)),
        "nam_raw": flat.shape[1] * 2,
        "nam_parquet_zstd": buf.tell() / len(lows),
    }


def codec_costs(out: str, root: str, rows: pa.Table, m: np.ndarray) -> dict:
    """Per ``generalize.compression`` (the codec read back from a store the stage's way creates),
    and for zstd at level 3 for comparison: bytes per mask, and one core's milliseconds to compress
    and to decompress a mask (thread CPU time, best of ``WRITE_REPEATS``), each mask checked after
    its round trip."""
    codecs = {}
    for name in masks.COMPRESSORS:
        masks.prepare(out, root, rows, CROP, GeneralizeConfig(masks_per_shard=SHARD, compression=name), f"codec-{name}")
        codecs[name] = masks.shard_codec(masks.open_array(out))
        assert codecs[name] is not None, f"{name}: the store's layout is not the stage's own"
    codecs["zstd level 3 (for comparison)"] = numcodecs.Zstd(level=3)
    result = {}
    for name, codec in codecs.items():
        enc, dec = float("inf"), float("inf")
        for _ in range(WRITE_REPEATS):
            t0 = time.thread_time()
            frames = [codec.encode(mask) for mask in m]
            enc = min(enc, time.thread_time() - t0)
            t0 = time.thread_time()
            back = [codec.decode(f) for f in frames]
            dec = min(dec, time.thread_time() - t0)
        if any(not np.array_equal(np.frombuffer(b, np.uint8).reshape(mask.shape), mask) for b, mask in zip(back, m)):
            raise AssertionError(f"{name}: a mask read back differs from the one written")
        result[name] = {
            "bytes_per_mask": sum(len(f) for f in frames) / len(m),
            "compress_ms_per_mask": 1000 * enc / len(m), "decompress_ms_per_mask": 1000 * dec / len(m),
        }
    return result


def write_rate(out: str, root: str, rows: pa.Table, m: np.ndarray) -> dict:
    """Masks per second written into a fresh store (default compression) as the stage's blocks
    write them (:func:`salient.masks.write_shard`: one shard object per write, its masks encoded on
    a pool of one thread per core), median of ``WRITE_REPEATS``; and the stored bytes."""
    seconds = []
    for r in range(WRITE_REPEATS):
        # a new stage fingerprint each time, so prepare makes a fresh, empty array
        masks.prepare(out, root, rows, CROP, GeneralizeConfig(masks_per_shard=SHARD), f"bench-{r}")
        arr = masks.open_array(out, mode="r+")
        with ThreadPoolExecutor() as pool:
            t0 = time.perf_counter()
            for start in range(0, len(m), SHARD):
                masks.write_shard(out, arr, start, m[start : start + SHARD], pool)
            seconds.append(time.perf_counter() - t0)
    fs, path = storage.url_to_fs(storage.join(out, masks.ZARR_PATH))
    sizes = fs.find(path, detail=True)
    shards = [v["size"] for k, v in sizes.items() if not k.endswith("zarr.json")]
    return {
        "masks_per_s": len(m) / statistics.median(seconds),
        "seconds": seconds,
        "shard_objects": len(shards),
        "bytes_per_mask": sum(shards) / len(m),
        "bytes_per_mask_with_metadata": sum(v["size"] for v in sizes.values()) / len(m),
    }


def layout(out: str) -> str:
    """The store's chunking and compression, from its ``zarr.json``."""
    meta = storage.read_json(storage.join(out, masks.ZARR_PATH, "zarr.json"))
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    sharding = next(c for c in meta["codecs"] if c["name"] == "sharding_indexed")["configuration"]
    codecs = ", ".join(
        c["name"] + "".join(f" {k}={v}" for k, v in (c.get("configuration") or {}).items() if k in ("level", "cname", "clevel"))
        for c in sharding["codecs"] if c["name"] != "bytes"
    )
    return f"Zarr v{meta['zarr_format']}, chunks {sharding['chunk_shape']} in shard objects {shard}, {codecs}"


def read_latency(out: str, m: np.ndarray, reads: int) -> dict:
    """Milliseconds to read one random mask: with a fresh array handle per read (metadata fetched
    each time) and with one warm handle; each read is checked against the mask written."""
    rng = np.random.default_rng(1)
    warm = masks.open_array(out)
    np.asarray(warm[0])
    result = {}
    for name in ("fresh_handle", "warm_handle"):
        ms = []
        for i in rng.integers(0, len(m), reads):
            t0 = time.perf_counter()
            got = np.asarray((masks.open_array(out) if name == "fresh_handle" else warm)[int(i)])
            ms.append((time.perf_counter() - t0) * 1000)
            if not np.array_equal(got, m[i]):
                raise AssertionError(f"mask {i} read back differs from the one written")
        result[name] = {"median_ms": statistics.median(ms), "p95_ms": float(np.percentile(ms, 95)), "reads": reads}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--features-per-image", type=int, default=4)
    ap.add_argument("--reads", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="salient-masks-bench-") as tmp:
        photos = Path(tmp) / "photos"
        write_photo_folder(photos, args.images)
        m, lows, rows, compute_s = make_masks(photos, args.features_per_image)
        print(f"{len(m)} masks computed in {compute_s:.0f}s", flush=True)
        sizes = encoded_sizes(m, lows)
        local_out = str(Path(tmp) / "out")
        codecs = codec_costs(local_out, str(photos), rows, m)
        local = write_rate(local_out, str(photos), rows, m)
        store_layout = layout(local_out)
        local["read"] = read_latency(local_out, m, args.reads)
        with seaweed_s3(Path(tmp) / "s3") as server, aws_environment(server):
            s3_out = f"s3://{server.bucket}/bench/out"
            s3 = write_rate(s3_out, str(photos), rows, m)
            s3["read"] = read_latency(s3_out, m, args.reads)
    result = {
        "benchmark": "masks",
        "masks_from": f"random-weight {ARCH} at {CROP} px, {args.images} photo-like JPEGs, "
                      f"the {args.features_per_image} most active channels of each",
        "masks": len(m), "shape": list(m.shape[1:]), "nam_shape": list(lows.shape[1:]), "layout": store_layout,
        "mean_mask_value": float(m.mean() / 255),
        "bytes_per_mask": {"zarr_default": local["bytes_per_mask"], **sizes}, "compression": codecs,
        "local": local, "s3": s3, "environment": environment(),
    }
    b = result["bytes_per_mask"]
    raw = CROP * CROP
    md = (
        "# Mask storage\n\n"
        f"{len(m)} masks of {CROP}x{CROP} (uint8), NAMs of a random-weight {ARCH} on {args.images} photo-like JPEGs "
        f"(the {args.features_per_image} most active last-conv channels of each; mean value {result['mean_mask_value']:.2f}; "
        "random weights give broad maps, and every size here depends on the maps' content). "
        f"Store: {store_layout}. S3: a local SeaweedFS server.\n\n"
        "| format | bytes per mask | vs raw |\n|---|---|---|\n"
        f"| raw uint8 | {raw:,} | 1.00 |\n"
        + "".join(f"| Zarr shards, {name} | {c['bytes_per_mask']:,.0f} | {c['bytes_per_mask'] / raw:.3f} |\n" for name, c in codecs.items())
        + f"| PNG file each | {b['png']:,.0f} | {b['png'] / raw:.3f} |\n"
        f"| JPEG q=90 file each (lossy: median max error {b['jpeg_q90_max_abs_error_median']:.0f} levels) | {b['jpeg_q90']:,.0f} | {b['jpeg_q90'] / raw:.3f} |\n"
        f"| `nam` ({lows.shape[1]}x{lows.shape[2]} float16, raw) | {b['nam_raw']} | {b['nam_raw'] / raw:.4f} |\n"
        f"| `nam` in index.parquet (zstd) | {b['nam_parquet_zstd']:.0f} | {b['nam_parquet_zstd'] / raw:.4f} |\n\n"
        "| codec | compress, one core (ms per mask) | decompress (ms per mask) |\n|---|---|---|\n"
        + "".join(f"| {name} | {c['compress_ms_per_mask']:.3f} | {c['decompress_ms_per_mask']:.3f} |\n" for name, c in codecs.items())
        + "\n"
        "| store | masks written per second | read one mask: fresh handle, median / p95 (ms) | warm handle, median / p95 (ms) |\n"
        "|---|---|---|---|\n"
        + "".join(
            f"| {name} | {r['masks_per_s']:,.0f} | {r['read']['fresh_handle']['median_ms']:.1f} / {r['read']['fresh_handle']['p95_ms']:.1f} "
            f"| {r['read']['warm_handle']['median_ms']:.1f} / {r['read']['warm_handle']['p95_ms']:.1f} |\n"
            for name, r in (("local disk", local), ("S3 (local SeaweedFS)", s3))
        )
        + f"\nWrites: one shard ({SHARD} masks) per write through the stage's shard encoder, default compression; "
        f"median of {WRITE_REPEATS}. Reads: {args.reads} random rows, each checked against the mask written; "
        "a fresh handle re-reads the array metadata, the fsspec filesystem (and its connections) is shared.\n"
    )
    save("masks", result, md)


if __name__ == "__main__":
    main()
