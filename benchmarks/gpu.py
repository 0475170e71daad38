"""The data plane on a GPU: ResNet-50 model-only throughput, end-to-end activations per decoder, GPU
utilisation while they run, and each decoder's parity with PIL.

Needs a CUDA GPU with its driver, and this project installed (``pip install -e .``, which brings
torch and torchvision); it installs nothing and reaches no network. ``nvidia-smi``, where present,
samples the GPU's utilisation; else ``torch.cuda.utilization()`` (which needs pynvml); else it is
reported as n/a. About five minutes on one GPU:

    python -m benchmarks.gpu [--images 4096] [--batch 256] [--precision bf16 fp16 fp32]
                             [--e2e-precision bf16] [--decoders pil torchvision nvjpeg] [--compile none]

What it measures, on photo-like 500x375 JPEGs in 8 classes and a random-weight ResNet-50 at 224:

- model only: the model as a worker loads it (BatchNorm folded, channels-last), a ready batch
  already on the device, timed with CUDA events, at each ``--precision``;
- decode only: images/s of each decoder on every core (nvjpeg: batches on the GPU), bytes in memory;
- end to end: the real activations stage, in this process (``salient.stage.local_run`` +
  ``execute``, one worker), per decoder, at two dataset sizes (a quarter of ``--images`` and all of
  them), so start-up cancels: marginal images/s, best of ``--reps`` runs; GPU utilisation is sampled
  during the full-size runs;
- parity with PIL on the same images: max and mean pixel difference (uint8, after resize and crop),
  and from the stage's own outputs, the features' relative L2 difference and top-1 agreement.

Each section records its error in the results instead of stopping the run, so one run yields every
figure it can. Results: benchmarks/results/gpu.{json,md}. A smoke check of the script on the CPU
(nvjpeg is skipped there): ``python -m benchmarks.gpu --device cpu --images 32``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path

CLASSES = 8
RESIZE, CROP = 256, 224


def _error(exc: BaseException) -> dict:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}", "traceback": "".join(lines[-4:])[-2000:]}


def section(results: dict, name: str):
    """``with section(results, name) as out:`` fills ``results[name]``; an exception is recorded there."""

    class _Section:
        def __enter__(self) -> dict:
            results[name] = {}
            return results[name]

        def __exit__(self, kind, exc, tb) -> bool:
            if exc is not None and not isinstance(exc, KeyboardInterrupt):
                results[name].update(_error(exc))
                print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
                return True
            return False

    return _Section()


class UtilSampler:
    """GPU utilisation (%) sampled every 100 ms while in use: ``nvidia-smi -lms``, else
    ``torch.cuda.utilization()``, else nothing (n/a)."""

    def __init__(self, device: str) -> None:
        import torch

        self.samples: list[float] = []
        self.source = "n/a"
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        if not device.startswith("cuda"):
            return
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            self.gpu = visible or "0"
        else:
            try:
                torch.cuda.utilization()
                self.source = "torch.cuda.utilization"
            except Exception:  # noqa: BLE001 -- pynvml missing or no NVML: no samples
                pass

    def __enter__(self) -> UtilSampler:
        if self.source == "nvidia-smi":
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", self.gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        elif self.source == "torch.cuda.utilization":
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass  # [N/A] (e.g. a MIG slice)

    def _poll_torch(self) -> None:
        import torch

        while not self._stop.wait(0.1):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {"source": self.source, "samples": 0, "mean_percent": None}
        return {
            "source": self.source, "samples": len(self.samples), "mean_percent": round(statistics.fmean(self.samples), 1),
            "median_percent": statistics.median(self.samples), "max_percent": max(self.samples),
        }


def model_only(ckpt: str, device: str, precision: str, batch: int, iters: int, compile_mode: str) -> dict:
    """Images/s of ResNet-50 alone on a ready batch on the device."""
    from contextlib import nullcontext

    import torch

    from salient import models

    if precision == "fp16" and not device.startswith("cuda"):
        return {"skipped": "fp16 needs a CUDA device"}
    net, dev = models.load_for_worker(ckpt, "resnet50", "robustness", device)
    fwd = net if compile_mode == "none" else torch.compile(net, mode=compile_mode, dynamic=False)
    x = torch.rand(batch, 3, CROP, CROP, device=dev).contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device_type=torch.device(dev).type, dtype=dtype) if dtype else nullcontext()
    cuda = dev.startswith("cuda")
    with torch.inference_mode(), ctx:
        for _ in range(3 if cuda else 1):
            fwd(x)
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fwd(x)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fwd(x)
            seconds = time.perf_counter() - t0
    return {"images_per_s": round(batch * iters / seconds, 1), "batch": batch, "iterations": iters, "timer": "cuda events" if cuda else "wall clock"}


def nvjpeg_pixels(datas: list[bytes], device: str) -> list:
    """uint8 [3, crop, crop] pixels of JPEGs decoded in one batch by nvJPEG and resized on the GPU,
    as the stream's nvjpeg decoder does."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from salient import images

    if not hasattr(images, "resize_crop"):
        raise RuntimeError("this version of salient has no GPU resize (salient.images.resize_crop)")
    decoded = decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], mode=ImageReadMode.RGB, device=device)
    return [images.resize_crop(d, RESIZE, CROP) for d in decoded]


def decode_only(datas: list[bytes], decoder: str, device: str, batch: int) -> dict:
    import torch

    from benchmarks.common import decode_rate

    if decoder != "nvjpeg":
        return {"images_per_s": round(decode_rate(datas, decoder, RESIZE, CROP), 1), "threads": os.cpu_count()}
    nvjpeg_pixels(datas[:batch], device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(datas), batch):
        nvjpeg_pixels(datas[s : s + batch], device)
    torch.cuda.synchronize()
    return {"images_per_s": round(len(datas) / (time.perf_counter() - t0), 1), "batch": batch}


def stage_config(root: Path, out: Path, ckpt: str, decoder: str, batch: int, precision: str, compile_mode: str):
    from salient import config

    overrides = [
        f"dataset.root={root}", f"model.checkpoint={ckpt}", "model.arch=resnet50", "model.format=robustness",
        f"preprocess.resize={RESIZE}", f"preprocess.crop={CROP}", f"output={out}",
        f"compute.batch_size={batch}", f"compute.precision={precision}",
    ]
    if "decoder" in config.PreprocessConfig.model_fields:
        overrides.append(f"preprocess.decoder={decoder}")
    if "compile" in config.ComputeConfig.model_fields:
        overrides.append(f"compute.compile={compile_mode}")
    return config.load(None, overrides)


def run_activations(cfg) -> tuple[float, dict, str]:
    """The activations stage on a fresh output root: (seconds, its summary, the build directory)."""
    from salient.stage import execute, local_run
    from salient.stages import BY_NAME

    stage = BY_NAME["activations"]
    run = local_run(cfg, [stage])
    t0 = time.perf_counter()
    summary = execute(stage, run)
    return time.perf_counter() - t0, summary, run.build


def read_outputs(build: str) -> dict[str, tuple]:
    """relpath -> (features float32, pred) from a build's activation tables."""
    import numpy as np
    import pyarrow.parquet as pq

    out = {}
    for part in sorted(Path(build, "activations").glob("*.parquet")):
        t = pq.read_table(part, columns=["relpath", "features", "pred"])
        if t.num_rows == 0:
            continue
        feats = t.column("features").combine_chunks()
        f = np.asarray(feats.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(t.num_rows, -1)
        for rel, row, p in zip(t.column("relpath").to_pylist(), f, t.column("pred").to_pylist()):
            out[rel] = (row, int(p))
    return out


def subset_world(src: Path, dst: Path, fraction: float) -> int:
    """The first ``fraction`` of each class folder of ``src`` as hard links (copies where links
    fail) under ``dst``; returns the number of images."""
    n = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for f in files[: max(1, int(len(files) * fraction))]:
            try:
                os.link(f, dst / folder.name / f.name)
            except OSError:
                shutil.copyfile(f, dst / folder.name / f.name)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    ap.add_argument("--images", type=int, default=4096, help="images of the full-size world (a quarter for the small one)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 256 on cuda, 16 on the CPU)")
    ap.add_argument("--precision", nargs="+", default=None, help="model-only precisions (default bf16 fp16 fp32 on cuda, fp32 on the CPU)")
    ap.add_argument("--e2e-precision", default=None, help="compute.precision of the end-to-end runs (default bf16 on cuda, fp32 on the CPU)")
    ap.add_argument("--decoders", nargs="+", default=["pil", "torchvision", "nvjpeg"])
    ap.add_argument("--compile", default="none", help="compute.compile of the model (none, default, reduce-overhead, max-autotune)")
    ap.add_argument("--reps", type=int, default=None, help="runs per size and decoder, the fastest counts (default 2 on cuda, 1 on the CPU)")
    ap.add_argument("--parity-images", type=int, default=256)
    ap.add_argument("--iters", type=int, default=None, help="timed model-only batches (default 30 on cuda, 2 on the CPU)")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: the stages' workers then run on the CPU too

    import numpy as np
    import torch
    import torchvision

    from benchmarks.common import code_version, decoders, environment, pixel_reader, save, write_photo_folder_threaded
    from salient import models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run with --device cpu for a smoke check")
    batch = args.batch or (256 if cuda else 16)
    precisions = args.precision or (["bf16", "fp16", "fp32"] if cuda else ["fp32"])
    e2e_precision = args.e2e_precision or ("bf16" if cuda else "fp32")
    reps = args.reps or (2 if cuda else 1)
    iters = args.iters or (30 if cuda else 2)
    t_start = time.perf_counter()
    results: dict = {
        "benchmark": "gpu", "device": device, "images": args.images, "batch": batch, "e2e_precision": e2e_precision,
        "compile": args.compile, "environment": environment(), "code": code_version(), "decoders_in_this_version": list(decoders()),
    }
    if shutil.which("nvidia-smi"):
        try:
            results["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            results["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    wanted = []
    skipped = {}
    for d in args.decoders:
        if d == "nvjpeg" and not cuda:
            skipped[d] = "nvjpeg decodes on a CUDA GPU; skipped on the CPU"
        elif d not in decoders():
            skipped[d] = f"not a preprocess.decoder of this version of salient (it has {', '.join(decoders())})"
        else:
            wanted.append(d)
    for d, why in skipped.items():
        print(f"decoder {d}: {why}", flush=True)
    results["skipped_decoders"] = skipped

    with tempfile.TemporaryDirectory(prefix="salient-gpu-bench-") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        large_root, small_root = tmpdir / "world", tmpdir / "world-small"
        write_photo_folder_threaded(large_root, args.images, classes=CLASSES)
        n_small = subset_world(large_root, small_root, 0.25)
        rels = sorted(str(p.relative_to(large_root)) for p in large_root.rglob("*.JPEG"))
        datas = [(large_root / r).read_bytes() for r in rels]
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f}s (small world: {n_small})", flush=True)
        torch.manual_seed(0)
        ckpt = str(tmpdir / "resnet50.pt")
        models.save_checkpoint(torchvision.models.resnet50().eval(), ckpt, "robustness")

        with section(results, "model_only") as out:
            for p in precisions:
                try:
                    out[p] = model_only(ckpt, device, p, batch, iters, args.compile)
                except Exception as exc:  # noqa: BLE001 -- recorded, the other precisions still run
                    out[p] = _error(exc)
                print(f"model only, {p}: {out[p]}", flush=True)

        with section(results, "decode_only") as out:
            for d in wanted:
                try:
                    out[d] = decode_only(datas, d, device, batch)
                except Exception as exc:  # noqa: BLE001
                    out[d] = _error(exc)
                print(f"decode only, {d}: {out[d]}", flush=True)

        builds: dict[str, str] = {}
        with section(results, "end_to_end") as out:
            for d in wanted:
                try:
                    best = {}
                    util = None
                    for r in range(reps):
                        for name, root, n in (("small", small_root, n_small), ("large", large_root, args.images)):
                            cfg = stage_config(root, tmpdir / "out" / f"{d}-{name}-{r}", ckpt, d, batch, e2e_precision, args.compile)
                            if name == "large":
                                with UtilSampler(device) as sampler:
                                    seconds, summary, build = run_activations(cfg)
                                util = sampler.summary()
                                builds[d] = build
                            else:
                                seconds, summary, build = run_activations(cfg)
                            if summary.get("failed"):
                                raise RuntimeError(f"{summary['failed']} images failed in the activations stage")
                            print(f"end to end, {d}, {n} images: {seconds:.2f}s", flush=True)
                            best[name] = min(seconds, best.get(name, float("inf")))
                    marginal = (args.images - n_small) / (best["large"] - best["small"])
                    out[d] = {
                        "marginal_images_per_s": round(marginal, 1), "large_s": round(best["large"], 3), "small_s": round(best["small"], 3),
                        "images_per_s_whole_run": round(args.images / best["large"], 1), "gpu_utilisation_during_full_run": util,
                    }
                except Exception as exc:  # noqa: BLE001
                    out[d] = _error(exc)
                print(f"end to end, {d}: {out[d]}", flush=True)

        with section(results, "parity_vs_pil") as out:
            n = min(args.parity_images, len(datas))
            ref_pixels = [pixel_reader("pil", RESIZE, CROP)(x) for x in datas[:n]]
            ref_out = read_outputs(builds["pil"]) if "pil" in builds else None
            for d in [d for d in wanted if d != "pil"]:
                row: dict = {"images": n}
                try:
                    if d == "nvjpeg":
                        pixels = [p.cpu() for s in range(0, n, batch) for p in nvjpeg_pixels(datas[s : min(n, s + batch)], device)]
                    else:
                        read = pixel_reader(d, RESIZE, CROP)
                        pixels = [read(x) for x in datas[:n]]
                    diffs = [(a.int() - b.int()).abs() for a, b in zip(pixels, ref_pixels)]
                    row["max_pixel_diff"] = int(max(x.max() for x in diffs))
                    row["mean_pixel_diff"] = round(float(torch.stack([x.float().mean() for x in diffs]).mean()), 4)
                except Exception as exc:  # noqa: BLE001
                    row["pixels"] = _error(exc)
                try:
                    if ref_out is None or d not in builds:
                        raise RuntimeError("no end-to-end outputs of this decoder and of pil to compare")
                    mine = read_outputs(builds[d])
                    common = sorted(set(mine) & set(ref_out))
                    a = np.stack([mine[k][0] for k in common])
                    b = np.stack([ref_out[k][0] for k in common])
                    row["feature_images"] = len(common)
                    row["feature_relative_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
                    row["top1_agreement"] = float(np.mean([mine[k][1] == ref_out[k][1] for k in common]))
                except Exception as exc:  # noqa: BLE001
                    row["features"] = _error(exc)
                out[d] = row
                print(f"parity {d} vs pil: {row}", flush=True)

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    save("gpu", results, markdown(results))


def _fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(r: dict) -> str:
    def err(d: dict) -> str:
        return d.get("error") or d.get("skipped") or ""

    code = r["code"]
    lines = [
        "# The data plane on a GPU\n",
        f"{r['environment']['cuda'] or 'CPU'} ({r['device']}), salient at {code.get('commit')}"
        f"{' (modified)' if code.get('salient_modified') else ''}; ResNet-50 (random weights) at {CROP} from {RESIZE}, "
        f"batch {r['batch']}, compile {r['compile']}; {r['images']} photo-like 500x375 JPEGs in {CLASSES} classes; "
        f"{r['environment']['cpus']} CPUs; {r['wall_s']} s in all.\n",
        "| model only (input on the device) | images/s |\n|---|---|",
    ]
    for p, v in r.get("model_only", {}).items():
        if isinstance(v, dict):
            lines.append(f"| {p} | {v['images_per_s'] if 'images_per_s' in v else err(v)} |")
    if "error" in r.get("model_only", {}):
        lines.append(f"| (all) | {r['model_only']['error']} |")
    lines.append(f"\n| decoder | decode only, img/s | end to end ({r['e2e_precision']}), marginal img/s | whole run img/s | GPU utilisation, mean / median (source) |")
    lines.append("|---|---|---|---|---|")
    for d in r.get("decode_only", {}) | r.get("end_to_end", {}):
        if d in ("error", "traceback"):
            continue
        dec = r.get("decode_only", {}).get(d, {})
        e = r.get("end_to_end", {}).get(d, {})
        u = e.get("gpu_utilisation_during_full_run") or {}
        lines.append(
            f"| {d} | {dec.get('images_per_s', err(dec) or 'n/a')} | {e.get('marginal_images_per_s', err(e) or 'n/a')} | "
            f"{e.get('images_per_s_whole_run', 'n/a')} | {_fmt(u.get('mean_percent'))} / {_fmt(u.get('median_percent'))} ({u.get('source', 'n/a')}) |"
        )
    for d, why in r.get("skipped_decoders", {}).items():
        lines.append(f"| {d} | skipped: {why} | | | |")
    lines.append("\n| parity with pil | images | max / mean pixel diff | features: relative L2 | top-1 agreement |\n|---|---|---|---|---|")
    for d, v in r.get("parity_vs_pil", {}).items():
        if not isinstance(v, dict):
            continue
        pix = f"{v['max_pixel_diff']} / {v['mean_pixel_diff']}" if "max_pixel_diff" in v else err(v.get("pixels", {}))
        feats = f"{v['feature_relative_l2']:.2e}" if "feature_relative_l2" in v else err(v.get("features", {}))
        agree = f"{v['top1_agreement']:.3f} ({v['feature_images']} images)" if "top1_agreement" in v else ""
        lines.append(f"| {d} | {v.get('images')} | {pix} | {feats} | {agree} |")
    errors = [f"- {name}: {v['error']}" for name, v in r.items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines.append("\nSections that failed:\n" + "\n".join(errors))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
