"""Shared pieces of the benchmarks: photo-like JPEGs, results files, environment facts."""

from __future__ import annotations

import io
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from salient import plan
from salient.cli import LOCAL_ENV_DEFAULTS

for _key, _value in LOCAL_ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

RESULTS = Path(__file__).resolve().parent / "results"


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with a photo's statistics: smooth structure plus fine texture (random noise alone
    would make decoding unrealistically slow)."""
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_photo_folder(root: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.JPEG").write_bytes(photo_like(rng))


def environment() -> dict:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def save(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def one_shard(root: Path) -> plan.Shard:
    """Every image under the ImageFolder ``root`` as one shard (the stage cuts shards per class)."""
    cols = plan.list_images(str(root)).table.to_pydict()
    return plan.Shard(0, cols["relpath"], cols["image_id"], cols["label"], cols["bytes"])
