import os
import threading

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from salient import builds, models, preflight, storage
from salient.aggregate import TOPK_CANDIDATES_TABLE
from salient.config import ComputeConfig, Config, DatasetConfig, GeneralizeConfig, ModelConfig, PreprocessConfig
from salient.dataset import SalientDataset, SalientMasks
from salient.ingest import LABELS_TABLE
from salient.stage import Run, committed_result, local_run
from salient.stages.generalize import Generalize
from tests.helpers import make_checkpoint, make_image_folder
from tests.salient.test_nam import _bilinear_half_pixel

CROP = 32
# (class, feature slot, label): class 1's images appear under two features, one core and one spurious.
# Feature slots index the model's most active channels, so that no mask is all zeros.
PAIRS = [(0, 0, "core"), (1, 1, "core"), (1, 2, "spurious"), (2, 3, "insufficient")]


def _active_channels(ckpt, root):
    from salient import images

    x = torch.stack([images.load_image(p.read_bytes(), CROP, CROP) for p in sorted(root.rglob("*.JPEG"))])
    with torch.no_grad():
        maps = models.load(ckpt, "tiny_resnet")(x).maps
    return maps.amin(dim=(2, 3)).amin(dim=0).argsort(descending=True).tolist()


def _config(root, output, ckpt, shard=2) -> Config:
    return Config(
        dataset=DatasetConfig(root=str(root)), model=ModelConfig(checkpoint=ckpt, arch="tiny_resnet"),
        preprocess=PreprocessConfig(resize=CROP, crop=CROP), compute=ComputeConfig(batch_size=2),
        generalize=GeneralizeConfig(images_per_pair=3, candidates="prediction", masks_per_shard=shard), output=str(output),
    )


def _build(tmp_path, name="out", pairs=PAIRS, k=3):
    """Top images and labels in the current build of the output root ``tmp_path/name``; returns
    (dataset root, build directory, checkpoint)."""
    root = tmp_path / "data"
    if not root.exists():  # shared by every output of a test
        make_image_folder(root, classes=3, per_class=4, size=(36, 40))
    ckpt = str(tmp_path / "tiny.pt")
    if not os.path.exists(ckpt):
        make_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    out = local_run(_config(root, tmp_path / name, ckpt)).build
    active = _active_channels(ckpt, root)
    pairs = [(c, active[slot], lb) for c, slot, lb in pairs]
    rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.JPEG"))
    topk = {c: [] for c in ("class_index", "wnid", "feature_index", "feature_rank", "rank", "image_id", "relpath", "label", "activation")}
    for c, j, _ in pairs:
        members = [i for i, r in enumerate(rels) if r.startswith(f"n{c:04d}/")]
        if c == 1:  # an image filed under class 0 but in class 1's top images
            members = [0] + members
        for rank, i in enumerate(members[:k], start=1):
            for key, v in zip(topk, (c, f"n{c:04d}", j, 1, rank, i, rels[i], int(rels[i][1:5]), 1.0 / rank)):
                topk[key].append(v)
    storage.write_parquet(f"{out}/{TOPK_CANDIDATES_TABLE}", pa.table({"candidates": ["prediction"] * len(topk["rank"]), **topk}), "fp")
    storage.write_parquet(f"{out}/{LABELS_TABLE}", pa.table({
        "class_index": [c for c, _, _ in pairs], "feature_index": [j for _, j, _ in pairs],
        "label": [lb for _, _, lb in pairs], "kind": [{"core": "core", "spurious": "background"}.get(lb) for _, _, lb in pairs],
    }), "fp")
    return str(root), out, ckpt


def _generalize(root, out, ckpt, shard=2):
    """The generalize stage on the build directory ``out`` in this process: its blocks not committed
    yet run by the mask runner, then the index; returns the blocks run and the number of blocks."""
    stage = Generalize()
    cfg = _config(root, os.path.dirname(os.path.dirname(out)), ckpt, shard)
    run = Run(cfg, builds.Layout(cfg.output, os.path.basename(out)), preflight.for_stages(cfg, [stage]))
    items = stage.plan(run)
    done = {item.marker: committed_result(run, item) for item in items}
    todo = [item for item in items if done[item.marker] is None]
    runner = stage.worker(run)(None)
    for item in todo:
        done[item.marker] = runner(item.payload)
    stage.commit(run, [(item, done[item.marker], "computed" if item in todo else "build") for item in items])
    return [item.payload for item in todo], len(items)


def _expected(ckpt, root, relpath, feature):
    """Independent: the unfused model, layer4 channel / max, hand-written bilinear, round(255 x)."""
    from torchvision import transforms

    net = models.load(ckpt, "tiny_resnet")
    x = transforms.Compose([transforms.Resize(CROP), transforms.CenterCrop(CROP), transforms.ToTensor()])(Image.open(os.path.join(root, relpath)).convert("RGB"))
    with torch.no_grad():
        m = net(x[None]).maps[0, feature].double().numpy()
    low = m / m.max() if m.max() > 0 else np.zeros_like(m)
    return np.rint(255 * np.clip(_bilinear_half_pixel(low, CROP, CROP), 0, 1)), low


def test_masks_and_nams_equal_an_independent_computation(tmp_path):
    root, out, ckpt = _build(tmp_path)
    todo, n_blocks = _generalize(root, out, ckpt)
    store = SalientMasks(out)
    index = store.index.to_pylist()
    assert len(index) == 9 and n_blocks == 5 and len(todo) == 5, "3 labelled pairs x 3 images, 2 masks per shard"
    assert [r["row"] for r in index] == list(range(9))
    assert [r["image_id"] for r in index] == sorted(r["image_id"] for r in index), "rows are grouped by image"
    assert {r["label"] for r in index} == {"core", "spurious"} and all(r["class_index"] != 2 for r in index)
    for i, r in enumerate(index):
        mask, low = _expected(ckpt, root, r["relpath"], r["feature_index"])
        assert np.abs(store.mask(i).astype(int) - mask).max() <= 1, (i, r["relpath"])
        np.testing.assert_allclose(store.nam(i), low, atol=2e-3)
        assert (r["nam_h"], r["nam_w"]) == (4, 4)
        assert np.abs(store.rebuild(i, CROP) * 255 - mask).max() <= 1.5
    assert store.rebuild(0, 64).shape == (64, 64)
    assert np.array_equal(store.find(index[4]["relpath"], index[4]["feature_index"]), store.mask(4))
    shards = os.listdir(os.path.join(out, "masks", "masks.zarr", "c"))
    assert len(shards) == 5, "one object per shard of 2 masks"


def test_rerun_recomputes_nothing_and_dataset_applies_the_max_rule(tmp_path):
    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    todo, _ = _generalize(root, out, ckpt)
    assert todo == []
    ds = SalientDataset(out, root, CROP, CROP)
    store = ds.masks
    two = [rel for rel in store.images() if len(store.rows_for(rel)) == 2]
    assert two, "an image in both a core and a spurious pair"
    for rel in store.images():
        img, core, spurious, label = ds[ds.relpaths.index(rel)]
        rows = store.rows_for(rel)
        exp_core = np.zeros((CROP, CROP))
        exp_spur = np.zeros((CROP, CROP))
        for i in rows:
            target = exp_core if store.row(i)["label"] == "core" else exp_spur
            target[:] = np.maximum(target, store.mask(i) / 255.0)
        np.testing.assert_allclose(core.numpy(), exp_core, atol=1e-6)
        np.testing.assert_allclose(spurious.numpy(), exp_spur, atol=1e-6)
        assert img.shape == (3, CROP, CROP) and label == int(rel[1:5])


def test_concurrent_runs_into_different_outputs_do_not_interfere(tmp_path):
    root, out_a, ckpt = _build(tmp_path, "a")
    _, out_b, _ = _build(tmp_path, "b", pairs=[(0, 0, "spurious"), (2, 3, "core")])
    _, out_ref, _ = _build(tmp_path, "ref", pairs=[(0, 0, "spurious"), (2, 3, "core")])
    _generalize(root, out_ref, ckpt)
    errors = []

    def run(out):
        try:
            _generalize(root, out, ckpt)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in (out_a, out_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a, b, ref = SalientMasks(out_a), SalientMasks(out_b), SalientMasks(out_ref)
    assert len(a) == 9 and len(b) == 6
    assert b.index.drop(["nam"]).equals(ref.index.drop(["nam"]))
    for i in range(len(b)):
        assert np.array_equal(b.mask(i), ref.mask(i))
