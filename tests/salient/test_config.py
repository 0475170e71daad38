import os
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

from salient import cli, config, preflight


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data" / "train"
    for wnid in ("n0001", "n0002"):
        (root / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / wnid / "a.JPEG")
    return root


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), path)
    return path


def _write(tmp_path, text):
    path = tmp_path / "conf" / "salient.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def test_defaults_and_relative_paths_follow_the_file(tmp_path, dataset, checkpoint):
    path = _write(tmp_path, "dataset: {root: ../data/train}\nmodel: {checkpoint: ../r18.pt, arch: resnet18}\noutput: ../out\n")
    cfg = config.load(path)
    assert cfg.dataset.root == str(dataset)
    assert cfg.model.checkpoint == str(checkpoint) and cfg.model.format == "auto"
    assert cfg.output == str(tmp_path / "out")
    assert (cfg.preprocess.resize, cfg.preprocess.crop) == (256, 224)
    assert cfg.compute.shard_size == 5000 and cfg.compute.precision == "fp32" and cfg.compute.workers is None
    preflight.check(cfg, ["dataset", "model", "output"])


def test_overrides_are_typed_and_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, ["compute.batch_size=32", "compute.precision=bf16", "output=out", "dataset.root=s3://b/train"])
    assert cfg.compute.batch_size == 32 and cfg.compute.precision == "bf16"
    assert cfg.output == str(tmp_path / "out")
    assert cfg.dataset.root == "s3://b/train"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("compute: {batch_sise: 3}\n", "compute.batch_sise = 3: unknown key; known keys here: workers"),
        ("compute: {batch_size: many}\n", "compute.batch_size = 'many': Input should be a valid integer"),
        ("compute: {precision: fp8}\n", "compute.precision = 'fp8': Input should be 'fp32', 'bf16' or 'fp16'"),
        ("compute: {shard_size: 0}\n", "compute.shard_size = 0: Input should be greater than 0"),
        ("preprocess: {resize: 100, crop: 224}\n", "preprocess = {'resize': 100, 'crop': 224}: crop (224) must not exceed resize (100)"),
        ("model: {arch: resnet50}\n", "model.checkpoint: missing"),
        ("datasett: {root: x}\n", "datasett = {'root': 'x'}: unknown key"),
        ("- a\n- b\n", "must hold a mapping of sections"),
        ("dataset: {root: [unclosed\n", "is not valid YAML"),
    ],
)
def test_validation_messages_name_key_and_value(tmp_path, text, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(_write(tmp_path, text))
    assert any(expected in line for line in err.value.lines), err.value.lines


def test_checks_report_each_failure_on_one_line(tmp_path, checkpoint):
    empty = tmp_path / "empty"
    (empty / "n0001").mkdir(parents=True)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    cfg = config.load(None, [f"dataset.root={empty}", f"model.checkpoint={bad_ckpt}", f"output={blocker}/out", "model.arch=resnet18"])
    with pytest.raises(config.ConfigError) as err:
        preflight.check(cfg, ["dataset", "model", "output"])
    lines = err.value.lines
    assert len(lines) == 3
    assert lines[0].startswith(f"dataset.root = '{empty}': class folders hold no images")
    assert lines[1].startswith(f"model.checkpoint = '{bad_ckpt}': checkpoint")
    assert lines[2].startswith(f"output = '{blocker}/out': not writable")


def test_missing_root_and_wrong_arch(tmp_path, checkpoint):
    cfg = config.load(None, [f"dataset.root={tmp_path}/nope", f"model.checkpoint={checkpoint}", "model.arch=resnet50"])
    with pytest.raises(config.ConfigError) as err:
        preflight.check(cfg, ["dataset", "model"])
    assert err.value.lines[0] == (
        f"dataset.root = '{tmp_path}/nope': does not exist or is not a directory; "
        "point it at an ImageFolder root (<root>/<wnid>/<image>)"
    )
    assert err.value.lines[1].startswith(f"model.checkpoint = '{checkpoint}': checkpoint does not fit model.arch 'resnet50'")


def test_only_the_sections_a_command_uses_are_checked(tmp_path):
    cfg = config.load(None, [f"output={tmp_path}/out", f"dataset.root={tmp_path}/nope"])
    preflight.check(cfg, ["output"])
    with pytest.raises(config.ConfigError, match="model: missing; this command needs model.checkpoint"):
        preflight.check(cfg, ["output", "model"])


def test_cli_validate_exit_codes(tmp_path, dataset, checkpoint, capsys):
    good = _write(tmp_path, f"dataset: {{root: {dataset}}}\nmodel: {{checkpoint: {checkpoint}, arch: resnet18}}\noutput: {tmp_path}/o\n")
    assert cli.main(["validate", good]) == 0
    assert "config ok: checked dataset, model, output" in capsys.readouterr().out
    assert cli.main(["validate", good, "--set", "model.arch=resnet34"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"salient: config error: model.checkpoint = '{checkpoint}': checkpoint does not fit")


def test_console_script_exits_2(tmp_path):
    path = _write(tmp_path, "compute: {workers: -1}\n")
    exe = os.path.join(os.path.dirname(sys.executable), "salient")
    proc = subprocess.run([exe, "validate", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "salient: config error: compute.workers = -1: Input should be greater than 0"
