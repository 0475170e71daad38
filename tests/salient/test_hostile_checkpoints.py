"""Hostile and broken checkpoints: code-running pickles in both file formats, TorchScript, other
zip archives, empty and truncated files, and weights that do not fit the architecture. Each is
refused with a message that says what is wrong and what to do, and nothing in it runs."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torchvision

from salient import config, models, preflight


class _Payload:
    """Unpickling this calls ``os.mkdir(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _torch_zip(data_pkl: bytes) -> bytes:
    """A file laid out as torch.save writes it, holding only ``data_pkl`` as its pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["zip-handmade", "legacy-torch-save"])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, layout):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    if layout == "zip-handmade":
        path.write_bytes(_torch_zip(pickle.dumps({"model": _Payload(str(marker))}, protocol=2)))
    else:
        torch.save({"model": _Payload(str(marker))}, path, _use_new_zipfile_serialization=False)

    with pytest.raises(models.CheckpointError) as err:
        models.load(str(path), "resnet18")
    assert not marker.exists(), "the payload ran"
    msg = str(err.value)
    assert "pickled objects other than tensors" in msg and "nothing in it was run" in msg
    assert "torch.save(model.state_dict(), path)" in msg

    # the same file does run code when unpickled without weights_only: the payload is live
    control = tmp_path / "control-ran"
    path.write_bytes(path.read_bytes().replace(str(marker).encode(), str(control).encode()))
    assert len(str(control)) == len(str(marker))
    torch.load(path, weights_only=False)
    assert control.is_dir() and not marker.exists()


def test_torchscript_archive_is_refused_with_a_resave_hint(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torchvision.models.resnet18(num_classes=3).eval()), str(path))
    with pytest.raises(models.CheckpointError, match=r"TorchScript archive .*torch\.save\(model\.state_dict\(\), path\)"):
        models.load(str(path), "resnet18")


def test_zip_of_something_else_names_what_it_holds(tmp_path):
    path = tmp_path / "arrays.pt"
    with open(path, "wb") as fh:
        np.savez(fh, weights=np.zeros(3), bias=np.ones(2))
    with pytest.raises(models.CheckpointError) as err:
        models.load(str(path), "resnet18")
    msg = str(err.value)
    assert "zip archive of something else" in msg and "weights.npy" in msg and "torch.save" in msg


def test_empty_and_truncated_legacy_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(models.CheckpointError, match=r"empty \(0 bytes\); copy it again"):
        models.load(str(empty), "resnet18")
    legacy = tmp_path / "legacy.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert models.load(str(legacy), "resnet18").num_classes == 3
    cut = tmp_path / "cut.pt"
    cut.write_bytes(legacy.read_bytes()[:4096])
    with pytest.raises(models.CheckpointError, match=r"may be truncated \(4,096 bytes here\).*copy it again"):
        models.load(str(cut), "resnet18")


def test_weights_that_do_not_fit_the_arch(tmp_path):
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    sd["fc.bias"] = torch.zeros(5)  # the classifier disagrees with itself about the number of classes
    path = tmp_path / "mismatch.pt"
    torch.save(sd, path)
    with pytest.raises(models.CheckpointError) as err:
        models.load(str(path), "resnet18")
    assert "keys of the wrong shape" in str(err.value) and "fc.bias (5,) vs (10,)" in str(err.value)

    tiny = tmp_path / "tiny.pt"
    torch.save(models.TinyResNet(num_classes=3).state_dict(), tiny)
    with pytest.raises(models.CheckpointError, match=r"does not fit model.arch 'resnet18'.*check model.arch"):
        models.load(str(tiny), "resnet18")

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(models.CheckpointError, match="holds a Tensor, not a state dict"):
        models.load(str(tensor), "resnet18")


def test_a_bad_checkpoint_fails_the_preflight_check_on_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "payload-ran"
    path.write_bytes(_torch_zip(pickle.dumps(_Payload(str(marker)), protocol=2)))
    cfg = config.load(None, [f"model.checkpoint={path}", "model.arch=resnet18"])
    with pytest.raises(config.ConfigError) as err:
        preflight.check(cfg, ["model"])
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith(f"model.checkpoint = '{path}': checkpoint")
    assert not marker.exists()


class _Call:
    """Unpickling this calls ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "payload, name",
    [
        (_Call(os.system, "true"), f"GLOBAL {os.system.__module__}.system"),  # posix.system on Linux
        (_Call(eval, "1 + 1"), "GLOBAL eval"),
        (np.array([1, "one"], dtype=object), "numpy.dtypes.ObjectDType"),  # numpy numbers load, objects do not
    ],
)
def test_a_refusal_names_what_was_refused_on_one_clean_line(tmp_path, payload, name):
    path = tmp_path / "refused.pt"
    torch.save({"model": torchvision.models.resnet18(num_classes=3).state_dict(), "extra": payload}, path)
    with pytest.raises(models.CheckpointError) as err:
        models.load(str(path), "resnet18")
    msg = str(err.value)
    assert name in msg and "nothing in it was run" in msg
    assert "\n" not in msg and "\x1b" not in msg
    assert "Please use `torch.serialization" not in msg and "weights_only` set to `False" not in msg, "no advice to lower the guard"


def test_escape_codes_in_a_refused_name_are_not_passed_to_the_terminal(tmp_path):
    marker = tmp_path / "payload-ran"
    # protocol 0: GLOBAL names the module and attribute as text lines, so a name can carry anything
    evil = f"c\x1b[2J\x1b]0;owned\x07os\nmkdir\n(V{marker}\ntR.".encode()
    path = tmp_path / "escapes.pt"
    path.write_bytes(_torch_zip(evil))
    with pytest.raises(models.CheckpointError) as err:
        models.load(str(path), "resnet18")
    msg = str(err.value)
    assert not marker.exists()
    assert "\x1b" not in msg and "\x07" not in msg and "\n" not in msg
    assert "Unsupported global: GLOBAL" in msg and "os.mkdir" in msg
