import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from salient import activations, plan, storage
from salient.config import ComputeConfig, ModelConfig, PreprocessConfig
from tests.helpers import make_checkpoint, make_image_folder

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _odd_files(root):
    """Odd but valid images, and broken files, beside the normal ones. Returns (valid, broken) relpaths."""
    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    valid = {
        "n0000/cmyk.JPEG": (base.convert("CMYK"), "JPEG"),
        "n0000/gray.JPEG": (base.convert("L"), "JPEG"),
        "n0001/palette.png": (base.convert("P"), "PNG"),
        "n0001/rgba.png": (base.convert("RGBA"), "PNG"),
        "n0001/png_named.JPEG": (base, "PNG"),
        "n0002/sixteen.png": (Image.fromarray((rng.integers(0, 65536, (50, 70))).astype(np.uint16)), "PNG"),
    }
    for rel, (img, fmt) in valid.items():
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        (root / rel).write_bytes(buf.getvalue())
    good = (root / "n0000" / "img_000.JPEG").read_bytes()
    broken = {"n0000/zero.JPEG": b"", "n0001/truncated.JPEG": good[: len(good) // 3], "n0002/garbage.jpg": b"\x00" * 100}
    for rel, data in broken.items():
        (root / rel).write_bytes(data)
    return sorted(valid), sorted(broken)


def _reference_features(net, path, resize, crop):
    """Independent computation: PIL decode, torchvision transforms, the penultimate layer via a hook."""
    img = Image.open(path)
    if img.mode.startswith("I"):
        img = Image.fromarray(np.rint(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8))
    x = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor()])(img.convert("RGB"))
    seen = {}
    handle = net.avgpool.register_forward_hook(lambda m, i, o: seen.setdefault("f", torch.flatten(o, 1)))
    with torch.no_grad():
        logits = net((x[None] - MEAN) / STD)
    handle.remove()
    return seen["f"][0].numpy(), int(logits.argmax())


def test_shard_matches_independent_computation_and_lists_failures(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, classes=3, per_class=4, size=(60, 80))
    valid, broken = _odd_files(root)
    ckpt = make_checkpoint(tmp_path / "r18.pt", num_classes=3, arch="resnet18")
    listing = plan.list_images(str(root)).table  # one shard over all classes, odd files included
    (shard,) = plan.shards_of(listing.append_column("shard", pa.array(np.zeros(listing.num_rows, np.int32))))
    out = str(tmp_path / "out")
    runner = activations.ActivationRunner(
        ModelConfig(checkpoint=ckpt, arch="resnet18"), PreprocessConfig(resize=72, crop=64),
        ComputeConfig(batch_size=5, decode_threads=2), threads=2,
    )
    stats = runner(activations.ShardTask(shard, str(root), out, "fp-shard", "fp-stage"))

    table = pq.read_table(activations.table_uri(out, 0))
    assert table.schema.field("features").type == activations.output_schema(512).field("features").type
    rels = table.column("relpath").to_pylist()
    failed = {f["relpath"]: f["reason"] for f in stats["failures"]}
    assert sorted(failed) == broken
    assert "empty file" in failed["n0000/zero.JPEG"]
    assert set(valid) <= set(rels)
    assert sorted(rels + list(failed)) == sorted(shard.relpaths), "every planned image is a row or a failure"
    assert stats["images"] + stats["failed"] == stats["planned"] == len(shard)
    assert table.column("image_id").to_pylist() == [shard.image_ids[shard.relpaths.index(r)] for r in rels]
    assert table.column("label").to_pylist() == [int(r[1:5]) for r in rels]

    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict({k.removeprefix("module.model."): v for k, v in torch.load(ckpt, weights_only=True)["model"].items() if k.startswith("module.model.")})
    net.eval()
    feats = np.asarray(table.column("features").to_pylist(), dtype=np.float32)
    preds = table.column("pred").to_pylist()
    for i, rel in enumerate(rels):
        ref, ref_pred = _reference_features(net, root / rel, 72, 64)
        np.testing.assert_allclose(feats[i], ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))
        assert preds[i] == ref_pred, rel

    assert set(stats["seconds"]) == {"read", "decode", "wait", "infer", "write", "queued", "total"}
    assert storage.read_json(activations.stats_uri(out, 0))["fingerprint"] == "fp-shard"


def test_all_images_failing_still_commits_an_empty_shard(tmp_path):
    root = tmp_path / "data"
    (root / "n0000").mkdir(parents=True)
    (root / "n0000" / "a.JPEG").write_bytes(b"")
    ckpt = make_checkpoint(tmp_path / "t.pt", num_classes=1)
    (shard,) = plan.shards_of(plan.cut_shards(plan.list_images(str(root)), 10))
    runner = activations.ActivationRunner(ModelConfig(checkpoint=ckpt, arch="tiny_resnet"), PreprocessConfig(resize=32, crop=32), ComputeConfig())
    stats = runner(activations.ShardTask(shard, str(root), str(tmp_path / "out"), "f", "s"))
    assert (stats["images"], stats["failed"]) == (0, 1)
    assert pq.read_table(activations.table_uri(str(tmp_path / "out"), 0)).num_rows == 0


def test_the_torchvision_decoder_gives_the_same_rows_and_features_within_2_percent(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, classes=3, per_class=4, size=(60, 80))
    valid, broken = _odd_files(root)
    ckpt = make_checkpoint(tmp_path / "r18.pt", num_classes=3, arch="resnet18")
    listing = plan.list_images(str(root)).table
    (shard,) = plan.shards_of(listing.append_column("shard", pa.array(np.zeros(listing.num_rows, np.int32))))
    out = {}
    for decoder in ("pil", "torchvision"):
        runner = activations.ActivationRunner(
            ModelConfig(checkpoint=ckpt, arch="resnet18"), PreprocessConfig(resize=72, crop=64, decoder=decoder),
            ComputeConfig(batch_size=5, decode_threads=2), threads=2,
        )
        stats = runner(activations.ShardTask(shard, str(root), str(tmp_path / decoder), "fp-shard", "fp-stage"))
        out[decoder] = (stats, pq.read_table(activations.table_uri(str(tmp_path / decoder), 0)))
    (pil_stats, pil), (tv_stats, tv) = out["pil"], out["torchvision"]
    assert tv.column("relpath").to_pylist() == pil.column("relpath").to_pylist()
    assert sorted(f["relpath"] for f in tv_stats["failures"]) == broken, "a truncated JPEG fails with either decoder"
    assert (pil_stats["decoder_fallbacks"], tv_stats["decoder_fallbacks"]) == (0, len(valid)), "every odd image is read by PIL"
    a = np.asarray(pil.column("features").to_pylist(), np.float32)
    b = np.asarray(tv.column("features").to_pylist(), np.float32)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() < 0.02
    odd = [i for i, r in enumerate(pil.column("relpath").to_pylist()) if r in valid]
    assert np.array_equal(a[odd], b[odd]), "fallbacks are the reference pixels"


def test_features_are_stored_in_the_configured_type(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, classes=2, per_class=3, size=(32, 32))
    ckpt = make_checkpoint(tmp_path / "t.pt", num_classes=2)
    (shard,) = plan.shards_of(plan.list_images(str(root)).table.append_column("shard", pa.array(np.zeros(6, np.int32))))
    stored = {}
    for dtype in ("float32", "float16"):
        out = str(tmp_path / dtype)
        runner = activations.ActivationRunner(
            ModelConfig(checkpoint=ckpt, arch="tiny_resnet"), PreprocessConfig(resize=32, crop=32), ComputeConfig(), threads=1, dtype=dtype,
        )
        runner(activations.ShardTask(shard, str(root), out, "fp", "fp"))
        table = pq.read_table(activations.table_uri(out, 0))
        assert table.schema.field("features").type == pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), runner.width)
        stored[dtype] = np.asarray(table.column("features").combine_chunks().flatten().to_numpy(), dtype)
    assert stored["float32"].any()
    assert np.array_equal(stored["float16"], stored["float32"].astype(np.float16)), "float16 is the float32 features rounded"
