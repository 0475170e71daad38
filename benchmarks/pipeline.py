"""Efficiency and host-side ceiling of the model stages, each run through the stage runtime in this
process (``salient.stage.local_run`` + ``execute``, the stages of ``salient.stages.BY_NAME``).

A world of photo-like 500x375 JPEGs in 4 classes goes through the real pipeline: activations ->
aggregate (2 pairs per class, every image of a class in both its pairs' top lists) -> answers
written in the paper's CSV schema (rank-1 pairs core, rank-2 pairs spurious) -> ingest ->
generalize -> evaluate (one sigma, one trial). Activations, generalize and evaluate are timed. Each
world is built at two sizes, so start-up (model load, planning, tables, charts) cancels: a stage's
marginal time is T(large) - T(small) for the difference in its work. One warm-up run of the small
world per model comes first and is not counted; each stage's time is the fastest of ``--repeats``
runs and each reference rate the best of its measurements (other work on a shared machine only ever
slows a measurement down).

**Efficiency** (the demo's ``tiny_resnet`` at 224 px from 256 px, random weights): the least work
the stage's data needs, over its marginal wall time. The least work is decoding its images with
every core (the decode-only rate of the same images with the same decoder, measured on a pool of
one thread per core), plus its forward passes at the model-alone rate (a ready batch of the
stage's batch size), plus, for evaluate, drawing each image's noise (one seeded
``torch.randn((3, crop, crop))`` per trial) and applying it per condition
(``clip(x + sigma * noise * mask)``). Above 1, decoding and the model overlap.

**Host-side ceiling**: the same stages with a zero-cost stand-in model (``zero_cost``: ResNet
attribute names, 8x8 maps subsampled from the input and a 1x1 conv to 16 channels; registered in
``salient.models.LOCAL_ARCHS`` here and loaded by the stages from its checkpoint), in images/s per
core, against the decode-only rate of the same images on the same cores (evaluate: decode plus its
noise). On a shared machine both rates drift by tens of percent within minutes, so each repeat
pairs its stage runs with reference rates measured right before and right after them, and the
ceiling is the median over repeats of these paired ratios (their range is reported). Next to it,
the process CPU time per image of the stage and of decode-only, which drifts much less. The bar is 0.8.

    python -m benchmarks.pipeline [--decoder pil|torchvision] [--images 64 256] [--repeats 2] [--name pipeline]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import code_version, decode_rate, decoders, environment, pixel_reader, pool_rate, save, write_photo_folder
from salient import config, models, storage, tables
from salient.stage import execute, local_run
from salient.stages import BY_NAME

CLASSES = 4
FEATURES_PER_CLASS = 2
RESIZE, CROP = 256, 224
SIGMA = 0.25
TIMED = ("activations", "generalize", "evaluate")
BAR = 0.8
CHAIN = ("activations", "aggregate", "ingest", "generalize", "evaluate")


class Subsample(nn.Module):
    """Every ``H // 8``-th pixel of every ``W // 8``-th column: 8x8 maps for the price of a view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: max(1, x.shape[2] // 8), :: max(1, x.shape[3] // 8)][:, :, :8, :8]


class ZeroCost(nn.Module):
    """A stand-in classifier whose forward pass costs next to nothing: the ResNet attribute names
    (so every stage takes it as ResNet-like), 8x8 maps subsampled from the input, a 1x1 conv to 16
    channels, a ReLU, and a 16-wide final linear layer."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = Subsample()
        self.bn1 = nn.Identity()
        self.relu = nn.Identity()
        self.maxpool = nn.Identity()
        self.layer1 = nn.Conv2d(3, 16, kernel_size=1)
        self.layer2 = nn.Identity()
        self.layer3 = nn.Identity()
        self.layer4 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer4(self.layer1(self.conv1(x)))), 1))


MASKS_PER_SHARD = 64
IMAGES_PER_BLOCK = 64
MODELS = {
    # name: (arch, checkpoint format)
    "tiny_resnet": ("tiny_resnet", "robustness"),
    "zero_cost": ("zero_cost", "torchvision"),
}


def write_checkpoints(tmp: Path) -> dict[str, str]:
    """Random-weight checkpoints of both models, for CLASSES classes, written the stages' way."""
    models.LOCAL_ARCHS.setdefault("zero_cost", ZeroCost)
    out = {}
    for name, (arch, fmt) in MODELS.items():
        out[name] = models.write_random_checkpoint(str(tmp / f"{name}.pt"), arch, CLASSES, 0, fmt)
    return out


def make_config(root: Path, out: Path, ckpt: str, model: str, decoder: str, n: int) -> config.Config:
    arch, fmt = MODELS[model]
    overrides = [
        f"dataset.root={root}", f"model.checkpoint={ckpt}", f"model.arch={arch}", f"model.format={fmt}",
        f"preprocess.resize={RESIZE}", f"preprocess.crop={CROP}", f"output={out}",
        "aggregate.grouping=label", f"aggregate.features_per_class={FEATURES_PER_CLASS}",
        # every image of a class in the top list of each of its class's pairs: the work grows with n
        f"aggregate.top_k_class={n}", f"generalize.images_per_pair={n}",
        f"evaluate.models=[{{name: {model}, arch: {arch}, format: {fmt}, checkpoint: {ckpt}}}]", f"evaluate.sigmas=[{SIGMA}]",
        # several work items per world, as in a real build (a worker streams one while it computes
        # another): 64 masks per Zarr shard, evaluation blocks of at least 64 images
        f"generalize.masks_per_shard={MASKS_PER_SHARD}", f"evaluate.images_per_block={IMAGES_PER_BLOCK}",
    ]
    if "decoder" in config.PreprocessConfig.model_fields:
        overrides.append(f"preprocess.decoder={decoder}")
    return config.load(None, overrides)


def write_answers(run) -> None:
    """Five answers per pair in the paper's CSV schema, under the output root's incoming answers:
    rank-1 pairs all main_object (core), the others all background (spurious)."""
    pairs = storage.read_parquet(storage.join(run.build, tables.PAIRS.path)).to_pylist()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Input.feature_rank",
                     "Answer.main", "Answer.confidence", "Answer.reasons"])
    for p in pairs:
        answer = "main_object" if p["feature_rank"] % 2 else "background"
        for w in range(5):
            writer.writerow([f"bench-{w}", p["wnid"], p["class_index"], p["feature_index"], p["feature_rank"], answer, "5", ""])
    storage.write_bytes_atomic(storage.join(run.root, "annotations", "incoming", "bench.csv"), buf.getvalue().encode())


def conditions_per_image(build: str) -> dict[str, int]:
    """Evaluate's noisy conditions per image (by relpath), from the mask index: one per pair of the
    image, one per (class, label) set its masks belong to (docs/design.md §2 "Sensitivity")."""
    index = storage.read_parquet(storage.join(build, tables.MASK_INDEX.path), ["relpath", "class_index", "label"]).to_pylist()
    pairs: dict[str, int] = defaultdict(int)
    sets: dict[str, set] = defaultdict(set)
    for r in index:
        pairs[r["relpath"]] += 1
        sets[r["relpath"]].add((r["class_index"], r["label"]))
    return {rel: pairs[rel] + len(sets[rel]) for rel in pairs}


def run_world(cfg: config.Config) -> dict:
    """The pipeline on one world; seconds of each timed stage and the work it did."""
    chain = [BY_NAME[s] for s in CHAIN]
    run = local_run(cfg, chain)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    summaries: dict[str, dict] = {}
    for stage in chain:
        if stage.name == "ingest":
            write_answers(run)
        t0, c0 = time.perf_counter(), time.process_time()
        summaries[stage.name] = execute(stage, run)
        seconds[stage.name], cpu[stage.name] = time.perf_counter() - t0, time.process_time() - c0
    act = summaries["activations"]
    if act.get("failed"):
        raise SystemExit(f"activations: {act['failed']} images failed")
    conds = conditions_per_image(run.build)
    index = storage.read_parquet(storage.join(run.build, tables.MASK_INDEX.path), ["image_id"])
    mask_images = len(set(index.column("image_id").to_pylist()))
    e = cfg.evaluate
    noisy = sum(conds.values()) * e.trials * len(e.sigmas)
    work = {
        "activations": {"images": act["images"], "forwards": act["images"]},
        # one decode and one forward pass per distinct image, whatever its number of masks
        "generalize": {"images": mask_images, "forwards": mask_images, "masks": index.num_rows},
        "evaluate": {"images": len(conds), "forwards": len(conds) + noisy, "noise_draws": len(conds) * e.trials, "noise_applications": noisy},
    }
    return {"seconds": {s: seconds[s] for s in TIMED}, "cpu_seconds": {s: cpu[s] for s in TIMED}, "work": work, "conditions": conds, "build": run.build}


def forward_rate(ckpt: str, model: str, batch: int, reps: int = 3) -> float:
    """Images/s of the model alone on a ready batch of uint8 pixels on its device, run as a worker
    runs it (:class:`salient.inference.Inference`: BatchNorm folded, channels-last, normalised on
    the device); at HEAD, without that wrapper, the worker's model on ``[0, 1]`` floats."""
    arch, fmt = MODELS[model]
    if "decoder" not in config.PreprocessConfig.model_fields:  # the code before the data plane
        net, device = models.load_for_worker(ckpt, arch, fmt)
        x = torch.rand(batch, 3, CROP, CROP, device=device).contiguous(memory_format=torch.channels_last)
    else:
        from salient.inference import Inference

        net = Inference.load(ckpt, arch, fmt, config.ComputeConfig(batch_size=batch))
        device = net.device
        x = torch.randint(0, 256, (batch, CROP, CROP, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    best = float("inf")
    with torch.inference_mode():
        net(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            net(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return batch / best


def decode_cpu_ms(datas: list[bytes], decoder: str) -> float:
    """Process CPU milliseconds per image of decode-only (the reference's work, on every core):
    less sensitive than its rate to what else runs on a shared machine."""
    c0 = time.process_time()
    decode_rate(datas, decoder, RESIZE, CROP, reps=1)
    return 1000 * (time.process_time() - c0) / (len(datas) + min(len(datas), 2 * (os.cpu_count() or 1)))


def evaluate_host_rates(datas: list[bytes], conds: list[int], decoder: str, seed: int = 0) -> dict:
    """Images/s of evaluate's least host work on every core: decode, then per trial one seeded
    normal draw per image and per condition ``clip(x + sigma * noise * mask)``; and of the noise
    alone (pixels decoded already)."""
    read = pixel_reader(decoder, RESIZE, CROP)
    mask = torch.rand(CROP, CROP)

    def noise(i: int, x: torch.Tensor) -> None:
        x = x.float().div_(255.0)
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        z = torch.randn((3, CROP, CROP), generator=g)
        for _ in range(conds[i]):
            (x + SIGMA * z * mask).clamp_(0.0, 1.0)

    pixels = [read(d) for d in datas]
    return {
        "decode_and_noise": pool_rate(lambda i: noise(i, read(datas[i])), len(datas)),
        "noise_only": pool_rate(lambda i: noise(i, pixels[i]), len(datas)),
    }


def marginal(runs: dict[int, dict]) -> dict:
    small, large = sorted(runs)
    a, b = runs[small], runs[large]
    return {
        s: {
            "seconds": b["seconds"][s] - a["seconds"][s], "cpu_seconds": b["cpu_seconds"][s] - a["cpu_seconds"][s],
            **{k: b["work"][s][k] - a["work"][s][k] for k in b["work"][s]},
            "seconds_small": a["seconds"][s], "seconds_large": b["seconds"][s],
        }
        for s in TIMED
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="pil", choices=["pil", "torchvision"])
    ap.add_argument("--images", type=int, nargs=2, default=[64, 256], metavar=("SMALL", "LARGE"), help="the two world sizes")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each world per model; the fastest of each stage counts")
    ap.add_argument("--name", default="pipeline", help="results file name under benchmarks/results/")
    ap.add_argument(
        "--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the worlds and the builds go (default: /dev/shm, in memory, so that the figures "
        "measure the CPU rather than this machine's disk syncs)",
    )
    args = ap.parse_args()
    if args.decoder not in decoders():
        raise SystemExit(f"--decoder {args.decoder}: this version of salient has no such preprocess.decoder (it has {', '.join(decoders())})")
    small, large = sorted(args.images)
    if small == large:
        raise SystemExit("--images: give two different sizes")
    cpus = os.cpu_count() or 1
    batch = config.ComputeConfig().batch_size
    t_start = time.perf_counter()
    # Every rate is the best of its measurements, taken between the stage runs; every stage time the
    # fastest of its runs: other work on the machine only ever slows a measurement down.
    base: dict = {"decode_images_per_s": 0.0, "forward_images_per_s": dict.fromkeys(MODELS, 0.0)}
    host: dict = {m: {"decode_and_noise": 0.0, "noise_only": 0.0} for m in MODELS}
    runs: dict = {m: {} for m in MODELS}
    paired: list[dict] = []  # per repeat: the stand-in's marginal rates and the references around them
    with tempfile.TemporaryDirectory(prefix="salient-pipeline-bench-", dir=args.tmp) as tmp:
        tmpdir = Path(tmp)
        worlds = {}
        for n in (small, large):
            worlds[n] = tmpdir / f"world-{n}"
            write_photo_folder(worlds[n], n, classes=CLASSES, seed=n)
        ckpts = write_checkpoints(tmpdir)
        rels = sorted(str(p.relative_to(worlds[large])) for p in worlds[large].rglob("*.JPEG"))
        datas = [(worlds[large] / r).read_bytes() for r in rels]

        def baselines() -> None:
            base["decode_images_per_s"] = max(base["decode_images_per_s"], decode_rate(datas, args.decoder, RESIZE, CROP))
            for m in MODELS:
                base["forward_images_per_s"][m] = max(base["forward_images_per_s"][m], forward_rate(ckpts[m], m, batch))
            print(f"decode-only ({args.decoder}, {cpus} threads): {base['decode_images_per_s']:.1f} img/s; model alone, batch {batch}: "
                  + ", ".join(f"{m} {r:.1f} img/s" for m, r in base["forward_images_per_s"].items()), flush=True)

        for model in MODELS:  # a first run pays for first calls (imports, kernels, thread pools): not counted
            run_world(make_config(worlds[small], tmpdir / "out" / f"{model}-warm-up", ckpts[model], model, args.decoder, small))
        for r in range(args.repeats):
            baselines()
            for model in MODELS:
                before = decode_rate(datas, args.decoder, RESIZE, CROP) if model == "zero_cost" else 0.0
                this_repeat = {}
                for n, root in worlds.items():
                    got = run_world(make_config(root, tmpdir / "out" / f"{model}-{n}-{r}", ckpts[model], model, args.decoder, n))
                    print(f"  {model}, {n} images: " + ", ".join(f"{s} {t:.2f}s" for s, t in got["seconds"].items()), flush=True)
                    this_repeat[n] = got
                    got["all_seconds"] = {s: [t] for s, t in got["seconds"].items()}
                    if n in runs[model]:
                        got["all_seconds"] = {s: runs[model][n]["all_seconds"][s] + [t] for s, t in got["seconds"].items()}
                        got["seconds"] = {s: min(t, runs[model][n]["seconds"][s]) for s, t in got["seconds"].items()}
                    runs[model][n] = got
                conds = runs[model][large]["conditions"]
                rates = evaluate_host_rates(datas, [conds.get(rel, 0) for rel in rels], args.decoder)
                host[model] = {k: max(v, rates[k]) for k, v in host[model].items()}
                print(f"  evaluate's decode + noise: {rates['decode_and_noise']:.1f} img/s; noise alone {rates['noise_only']:.1f} img/s", flush=True)
                if model == "zero_cost":
                    after = decode_rate(datas, args.decoder, RESIZE, CROP)
                    m = marginal(this_repeat)
                    paired.append({
                        "decode_before": before, "decode_after": after, "decode_and_noise": rates["decode_and_noise"],
                        "decode_cpu_ms_per_image": decode_cpu_ms(datas, args.decoder),
                        "stage_images_per_s": {st: m[st]["images"] / m[st]["seconds"] for st in TIMED},
                        "stage_cpu_ms_per_image": {st: 1000 * m[st]["cpu_seconds"] / m[st]["images"] for st in TIMED},
                    })
        baselines()
    passes = {}
    for model in MODELS:
        conds = runs[model][large]["conditions"]
        passes[model] = {
            "marginal": marginal(runs[model]), "evaluate_host_images_per_s": host[model],
            "conditions_per_image": sum(conds.values()) / max(1, len(conds)),
            "runs": {n: {"seconds": got["seconds"], "all_seconds": got["all_seconds"], "work": got["work"]} for n, got in runs[model].items()},
        }

    decode = base["decode_images_per_s"]
    efficiency = {}
    tiny = passes["tiny_resnet"]
    fwd = base["forward_images_per_s"]["tiny_resnet"]
    for s, m in tiny["marginal"].items():
        host_rate = tiny["evaluate_host_images_per_s"]["decode_and_noise"] if s == "evaluate" else decode
        least_host, least_model = m["images"] / host_rate, m["forwards"] / fwd
        efficiency[s] = {
            "marginal_seconds": m["seconds"], "images": m["images"], "forwards": m["forwards"],
            "least_host_seconds": least_host, "least_model_seconds": least_model,
            "efficiency": (least_host + least_model) / m["seconds"],
            "images_per_s": m["images"] / m["seconds"],
            **({"masks": m["masks"], "masks_per_s": m["masks"] / m["seconds"]} if "masks" in m else {}),
        }
    ceiling = {}
    zero = passes["zero_cost"]
    for s, m in zero["marginal"].items():
        rates, againsts, ratios = [], [], []
        for p in paired:
            against = p["decode_and_noise"] if s == "evaluate" else (p["decode_before"] + p["decode_after"]) / 2
            rates.append(p["stage_images_per_s"][s])
            againsts.append(against)
            ratios.append(rates[-1] / against)
        k = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]  # the median repeat (upper, for even counts)
        rate, against, ratio = rates[k], againsts[k], ratios[k]
        cpu = sorted(p["stage_cpu_ms_per_image"][s] for p in paired)[len(paired) // 2]
        decode_cpu = sorted(p["decode_cpu_ms_per_image"] for p in paired)[len(paired) // 2]
        ceiling[s] = {
            "forwards": m["forwards"], "stand_in_model_share": m["forwards"] / base["forward_images_per_s"]["zero_cost"] * rate / m["images"],
            "images": m["images"], "images_per_s": rate, "images_per_s_per_core": rate / cpus,
            "against_images_per_s_per_core": against / cpus, "ratio": ratio, "meets_bar": ratio >= BAR,
            "ratios_per_repeat": ratios, "host_ms_per_image": 1000 / rate * cpus,  # core-milliseconds per image
            # process CPU per image, the stage's and decode-only's (medians over repeats): for evaluate
            # the stage's includes its noise, which the reference here does not
            "cpu_ms_per_image": cpu, "decode_cpu_ms_per_image": decode_cpu,
            **({"masks": m["masks"], "core_ms_per_mask": 1000 / rate * cpus * m["images"] / m["masks"]} if "masks" in m else {}),
        }
    code = code_version()
    result = {
        "benchmark": "pipeline", "decoder": args.decoder, "images": [small, large], "repeats": args.repeats,
        "world": f"{CLASSES} classes of photo-like 500x375 JPEGs, {FEATURES_PER_CLASS} pairs per class, every image in both pairs "
                 f"of its class; resize {RESIZE}, crop {CROP}; evaluate: sigma {SIGMA}, 1 trial",
        "batch_size": batch, "baselines": base, "efficiency": efficiency, "ceiling": ceiling, "bar": BAR, "paired_repeats": paired,
        "passes": passes, "code": code, "environment": environment(), "load_average_1_5_15min": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start, "tmp": args.tmp or tempfile.gettempdir(),
    }
    noise_ms = 1000 * cpus / zero["evaluate_host_images_per_s"]["noise_only"]
    md = (
        "# Data plane: efficiency and host-side ceiling\n\n"
        f"salient at {code.get('commit')}{' (modified)' if code.get('salient_modified') else ''}; decoder {args.decoder}; "
        f"worlds of {small} and {large} photo-like 500x375 JPEGs ({CLASSES} classes, {FEATURES_PER_CLASS} pairs per class, "
        f"every image in both pairs of its class); crop {CROP} from {RESIZE}; batch {batch}; {cpus} CPUs "
        f"(load average {os.getloadavg()[1]:.1f}); worlds and builds under {args.tmp or tempfile.gettempdir()}; "
        f"figures from the {large} - {small} difference.\n\n"
        f"Decode-only, {cpus} threads: **{decode:.1f} img/s** ({1000 * cpus / decode:.1f} core-ms per image). "
        f"Model alone on a ready batch: tiny_resnet {fwd:.1f} img/s, zero_cost {base['forward_images_per_s']['zero_cost']:.0f} img/s. "
        f"Evaluate's noise ({zero['conditions_per_image']:.1f} noisy copies per image): {noise_ms:.1f} core-ms per image; "
        f"decode + noise {zero['evaluate_host_images_per_s']['decode_and_noise']:.1f} img/s.\n\n"
        "**Efficiency** (tiny_resnet): least work (decode on every core + the model's forward passes alone"
        " [+ evaluate's noise]) / the stage's marginal wall time.\n\n"
        "| stage | marginal images (forward passes) | marginal wall | least work: host + model | efficiency | stage img/s |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {s} | {e['images']} ({e['forwards']}) | {e['marginal_seconds']:.2f} s | {e['least_host_seconds']:.2f} + "
            f"{e['least_model_seconds']:.2f} s | **{e['efficiency']:.2f}** | {e['images_per_s']:.1f} |\n"
            for s, e in efficiency.items()
        )
        + f"\n**Host-side ceiling** (zero_cost model): the stage's images/s per core against decode-only on the same cores "
        f"(evaluate: decode + its noise), measured right before and after the stage runs of the same repeat; the median "
        f"repeat of {len(paired)}, and the range of the paired ratios; bar {BAR}.\n\n"
        "| stage | stage img/s per core | against, img/s per core | ratio | range over repeats | core-ms per image (per mask) | CPU ms per image: stage / decode-only | stand-in model's share of the time |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "".join(
            f"| {s} | {c['images_per_s_per_core']:.1f} | {c['against_images_per_s_per_core']:.1f} | **{c['ratio']:.2f}**"
            f"{'' if c['meets_bar'] else ' (below bar)'} | {min(c['ratios_per_repeat']):.2f}-{max(c['ratios_per_repeat']):.2f} | {c['host_ms_per_image']:.1f}"
            + (f" ({c['core_ms_per_mask']:.1f})" if "core_ms_per_mask" in c else "")
            + f" | {c['cpu_ms_per_image']:.2f} / {c['decode_cpu_ms_per_image']:.2f} | {c['stand_in_model_share']:.0%} |\n"
            for s, c in ceiling.items()
        )
        + f"\nWall time of the benchmark: {result['wall_s']:.0f} s.\n"
    )
    save(args.name, result, md)


if __name__ == "__main__":
    main()
