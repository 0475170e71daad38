import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salient import models, storage, train, world

CLASSES = 3


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "world"
    world.synthesize(str(out), classes=CLASSES, per_class=8, size=32, rho=0.75, seed=0)
    return out


@pytest.fixture(scope="module")
def trained(tiny_world: Path) -> tuple[str, dict]:
    checkpoint = str(tiny_world.parent / "model.pt")
    start = time.perf_counter()
    result = train.train_demo(str(tiny_world), checkpoint, epochs=1, seed=0)
    assert time.perf_counter() - start < 10
    return checkpoint, result


def test_training_writes_a_robustness_checkpoint_that_loads(trained):
    checkpoint, result = trained
    assert result["checkpoint"] == checkpoint
    assert result["split"] == "train" and result["epochs"] == 1 and result["images"] == CLASSES * 8
    assert 0.0 <= result["train_accuracy"] <= 1.0 and result["seconds"] > 0
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 1
    assert any(k.startswith("module.model.") for k in raw["model"])
    model = models.load(checkpoint, "tiny_resnet", "robustness")
    assert model.num_classes == CLASSES and not model.training
    assert model(torch.rand(2, 3, 32, 32)).logits.shape == (2, CLASSES)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(trained, tiny_world, tmp_path):
    checkpoint, _ = trained
    train.train_demo(str(tiny_world), str(tmp_path / "again.pt"), epochs=1, seed=0)
    train.train_demo(str(tiny_world), str(tmp_path / "other.pt"), epochs=1, seed=1)
    first, again, other = (
        models.extract_state_dict(models.read_checkpoint(p)) for p in (checkpoint, tmp_path / "again.pt", tmp_path / "other.pt")
    )
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_training_leaves_the_callers_torch_state_alone(tiny_world, tmp_path):
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train.train_demo(str(tiny_world), str(tmp_path / "m.pt"), epochs=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_rho_free_trains_on_the_decorrelated_split(tiny_world, tmp_path):
    result = train.train_demo(str(tiny_world), str(tmp_path / "free.pt"), rho_free=True, epochs=1)
    assert result["split"] == "train_free" and result["images"] == CLASSES * 8


def test_accuracy_counts_top1_hits_over_the_image_folder(trained, tiny_world):
    checkpoint, _ = trained
    model = models.load(checkpoint, "tiny_resnet", "robustness")
    root = tiny_world / "val"
    hits = total = 0
    for label, class_dir in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for path in sorted(class_dir.iterdir()):
            with Image.open(path) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
            with torch.inference_mode():
                hits += int(model(x[None]).logits.argmax(1).item() == label)
            total += 1
    assert total == CLASSES * 4
    assert train.accuracy(checkpoint, str(root)) == hits / total


def test_image_folder_lists_in_imagefolder_order(tiny_world):
    items = train.image_folder(str(tiny_world / "val"))
    assert items == sorted(items)
    assert [label for _, label in items] == [c for c in range(CLASSES) for _ in range(4)]
    assert items[0] == ("n99000000/n99000000_00000.JPEG", 0)


def test_bad_inputs_fail_with_a_clear_message(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="holds no world.json"):
        train.train_demo(str(tmp_path), str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="epochs=0"):
        train.train_demo(str(tiny_world), str(tmp_path / "m.pt"), epochs=0)
    with pytest.raises(ValueError, match="does not exist"):
        train.image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "n0").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        train.image_folder(str(tmp_path / "empty"))


def test_reads_the_world_from_any_fsspec_filesystem(tiny_world):
    data = "memory://salient-test-train"
    try:
        for path in tiny_world.rglob("*"):
            if path.is_file() and path.relative_to(tiny_world).parts[0] in ("train", "val", "world.json"):
                storage.write_bytes_atomic(storage.join(data, str(path.relative_to(tiny_world))), path.read_bytes())
        checkpoint = storage.join(data, "model.pt")
        result = train.train_demo(data, checkpoint, epochs=1)
        assert result["images"] == CLASSES * 8
        assert 0.0 <= train.accuracy(checkpoint, storage.join(data, "val")) <= 1.0
        assert torch.load(io.BytesIO(storage.read_bytes(checkpoint)), weights_only=True)["epoch"] == 1
    finally:
        storage.remove(data, recursive=True)
