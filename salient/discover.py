"""Discovery: what annotators see for every (class, feature) pair (docs/design.md §2, §3 ``discover``).

Per pair, under ``discover/<wnid>/feature_<j>/``: ``images.png`` (the top images' preprocessed
crops side by side), ``heatmaps.png`` (jet of the NAM over each image, red = high), ``attacks.png``
(the feature attack from each image) and ``assets.json`` (the image ids, the low-resolution NAMs,
and the fingerprint of everything the assets depend on, so unchanged pairs are not remade).
``discover/tasks.csv`` has one crowd-task row per pair.

A worker makes the pairs of a few classes per call: their images read through
:mod:`salient.stream`, NAMs and feature attacks on the device under ``compute.precision``, the
strips encoded and written in threads while the device runs the next call.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from salient import attack, masks, nam, resources, storage, stream, tables
from salient.answers import csv_safe
from salient.config import ComputeConfig, DiscoverConfig, ModelConfig, PreprocessConfig
from salient.inference import Inference
from salient.stream import Feed, HostCopies, ImageStream, consecutive_groups, decode_threads

CODE_VERSION = "discover-2"  # 2: a checkpoint's own normaliser is used
STRIPS = ("images", "heatmaps", "attacks")
TASK_COLUMNS = (
    "class_index", "wnid", "class_name", "definition", "supercategory", "feature_index", "feature_rank",
    "images_url", "heatmaps_url", "attacks_url", "image_ids",
)


def pair_dir(build: str, wnid: str, feature: int) -> str:
    """The folder of one pair's strips and ``assets.json`` in the build directory ``build``."""
    return storage.join(build, tables.discover_pair(wnid, feature))


@dataclass
class PairWork:
    class_index: int
    wnid: str
    feature_index: int
    feature_rank: int
    image_ids: list[int]
    relpaths: list[str]
    fingerprint: str


@dataclass
class ClassWork:
    """All pairs of one class whose assets must be (re)made. ``root`` is the dataset root, ``build``
    the build directory."""

    class_index: int
    root: str
    build: str
    pairs: list[PairWork] = field(default_factory=list)


def plan_pairs(build: str, base_fp: str, images_per_pair: int) -> list[PairWork]:
    """Every pair of the build at ``build`` with the top images annotators are shown; a pair's
    fingerprint is ``base_fp`` (the model, preprocessing and attack) with the pair and those images."""
    pairs = storage.read_parquet(storage.join(build, tables.PAIRS.path)).to_pylist()
    topk = storage.read_parquet(storage.join(build, tables.TOPK_CLASS.path))
    topk = topk.filter(pc.less_equal(topk.column("rank"), images_per_pair)).sort_by(
        [("class_index", "ascending"), ("feature_index", "ascending"), ("rank", "ascending")]
    )
    shown: dict[tuple[int, int], tuple[list[int], list[str]]] = {}
    for row in topk.select(["class_index", "feature_index", "image_id", "relpath"]).to_pylist():
        ids, rels = shown.setdefault((row["class_index"], row["feature_index"]), ([], []))
        ids.append(row["image_id"])
        rels.append(row["relpath"])
    work = []
    for p in pairs:
        key = (p["class_index"], p["feature_index"])
        ids, rels = shown.get(key, ([], []))
        fp = storage.fingerprint(base_fp, key, ids, rels)
        work.append(PairWork(p["class_index"], p["wnid"], p["feature_index"], p["feature_rank"], ids, rels, fp))
    return work


def png_strip(tiles: Sequence[np.ndarray]) -> bytes:
    """uint8 ``[H, W, 3]`` tiles side by side, 2 px apart on white, as PNG bytes."""
    h, w = tiles[0].shape[:2]
    gap = 2
    canvas = np.full((h, len(tiles) * (w + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        canvas[:, i * (w + gap) : i * (w + gap) + w] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def attack_budget(compute: ComputeConfig, device: str) -> int:
    """Bytes the feature attack may take at once on ``device``: ``compute.attack_memory_gb``, else
    half the GPU's free memory, or half the host's available memory."""
    if compute.attack_memory_gb is not None:
        return int(compute.attack_memory_gb * 2**30)
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return resources.available_memory() // 2


def group_classes(works: Sequence[ClassWork], rows: int) -> list[list[ClassWork]]:
    """``works`` in order, consecutive classes together while their images shown add up to at most
    ``rows``; a class with more is alone."""
    sizes = [sum(len(p.relpaths) for p in work.pairs) for work in works]
    return [[works[i] for i in group] for group in consecutive_groups(sizes, rows)]


@dataclass
class _Outputs:
    """A group's device results on the host: the distinct images' pixels, and per row (a pair's
    image) the image's place among them, its NAM, mask and attack."""

    pixels: torch.Tensor  # uint8 [n_images, 3, H, W]
    image_of: list[int]
    low: torch.Tensor  # float32 [rows, h, w]
    masks: torch.Tensor  # float32 [rows, H, W]
    attacked: torch.Tensor  # uint8 [rows, 3, H, W]


@dataclass
class DiscoverRunner:
    """Loads the model once; makes the assets of every pair of a group of classes per call, the
    attack running on all their images at once. Calls from several threads run on the device in
    turn and encode and write while another one computes."""

    model: ModelConfig
    preprocess: PreprocessConfig
    compute: ComputeConfig
    cfg: DiscoverConfig
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        m = self.model
        self.inference = Inference.load(
            m.checkpoint, m.arch, m.format, self.compute, threads=self.threads, device=self.device, need_discovery=True,
        )
        threads = decode_threads(self.compute, self.threads)
        self.stream = ImageStream(None, self.preprocess, self.inference.device, self.compute.batch_size, threads)
        self.encoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png")
        per_image = attack.bytes_per_image(self.inference.net, self.preprocess.crop, self.inference.device)
        self.attack_rows = attack.rows_per_chunk(attack_budget(self.compute, self.inference.device), per_image, self.compute.batch_size)

    def __call__(self, works: Sequence[ClassWork]) -> list[dict]:
        """Make and write the assets of every pair of ``works`` (classes of one dataset root);
        returns their records, in order."""
        jobs, start = [], 0
        image_index: dict[str, int] = {}
        image_of, feats = [], []
        for work in works:
            for p in work.pairs:
                jobs.append((work.build, p, start, start + len(p.relpaths)))
                start += len(p.relpaths)
                image_of += [image_index.setdefault(rel, len(image_index)) for rel in p.relpaths]
                feats += [p.feature_index] * len(p.relpaths)
        outputs = None
        if image_of:
            feed = self.stream.open(list(image_index), works[0].root)
            try:
                outputs = self._compute(f"classes {', '.join(str(w.class_index) for w in works)}", feed, image_of, feats)
            finally:
                feed.cancel()
        return list(self.encoders.map(lambda job: self._write(*job, outputs), jobs))

    def _compute(self, what: str, feed: Feed, image_of: list[int], feats: list[int]) -> _Outputs:
        """Read the images of ``feed``; for each row, the NAM and attack of ``feats[row]`` on image ``image_of[row]``."""
        device = torch.device(self.inference.device)
        crop = self.preprocess.crop
        copies = HostCopies(device)
        with self.inference.lock:
            pixels = torch.empty((len(feed.relpaths), 3, crop, crop), dtype=torch.uint8, device=device)
            maps = []
            for batch in feed:
                stream.refuse_failures(what, feed.relpaths, batch)
                pixels[batch.positions[0] : batch.positions[-1] + 1] = batch.pixels  # consecutive images when none failed
                maps.append(self.inference(batch.pixels).maps.clone())  # kept past the next call
            rows = torch.tensor(image_of, device=device)
            idx = torch.tensor(feats, device=device)
            with torch.inference_mode():
                low, up = nam.nams(torch.cat(maps)[rows], idx, (crop, crop))
            with self.inference.autocast():
                x = self.inference.unit(pixels[rows])
                amplified = attack.feature_attack(
                    self.inference.net, x, idx, self.cfg.attack_steps, self.cfg.attack_step_size,
                    chunk=self.attack_rows, pad=self.inference.pads,
                )
            out = _Outputs(copies.add(pixels), image_of, copies.add(low), copies.add(up), copies.add(masks.quantize(amplified)))
        copies.wait()
        return out

    def _write(self, build: str, p: PairWork, a: int, b: int, out: _Outputs | None) -> dict:
        """Write one pair's strips (rows ``a:b`` of ``out``) and ``assets.json``; returns its record."""
        folder = pair_dir(build, p.wnid, p.feature_index)
        record = {
            "fingerprint": p.fingerprint,
            "class_index": p.class_index,
            "wnid": p.wnid,
            "feature_index": p.feature_index,
            "feature_rank": p.feature_rank,
            "image_ids": p.image_ids,
            "relpaths": p.relpaths,
            "files": {},
        }
        if b > a and out is not None:
            shown = [out.pixels[out.image_of[i]].permute(1, 2, 0).numpy() for i in range(a, b)]
            tiles = {
                "images": shown,
                "heatmaps": [
                    nam.to_uint8(nam.heatmap(x.astype(np.float32) / 255.0, out.masks[i].numpy())) for x, i in zip(shown, range(a, b))
                ],
                "attacks": [out.attacked[i].permute(1, 2, 0).numpy() for i in range(a, b)],
            }
            for name in STRIPS:
                storage.write_bytes_atomic(storage.join(folder, f"{name}.png"), png_strip(tiles[name]))
                record["files"][name] = f"{p.wnid}/feature_{p.feature_index}/{name}.png"
            low = out.low.numpy()
            record["nam_h"], record["nam_w"] = int(low.shape[1]), int(low.shape[2])
            record["nams"] = [np.round(low[i], 4).ravel().tolist() for i in range(a, b)]
        storage.write_json(storage.join(folder, tables.ASSETS), record)
        return record


def class_names(build: str) -> dict[int, dict[str, str | None]]:
    """class_index -> the class's ``name``, ``definition`` and ``supercategory`` as the build's
    ``classes.parquet`` has them (None where it has no such column or value)."""
    table = storage.read_parquet(storage.join(build, tables.CLASSES.path))
    shown = ("name", "definition", "supercategory")
    columns = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in shown}
    return {c: {k: columns[k][i] for k in shown} for i, c in enumerate(table.column("class_index").to_pylist())}


def write_tasks(build: str, records: Sequence[dict], base_url: str | None) -> str:
    """``discover/tasks.csv``: one row per pair, the fields a crowd-work task needs, with the
    classes named as in the build's ``classes.parquet``; returns its URI. It is an export for
    people and crowd platforms (cells are made spreadsheet-safe); programs read the Parquet tables."""
    names = class_names(build)
    prefix = (base_url.rstrip("/") + "/") if base_url else ""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TASK_COLUMNS)
    for r in sorted(records, key=lambda r: (r["class_index"], r["feature_rank"])):
        info = names.get(r["class_index"], {})
        writer.writerow([csv_safe(v) for v in (
            r["class_index"], r["wnid"],
            info.get("name") or "", info.get("definition") or "", info.get("supercategory") or "",
            r["feature_index"], r["feature_rank"],
            *(prefix + r["files"][s] if s in r["files"] else "" for s in STRIPS),
            ";".join(map(str, r["image_ids"])),
        )])
    uri = storage.join(build, tables.TASKS.path)
    storage.write_bytes_atomic(uri, buf.getvalue().encode("utf-8"))
    return uri
