"""Small worlds made by the tests: image folders with odd files, and checkpoints."""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from salient import config, models, world


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@functools.cache
def machine_gpus() -> int:
    """The CUDA devices of this machine, whatever CUDA_VISIBLE_DEVICES the tests run with."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def worker_device(cuda_visible_devices: str) -> str:
    """The device a worker given the Ray GPU ``cuda_visible_devices`` runs on: the GPU where this
    machine has one of that index, else the CPU (the test Ray declares GPUs that may not exist)."""
    return "cuda" if cuda_visible_devices and int(cuda_visible_devices.split(",")[0]) < machine_gpus() else "cpu"


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[str]:
    """Write random RGB JPEGs as ``root/n000c/img_i.JPEG``; returns the relpaths in ImageFolder order."""
    rng = np.random.default_rng(seed)
    rels = []
    for c in range(classes):
        (root / f"n{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"n{c:04d}/img_{i:03d}.JPEG"
            (root / rel).write_bytes(jpeg_bytes(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)))
            rels.append(rel)
    return sorted(rels)


def make_checkpoint(path: Path, num_classes: int = 3, arch: str = "tiny_resnet", seed: int = 0) -> str:
    """A random-weight checkpoint in the robustness format, with non-trivial BatchNorm statistics."""
    return models.write_random_checkpoint(str(path), arch, num_classes, seed)


def read_activation_rows(out: str) -> pa.Table:
    """Every committed activation row of a build output."""
    parts = sorted(p for p in os.listdir(f"{out}/activations") if p.endswith(".parquet"))
    return pa.concat_tables(pq.read_table(f"{out}/activations/{p}") for p in parts)


def current_build(root) -> str:
    """The directory of the ``current`` build under the output root ``root``."""
    from salient import builds

    return builds.resolve(str(root), pointer="current")


def run_stages(cfg, *names: str) -> dict:
    """Run the named stages on the current build through the rebuild flow, as `salient <stage>`
    does; returns the summary of the last one."""
    from flows.rebuild import rebuild_flow

    return rebuild_flow(cfg, list(names))["stages"][names[-1]]


def tiny_pipeline(base: Path) -> config.Config:
    """The config of a whole pipeline on a 3-class synthetic world under ``base`` (written there),
    with a random tiny_resnet as the studied and the evaluated model; output ``base/out``."""
    world.synthesize(str(base / "world"), classes=3, per_class=8, size=32, seed=0)
    ckpt = make_checkpoint(base / "tiny.pt", num_classes=3)
    return config.load(None, [
        f"dataset.root={base}/world/train", f"model.checkpoint={ckpt}", "model.arch=tiny_resnet",
        "model.format=robustness", "preprocess.resize=32", "preprocess.crop=32", f"output={base}/out",
        "compute.shard_size=10", "compute.gpus_per_worker=0", "aggregate.features_per_class=2",
        "aggregate.grouping=label", "discover.images_per_pair=3", "discover.attack_steps=2",
        "generalize.images_per_pair=3", "generalize.masks_per_shard=6",
        f"evaluate.models=[{{name: tiny, arch: tiny_resnet, format: robustness, checkpoint: {ckpt}}}]", "evaluate.sigmas=[0.5]",
    ])


def build_stages(cfg: config.Config, build_id: str, names: list[str]) -> str:
    """The stages ``names`` of the config, in this process, into the build ``build_id`` of its
    output root (no flow, no publishing); returns the build directory."""
    from salient import builds, preflight, stages
    from salient.stage import Run, execute

    chosen = stages.select(cfg, names)
    run = Run(cfg, builds.Layout(cfg.output, build_id), preflight.for_stages(cfg, chosen))
    for stage in chosen:
        execute(stage, run)
    return run.build
