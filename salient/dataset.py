"""Readers for consumers of a build: the masks by (relpath, feature) or row, and a torch Dataset of
images with their core and spurious masks. Everything is read through fsspec."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import zarr
from torch.utils.data import Dataset
from zarr.core.buffer import default_buffer_prototype

from salient import builds, images, nam, storage, tables
from salient.errors import InputError
from salient import masks


def build_of(root: str, build_id: str | None = None) -> str:
    """The build directory to read: ``root`` itself when it is one, else the build ``build_id`` of the
    output root ``root`` (default: its ``latest`` published build)."""
    if build_id is None and not storage.exists(storage.join(root, "latest")) and storage.exists(storage.join(root, tables.MASK_INDEX.path)):
        return root
    return builds.resolve(root, build_id)


def require_nams(index: pa.Table, what: str) -> None:
    """``InputError`` when rows of a mask index hold no NAMs: a build imported from a release
    (``salient import reference``) has its masks but not the maps they were made from."""
    if index.num_rows and (index.column("nam").null_count > 0 or 0 in index.column("nam_h").to_pylist()):
        raise InputError(
            f"{what}: the mask index holds no NAMs (masks imported from a release, not made by `salient generalize`); "
            "use the masks themselves, or run `salient generalize CONFIG` to make a build with NAMs"
        )


class SalientMasks:
    """The masks of a build: ``masks/index.parquet`` and ``masks/masks.zarr``.

    ``root`` is an output root (its ``latest`` build is read, or ``build_id``) or a build directory;
    ``build`` is the build directory read.
    """

    def __init__(self, root: str, build_id: str | None = None) -> None:
        build = build_of(root, build_id)
        self.build = build
        uri = storage.join(build, tables.MASK_INDEX.path)
        if not storage.exists(uri):
            raise InputError(f"no mask index at {uri}; run `salient generalize CONFIG` first")
        self.index = storage.read_parquet(uri)
        self.array = masks.open_array(build, mode="r")
        if self.array.shape[0] != self.index.num_rows:
            raise InputError(f"{build}: the mask array has {self.array.shape[0]} rows, the index {self.index.num_rows}")
        rel = self.index.column("relpath").to_pylist()
        feat = self.index.column("feature_index").to_pylist()
        self._by_key: dict[tuple[str, int], list[int]] = {}
        self._by_image: dict[str, list[int]] = {}
        for i, (r, f) in enumerate(zip(rel, feat)):
            self._by_key.setdefault((r, f), []).append(i)
            self._by_image.setdefault(r, []).append(i)

    def __len__(self) -> int:
        return self.index.num_rows

    def row(self, i: int) -> dict:
        """Index row ``i`` as a dict (without the ``nam`` values)."""
        return {k: v for k, v in self.index.slice(i, 1).to_pylist()[0].items() if k != "nam"}

    def rows_for(self, relpath: str, feature_index: int | None = None) -> list[int]:
        """Rows of an image, of one of its features when ``feature_index`` is given."""
        if feature_index is None:
            return list(self._by_image.get(relpath, []))
        return list(self._by_key.get((relpath, feature_index), []))

    def images(self) -> list[str]:
        """Relpaths of the images that have masks, in row order of their first mask."""
        return list(self._by_image)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` at the stored size: uint8 ``[H, W]``, round(255 * NAM)."""
        return np.asarray(self.array[i])

    @property
    def shard_rows(self) -> int:
        """Rows per shard object of the mask array: :meth:`rows` costs one request per shard it touches."""
        return (self.array.shards or self.array.chunks)[0]

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Masks ``lo`` to ``hi - 1`` at the stored size: uint8 ``[hi - lo, H, W]``, read with one
        request per shard object that holds them (the whole object, even for a part of it)."""
        if not 0 <= lo <= hi <= len(self):
            raise IndexError(f"mask rows {lo}:{hi} are outside the {len(self)} rows of {self.build}")
        meta, shard = self.array.metadata, self.array.shards or self.array.chunks
        first = lo // shard[0]
        fast = masks.shard_codec(self.array) is not None  # else decoded through zarr
        prototype = default_buffer_prototype()
        objects = meta.to_buffer_dict(prototype)
        decoded: list[np.ndarray] = []
        others = (range(-(-n // s)) for n, s in zip(self.array.shape[1:], shard[1:]))
        for coords in itertools.product(range(first, -(-hi // shard[0])), *others):
            key = meta.encode_chunk_key(coords)
            try:
                data = storage.read_bytes(storage.join(self.build, tables.MASKS.path, key))
            except FileNotFoundError:
                data = None  # never written: it reads as the fill value, as zarr reads it
            if fast:
                decoded.append(masks.read_shard(self.array, data, key))
            elif data is not None:
                objects[key] = prototype.buffer.from_bytes(data)
        if fast:
            return np.concatenate(decoded)[lo - first * shard[0] : hi - first * shard[0]]
        local = zarr.open_array(store=zarr.storage.MemoryStore(objects, read_only=True), mode="r", zarr_format=3)
        return np.asarray(local[lo:hi])

    def take(self, rows: Sequence[int]) -> np.ndarray:
        """Masks ``rows``, in that order, at the stored size: uint8 ``[len(rows), H, W]``. Only their
        chunks are read: per shard object its index, then each chunk, as byte ranges (concurrent on
        an object store), so a few masks cost a few small requests however large their shards."""
        codec = masks.shard_codec(self.array)
        if codec is None:  # an array of another layout: through zarr, a mask at a time
            return np.stack([self.mask(i) for i in rows]) if rows else np.zeros((0, *self.array.shape[1:]), np.uint8)
        (h, w), per = self.array.shape[1:], self.shard_rows
        out = np.full((len(rows), h, w), self.array.fill_value, np.uint8)
        fs, _ = storage.url_to_fs(self.build)
        shards = sorted({r // per for r in rows})
        keys = {s: self.array.metadata.encode_chunk_key((s, 0, 0)) for s in shards}
        paths = {s: storage.url_to_fs(storage.join(self.build, tables.MASKS.path, keys[s]))[1] for s in shards}
        size = masks.shard_index_size(self.array)

        def tails() -> list[bytes | BaseException]:
            got = fs.cat_ranges([paths[s] for s in shards], [-size] * len(shards), [None] * len(shards), on_error="return")
            failed = [t for t in got if isinstance(t, BaseException) and not isinstance(t, FileNotFoundError)]
            if failed:
                raise failed[0]
            return got

        index = {  # a shard object never written holds only the fill value
            s: masks.shard_index(self.array, tail, keys[s])
            for s, tail in zip(shards, storage.retrying(tails, f"read the indexes of {len(shards)} mask shards of {self.build}"))
            if not isinstance(tail, FileNotFoundError)
        }
        wanted = [(k, r // per, *index[r // per][r % per]) for k, r in enumerate(rows) if r // per in index]
        wanted = [(k, s, int(offset), int(length)) for k, s, offset, length in wanted if offset != masks.EMPTY_CHUNK]
        chunks = storage.retrying(
            lambda: fs.cat_ranges([paths[s] for _, s, _, _ in wanted], [o for _, _, o, _ in wanted], [o + n for _, _, o, n in wanted], on_error="raise"),
            f"read {len(wanted)} masks of {self.build}",
        )
        for (k, _, _, _), chunk in zip(wanted, chunks):
            out[k] = np.frombuffer(codec.decode(chunk), np.uint8).reshape(h, w)
        return out

    def nam(self, i: int) -> np.ndarray:
        """The normalised low-resolution map of mask ``i``: float32 ``[nam_h, nam_w]``."""
        r = self.index.slice(i, 1)
        require_nams(r, f"mask {i}")
        h, w = r.column("nam_h")[0].as_py(), r.column("nam_w")[0].as_py()
        return np.asarray(r.column("nam")[0].values.to_numpy(zero_copy_only=False), np.float32).reshape(h, w)

    def rebuild(self, i: int, size: int | tuple[int, int]) -> np.ndarray:
        """Mask ``i`` rebuilt from its ``nam`` at any size: float32 in [0, 1]."""
        return nam.upsample(torch.from_numpy(self.nam(i))[None], size)[0].clamp(0, 1).numpy()

    def find(self, relpath: str, feature_index: int) -> np.ndarray:
        """The stored mask of (relpath, feature); ``KeyError`` when there is none."""
        rows = self.rows_for(relpath, feature_index)
        if not rows:
            raise KeyError(f"no mask for ({relpath!r}, feature {feature_index})")
        return self.mask(rows[0])


class SalientDataset(Dataset):
    """Images that have masks, each with its core mask, its spurious mask and its label.

    The core (spurious) mask is the pixel-wise max of the image's masks from core (spurious)
    pairs, as float32 in [0, 1]; zeros when it has none. Items are
    ``(image [3, H, W] in [0, 1], core [H, W], spurious [H, W], label)``. ``root`` is the output
    root (or a build directory, as for :class:`SalientMasks`); images are read from ``dataset_root``.
    """

    def __init__(self, root: str, dataset_root: str, resize: int, crop: int, build_id: str | None = None) -> None:
        self.masks = SalientMasks(root, build_id)
        self.dataset_root = dataset_root
        self.resize, self.crop = resize, crop
        self.relpaths = self.masks.images()
        self._pair_labels = self.masks.index.column("label").to_pylist()
        image_labels = self.masks.index.column("image_label").to_pylist()
        self._image_label = {rel: image_labels[self.masks.rows_for(rel)[0]] for rel in self.relpaths}

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        rel = self.relpaths[k]
        img = images.load_image(storage.read_bytes(storage.under(self.dataset_root, rel)), self.resize, self.crop)
        core = np.zeros((self.crop, self.crop), np.float32)
        spurious = np.zeros((self.crop, self.crop), np.float32)
        for i in self.masks.rows_for(rel):
            target = core if self._pair_labels[i] == "core" else spurious
            np.maximum(target, self.masks.mask(i).astype(np.float32) / 255.0, out=target)
        return img, torch.from_numpy(core), torch.from_numpy(spurious), self._image_label[rel]

