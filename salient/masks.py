"""Generalisation and the mask store (docs/design.md §2 "Generalisation", §3 ``generalize``).

A pair's label, given on its top-5 images, is applied to its top-K images without more human
work; the mask of each of those images is the pair's NAM. Masks go to ``masks/masks.zarr`` (Zarr
v3, uint8 ``[n, H, W]``, value = round(255 * NAM), one mask per chunk, ``masks_per_shard`` chunks
per shard object, zstd or Blosc lz4) and ``masks/index.parquet`` describes row i of the array in its row i,
including ``nam``, the normalised low-resolution map (h*w float16), from which any size can be
rebuilt.

Rows are ordered by image, so each work block (one Zarr shard, one writer) decodes an image and
runs the model on it once for all of its features; only an image whose masks straddle a shard
boundary is read by two blocks. A worker reads a block's images through :mod:`salient.stream`,
runs the model in batches of ``compute.batch_size`` and quantises the masks on the device; it
writes one block while it computes the next.

Each pair's NAMs are kept in the output root's cache under a key of the model, preprocessing and
the pair's top images, so a later build that labels one more pair runs the model only on that
pair's images; every other mask is rebuilt from its cached NAM.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import google_crc32c
import numcodecs
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from salient import builds, nam, storage, stream, tables
from salient.config import ComputeConfig, GeneralizeConfig, ModelConfig, PreprocessConfig
from salient.errors import InputError
from salient.inference import Inference
from salient.stream import Feed, HostCopies, ImageStream, decode_threads

CODE_VERSION = "generalize-3"
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
    images among the candidate set ``cfg.candidates`` of ``topk/candidates.parquet``, ordered by
    image (then class, then feature). ``label`` is the pair's label (core or spurious);
    ``image_label`` the image's class folder."""
    labels = storage.read_parquet(storage.join(build, tables.LABELS.path), ["class_index", "feature_index", "label", "kind"])
    labels = labels.filter(pc.is_in(labels.column("label"), value_set=pa.array(["core", "spurious"])))
    uri = storage.join(build, tables.TOPK_CANDIDATES.path)
    if not storage.exists(uri):
        raise InputError(f"{uri} is missing: the build's aggregation predates candidate sets; run `salient aggregate CONFIG` again")
    topk = storage.read_parquet(uri)
    topk = topk.filter(pc.and_(pc.equal(topk.column("candidates"), cfg.candidates), pc.less_equal(topk.column("rank"), cfg.images_per_pair)))
    topk = topk.drop_columns(["candidates"])
    topk = topk.rename_columns(["image_label" if c == "label" else c for c in topk.column_names])
    rows = topk.join(labels, keys=["class_index", "feature_index"], join_type="inner")
    rows = rows.sort_by([("image_id", "ascending"), ("class_index", "ascending"), ("feature_index", "ascending")])
    rows = rows.append_column("row", pa.array(np.arange(rows.num_rows), pa.int64()))
    return rows.select(list(INDEX_COLUMNS))


NAMS_STAGE = "masks-nams"
NAMS_FILE = "nams.parquet"
# Reads and writes of the NAM cache and of the blocks' NAMs in flight at once.
IO_THREADS = 16


# The shard layout every mask array is created with (see :func:`prepare`): inner chunks of one
# mask, encoded as raw bytes then one compressor (:data:`COMPRESSORS`); the index (offset, length
# per chunk, uint64 little-endian) at the end with its crc32c. Shards of this layout are encoded
# here, each chunk in the worker's thread pool, and written as one object: zarr's own writer spends
# more on its per-chunk machinery than on compressing.
EMPTY_CHUNK = 2**64 - 1
# generalize.compression -> the Zarr codec of each mask. Both are codecs every Zarr v3 reader has.
COMPRESSORS = {
    "zstd": lambda: ZstdCodec(level=1),
    "lz4": lambda: BloscCodec(cname="lz4", clevel=9, shuffle="noshuffle", typesize=1),
}
_BLOSC_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def shard_codec(arr: zarr.Array) -> numcodecs.abc.Codec | None:
    """The compressor of the inner chunks when ``arr`` has the layout :func:`write_shard` and
    :func:`read_shard` encode and decode themselves, else None."""
    meta = arr.metadata
    if arr.dtype != np.uint8 or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    shard = meta.codecs[0]
    inner, index = shard.codecs, shard.index_codecs
    if (
        shard.index_location.value != "end" or tuple(shard.chunk_shape) != (1, *arr.shape[1:])
        or tuple(arr.shards[1:]) != tuple(arr.shape[1:])
        or len(inner) != 2 or not isinstance(inner[0], BytesCodec)
        or len(index) != 2 or not isinstance(index[0], BytesCodec) or index[0].endian.value != "little"
        or not isinstance(index[1], Crc32cCodec)
    ):
        return None
    codec = inner[1]
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    if isinstance(codec, BloscCodec) and codec.typesize in (None, 1):
        shuffle = _BLOSC_SHUFFLE[codec.shuffle.value if codec.shuffle else "noshuffle"]
        return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle, blocksize=codec.blocksize)
    return None


def write_shard(build: str, arr: zarr.Array, start: int, masks: np.ndarray, pool: ThreadPoolExecutor) -> None:
    """Write ``masks`` (uint8 ``[n, H, W]``) as rows ``start`` on of the mask array ``arr`` of the
    build ``build``, where they fill one shard object: encoded on ``pool`` and written whole, as
    one object. A shard of zero masks is no object, as zarr leaves it."""
    rows = arr.shards[0]
    codec = shard_codec(arr)
    if codec is None or start % rows or len(masks) > rows:
        arr[start : start + len(masks)] = masks
        return
    uri = storage.join(build, tables.mask_shard_object(start // rows))
    if not masks.any():
        storage.remove(uri)
        return
    frames = list(pool.map(lambda m: codec.encode(np.ascontiguousarray(m)), masks))
    offsets = np.full((rows, 2), EMPTY_CHUNK, dtype="<u8")
    sizes = np.array([len(f) for f in frames], dtype=np.uint64)
    offsets[: len(frames), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
    offsets[: len(frames), 1] = sizes
    index_bytes = offsets.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    storage.write_bytes_atomic(uri, b"".join(frames) + index_bytes + crc)


def read_shard(arr: zarr.Array, data: bytes | None, what: str) -> np.ndarray:
    """The masks of one shard object of ``arr`` (of the layout :func:`shard_codec` knows) from its
    bytes ``data`` (None: no object): uint8 ``[rows per shard, H, W]``, the fill value where a chunk
    is absent. ``what`` names the object in errors."""
    codec = shard_codec(arr)
    assert codec is not None, "read_shard needs an array of the layout shard_codec knows"
    rows, (h, w) = arr.shards[0], arr.shape[1:]
    if data is None:
        return np.full((rows, h, w), arr.fill_value, np.uint8)
    out = np.full((rows, h, w), arr.fill_value, np.uint8)
    for i, (offset, length) in enumerate(shard_index(arr, data, what)):
        if offset != EMPTY_CHUNK:
            out[i] = np.frombuffer(codec.decode(data[offset : offset + length]), np.uint8).reshape(h, w)
    return out


def shard_index_size(arr: zarr.Array) -> int:
    """The bytes at the end of a shard object of ``arr`` that hold its index and the index's crc32c."""
    return arr.shards[0] * 16 + 4


def shard_index(arr: zarr.Array, tail: bytes, what: str) -> np.ndarray:
    """(offset, length) of every chunk of a shard object of ``arr`` (of the layout :func:`shard_codec`
    knows; offset :data:`EMPTY_CHUNK`: no chunk) from the object's last bytes ``tail`` (at least
    :func:`shard_index_size`). ``what`` names the object in errors."""
    size = shard_index_size(arr)
    index_bytes, crc = tail[-size : -4], tail[-4:]
    if len(tail) < size or np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes() != crc:
        raise InputError(f"mask shard {what} is damaged (its index does not match its checksum); run `salient generalize CONFIG` again")
    return np.frombuffer(index_bytes, "<u8").reshape(arr.shards[0], 2)


def quantize(masks: torch.Tensor) -> torch.Tensor:
    """Float masks in [0, 1] as uint8 round(255 * mask), on their own device; on the CPU this
    equals :func:`salient.nam.to_uint8` exactly."""
    return masks.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


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


def use_cached_nams(cache_root: str, rows: pa.Table, keys: dict[tuple[int, int], str], blocks: Sequence[MaskBlock]) -> None:
    """Give each of ``blocks`` (of the mask array of ``rows``) the cached NAMs of its rows whose
    pair is cached, so the model runs only for the others. Only the pairs with rows in ``blocks``
    are read: blocks taken whole from the build or the cache need none."""
    wanted: dict[tuple[int, int], dict[str, int]] = {}
    for b in blocks:
        part = rows.slice(b.start, len(b.relpaths)).select(["row", "class_index", "feature_index", "relpath"]).to_pydict()
        for row, c, j, rel in zip(*part.values()):
            wanted.setdefault((c, j), {})[rel] = row

    def read(pair: tuple[int, int]) -> tuple[dict, dict] | None:
        marker = builds.read_entry(cache_root, NAMS_STAGE, keys[pair])
        if marker is None:
            return None
        return marker, storage.read_parquet(builds.cache(cache_root, NAMS_STAGE, keys[pair], NAMS_FILE)).to_pydict()

    with ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="nam-cache") as pool:
        found = list(pool.map(read, wanted))
    cached: dict[int, list[float]] = {}
    shape = None
    for rels, got in zip(wanted.values(), found):
        if got is None:
            continue
        marker, table = got
        shape = (marker["nam_h"], marker["nam_w"])
        for rel, low in zip(table["relpath"], table["nam"]):
            if rel in rels:
                cached[rels[rel]] = low
    for b in blocks:
        b.cached = {i - b.start: cached[i] for i in range(b.start, b.start + len(b.relpaths)) if i in cached}
        b.nam_shape = shape


def cache_pair_nams(cache_root: str, build: str, rows: pa.Table, keys: dict[tuple[int, int], str], n_blocks: int) -> list[str]:
    """Keep the NAMs of every pair in ``rows`` not cached yet, from the build's committed blocks;
    returns the cache entries of all the pairs."""
    entries = builds.read_entries(cache_root, NAMS_STAGE, list(keys.values()))
    missing = {pair for pair, entry in zip(keys, entries) if entry is None}
    if missing:
        lows = read_block_nams(build, n_blocks)
        meta = storage.read_json(block_marker(build, 0))
        cols = rows.select(["class_index", "feature_index", "relpath"]).to_pydict()
        per_pair: dict[tuple[int, int], tuple[list[str], list]] = {}
        for (c, j, rel), low in zip(zip(*cols.values()), lows.column("nam").to_pylist()):
            if (c, j) in missing:
                rels, values = per_pair.setdefault((c, j), ([], []))
                rels.append(rel)
                values.append(low)
        width = meta["nam_h"] * meta["nam_w"]

        def keep(pair: tuple[int, int]) -> None:
            rels, values = per_pair[pair]
            table = pa.table({"relpath": rels, "nam": pa.array(values, pa.list_(pa.float32(), width))})
            storage.write_parquet(builds.cache(cache_root, NAMS_STAGE, keys[pair], NAMS_FILE), table, keys[pair])
            builds.commit_entry(cache_root, NAMS_STAGE, keys[pair], {"files": [NAMS_FILE], "nam_h": meta["nam_h"], "nam_w": meta["nam_w"]})

        with ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="nam-cache") as pool:
            list(pool.map(keep, per_pair))
    return [f"{NAMS_STAGE}/{key}" for key in keys.values()]


def block_marker(build: str, index: int) -> str:
    return storage.join(build, tables.mask_block_marker(index))


def block_nams(build: str, index: int) -> str:
    return storage.join(build, tables.mask_block_nams(index))


def read_block_nams(build: str, n_blocks: int) -> pa.Table | None:
    """The ``row`` and ``nam`` of the first ``n_blocks`` committed blocks of the build, by row; None for no blocks."""
    if not n_blocks:
        return None
    with ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="nam-blocks") as pool:
        parts = list(pool.map(lambda k: storage.read_parquet(block_nams(build, k)), range(n_blocks)))
    return pa.concat_tables(parts).sort_by("row")


def plan_blocks(rows: pa.Table, root: str, build: str, shard: int, stage_fp: str) -> list[MaskBlock]:
    rels = rows.column("relpath").to_pylist()
    feats = rows.column("feature_index").to_pylist()
    blocks = []
    for k, start in enumerate(range(0, len(rels), shard)):
        r, f = rels[start : start + shard], feats[start : start + shard]
        blocks.append(MaskBlock(k, start, r, f, root, build, storage.fingerprint(stage_fp, start, r, f)))
    return blocks


@dataclass
class MaskRunner:
    """Loads the model once; computes and writes one block (Zarr shard) of masks per call. Calls
    from several threads run on the device in turn and write while another one computes."""

    model: ModelConfig
    preprocess: PreprocessConfig
    compute: ComputeConfig
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        m = self.model
        self.inference = Inference.load(
            m.checkpoint, m.arch, m.format, self.compute, threads=self.threads, device=self.device, need_discovery=True,
        )
        self.stream = ImageStream(None, self.preprocess, self.inference.device, self.compute.batch_size, decode_threads(self.compute, self.threads))
        # Each build's mask array, opened once: the driver creates it before any block is handed out.
        self._arrays: dict[str, zarr.Array] = {}

    def __call__(self, block: MaskBlock) -> dict:
        crop = self.preprocess.crop
        n = len(block.relpaths)
        # the rows the model makes as (image, row): images numbered in first-seen order
        image_of: dict[str, int] = {}
        todo = []
        for i, rel in enumerate(block.relpaths):
            if i not in block.cached:
                todo.append((image_of.setdefault(rel, len(image_of)), i))
        todo.sort()
        feed = self.stream.open(list(image_of), block.root)
        out_masks = np.zeros((n, crop, crop), np.uint8)
        lows: list[np.ndarray | None] = [None] * n
        try:
            if block.cached:
                assert block.nam_shape is not None
                positions = sorted(block.cached)
                low = torch.tensor([block.cached[i] for i in positions], dtype=torch.float32).reshape(len(positions), *block.nam_shape)
                up = nam.masks_uint8(low, crop).numpy()
                for k, i in enumerate(positions):
                    out_masks[i], lows[i] = up[k], low[k].numpy()
            parts = self._infer(block, feed, todo) if todo else []
        finally:
            feed.cancel()
        for positions, low, up in parts:
            out_masks[positions] = up.numpy()
            for k, i in enumerate(positions):
                lows[i] = low[k].numpy()
        if block.build not in self._arrays:
            self._arrays[block.build] = open_array(block.build, mode="r+")
        write_shard(block.build, self._arrays[block.build], block.start, out_masks, self.stream.pool)
        h, w = lows[0].shape
        flat = np.stack(lows).reshape(n, h * w).astype(np.float32)
        table = pa.table({
            "row": pa.array(np.arange(block.start, block.start + n), pa.int64()),
            "nam": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), h * w),
        })
        storage.write_parquet(block_nams(block.build, block.index), table, block.fingerprint)
        summary = {
            "block": block.index, "masks": n, "images": len(image_of), "inferred_masks": n - len(block.cached),
            "nam_h": h, "nam_w": w, "fingerprint": block.fingerprint,
        }
        storage.write_json(block_marker(block.build, block.index), summary)
        return summary

    def _infer(self, block: MaskBlock, feed: Feed, todo: list[tuple[int, int]]) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """(block positions, low-resolution NAMs, uint8 masks) on the host for the rows ``todo``
        ((image, position) in order), batch by batch of the feed of the block's images."""
        crop = self.preprocess.crop
        images = [image for image, _ in todo]
        device = torch.device(self.inference.device)
        copies = HostCopies(device)
        parts = []
        with self.inference.lock, torch.inference_mode():
            image_index = torch.tensor(images, device=device)
            feature_index = torch.tensor([block.features[i] for _, i in todo], device=device)
            for batch in feed:
                stream.refuse_failures(f"block {block.index:05d}", feed.relpaths, batch)
                first = batch.positions[0]  # a batch without failures holds consecutive images
                a, b = bisect.bisect_left(images, first), bisect.bisect_left(images, batch.positions[-1] + 1)
                maps = self.inference(batch.pixels).maps
                low = nam.low_maps(maps[image_index[a:b] - first], feature_index[a:b])
                parts.append(([i for _, i in todo[a:b]], copies.add(low), copies.add(nam.masks_uint8(low, crop))))
        copies.wait()
        return parts


def index_fingerprint(stage_fp: str, rows: pa.Table) -> str:
    """What the mask store and its index for ``rows`` depend on: the stage and every column of every row."""
    return storage.fingerprint(stage_fp, rows.select(list(INDEX_COLUMNS)).to_pydict())


def prepare(build: str, root: str, rows: pa.Table, crop: int, cfg: GeneralizeConfig, stage_fp: str) -> list[MaskBlock]:
    """Create (or keep) the mask array for ``rows`` in the build directory ``build``; returns its
    blocks (without cached NAMs: see :func:`use_cached_nams`). ``root`` is the dataset root."""
    n = rows.num_rows
    store_fp = storage.fingerprint(stage_fp, rows.column("relpath").to_pylist(), rows.column("feature_index").to_pylist())
    blocks = plan_blocks(rows, root, build, cfg.masks_per_shard, stage_fp)
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
            dtype="uint8", fill_value=0, compressors=COMPRESSORS[cfg.compression](), overwrite=True,
            attributes={"salient.fingerprint": store_fp, "salient.schema_version": storage.SCHEMA_VERSION},
        )
    return blocks


def write_index(build: str, rows: pa.Table, n_blocks: int, index_fp: str) -> None:
    """``masks/index.parquet``: the planned rows with each mask's ``nam`` from the committed blocks."""
    nams = read_block_nams(build, n_blocks)
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
