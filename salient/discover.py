"""Discovery: what annotators see for every (class, feature) pair (docs/design.md §2, §3 ``discover``).

Per pair, under ``discover/<wnid>/feature_<j>/``: ``images.png`` (the top images' preprocessed
crops side by side), ``heatmaps.png`` (jet of the NAM over each image, red = high), ``attacks.png``
(the feature attack from each image) and ``assets.json`` (the image ids, the low-resolution NAMs,
and the fingerprint of everything the assets depend on, so unchanged pairs are not remade).
``discover/tasks.csv`` has one crowd-task row per pair.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from salient import attack, images, models, nam, storage, tables
from salient.config import DiscoverConfig, ModelConfig, PreprocessConfig
from salient.metadata import ClassInfo

CODE_VERSION = "discover-1"
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
    """All pairs of one class whose assets must be (re)made; the attack batches them together.
    ``root`` is the dataset root, ``build`` the build directory."""

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


@dataclass
class DiscoverRunner:
    """Loads the model once; makes the assets of every pair of a class in one batch."""

    model: ModelConfig
    preprocess: PreprocessConfig
    cfg: DiscoverConfig
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        m = self.model
        self.net, self.device = models.load_for_worker(m.checkpoint, m.arch, m.format, self.device, self.threads, need_discovery=True)

    def __call__(self, work: ClassWork) -> list[dict]:
        fs, root = storage.url_to_fs(work.root)
        cache: dict[str, torch.Tensor] = {}
        rows, feats, spans = [], [], []
        for p in work.pairs:
            start = len(rows)
            for rel in p.relpaths:
                if rel not in cache:
                    data = fs.cat_file(f"{root.rstrip('/')}/{storage.safe_relpath(rel)}")
                    cache[rel] = images.load_image(data, self.preprocess.resize, self.preprocess.crop)
                rows.append(cache[rel])
                feats.append(p.feature_index)
            spans.append((start, len(rows)))
        records = []
        if rows:
            x = torch.stack(rows).to(self.device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                maps = self.net(x).maps
            low, masks = nam.nams(maps, feats, x.shape[-2:])
            amplified = attack.feature_attack(self.net, x, feats, self.cfg.attack_steps, self.cfg.attack_step_size)
            pix = x.permute(0, 2, 3, 1).float().cpu().numpy()
            masks_np = masks.cpu().numpy()
            attacked = amplified.permute(0, 2, 3, 1).float().cpu().numpy()
            low_np = low.cpu().numpy()
        for p, (a, b) in zip(work.pairs, spans):
            folder = pair_dir(work.build, p.wnid, p.feature_index)
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
            if b > a:
                tiles = {
                    "images": [nam.to_uint8(pix[i]) for i in range(a, b)],
                    "heatmaps": [nam.to_uint8(nam.heatmap(pix[i], masks_np[i])) for i in range(a, b)],
                    "attacks": [nam.to_uint8(attacked[i]) for i in range(a, b)],
                }
                for name in STRIPS:
                    uri = storage.join(folder, f"{name}.png")
                    storage.write_bytes_atomic(uri, png_strip(tiles[name]))
                    record["files"][name] = f"{p.wnid}/feature_{p.feature_index}/{name}.png"
                record["nam_h"], record["nam_w"] = int(low_np.shape[1]), int(low_np.shape[2])
                record["nams"] = [np.round(low_np[i], 4).ravel().tolist() for i in range(a, b)]
            storage.write_json(storage.join(folder, tables.ASSETS), record)
            records.append(record)
        return records


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """A cell that spreadsheet programs will not run as a formula: text starting with = + - @, a
    tab or a carriage return, also after leading spaces or line breaks (which some programs trim),
    gets a leading ``'``."""
    return f"'{value}" if isinstance(value, str) and value.lstrip(" \n").startswith(_FORMULA_START) else value


def write_tasks(build: str, records: Sequence[dict], metadata: Sequence[ClassInfo] | None, base_url: str | None) -> str:
    """``discover/tasks.csv``: one row per pair, the fields a crowd-work task needs; returns its URI."""
    by_wnid = {c.wnid: c for c in metadata or []}
    prefix = (base_url.rstrip("/") + "/") if base_url else ""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TASK_COLUMNS)
    for r in sorted(records, key=lambda r: (r["class_index"], r["feature_rank"])):
        info = by_wnid.get(r["wnid"])
        writer.writerow([csv_safe(v) for v in (
            r["class_index"], r["wnid"],
            info.name if info else "", info.definition if info else "", info.supercategory if info else "",
            r["feature_index"], r["feature_rank"],
            *(prefix + r["files"][s] if s in r["files"] else "" for s in STRIPS),
            ";".join(map(str, r["image_ids"])),
        )])
    uri = storage.join(build, tables.TASKS.path)
    storage.write_bytes_atomic(uri, buf.getvalue().encode("utf-8"))
    return uri
