"""Shared pieces of the benchmarks: photo-like JPEGs, results files, environment facts."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from salient import images, plan

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


def write_photo_folder_threaded(root: Path, n: int, classes: int = 4, seed: int = 0, threads: int | None = None) -> None:
    """Like :func:`write_photo_folder`, on a thread pool (image i drawn from its own generator,
    seeded by ``(seed, i)``), for large folders on machines with many cores."""
    def one(i: int) -> None:
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.JPEG").write_bytes(photo_like(np.random.default_rng([seed, i])))

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(one, range(n)))


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


def code_version() -> dict:
    """Which salient package runs, and its git commit (with whether its tree has changes)."""
    import salient

    where = Path(salient.__file__).resolve().parent.parent
    out: dict = {"salient": str(where)}
    try:
        out["commit"] = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no", "--", "salient"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        out["salient_modified"] = bool(changed)
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


def decoders() -> tuple[str, ...]:
    """The ``preprocess.decoder`` values of this version of salient (only PIL where it has no such key)."""
    from typing import get_args

    from salient.config import PreprocessConfig

    field = PreprocessConfig.model_fields.get("decoder")
    return tuple(get_args(field.annotation)) if field is not None else ("pil",)


def pixel_reader(decoder: str, resize: int, crop: int) -> Callable[[bytes], torch.Tensor]:
    """Image bytes -> uint8 ``[3, crop, crop]``, decoded as the stages decode them: with
    ``salient.images.read_pixels(..., decoder=decoder)`` where this version has it; else (PIL only)
    PIL decode -> Resize(resize, bilinear, antialiased) -> CenterCrop(crop), the same operations."""
    if hasattr(images, "read_pixels"):
        return lambda data: images.read_pixels(data, resize, crop, decoder=decoder)[0]
    if decoder != "pil":
        raise SystemExit(f"decoder {decoder!r}: this version of salient decodes with PIL only")
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    def read(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
        img = TF.resize(img, resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(TF.center_crop(img, [crop, crop]))

    return read


def pool_rate(fn: Callable[[int], object], n: int, threads: int | None = None, reps: int = 2) -> float:
    """Items per second of ``fn(i)`` for i in range(n) on a pool of ``threads`` threads (default:
    every core), best of ``reps`` passes after a warm-up on a few items."""
    threads = threads or os.cpu_count() or 1
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fn, range(min(n, 2 * threads))))
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(fn, range(n)))
            best = min(best, time.perf_counter() - t0)
    return n / best


def decode_rate(datas: Sequence[bytes], decoder: str, resize: int, crop: int, threads: int | None = None, reps: int = 2) -> float:
    """Images per second to decode, resize and crop ``datas`` (bytes already in memory) with
    ``decoder`` on ``threads`` threads (default: every core)."""
    read = pixel_reader(decoder, resize, crop)
    return pool_rate(lambda i: read(datas[i]), len(datas), threads, reps)
