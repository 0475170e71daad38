"""Aggregation: feature importance, the (class, feature) pairs, and the top images per neuron and
per pair (docs/design.md §2), from the committed activation shards.

Two streaming passes; each shard is reduced to a small partial and partials are merged in any
order. Everything is computed from the activations as stored (``activations.dtype``, float32 or
float16). Class sums are float64 sums of the stored values (exact for float16; for float32 within
float64 rounding), and top-k lists are merged by a total order on the exact stored values
(activation descending, then image_id ascending), so the top images do not depend on how shards are
spread or in which order they finish. Memory is bounded by the output (classes x features,
neurons x k, pairs x K), not by the number of images.

Pass 2 ranks each pair's images among three candidate sets (:data:`CANDIDATES`): the images filed
under the pair's class, those predicted as it, and those both. ``topk/class.parquet`` holds the set
of ``aggregate.grouping`` (D(c), what annotators are shown); ``topk/candidates.parquet`` holds all
three, from which ``generalize.candidates`` picks the images that get masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from salient import storage, tables
from salient.config import AggregateConfig
from salient.errors import InputError
from salient.metadata import ClassInfo

GROUPINGS = ("prediction", "label")
GROUP_COLUMN = {"prediction": "pred", "label": "label"}
# The candidate sets of a pair's top images (docs/design.md §2 "Top images"), in the order of pass 2.
CANDIDATES = ("label", "label_and_prediction", "prediction")
CODE_VERSION = "aggregate-3"

# The tables this writes, in salient.tables; these names stay for callers outside salient/.
CLASSES_TABLE = tables.CLASSES.path
PAIRS_TABLE = tables.PAIRS.path
TOPK_NEURON_TABLE = tables.TOPK_NEURON.path
TOPK_CLASS_TABLE = tables.TOPK_CLASS.path
TOPK_CANDIDATES_TABLE = tables.TOPK_CANDIDATES.path

T = TypeVar("T")
MapFn = Callable[[Callable[..., T], Sequence[tuple]], Iterable[T]]


def local_map(fn: Callable[..., T], args: Sequence[tuple]) -> Iterator[T]:
    """Run ``fn(*a)`` for each ``a`` in this process, one at a time."""
    for a in args:
        yield fn(*a)


# ---- a total order on (activation, image_id) packed into one int64 ----------------------------

# Pads lists shorter than k: the smallest int64, below every real key (a real key's low half,
# 0xFFFFFFFF - image_id, is at least 1).
_NONE = np.iinfo(np.int64).min
MAX_IMAGE_ID = 0xFFFFFFFF - 1


def sort_keys(acts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int64 keys whose descending order is activation descending, then image_id ascending.

    ``acts`` are float32 or float16 (any shape; float16 widens to float32 exactly), ordered by
    their exact values, 0.0 and -0.0 equal; ``ids`` broadcast against them and lie in
    [0, :data:`MAX_IMAGE_ID`].
    """
    # + 0.0 turns -0.0 into 0.0, so equal activations get equal keys whatever their sign bit.
    u = (np.ascontiguousarray(acts, dtype=np.float32) + np.float32(0)).view(np.uint32).astype(np.int64)
    # The float's bits as an unsigned integer in the float's order, then shifted to a signed high half.
    ordered = np.where(u & 0x80000000, 0xFFFFFFFF - u, u | 0x80000000) - 0x80000000
    return (ordered << 32) | (0xFFFFFFFF - np.asarray(ids, dtype=np.int64))


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activations as float32, image_ids) of keys made by :func:`sort_keys`; padding gives NaN, -1."""
    ordered = (keys >> 32) + 0x80000000
    u = np.where(ordered >= 0x80000000, ordered - 0x80000000, 0xFFFFFFFF - ordered).astype(np.uint32)
    acts = u.view(np.float32)
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    none = keys == _NONE
    return np.where(none, np.nan, acts).astype(np.float32), np.where(none, -1, ids)


def top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest keys of each column, sorted descending, padded with :data:`_NONE`: shape ``[k, m]``."""
    n, m = keys.shape
    if n > k:
        keys = np.take_along_axis(keys, np.argpartition(keys, n - k, axis=0)[n - k :], axis=0)
    keys = np.sort(keys, axis=0)[::-1]
    if keys.shape[0] < k:
        keys = np.concatenate([keys, np.full((k - keys.shape[0], m), _NONE)], axis=0)
    return keys


# ---- reading shards ----------------------------------------------------------------------------


@dataclass
class ShardData:
    image_ids: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64
    preds: np.ndarray  # [n] int64
    features: np.ndarray  # [n, D] as stored: float32 or float16

    def groups(self, grouping: str) -> np.ndarray:
        return self.preds if grouping == "prediction" else self.labels

    def candidates(self, rule: str, c: int) -> np.ndarray:
        """The rows of the candidate set ``rule`` (one of :data:`CANDIDATES`) of class ``c``."""
        if rule == "label_and_prediction":
            return np.flatnonzero((self.labels == c) & (self.preds == c))
        return np.flatnonzero(self.groups(rule) == c)


def read_shard(uri: str) -> ShardData:
    table = storage.read_parquet(uri, columns=["image_id", "label", "pred", "features"])
    width = table.schema.field("features").type.list_size
    feats = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    ids = table.column("image_id").to_numpy().astype(np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() > MAX_IMAGE_ID):
        raise InputError(f"{uri}: image ids outside [0, {MAX_IMAGE_ID}]; run `salient activations CONFIG` again")
    return ShardData(
        ids,
        table.column("label").to_numpy().astype(np.int64),
        table.column("pred").to_numpy().astype(np.int64),
        feats.reshape(-1, width),
    )


def _class_sums(feats: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the classes present in ``groups``, their feature sums ``[m, D]`` float64, their counts)."""
    classes, counts = np.unique(groups, return_counts=True)
    if not len(classes):
        return classes, np.zeros((0, feats.shape[1]), np.float64), counts.astype(np.int64)
    order = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return classes, np.add.reduceat(feats[order].astype(np.float64), starts, axis=0), counts.astype(np.int64)


# ---- pass 1: class sums and per-neuron top-k ---------------------------------------------------


@dataclass
class Partial:
    """Pass 1 of one shard: per grouping, the classes it has images of with their feature sums and
    counts (only those: a shard holds a few classes, so its size does not grow with the classes),
    and the top-k keys of every neuron."""

    classes: list[np.ndarray]  # per grouping (index GROUPINGS): [m] class indices
    sums: list[np.ndarray]  # per grouping: [m, D] float64
    counts: list[np.ndarray]  # per grouping: [m] int64
    neuron_keys: np.ndarray  # [k, D] int64
    images: int


@dataclass
class Totals:
    """Pass 1 over every shard: per-class sums and counts for both groupings, the top-k keys of
    every neuron, the images."""

    sums: np.ndarray  # [2, C, D] float64, index GROUPINGS
    counts: np.ndarray  # [2, C] int64
    neuron_keys: np.ndarray  # [k, D] int64
    images: int = 0

    @classmethod
    def empty(cls, num_classes: int, width: int, k_neuron: int) -> Totals:
        return cls(
            np.zeros((len(GROUPINGS), num_classes, width), np.float64), np.zeros((len(GROUPINGS), num_classes), np.int64),
            np.full((k_neuron, width), _NONE),
        )

    def add(self, part: Partial) -> None:
        for g in range(len(GROUPINGS)):
            self.sums[g, part.classes[g]] += part.sums[g]
            self.counts[g, part.classes[g]] += part.counts[g]
        self.neuron_keys = top_k(np.concatenate([self.neuron_keys, part.neuron_keys]), self.neuron_keys.shape[0])
        self.images += part.images


def shard_partial(uri: str, num_classes: int, k_neuron: int) -> Partial:
    """Pass-1 partial of one activation shard."""
    data = read_shard(uri)
    if len(data.image_ids) and (max(data.labels.max(), data.preds.max()) >= num_classes or min(data.labels.min(), data.preds.min()) < 0):
        raise InputError(f"{uri}: labels or predictions outside the model's {num_classes} classes")
    by = [_class_sums(data.features, data.groups(g)) for g in GROUPINGS]
    return Partial(
        [c for c, _, _ in by], [s for _, s, _ in by], [n for _, _, n in by],
        top_k(sort_keys(data.features, data.image_ids[:, None]), k_neuron),
        len(data.image_ids),
    )


# ---- importance and pairs ----------------------------------------------------------------------


def importance(sums: np.ndarray, counts: np.ndarray, fc_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean activation [C, D], importance FI_c(j) = w[c, j] * mean [C, D]); NaN rows where D(c) is empty."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)
    return mean, fc_weight.astype(np.float64) * mean


def select_pairs(fi: np.ndarray, counts: np.ndarray, features_per_class: int) -> list[tuple[int, int, int]]:
    """(class_index, feature_index, feature_rank): the top features per class by importance,
    descending, ties by lower feature_index; none for classes with an empty D(c)."""
    pairs = []
    feature_ids = np.arange(fi.shape[1])
    for c in np.flatnonzero(counts > 0):
        order = np.lexsort((feature_ids, -fi[c]))[:features_per_class]
        pairs.extend((int(c), int(j), rank) for rank, j in enumerate(order, start=1))
    return pairs


# ---- pass 2: per-pair top-K within each candidate set -------------------------------------------


def shard_pair_keys(uri: str, pairs: Sequence[tuple[int, int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass-2 partial of one shard, for the pairs whose class has images in it: (their positions
    in ``pairs`` ``[p]``, and for every candidate set of :data:`CANDIDATES` the top-K keys by
    neuron j of the set's images of class c ``[len(CANDIDATES), K, p]``)."""
    data = read_shard(uri)
    by_class: dict[int, list[int]] = {}
    for p, (c, _) in enumerate(pairs):
        by_class.setdefault(c, []).append(p)
    shown = set(np.unique(data.labels).tolist()) | set(np.unique(data.preds).tolist())
    rows = {(s, c): data.candidates(rule, c) for s, rule in enumerate(CANDIDATES) for c in by_class if c in shown}
    present = sorted(p for c, ps in by_class.items() if any(len(rows.get((s, c), ())) for s in range(len(CANDIDATES))) for p in ps)
    column = {p: i for i, p in enumerate(present)}
    out = np.full((len(CANDIDATES), k, len(present)), _NONE)
    for (s, c), found in rows.items():
        if not len(found):
            continue
        ps = by_class[c]
        feats = data.features[found][:, [pairs[p][1] for p in ps]]
        out[s][:, [column[p] for p in ps]] = top_k(sort_keys(feats, data.image_ids[found][:, None]), k)
    return np.asarray(present, np.int64), out


def _add_keys(total: np.ndarray, part: tuple[np.ndarray, np.ndarray]) -> None:
    """Merge a pass-2 partial into the keys of every pair ``total`` ``[S, K, P]``, in place."""
    present, keys = part
    if not len(present):
        return
    for s in range(total.shape[0]):
        total[s][:, present] = top_k(np.concatenate([total[s][:, present], keys[s]]), total.shape[1])


# ---- tables ------------------------------------------------------------------------------------


def _image_info(plan_uri: str, ids: np.ndarray) -> tuple[dict[int, str], dict[int, int]]:
    """relpath and label of the given image_ids, streaming the plan."""
    wanted = np.unique(ids[ids >= 0])
    relpaths: dict[int, str] = {}
    labels: dict[int, int] = {}
    for batch in storage.iter_parquet_batches(plan_uri, ["image_id", "relpath", "label"]):
        bid = batch.column(0).to_numpy()
        hit = np.flatnonzero(np.isin(bid, wanted, assume_unique=True))
        if len(hit):
            rel = batch.column(1).take(pa.array(hit)).to_pylist()
            lab = batch.column(2).take(pa.array(hit)).to_pylist()
            for i, r, lb in zip(bid[hit].tolist(), rel, lab):
                relpaths[i] = r
                labels[i] = lb
    return relpaths, labels


def _topk_rows(keys: np.ndarray, relpaths: dict[int, str], labels: dict[int, int]) -> dict[str, list]:
    """Column lists for every non-padding entry of ``keys`` ``[k, m]``, column-major (rank inside column)."""
    acts, ids = decode_keys(keys)
    cols: dict[str, list] = {"column": [], "rank": [], "image_id": [], "relpath": [], "label": [], "activation": []}
    for m in range(keys.shape[1]):
        for r in range(keys.shape[0]):
            iid = int(ids[r, m])
            if iid < 0:
                break
            cols["column"].append(m)
            cols["rank"].append(r + 1)
            cols["image_id"].append(iid)
            cols["relpath"].append(relpaths[iid])
            cols["label"].append(labels[iid])
            cols["activation"].append(float(acts[r, m]))
    return cols


@dataclass
class AggregateInputs:
    """What aggregation reads: the committed shards and the model's final layer; ``build`` is the
    build directory it writes to."""

    build: str
    shard_uris: list[str]
    fc_weight: np.ndarray  # [C, D]
    wnids: list[str]
    fingerprint: str
    class_metadata: list[ClassInfo] | None = None


def run(inputs: AggregateInputs, cfg: AggregateConfig, map_fn: MapFn = local_map) -> dict[str, Any]:
    """Both passes and every table; returns a summary."""
    build = inputs.build
    num_classes, width = inputs.fc_weight.shape
    if len(inputs.wnids) != num_classes:
        raise InputError(
            f"the dataset has {len(inputs.wnids)} class folders but the model has {num_classes} classes; "
            "labels and predictions would not refer to the same classes"
        )
    if not inputs.shard_uris:
        raise InputError("no activation shards to aggregate; run the activation stage first")
    merged = Totals.empty(num_classes, width, cfg.top_k_neuron)
    for part in map_fn(shard_partial, [(u, num_classes, cfg.top_k_neuron) for u in inputs.shard_uris]):
        merged.add(part)
    g = GROUPINGS.index(cfg.grouping)
    mean, fi = importance(merged.sums[g], merged.counts[g], inputs.fc_weight)
    pairs = select_pairs(fi, merged.counts[g], cfg.features_per_class)
    pair_keys = np.full((len(CANDIDATES), cfg.top_k_class, len(pairs)), _NONE)
    if pairs:
        cj = [(c, j) for c, j, _ in pairs]
        for part in map_fn(shard_pair_keys, [(u, cj, cfg.top_k_class) for u in inputs.shard_uris]):
            _add_keys(pair_keys, part)

    from salient import plan as planmod

    all_ids = np.concatenate([decode_keys(merged.neuron_keys)[1].ravel(), decode_keys(pair_keys)[1].ravel()])
    relpaths, labels = _image_info(planmod.plan_uri(build), all_ids)
    fp = inputs.fingerprint
    meta = {"grouping": cfg.grouping, "code_version": CODE_VERSION}
    names = {c.wnid: c for c in inputs.class_metadata or []}

    group_name = "predicted as" if cfg.grouping == "prediction" else "labelled"
    counts_g = merged.counts[g]
    storage.write_parquet(
        storage.join(build, tables.CLASSES.path),
        pa.table({
            "class_index": pa.array(range(num_classes), pa.int32()),
            "wnid": pa.array(inputs.wnids, pa.string()),
            "name": pa.array([names[w].name if w in names else None for w in inputs.wnids], pa.string()),
            "definition": pa.array([names[w].definition if w in names else None for w in inputs.wnids], pa.string()),
            "supercategory": pa.array([names[w].supercategory if w in names else None for w in inputs.wnids], pa.string()),
            "n_images": pa.array(merged.counts[GROUPINGS.index("label")], pa.int64()),
            "n_predicted": pa.array(merged.counts[GROUPINGS.index("prediction")], pa.int64()),
            "n_group": pa.array(counts_g, pa.int64()),
            "reason": pa.array([None if n else f"no images {group_name} this class" for n in counts_g], pa.string()),
        }),
        fp, meta,
    )
    valid = np.repeat(counts_g > 0, width)
    storage.write_parquet(
        storage.join(build, tables.IMPORTANCE.path),
        pa.table({
            "class_index": pa.array(np.repeat(np.arange(num_classes), width), pa.int32()),
            "feature_index": pa.array(np.tile(np.arange(width), num_classes), pa.int32()),
            "importance": pa.array(fi.ravel(), pa.float64(), mask=~valid),
            "mean_activation": pa.array(mean.ravel(), pa.float64(), mask=~valid),
        }),
        fp, meta,
    )
    storage.write_parquet(
        storage.join(build, tables.PAIRS.path),
        pa.table({
            "class_index": pa.array([c for c, _, _ in pairs], pa.int32()),
            "wnid": pa.array([inputs.wnids[c] for c, _, _ in pairs], pa.string()),
            "feature_index": pa.array([j for _, j, _ in pairs], pa.int32()),
            "feature_rank": pa.array([r for _, _, r in pairs], pa.int32()),
            "importance": pa.array([fi[c, j] for c, j, _ in pairs], pa.float64()),
            "mean_activation": pa.array([mean[c, j] for c, j, _ in pairs], pa.float64()),
            "n_group": pa.array([int(counts_g[c]) for c, _, _ in pairs], pa.int64()),
        }),
        fp, meta,
    )
    neuron = _topk_rows(merged.neuron_keys, relpaths, labels)
    storage.write_parquet(
        storage.join(build, tables.TOPK_NEURON.path),
        pa.table({
            "feature_index": pa.array(neuron.pop("column"), pa.int32()),
            **_topk_columns(neuron),
        }),
        fp, meta,
    )
    per_set = {rule: _pair_topk(pair_keys[s], pairs, inputs.wnids, relpaths, labels) for s, rule in enumerate(CANDIDATES)}
    storage.write_parquet(storage.join(build, tables.TOPK_CLASS.path), per_set[cfg.grouping], fp, meta)
    storage.write_parquet(
        storage.join(build, tables.TOPK_CANDIDATES.path),
        pa.concat_tables([
            t.add_column(0, "candidates", pa.array([rule] * t.num_rows, pa.string())) for rule, t in per_set.items()
        ]),
        fp, meta,
    )
    return {
        "images": merged.images,
        "shards": len(inputs.shard_uris),
        "classes": num_classes,
        "classes_without_images": int((counts_g == 0).sum()),
        "pairs": len(pairs),
        "grouping": cfg.grouping,
        "topk_class_rows": per_set[cfg.grouping].num_rows,
        "topk_neuron_rows": len(neuron["rank"]),
    }


def _pair_topk(
    keys: np.ndarray, pairs: Sequence[tuple[int, int, int]], wnids: Sequence[str], relpaths: dict[int, str], labels: dict[int, int],
) -> pa.Table:
    """The rows of a per-pair top-K table from its keys ``[K, P]``."""
    per_pair = _topk_rows(keys, relpaths, labels)
    pair_of = [pairs[p] for p in per_pair.pop("column")]
    return pa.table({
        "class_index": pa.array([c for c, _, _ in pair_of], pa.int32()),
        "wnid": pa.array([wnids[c] for c, _, _ in pair_of], pa.string()),
        "feature_index": pa.array([j for _, j, _ in pair_of], pa.int32()),
        "feature_rank": pa.array([r for _, _, r in pair_of], pa.int32()),
        **_topk_columns(per_pair),
    })


def _topk_columns(cols: dict[str, list]) -> dict[str, pa.Array]:
    return {
        "rank": pa.array(cols["rank"], pa.int32()),
        "image_id": pa.array(cols["image_id"], pa.int64()),
        "relpath": pa.array(cols["relpath"], pa.string()),
        "label": pa.array(cols["label"], pa.int32()),
        "activation": pa.array(cols["activation"], pa.float32()),
    }
