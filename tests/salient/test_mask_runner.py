"""The generalize workers: masks read through the image stream and computed in batches equal an
independent per-image computation, whatever the batch size, with blocks computed two at a time,
and from cached NAMs; an unreadable image fails its block with its name."""

import os
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from salient import masks, nam, storage
from salient.aggregate import TOPK_CANDIDATES_TABLE
from salient.config import ComputeConfig, Config, DatasetConfig, GeneralizeConfig, ModelConfig, PreprocessConfig
from salient.dataset import SalientMasks
from salient.ingest import LABELS_TABLE
from salient.stage import LocalExecutor, StageFailed, execute, local_run
from salient.stages.generalize import Generalize
from tests.helpers import make_checkpoint, make_image_folder
from tests.salient.test_masks import CROP, _active_channels, _expected

K = 6
SHARD = 16
# (class, feature slot, label); slots index the model's most active channels (no all-zero mask)
PAIRS = [(0, 0, "core"), (0, 1, "spurious"), (1, 2, "core"), (1, 0, "spurious"), (2, 3, "core")]
EXTRA = (2, 1, "spurious")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("world")
    root = base / "data"
    make_image_folder(root, classes=3, per_class=8, size=(36, 40))
    ckpt = make_checkpoint(base / "tiny.pt", num_classes=3)
    return str(root), ckpt, _active_channels(ckpt, root)


def _config(root, ckpt, output, batch_size) -> Config:
    return Config(
        dataset=DatasetConfig(root=root), model=ModelConfig(checkpoint=ckpt, arch="tiny_resnet"),
        preprocess=PreprocessConfig(resize=CROP, crop=CROP), compute=ComputeConfig(batch_size=batch_size),
        generalize=GeneralizeConfig(images_per_pair=K, candidates="prediction", masks_per_shard=SHARD), output=str(output),
    )


def _tables(build, root, active, pairs):
    """Top images (class 1's start with an image of class 0) and labels of ``pairs`` in ``build``."""
    rels = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    topk = {c: [] for c in ("class_index", "wnid", "feature_index", "feature_rank", "rank", "image_id", "relpath", "label", "activation")}
    labels = {"class_index": [], "feature_index": [], "label": [], "kind": []}
    for c, slot, label in pairs:
        j = active[slot]
        members = [i for i, r in enumerate(rels) if r.startswith(f"n{c:04d}/")]
        if c == 1:
            members = [0] + members
        for rank, i in enumerate(members[:K], start=1):
            for key, v in zip(topk, (c, f"n{c:04d}", j, 1, rank, i, rels[i], int(rels[i][1:5]), 1.0 / rank)):
                topk[key].append(v)
        for key, v in zip(labels, (c, j, label, "core" if label == "core" else "background")):
            labels[key].append(v)
    storage.write_parquet(f"{build}/{TOPK_CANDIDATES_TABLE}", pa.table({"candidates": ["prediction"] * len(topk["rank"]), **topk}), "fp")
    storage.write_parquet(f"{build}/{LABELS_TABLE}", pa.table(labels), "fp")


def _run(cfg, build_pairs, world, concurrently=True):
    """The generalize stage on the current build of ``cfg.output``, its blocks run by the local
    executor; with ``concurrently``, blocks 0 and 1 are made to be in flight at the same time.
    Returns the build directory and the stage's summary."""
    root, _, active = world
    stage = Generalize()
    run = local_run(cfg, [stage])
    _tables(run.build, root, active, build_pairs)
    items = stage.plan(run)
    stage.use_cached_nams(run, items)
    builder = stage.worker(run)
    together = threading.Barrier(2)

    def build(threads):
        runner = builder(threads)

        def call(block):
            if concurrently and block.index < 2:
                together.wait(timeout=60)  # breaks unless both blocks are running
            return runner(block)

        return call

    result = LocalExecutor().pool(build, [item.payload for item in items], max_attempts=1)
    assert result.failed == []
    by_block = {r["block"]: r for r in result.results}
    summary = stage.commit(run, [(item, by_block[item.payload.index], "computed") for item in items])
    return run.build, summary


def _check_against_independent(build, world):
    """Every mask equals round(255 * NAM) of the stored float32 NAM bit for bit, and both agree
    with the unfused model, PIL and a hand-written bilinear resize."""
    root, ckpt, _ = world
    store = SalientMasks(build)
    lows = masks.read_block_nams(build, -(-len(store) // SHARD)).column("nam").to_pylist()
    for i, row in enumerate(store.index.to_pylist()):
        low = torch.tensor(lows[i], dtype=torch.float32).reshape(1, row["nam_h"], row["nam_w"])
        assert np.array_equal(store.mask(i), nam.to_uint8(nam.upsample(low, CROP).clamp(0, 1).numpy())[0]), i
        mask, exp_low = _expected(ckpt, root, row["relpath"], row["feature_index"])
        assert np.abs(store.mask(i).astype(int) - mask).max() <= 1, (i, row["relpath"])
        np.testing.assert_allclose(low[0].numpy(), exp_low, atol=2e-3)
    return store


def test_masks_equal_the_independent_computation_for_any_batch_size_two_blocks_at_a_time(tmp_path, world):
    root, ckpt, _ = world
    arrays, lows = {}, {}
    for batch_size in (1, 7, 64):
        build, summary = _run(_config(root, ckpt, tmp_path / f"b{batch_size}", batch_size), PAIRS, world)
        assert summary["masks"] == len(PAIRS) * K and summary["blocks"] == 2 and summary["inferred_masks"] == summary["masks"]
        store = _check_against_independent(build, world)
        arrays[batch_size] = store.array[:].astype(int)
        lows[batch_size] = np.array(masks.read_block_nams(build, 2).column("nam").to_pylist())
        images_per_block = [len(set(store.index.column("relpath").to_pylist()[s : s + SHARD])) for s in (0, SHARD)]
        assert max(images_per_block) > 7, "batches of 7 split a block"
    # the CPU's convolutions round differently for other batch sizes (about 1e-7), which may move
    # a pixel that sits on a rounding boundary by one level
    for batch_size in (7, 64):
        np.testing.assert_allclose(lows[batch_size], lows[1], atol=1e-6, rtol=0)
        diff = np.abs(arrays[batch_size] - arrays[1])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_masks_from_cached_nams_equal_computed_ones(tmp_path, world):
    root, ckpt, _ = world
    cfg = _config(root, ckpt, tmp_path / "out", 5)
    _run(cfg, PAIRS, world)
    build, summary = _run(cfg, [*PAIRS, EXTRA], world)
    assert summary["inferred_masks"] == K, "only the new pair's images go through the model"
    cached = _check_against_independent(build, world)
    fresh_build, _ = _run(_config(root, ckpt, tmp_path / "fresh", 64), [*PAIRS, EXTRA], world)
    fresh = SalientMasks(fresh_build)
    assert cached.index.drop(["nam"]).equals(fresh.index.drop(["nam"]))
    diff = np.abs(cached.array[:].astype(int) - fresh.array[:])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, "equal up to the CPU's rounding for other batches"


def test_an_unreadable_image_fails_its_block_by_name(tmp_path, world):
    root, ckpt, active = world
    data = tmp_path / "data"
    make_image_folder(data, classes=3, per_class=8, size=(36, 40))
    cfg = _config(str(data), ckpt, tmp_path / "out", 4)
    stage = Generalize()
    run = local_run(cfg, [stage])
    _tables(run.build, str(data), active, PAIRS)
    last = stage.plan(run)[-1].payload
    (data / last.relpaths[-1]).write_bytes(b"not an image")
    with pytest.raises(StageFailed, match=last.relpaths[-1]):
        execute(stage, run)
    assert not os.path.exists(masks.block_marker(run.build, last.index))
    assert os.path.exists(masks.block_marker(run.build, 0)), "the other block is made"
