import os
import pytest
from torchvision.datasets import ImageFolder

from salient import plan
from tests.helpers import make_image_folder


def test_listing_follows_imagefolder_order(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class=5)
    (tmp_path / "n0001" / "extra.png").write_bytes((tmp_path / "n0001" / "img_000.JPEG").read_bytes())
    (tmp_path / "n0002" / "UPPER.JPG").write_bytes((tmp_path / "n0002" / "img_000.JPEG").read_bytes())
    (tmp_path / "n0002" / "notes.txt").write_text("not an image")
    (tmp_path / "n0000" / "nested").mkdir()
    listing = plan.list_images(str(tmp_path), threads=2)
    ref = ImageFolder(str(tmp_path), is_valid_file=lambda p: p.lower().endswith((".jpeg", ".jpg", ".png")))
    expected = [(p.removeprefix(str(tmp_path) + "/"), label) for p, label in ref.samples]
    got = list(zip(listing.table.column("relpath").to_pylist(), listing.table.column("label").to_pylist()))
    assert got == expected
    assert listing.classes == ref.classes
    assert listing.table.column("image_id").to_pylist() == list(range(len(expected)))
    sizes = listing.table.column("bytes").to_pylist()
    assert sizes == [(tmp_path / rel).stat().st_size for rel, _ in expected]


def test_shards_are_runs_within_one_class(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class=5)
    table = plan.cut_shards(plan.list_images(str(tmp_path)), shard_size=4)
    shards = plan.shards_of(table)
    assert [len(s) for s in shards] == [4, 1, 4, 1, 4, 1]
    assert [set(s.labels) for s in shards] == [{0}, {0}, {1}, {1}, {2}, {2}]
    assert [i for s in shards for i in s.image_ids] == list(range(15))
    assert shards == plan.shards_of(plan.cut_shards(plan.list_images(str(tmp_path)), shard_size=4))


def test_images_added_to_one_class_change_only_its_shards(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class=5)
    before = plan.shards_of(plan.cut_shards(plan.list_images(str(tmp_path)), shard_size=4))
    wnid = before[2].relpaths[0].split("/")[0]
    (tmp_path / wnid / "zz_new.JPEG").write_bytes((tmp_path / before[2].relpaths[0]).read_bytes())
    after = plan.shards_of(plan.cut_shards(plan.list_images(str(tmp_path)), shard_size=4))
    files = lambda shards: [tuple(s.relpaths) for s in shards]  # noqa: E731
    changed = set(files(after)) - set(files(before))
    assert changed == {tuple(after[3].relpaths)} and len(after[3]) == 2


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plan.list_images(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class folders"):
        plan.list_images(str(tmp_path))


def test_a_file_rewritten_with_the_same_size_changes_its_shards_key(tmp_path):
    from salient import activations

    make_image_folder(tmp_path, classes=2, per_class=3)
    before = plan.shards_of(plan.cut_shards(plan.list_images(str(tmp_path)), shard_size=10))
    target = tmp_path / before[1].relpaths[0]
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # same size, other content
    target.write_bytes(bytes(data))
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = plan.shards_of(plan.cut_shards(plan.list_images(str(tmp_path)), shard_size=10))
    assert [s.sizes for s in after] == [s.sizes for s in before]
    keys = [[activations.content_key("stage", s) for s in shards] for shards in (before, after)]
    assert keys[0][0] == keys[1][0] and keys[0][1] != keys[1][1]
