"""Activation throughput on a GPU machine (bf16, large batches), checked against the CPU fp32 path.

Prints images/s per stage and writes benchmarks/results/gpu.json. About five minutes on one GPU:

    python -m benchmarks.gpu [--images 3000] [--batch 256] [--precision bf16] [--gpu-decode]

Runs on the CPU too (``--device cpu --images 64``) to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from benchmarks.common import environment, one_shard, save, write_photo_folder
from salient import activations, models, plan
from salient.config import ComputeConfig, ModelConfig, PreprocessConfig


def _run(root: Path, out: Path, ckpt: str, device: str, precision: str, batch: int, threads: int, limit: int | None = None) -> tuple[dict, np.ndarray]:
    shard = one_shard(root)
    if limit is not None:
        shard = plan.Shard(0, shard.relpaths[:limit], shard.image_ids[:limit], shard.labels[:limit], shard.sizes[:limit])
    runner = activations.ActivationRunner(
        ModelConfig(checkpoint=ckpt, arch="resnet50"), PreprocessConfig(),
        ComputeConfig(batch_size=batch, precision=precision, decode_threads=threads), threads=threads, device=device,
    )
    runner.infer(torch.rand(batch, 3, 224, 224))  # warm-up: kernels, allocator, autotuning
    stats = runner(activations.ShardTask(shard, str(root), str(out), "bench", "bench"))
    import pyarrow.parquet as pq

    feats = np.asarray(pq.read_table(activations.table_uri(str(out), 0)).column("features").to_pylist(), np.float32)
    return stats, feats


def _gpu_decode_rate(root: Path, n: int, batch: int) -> float:
    """Images/s for nvJPEG decode + resize + crop on the GPU (torchvision.io), files read from disk."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    files = sorted(str(p) for p in root.rglob("*.JPEG"))[:n]
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        datas = [read_file(f) for f in files[i : i + batch]]
        imgs = decode_jpeg(datas, device="cuda")
        [F.center_crop(F.resize(im, 256, antialias=True), 224) for im in imgs]
    torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parity-images", type=int, default=64)
    ap.add_argument("--gpu-decode", action="store_true", help="also measure nvJPEG decode on the GPU")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="salient-gpu-bench-") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        write_photo_folder(tmpdir / "data", args.images, classes=10)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        torch.manual_seed(0)
        ckpt = str(tmpdir / "resnet50.pt")
        models.save_checkpoint(torchvision.models.resnet50().eval(), ckpt, "robustness")

        stats, feats = _run(tmpdir / "data", tmpdir / "out", ckpt, args.device, args.precision, args.batch, threads)
        n_par = min(args.parity_images, args.images)
        _, ref = _run(tmpdir / "data", tmpdir / "ref", ckpt, "cpu", "fp32", 32, threads, limit=n_par)
        scale = float(np.abs(ref).max())
        rel = float(np.abs(feats[:n_par] - ref).max()) / scale
        rel_l2 = float(np.linalg.norm(feats[:n_par] - ref) / np.linalg.norm(ref))
        tol = 2e-3 if args.precision == "fp32" else 3e-2
        result = {
            "benchmark": "gpu",
            "device": args.device,
            "precision": args.precision,
            "batch": args.batch,
            "images": args.images,
            "activations_images_per_s": stats["images_per_second"],
            "seconds": stats["seconds"],
            "parity_vs_cpu_fp32": {"images": n_par, "max_abs_diff_over_max": rel, "relative_l2": rel_l2, "tolerance": tol, "ok": rel_l2 <= tol},
            "environment": environment(),
        }
        if args.gpu_decode and args.device.startswith("cuda"):
            result["gpu_decode_images_per_s"] = round(_gpu_decode_rate(tmpdir / "data", args.images, args.batch), 1)
    md = (
        "# GPU activation throughput\n\n"
        f"{result['environment']['cuda'] or 'CPU'}, ResNet-50 {args.precision}, batch {args.batch}, {args.images} JPEGs 500x375.\n\n"
        f"| stage | images/s |\n|---|---|\n| activations (read+decode+infer+write) | {stats['images_per_second']} |\n"
        + (f"| nvJPEG decode + resize only | {result['gpu_decode_images_per_s']} |\n" if "gpu_decode_images_per_s" in result else "")
        + f"\nParity with CPU fp32 on {n_par} images: relative L2 {rel_l2:.2e} (tolerance {tol:g}), "
        f"max |diff|/max {rel:.2e}: {'OK' if result['parity_vs_cpu_fp32']['ok'] else 'FAILED'}.\n"
    )
    save("gpu", result, md)
    if not result["parity_vs_cpu_fp32"]["ok"]:
        raise SystemExit("features differ from the CPU fp32 path beyond tolerance")


if __name__ == "__main__":
    main()
