"""Checkpoints as released: robustness checkpoints carrying numpy numbers beside the weights (as
written with numpy 1 and numpy 2), and robustness checkpoints whose own normaliser is not ImageNet's,
which the model then normalises with."""

import io
import zipfile

import numpy as np
import pytest
import torch

from salient import models
from salient.config import ComputeConfig
from salient.inference import Inference

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OTHER = ((0.5, 0.25, 0.75), (0.125, 0.5, 0.25))  # exact in float32: the by-hand normalisation is exact too


@pytest.fixture(scope="module")
def net() -> models.TinyResNet:
    torch.manual_seed(0)
    net = models.TinyResNet(num_classes=4)
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _robustness(net: torch.nn.Module, own=IMAGENET, attack=IMAGENET, **extras) -> dict:
    """A checkpoint laid out as the robustness library writes it, built by hand."""
    sd = net.state_dict()
    model = {f"module.model.{k}": v for k, v in sd.items()} | {f"module.attacker.model.{k}": v for k, v in sd.items()}
    for prefix, (mean, std) in (("module.normalizer.", own), ("module.attacker.normalize.", attack)):
        model[prefix + "new_mean"] = torch.tensor(mean).view(3, 1, 1)
        model[prefix + "new_std"] = torch.tensor(std).view(3, 1, 1)
    return {"model": model, "epoch": 90, "schedule": None, **extras}


def _as_numpy1(data: bytes) -> bytes:
    """A torch.save file rewritten as numpy 1 pickles numpy objects (reconstructors under ``numpy.core``).
    torch.save writes pickle protocol 2, whose GLOBAL opcode names a global as text lines."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            blob = src.read(name)
            if name.endswith("/data.pkl"):
                assert b"cnumpy._core.multiarray\n" in blob
                blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            dst.writestr(name, blob)
    return out.getvalue()


def _features(net: models.TinyResNet, x: torch.Tensor) -> torch.Tensor:
    """The global average of layer4 of the plain network, computed layer by layer."""
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(h)))).mean(dim=(2, 3))


@pytest.mark.parametrize("numpy_names", ["numpy 2", "numpy 1"])
def test_a_robustness_checkpoint_with_numpy_numbers_loads(tmp_path, net, numpy_names):
    extras = {
        "nat_prec1": np.float64(76.13), "adv_prec1": np.float32(35.2), "step": np.int64(450_000),
        "best": np.bool_(True), "history": np.array([[1.5, 2.5], [3.0, 4.0]], dtype=np.float64),
        "counts": np.arange(3, dtype=np.int32),
    }
    buf = io.BytesIO()
    torch.save(_robustness(net, **extras), buf)
    data = buf.getvalue() if numpy_names == "numpy 2" else _as_numpy1(buf.getvalue())
    path = tmp_path / "imagenet_l2_3_0.pt"
    path.write_bytes(data)

    raw = models.read_checkpoint(str(path))
    assert type(raw["nat_prec1"]) is np.float64 and raw["nat_prec1"] == 76.13
    assert type(raw["step"]) is np.int64 and raw["step"] == 450_000 and raw["best"] is np.True_
    np.testing.assert_array_equal(raw["history"], [[1.5, 2.5], [3.0, 4.0]])
    assert raw["counts"].dtype == np.int32 and raw["counts"].tolist() == [0, 1, 2]
    model = models.load(str(path), "tiny_resnet", "robustness")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, net((x - mean) / std))
    # the numpy allowlist is the load's only, not the process's
    assert np.dtype not in torch.serialization.get_safe_globals()


def test_the_checkpoints_own_normaliser_is_used(tmp_path, net):
    path = tmp_path / "other-stats.pt"
    torch.save(_robustness(net, own=OTHER, attack=OTHER), path)
    model = models.load(str(path), "tiny_resnet")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in OTHER)
    by_hand = (x - mean) / std
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.logits, net(by_hand))
        torch.testing.assert_close(out.features, _features(net, by_hand))
        imagenet = (x - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
        assert (out.features - _features(net, imagenet)).abs().max() > 1e-2, "the statistics make a difference here"

    # every model stage's input goes through Inference: uint8 pixels are normalised the same way
    inf = Inference.load(str(path), "tiny_resnet", "auto", ComputeConfig(), device="cpu", need_discovery=True)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    got = inf(pixels)
    with torch.no_grad():
        want = _features(net, (pixels.float() / 255 - mean) / std)
    torch.testing.assert_close(got.features, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert inf.mean.flatten().tolist() == list(OTHER[0]) and inf.std.flatten().tolist() == list(OTHER[1])


def test_the_statistics_survive_a_save_and_load(tmp_path, net):
    model = models.SalientModel(net, "tiny_resnet", *OTHER)
    uri = str(tmp_path / "saved.pt")
    models.save_checkpoint(model, uri, "robustness")
    again = models.load(uri, "tiny_resnet")
    assert again.mean.flatten().tolist() == list(OTHER[0]) and again.std.flatten().tolist() == list(OTHER[1])
    with pytest.raises(ValueError, match="robustness format"):
        models.save_checkpoint(model, str(tmp_path / "plain.pt"), "torchvision")


def test_a_checkpoint_without_a_normaliser_uses_imagenet_statistics(tmp_path, net):
    obj = _robustness(net)
    obj["model"] = {k: v for k, v in obj["model"].items() if "normal" not in k}
    path = tmp_path / "bare.pt"
    torch.save(obj, path)
    model = models.load(str(path), "tiny_resnet")
    assert torch.equal(model.mean.flatten(), torch.tensor(IMAGENET[0])) and torch.equal(model.std.flatten(), torch.tensor(IMAGENET[1]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attack": OTHER}, r"two normalisers that disagree .*make them equal, or delete both"),
        ({"own": (IMAGENET[0], (0.229, 0.0, 0.225))}, r"not finite with a positive std .*delete the normaliser's keys"),
        ({"own": (IMAGENET[0], (0.229, float("nan"), 0.225))}, r"not finite with a positive std"),
    ],
)
def test_an_unusable_normaliser_is_refused(tmp_path, net, change, message):
    path = tmp_path / "bad-stats.pt"
    torch.save(_robustness(net, **change), path)
    with pytest.raises(models.CheckpointError, match=message):
        models.load(str(path), "tiny_resnet")


def test_a_normaliser_with_the_wrong_number_of_channels_is_refused(tmp_path, net):
    obj = _robustness(net)
    obj["model"]["module.normalizer.new_mean"] = torch.zeros(1, 1, 1)
    path = tmp_path / "grey.pt"
    torch.save(obj, path)
    with pytest.raises(models.CheckpointError, match=r"new_mean/new_std have 1/3 values, not one per RGB channel"):
        models.load(str(path), "tiny_resnet")
