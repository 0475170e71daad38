"""The discover workers: what annotators see for a pair is the same whether its class is made
alone or batched with others, and agrees with an independent per-image computation; an
unreadable image fails its class's pairs by name."""

import io
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision import transforms

from salient import attack, discover, models, nam, storage, tables
from salient.config import ComputeConfig, Config, DatasetConfig, DiscoverConfig, ModelConfig, PreprocessConfig
from salient.discover import ClassWork, PairWork, group_classes
from salient.stage import StageFailed, execute, local_run
from salient.stages.discover import Discover
from tests.helpers import make_checkpoint, make_image_folder
from tests.salient.test_nam import _bilinear_half_pixel

CROP = 32
SHOWN = 3
STEPS = 3
CLASSES = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("world")
    make_image_folder(base / "data", classes=CLASSES, per_class=6, size=(36, 40))
    ckpt = make_checkpoint(base / "tiny.pt", num_classes=CLASSES)
    return str(base / "data"), ckpt


def _config(root, ckpt, output, batch_size, **compute) -> Config:
    return Config(
        dataset=DatasetConfig(root=root), model=ModelConfig(checkpoint=ckpt, arch="tiny_resnet"),
        preprocess=PreprocessConfig(resize=CROP, crop=CROP), compute=ComputeConfig(batch_size=batch_size, **compute),
        discover=DiscoverConfig(images_per_pair=SHOWN, attack_steps=STEPS), output=str(output),
    )


def _pixels(root, relpath) -> torch.Tensor:
    """Independent preprocessing: PIL and torchvision's transforms, [0, 1] floats."""
    t = transforms.Compose([transforms.Resize(CROP), transforms.CenterCrop(CROP), transforms.ToTensor()])
    return t(Image.open(os.path.join(root, relpath)).convert("RGB"))


def _tables(build, root, ckpt):
    """Two pairs per class on its most active channels; class 1's top images start with one of class 0's."""
    rels = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    with torch.no_grad():
        feats = models.load(ckpt, "tiny_resnet")(torch.stack([_pixels(root, r) for r in rels])).features
    pairs = {c: [] for c in ("class_index", "wnid", "feature_index", "feature_rank")}
    topk = {c: [] for c in ("class_index", "wnid", "feature_index", "feature_rank", "rank", "image_id", "relpath", "label", "activation")}
    for c in range(CLASSES):
        members = [i for i, r in enumerate(rels) if r.startswith(f"n{c:04d}/")]
        if c == 1:
            members = [0] + members
        for rank_f, j in enumerate(feats[members].mean(0).argsort(descending=True)[:2].tolist(), start=1):
            for key, v in zip(pairs, (c, f"n{c:04d}", j, rank_f)):
                pairs[key].append(v)
            for rank, i in enumerate(members[:SHOWN], start=1):
                for key, v in zip(topk, (c, f"n{c:04d}", j, rank_f, rank, i, rels[i], int(rels[i][1:5]), float(feats[i, j]))):
                    topk[key].append(v)
    storage.write_parquet(storage.join(build, tables.PAIRS.path), pa.table(pairs), "fp")
    storage.write_parquet(storage.join(build, tables.TOPK_CLASS.path), pa.table(topk), "fp")
    classes = {"class_index": list(range(CLASSES)), "wnid": [f"n{c:04d}" for c in range(CLASSES)], "name": [f"class {c}" for c in range(CLASSES)]}
    storage.write_parquet(storage.join(build, tables.CLASSES.path), pa.table(classes), "fp")


def _discover(root, ckpt, output, batch_size, **compute) -> tuple[str, dict]:
    cfg = _config(root, ckpt, output, batch_size, **compute)
    stage = Discover()
    run = local_run(cfg, [stage])
    _tables(run.build, root, ckpt)
    return run.build, execute(stage, run)


def _assets(build) -> dict:
    """Every pair's record and decoded strips, by (class, feature)."""
    out = {}
    for item in storage.read_parquet(storage.join(build, tables.PAIRS.path)).to_pylist():
        folder = storage.join(build, tables.discover_pair(item["wnid"], item["feature_index"]))
        record = storage.read_json(storage.join(folder, tables.ASSETS))
        strips = {s: np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, f"{s}.png"))))) for s in discover.STRIPS}
        out[item["class_index"], item["feature_index"]] = (record, strips)
    return out


def _tiles(strip: np.ndarray) -> list[np.ndarray]:
    return [strip[:, i * (CROP + 2) : i * (CROP + 2) + CROP].astype(int) for i in range(SHOWN)]


def _attack(net, x, j):
    """One image at a time: x <- clip(x + step * g / ||g||_2, 0, 1), g = d r_j / d x."""
    for _ in range(STEPS):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(net(x[None]).features[0, j], x)
        x = torch.clamp(x + DiscoverConfig().attack_step_size * g / g.norm(), 0, 1)
    return x.detach()


def test_group_classes_keeps_classes_whole_and_in_order():
    def work(c, rows):
        return ClassWork(c, "root", "build", [PairWork(c, "w", j, j + 1, [0] * n, ["r"] * n, "fp") for j, n in enumerate(rows)])

    works = [work(0, [3, 3]), work(1, [2]), work(2, [5, 4]), work(3, [1]), work(4, [1])]
    assert [[w.class_index for w in g] for g in group_classes(works, 8)] == [[0, 1], [2], [3, 4]]
    assert [[w.class_index for w in g] for g in group_classes(works, 1)] == [[0], [1], [2], [3], [4]]
    assert [[w.class_index for w in g] for g in group_classes(works, 100)] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("alone", [
    {"batch_size": 1},
    # the attack in chunks of one image: a memory budget under one image's estimate
    {"batch_size": 64, "attack_memory_gb": 1e-9},
])
def test_assets_are_the_same_made_one_class_at_a_time_or_all_together(tmp_path, world, alone):
    root, ckpt = world
    alone_build, alone = _discover(root, ckpt, tmp_path / "alone", **alone)
    together_build, together = _discover(root, ckpt, tmp_path / "together", 64)
    assert alone["made"] == together["made"] == alone["pairs"] == 2 * CLASSES
    a, b = _assets(alone_build), _assets(together_build)
    assert a.keys() == b.keys()
    for key in a:
        (ra, sa), (rb, sb) = a[key], b[key]
        assert {k: v for k, v in ra.items() if k != "nams"} == {k: v for k, v in rb.items() if k != "nams"}
        # the CPU's convolutions round differently for other batch sizes (about 1e-7)
        np.testing.assert_allclose(ra["nams"], rb["nams"], atol=1.01e-4, rtol=0)
        assert np.array_equal(sa["images"], sb["images"])
        for strip in ("heatmaps", "attacks"):
            diff = np.abs(sa[strip].astype(int) - sb[strip])
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (key, strip)


def test_assets_equal_an_independent_per_image_computation(tmp_path, world):
    root, ckpt = world
    build, _ = _discover(root, ckpt, tmp_path / "out", 4)
    net = models.load(ckpt, "tiny_resnet")  # BatchNorm not folded, one image at a time
    for (c, j), (record, strips) in _assets(build).items():
        assert record["class_index"] == c and record["feature_index"] == j and len(record["relpaths"]) == SHOWN
        assert (record["nam_h"], record["nam_w"]) == (4, 4)
        images, heatmaps, attacks = (_tiles(strips[s]) for s in discover.STRIPS)
        for k, rel in enumerate(record["relpaths"]):
            x = _pixels(root, rel)
            with torch.no_grad():
                m = net(x[None]).maps[0, j].double().numpy()
            low = m / m.max() if m.max() > 0 else np.zeros_like(m)
            np.testing.assert_allclose(np.reshape(record["nams"][k], low.shape), low, atol=2e-3)
            pixels = (x.permute(1, 2, 0).numpy() * 255).round()
            assert np.array_equal(images[k], pixels)
            heat = nam.heatmap(x.permute(1, 2, 0).numpy(), np.clip(_bilinear_half_pixel(low, CROP, CROP), 0, 1))
            assert np.abs(heatmaps[k] - np.rint(heat * 255)).max() <= 2
            attacked = (_attack(net, x, j).permute(1, 2, 0).numpy() * 255).round()
            assert np.abs(attacks[k] - attacked).max() <= 2 and np.abs(attacks[k] - pixels).max() > 10, "the attack moved the image"


def test_an_unreadable_image_fails_its_class_by_name(tmp_path, world):
    root, ckpt = world
    data = tmp_path / "data"
    make_image_folder(data, classes=CLASSES, per_class=6, size=(36, 40))
    cfg = _config(str(data), ckpt, tmp_path / "out", 2 * SHOWN)  # one class per item
    stage = Discover()
    run = local_run(cfg, [stage])
    _tables(run.build, str(data), ckpt)
    broken = "n0002/img_000.JPEG"
    (data / broken).write_bytes(b"")
    with pytest.raises(StageFailed, match=broken):
        execute(stage, run)
    made = {(p.class_index, os.path.exists(storage.join(run.build, tables.discover_pair(p.wnid, p.feature_index), tables.ASSETS)))
            for p in discover.plan_pairs(run.build, "fp", SHOWN)}
    assert made == {(0, True), (1, True), (2, False)}


def test_the_attack_runs_as_many_images_at_once_as_its_memory_budget_allows(world):
    from salient.discover import DiscoverRunner

    root, ckpt = world
    cfg = _config(root, ckpt, "unused", 64)
    model = models.load(ckpt, "tiny_resnet").eval()
    per_image = attack.bytes_per_image(model, CROP)

    def rows(**compute):
        c = cfg.compute.model_copy(update=compute)
        return DiscoverRunner(cfg.model, cfg.preprocess, c, cfg.discover, threads=1, device="cpu").attack_rows

    assert rows(attack_memory_gb=1e-9) == 1
    assert rows(attack_memory_gb=5.5 * per_image / 2**30) == 5
    assert rows() == 64  # half of this machine's memory holds a batch of tiny images
