"""ImageNet's size, rehearsed on one machine: the real ``salient run`` at 1,000 classes and 5,000
(class, feature) pairs, then a no-change rerun, then a rerun with one more evaluated model.

The world has ImageNet's shape, not its pictures: 1,000 class folders with wnid-like names and
class metadata to match, ``--per-class`` tiny JPEGs in each (``--full``: ImageNet train's
1,281,167, with its total and its range of 732 to 1,300 images per class), and five answers per
pair in the paper's schema (25,000 rows, like the real crowd data). The models are real 1,000-class
networks with random weights: by default Salient's own small ResNet (``tiny_resnet``, the demo's,
every ResNet code path; its last conv map is 4x4 at crop 32) in the robustness checkpoint format as
the studied model, and two more of it (torchvision state dicts) evaluated at one sigma. Its final
layer is set so that each class's five most important features are known in advance (see
:func:`make_models`), which lets the answers be written before the run and the run be checked.
Everything else is the paper's: F = 5, K = 65, 5 discovery images; the feature attack runs
``--attack-steps`` steps (10 by default instead of the paper's 100; the projection scales the
stage's marginal cost back up, an upper bound).

``--arch resnet18`` studies a torchvision ResNet-18 instead: on this machine's 2 cores it runs about
400 images a second at crop 32, against about 1,900 for ``tiny_resnet``, and evaluation's 1.4
million forward passes alone would take about an hour; the rehearsal measures the orchestration at
ImageNet's counts, and the model's own cost is projected from measured marginal costs.

For each run and stage it reports wall time, items (done, from the cache, computed), time per item,
peak RSS of the driver and of the workers, files and bytes written (build and cache), log lines,
and with ``--s3`` the store requests by kind (through a counting proxy in front of the suite's S3
server). It checks its own counts, times the study and reference exports, measures the report's
pages in Chromium, and projects each stage to ImageNet's full size from the measured marginal
costs. At a tiny crop the masks are nearly constant, so mask bytes and compression time for the
projection come from ``benchmarks.masks``' own measurement at 224 px, made here.

    python -m benchmarks.rehearsal [--per-class 130 | --full] [--attack-steps 10] [--s3] [--classes 1000]

World making is not timed; the world is kept under ``--work`` (default: a folder under the system's
temporary directory) and reused by the next run with the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import http.server
import io
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from benchmarks.common import code_version, environment, save

IMAGENET_TRAIN = 1_281_167
IMAGENET_MIN_PER_CLASS, IMAGENET_MAX_PER_CLASS = 732, 1300
CLASSES = 1000
FEATURES = 5  # F
TOP_K = 65  # K
SHOWN = 5  # discovery images per pair
ANSWERS_PER_PAIR = 5
ARCH = "tiny_resnet"
RESIZE, CROP, SIDE = 36, 32, 40  # stored JPEGs are SIDE x SIDE
SIGMA = 0.25
RANK_BASE = 1000.0  # the ratio of a class's final-layer weights on its consecutive chosen features
STAGES = ("activations", "aggregate", "discover", "ingest", "generalize", "evaluate", "report")
# Which folders of a build (and of OUT/cache/<stage>) each stage writes.
STAGE_PATHS = {
    "activations": ("activations/", "plan.parquet"),
    "aggregate": ("classes.parquet", "importance.parquet", "pairs.parquet", "topk/", "aggregate/"),
    "discover": ("discover/",),
    "ingest": ("annotations/",),
    "generalize": ("masks/",),
    "evaluate": ("evaluation/",),
    "report": ("report/",),
}
WORLD_VERSION = "rehearsal-world-1"


def wnid(c: int) -> str:
    """A wnid-like folder name for class ``c`` (``n`` and eight digits, sorted like the classes)."""
    return f"n{1_440_764 + 7_919 * c:08d}"


def class_counts(classes: int, per_class: int | None) -> list[int]:
    """Images per class: ``per_class`` each, or (None) ImageNet train's total over 1,000 classes
    with its range, most classes at 1,300 and the rest between 732 and 1,299."""
    if per_class is not None:
        return [per_class] * classes
    counts = [IMAGENET_MAX_PER_CLASS] * classes
    deficit = IMAGENET_MAX_PER_CLASS * classes - round(IMAGENET_TRAIN * classes / CLASSES)
    rng = np.random.default_rng(1)
    for c in rng.permutation(classes):
        if deficit <= 0:
            break
        cut = int(min(deficit, rng.integers(1, IMAGENET_MAX_PER_CLASS - IMAGENET_MIN_PER_CLASS + 1)))
        counts[c] -= cut
        deficit -= cut
    return counts


def _tiny_jpeg(c: int, i: int) -> bytes:
    """A SIDE x SIDE JPEG: a smooth random picture tinted by its class, with some grain."""
    rng = np.random.default_rng([c, i])
    tint = np.random.default_rng(c).integers(40, 216, 3)
    coarse = np.clip(rng.normal(tint, 50, (5, 5, 3)), 0, 255).astype(np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC), np.int16)
    arr = np.clip(arr + rng.integers(-10, 11, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _write_class(args: tuple[str, int, int]) -> int:
    root, c, n = args
    folder = Path(root) / wnid(c)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{wnid(c)}_{i}.JPEG").write_bytes(_tiny_jpeg(c, i))
    return n


def make_world(work: Path, classes: int, counts: list[int]) -> dict:
    """The image folders and class metadata (kept and reused when a world of the same shape is there)."""
    world = work / "world"
    stamp = world / "stamp.json"
    shape = {"version": WORLD_VERSION, "classes": classes, "counts": counts}
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return {"root": str(world / "train"), "metadata": str(world / "classes.csv"), "reused": True, "seconds": 0.0}
    shutil.rmtree(world, ignore_errors=True)
    t0 = time.perf_counter()
    (world / "train").mkdir(parents=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_write_class, [(str(world / "train"), c, n) for c, n in enumerate(counts)], chunksize=8))
    with open(world / "classes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class_index", "synset", "wordnet_id", "gloss", "supercategory"])
        for c in range(classes):
            w.writerow([c, f"rehearsal class {c}, class {c}", wnid(c), f"a tinted picture of class {c}", f"group {c % 12}"])
    stamp.write_text(json.dumps(shape))
    return {"root": str(world / "train"), "metadata": str(world / "classes.csv"), "reused": False, "seconds": time.perf_counter() - t0}


def _net(arch: str, seed: int, classes: int) -> torch.nn.Module:
    from salient import models

    torch.manual_seed(seed)
    return models.build_arch(arch, classes).eval()


def make_models(work: Path, arch: str, classes: int, per_class_probe: int = 2) -> tuple[dict, dict[int, list[int]]]:
    """The studied model and three evaluated ones (random weights); returns their checkpoints and
    each class's five most important features in rank order, as the studied model's final layer
    was set.

    The final layer gives class c weight 1000^(4-k) on its k-th chosen feature and 0 elsewhere, so
    FI_c(j) = w[c, j] * mean r_j ranks exactly the chosen five when their class means differ by
    less than 1000x: the features are chosen among those active on every probed image, with means
    within 2x of the median, as a probe of ``per_class_probe`` images per class measured.
    """
    from salient import images, models

    net = _net(arch, 0, classes)
    probe = []
    for c in range(classes):
        for i in range(per_class_probe):
            probe.append(images.load_image(_tiny_jpeg(c, i), RESIZE, CROP))
    wrapped = models.SalientModel(net, arch)
    with torch.inference_mode():
        feats = torch.cat([wrapped(torch.stack(probe[s : s + 256])).features for s in range(0, len(probe), 256)])
    mean, active = feats.mean(0), (feats > 0).all(0)
    median = mean[active].median()
    usable = torch.nonzero(active & (mean > median / 2) & (mean < median * 2)).flatten().tolist()
    if len(usable) < FEATURES:
        raise SystemExit(f"only {len(usable)} usable features in the random {arch}: change the seed")
    rng = np.random.default_rng(2)
    chosen = {c: [int(j) for j in rng.choice(usable, FEATURES, replace=False)] for c in range(classes)}
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        for c, feats_c in chosen.items():
            for k, j in enumerate(feats_c):
                net.fc.weight[c, j] = RANK_BASE ** (FEATURES - 1 - k)
    out = {"studied": str(work / f"studied-{arch}.pt")}
    models.save_checkpoint(net, out["studied"], "robustness")
    for name, seed in (("eval-a", 11), ("eval-b", 12), ("eval-c", 13)):
        out[name] = str(work / f"{name}-{arch}.pt")
        models.save_checkpoint(_net(arch, seed, classes), out[name], "torchvision")
    return out, chosen


def expected_label(c: int, rank: int) -> str:
    """The answers' label of the pair (class ``c``, rank ``rank``): a fixed mix of core and both
    kinds of spurious."""
    return ("core", "background", "separate_object", "core", "core")[(c + rank) % 5]


def write_answers(uri: Path, chosen: dict[int, list[int]]) -> Counter:
    """Five answers per pair in the paper's CSV schema; returns the expected labels' counts."""
    workers = [f"A{n:03d}REHEARSAL{n * 7919 % 10007:05d}" for n in range(200)]
    expected: Counter = Counter()
    with open(uri, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Input.feature_rank",
                    "Answer.main", "Answer.confidence", "Answer.reasons"])
        for c, feats in chosen.items():
            for k, j in enumerate(feats, start=1):
                label = expected_label(c, k)
                expected["core" if label == "core" else "spurious"] += 1
                # Three or four votes decide; the rest disagree, as real workers do.
                votes = [label] * (3 + (c + k) % 2) if label != "core" else ["main_object"] * 4
                votes += ["main_object" if label != "core" else "background"] * (ANSWERS_PER_PAIR - len(votes))
                for n, answer in enumerate(votes):
                    worker = workers[(c * 7 + k * 3 + n * 41) % len(workers)]
                    w.writerow([worker, wnid(c), c, j, k, answer, 1 + (c + n) % 5, f"rehearsal answer {n} for class {c}"])
    return expected


def write_config(
    work: Path, world: dict, arch: str, ckpts: dict, answers: Path, out: str, attack_steps: int, eval_models: list[str],
) -> Path:
    """The run's config file."""
    cfg = {
        "dataset": {"root": world["root"], "class_metadata": world["metadata"]},
        "model": {"checkpoint": ckpts["studied"], "format": "robustness", "arch": arch},
        "preprocess": {"resize": RESIZE, "crop": CROP},
        "output": out,
        "compute": {"gpus_per_worker": 0, "batch_size": 256},
        "aggregate": {"grouping": "label", "features_per_class": FEATURES, "top_k_class": TOP_K},
        "discover": {"images_per_pair": SHOWN, "attack_steps": attack_steps},
        "annotations": {"answers": [str(answers)], "min_answers": ANSWERS_PER_PAIR},
        "generalize": {"images_per_pair": TOP_K},
        "evaluate": {
            "models": [{"name": m, "arch": arch, "format": "torchvision", "checkpoint": ckpts[m]} for m in eval_models],
            "sigmas": [SIGMA],
        },
    }
    path = work / f"rehearsal-{len(eval_models)}-models.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --- watching a run ---------------------------------------------------------------------------

_STAGE_LINE = re.compile(r"Task run '([a-z]+)")
_ITEMS_LINE = re.compile(r"([a-z]+): (\d+) items, (\d+) done in this build, (\d+) from the cache, (\d+) to make")


class Watch:
    """What a running ``salient run`` is doing: its stage (from its log lines), and per stage the
    peak RSS of the driver and of the summed worker processes, log lines and store requests."""

    def __init__(self) -> None:
        self.stage = "start"
        self.lines: Counter = Counter()
        self.items: dict[str, dict] = {}
        self.rss_driver: dict[str, int] = defaultdict(int)
        self.rss_workers: dict[str, int] = defaultdict(int)
        self.requests: dict[str, Counter] = defaultdict(Counter)
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        m = _STAGE_LINE.search(text)
        if m and m.group(1) in STAGES:
            self.stage = m.group(1)
        elif "published build" in text or "Finished in state" in text:
            self.stage = "publish"
        self.lines[self.stage] += 1
        m = _ITEMS_LINE.search(text)
        if m and m.group(1) in STAGES:
            self.items[m.group(1)] = dict(zip(("items", "build", "cache", "to_make"), map(int, m.groups()[1:])))

    def request(self, kind: str) -> None:
        with self.lock:
            self.requests[self.stage][kind] += 1

    def sample(self, pid: int) -> None:
        """One reading of the driver's RSS and the summed RSS of its Ray worker processes
        (``ray::`` in their command line; Ray's and Prefect's own daemons are left out)."""
        workers = sum(_rss(p) for p in _process_tree(pid) if p != pid and _is_ray_worker(p))
        self.rss_driver[self.stage] = max(self.rss_driver[self.stage], _rss(pid))
        self.rss_workers[self.stage] = max(self.rss_workers[self.stage], workers)


def _is_ray_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return cmdline.startswith(b"ray::") and b"Agent" not in cmdline


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                children[int(stat[stat.rindex(b")") + 2 :].split()[1])].append(int(entry))
            except (OSError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_salient(config: Path, env: dict, log: Path, watch: Watch) -> tuple[int, float]:
    """``salient run CONFIG`` as a user runs it, watched; returns its exit code and wall seconds."""
    cmd = [str(Path(sys.executable).with_name("salient")), "run", str(config)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.5):
            watch.sample(proc.pid)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    with open(log, "w") as fh:
        for text in proc.stdout:
            fh.write(text)
            fh.flush()  # so the log can be followed while the run goes on
            watch.line(text)
    rc = proc.wait()
    done.set()
    thread.join()
    return rc, time.perf_counter() - t0


# --- S3 requests, counted by a proxy in front of the server ---------------------------------------


def request_kind(method: str, path: str, headers: http.client.HTTPMessage | dict) -> str:
    """The S3 operation of one request: GET, HEAD, PUT, COPY, LIST, DELETE, multipart, ..."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)
    if method == "GET" and ("list-type" in query or "prefix" in query or "delimiter" in query):
        return "LIST"
    if method == "PUT" and headers.get("x-amz-copy-source"):
        return "COPY"
    if "uploads" in query or "uploadId" in query:
        return f"multipart {method}"
    if method == "POST" and "delete" in query:
        return "DELETE (batch)"
    return method


@contextlib.contextmanager
def counting_proxy(target: str, watch: Watch) -> Iterator[str]:
    """A loopback HTTP proxy to ``target`` that counts each request's kind in ``watch``; yields its URL."""
    parsed = urllib.parse.urlsplit(target)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            watch.request(request_kind(self.command, self.path, self.headers))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- what a run wrote ------------------------------------------------------------------------------


def written(out: str, build_id: str, since: float) -> dict[str, dict]:
    """Per stage: files and bytes (each file once, by inode) in the build and in its cache folder
    that were written since ``since`` (hard links made then count as files, not bytes)."""
    from salient import storage

    result: dict[str, dict] = {s: {"files": 0, "bytes": 0, "linked_files": 0} for s in STAGES}
    result["other"] = {"files": 0, "bytes": 0, "linked_files": 0}
    fs, root = storage.url_to_fs(out)
    local = storage.is_local(out)
    seen: set = set()

    def add(stage: str, path: str, size: int, mtime: float, inode: object) -> None:
        if mtime < since:
            return
        r = result[stage]
        r["files"] += 1
        if inode in seen:
            r["linked_files"] += 1
        else:
            seen.add(inode)
            r["bytes"] += size

    for base, of_stage in ((f"{root}/builds/{build_id}", None), (f"{root}/cache", "cache")):
        for path, info in fs.find(base, detail=True).items():
            rel = path[len(base) + 1 :]
            if of_stage:
                stage = rel.split("/", 1)[0]
                stage = stage if stage in result else "other"
            else:
                stage = next((s for s, prefixes in STAGE_PATHS.items() if rel.startswith(prefixes)), "other")
            if local:
                st = os.stat(path)
                add(stage, path, st.st_size, st.st_mtime, (st.st_dev, st.st_ino))
            else:
                mtime = info.get("LastModified")
                add(stage, path, int(info.get("size") or 0), mtime.timestamp() if mtime else since, path)
    return result


def checks(build: str, classes: int, counts: list[int], chosen: dict[int, list[int]], expected_labels: Counter, eval_models: list[str]) -> dict:
    """The build's own counts against what the rehearsal made: every pair (its features and ranks),
    the labels, masks per labelled pair, evaluation rows per model."""
    from salient import storage, tables

    def read(table: tables.Table):
        return storage.read_parquet(storage.join(build, table.path))

    pairs = read(tables.PAIRS).to_pydict()
    got = defaultdict(dict)
    for c, j, r in zip(pairs["class_index"], pairs["feature_index"], pairs["feature_rank"]):
        got[c][r] = j
    pair_ok = all([got[c].get(k + 1) for k in range(FEATURES)] == feats for c, feats in chosen.items())
    labels = Counter(read(tables.LABELS).column("label").to_pylist())
    index = read(tables.MASK_INDEX).select(["class_index", "feature_index"]).to_pydict()
    per_pair = Counter(zip(index["class_index"], index["feature_index"]))
    want_masks = {(c, j): min(TOP_K, counts[c]) for c, feats in chosen.items() for j in feats}
    eval_pairs = Counter(read(tables.EVAL_PAIRS).column("model").to_pylist())
    eval_classes = Counter(read(tables.EVAL_CLASSES).column("model").to_pylist())
    out = {
        "pairs": len(pairs["class_index"]), "pairs_expected": classes * FEATURES, "pairs_match_design": pair_ok,
        "labels": dict(labels), "labels_expected": dict(expected_labels),
        "masks": sum(per_pair.values()), "masks_expected": sum(want_masks.values()),
        "masks_per_pair_match": dict(per_pair) == want_masks,
        "evaluation_pair_rows": dict(eval_pairs), "evaluation_class_rows": dict(eval_classes),
    }
    out["ok"] = bool(
        out["pairs"] == out["pairs_expected"] and pair_ok and labels == expected_labels and out["masks_per_pair_match"]
        and all(eval_pairs.get(m) == classes * FEATURES for m in eval_models)
        and all(eval_classes.get(m) == classes for m in eval_models)
    )
    return out


def page_load_ms(build: str) -> dict | None:
    """Load time (navigation start to the load event) of the report's index and of one class page
    in headless Chromium, when Chromium and its driver are installed."""
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    index = Path(build) / "report" / "index.html"
    if not index.exists():
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--window-size=1280,1000", "--disable-dev-shm-usage", "--disable-gpu", "--no-sandbox"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    timing = "const t = performance.getEntriesByType('navigation')[0]; return [t.loadEventEnd, document.images.length];"
    try:
        out = {}
        driver.get(index.as_uri())
        ms, pictures = driver.execute_script(timing)
        out["index"] = {"ms": round(ms, 1), "images": pictures, "bytes": index.stat().st_size}
        links = driver.execute_script("return Array.from(document.querySelectorAll('a[href*=\"classes/\"]')).map(a => a.href)")
        out["class_page_links"] = len(links)
        if links:
            driver.get(links[len(links) // 2])
            ms, pictures = driver.execute_script(timing)
            page = Path(urllib.parse.unquote(urllib.parse.urlsplit(links[len(links) // 2]).path))
            out["class_page"] = {"ms": round(ms, 1), "images": pictures, "bytes": page.stat().st_size if page.exists() else None}
        return out
    finally:
        driver.quit()


def mask_costs_224() -> dict:
    """Bytes and one core's compression time per mask of NAMs at 224 px (``benchmarks.masks``'
    own measurement, on 32 photo-like JPEGs and their 4 most active channels each)."""
    from benchmarks.common import write_photo_folder
    from benchmarks.masks import codec_costs, make_masks

    with tempfile.TemporaryDirectory(prefix="salient-rehearsal-masks-") as tmp:
        photos = Path(tmp) / "photos"
        write_photo_folder(photos, 32)
        m, _, rows, _ = make_masks(photos, 4)
        return codec_costs(str(Path(tmp) / "out"), str(photos), rows, m)


# --- the rehearsal ---------------------------------------------------------------------------------


def one_run(name: str, config: Path, env: dict, out: str, work: Path, watch: Watch) -> dict:
    from salient import builds, storage, tables

    since = time.time() - 1
    rc, wall = run_salient(config, env, work / f"{name}.log", watch)
    if rc != 0:
        tail = (work / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"{name}: salient run exited {rc}; the log is {work / f'{name}.log'}:\n{tail}")
    build_id = builds.read_pointer(out, "latest")
    manifest = storage.read_json(storage.join(builds.build_dir(out, build_id), tables.MANIFEST.path))
    return {
        "wall_s": round(wall, 1), "build_id": build_id, "stage_s": manifest["seconds"], "counts": manifest["counts"],
        "items": watch.items, "log_lines": dict(watch.lines),
        "peak_rss_driver_mb": {k: round(v / 2**20) for k, v in watch.rss_driver.items()},
        "peak_rss_workers_mb": {k: round(v / 2**20) for k, v in watch.rss_workers.items()},
        "requests": {k: dict(v) for k, v in watch.requests.items()},
        "written": written(out, build_id, since),
    }


def timed_command(name: str, args: list[str], env: dict, work: Path, watch_dir: str | None = None) -> dict:
    """``salient ARGS`` as a user runs it: wall time, exit code, log lines, and the files and bytes
    it wrote under ``watch_dir``."""
    log = work / f"{name}.log"
    since = time.time() - 1
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([str(Path(sys.executable).with_name("salient")), *args], env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    out = {"wall_s": round(time.perf_counter() - t0, 1), "rc": rc, "log_lines": sum(1 for _ in open(log))}
    if rc != 0:
        raise SystemExit(f"{name}: salient {' '.join(args)} exited {rc}; the log is {log}")
    if watch_dir:
        from salient import storage

        fs, path = storage.url_to_fs(watch_dir)
        found = [info for info in fs.find(path, detail=True).values() if _mtime(info) >= since]
        out.update(files=len(found), bytes=sum(int(i.get("size") or 0) for i in found))
    return out


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    return value.timestamp() if hasattr(value, "timestamp") else float(value or 0)


def stage_items(run: dict, stage: str) -> int:
    """The amount of work of ``stage`` in ``run``, in its own unit (images, pairs, answers, masks)."""
    c = run["counts"]
    return {
        "activations": c.get("images"), "aggregate": c.get("images"), "discover": c.get("pairs"),
        "ingest": c.get("answers"), "generalize": c.get("masks"), "evaluate": run.get("evaluated_images"),
        "report": c.get("classes"),
    }[stage] or 0


UNITS = {"activations": "images", "aggregate": "images", "discover": "pairs", "ingest": "answers",
         "generalize": "masks", "evaluate": "images", "report": "classes"}


def project(first: dict, again: dict, full: dict[str, int], attack_scale: float, masks224: dict | None, first_masks: int) -> dict:
    """Each stage's wall time at ImageNet's full size: the no-change rerun's time of the stage (its
    fixed part: planning, listing, restoring), scaled with the items, plus the first run's marginal
    cost per item times the full count; discover's attack part scaled to the paper's 100 steps."""
    out = {}
    for stage in STAGES:
        n = stage_items(first, stage)
        if not n or stage not in first["stage_s"]:
            continue
        fixed = again["stage_s"].get(stage, 0.0)
        marginal = max(first["stage_s"][stage] - fixed, 0.0) / n
        scale = full[stage] / n
        seconds = fixed * scale + marginal * full[stage] * (attack_scale if stage == "discover" else 1.0)
        out[stage] = {"items": full[stage], "unit": UNITS[stage], "marginal_ms": round(1000 * marginal, 3), "seconds": round(seconds, 1)}
    if masks224 and "generalize" in out:
        codec = next(iter(masks224.values()))
        extra = codec["compress_ms_per_mask"] / 1000 * full["generalize"]
        out["generalize"]["seconds_with_224px_compression"] = round(out["generalize"]["seconds"] + extra, 1)
        out["generalize"]["mask_bytes_at_224px"] = round(codec["bytes_per_mask"] * full["generalize"])
    return out


def evaluated_images(build: str) -> int:
    from salient import evaluate, storage, tables

    index = storage.read_parquet(storage.join(build, tables.MASK_INDEX.path))
    return len(evaluate.plan_images(index))


def markdown(result: dict) -> str:
    first, again, more = result["runs"]["first"], result["runs"]["no_change"], result["runs"]["one_more_model"]
    lines = [
        f"# Rehearsal: {result['world']['classes']:,} classes, {result['world']['images']:,} images "
        f"({'S3' if result['s3'] else 'local disk'}, attack steps {result['attack_steps']})\n",
        f"First build {first['wall_s']:.0f} s; no-change rerun {again['wall_s']:.0f} s "
        f"({100 * again['wall_s'] / first['wall_s']:.1f}%); one more model {more['wall_s']:.0f} s. "
        f"Checks: {'pass' if result['checks']['ok'] else 'FAIL'}.\n",
        "| stage | items (unit) | first s | ms/item | no-change s | +model s | computed first / no-change / +model "
        "| peak RSS driver / workers MB | files / MB written | log lines |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in STAGES:
        n = stage_items(first, s)
        t = first["stage_s"].get(s)
        if t is None:
            continue
        made = " / ".join(str(r["items"].get(s, {}).get("to_make", "-")) for r in (first, again, more))
        w = first["written"][s]
        lines.append(
            f"| {s} | {n:,} ({UNITS[s]}) | {t:.1f} | {1000 * t / max(n, 1):.2f} | {again['stage_s'].get(s, 0):.1f} "
            f"| {more['stage_s'].get(s, 0):.1f} | {made} | {first['peak_rss_driver_mb'].get(s, 0):,} / "
            f"{first['peak_rss_workers_mb'].get(s, 0):,} | {w['files']:,} / {w['bytes'] / 2**20:,.1f} | {first['log_lines'].get(s, 0)} |"
        )
    if result["s3"]:
        lines += ["", "Store requests by kind (first run):", ""]
        lines += [f"- {s}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(first["requests"].get(s, {}).items())) for s in (*STAGES, "publish")]
    for name, e in result["exports"].items():
        lines.append(f"\n{name.replace('_', ' ')}: {e['wall_s']:.0f} s, {e.get('files', 0):,} files, "
                     f"{e.get('bytes', 0) / 2**20:,.1f} MB, {e['log_lines']} log lines.")
    pages = result.get("pages")
    if pages:
        lines += ["", f"Report in Chromium: index {pages['index']['ms']:.0f} ms ({pages['index']['bytes'] / 1024:.0f} KB), "
                  f"class page {pages.get('class_page', {}).get('ms', float('nan')):.0f} ms; {pages['class_page_links']} class links."]
    lines += ["", "Projection to ImageNet's full size (fixed part scaled with the items, plus marginal cost x items):", "",
              "| stage | items | marginal ms/item | projected s |", "|---|---|---|---|"]
    for s, p in result["projection"].items():
        extra = f" ({p['seconds_with_224px_compression']:,.0f} s with 224 px mask compression)" if "seconds_with_224px_compression" in p else ""
        lines.append(f"| {s} | {p['items']:,} {p['unit']} | {p['marginal_ms']} | {p['seconds']:,.0f}{extra} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--per-class", type=int, default=130, help="images per class (default 130: about 130,000 images)")
    size.add_argument("--full", action="store_true", help="ImageNet train's 1,281,167 images")
    ap.add_argument("--classes", type=int, default=CLASSES, help="classes (1,000 is ImageNet's; fewer for a quick look)")
    ap.add_argument("--attack-steps", type=int, default=10, help="feature-attack steps (the paper's is 100)")
    ap.add_argument("--arch", default=ARCH, help="the studied and evaluated models' architecture (random weights, 1,000 classes)")
    ap.add_argument("--s3", action="store_true", help="output on the suite's S3 server (SeaweedFS), requests counted")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "salient-rehearsal")
    args = ap.parse_args()
    from salient.cli import apply_env_defaults

    apply_env_defaults()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    counts = class_counts(args.classes, None if args.full else args.per_class)
    print(f"world: {args.classes} classes, {sum(counts):,} images under {work}", flush=True)
    world = make_world(work, args.classes, counts)
    ckpts, chosen = make_models(work, args.arch, args.classes)
    answers = work / "answers.csv"
    expected_labels = write_answers(answers, chosen)
    masks224 = mask_costs_224()
    results: dict = {}
    with contextlib.ExitStack() as stack:
        if args.s3:
            from tests.s3server import aws_environment, seaweed_s3

            server = stack.enter_context(seaweed_s3(work / "s3"))
            stack.enter_context(aws_environment(server))
            out = f"s3://{server.bucket}/rehearsal/out"
        else:
            out = str(work / "out")
            shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PYTHONUNBUFFERED": "1"}
        for name, models_ in (("first", ["eval-a", "eval-b"]), ("no_change", ["eval-a", "eval-b"]), ("one_more_model", ["eval-a", "eval-b", "eval-c"])):
            watch = Watch()
            run_env = dict(env)
            if args.s3:
                proxy = stack.enter_context(counting_proxy(server.endpoint_url, watch))
                run_env.update(AWS_ENDPOINT_URL=proxy, AWS_ENDPOINT_URL_S3=proxy)
            config = write_config(work, world, args.arch, ckpts, answers, out, args.attack_steps, models_)
            print(f"{name}: salient run {config}", flush=True)
            results[name] = one_run(name, config, run_env, out, work, watch)
            print(f"{name}: {results[name]['wall_s']} s, stages {results[name]['stage_s']}", flush=True)
        from salient import builds, storage

        build = builds.resolve(out)
        exports = {
            "study_export": timed_command("study-export", ["study", "export", str(config)], env, work, out),
            "reference_export": timed_command(
                "reference-export", ["export", "reference", out, str(work / "reference")], env, work, str(work / "reference"),
            ),
        }
        eval_models = ["eval-a", "eval-b", "eval-c"]
        check = checks(build, args.classes, counts, chosen, expected_labels, eval_models)
        for r in results.values():
            r["evaluated_images"] = evaluated_images(build)
        pages = page_load_ms(build) if not args.s3 else None
    first_masks = results["first"]["counts"].get("masks", 0)
    full = {"activations": IMAGENET_TRAIN, "aggregate": IMAGENET_TRAIN, "discover": CLASSES * FEATURES,
            "ingest": CLASSES * FEATURES * ANSWERS_PER_PAIR, "generalize": CLASSES * FEATURES * TOP_K,
            # every image of a class's five top-65 lists, at most 325 a class
            "evaluate": min(CLASSES * FEATURES * TOP_K, round(results["first"]["evaluated_images"] * CLASSES / args.classes * (FEATURES * TOP_K) / max(1, min(FEATURES * TOP_K, min(counts))))),
            "report": CLASSES}
    result = {
        "benchmark": "rehearsal", "s3": args.s3, "attack_steps": args.attack_steps, "arch": args.arch,
        "world": {"classes": args.classes, "images": sum(counts), "per_class": None if args.full else args.per_class,
                  "made_in_s": round(world["seconds"], 1), "reused": world["reused"]},
        "runs": results, "exports": exports, "checks": check, "pages": pages, "mask_costs_224px": masks224,
        "projection": project(results["first"], results["no_change"], full, 100 / max(args.attack_steps, 1), masks224, first_masks),
        "environment": environment(), "code": code_version(),
    }
    tag = f"rehearsal-{args.classes}x{'full' if args.full else args.per_class}{'-s3' if args.s3 else ''}"
    save(tag, result, markdown(result))
    if not check["ok"]:
        raise SystemExit(f"the rehearsal's own checks failed: {json.dumps(check)}")


if __name__ == "__main__":
    main()
