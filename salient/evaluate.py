"""Sensitivity evaluation (docs/design.md §2 "Sensitivity"): how much a classifier depends on the core
and the spurious regions of the mask store.

x_noisy = clip(x + sigma * N(0, I) * M, 0, 1), M a soft mask in [0, 1] broadcast over channels.
The noise of an image depends only on (seed, trial, image_id), never on batching or on which
worker runs it. For a class c and a feature set F, the images are the union of the pairs' images
(their rows in ``masks/index.parquet``) and an image's mask is the pixel-wise max of its masks for
F. Noise on the *core* masks gives the **spurious accuracy**; noise on the *spurious* masks gives
the **core accuracy**; one pair at a time gives the per-pair drop. Accuracy = top-1 equals c.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from salient import images, models, storage, tables
from salient.config import EvalModelConfig, PreprocessConfig

CODE_VERSION = "evaluate-1"
# The tables this stage writes, in salient.tables; these names stay for callers outside salient/.
CLASSES_TABLE = tables.EVAL_CLASSES.path
SUMMARY_TABLE = tables.EVAL_SUMMARY.path
CLEAN = "clean"


def image_noise(seed: int, trial: int, image_id: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of one image, reproducible from (seed, trial, image_id) alone."""
    digest = hashlib.sha256(f"{seed}:{trial}:{image_id}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=g)


def add_noise(x: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """clip(x + sigma * noise * mask, 0, 1) for ``x [B, 3, H, W]``, ``mask [B, H, W]`` in [0, 1]."""
    return (x + sigma * noise * mask[:, None]).clamp_(0.0, 1.0)


@dataclass
class Condition:
    """One way of perturbing an image: noise on a pair's mask, or on the max of a class's core or
    spurious masks. ``rows`` are the mask rows whose pixel-wise max is the noise mask."""

    key: str  # pair:<c>:<j> | core:<c> | spurious:<c>
    class_index: int
    rows: list[int]


@dataclass
class ImageWork:
    relpath: str
    image_id: int
    conditions: list[Condition] = field(default_factory=list)


def plan_images(index: pa.Table) -> list[ImageWork]:
    """Every image of the mask index with its conditions, in image_id order."""
    cols = index.select(["relpath", "image_id", "class_index", "feature_index", "label"]).to_pydict()
    work: dict[int, ImageWork] = {}
    sets: dict[tuple[int, int, str], list[int]] = defaultdict(list)
    for row, (rel, iid, c, j, label) in enumerate(zip(cols["relpath"], cols["image_id"], cols["class_index"], cols["feature_index"], cols["label"])):
        item = work.setdefault(iid, ImageWork(rel, iid))
        item.conditions.append(Condition(f"pair:{c}:{j}", c, [row]))
        sets[(iid, c, label)].append(row)
    for (iid, c, label), rows in sets.items():
        work[iid].conditions.append(Condition(f"{label}:{c}", c, rows))
    return [work[i] for i in sorted(work)]


@dataclass
class EvalBlock:
    index: int
    images: list[ImageWork]


def blocks_of(work: list[ImageWork], size: int) -> list[EvalBlock]:
    return [EvalBlock(k, work[s : s + size]) for k, s in enumerate(range(0, len(work), size))]


Predictor = Callable[[torch.Tensor], torch.Tensor]


def evaluate_block(
    predict: Predictor,
    block: EvalBlock,
    load_image: Callable[[str], torch.Tensor],
    load_mask: Callable[[int], np.ndarray],
    sigmas: Sequence[float],
    trials: int,
    seed: int,
    batch_size: int,
) -> list[tuple[int, str, int, float, int, int]]:
    """Predictions ``(image_id, condition, class_index, sigma, trial, pred)`` for every image of the
    block, clean (condition ``clean``, sigma NaN, trial -1) and under every condition, sigma, trial."""
    out: list[tuple[int, str, int, float, int, int]] = []
    queue: list[tuple[torch.Tensor, tuple[int, str, int, float, int]]] = []

    def flush() -> None:
        if queue:
            preds = predict(torch.stack([x for x, _ in queue])).tolist()
            out.extend((*meta, int(p)) for (_, meta), p in zip(queue, preds))
            queue.clear()

    for item in block.images:
        x = load_image(item.relpath)
        queue.append((x, (item.image_id, CLEAN, -1, math.nan, -1)))
        masks = {}
        for cond in item.conditions:
            m = np.max(np.stack([load_mask(r) for r in cond.rows]), axis=0).astype(np.float32) / 255.0
            masks[cond.key] = torch.from_numpy(m)
        for trial in range(trials):
            noise = image_noise(seed, trial, item.image_id, x.shape)
            for sigma in sigmas:
                for cond in item.conditions:
                    noisy = add_noise(x[None], masks[cond.key][None], noise[None], sigma)[0]
                    queue.append((noisy, (item.image_id, cond.key, cond.class_index, float(sigma), trial)))
                    if len(queue) >= batch_size:
                        flush()
        if len(queue) >= batch_size:
            flush()
    flush()
    return out


RESULT_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("condition", pa.string()), ("class_index", pa.int32()),
    ("sigma", pa.float64()), ("trial", pa.int32()), ("pred", pa.int32()),
])


def results_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[] for _ in RESULT_SCHEMA]
    return pa.table({f.name: pa.array(list(c), f.type) for f, c in zip(RESULT_SCHEMA, cols)})


@dataclass
class EvalRunner:
    """Loads one classifier once; evaluates blocks of images read through the mask store of the
    build directory ``build``; ``root`` is the dataset root."""

    entry: EvalModelConfig
    build: str
    root: str
    preprocess: PreprocessConfig
    sigmas: list[float]
    trials: int
    seed: int
    batch_size: int = 64
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        from salient.dataset import SalientMasks

        e = self.entry
        self.net, self.device = models.load_for_worker(e.checkpoint, e.arch, e.format, self.device, self.threads)
        self.store = SalientMasks(self.build)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(x.to(self.device).contiguous(memory_format=torch.channels_last)).logits.argmax(dim=1).cpu()

    def load_image(self, relpath: str) -> torch.Tensor:
        return images.load_image(storage.read_bytes(storage.under(self.root, relpath)), self.preprocess.resize, self.preprocess.crop)

    def __call__(self, block: EvalBlock) -> pa.Table:
        return results_table(evaluate_block(
            self.predict, block, self.load_image, self.store.mask, self.sigmas, self.trials, self.seed, self.batch_size
        ))


def cache_key(entry: EvalModelConfig, weights_sha256: str, sigma: float, trials: int, seed: int, index_fp: str, preprocess: PreprocessConfig) -> str:
    return storage.fingerprint(CODE_VERSION, entry.arch, entry.format, weights_sha256, sigma, trials, seed, index_fp, preprocess.resize, preprocess.crop)


# ---- tables ------------------------------------------------------------------------------------


def _acc(preds: list[int], c: int) -> float | None:
    return sum(p == c for p in preds) / len(preds) if preds else None


def _drop(clean: float | None, noisy: float | None) -> float | None:
    return None if clean is None or noisy is None else clean - noisy


def build_tables(index: pa.Table, results: dict[tuple[str, float], pa.Table]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(pairs, classes, summary) for every (model, sigma) from their per-image predictions."""
    idx = index.select(["class_index", "feature_index", "feature_rank", "label", "image_id"]).to_pylist()
    pair_images: dict[tuple[int, int], list[int]] = defaultdict(list)
    pair_meta: dict[tuple[int, int], tuple[int, str]] = {}
    set_images: dict[tuple[int, str], set[int]] = defaultdict(set)
    for r in idx:
        key = (r["class_index"], r["feature_index"])
        pair_images[key].append(r["image_id"])
        pair_meta[key] = (r["feature_rank"], r["label"])
        set_images[(r["class_index"], r["label"])].add(r["image_id"])
    classes = sorted({c for c, _ in pair_images})
    pair_rows, class_rows, summary_rows = [], [], []
    for (model, sigma), table in sorted(results.items()):
        clean: dict[int, int] = {}
        noisy: dict[tuple[str, int], list[int]] = defaultdict(list)
        for r in table.to_pylist():
            if r["condition"] == CLEAN:
                clean[r["image_id"]] = r["pred"]
            else:
                noisy[(r["condition"], r["image_id"])].append(r["pred"])

        def cond_acc(cond: str, ids: Sequence[int], c: int) -> float | None:
            preds = [p for i in ids for p in noisy[(cond, i)]]
            return _acc(preds, c)

        for (c, j), ids in sorted(pair_images.items()):
            clean_acc = _acc([clean[i] for i in ids], c)
            noisy_acc = cond_acc(f"pair:{c}:{j}", ids, c)
            rank, label = pair_meta[(c, j)]
            pair_rows.append({
                "model": model, "sigma": sigma, "class_index": c, "feature_index": j, "feature_rank": rank, "label": label,
                "n_images": len(ids), "clean_acc": clean_acc, "noisy_acc": noisy_acc, "drop": _drop(clean_acc, noisy_acc),
            })
        for c in classes:
            core_ids, spur_ids = sorted(set_images[(c, "core")]), sorted(set_images[(c, "spurious")])
            all_ids = sorted(set(core_ids) | set(spur_ids))
            clean_core, clean_spur = _acc([clean[i] for i in core_ids], c), _acc([clean[i] for i in spur_ids], c)
            core_acc = cond_acc(f"spurious:{c}", spur_ids, c)  # noise on the spurious masks
            spurious_acc = cond_acc(f"core:{c}", core_ids, c)  # noise on the core masks
            class_rows.append({
                "model": model, "sigma": sigma, "class_index": c,
                "n_images": len(all_ids), "n_core_images": len(core_ids), "n_spurious_images": len(spur_ids),
                "clean_acc": _acc([clean[i] for i in all_ids], c),
                "clean_acc_core_images": clean_core, "clean_acc_spurious_images": clean_spur,
                "core_acc": core_acc, "spurious_acc": spurious_acc,
                "core_drop": _drop(clean_spur, core_acc), "spurious_drop": _drop(clean_core, spurious_acc),
            })
        mine = [r for r in class_rows if r["model"] == model and r["sigma"] == sigma]
        row = {"model": model, "sigma": sigma}
        for col in ("clean_acc", "core_acc", "spurious_acc", "core_drop", "spurious_drop"):
            vals = [r[col] for r in mine if r[col] is not None]
            row[f"mean_{col}"] = sum(vals) / len(vals) if vals else None
            row[f"n_classes_{col}"] = len(vals)
        summary_rows.append(row)
    return pa.Table.from_pylist(pair_rows), pa.Table.from_pylist(class_rows), pa.Table.from_pylist(summary_rows)
