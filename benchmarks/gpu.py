"""The GPU check: every CUDA path of salient against its CPU path, then each model stage's throughput
on the device, in one command that needs this checkout and a few wheels (docs/benchmarks.md#on-a-gpu).

On a machine with Python, torch, torchvision, numpy, pillow and pyarrow, and nothing else:

    make gpu-wheels                                                          # where PyPI is reachable
    pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl    # there, in this checkout
    PYTHONPATH=/tmp/site:. python -m benchmarks.gpu [--quick] [--out DIR]

Each check prints one line, PASS, FAIL or SKIP with its figure, and one failing never stops the others:

- ``stream_<decoder>``: pixels of the CUDA image stream against the CPU stream's over many batches,
  a model computing beside it on the device: bit-identical;
- ``odd_files_<decoder>``: normal, truncated, corrupt, progressive, greyscale, CMYK and PNG-named
  files against pil: the same failures with the same reasons, no batch lost, pixels within a tolerance;
- ``precision_<p>``: features and top-1 through ``salient.inference.Inference`` against CPU fp32;
- ``nam_masks``, ``condition_masks``: NAM masks and evaluate's condition masks, CUDA against CPU;
- ``evaluate_noise``: evaluate's noisy images the same when run twice and at two batch sizes;
- ``attack_chunked``, ``attack_memory``: the chunked feature attack equals the whole one; its peak
  memory per image against ``salient.attack.bytes_per_image``;
- ``compile_<mode>``: a compiled ``Inference`` called from two threads equals the eager one.

Then rates through the stages' own code, in this process (``local_run`` + ``execute``): the model
alone per precision, decoding alone per decoder, activations per decoder and precision, generalize,
evaluate (one model at one sigma, and two models at once) and discover, as marginal rates between a
world and its quarter where the work grows with the world. ``--device cpu`` skips the CUDA-only
checks with their reason and runs everything else on the CPU. Results: ``--out`` (default
benchmarks/results/), gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Brought by the GPU machine itself (its own torch build): module -> distribution.
OWN = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow", "pyarrow": "pyarrow"}
# Everything else the check imports, as the wheels of `make gpu-wheels`: module -> distribution.
WHEELS = {
    "pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection", "typing_extensions": "typing-extensions", "yaml": "PyYAML",
    "fsspec": "fsspec", "zarr": "zarr", "numcodecs": "numcodecs", "google_crc32c": "google-crc32c",
    "donfig": "donfig", "packaging": "packaging", "rich": "rich",
}
WHEEL_DIR, SITE = ".gpu-wheels", "/tmp/site"


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an import blocked in sys.modules
        return False


def refuse(missing: list[str]) -> None:
    """Say in one line which module is missing and how to bring it; exit 2."""
    first, more = missing[0], f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
    if first in OWN:
        how = f"install {', '.join(OWN.values())} with this machine's pip (pyarrow is not among the wheels: its own is over their budget)"
    elif first == "salient":
        how = f"run it from the root of a salient checkout, with PYTHONPATH={SITE}:."
    else:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        how = (
            f"where PyPI is reachable run `make gpu-wheels GPU_PYTHON={py}` and copy {WHEEL_DIR}/ into this checkout, then here "
            f"`pip install --no-index --no-deps --target {SITE} {WHEEL_DIR}/*.whl` and `PYTHONPATH={SITE}:. python -m benchmarks.gpu`"
        )
    print(f"benchmarks.gpu: module {first!r} is missing{more}; {how}", file=sys.stderr)
    raise SystemExit(2)


_missing = [m for m in (*OWN, *WHEELS, "salient") if not _findable(m)]
if _missing:
    refuse(_missing)
try:
    import torch
    from PIL import Image

    from benchmarks.common import code_version, decode_rate, environment, write_photo_folder_threaded
    from benchmarks.pipeline import write_answers
    from salient import attack, config, evaluate, models, nam
    from salient.inference import Inference
    from salient.stage import LocalExecutor, PoolResult, Run, execute, local_run
    from salient.stages import BY_NAME
    from salient.stream import HostCopies, ImageStream
except ModuleNotFoundError as exc:
    refuse([exc.name or str(exc)])

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES, PAIRS_PER_CLASS, SIGMA = 8, 2, 0.25
RESIZE, CROP = 256, 224
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CUDA_ONLY = "compares CUDA with the CPU: no CUDA device here"
# What PASS means: tolerances of each check.
ODD_MAX_DIFF, ODD_MEAN_DIFF = 16, 1.0  # uint8 levels after resize and crop, against pil
PRECISION_TOL = {"fp32": (1e-2, 0.99), "bf16": (5e-2, 0.9), "fp16": (2e-2, 0.95)}  # features' relative L2, top-1 agreement
NAM_TOL = 1e-5  # float NAMs and masks; the uint8 masks within 1 level
ATTACK_TOL = 5e-3  # [0, 1] pixels: about one level of the stored strips
ESTIMATE_RANGE = (1.0, 8.0)  # bytes_per_image over the measured peak per image: never below, not wildly above
COMPILE_TOL = 1e-2  # relative L2 of the logits, compiled against eager
ODD_BATCH, COMPILE_BATCH, NOISE_IMAGES = 4, 8, 16


@dataclass
class Settings:
    """What one run measures; the sizes follow the device and ``--quick``."""

    device: str
    arch: str
    images: int  # the world; its quarter is the small one
    batch: int
    precisions: list[str]  # of the rates; the precision checks take every one
    decoders: list[str]
    stream_batch: int
    sample: int  # images of the precision checks
    iters: int  # timed batches of the model alone
    attack_batches: tuple[int, ...]
    attack_steps: int
    compile_calls: int

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def precision(self) -> str:
        """compute.precision of the stages' runs and of the attack's memory check."""
        return "bf16" if self.cuda else "fp32"


def settings(device: str, quick: bool, images: int | None, arch: str | None) -> Settings:
    if device == "cpu":
        return Settings(
            device, arch or "tiny_resnet", images or (16 if quick else 128), batch=16, precisions=["fp32"], decoders=["pil", "torchvision"],
            stream_batch=8, sample=8, iters=2, attack_batches=(2, 4), attack_steps=2, compile_calls=2,
        )
    return Settings(
        device, arch or "resnet50", images or (256 if quick else 2048), batch=64 if quick else 256, precisions=["bf16", "fp16", "fp32"],
        decoders=["pil", "torchvision", "nvjpeg"], stream_batch=16 if quick else 32, sample=32 if quick else 128,
        iters=5 if quick else 30, attack_batches=(4, 16) if quick else (8, 32, 64), attack_steps=2 if quick else 10, compile_calls=3 if quick else 6,
    )


@dataclass
class Ctx:
    """The inputs every check and rate shares: the world (and its quarter), its bytes, the odd
    files and the checkpoints (``main``, ``second`` for evaluate's two models, ``tiny`` to compile)."""

    s: Settings
    tmp: Path
    root: Path
    small: Path
    rels: list[str]
    datas: list[bytes]
    odd: dict[str, str]
    ckpts: dict[str, str]
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    @functools.cached_property
    def pixels(self) -> torch.Tensor:
        """The world's first ``2 * sample`` images decoded by pil: uint8 ``[n, 3, CROP, CROP]`` on the host."""
        read = read_feed(ImageStream(str(self.root), prep("pil"), "cpu", self.s.batch, self.threads), self.rels[: 2 * self.s.sample])
        return torch.stack([read.pixels[p] for p in sorted(read.pixels)])

    def sample_pixels(self, n: int) -> torch.Tensor:
        """``n`` images of :attr:`pixels`, repeated as needed."""
        return self.pixels[torch.arange(n) % len(self.pixels)]

    @functools.cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and top-1 of :meth:`sample_pixels` through the model on the CPU in fp32."""
        return features(load(self, device="cpu"), self.sample_pixels(self.s.sample))


def prep(decoder: str) -> config.PreprocessConfig:
    return config.PreprocessConfig(resize=RESIZE, crop=CROP, decoder=decoder)


def load(ctx: Ctx, device: str | None = None, precision: str = "fp32", compile: str = "none", ckpt: str = "main", batch: int | None = None) -> Inference:
    """A worker's model from one of the context's checkpoints, on ``device`` (default: the run's)."""
    compute = config.ComputeConfig(batch_size=batch or ctx.s.batch, precision=precision, compile=compile)
    arch = "tiny_resnet" if ckpt == "tiny" else ctx.s.arch
    return Inference.load(ctx.ckpts[ckpt], arch, "robustness", compute, device=device or ctx.s.device, need_discovery=True)


def write_checkpoint(path: Path, arch: str, seed: int) -> str:
    """A random-weight checkpoint of the world's classes in the robustness format, with BatchNorm
    statistics that are not the identity."""
    return models.write_random_checkpoint(str(path), arch, CLASSES, seed)


def subset_world(src: Path, dst: Path, fraction: float) -> int:
    """The first ``fraction`` of each class folder of ``src`` linked under ``dst``; returns the number of images."""
    n = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        files = sorted(folder.iterdir())
        for f in files[: max(1, int(len(files) * fraction))]:
            os.link(f, dst / folder.name / f.name)
            n += 1
    return n


ODD_KINDS = ("truncated", "corrupt", "progressive", "grey", "cmyk", "png")


def odd_file(kind: str, data: bytes) -> bytes:
    """``data`` (a baseline RGB JPEG) made into one odd kind of file, still named .JPEG."""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "corrupt":  # bytes flipped in the entropy-coded data: libjpeg conceals the damage
        out, scan = bytearray(data), data.find(b"\xff\xda") + 64
        for k in range(scan, len(data) - 2, max(1, (len(data) - scan) // 8)):
            out[k] ^= 0x5A
        return bytes(out)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        buf = io.BytesIO()
        if kind == "png":
            img.save(buf, format="PNG")
        else:
            mode = {"progressive": "RGB", "grey": "L", "cmyk": "CMYK"}[kind]
            img.convert(mode).save(buf, format="JPEG", quality=90, progressive=kind == "progressive")
    return buf.getvalue()


def write_odd_folder(root: Path, datas: list[bytes]) -> dict[str, str]:
    """Under ``root/odd/``: each odd kind between normal JPEGs, then a whole batch of truncated
    files; returns relpath -> kind."""
    kinds = [k for odd in ODD_KINDS for k in ("normal", odd)] + ["truncated"] * ODD_BATCH
    (root / "odd").mkdir(parents=True)
    out = {}
    for i, kind in enumerate(kinds):
        data = datas[i % len(datas)]
        rel = f"odd/{i:03d}_{kind}.JPEG"
        (root / rel).write_bytes(data if kind == "normal" else odd_file(kind, data))
        out[rel] = kind
    return out


@dataclass
class Read:
    """A feed read whole: host pixels and failures by position, the batches, and every position
    handed over (pixels or failure) in order."""

    pixels: dict[int, torch.Tensor]
    failures: dict[int, str]
    batches: int
    seen: list[int]

    def lost(self, n: int) -> list[int]:
        """Positions of ``range(n)`` not handed over exactly once."""
        return [p for p in range(n) if self.seen.count(p) != 1]


def read_feed(stream: ImageStream, rels: list[str], on_batch: Callable[[torch.Tensor], object] | None = None) -> Read:
    """Every image of one feed of ``stream`` (closed after), copied back to the host as workers copy
    results, without a wait per batch; ``on_batch`` gets each batch's device pixels first."""
    copies = HostCopies(stream.device)
    held, failures, seen, batches = [], {}, [], 0
    try:
        for batch in stream.open(rels):
            batches += 1
            if on_batch is not None:
                on_batch(batch.pixels)
            held.append((batch.positions, copies.add(batch.pixels)))
            failures.update(batch.failures)
            seen += batch.positions + [p for p, _ in batch.failures]
        copies.wait()
    finally:
        stream.close()
    return Read({p: host[k] for positions, host in held for k, p in enumerate(positions)}, failures, batches, seen)


def pixel_diff(a: Read, b: Read, positions: Iterable[int]) -> tuple[int, float]:
    """Max and mean absolute difference, in uint8 levels, of the images at ``positions``."""
    diffs = [(a.pixels[p].int() - b.pixels[p].int()).abs() for p in positions]
    if not diffs:
        return 0, 0.0
    return int(max(d.max() for d in diffs)), float(torch.stack([d.float().mean() for d in diffs]).mean())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| on the host, in float32."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def skip(reason: str) -> dict:
    return {"status": SKIP, "figure": reason}


def verdict(ok: bool, figure: str, **figures: Any) -> dict:
    return {"status": PASS if ok else FAIL, "figure": figure, **figures}


# ---- checks ------------------------------------------------------------------------------------


def check_stream(ctx: Ctx, decoder: str) -> dict:
    """The CUDA stream's pixels against the CPU stream's, while another model runs on the device."""
    if not ctx.s.cuda:
        return skip(CUDA_ONLY)
    b = ctx.s.stream_batch
    ref = read_feed(ImageStream(str(ctx.root), prep(decoder), "cpu", b, ctx.threads), ctx.rels)
    worker, neighbour = load(ctx, precision=ctx.s.precision, batch=b), load(ctx, precision=ctx.s.precision)
    stop, errors = threading.Event(), []

    def busy() -> None:
        x = torch.randint(0, 256, (ctx.s.batch, 3, CROP, CROP), dtype=torch.uint8, device=ctx.s.device)
        try:
            while not stop.is_set():
                neighbour(x).logits.sum().item()
        except Exception as exc:  # noqa: BLE001 -- raised in the check's thread below
            errors.append(exc)

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        got = read_feed(ImageStream(str(ctx.root), prep(decoder), ctx.s.device, b, ctx.threads), ctx.rels, on_batch=worker)
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    lost = got.lost(len(ctx.rels))
    diff, _ = pixel_diff(ref, got, [p for p in ref.pixels if p in got.pixels])
    ok = not lost and not got.failures and not ref.failures and diff == 0 and len(got.pixels) == len(ctx.rels)
    return verdict(
        ok, f"max |diff| {diff} over {got.batches} batches of {b} ({len(got.pixels)} images, {len(lost)} lost, {len(got.failures)} failed)",
        max_abs_diff=diff, batches=got.batches, lost=len(lost), failed=len(got.failures),
    )


def check_odd_files(ctx: Ctx, decoder: str) -> dict:
    """``decoder`` on the odd files against pil on the CPU: same failures and reasons, nothing lost, close pixels."""
    if decoder == "nvjpeg" and not ctx.s.cuda:
        return skip("nvjpeg decodes on a CUDA GPU: no CUDA device here")
    rels, root = list(ctx.odd), str(ctx.tmp / "odd-world")
    ref = read_feed(ImageStream(root, prep("pil"), "cpu", ODD_BATCH, ctx.threads), rels)
    got = read_feed(ImageStream(root, prep(decoder), ctx.s.device, ODD_BATCH, ctx.threads), rels)
    lost = [rels[p] for p in got.lost(len(rels))]
    wrong = [f"{rels[p]}: {got.failures.get(p)} (pil: {ref.failures.get(p)})" for p in range(len(rels)) if got.failures.get(p) != ref.failures.get(p)]
    both = [p for p in ref.pixels if p in got.pixels]
    worst, mean = pixel_diff(ref, got, [p for p in both if ctx.odd[rels[p]] != "corrupt"])
    concealed, _ = pixel_diff(ref, got, [p for p in both if ctx.odd[rels[p]] == "corrupt"])
    ok = not lost and not wrong and worst <= ODD_MAX_DIFF and mean <= ODD_MEAN_DIFF
    return verdict(
        ok, f"max/mean diff {worst}/{mean:.3f} (<= {ODD_MAX_DIFF}/{ODD_MEAN_DIFF}) on {len(both)} images; {len(ref.failures)} failures "
        f"{'as pil' if not wrong else 'NOT as pil'}; {len(lost)} lost of {len(rels)} in {got.batches} batches; corrupt file max diff {concealed}",
        max_diff=worst, mean_diff=mean, corrupt_max_diff=concealed, failures_unlike_pil=wrong, lost=lost, batches=got.batches,
    )


def features(inf: Inference, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32) and top-1 of uint8 images ``x`` through ``inf``, on the host."""
    feats, preds = [], []
    for s in range(0, len(x), inf.batch_size):
        out = inf(x[s : s + inf.batch_size].to(inf.device))
        feats.append(out.features.float().cpu())
        preds.append(out.logits.argmax(dim=1).cpu())
    return torch.cat(feats), torch.cat(preds)


def check_precision(ctx: Ctx, precision: str) -> dict:
    """Features and top-1 at ``precision`` on the device against fp32 on the CPU."""
    if precision == "fp16" and not ctx.s.cuda:
        return skip("fp16 runs on CUDA only (Inference refuses it on the CPU)")
    ref_f, ref_p = ctx.reference
    f, p = features(load(ctx, precision=precision), ctx.sample_pixels(ctx.s.sample))
    rel, agree = relative_l2(f, ref_f), float((p == ref_p).float().mean())
    tol, least = PRECISION_TOL[precision]
    return verdict(
        rel <= tol and agree >= least,
        f"features relative L2 {rel:.2e} (<= {tol:g}), top-1 agreement {agree:.3f} (>= {least}) on {len(p)} images, against CPU fp32",
        relative_l2=rel, top1_agreement=agree, images=len(p),
    )


def check_nam_masks(ctx: Ctx) -> dict:
    """NAMs, their float masks and their stored uint8 masks on CUDA against the CPU."""
    if not ctx.s.cuda:
        return skip(CUDA_ONLY)
    g = torch.Generator().manual_seed(0)
    maps = torch.relu(torch.randn((32, 64, 7, 7), generator=g))
    maps[::5] = 0  # an all-zero map stays zero
    channels = torch.randint(0, 64, (32,), generator=g)
    low, up = nam.nams(maps, channels, CROP)
    low_d, up_d = nam.nams(maps.to(ctx.s.device), channels.to(ctx.s.device), CROP)
    d_low, d_up = max_abs(low, low_d), max_abs(up, up_d)
    d_u8 = max_abs(nam.masks_uint8(low, CROP), nam.masks_uint8(low_d, CROP))
    ok = d_low <= NAM_TOL and d_up <= NAM_TOL and d_u8 <= 1
    return verdict(ok, f"max |diff| NAM {d_low:.1e}, mask {d_up:.1e} (<= {NAM_TOL:g}), uint8 mask {d_u8:g} levels (<= 1) on 32 maps", nam=d_low, mask=d_up, uint8=d_u8)


def eval_block(rels: list[str]) -> evaluate.EvalBlock:
    """A block of one image per relpath: image i has 1 to 3 masks, a pair condition for each and a
    set condition over all of them."""
    images, row = [], 0
    for i, rel in enumerate(rels):
        rows = list(range(row, row + 1 + i % 3))
        conds = [evaluate.Condition(f"pair:0:{r}", 0, [r]) for r in rows] + [evaluate.Condition("core:0", 0, rows)]
        images.append(evaluate.ImageWork(rel, i, conds))
        row = rows[-1] + 1
    return evaluate.EvalBlock(0, images, 0, row)


def random_masks(rows: int, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (rows, CROP, CROP), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)).to(device)


def check_condition_masks(ctx: Ctx) -> dict:
    """evaluate.condition_masks on CUDA (batched gather) against the CPU (row by row)."""
    if not ctx.s.cuda:
        return skip(CUDA_ONLY)
    block = eval_block([f"x{i}" for i in range(24)])
    masks = random_masks(block.hi, "cpu")
    d = max_abs(evaluate.condition_masks(block, masks), evaluate.condition_masks(block, masks.to(ctx.s.device)))
    return verdict(d == 0, f"max |diff| {d:g} over {sum(len(w.conditions) for w in block.images)} conditions of 1 to 3 masks", max_abs_diff=d)


def noisy_images(ctx: Ctx, block: evaluate.EvalBlock, masks: torch.Tensor, batch: int) -> dict[tuple, torch.Tensor]:
    """Every image evaluate_block makes for ``block`` (clean and noisy at two sigmas, two trials),
    read through the stream in batches of ``batch``: (image_id, condition, sigma, trial) -> image."""
    made: list[torch.Tensor] = []

    def keep(x: torch.Tensor) -> torch.Tensor:  # a "prediction" per image: where it is kept
        made.extend(x.detach().to("cpu", copy=True))
        return torch.arange(len(made) - len(x), len(made), device=x.device)

    stats = models.IMAGENET_MEAN, models.IMAGENET_STD
    mean, std = (torch.tensor(v, device=ctx.s.device).view(1, 3, 1, 1) for v in stats)
    stream = ImageStream(str(ctx.root), prep("pil"), ctx.s.device, batch, ctx.threads)
    try:
        feed = stream.open([w.relpath for w in block.images])
        table = evaluate.evaluate_block({"m": (keep, [SIGMA, 1.0])}, block, feed, masks, 2, 0, batch, normalization=(mean, std))["m"]
    finally:
        stream.close()
    return {
        (r["image_id"], r["condition"], None if math.isnan(r["sigma"]) else r["sigma"], r["trial"]): made[r["pred"]]
        for r in table.to_pylist()
    }


def check_evaluate_noise(ctx: Ctx) -> dict:
    """evaluate_block's images on the device: the same run twice, and with batches of 5 and of 16."""
    block = eval_block(ctx.rels[:NOISE_IMAGES])
    masks = random_masks(block.hi, ctx.s.device)
    a, again, other = (noisy_images(ctx, block, masks, b) for b in (5, 5, 16))
    same_keys = a.keys() == again.keys() == other.keys()
    d_again = max(max_abs(a[k], again[k]) for k in a) if same_keys else math.inf
    d_other = max(max_abs(a[k], other[k]) for k in a) if same_keys else math.inf
    ok = same_keys and d_again == 0 and d_other == 0
    return verdict(
        ok, f"max |diff| run twice {d_again:g}, batch 5 against 16 {d_other:g} over {len(a)} images made from {len(block.images)}",
        run_twice=d_again, batch_sizes=d_other, images_made=len(a),
    )


def attack_inputs(ctx: Ctx, inf: Inference, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1] on the device, channels-last, and a feature for each."""
    return inf.unit(ctx.sample_pixels(n)), torch.arange(n, device=inf.device) * 37 % inf.net.feature_dim


def check_attack_chunked(ctx: Ctx) -> dict:
    """The feature attack on 8 images in chunks of 3 (padded where the worker pads, as discover
    calls it) against all at once, in fp32."""
    inf = load(ctx)
    x, idx = attack_inputs(ctx, inf, 8)
    steps = ctx.s.attack_steps
    whole = attack.feature_attack(inf.net, x, idx, steps, 10.0)
    chunked = attack.feature_attack(inf.net, x, idx, steps, 10.0, chunk=3, pad=inf.pads)
    d = max_abs(whole, chunked)
    return verdict(
        d <= ATTACK_TOL, f"max |diff| {d:.1e} (<= {ATTACK_TOL:g}), 8 images in chunks of 3{' padded' if inf.pads else ''} against at once, {steps} steps",
        max_abs_diff=d,
    )


def check_attack_memory(ctx: Ctx) -> dict:
    """The attack's peak device memory per image against attack.bytes_per_image."""
    if not ctx.s.cuda:
        return skip("peak memory is measured on CUDA: no CUDA device here")
    inf = load(ctx, precision=ctx.s.precision)
    estimate = attack.bytes_per_image(inf.net, CROP, inf.device)
    peaks = {}
    for n in ctx.s.attack_batches:
        x, idx = attack_inputs(ctx, inf, n)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with inf.autocast():
            attack.feature_attack(inf.net, x, idx, 2, 10.0)
        peaks[n] = torch.cuda.max_memory_allocated() - base
        del x, idx
    lo, hi = min(peaks), max(peaks)
    per_image = (peaks[hi] - peaks[lo]) / (hi - lo)
    if per_image <= 0:
        raise RuntimeError(f"the attack's peak memory did not grow with the batch (peaks in bytes: {peaks}); the measurement is not usable")
    ratio = estimate / per_image
    mib = 2**20
    return verdict(
        ESTIMATE_RANGE[0] <= ratio <= ESTIMATE_RANGE[1],
        f"estimate {estimate / mib:.1f} MiB per image, measured {per_image / mib:.1f} (batches {lo} to {hi}, {ctx.s.precision}): "
        f"{ratio:.2f}x (in {ESTIMATE_RANGE[0]:g}-{ESTIMATE_RANGE[1]:g}x); peaks " + ", ".join(f"{n}: {p / mib:.0f} MiB" for n, p in peaks.items()),
        estimate_bytes=estimate, measured_bytes_per_image=per_image, peak_bytes=peaks, ratio=ratio,
    )


def check_compile(ctx: Ctx, mode: str) -> dict:
    """A compiled Inference (tiny_resnet) called from two threads, full and partial batches, against eager."""
    if mode == "reduce-overhead" and not ctx.s.cuda:
        return skip("reduce-overhead is CUDA graphs: no CUDA device here")
    eager = load(ctx, ckpt="tiny", batch=COMPILE_BATCH)
    compiled = load(ctx, ckpt="tiny", batch=COMPILE_BATCH, compile=mode)
    g = torch.Generator().manual_seed(1)
    sizes = [COMPILE_BATCH if k % 2 == 0 else COMPILE_BATCH - 3 for k in range(ctx.s.compile_calls)]
    inputs = [[torch.randint(0, 256, (n, 3, CROP, CROP), dtype=torch.uint8, generator=g) for n in sizes] for _ in range(2)]
    outs: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def caller(t: int) -> None:
        try:
            for k, x in enumerate(inputs[t]):
                with compiled.lock:
                    outs[(t, k)] = compiled(x.to(compiled.device)).logits.float().cpu()  # copied before the next call
        except Exception as exc:  # noqa: BLE001 -- raised in the check's thread below
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    rel = max(relative_l2(out, eager(inputs[t][k].to(eager.device)).logits) for (t, k), out in outs.items())
    return verdict(
        rel <= COMPILE_TOL, f"2 threads x {len(sizes)} calls, batches of {COMPILE_BATCH} and {COMPILE_BATCH - 3}: max relative L2 "
        f"to eager {rel:.1e} (<= {COMPILE_TOL:g}); {seconds:.0f} s with compiling", relative_l2=rel, seconds=seconds,
    )


def check_functions(ctx: Ctx) -> dict[str, Callable[[], dict]]:
    p = functools.partial
    return {
        "stream_pil": p(check_stream, ctx, "pil"), "stream_torchvision": p(check_stream, ctx, "torchvision"),
        "odd_files_torchvision": p(check_odd_files, ctx, "torchvision"), "odd_files_nvjpeg": p(check_odd_files, ctx, "nvjpeg"),
        **{f"precision_{q}": p(check_precision, ctx, q) for q in ("fp32", "bf16", "fp16")},
        "nam_masks": p(check_nam_masks, ctx), "condition_masks": p(check_condition_masks, ctx),
        "evaluate_noise": p(check_evaluate_noise, ctx), "attack_chunked": p(check_attack_chunked, ctx),
        "attack_memory": p(check_attack_memory, ctx),
        **{f"compile_{mode}": p(check_compile, ctx, mode) for mode in ("default", "reduce-overhead")},
    }


# ---- rates -------------------------------------------------------------------------------------


@contextlib.contextmanager
def gpu_busy(device: str) -> Iterator[list[float]]:
    """The GPU's utilisation (%) every 100 ms while the block runs, by ``nvidia-smi`` (no samples without it)."""
    samples: list[float] = []
    if device != "cuda" or not shutil.which("nvidia-smi"):
        yield samples
        return
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    query = ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
    proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield samples
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        samples += [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]  # not [N/A] (a MIG slice)


class Recording(LocalExecutor):
    """The in-process executor, keeping what its workers returned (their timing stats)."""

    def __init__(self) -> None:
        self.results: list[Any] = []

    def pool(self, builder: Any, payloads: Any, **kwargs: Any) -> PoolResult:
        out = super().pool(builder, payloads, **kwargs)
        self.results += out.results
        return out


@dataclass
class Timing:
    seconds: float
    summary: dict
    workers: list[Any]
    gpu_percent: float | None


def timed(ctx: Ctx, run: Run, name: str) -> Timing:
    """One stage of ``run`` on its current build, timed, its workers' results kept. Of evaluate
    only its compute runs: the tables and charts after it are the driver's (and need matplotlib)."""
    stage = BY_NAME[name]
    run.executor = Recording()
    with gpu_busy(ctx.s.device) as samples:
        t0 = time.perf_counter()
        if name == "evaluate":
            stage.compute(run, stage.plan(run), lambda item, result: None)
            summary: dict = {}
        else:
            summary = execute(stage, run)
        seconds = time.perf_counter() - t0
    return Timing(seconds, summary, run.executor.results, round(statistics.fmean(samples), 1) if samples else None)


def stage_config(ctx: Ctx, root: Path, out: Path, decoder: str, precision: str, eval_models: int = 1) -> config.Config:
    """The pipeline on ``root`` into ``out``: every image of a class in the top lists and masks of
    both its pairs, evaluate at one sigma with the first ``eval_models`` of the two models."""
    entries = ", ".join(
        f"{{name: model-{k}, arch: {ctx.s.arch}, format: robustness, checkpoint: {ctx.ckpts[k]}}}" for k in ("main", "second")[:eval_models]
    )
    return config.load(None, [
        f"dataset.root={root}", f"model.checkpoint={ctx.ckpts['main']}", f"model.arch={ctx.s.arch}", "model.format=robustness",
        f"preprocess.resize={RESIZE}", f"preprocess.crop={CROP}", f"preprocess.decoder={decoder}", f"output={out}",
        f"compute.batch_size={ctx.s.batch}", f"compute.precision={precision}", "aggregate.grouping=label",
        f"aggregate.features_per_class={PAIRS_PER_CLASS}", f"aggregate.top_k_class={ctx.s.images}", f"generalize.images_per_pair={ctx.s.images}",
        "generalize.masks_per_shard=64", "evaluate.images_per_block=64", f"evaluate.models=[{entries}]", f"evaluate.sigmas=[{SIGMA}]",
        f"discover.attack_steps={ctx.s.attack_steps}",
    ])


def rate_model_only(ctx: Ctx, precision: str) -> dict:
    """Images/s of the model alone (as a worker runs it) on a ready batch of pixels on the device."""
    inf = load(ctx, precision=precision)
    b = ctx.s.batch
    x = torch.randint(0, 256, (b, CROP, CROP, 3), dtype=torch.uint8, device=inf.device).permute(0, 3, 1, 2)
    for _ in range(3 if ctx.s.cuda else 1):
        inf(x)
    if ctx.s.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(ctx.s.iters):
        inf(x)
    if ctx.s.cuda:
        torch.cuda.synchronize()
    rate = b * ctx.s.iters / (time.perf_counter() - t0)
    return {"figure": f"{rate:.1f} img/s (batch {b}, {ctx.s.iters} batches)", "images_per_s": rate}


def rate_decode_only(ctx: Ctx, decoder: str) -> dict:
    """Images/s of decoding alone, bytes in memory: every core, or batches on the GPU for nvjpeg."""
    if decoder != "nvjpeg":
        rate = decode_rate(ctx.datas, decoder, RESIZE, CROP)
        return {"figure": f"{rate:.1f} img/s on {ctx.threads} threads", "images_per_s": rate}
    stream = ImageStream(None, prep("nvjpeg"), ctx.s.device, ctx.s.batch, ctx.threads)
    b = ctx.s.batch
    stream.decode_on_device([stream.decode(d) for d in ctx.datas[:b]])
    checked = [stream.decode(d) for d in ctx.datas]  # the header check, on the decode threads in a feed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(checked), b):
        stream.decode_on_device(checked[s : s + b])
    torch.cuda.synchronize()
    rate = len(checked) / (time.perf_counter() - t0)
    stream.close()
    return {"figure": f"{rate:.1f} img/s in batches of {b} (header checks not counted)", "images_per_s": rate}


def marginal(work: tuple[float, float], seconds: tuple[float, float]) -> float | None:
    """Items per second between the small and the large world; None where the large one was not slower."""
    return (work[1] - work[0]) / (seconds[1] - seconds[0]) if seconds[1] > seconds[0] and work[1] > work[0] else None


def per_s(rate: float | None, unit: str) -> str:
    return f"{rate:.1f} {unit}/s marginal" if rate is not None else f"marginal {unit}/s n/a (the large world was not slower)"


def waited(stats: list[dict]) -> float | None:
    """The share of the activations workers' time the device waited for decoded images."""
    total = sum(s["seconds"]["total"] for s in stats)
    return sum(s["seconds"]["wait"] for s in stats) / total if total else None


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}%"


def rate_activations(ctx: Ctx, decoder: str, precision: str) -> dict:
    """The activations stage on the world and on its quarter: marginal images/s."""
    times = []
    for world in (ctx.small, ctx.root):
        cfg = stage_config(ctx, world, ctx.tmp / "out" / f"act-{decoder}-{precision}-{world.name}", decoder, precision)
        times.append(timed(ctx, local_run(cfg, [BY_NAME["activations"]]), "activations"))
    small, large = times
    rate = marginal((small.summary["images"], large.summary["images"]), (small.seconds, large.seconds))
    wait = waited(large.workers)
    return {
        "figure": f"{per_s(rate, 'img')}, GPU {percent(large.gpu_percent)}, device waiting for input {share(wait)}",
        "images_per_s": rate, "seconds": [small.seconds, large.seconds], "gpu_percent": large.gpu_percent, "device_wait_share": wait,
    }


def pipeline_timings(ctx: Ctx, world: Path) -> dict[str, Timing]:
    """The pipeline on one world (pil, the runs' precision): generalize, evaluate with one model,
    then with two, and on the whole world discover, timed."""
    out = ctx.tmp / "out" / f"pipeline-{world.name}"
    cfg = stage_config(ctx, world, out, "pil", ctx.s.precision)
    run = local_run(cfg, [BY_NAME[s] for s in ("activations", "aggregate", "ingest", "generalize", "evaluate", "discover")])
    for name in ("activations", "aggregate"):
        execute(BY_NAME[name], run)
    write_answers(run)
    execute(BY_NAME["ingest"], run)
    got = {name: timed(ctx, run, name) for name in ("generalize", "evaluate")}
    two = stage_config(ctx, world, out, "pil", ctx.s.precision, eval_models=2)
    got["evaluate_two_models"] = timed(ctx, local_run(two, [BY_NAME["evaluate"]]), "evaluate")
    if world == ctx.root:  # its work is the same on both worlds: the pairs' top images
        got["discover"] = timed(ctx, run, "discover")
    return got


def feed_images(t: Timing) -> int:
    return sum(r.feed["images"] for r in t.workers)


def rate_pipeline(ctx: Ctx, timings: dict[Path, dict[str, Timing]], name: str) -> dict:
    """generalize (masks/s), evaluate (images/s) or discover (pairs/s) from the pipeline's timings."""
    large = timings[ctx.root][name]
    if name == "discover":
        rate = large.summary["pairs"] / large.seconds
        return {
            "figure": f"{rate:.2f} pairs/s for the whole stage ({large.summary['pairs']} pairs, {ctx.s.attack_steps} attack steps, model load included)",
            "pairs_per_s": rate, "attack_steps": ctx.s.attack_steps,
        }
    small = timings[ctx.small][name]
    seconds = (small.seconds, large.seconds)
    if name == "generalize":
        rate = marginal((small.summary["masks"], large.summary["masks"]), seconds)
        return {"figure": f"{per_s(rate, 'masks')}, GPU {percent(large.gpu_percent)}", "masks_per_s": rate, "gpu_percent": large.gpu_percent}
    rate = marginal((feed_images(small), feed_images(large)), seconds)
    wait = sum(r.feed["wait_s"] for r in large.workers) / large.seconds
    models_ = 2 if name == "evaluate_two_models" else 1
    return {
        "figure": f"{per_s(rate, 'img')} for {models_} model(s) at sigma {SIGMA}, GPU {percent(large.gpu_percent)}, "
        f"device waiting for input {share(wait)}",
        "images_per_s": rate, "models": models_, "gpu_percent": large.gpu_percent, "device_wait_share": wait,
    }


def rate_functions(ctx: Ctx) -> dict[str, Callable[[], dict]]:
    p = functools.partial
    out: dict[str, Callable[[], dict]] = {}
    out.update({f"model_only_{q}": p(rate_model_only, ctx, q) for q in ctx.s.precisions})
    out.update({f"decode_only_{d}": p(rate_decode_only, ctx, d) for d in ctx.s.decoders})
    out.update({f"activations_{d}_{q}": p(rate_activations, ctx, d, q) for d in ctx.s.decoders for q in ctx.s.precisions})
    timings: dict[Path, dict[str, Timing]] = {}

    def pipeline(name: str) -> dict:
        if not timings:
            timings.update({world: pipeline_timings(ctx, world) for world in (ctx.small, ctx.root)})
        return rate_pipeline(ctx, timings, name)

    out.update({name: p(pipeline, name) for name in ("generalize", "evaluate", "evaluate_two_models", "discover")})
    return out


# ---- the run -----------------------------------------------------------------------------------


def error(exc: BaseException) -> dict:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}", "traceback": "".join(lines[-4:])[-2000:]}


def record(where: dict, name: str, fn: Callable[[], dict], failed: str) -> None:
    """Run one check or rate into ``where[name]`` and print its line; an exception is recorded as ``failed``."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 -- recorded; the others still run
        out = {"status": failed, "figure": error(exc)["error"], **error(exc)}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    where[name] = out
    print(f"{out.get('status', 'RATE'):<5} {name:<28} {out['figure']}", flush=True)


def make_world(s: Settings, tmp: Path) -> Ctx:
    """The world of photo-like JPEGs in CLASSES classes, its quarter, the odd files and the checkpoints."""
    t0 = time.perf_counter()
    root, small = tmp / "world", tmp / "world-small"
    write_photo_folder_threaded(root, s.images, classes=CLASSES)
    n_small = subset_world(root, small, 0.25)
    rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.JPEG"))
    datas = [(root / r).read_bytes() for r in rels]
    odd = write_odd_folder(tmp / "odd-world", datas)
    ckpts = {k: write_checkpoint(tmp / f"{k}.pt", arch, seed) for k, arch, seed in (("main", s.arch, 0), ("second", s.arch, 1), ("tiny", "tiny_resnet", 2))}
    print(f"wrote {s.images} JPEGs ({n_small} in the quarter), {len(odd)} odd files and 3 checkpoints in {time.perf_counter() - t0:.1f} s", flush=True)
    return Ctx(s, tmp, root, small, rels, datas, odd, ckpts)


def cell(text: str) -> str:
    """``text`` for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(r: dict) -> str:
    code, env = r["code"], r["environment"]
    lines = [
        "# The GPU check\n",
        f"{env['cuda'] or 'CPU'} ({r['device']}{', --quick' if r['quick'] else ''}), salient at {code.get('commit')}"
        f"{' (modified)' if code.get('salient_modified') else ''}, torch {env['torch']}, Python {env['python']}; {r['settings']['arch']} "
        f"(random weights) at {CROP} from {RESIZE}, batch {r['settings']['batch']}; {r['settings']['images']} photo-like 500x375 "
        f"JPEGs in {CLASSES} classes; {env['cpus']} CPUs; {r['wall_s']} s in all.\n",
        "| check | result | figure |", "|---|---|---|",
        *(f"| {name} | {c['status']} | {cell(c['figure'])} |" for name, c in r["checks"].items()),
        "\n| rate | figure |", "|---|---|",
        *(f"| {name} | {cell(v['figure'])} |" for name, v in r["rates"].items()),
    ]
    return "\n".join(lines) + "\n"


def wheel_list() -> list[str]:
    """``name==version`` of every wheel the check needs, at the versions of this environment."""
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in WHEELS.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    ap.add_argument("--quick", action="store_true", help="small sizes: a check of the check")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where gpu.json and gpu.md go (default: benchmarks/results/)")
    ap.add_argument("--images", type=int, default=None, help="images of the world (default 2048 on cuda, 256 with --quick; 128 and 16 on the CPU)")
    ap.add_argument("--arch", default=None, help="the studied model (default resnet50 on cuda, tiny_resnet on the CPU)")
    ap.add_argument("--wheel-list", action="store_true", help="print name==version of the wheels `make gpu-wheels` downloads, and exit")
    args = ap.parse_args()
    if args.wheel_list:
        print("\n".join(wheel_list()))
        return
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: the stages' workers then run on the CPU too
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: --device cuda, but torch sees no CUDA device (check the driver with nvidia-smi); --device cpu checks the script")
    s = settings(device, args.quick, args.images, args.arch)
    t_start = time.perf_counter()
    results: dict = {
        "benchmark": "gpu", "device": device, "quick": args.quick, "settings": asdict(s), "environment": environment(),
        "code": code_version(), "checks": {}, "rates": {},
    }
    with tempfile.TemporaryDirectory(prefix="salient-gpu-check-") as tmp:
        ctx = make_world(s, Path(tmp))
        for name, fn in check_functions(ctx).items():
            record(results["checks"], name, fn, FAIL)
        for name, fn in rate_functions(ctx).items():
            record(results["rates"], name, fn, "ERROR")
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "gpu.md").write_text(markdown(results))
    statuses = [c["status"] for c in results["checks"].values()]
    errors = [n for n, v in results["rates"].items() if v.get("status") == "ERROR"]
    print(
        f"checks: {statuses.count(PASS)} PASS, {statuses.count(FAIL)} FAIL, {statuses.count(SKIP)} SKIP; rates: {len(errors)} errors; "
        f"{results['wall_s']} s; results in {args.out / 'gpu.json'} and gpu.md",
        flush=True,
    )
    if FAIL in statuses or errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
