import os
import zipfile

import pytest
import torch
import torchvision

from salient import models

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _randomize_bn(net: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics so a wrong layer order would show."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)


@pytest.fixture(scope="module")
def resnet50() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    _randomize_bn(net)
    return net.eval()


def _robustness_dict(net: torch.nn.Module, key: str = "model") -> dict:
    """A checkpoint laid out as the MadryLab robustness library writes it, built by hand."""
    sd = net.state_dict()
    model = {f"module.model.{k}": v for k, v in sd.items()}
    model.update({f"module.attacker.model.{k}": v for k, v in sd.items()})
    for p in ("module.normalizer.", "module.attacker.normalize."):
        model[p + "new_mean"] = MEAN.view(3, 1, 1)
        model[p + "new_std"] = STD.view(3, 1, 1)
    return {key: model, "epoch": 90, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "schedule": None}


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_robustness_checkpoint_matches_torchvision(tmp_path, resnet50, key):
    path = tmp_path / "imagenet_l2_3_0.pt"
    torch.save(_robustness_dict(resnet50, key), path)
    model = models.load(str(path), "resnet50", "robustness")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
        expected_logits = resnet50((x - MEAN) / STD)
        trunk = torch.nn.Sequential(*list(resnet50.children())[:-2])
        expected_maps = trunk((x - MEAN) / STD)
    scale = expected_logits.abs().max()
    assert torch.allclose(out.logits, expected_logits, atol=1e-5 * float(scale), rtol=0)
    assert out.maps.shape == (2, 2048, 7, 7)
    assert torch.allclose(out.maps, expected_maps, atol=1e-5 * float(expected_maps.abs().max()), rtol=0)
    assert torch.allclose(out.features, expected_maps.mean(dim=(2, 3)), atol=1e-5 * float(expected_maps.abs().max()))
    assert (out.maps >= 0).all(), "maps are taken after layer4's ReLU"
    assert model.num_classes == 1000 and model.feature_dim == 2048
    assert torch.equal(model.fc_weight, resnet50.fc.weight)
    assert not model.training


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_torchvision_state_dict_variants(tmp_path, wrap):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7).eval()
    sd = net.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "dataparallel": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = models.load(str(path), "resnet18", "auto")
    assert model.num_classes == 7
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, net((x - MEAN) / STD), atol=1e-5)


class _Payload:
    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_object_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    _Payload.marker = str(marker)
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    path = tmp_path / "evil.pt"
    torch.save({"model": sd, "extra": _Payload()}, path)
    with pytest.raises(models.CheckpointError, match="pickled objects other than tensors"):
        models.load(str(path), "resnet18")
    assert not marker.exists()


def test_wrong_arch_names_keys(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    with pytest.raises(models.CheckpointError) as err:
        models.load(str(path), "resnet50")
    msg = str(err.value)
    assert "resnet50" in msg and "missing keys" in msg and "layer1.0.conv3.weight" in msg


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(models.CheckpointError, match="not a readable PyTorch file"):
        models.load(str(truncated), "resnet18")
    foreign = tmp_path / "foreign.pt"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(models.CheckpointError, match="not a readable PyTorch file"):
        models.load(str(foreign), "resnet18")
    with pytest.raises(models.CheckpointError, match="does not exist"):
        models.load(str(tmp_path / "missing.pt"), "resnet18")


def test_format_mismatch_and_unknown_arch(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    with pytest.raises(models.CheckpointError, match="not in the robustness format"):
        models.load(str(path), "resnet18", "robustness")
    with pytest.raises(models.CheckpointError, match="unknown model arch"):
        models.load(str(path), "resnet_9000")


def test_non_resnet_gives_logits_only(tmp_path):
    net = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    path = tmp_path / "mnv3.pt"
    torch.save(net.state_dict(), path)
    model = models.load(str(path), "mobilenet_v3_small")
    assert model.num_classes == 4 and not model.supports_discovery
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.logits.shape == (1, 4) and out.features is None and out.maps is None


def test_tiny_resnet_round_trip_through_robustness_format(tmp_path):
    torch.manual_seed(0)
    net = models.TinyResNet(num_classes=3).eval()
    uri = f"file://{tmp_path}/tiny.pt"
    models.save_checkpoint(net, uri, "robustness", epoch=4)
    raw = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert raw["epoch"] == 4 and set(raw) == {"model", "epoch", "optimizer", "schedule"}
    assert all(k.startswith(("module.model.", "module.attacker.", "module.normalizer.")) for k in raw["model"])
    model = models.load(uri, "tiny_resnet", "robustness")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.maps.shape == (2, 128, 8, 8), "output stride 8 at 64 px"
    assert torch.allclose(out.logits, net((x - MEAN) / STD), atol=1e-5)
