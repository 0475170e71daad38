"""Per-stage throughput of one worker on ResNet-50 at 224 (measured here), and the projected wall time
and cost of a full ImageNet rebuild on N GPUs (estimated from published GPU figures).

Each stage's own worker code runs on a few photo-like 500x375 JPEGs with a random-weight ResNet-50,
the model loaded and warmed up first: the activation runner on one shard; the discovery runner on
one class without the attack, and the feature attack (forward and backward per step) timed alone
on the same images; the mask runner on Zarr blocks (one mask per image); the
evaluation runner on those masks, read back from the store (a clean pass and two noisy passes per
image at one sigma). The model's forward passes are counted and timed, so each stage's time splits
into model time and host time (reading, decoding, noise, NAMs, mask reads, PNG and Zarr writes).

GPU projection (an estimate): a forward pass costs 1 / the published ResNet-50 inference
throughput of the GPU; an attack step costs the step / forward ratio measured here times that;
host time stays as measured on one core of this machine, except the activation stage's decoding,
which its runner spreads over the node's vCPUs, and the aggregation's shard passes, spread over
the cluster's vCPUs. The workload is ImageNet train with the settings of configs/imagenet-s3.yaml.

    python -m benchmarks.stages [--images 32] [--gpus 1 8 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torchvision

from benchmarks.common import RESULTS, environment, one_shard, save, write_photo_folder
from salient import activations, attack, config, discover, evaluate, images, masks, models
from salient.config import ComputeConfig, DiscoverConfig, EvalModelConfig, GeneralizeConfig, ModelConfig, PreprocessConfig

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000
BATCH = 32
RAY_STAGES = ("activations", "aggregate", "discover", "generalize", "evaluate")  # each starts Ray and its workers

# Published ResNet-50 v1.5 inference throughput, mixed precision, batch 256, PyTorch (NVIDIA
# DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Inference
# performance results", pytorch-21.03 NGC container), and AWS EC2 on-demand prices (us-east-1,
# Linux) of a one-GPU instance with 8 vCPUs.
GPU_PROFILES = {
    "T4": {"resnet50_images_per_s": 1198, "instance": "g4dn.2xlarge", "vcpus": 8, "usd_per_hour": 0.752},
    "V100": {"resnet50_images_per_s": 3382, "instance": "p3.2xlarge", "vcpus": 8, "usd_per_hour": 3.06},
}
PUBLISHED = (
    "NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 README, inference performance, mixed precision, "
    "batch 256 (pytorch-21.03 NGC container)"
)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class ModelClock:
    """Stands in for a worker's model (its :class:`salient.inference.Inference`), adding up the
    seconds and images of its forward passes."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.seconds, self.images = net, 0.0, 0

    def __call__(self, x: torch.Tensor):
        t0 = time.perf_counter()
        out = self.net(x)
        self.seconds += time.perf_counter() - t0
        self.images += len(x)
        return out

    def __getattr__(self, name: str):
        return getattr(self.net, name)

    def reset(self) -> None:
        self.seconds, self.images = 0.0, 0


def forward_rate(ckpt: str, threads: int, reps: int = 3) -> float:
    """Images/s of the plain ResNet-50 forward pass (fp32, batch 32) on this machine."""
    net, _ = models.load_for_worker(ckpt, "resnet50", "robustness", "cpu", threads)
    x = torch.rand(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net(x)
        seconds = min(_timed(lambda: net(x)) for _ in range(reps))
    return BATCH / seconds


def decode_seconds(root: Path, rels: list[str]) -> float:
    """Seconds per image to read, decode, resize and crop, on one thread."""
    datas = [(root / r).read_bytes() for r in rels]
    return _timed(lambda: [images.load_image(d, 256, 224) for d in datas]) / len(rels)


def measure_activations(root: Path, out: Path, ckpt: str, threads: int) -> dict:
    shard = one_shard(root)
    runner = activations.ActivationRunner(
        ModelConfig(checkpoint=ckpt, arch="resnet50"), PreprocessConfig(), ComputeConfig(batch_size=BATCH), threads=threads, device="cpu",
    )
    runner.inference(torch.rand(BATCH, 3, 224, 224))  # warm-up
    stats = runner(activations.ShardTask(shard, str(root), str(out), "bench", "bench"))
    n = stats["images"]
    per = {k: v / n for k, v in stats["seconds"].items()}
    return {
        "images": n, "images_per_s": n / stats["seconds"]["total"],
        "seconds_per_image": per,
        # the runner decodes on `threads` threads while the model runs; one image's model time
        "model_s": per["infer"], "host_parallel_s": per["read"] + per["decode"], "host_serial_s": per["write"],
        "decode_threads": stats["worker"]["decode_threads"],
    }


def measure_discover(root: Path, out: Path, ckpt: str, threads: int, rels: list[str], pairs: int, shown: int, steps: int = 3, reps: int = 2) -> dict:
    """The discovery runner on one class without the attack (host time per pair), and its feature
    attack timed alone on the same images, next to a plain forward pass of the same batch."""
    runner = discover.DiscoverRunner(
        ModelConfig(checkpoint=ckpt, arch="resnet50"), PreprocessConfig(), ComputeConfig(batch_size=BATCH), DiscoverConfig(attack_steps=0),
        threads=threads, device="cpu",
    )
    wnid = rels[0].split("/")[0]
    work = [discover.ClassWork(0, str(root), str(out), [
        discover.PairWork(0, wnid, j, j + 1, list(range(j * shown, (j + 1) * shown)), rels[j * shown : (j + 1) * shown], f"bench-{j}")
        for j in range(pairs)
    ])]
    runner(work)  # warm-up
    net = runner.inference.net
    runner.inference = clock = ModelClock(runner.inference)
    host = []
    for _ in range(reps):
        clock.reset()
        host.append(_timed(lambda: runner(work)) - clock.seconds)
    n = pairs * shown
    x = torch.stack([images.load_image((root / r).read_bytes(), 256, 224) for r in rels[:n]]).contiguous(memory_format=torch.channels_last)
    feats = [j for j in range(pairs) for _ in range(shown)]
    attack.feature_attack(net, x, feats, steps=1)
    step = min(_timed(lambda: attack.feature_attack(net, x, feats, steps=steps)) for _ in range(reps)) / (steps * n)
    with torch.inference_mode():
        forward = min(_timed(lambda: net(x)) for _ in range(reps + 1)) / n
    return {
        "pairs": pairs, "images": n, "pair_host_s": min(host) / pairs,
        "attack_step_s_per_image": step, "forward_s_per_image": forward,
    }


def _mask_rows(rels: list[str]) -> pa.Table:
    """One mask row per image (each image in one pair), in the mask index's columns."""
    n = len(rels)
    cols = {
        "row": pa.array(np.arange(n), pa.int64()), "class_index": pa.array(np.zeros(n, np.int32)),
        "wnid": [r.split("/")[0] for r in rels], "feature_index": pa.array(np.arange(n, dtype=np.int32) % 2048),
        "feature_rank": pa.array(np.ones(n, np.int32)), "label": ["core" if i % 2 else "spurious" for i in range(n)],
        "kind": ["core" if i % 2 else "background" for i in range(n)], "image_id": pa.array(np.arange(n), pa.int64()),
        "relpath": rels, "image_label": pa.array(np.zeros(n, np.int32)), "rank": pa.array(np.ones(n, np.int32)),
        "activation": pa.array(np.ones(n, np.float32)),
    }
    return pa.table({c: cols[c] for c in masks.INDEX_COLUMNS})


def measure_generalize(root: Path, out: Path, ckpt: str, threads: int, rels: list[str]) -> dict:
    rows = _mask_rows(rels)
    cfg = GeneralizeConfig(masks_per_shard=max(1, len(rels) // 2))
    todo = masks.prepare(str(out), str(root), rows, 224, cfg, "bench")  # a new build: every block is to do
    n_blocks, index_fp = len(todo), masks.index_fingerprint("bench", rows)
    runner = masks.MaskRunner(ModelConfig(checkpoint=ckpt, arch="resnet50"), PreprocessConfig(), ComputeConfig(batch_size=BATCH), threads=threads, device="cpu")
    runner.inference(torch.rand(4, 3, 224, 224))  # warm-up
    runner.inference = clock = ModelClock(runner.inference)
    seconds = _timed(lambda: [runner(b) for b in todo])
    masks.write_index(str(out), rows, n_blocks, index_fp)
    n = len(rels)
    return {
        "masks": n, "images": clock.images, "blocks": n_blocks, "seconds": seconds, "masks_per_s": n / seconds,
        "forwards_per_mask": clock.images / n, "model_s_per_mask": clock.seconds / n, "host_s_per_mask": (seconds - clock.seconds) / n,
    }


def measure_evaluate(root: Path, out: Path, ckpt: str, threads: int) -> dict:
    """The evaluation runner over the generalize step's store: per image a clean pass, and a noisy
    pass per condition (its pair's mask, its class's core or spurious masks) at sigma 0.25."""
    entry = EvalModelConfig(name="resnet50", checkpoint=ckpt, arch="resnet50", format="robustness")
    runner = evaluate.EvalRunner([(entry, [0.25])], str(out), str(root), PreprocessConfig(), ComputeConfig(batch_size=BATCH), 1, 0, threads=threads, device="cpu")
    runner.nets["resnet50"](torch.rand(4, 3, 224, 224))  # warm-up
    runner.nets["resnet50"] = clock = ModelClock(runner.nets["resnet50"])
    work = evaluate.plan_images(runner.store.index)
    (block,) = evaluate.blocks_of(work, len(work), runner.store.shard_rows)
    seconds = _timed(lambda: runner(block))
    n = len(work)
    return {
        "images": n, "forwards": clock.images, "forwards_per_image": clock.images / n, "seconds": seconds,
        "forwards_per_s": clock.images / seconds,
        "model_s_per_image": clock.seconds / n, "host_s_per_image": (seconds - clock.seconds) / n,
    }


def workload(cfg: config.Config) -> dict:
    """A full ImageNet rebuild's work with the settings of ``cfg``: each image in at most one pair's
    top-K (an upper bound: top-K lists of one class share images)."""
    pairs = IMAGENET_CLASSES * cfg.aggregate.features_per_class
    masks_ = pairs * cfg.generalize.images_per_pair
    return {
        "images": IMAGENET_TRAIN, "pairs": pairs, "shown": cfg.discover.images_per_pair,
        "attack_image_steps": pairs * cfg.discover.images_per_pair * cfg.discover.attack_steps,
        "masks": masks_, "eval_models": len(cfg.evaluate.models), "eval_sigmas": len(cfg.evaluate.sigmas) * cfg.evaluate.trials,
        "eval_images_per_model": masks_,
    }


def gpu_seconds(m: dict, work: dict, gpu_images_per_s: float, vcpus: int, cpu_seconds: float) -> dict:
    """Seconds of one GPU node per stage for ``work``. A forward pass costs 1 / ``gpu_images_per_s``;
    an attack step the measured step / forward ratio of that; host time is as measured, with the
    activation stage's decoding spread over ``vcpus`` threads; ``cpu_seconds`` of CPU work (the
    aggregation's shard passes) spread over the node's vCPUs."""
    a, d, g, e = (m[k] for k in ("activations", "discover", "generalize", "evaluate"))
    forward = 1 / gpu_images_per_s
    step = d["attack_step_s_per_image"] / d["forward_s_per_image"] * forward
    return {
        "activations": work["images"] * (max(a["host_parallel_s"] / vcpus, forward) + a["host_serial_s"]),
        "aggregate": cpu_seconds / vcpus,
        "discover": work["attack_image_steps"] * step + work["pairs"] * (d["pair_host_s"] + work["shown"] * forward),
        "generalize": work["masks"] * (g["host_s_per_mask"] + g["forwards_per_mask"] * forward),
        # per (model, sigma): every image's clean pass and noisy passes, as measured at one sigma
        "evaluate": work["eval_models"] * work["eval_sigmas"] * work["eval_images_per_model"]
        * (e["host_s_per_image"] + e["forwards_per_image"] * forward),
    }


def _load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def serial_seconds() -> dict:
    """From the scale and activation benchmarks, when their results are here: planning (serial, in
    the driver), the aggregation's CPU seconds (one process, scaled by width to 2,048 features: an
    upper bound), and the start-up of a stage (Prefect, Ray, model load)."""
    out: dict = {}
    scale = _load_result("scale")
    if scale is not None:
        seconds = scale["plan"]["seconds"]
        # the activation stage's work list ("shard_tasks" in results saved before the stage registry)
        work_list = seconds["work_list"] if "work_list" in seconds else seconds["shard_tasks"]
        out["plan"] = seconds["write_plan"] + work_list
        out["aggregate_cpu"] = scale["aggregate"]["local"]["seconds"] * 2048 / scale["features"]
        out["aggregate_measured_width"] = scale["features"]
    acts = _load_result("activations")
    if acts is not None:
        out["startup_per_stage"] = acts["startup_s"]["ours"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per measured stage")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32, 64])
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    cfg = config.load(str(ROOT / "configs" / "imagenet-s3.yaml"))
    work = workload(cfg)
    with tempfile.TemporaryDirectory(prefix="salient-stages-bench-") as tmp:
        tmpdir = Path(tmp)
        root = tmpdir / "data"
        write_photo_folder(root, args.images, classes=1)
        rels = sorted(f"{p.parent.name}/{p.name}" for p in root.rglob("*.JPEG"))
        torch.manual_seed(0)
        ckpt = str(tmpdir / "resnet50.pt")
        models.save_checkpoint(torchvision.models.resnet50().eval(), ckpt, "robustness")
        m = {"forward_images_per_s": forward_rate(ckpt, threads), "decode_s_per_image": decode_seconds(root, rels)}
        print("forward", m, flush=True)
        m["activations"] = measure_activations(root, tmpdir / "act", ckpt, threads)
        print("activations", m["activations"], flush=True)
        m["discover"] = measure_discover(root, tmpdir / "disc", ckpt, threads, rels, pairs=2, shown=cfg.discover.images_per_pair)
        print("discover", m["discover"], flush=True)
        m["generalize"] = measure_generalize(root, tmpdir / "gen", ckpt, threads, rels)
        print("generalize", m["generalize"], flush=True)
        m["evaluate"] = measure_evaluate(root, tmpdir / "gen", ckpt, threads)
        print("evaluate", m["evaluate"], flush=True)

    cpu_fwd = m["forward_images_per_s"]
    serial = serial_seconds()
    fixed = serial.get("plan", 0.0) + len(RAY_STAGES) * serial.get("startup_per_stage", 0.0)
    projections = {}
    for gpu, prof in GPU_PROFILES.items():
        ratio = prof["resnet50_images_per_s"] / cpu_fwd
        per_gpu = gpu_seconds(m, work, prof["resnet50_images_per_s"], prof["vcpus"], serial.get("aggregate_cpu", 0.0))
        rows = []
        for n in args.gpus:
            wall = sum(per_gpu.values()) / n + fixed
            rows.append({"gpus": n, "wall_h": wall / 3600, "usd": wall / 3600 * n * prof["usd_per_hour"]})
        projections[gpu] = {**prof, "ratio_gpu_over_cpu": ratio, "gpu_seconds_per_stage": per_gpu, "rows": rows}

    result = {
        "benchmark": "stages", "model": "resnet50 (random weights), 224 px crop from 500x375 JPEGs",
        "measured_cpu": m, "workload": work, "serial_seconds": serial, "projection": projections,
        "assumptions": {
            "gpu_rates": PUBLISHED,
            "model_time": "a forward pass: 1 / the published images/s; an attack step: the step / forward ratio measured here",
            "host_time": "as measured on one core here; activation decoding and the aggregation spread over vCPUs",
            "eval_images": "each mask's image counted once per pair (no image shared): an upper bound",
            "prices": "AWS on-demand, us-east-1, Linux; GPU nodes only (head node and storage not counted)",
        },
        "environment": environment(),
        "load_average_1_5_15min": os.getloadavg(),  # other work on the machine slows every figure
    }
    a, d, g, e = (m[k] for k in ("activations", "discover", "generalize", "evaluate"))
    stages = list(next(iter(projections.values()))["gpu_seconds_per_stage"])
    md = (
        "# Per-stage throughput and the projected ImageNet rebuild\n\n"
        f"Measured here: one worker, ResNet-50 (random weights) at 224, {args.images} photo-like 500x375 JPEGs, "
        f"{environment()['cpus']} CPUs (load average {os.getloadavg()[1]:.1f}), torch {torch.__version__}, fp32. "
        f"Plain forward pass: **{cpu_fwd:.1f} images/s** (batch {BATCH}); decode + resize + crop: "
        f"{1000 * m['decode_s_per_image']:.1f} ms per image on one thread.\n\n"
        "| stage | what runs | measured here (CPU) | host time |\n|---|---|---|---|\n"
        f"| activations | read, decode ({a['decode_threads']} threads, overlapped), forward, write a shard | "
        f"{a['images_per_s']:.1f} images/s | {1000 * a['host_parallel_s']:.0f} ms per image, overlapped |\n"
        f"| discover | feature attack: forward + backward per step | {d['attack_step_s_per_image']:.3f} s per image-step "
        f"({d['attack_step_s_per_image'] / d['forward_s_per_image']:.1f} forward passes) | {d['pair_host_s']:.2f} s per pair "
        "(decode, NAMs, heatmaps, PNG strips) |\n"
        f"| generalize | decode, forward, NAM, Zarr write (one mask per image) | {g['masks_per_s']:.1f} masks/s | "
        f"{1000 * g['host_s_per_mask']:.0f} ms per mask |\n"
        f"| evaluate | decode, mask reads, noise, {e['forwards_per_image']:.0f} forward passes per image (clean, pair, class) "
        f"| {e['images'] / e['seconds']:.1f} images/s ({e['forwards_per_s']:.1f} forward passes/s) per model and sigma | "
        f"{1000 * e['host_s_per_image']:.0f} ms per image |\n\n"
        f"**GPU estimates** (no GPU here): a forward pass costs 1 / the published ResNet-50 inference images/s "
        f"({PUBLISHED}); R = that / {cpu_fwd:.1f} images/s here. Host time as measured here (one core per worker), "
        "the activation stage's decoding and the aggregation spread over the node's vCPUs.\n\n"
        f"| GPU | instance ($/h) | published images/s | R | GPU-hours: {' / '.join(stages)} |\n"
        "|---|---|---|---|---|\n"
        + "".join(
            f"| {gpu} | {p['instance']} (${p['usd_per_hour']}) | {p['resnet50_images_per_s']:,} | {p['ratio_gpu_over_cpu']:.0f} | "
            + " / ".join(f"{v / 3600:.2f}" for v in p["gpu_seconds_per_stage"].values()) + " |\n"
            for gpu, p in projections.items()
        )
        + f"\nWorkload (configs/imagenet-s3.yaml): {work['images']:,} images; {work['pairs']:,} pairs x "
        f"{work['shown']} images x {cfg.discover.attack_steps} attack steps; {work['masks']:,} masks; "
        f"{work['eval_models']} models x {work['eval_sigmas']} sigma over {work['eval_images_per_model']:,} images each "
        "(every mask on its own image: an upper bound). Serial: "
        f"{fixed / 60:.1f} min (planning, {len(RAY_STAGES)} stage start-ups; benchmarks/results/scale.json, activations.json). "
        "Cost counts the GPU nodes for the whole wall time.\n\n"
        "| GPUs | " + " | ".join(f"{gpu} wall time | {gpu} cost" for gpu in projections) + " |\n"
        "|---|" + "---|---|" * len(projections) + "\n"
        + "".join(
            f"| {n} | " + " | ".join(
                f"{p['rows'][i]['wall_h']:.1f} h | ${p['rows'][i]['usd']:,.0f}" for p in projections.values()
            ) + " |\n"
            for i, n in enumerate(args.gpus)
        )
    )
    save("stages", result, md)


if __name__ == "__main__":
    main()
