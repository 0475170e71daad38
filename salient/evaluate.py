"""Sensitivity evaluation (docs/design.md §2 "Sensitivity"): how much a classifier depends on the core
and the spurious regions of the mask store.

x_noisy = clip(x + sigma * N(0, I) * M, 0, 1), M a soft mask in [0, 1] broadcast over channels.
The noise of an image depends only on (seed, trial, image_id) and the kind of device that draws it,
never on batching or on which worker runs it. For a class c and a feature set F, the images are the
union of the pairs' images (their rows in ``masks/index.parquet``) and an image's mask is the
pixel-wise max of its masks for F. Noise on the *core* masks gives the **spurious accuracy**; noise
on the *spurious* masks gives the **core accuracy**; one pair at a time gives the per-pair drop.
Accuracy = top-1 equals c.

A worker holds every model with work and goes over blocks of consecutive images that end where a
mask shard object ends: it reads the block's masks as whole shards, decodes each image once, builds
each clean and noisy variant once on the device and runs every model that needs it, in batches
across images.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from salient import reference, tables
from salient.config import ComputeConfig, EvalModelConfig, PreprocessConfig
from salient.dataset import SalientMasks
from salient.inference import Inference
from salient.stream import Batch, HostCopies, ImageStream, decode_threads, refuse_failures

CODE_VERSION = "evaluate-4"
# The tables this stage writes, in salient.tables; these names stay for callers outside salient/.
CLASSES_TABLE = tables.EVAL_CLASSES.path
SUMMARY_TABLE = tables.EVAL_SUMMARY.path
CLEAN = "clean"
# The order of every predictions table, so that its bytes depend on no batching or worker count.
RESULT_ORDER = [("image_id", "ascending"), ("condition", "ascending"), ("sigma", "ascending"), ("trial", "ascending")]


def image_noise(seed: int, trial: int, image_id: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of one image on ``device``, reproducible from (seed, trial, image_id)
    alone for one kind of device: the CPU and CUDA generators (MT19937, Philox) draw differently."""
    digest = hashlib.sha256(f"{seed}:{trial}:{image_id}".encode()).digest()
    g = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=g, device=device)


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


def scored(index: pa.Table) -> list[bool]:
    """Per row of the mask index, whether evaluation scores it: an image counts for class c only
    if it is filed under c (``image_label`` equals ``class_index``)."""
    return [a == b for a, b in zip(index.column("image_label").to_pylist(), index.column("class_index").to_pylist())]


def plan_images(index: pa.Table) -> list[ImageWork]:
    """Every image of the mask index with its conditions, in image_id order; rows that are not
    :func:`scored` make no condition, and an image with none is not planned."""
    cols = index.select(["relpath", "image_id", "class_index", "feature_index", "label"]).to_pydict()
    work: dict[int, ImageWork] = {}
    sets: dict[tuple[int, int, str], list[int]] = defaultdict(list)
    rows = zip(cols["relpath"], cols["image_id"], cols["class_index"], cols["feature_index"], cols["label"], scored(index))
    for row, (rel, iid, c, j, label, counts) in enumerate(rows):
        if not counts:
            continue
        item = work.setdefault(iid, ImageWork(rel, iid))
        item.conditions.append(Condition(f"pair:{c}:{j}", c, [row]))
        sets[(iid, c, label)].append(row)
    for (iid, c, label), rows in sets.items():
        work[iid].conditions.append(Condition(f"{label}:{c}", c, rows))
    return [work[i] for i in sorted(work)]


@dataclass
class EvalBlock:
    """Consecutive images of the plan; mask rows ``lo`` to ``hi - 1`` hold all their masks."""

    index: int
    images: list[ImageWork]
    lo: int
    hi: int


def blocks_of(work: list[ImageWork], size: int, shard_rows: int) -> list[EvalBlock]:
    """``work`` (in mask-row order) cut into blocks of at least ``size`` images, the last one the
    rest. A block ends at the first image boundary after that where the next image's rows start
    in a later mask shard object (``shard_rows`` rows each) than this one's end, so that blocks
    read whole shards, none twice."""
    blocks: list[EvalBlock] = []
    start = 0
    for k, item in enumerate(work):
        last = max(r for cond in item.conditions for r in cond.rows)
        if k + 1 == len(work) or (
            k + 1 - start >= size and min(r for cond in work[k + 1].conditions for r in cond.rows) // shard_rows > last // shard_rows
        ):
            mine = work[start : k + 1]
            rows = [r for it in mine for cond in it.conditions for r in cond.rows]
            blocks.append(EvalBlock(len(blocks), mine, min(rows), max(rows) + 1))
            start = k + 1
    return blocks


def condition_masks(block: EvalBlock, masks: torch.Tensor) -> torch.Tensor:
    """The noise mask of every condition of the block's images, in order: uint8 ``[C, H, W]``, the
    pixel-wise max of its rows; ``masks`` holds the block's rows ``lo`` to ``hi - 1``."""
    conds = [cond for item in block.images for cond in item.conditions]
    out = masks.new_empty((len(conds), *masks.shape[1:]))
    if masks.device.type == "cpu":  # a CPU gathers and reduces uint8 rows ten times faster one by one
        for k, cond in enumerate(conds):
            m = out[k].copy_(masks[cond.rows[0] - block.lo])
            for r in cond.rows[1:]:
                torch.maximum(m, masks[r - block.lo], out=m)
        return out
    by_count: dict[int, list[int]] = defaultdict(list)
    for k, cond in enumerate(conds):
        by_count[len(cond.rows)].append(k)
    for ks in by_count.values():
        rows = torch.tensor([[r - block.lo for r in conds[k].rows] for k in ks], device=masks.device)
        out[torch.tensor(ks, device=masks.device)] = masks[rows].amax(dim=1)
    return out


# The top-1 classes ``[B]`` of images ``[B, 3, H, W]`` (normalised as evaluate_block is told), on their device.
Predictor = Callable[[torch.Tensor], torch.Tensor]
# A prediction's row of a predictions table, its ``pred`` left out: image_id, condition,
# class_index, sigma, trial.
Meta = tuple[int, str, int, float, int]


@dataclass
class _Group:
    """Variants of one image waiting for a model batch: the clean image (``scaled`` None), or the
    noisy images of one trial at one sigma, one per condition from the block's condition ``first``
    on. ``pixels`` is the normalised clean image, ``scaled`` sigma * noise / std."""

    pixels: torch.Tensor
    scaled: torch.Tensor | None
    first: int
    meta: list[Meta]


@dataclass
class _Queue:
    """The variants that ``models`` are to run: clean (``sigma`` None) or noisy at ``sigma``."""

    sigma: float | None
    models: list[str]
    groups: deque[_Group] = field(default_factory=deque)
    size: int = 0

    def add(self, group: _Group) -> None:
        self.groups.append(group)
        self.size += len(group.meta)


def evaluate_block(
    models: Mapping[str, tuple[Predictor, Sequence[float]]],
    block: EvalBlock,
    batches: Iterable[Batch],
    masks: torch.Tensor,
    trials: int,
    seed: int,
    batch_size: int,
    noise: Callable[[int, int], torch.Tensor] | None = None,
    normalization: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, pa.Table]:
    """Each model's predictions on the block's images: clean (condition ``clean``, sigma NaN,
    trial -1) and, for every condition, trial and sigma of the model's own (``models`` maps a name
    to its predictor and sigmas), on x_noisy = clip(x + (sigma * noise) * mask, 0, 1).

    ``batches`` are the block's images (positions in ``block.images``) as uint8 pixels; ``masks``
    its mask rows ``lo`` to ``hi - 1``, uint8; both on the device where everything runs. The noise
    of (image_id, trial) is ``noise(image_id, trial)`` when given (drawn ahead), else
    :func:`image_noise` on that device. Every variant is made once, for all the models that need
    it, and run in batches of ``batch_size`` across images. ``InputError`` when an image could not
    be read.

    The predictors get the variants as ``[0, 1]`` images, or with ``normalization = (mean, std)``
    (``[1, 3, 1, 1]`` each) as ``(x - mean) / std``, made so in the same pass that makes them:
    ``clip(x_n + (sigma * noise / std) * mask, -mean / std, (1 - mean) / std)``.
    """
    device = masks.device
    cond_masks = condition_masks(block, masks)
    first = [0]
    for item in block.images:
        first.append(first[-1] + len(item.conditions))
    sigmas = sorted({s for _, own in models.values() for s in own})
    clean = _Queue(None, list(models))
    noisy = [_Queue(s, [name for name, (_, own) in models.items() if s in own]) for s in sigmas]
    copies = HostCopies(device)
    done: dict[str, list[tuple[list[Meta], torch.Tensor]]] = {name: [] for name in models}
    # Every model batch is made in one buffer: a fresh one would cost more than the arithmetic (on
    # the CPU, a large allocation is new pages that the kernel zeroes).
    # The variants are made channels-first (a mask broadcast over the channels, and each channel's
    # own numbers, are then contiguous runs; the model's first layer lays its input out as it
    # likes) and normalised per channel with plain numbers, which is several times faster on the
    # CPU than broadcasting a [3, 1, 1] tensor.
    x_batch = torch.empty((batch_size, 3, *masks.shape[1:]), device=device)
    mean, std = ([0.0] * 3, [1.0] * 3) if normalization is None else (t.flatten().tolist() for t in normalization)
    unit_masks = torch.empty((batch_size, *masks.shape[1:]), device=device)  # a few at a time: they stay in cache

    def normalise(x: torch.Tensor) -> torch.Tensor:
        if normalization is not None:
            for c in range(3):
                x[c].sub_(mean[c]).div_(std[c])
        return x

    # Variants are made an image at a time, straight into the batch: the CPU keeps the image in
    # cache, and a GPU runs a few operations per image.
    def fill(out: torch.Tensor, group: _Group) -> None:
        """The first ``len(out)`` variants of ``group``, made in ``out``."""
        if group.scaled is None:
            out.copy_(group.pixels)
            return
        mask = torch.div(cond_masks[group.first : group.first + len(out)], 255.0, out=unit_masks[: len(out)])
        torch.mul(group.scaled, mask[:, None], out=out).add_(group.pixels)
        if normalization is None:
            out.clamp_(0.0, 1.0)
        else:
            for c in range(3):
                out[:, c].clamp_(-mean[c] / std[c], (1.0 - mean[c]) / std[c])

    def run(queue: _Queue, least: int) -> None:
        while queue.size >= least and queue.size:
            n = min(batch_size, queue.size)
            meta: list[Meta] = []
            while len(meta) < n:
                group = queue.groups[0]
                k = min(len(group.meta), n - len(meta))
                fill(x_batch[len(meta) : len(meta) + k], group)
                meta += group.meta[:k]
                if k == len(group.meta):
                    queue.groups.popleft()
                else:
                    group.meta, group.first = group.meta[k:], group.first + k
            queue.size -= n
            for name in queue.models:
                done[name].append((meta, copies.add(models[name][0](x_batch[:n]))))

    relpaths = [item.relpath for item in block.images]
    with torch.inference_mode():
        for batch in batches:
            refuse_failures(f"evaluation block {block.index}", relpaths, batch)
            for k, pos in enumerate(batch.positions):
                item = block.images[pos]
                pixels = batch.pixels[k]
                x = normalise(torch.empty(pixels.shape, device=device).copy_(pixels).div_(255.0))  # channels-first, in [0, 1]
                clean.add(_Group(x, None, 0, [(item.image_id, CLEAN, -1, math.nan, -1)]))
                for trial in range(trials if noisy else 0):
                    drawn = noise(item.image_id, trial) if noise else image_noise(seed, trial, item.image_id, x.shape, device)
                    if normalization is not None:
                        drawn = torch.stack([drawn[c] / std[c] for c in range(3)])
                    for queue in noisy:
                        meta = [(item.image_id, cond.key, cond.class_index, queue.sigma, trial) for cond in item.conditions]
                        queue.add(_Group(x, drawn * queue.sigma, first[pos], meta))
            for queue in (clean, *noisy):
                run(queue, batch_size)
        for queue in (clean, *noisy):
            run(queue, 1)
    copies.wait()
    return {name: results_table([(*m, p) for meta, preds in parts for m, p in zip(meta, preds.tolist())]) for name, parts in done.items()}


RESULT_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("condition", pa.string()), ("class_index", pa.int32()),
    ("sigma", pa.float64()), ("trial", pa.int32()), ("pred", pa.int32()),
])


def results_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[] for _ in RESULT_SCHEMA]
    return pa.table({f.name: pa.array(list(c), f.type) for f, c in zip(RESULT_SCHEMA, cols)})


@dataclass
class BlockResult:
    """A block's predictions per model, the kind of device that drew its noise (``cpu``, ``cuda``)
    and where the time of reading its images went (:meth:`salient.stream.FeedStats.as_dict`)."""

    predictions: dict[str, pa.Table]
    noise_device: str
    feed: dict


@dataclass
class EvalRunner:
    """One worker: every model with work (with the sigmas to compute for it) loaded once on one
    device; evaluates blocks of images read through the mask store of the build directory
    ``build``. ``root`` is the dataset root. Calls from several threads read their images and masks
    at once and take turns on the device."""

    models: list[tuple[EvalModelConfig, list[float]]]
    build: str
    root: str
    preprocess: PreprocessConfig
    compute: ComputeConfig
    trials: int
    seed: int
    mask_alignment: str = "crop"
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        self.nets = {
            e.name: Inference.load(e.checkpoint, e.arch, e.format, self.compute, threads=self.threads, device=self.device)
            for e, _ in self.models
        }
        self.device = next(iter(self.nets.values())).device
        self.store = SalientMasks(self.build)
        self.stream = ImageStream(self.root, self.preprocess, self.device, self.compute.batch_size, decode_threads(self.compute, self.threads))
        self.lock = threading.Lock()  # one device for every model

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, std) the variants are made with: the first model's."""
        net = next(iter(self.nets.values()))
        return net.mean, net.std

    def predictor(self, name: str) -> Predictor:
        """The top-1 classes of model ``name`` on images normalised as :meth:`normalization` says."""
        net, (mean, std) = self.nets[name], self.normalization()
        if torch.equal(net.mean, mean) and torch.equal(net.std, std):
            return lambda x: net.normalized(x).logits.argmax(dim=1)
        scale, shift = std / net.std, (mean - net.mean) / net.std
        return lambda x: net.normalized(torch.addcmul(shift, x, scale)).logits.argmax(dim=1)

    def __call__(self, block: EvalBlock) -> BlockResult:
        feed = self.stream.open([item.relpath for item in block.images])
        noise = None
        if torch.device(self.device).type == "cpu":  # drawn ahead by the decode threads, as they decode
            shape = (3, self.preprocess.crop, self.preprocess.crop)
            drawn = {
                (item.image_id, trial): self.stream.pool.submit(image_noise, self.seed, trial, item.image_id, shape)
                for item in block.images for trial in range(self.trials)
            }
            noise = lambda image_id, trial: drawn[(image_id, trial)].result()  # noqa: E731
        try:
            rows = self.store.rows(block.lo, block.hi)
            if self.mask_alignment == "reference":
                rows = reference.loader_alignment(rows, self.preprocess.resize, self.preprocess.crop)
            rows = torch.from_numpy(rows)
            with self.lock:
                predictions = evaluate_block(
                    {e.name: (self.predictor(e.name), sigmas) for e, sigmas in self.models},
                    block, feed, rows.to(self.device), self.trials, self.seed, self.compute.batch_size, noise,
                    self.normalization(),
                )
        finally:
            feed.cancel()
        return BlockResult(predictions, torch.device(self.device).type, feed.stats.as_dict())


# ---- tables ------------------------------------------------------------------------------------


def _acc(preds: list[int], c: int) -> float | None:
    return sum(p == c for p in preds) / len(preds) if preds else None


def _drop(clean: float | None, noisy: float | None) -> float | None:
    return None if clean is None or noisy is None else clean - noisy


def build_tables(index: pa.Table, results: dict[tuple[str, float], pa.Table]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(pairs, classes, summary) for every (model, sigma) from their per-image predictions, over
    the :func:`scored` rows of the mask index (docs/evaluation.md "Tables")."""
    idx = index.select(["class_index", "feature_index", "feature_rank", "label", "image_id"]).to_pylist()
    pair_images: dict[tuple[int, int], list[int]] = defaultdict(list)
    pair_meta: dict[tuple[int, int], tuple[int, str]] = {}
    other_class: dict[tuple[int, int], int] = defaultdict(int)
    set_images: dict[tuple[int, str], set[int]] = defaultdict(set)
    for r, counts in zip(idx, scored(index)):
        key = (r["class_index"], r["feature_index"])
        pair_meta[key] = (r["feature_rank"], r["label"])
        if not counts:
            other_class[key] += 1
            continue
        pair_images[key].append(r["image_id"])
        set_images[(r["class_index"], r["label"])].add(r["image_id"])
    classes = sorted({c for c, _ in pair_meta})
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

        for (c, j), (rank, label) in sorted(pair_meta.items()):
            ids = pair_images[(c, j)]
            clean_acc = _acc([clean[i] for i in ids], c)
            noisy_acc = cond_acc(f"pair:{c}:{j}", ids, c)
            pair_rows.append({
                "model": model, "sigma": sigma, "class_index": c, "feature_index": j, "feature_rank": rank, "label": label,
                "n_images": len(ids), "n_other_class_images": other_class[(c, j)],
                "clean_acc": clean_acc, "noisy_acc": noisy_acc, "drop": _drop(clean_acc, noisy_acc),
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
        for col in ("clean_acc", "clean_acc_core_images", "clean_acc_spurious_images", "core_acc", "spurious_acc", "core_drop", "spurious_drop"):
            vals = [r[col] for r in mine if r[col] is not None]
            row[f"mean_{col}"] = sum(vals) / len(vals) if vals else None
            row[f"n_classes_{col}"] = len(vals)
        summary_rows.append(row)
    return pa.Table.from_pylist(pair_rows), pa.Table.from_pylist(class_rows), pa.Table.from_pylist(summary_rows)
