"""The evaluate stage over a small mask store on a filesystem that counts its reads: masks are read
by whole shard objects, and the predictions are the documented formula's, whatever the batching."""

from __future__ import annotations

import hashlib
import io
import math
import uuid
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from zarr.codecs import ZstdCodec

from salient import config, models, storage, tables
from salient.dataset import SalientMasks
from salient.errors import InputError
from salient.inference import Inference
from salient.stage import execute, local_run
from salient.stages.evaluate import Evaluate
from tests.helpers import make_checkpoint

SIZE = 8
SHARD = 32
SEED = 3
TRIALS = 2


class CountingFS(MemoryFileSystem):
    """An in-memory filesystem (``countmem://``) that counts the reads of every object."""

    protocol = "countmem"
    store: dict = {}
    pseudo_dirs = [""]
    reads: Counter = Counter()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("countmem://") if isinstance(path, str) else path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        CountingFS.reads[self._strip_protocol(path)] += 1
        return super().cat_file(path, start, end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            CountingFS.reads[self._strip_protocol(path)] += 1
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("countmem", CountingFS, clobber=True)


def _mask_reads() -> int:
    return sum(n for path, n in CountingFS.reads.items() if "/masks/masks.zarr/" in path)


class PixelModel:
    """A stand-in classifier that answers from every pixel, so any change in the noise shows."""

    device = "cpu"
    mean = torch.zeros(1, 3, 1, 1)  # its normaliser is the identity: it sees [0, 1] images
    std = torch.ones(1, 3, 1, 1)

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self.calls = 0

    def classes(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).sum(dim=1) * 1000).long() % self.modulus

    def __call__(self, x: torch.Tensor) -> models.ModelOutput:
        self.calls += 1
        return models.ModelOutput(torch.nn.functional.one_hot(self.classes(x), self.modulus).float(), None, None)

    normalized = __call__


def _pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _mask_rows() -> list[tuple[int, int, str, int]]:
    """(class_index, feature_index, label, image_id) per mask row, ordered by image: 50 images in 1 to 4 pairs."""
    rng = np.random.default_rng(0)
    pairs = [(c, j, "core" if j % 2 else "spurious") for c in range(3) for j in (c * 10, c * 10 + 1, c * 10 + 2, c * 10 + 3)]
    rows = []
    for iid in range(50):
        for k in sorted(rng.choice(len(pairs), size=rng.integers(1, 5), replace=False)):
            c, j, label = pairs[k]
            rows.append((c, j, label, iid))
    return rows


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A dataset of 50 PNGs and an output root on countmem://, the current build holding a mask
    store of SHARD rows per shard object; two stand-in models, a and b."""
    base = f"countmem://{uuid.uuid4().hex}"
    for iid in range(50):
        buf = io.BytesIO()
        Image.fromarray(_pixels(iid)).save(buf, format="PNG")
        storage.write_bytes_atomic(f"{base}/data/n{iid % 3:04d}/img_{iid:03d}.png", buf.getvalue())
    fakes = {}
    for name, modulus in (("a", 97), ("b", 89)):
        ckpt = make_checkpoint(tmp_path / f"{name}.pt", num_classes=3)
        fakes[ckpt] = PixelModel(modulus)
    loaded = []

    def load(cls, checkpoint, *args, **kwargs):
        loaded.append(checkpoint)
        return fakes[checkpoint]

    monkeypatch.setattr(Inference, "load", classmethod(load))
    ckpts = sorted(fakes)
    return base, ckpts, fakes, loaded


def _config(base, ckpts, names, sigmas, batch_size=6, per_block=8, output="out"):
    listed = ", ".join(f"{{name: {n}, arch: tiny_resnet, checkpoint: {c}}}" for n, c in zip(names, ckpts))
    return config.load(None, [
        f"dataset.root={base}/data", f"output={base}/{output}", f"preprocess.resize={SIZE}", f"preprocess.crop={SIZE}",
        "compute.gpus_per_worker=0", f"compute.batch_size={batch_size}", f"evaluate.models=[{listed}]",
        f"evaluate.sigmas={sigmas}", f"evaluate.trials={TRIALS}", f"evaluate.seed={SEED}", f"evaluate.images_per_block={per_block}",
    ])


def _write_masks(build: str, rows: list) -> np.ndarray:
    """The mask index and a Zarr store laid out as the generalize stage writes them."""
    n = len(rows)
    index = pa.table({
        "row": list(range(n)), "class_index": [r[0] for r in rows], "feature_index": [r[1] for r in rows],
        "feature_rank": [1] * n, "label": [r[2] for r in rows], "image_id": [r[3] for r in rows],
        "relpath": [f"n{r[3] % 3:04d}/img_{r[3]:03d}.png" for r in rows],
        "image_label": [r[0] for r in rows],  # every row scored
    })
    storage.write_parquet(storage.join(build, tables.MASK_INDEX.path), index, "mask-index")
    masks = np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
    arr = zarr.create_array(
        store=zarr.storage.FsspecStore.from_url(storage.join(build, tables.MASKS.path)),
        shape=masks.shape, chunks=(1, SIZE, SIZE), shards=(SHARD, SIZE, SIZE), dtype="uint8", fill_value=0,
        compressors=ZstdCodec(level=3),
    )
    arr[:] = masks
    return masks


def _expected(build: str, model: PixelModel, sigma: float) -> list[tuple]:
    """(image_id, condition, class_index, sigma, trial, pred) by the formula, one image at a time,
    each mask read on its own: clean, and clip(x + sigma * N * M, 0, 1), M the max of a pair's or
    a class's core or spurious masks, N drawn on the CPU from sha256("seed:trial:image_id")."""
    store = SalientMasks(build)
    index = store.index.to_pylist()
    masks = [store.mask(i) for i in range(len(store))]
    conditions: dict[int, list] = {}
    sets: dict[tuple, list[int]] = {}
    for i, r in enumerate(index):
        conditions.setdefault(r["image_id"], []).append((f"pair:{r['class_index']}:{r['feature_index']}", r["class_index"], [i]))
        sets.setdefault((r["image_id"], r["class_index"], r["label"]), []).append(i)
    for (iid, c, label), rs in sets.items():
        conditions[iid].append((f"{label}:{c}", c, rs))
    out = []
    for iid, conds in conditions.items():
        x = torch.from_numpy(_pixels(iid)).permute(2, 0, 1).float() / 255.0
        out.append((iid, "clean", -1, None, -1, int(model.classes(x[None])[0])))
        for trial in range(TRIALS):
            digest = hashlib.sha256(f"{SEED}:{trial}:{iid}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            noise = torch.randn((3, SIZE, SIZE), generator=g)
            for key, c, rs in conds:
                m = torch.from_numpy(np.max(np.stack([masks[i] for i in rs]), axis=0).astype(np.float32) / 255.0)
                noisy = (x + sigma * noise * m).clamp(0, 1)
                out.append((iid, key, c, sigma, trial, int(model.classes(noisy[None])[0])))
    return sorted(out)


def _predictions(build: str, name: str, sigma: float) -> pa.Table:
    return storage.read_parquet(storage.join(build, tables.predictions(name, sigma)))


def _plain(table: pa.Table) -> list[tuple]:
    return [tuple(None if k == "sigma" and math.isnan(v) else v for k, v in r.items()) for r in table.to_pylist()]


def test_evaluation_reads_masks_by_whole_shard_and_gives_the_formula(world):
    base, ckpts, fakes, loaded = world
    cfg = _config(base, ckpts[:1], ["a"], "[0.3, 0.7]")
    run = local_run(cfg, [Evaluate()])
    rows = _mask_rows()
    _write_masks(run.build, rows)
    CountingFS.reads.clear()
    summary = execute(Evaluate(), run)
    assert (summary["models"], summary["sigmas"], summary["reused"]) == (1, 2, 0)
    reads = _mask_reads()
    assert 0 < reads < len(rows) / 8, f"{reads} reads of the mask store for {len(rows)} rows"
    shard_reads = [n for path, n in CountingFS.reads.items() if "/masks/masks.zarr/c/" in path]
    assert len(shard_reads) == -(-len(rows) // SHARD) and set(shard_reads) == {1}, "every shard object read once, whole"
    for sigma in (0.3, 0.7):
        table = _predictions(run.build, "a", sigma)
        plain = _plain(table)
        assert plain == sorted(plain, key=lambda r: (r[0], r[1], -1 if r[3] is None else r[3], r[4])), "sorted by image, condition, sigma, trial"
        assert sorted(plain) == _expected(run.build, fakes[ckpts[0]], sigma)
        marker = storage.read_json(storage.join(run.build, tables.predictions_marker("a", sigma)))
        assert marker["noise_device"] == "cpu" and marker["predictions"] == table.num_rows


def test_one_worker_runs_each_new_model_and_sigma_only_and_batching_changes_nothing(world):
    base, ckpts, fakes, loaded = world
    rows = _mask_rows()
    first = _config(base, ckpts[:1], ["a"], "[0.3]")
    run = local_run(first, [Evaluate()])
    _write_masks(run.build, rows)
    execute(Evaluate(), run)
    before = _plain(_predictions(run.build, "a", 0.3))
    loaded.clear()

    both = _config(base, ckpts, ["a", "b"], "[0.3, 0.7]")
    summary = execute(Evaluate(), local_run(both, [Evaluate()]))
    assert summary["reused"] == 1, "(a, 0.3) was there"
    assert loaded == ckpts, "one worker holds both models with work"
    assert _plain(_predictions(run.build, "a", 0.3)) == before
    a, b = fakes[ckpts[0]], fakes[ckpts[1]]
    for name, model in (("a", a), ("b", b)):
        for sigma in (0.3, 0.7):
            assert sorted(_plain(_predictions(run.build, name, sigma))) == _expected(run.build, model, sigma)

    # the same evaluation with other batches and blocks, into another output root: the same tables, row for row
    other = _config(base, ckpts, ["a", "b"], "[0.3, 0.7]", batch_size=1, per_block=1, output="other")
    other_run = local_run(other, [Evaluate()])
    _write_masks(other_run.build, rows)
    execute(Evaluate(), other_run)
    for name in ("a", "b"):
        for sigma in (0.3, 0.7):
            assert _plain(_predictions(other_run.build, name, sigma)) == _plain(_predictions(run.build, name, sigma))


def test_masks_of_another_size_than_the_crop_are_refused_before_any_work(world):
    base, ckpts, fakes, loaded = world
    cfg = _config(base, ckpts[:1], ["a"], "[0.3]")
    cfg.preprocess.crop = SIZE - 2
    run = local_run(cfg, [Evaluate()])
    _write_masks(run.build, _mask_rows())
    with pytest.raises(InputError, match=f"the masks are {SIZE}x{SIZE} pixels but preprocess.crop is {SIZE - 2}; set it back"):
        execute(Evaluate(), run)
    assert loaded == [], "no model was loaded"


def test_a_range_of_masks_is_read_with_one_request_per_shard_it_touches(world):
    base, ckpts, fakes, loaded = world
    build = f"{base}/store"
    rows = _mask_rows()
    stored = _write_masks(build, rows)
    store = SalientMasks(build)
    assert store.shard_rows == SHARD
    for lo, hi in ((0, SHARD), (5, 7), (SHARD - 1, SHARD + 1), (3, len(rows)), (len(rows) - 2, len(rows)), (9, 9)):
        CountingFS.reads.clear()
        got = store.rows(lo, hi)
        assert _mask_reads() == len(range(lo // SHARD, -(-hi // SHARD)))
        assert got.dtype == np.uint8 and np.array_equal(got, stored[lo:hi])
        assert np.array_equal(got.reshape(-1, SIZE, SIZE), np.array([store.mask(i) for i in range(lo, hi)]).reshape(-1, SIZE, SIZE))
    with pytest.raises(IndexError):
        store.rows(0, len(rows) + 1)
