"""The activation stage against a plain PyTorch loop over the same JPEGs and model.

Baseline: torchvision ImageFolder + DataLoader (default workers) + PIL transforms + fp32 ResNet-50,
batch 32, under ``no_grad``. Ours: the whole stage (Prefect flow, Ray worker, shard files).
Each runs on two dataset sizes; throughput from the difference cancels start-up cost.

    python -m benchmarks.activations [--small 64] [--large 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from benchmarks.common import environment, save, write_photo_folder
from salient import config, models


def baseline(root: Path, net: torch.nn.Module) -> tuple[float, np.ndarray]:
    """Seconds for the plain loop, and its penultimate features in ImageFolder order."""
    t0 = time.perf_counter()
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD),
    ])
    loader = DataLoader(ImageFolder(str(root), transform=tf), batch_size=32)
    feats = []
    hook = net.avgpool.register_forward_hook(lambda m, i, o: feats.append(torch.flatten(o, 1)))
    with torch.no_grad():
        for x, _ in loader:
            net(x)
    hook.remove()
    return time.perf_counter() - t0, torch.cat(feats).numpy()


def ours(root: Path, ckpt: str, out: Path) -> tuple[float, np.ndarray, list[dict]]:
    """Seconds for the whole activation stage (flow, Ray, shard files), its features by image_id, and shard stats."""
    from flows.rebuild import rebuild_flow

    cfg = config.load(None, [f"dataset.root={root}", f"model.checkpoint={ckpt}", f"output={out}"])
    t0 = time.perf_counter()
    build = Path(rebuild_flow(cfg, ["activations"])["build"])  # the stage alone, as `salient activations` runs it
    seconds = time.perf_counter() - t0
    parts = sorted(p for p in os.listdir(build / "activations") if p.endswith(".parquet"))
    table = pa.concat_tables(pq.read_table(build / "activations" / p) for p in parts).sort_by("image_id")
    import json

    stats = [json.loads((build / "activations" / p.replace(".parquet", ".json")).read_text()) for p in parts]
    return seconds, np.asarray(table.column("features").to_pylist(), dtype=np.float32), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=64)
    ap.add_argument("--large", type=int, default=256)
    args = ap.parse_args()
    from prefect import flow

    flow(lambda: None, name="warm-up")()  # start Prefect's server before any timing

    with tempfile.TemporaryDirectory(prefix="salient-bench-") as tmp:
        tmpdir = Path(tmp)
        torch.manual_seed(0)
        net = torchvision.models.resnet50().eval()
        ckpt = str(tmpdir / "resnet50.pt")
        models.save_checkpoint(net, ckpt, "robustness")
        rows = {}
        for label, n in (("small", args.small), ("large", args.large)):
            root = tmpdir / f"data-{label}"
            write_photo_folder(root, n)
            t_base, f_base = baseline(root, net)
            t_ours, f_ours, stats = ours(root, ckpt, tmpdir / f"out-{label}")
            scale = float(np.abs(f_base).max())
            rows[label] = {
                "images": n, "baseline_s": round(t_base, 2), "ours_s": round(t_ours, 2),
                "max_abs_diff_over_max": float(np.abs(f_ours - f_base).max()) / scale,
                "stage_seconds": {k: round(sum(s["seconds"][k] for s in stats), 2) for k in ("read", "decode", "infer", "write")},
            }
            print(label, rows[label], flush=True)
    dn = args.large - args.small
    base_tp = dn / (rows["large"]["baseline_s"] - rows["small"]["baseline_s"])
    ours_tp = dn / (rows["large"]["ours_s"] - rows["small"]["ours_s"])
    result = {
        "benchmark": "activations",
        "model": "resnet50 (random weights), 224 px crop from 500x375 JPEGs",
        "environment": environment(),
        "runs": rows,
        "steady_state_images_per_s": {"baseline": round(base_tp, 2), "ours": round(ours_tp, 2)},
        "steady_state_ratio": round(ours_tp / base_tp, 3),
        "startup_s": {
            "baseline": round(rows["small"]["baseline_s"] - args.small / base_tp, 2),
            "ours": round(rows["small"]["ours_s"] - args.small / ours_tp, 2),
        },
    }
    md = (
        "# Activation stage vs a plain PyTorch loop\n\n"
        f"{result['model']}; {environment()['cpus']} CPUs, torch {torch.__version__}.\n\n"
        "| | plain loop | Salient stage |\n|---|---|---|\n"
        f"| {args.small} images (s) | {rows['small']['baseline_s']} | {rows['small']['ours_s']} |\n"
        f"| {args.large} images (s) | {rows['large']['baseline_s']} | {rows['large']['ours_s']} |\n"
        f"| steady-state images/s | {base_tp:.2f} | {ours_tp:.2f} |\n"
        f"| start-up (s) | {result['startup_s']['baseline']} | {result['startup_s']['ours']} |\n\n"
        f"**Steady-state ratio: {result['steady_state_ratio']}x.** Feature parity (max |diff| / max): "
        f"{rows['large']['max_abs_diff_over_max']:.2e}.\n"
    )
    save("activations", result, md)


if __name__ == "__main__":
    main()
