"""Generalisation and the mask store (design.md §2 "Generalisation", §3 ``generalize``).

A pair's label, given on its top-5 images, is applied to its top-K images without more human
work; the mask of each of those images is the pair's NAM. Masks go to ``masks/masks.zarr`` (Zarr
v3, uint8 ``[n, H, W]``, value = round(255 * NAM), one mask per chunk, ``masks_per_shard`` chunks
per shard object, zstd) and ``masks/index.parquet`` describes row i of the array in its row i,
including ``nam``, the normalised low-resolution map (h*w float16), from which any size can be
rebuilt.

Rows are ordered by image, so each work block (one Zarr shard, one writer) decodes an image and
runs the model on it once for all of its features; only an image whose masks straddle a shard
boundary is read by two blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
from zarr.codecs import ZstdCodec

from salient import images, models, nam, storage
from salient.aggregate import TOPK_CLASS_TABLE
from salient.config import GeneralizeConfig, ModelConfig, PreprocessConfig
from salient.ingest import LABELS_TABLE

CODE_VERSION = "generalize-1"
DIRNAME = "masks"
INDEX_TABLE = "masks/index.parquet"
ZARR_PATH = "masks/masks.zarr"
BLOCKS = "masks/blocks"
INDEX_COLUMNS = (
    "row", "class_index", "wnid", "feature_index", "feature_rank", "label", "kind",
    "image_id", "relpath", "image_label", "rank", "activation",
)


def open_array(out: str, mode: str = "r") -> zarr.Array:
    """The mask array of a build output (any fsspec URI)."""
    return zarr.open_array(store=_store(storage.join(out, ZARR_PATH), read_only=mode == "r"), mode=mode, zarr_format=3)


def _store(uri: str, read_only: bool) -> zarr.abc.store.Store:
    if storage.is_local(uri):
        return zarr.storage.LocalStore(storage.normalize_uri(uri), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(uri, read_only=read_only)


def plan_rows(out: str, cfg: GeneralizeConfig) -> pa.Table:
    """One row per mask to make: every pair labelled core or spurious, its top ``images_per_pair``
    images, ordered by image (then class, then feature). ``label`` is the pair's label (core or
    spurious); ``image_label`` the image's class folder."""
    labels = storage.read_parquet(storage.join(out, LABELS_TABLE), ["class_index", "feature_index", "label", "kind"])
    labels = labels.filter(pc.is_in(labels.column("label"), value_set=pa.array(["core", "spurious"])))
    topk = storage.read_parquet(storage.join(out, TOPK_CLASS_TABLE))
    topk = topk.filter(pc.less_equal(topk.column("rank"), cfg.images_per_pair))
    topk = topk.rename_columns(["image_label" if c == "label" else c for c in topk.column_names])
    rows = topk.join(labels, keys=["class_index", "feature_index"], join_type="inner")
    rows = rows.sort_by([("image_id", "ascending"), ("class_index", "ascending"), ("feature_index", "ascending")])
    rows = rows.append_column("row", pa.array(np.arange(rows.num_rows), pa.int64()))
    return rows.select(list(INDEX_COLUMNS))


@dataclass
class MaskBlock:
    """Rows [start, start + len) of the mask array: exactly one Zarr shard, written by one worker."""

    index: int
    start: int
    relpaths: list[str]
    features: list[int]
    root: str
    out: str
    fingerprint: str


def block_marker(out: str, index: int) -> str:
    return storage.join(out, BLOCKS, f"block-{index:05d}.json")


def block_nams(out: str, index: int) -> str:
    return storage.join(out, BLOCKS, f"block-{index:05d}.parquet")


def plan_blocks(rows: pa.Table, root: str, out: str, shard: int, stage_fp: str) -> list[MaskBlock]:
    rels = rows.column("relpath").to_pylist()
    feats = rows.column("feature_index").to_pylist()
    blocks = []
    for k, start in enumerate(range(0, len(rels), shard)):
        r, f = rels[start : start + shard], feats[start : start + shard]
        blocks.append(MaskBlock(k, start, r, f, root, out, storage.fingerprint(stage_fp, start, r, f)))
    return blocks


def committed(block: MaskBlock) -> bool:
    uri = block_marker(block.out, block.index)
    return storage.exists(uri) and storage.read_json(uri).get("fingerprint") == block.fingerprint


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
        order: list[str] = list(dict.fromkeys(block.relpaths))  # distinct images, first-seen order
        position = {r: i for i, r in enumerate(order)}
        out_masks = np.zeros((len(block.relpaths), crop, crop), np.uint8)
        lows: list[np.ndarray | None] = [None] * len(block.relpaths)
        rows_of: dict[str, list[int]] = {}
        for i, r in enumerate(block.relpaths):
            rows_of.setdefault(r, []).append(i)
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
        arr = open_array(block.out, mode="r+")
        arr[block.start : block.start + len(block.relpaths)] = out_masks
        h, w = lows[0].shape
        flat = np.stack(lows).reshape(len(lows), h * w).astype(np.float16)
        table = pa.table({
            "row": pa.array(np.arange(block.start, block.start + len(lows)), pa.int64()),
            "nam": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float16()), h * w),
        })
        storage.write_parquet(block_nams(block.out, block.index), table, block.fingerprint)
        summary = {"block": block.index, "masks": len(lows), "images": len(order), "nam_h": h, "nam_w": w, "fingerprint": block.fingerprint}
        storage.write_json(block_marker(block.out, block.index), summary)
        return summary


def stage_fingerprint(weights_sha256: str, model: ModelConfig, preprocess: PreprocessConfig, cfg: GeneralizeConfig) -> str:
    return storage.fingerprint(CODE_VERSION, weights_sha256, model.arch, preprocess.resize, preprocess.crop, cfg.masks_per_shard)


def index_fingerprint(stage_fp: str, rows: pa.Table) -> str:
    """What the mask store and its index for ``rows`` depend on: the stage and every column of every row."""
    return storage.fingerprint(stage_fp, rows.select(list(INDEX_COLUMNS)).to_pydict())


def prepare(out: str, root: str, rows: pa.Table, crop: int, cfg: GeneralizeConfig, stage_fp: str) -> tuple[list[MaskBlock], int, str]:
    """Create (or keep) the mask array for ``rows``; returns the blocks still to compute, the number
    of blocks, and the index fingerprint."""
    n = rows.num_rows
    store_fp = storage.fingerprint(stage_fp, rows.column("relpath").to_pylist(), rows.column("feature_index").to_pylist())
    blocks = plan_blocks(rows, root, out, cfg.masks_per_shard, stage_fp)
    try:
        arr = open_array(out, mode="r")
        keep = arr.attrs.get("salient.fingerprint") == store_fp and arr.shape == (n, crop, crop)
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError, KeyError, ValueError):
        keep = False
    if not keep:
        storage.remove(storage.join(out, ZARR_PATH), recursive=True)
        storage.remove(storage.join(out, BLOCKS), recursive=True)
        zarr.create_array(
            store=_store(storage.join(out, ZARR_PATH), read_only=False),
            shape=(max(n, 0), crop, crop), chunks=(1, crop, crop), shards=(cfg.masks_per_shard, crop, crop),
            dtype="uint8", fill_value=0, compressors=ZstdCodec(level=3), overwrite=True,
            attributes={"salient.fingerprint": store_fp, "salient.schema_version": storage.SCHEMA_VERSION},
        )
    return [b for b in blocks if not committed(b)], len(blocks), index_fingerprint(stage_fp, rows)


def write_index(out: str, rows: pa.Table, n_blocks: int, index_fp: str) -> None:
    """``masks/index.parquet``: the planned rows with each mask's ``nam`` from the committed blocks."""
    parts = [storage.read_parquet(block_nams(out, k)) for k in range(n_blocks)]
    nams = pa.concat_tables(parts).sort_by("row") if parts else None
    if nams is not None and nams.column("row").to_pylist() != rows.column("row").to_pylist():
        raise ValueError("mask blocks do not cover the planned rows; rerun `salient generalize CONFIG`")
    meta = storage.read_json(block_marker(out, 0)) if n_blocks else {"nam_h": 0, "nam_w": 0}
    nam_col = nams.column("nam") if nams is not None else pa.array([], pa.list_(pa.float16(), 1))
    table = rows.append_column("nam", nam_col)
    table = table.append_column("nam_h", pa.array(np.full(rows.num_rows, meta["nam_h"]), pa.int32()))
    table = table.append_column("nam_w", pa.array(np.full(rows.num_rows, meta["nam_w"]), pa.int32()))
    storage.write_parquet(storage.join(out, INDEX_TABLE), table, index_fp)
