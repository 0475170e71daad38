"""Generalisation and the mask store (docs/design.md §2 "Generalisation", §3 ``generalize``).

A pair's label, given on its top-5 images, is applied to its top-K images without more human
work; the mask of each of those images is the pair's NAM. Masks go to ``masks/masks.zarr`` (Zarr
v3, uint8 ``[n, H, W]``, value = round(255 * NAM), one mask per chunk, ``masks_per_shard`` chunks
per shard object, zstd) and ``masks/index.parquet`` describes row i of the array in its row i,
including ``nam``, the normalised low-resolution map (h*w float16), from which any size can be
rebuilt.

Rows are ordered by image, so each work block (one Zarr shard, one writer) decodes an image and
runs the model on it once for all of its features; only an image whose masks straddle a shard
boundary is read by two blocks.

Each pair's NAMs are kept in the output root's cache under a key of the model, preprocessing and
the pair's top images, so a later build that labels one more pair runs the model only on that
pair's images; every other mask is rebuilt from its cached NAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
from zarr.codecs import ZstdCodec

from salient import builds, images, models, nam, storage, tables
from salient.config import GeneralizeConfig, ModelConfig, PreprocessConfig
from salient.errors import InputError

CODE_VERSION = "generalize-2"
# Where the masks are, in salient.tables; these names stay for callers outside salient/.
DIRNAME = tables.MASKS_DIR
INDEX_TABLE = tables.MASK_INDEX.path
ZARR_PATH = tables.MASKS.path
BLOCKS = tables.MASK_BLOCKS
INDEX_COLUMNS = (
    "row", "class_index", "wnid", "feature_index", "feature_rank", "label", "kind",
    "image_id", "relpath", "image_label", "rank", "activation",
)


def open_array(build: str, mode: str = "r") -> zarr.Array:
    """The mask array of the build directory ``build`` (any fsspec URI)."""
    return zarr.open_array(store=_store(storage.join(build, tables.MASKS.path), read_only=mode == "r"), mode=mode, zarr_format=3)


def _store(uri: str, read_only: bool) -> zarr.abc.store.Store:
    if storage.is_local(uri):
        return zarr.storage.LocalStore(storage.normalize_uri(uri), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(uri, read_only=read_only)


def plan_rows(build: str, cfg: GeneralizeConfig) -> pa.Table:
    """One row per mask to make: every pair labelled core or spurious, its top ``images_per_pair``
    images, ordered by image (then class, then feature). ``label`` is the pair's label (core or
    spurious); ``image_label`` the image's class folder."""
    labels = storage.read_parquet(storage.join(build, tables.LABELS.path), ["class_index", "feature_index", "label", "kind"])
    labels = labels.filter(pc.is_in(labels.column("label"), value_set=pa.array(["core", "spurious"])))
    topk = storage.read_parquet(storage.join(build, tables.TOPK_CLASS.path))
    topk = topk.filter(pc.less_equal(topk.column("rank"), cfg.images_per_pair))
    topk = topk.rename_columns(["image_label" if c == "label" else c for c in topk.column_names])
    rows = topk.join(labels, keys=["class_index", "feature_index"], join_type="inner")
    rows = rows.sort_by([("image_id", "ascending"), ("class_index", "ascending"), ("feature_index", "ascending")])
    rows = rows.append_column("row", pa.array(np.arange(rows.num_rows), pa.int64()))
    return rows.select(list(INDEX_COLUMNS))


NAMS_STAGE = "masks-nams"
NAMS_FILE = "nams.parquet"


@dataclass
class MaskBlock:
    """Rows [start, start + len) of the mask array: exactly one Zarr shard, written by one worker.

    ``cached`` holds the low-resolution NAM (``h*w`` floats, ``nam_shape``) of rows whose pair's
    NAMs are cached, by position in the block; the model runs only for the other rows. ``root`` is
    the dataset root, ``build`` the build directory.
    """

    index: int
    start: int
    relpaths: list[str]
    features: list[int]
    root: str
    build: str
    fingerprint: str
    cached: dict[int, list[float]] = field(default_factory=dict)
    nam_shape: tuple[int, int] | None = None


def pair_keys(rows: pa.Table, stage_fp: str) -> dict[tuple[int, int], str]:
    """The NAM cache key of every pair in ``rows``: the stage and the pair's images with their activations."""
    by_pair: dict[tuple[int, int], list[tuple[int, str, float]]] = {}
    cols = rows.select(["class_index", "feature_index", "rank", "relpath", "activation"]).to_pydict()
    for c, j, rank, rel, act in zip(*cols.values()):
        by_pair.setdefault((c, j), []).append((rank, rel, act))
    return {pair: storage.fingerprint(NAMS_STAGE, stage_fp, pair, sorted(v)) for pair, v in by_pair.items()}


def cached_nams(cache_root: str, rows: pa.Table, keys: dict[tuple[int, int], str]) -> tuple[dict[int, list[float]], tuple[int, int] | None]:
    """The cached NAM of every row whose pair is cached (by row number), and the NAMs' shape."""
    out: dict[int, list[float]] = {}
    shape = None
    cols = rows.select(["row", "class_index", "feature_index", "relpath"]).to_pydict()
    wanted: dict[tuple[int, int], dict[str, int]] = {}
    for row, c, j, rel in zip(*cols.values()):
        wanted.setdefault((c, j), {})[rel] = row
    for pair, rels in wanted.items():
        marker = builds.read_entry(cache_root, NAMS_STAGE, keys[pair])
        if marker is None:
            continue
        shape = (marker["nam_h"], marker["nam_w"])
        table = storage.read_parquet(builds.cache(cache_root, NAMS_STAGE, keys[pair], NAMS_FILE)).to_pydict()
        for rel, low in zip(table["relpath"], table["nam"]):
            out[rels[rel]] = low
    return out, shape


def cache_pair_nams(cache_root: str, build: str, rows: pa.Table, keys: dict[tuple[int, int], str], n_blocks: int) -> list[str]:
    """Keep the NAMs of every pair in ``rows`` not cached yet, from the build's committed blocks;
    returns the cache entries of all the pairs."""
    missing = {pair for pair, key in keys.items() if builds.read_entry(cache_root, NAMS_STAGE, key) is None}
    if missing:
        lows = pa.concat_tables([storage.read_parquet(block_nams(build, k)) for k in range(n_blocks)]).sort_by("row")
        meta = storage.read_json(block_marker(build, 0))
        cols = rows.select(["class_index", "feature_index", "relpath"]).to_pydict()
        per_pair: dict[tuple[int, int], tuple[list[str], list]] = {}
        for (c, j, rel), low in zip(zip(*cols.values()), lows.column("nam").to_pylist()):
            if (c, j) in missing:
                rels, values = per_pair.setdefault((c, j), ([], []))
                rels.append(rel)
                values.append(low)
        width = meta["nam_h"] * meta["nam_w"]
        for pair, (rels, values) in per_pair.items():
            table = pa.table({"relpath": rels, "nam": pa.array(values, pa.list_(pa.float32(), width))})
            storage.write_parquet(builds.cache(cache_root, NAMS_STAGE, keys[pair], NAMS_FILE), table, keys[pair])
            builds.commit_entry(cache_root, NAMS_STAGE, keys[pair], {"files": [NAMS_FILE], "nam_h": meta["nam_h"], "nam_w": meta["nam_w"]})
    return [f"{NAMS_STAGE}/{key}" for key in keys.values()]


def block_marker(build: str, index: int) -> str:
    return storage.join(build, tables.mask_block_marker(index))


def block_nams(build: str, index: int) -> str:
    return storage.join(build, tables.mask_block_nams(index))


def plan_blocks(
    rows: pa.Table, root: str, build: str, shard: int, stage_fp: str,
    cached: dict[int, list[float]] | None = None, nam_shape: tuple[int, int] | None = None,
) -> list[MaskBlock]:
    rels = rows.column("relpath").to_pylist()
    feats = rows.column("feature_index").to_pylist()
    cached = cached or {}
    blocks = []
    for k, start in enumerate(range(0, len(rels), shard)):
        r, f = rels[start : start + shard], feats[start : start + shard]
        mine = {i - start: cached[i] for i in range(start, start + len(r)) if i in cached}
        blocks.append(MaskBlock(k, start, r, f, root, build, storage.fingerprint(stage_fp, start, r, f), mine, nam_shape))
    return blocks


@dataclass
class MaskRunner:
    """Loads the model once; computes and writes one block (Zarr shard) of masks per call."""

    model: ModelConfig
    preprocess: PreprocessConfig
    batch_size: int = 64
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        m = self.model
        self.net, self.device = models.load_for_worker(m.checkpoint, m.arch, m.format, self.device, self.threads, need_discovery=True)

    def __call__(self, block: MaskBlock) -> dict:
        fs, root = storage.url_to_fs(block.root)
        crop = self.preprocess.crop
        out_masks = np.zeros((len(block.relpaths), crop, crop), np.uint8)
        lows: list[np.ndarray | None] = [None] * len(block.relpaths)
        if block.cached:
            assert block.nam_shape is not None
            positions = sorted(block.cached)
            low = torch.tensor([block.cached[i] for i in positions], dtype=torch.float32).reshape(len(positions), *block.nam_shape)
            up = nam.to_uint8(nam.upsample(low, crop).clamp_(0, 1).numpy())
            for k, i in enumerate(positions):
                out_masks[i], lows[i] = up[k], low[k].numpy()
        rows_of: dict[str, list[int]] = {}
        for i, r in enumerate(block.relpaths):
            if i not in block.cached:
                rows_of.setdefault(r, []).append(i)
        order: list[str] = list(rows_of)  # distinct images still to run, first-seen order
        position = {r: i for i, r in enumerate(order)}
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            x = torch.stack([
                images.load_image(fs.cat_file(f"{root.rstrip('/')}/{storage.safe_relpath(r)}"), self.preprocess.resize, crop)
                for r in chunk
            ]).to(self.device).contiguous(memory_format=torch.channels_last)
            # every (image, feature) of this chunk, from one forward pass per image
            pairs = [(position[r] - s, i) for r in chunk for i in rows_of[r]]
            with torch.inference_mode():
                maps = self.net(x).maps
            low, up = nam.nams(maps[[b for b, _ in pairs]], [block.features[i] for _, i in pairs], crop)
            up_u8, low_np = nam.to_uint8(up.cpu().numpy()), low.cpu().numpy()
            for k, (_, i) in enumerate(pairs):
                out_masks[i] = up_u8[k]
                lows[i] = low_np[k]
        arr = open_array(block.build, mode="r+")
        arr[block.start : block.start + len(block.relpaths)] = out_masks
        h, w = lows[0].shape
        flat = np.stack(lows).reshape(len(lows), h * w).astype(np.float32)
        table = pa.table({
            "row": pa.array(np.arange(block.start, block.start + len(lows)), pa.int64()),
            "nam": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), h * w),
        })
        storage.write_parquet(block_nams(block.build, block.index), table, block.fingerprint)
        summary = {
            "block": block.index, "masks": len(lows), "images": len(order), "inferred_masks": len(lows) - len(block.cached),
            "nam_h": h, "nam_w": w, "fingerprint": block.fingerprint,
        }
        storage.write_json(block_marker(block.build, block.index), summary)
        return summary


def index_fingerprint(stage_fp: str, rows: pa.Table) -> str:
    """What the mask store and its index for ``rows`` depend on: the stage and every column of every row."""
    return storage.fingerprint(stage_fp, rows.select(list(INDEX_COLUMNS)).to_pydict())


def prepare(
    build: str, root: str, rows: pa.Table, crop: int, cfg: GeneralizeConfig, stage_fp: str,
    cached: dict[int, list[float]] | None = None, nam_shape: tuple[int, int] | None = None,
) -> list[MaskBlock]:
    """Create (or keep) the mask array for ``rows`` in the build directory ``build``; returns its
    blocks. ``root`` is the dataset root; ``cached``: known NAMs by row (see :func:`cached_nams`)."""
    n = rows.num_rows
    store_fp = storage.fingerprint(stage_fp, rows.column("relpath").to_pylist(), rows.column("feature_index").to_pylist())
    blocks = plan_blocks(rows, root, build, cfg.masks_per_shard, stage_fp, cached, nam_shape)
    try:
        arr = open_array(build, mode="r")
        keep = arr.attrs.get("salient.fingerprint") == store_fp and arr.shape == (n, crop, crop)
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError, KeyError, ValueError):
        keep = False
    if not keep:
        storage.remove(storage.join(build, tables.MASKS.path), recursive=True)
        storage.remove(storage.join(build, tables.MASK_BLOCKS), recursive=True)
        zarr.create_array(
            store=_store(storage.join(build, tables.MASKS.path), read_only=False),
            shape=(max(n, 0), crop, crop), chunks=(1, crop, crop), shards=(cfg.masks_per_shard, crop, crop),
            dtype="uint8", fill_value=0, compressors=ZstdCodec(level=3), overwrite=True,
            attributes={"salient.fingerprint": store_fp, "salient.schema_version": storage.SCHEMA_VERSION},
        )
    return blocks


def write_index(build: str, rows: pa.Table, n_blocks: int, index_fp: str) -> None:
    """``masks/index.parquet``: the planned rows with each mask's ``nam`` from the committed blocks."""
    parts = [storage.read_parquet(block_nams(build, k)) for k in range(n_blocks)]
    nams = pa.concat_tables(parts).sort_by("row") if parts else None
    if nams is not None and nams.column("row").to_pylist() != rows.column("row").to_pylist():
        raise InputError("mask blocks do not cover the planned rows; rerun `salient generalize CONFIG`")
    meta = storage.read_json(block_marker(build, 0)) if n_blocks else {"nam_h": 0, "nam_w": 0}
    if nams is not None:
        width = meta["nam_h"] * meta["nam_w"]
        values = np.asarray(nams.column("nam").combine_chunks().flatten(), np.float32).astype(np.float16)
        nam_col = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float16()), width)
    else:
        nam_col = pa.array([], pa.list_(pa.float16(), 1))
    table = rows.append_column("nam", nam_col)
    table = table.append_column("nam_h", pa.array(np.full(rows.num_rows, meta["nam_h"]), pa.int32()))
    table = table.append_column("nam_w", pa.array(np.full(rows.num_rows, meta["nam_w"]), pa.int32()))
    storage.write_parquet(storage.join(build, tables.MASK_INDEX.path), table, index_fp)
