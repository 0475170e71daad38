"""Object names with spaces, non-ASCII letters (both Unicode normal forms) and characters that URLs
treat specially go through plan -> activations -> aggregate on local disk and on a real S3 server
with their relpaths preserved exactly; names that could leave their root are refused or listed."""

import unicodedata
import uuid

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from salient import activations, aggregate, models, storage
from salient import plan as planmod
from salient.config import AggregateConfig, ComputeConfig, Config, DatasetConfig, ModelConfig, PreprocessConfig
from salient.stage import committed_result, local_run
from salient.stages.activations import Activations
from tests.helpers import jpeg_bytes, make_checkpoint

COMPOSED = unicodedata.normalize("NFC", "é")
DECOMPOSED = unicodedata.normalize("NFD", "é")
assert COMPOSED != DECOMPOSED
# Class folders and file names, as a user might have them; none is a valid URL path as it stands.
NAMES = {
    "n01 ćlass": ["ímg 1.JPEG", "img  two spaces.jpg", f"caf{COMPOSED}.JPEG", f"caf{DECOMPOSED}.JPEG"],
    "n02 日本語": ["写真 1.png", "a+b=c & d.JPEG", "100% #1?.JPEG"],
    "n03-plain": ["it's \"quoted\".JPEG", "ß ẞ Ω.JPEG", " leading space.JPEG"],
}


def _expected_relpaths() -> list[str]:
    """ImageFolder order by hand: folders sorted by code point, then file names sorted by code point."""
    return [f"{wnid}/{name}" for wnid in sorted(NAMES) for name in sorted(NAMES[wnid])]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "world")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket}/{uuid.uuid4().hex}"


def test_names_with_spaces_and_unicode_survive_every_stage(base, tmp_path):
    rng = np.random.default_rng(3)
    root = storage.join(base, "data")
    for wnid, files in NAMES.items():
        for name in files:
            storage.write_bytes_atomic(storage.under(root, f"{wnid}/{name}"), jpeg_bytes(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)))
    ckpt = make_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    model, pre = ModelConfig(checkpoint=ckpt, arch="tiny_resnet"), PreprocessConfig(resize=36, crop=32)
    cfg = Config(
        dataset=DatasetConfig(root=root), model=model, preprocess=pre, compute=ComputeConfig(batch_size=4, shard_size=4),
        output=storage.join(base, "out"),
    )
    stage = Activations()
    run = local_run(cfg, [stage])
    out = run.build
    expected = _expected_relpaths()
    if storage.is_local(root):
        oracle = ImageFolder(root)  # torchvision's own listing, for the order
        assert [p.removeprefix(root + "/") for p, _ in oracle.samples] == expected
        assert oracle.classes == sorted(NAMES)

    summary = planmod.write_plan(root, out, shard_size=4)
    assert summary["skipped"] == 0 and summary["classes"] == 3
    assert planmod.plan_classes(out) == sorted(NAMES)
    plan = planmod.read_plan(out).to_pydict()
    assert plan["relpath"] == expected
    assert plan["label"] == [sorted(NAMES).index(r.split("/")[0]) for r in expected]

    runner = activations.ActivationRunner(model, pre, cfg.compute, threads=1)
    items = stage.shards(run)
    assert all(committed_result(run, item) is None for item in items), "nothing is committed before the runner runs"
    stats = [runner(item.payload) for item in items]
    assert all(s["failed"] == 0 for s in stats), [s["failures"] for s in stats]
    rows = [storage.read_parquet(activations.table_uri(out, s["shard"]), ["relpath", "image_id"]).to_pydict() for s in stats]
    assert [r for part in rows for r in part["relpath"]] == expected
    assert [i for part in rows for i in part["image_id"]] == list(range(len(expected)))

    uris, fp = stage.committed(run)
    weight = models.load(ckpt, "tiny_resnet").fc_weight.numpy()
    inputs = aggregate.AggregateInputs(out, uris, weight, planmod.plan_classes(out), fp)
    aggregate.run(inputs, AggregateConfig(features_per_class=2, top_k_class=3, top_k_neuron=len(expected)))

    classes = storage.read_parquet(storage.join(out, aggregate.CLASSES_TABLE)).to_pydict()
    assert classes["wnid"] == sorted(NAMES)
    for table in (aggregate.TOPK_CLASS_TABLE, aggregate.TOPK_NEURON_TABLE):
        top = storage.read_parquet(storage.join(out, table), ["image_id", "relpath"]).to_pydict()
        assert top["relpath"], table
        assert all(expected[i] == r for i, r in zip(top["image_id"], top["relpath"])), table
    # the neuron table keeps every image for some neuron: each name comes back, byte for byte
    neuron = storage.read_parquet(storage.join(out, aggregate.TOPK_NEURON_TABLE), ["relpath"]).column("relpath").to_pylist()
    assert set(neuron) == set(expected)
    assert {r for r in neuron if r.startswith("n01 ćlass/caf")} == {f"n01 ćlass/caf{COMPOSED}.JPEG", f"n01 ćlass/caf{DECOMPOSED}.JPEG"}


def test_names_that_cannot_be_used_as_paths(tmp_path):
    root = tmp_path / "data"
    (root / "n01").mkdir(parents=True)
    (root / "n01" / "ok.JPEG").write_bytes(jpeg_bytes(np.zeros((8, 8, 3), np.uint8)))
    (root / "n01" / "back\\slash.JPEG").write_bytes(jpeg_bytes(np.zeros((8, 8, 3), np.uint8)))
    listing = planmod.list_images(str(root))
    assert listing.table.column("relpath").to_pylist() == ["n01/ok.JPEG"]
    [(rel, reason)] = listing.skipped
    assert rel == "n01/back\\slash.JPEG" and "backslash" in reason and "rename the file" in reason

    (root / "n02\\evil").mkdir()
    with pytest.raises(storage.UnsafePathError, match=r"class folder 'n02\\\\evil' .* rename the folder"):
        planmod.list_images(str(root))


@pytest.mark.parametrize("rel", ["../outside.JPEG", "n01/../../x", "/etc/passwd", "s3://other/x", "n01//x", "~/x", "n01/./x"])
def test_relpaths_from_tables_cannot_leave_the_root(rel):
    with pytest.raises(storage.UnsafePathError):
        storage.under("s3://bucket/data", rel)
