"""The mask store on a real S3 server: a tiny build output under ``s3://``, the generalize stage's
blocks written there, and the masks read back through :class:`salient.dataset.SalientMasks`."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from salient import builds, images, masks, models, preflight, storage
from salient.aggregate import TOPK_CANDIDATES_TABLE
from salient.config import ComputeConfig, Config, DatasetConfig, GeneralizeConfig, ModelConfig, PreprocessConfig
from salient.dataset import SalientMasks
from salient.ingest import LABELS_SCHEMA, LABELS_TABLE
from salient.stage import Run, committed_result
from salient.stages.generalize import Generalize
from tests.helpers import jpeg_bytes, make_checkpoint

RESIZE, CROP = 72, 64  # tiny_resnet: an 8x8 last conv stage at 64 px
TOP = 4  # images per pair that get a mask
SHARD = 5  # masks per Zarr shard object (12 masks: shards of 5, 5 and 2)
IMAGES_PER_CLASS = 3
# (class_index, label, kind) of each pair; the insufficient pair gets no masks.
PAIRS = [(0, "core", "core"), (0, "spurious", "background"), (1, "spurious", "separate_object"), (2, "insufficient", None)]


def _write_world(base: str, out: str, tmp_path: Path) -> tuple[str, str, list[tuple[int, int, str, str | None]]]:
    """JPEGs and a random tiny_resnet checkpoint under ``base``, ``topk/candidates.parquet`` and
    ``annotations/labels.parquet`` in the build directory ``out``; returns (dataset root, checkpoint
    URI, pairs as (class, feature, label, kind)).

    Each pair's feature is one of the channels most active on these images, so its masks are not
    all zero with random weights.
    """
    rng = np.random.default_rng(7)
    root = storage.join(base, "data")
    rels = [f"n{c:04d}/img_{i}.JPEG" for c in range(3) for i in range(IMAGES_PER_CLASS)]
    for rel in rels:
        storage.write_bytes_atomic(storage.under(root, rel), jpeg_bytes(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)))
    ckpt = storage.join(base, "tiny.pt")
    storage.write_bytes_atomic(ckpt, Path(make_checkpoint(tmp_path / "tiny.pt", num_classes=3)).read_bytes())
    net = models.load(ckpt, "tiny_resnet", "robustness")
    x = torch.stack([images.load_image(storage.read_bytes(storage.under(root, r)), RESIZE, CROP) for r in rels])
    with torch.inference_mode():
        active = net(x).maps.amax(dim=(2, 3)).gt(0).sum(0)
    features = torch.argsort(active, descending=True, stable=True)[: len(PAIRS)].tolist()
    pairs = [(c, j, label, kind) for (c, label, kind), j in zip(PAIRS, features)]

    topk = {k: [] for k in ("class_index", "wnid", "feature_index", "feature_rank", "rank", "image_id", "relpath", "label", "activation")}
    for rank_of_pair, (c, j, _, _) in enumerate(pairs, start=1):
        # TOP + 1 ranked images per pair, so the stage must drop the one past images_per_pair
        for rank, image_id in enumerate(rng.permutation(len(rels))[: TOP + 1], start=1):
            for key, value in zip(topk, (c, f"n{c:04d}", j, rank_of_pair, rank, int(image_id), rels[image_id],
                                         int(image_id) // IMAGES_PER_CLASS, float(10 - rank))):
                topk[key].append(value)
    storage.write_parquet(storage.join(out, TOPK_CANDIDATES_TABLE), pa.table({
        "candidates": ["prediction"] * len(topk["rank"]), "class_index": pa.array(topk["class_index"], pa.int32()), "wnid": topk["wnid"],
        "feature_index": pa.array(topk["feature_index"], pa.int32()), "feature_rank": pa.array(topk["feature_rank"], pa.int32()),
        "rank": pa.array(topk["rank"], pa.int32()), "image_id": pa.array(topk["image_id"], pa.int64()),
        "relpath": topk["relpath"], "label": pa.array(topk["label"], pa.int32()),
        "activation": pa.array(topk["activation"], pa.float32()),
    }), "test")
    labels = [
        {"class_index": c, "wnid": f"n{c:04d}", "feature_index": j, "feature_rank": r, "votes_main_object": 0,
         "votes_separate_object": 0, "votes_background": 0, "n_answers": 5, "mean_confidence": 4.0,
         "label": label, "kind": kind, "in_build": True}
        for r, (c, j, label, kind) in enumerate(pairs, start=1)
    ]
    storage.write_parquet(storage.join(out, LABELS_TABLE), pa.Table.from_pylist(labels, schema=LABELS_SCHEMA), "test")
    return root, ckpt, pairs


def _expected(net: models.SalientModel, root: str, relpath: str, feature: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised low-resolution map, uint8 mask) of one (image, feature), computed here from the
    unfused model: channel / its max, bilinear upsampling with half-pixel centres, round(255 * x)."""
    x = images.load_image(storage.read_bytes(storage.under(root, relpath)), RESIZE, CROP)[None]
    with torch.inference_mode():
        channel = net(x).maps[0, feature].double()
    peak = channel.max()
    low = channel / peak if peak > 0 else torch.zeros_like(channel)
    up = F.interpolate(low[None, None], size=(CROP, CROP), mode="bilinear", align_corners=False)[0, 0]
    return low.numpy(), np.clip(np.round(up.numpy() * 255), 0, 255).astype(np.uint8)


def test_plain_s3_uris_reach_the_test_server(s3_server):
    uri = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/probe.json"
    storage.write_json(uri, {"ok": 1})
    with s3_server.filesystem() as direct:
        assert json.loads(direct.cat_file(uri.removeprefix("s3://"))) == {"ok": 1}


@pytest.mark.slow
def test_masks_round_trip_through_s3(s3_server, tmp_path):
    base = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    layout = builds.open_current(storage.join(base, "out"))
    out = layout.build
    root, ckpt, pairs = _write_world(base, out, tmp_path)
    cfg = Config(
        dataset=DatasetConfig(root=root), model=ModelConfig(checkpoint=ckpt, arch="tiny_resnet", format="robustness"),
        preprocess=PreprocessConfig(resize=RESIZE, crop=CROP), compute=ComputeConfig(batch_size=2),
        generalize=GeneralizeConfig(images_per_pair=TOP, candidates="prediction", masks_per_shard=SHARD), output=layout.root,
    )
    stage = Generalize()
    run = Run(cfg, layout, preflight.for_stages(cfg, [stage]))

    rows = masks.plan_rows(out, cfg.generalize)
    n = rows.num_rows
    assert n == TOP * sum(label in ("core", "spurious") for _, _, label, _ in pairs)
    items = stage.plan(run)
    todo = [item for item in items if committed_result(run, item) is None]
    n_blocks = len(items)
    assert n_blocks == len(todo) == math.ceil(n / SHARD) > 1
    runner = masks.MaskRunner(cfg.model, cfg.preprocess, cfg.compute.model_copy(update={"batch_size": 2}), threads=1, device="cpu")
    results = []
    for item in todo:
        result = runner(item.payload)
        assert result["masks"] == len(item.payload.relpaths)
        results.append((item, result, "computed"))
    stage.commit(run, results)

    net = models.load(ckpt, "tiny_resnet", "robustness")
    store = SalientMasks(out)
    assert len(store) == n and store.array.shape == (n, CROP, CROP) and store.array.dtype == np.uint8
    strong = 0
    for i in range(n):
        meta = store.row(i)
        assert meta["row"] == i
        low, want = _expected(net, root, meta["relpath"], meta["feature_index"])
        got = store.mask(i)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, f"mask {i} ({meta['relpath']}, {meta['feature_index']})"
        np.testing.assert_allclose(store.nam(i), low, atol=2e-3)
        np.testing.assert_array_equal(store.find(meta["relpath"], meta["feature_index"]), got)
        strong += int(want.max() > 200)
    assert strong >= n // 2, "too few masks with a positive channel to test anything"

    # Zarr v3 with one mask per chunk, many chunks per shard object
    fs, zarr_path = storage.url_to_fs(storage.join(out, masks.ZARR_PATH))
    meta = json.loads(fs.cat_file(f"{zarr_path}/zarr.json"))
    assert meta["zarr_format"] == 3 and meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHARD, CROP, CROP]
    sharding = next(c for c in meta["codecs"] if c["name"] == "sharding_indexed")["configuration"]
    assert sharding["chunk_shape"] == [1, CROP, CROP]
    assert any(c["name"] == "zstd" for c in sharding["codecs"])
    shard_objects = [p for p in fs.find(zarr_path) if not p.endswith("zarr.json")]
    assert len(shard_objects) == n_blocks < n
