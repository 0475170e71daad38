"""Mask shards encoded by Salient (zstd, or Blosc with any of its settings) read back through zarr
exactly as zarr's own writer's do, and an array of another layout is written by zarr."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from salient import masks, storage, tables
from salient.errors import InputError

H = W = 24
ROWS = 8  # masks per shard


def new_array(build, n, compressors=ZstdCodec(level=3)):
    return zarr.create_array(
        store=zarr.storage.LocalStore(str(build / tables.MASKS.path)), shape=(n, H, W), chunks=(1, H, W),
        shards=(ROWS, H, W), dtype="uint8", fill_value=0, compressors=compressors,
    )


# Every compressor generalize.compression names, and Blosc's defaults (zstd with bit shuffling).
COMPRESSORS = [pytest.param(make(), id=name) for name, make in masks.COMPRESSORS.items()] + [pytest.param(BloscCodec(), id="blosc-defaults")]


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


def random_masks(n, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 256, (n, H, W), dtype=np.uint8)
    m[1] = 0  # an all-zero mask inside a shard
    return m


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_encoded_shards_read_back_through_zarr_like_zarrs_own(tmp_path, pool, compressor):
    n = 2 * ROWS + 3  # two full shards and a partial last one
    data = random_masks(n)
    ours, theirs = new_array(tmp_path / "ours", n, compressor), new_array(tmp_path / "theirs", n, compressor)
    assert masks.shard_codec(ours) is not None
    for start in range(0, n, ROWS):
        masks.write_shard(str(tmp_path / "ours"), ours, start, data[start : start + ROWS], pool)
    theirs[:] = data
    reread = zarr.open_array(store=zarr.storage.LocalStore(str(tmp_path / "ours" / tables.MASKS.path)), mode="r")
    assert np.array_equal(reread[:], data) and np.array_equal(reread[:], theirs[:])
    assert np.array_equal(reread[ROWS + 2 : ROWS + 5], data[ROWS + 2 : ROWS + 5]), "partial reads use the shard index"
    for k in range(3):
        assert (tmp_path / "ours" / tables.mask_shard_object(k)).is_file()


def test_a_shard_of_zero_masks_is_no_object_even_over_an_old_one(tmp_path, pool):
    arr = new_array(tmp_path, ROWS)
    masks.write_shard(str(tmp_path), arr, 0, random_masks(ROWS), pool)
    shard = tmp_path / tables.mask_shard_object(0)
    assert shard.is_file()
    masks.write_shard(str(tmp_path), arr, 0, np.zeros((ROWS, H, W), np.uint8), pool)
    assert not shard.exists()
    assert not arr[:].any()


def test_another_layout_is_written_by_zarr(tmp_path, pool):
    arr = new_array(tmp_path, ROWS, compressors=GzipCodec())
    data = random_masks(ROWS, seed=1)
    masks.write_shard(str(tmp_path), arr, 0, data, pool)
    assert np.array_equal(arr[:], data)
    assert storage.exists(str(tmp_path / tables.mask_shard_object(0)))


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_encoded_shards_are_decoded_without_zarr_and_a_damaged_index_is_refused(tmp_path, pool, compressor):
    n = ROWS + 5
    data = random_masks(n, seed=2)
    arr = new_array(tmp_path, n, compressor)
    theirs = new_array(tmp_path / "theirs", n, compressor)
    theirs[:ROWS] = data[:ROWS]
    assert np.array_equal(masks.read_shard(arr, (tmp_path / "theirs" / tables.mask_shard_object(0)).read_bytes(), "c/0/0/0"), data[:ROWS])
    masks.write_shard(str(tmp_path), arr, 0, data[:ROWS], pool)  # the second shard is never written
    first = (tmp_path / tables.mask_shard_object(0)).read_bytes()
    assert np.array_equal(masks.read_shard(arr, first, "c/0/0/0"), data[:ROWS])
    assert not masks.read_shard(arr, None, "c/1/0/0").any(), "an absent shard reads as the fill value"
    damaged = bytearray(first)
    damaged[-20] ^= 0xFF  # a byte of the index
    with pytest.raises(InputError, match="damaged"):
        masks.read_shard(arr, bytes(damaged), "c/0/0/0")
    assert masks.shard_codec(new_array(tmp_path / "gzip", n, compressors=GzipCodec())) is None
