"""Hostile and broken configuration values: unknown keys at any depth, yes/no words where numbers
belong, names that would leave their folder, malformed Ray addresses, out-of-range limits. Each is
refused when the config is loaded, before any compute, on one line naming the key and its value."""

import pytest
import yaml

from salient import config, storage


def load_error(*overrides: str) -> list[str]:
    with pytest.raises(config.ConfigError) as err:
        config.load(None, list(overrides))
    return err.value.lines


def test_unknown_keys_list_the_keys_known_at_that_depth():
    [line] = load_error("evaluate.models=[{name: a, checkpoint: x.pt, achr: resnet18}]")
    assert line == "evaluate.models.0.achr = 'resnet18': unknown key; known keys here: name, checkpoint, arch, format"
    [line] = load_error("compute.ray_adress=auto")
    assert line.startswith("compute.ray_adress = 'auto': unknown key; known keys here: workers,")
    assert "ray_address" in line and "ray_connect_timeout_s" in line


@pytest.mark.parametrize("override, key", [
    ("compute.workers=yes", "compute.workers = True"),
    ("preprocess.resize=on", "preprocess.resize = True"),
    ("annotations.seed=off", "annotations.seed = False"),
    ("evaluate.sigmas=[0.25, true]", "evaluate.sigmas = [0.25, True]"),
])
def test_yes_no_words_are_not_taken_as_numbers(override, key):
    [line] = load_error(override)
    assert line.startswith(f"{key}: a true/false value")


@pytest.mark.parametrize("override, expected", [
    ("compute.batch_size=[1, 2]", "compute.batch_size = [1, 2]: Input should be a valid integer"),
    ("annotations.answers={a: 1}", "annotations.answers = {'a': 1}: Input should be a valid list"),
    ("compute=3", "compute = 3: Input should be a valid dictionary"),
    ("preprocess.max_pixels=0", "preprocess.max_pixels = 0: Input should be greater than 0"),
    ("preprocess.max_pixels=400000000", "preprocess.max_pixels = 400000000: Input should be less than or equal to 178956970"),
    ("compute.ray_connect_timeout_s=-1", "compute.ray_connect_timeout_s = -1: Input should be greater than 0"),
])
def test_wrong_types_and_ranges(override, expected):
    assert any(line.startswith(expected) for line in load_error(override))


@pytest.mark.parametrize("name", ["../x", "../../etc/cron.d/x", "/etc/passwd", "a/b", "..", ".", ".hidden", "~root",
                                  "C:\\models\\x", "s3://bucket/x", "timm:vit", " padded", "", "nul\x00byte"])
def test_evaluation_names_that_would_leave_their_folder_are_refused(tmp_path, name):
    path = tmp_path / "salient.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"models": [{"name": name, "checkpoint": "x.pt"}]}}))
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    lines = err.value.lines
    assert len(lines) == 1 and lines[0].startswith(f"evaluate.models.0.name = {name!r}: must be usable as a file name")


@pytest.mark.parametrize("name", ["resnet50", "ResNet-50 (robust, ε=3)", "ćlass model 2", "a.b_c+d"])
def test_evaluation_names_that_stay_in_their_folder_are_accepted(name):
    cfg = config.load(None, [f"evaluate.models=[{{name: {name!r}, checkpoint: x.pt}}]"])
    assert cfg.evaluate.models[0].name == name
    assert storage.under("s3://b/out/evaluation", f"{name}.png") == f"s3://b/out/evaluation/{name}.png"


@pytest.mark.parametrize("address", ["auto", "local", "127.0.0.1:6379", "[::1]:6379", "head.svc:6380",
                                     "ray://head-svc.ns.svc.cluster.local:10001", "ray://head-svc"])
def test_ray_addresses_in_every_supported_form(address):
    assert config.load(None, [f"compute.ray_address={address}"]).compute.ray_address == address


@pytest.mark.parametrize("address", ["10.0.0.1", "http://head:8265", "head:99999", "head:port", "ray://head:1/path", ":6379"])
def test_malformed_ray_addresses_are_refused(address):
    [line] = load_error(f"compute.ray_address={address}")
    assert line.startswith(f"compute.ray_address = {address!r}: ")
    assert "host:port" in line and "ray://host:port" in line


def test_a_gpu_request_for_cpu_workers_is_refused():
    [line] = load_error("compute.request_gpus=4", "compute.gpus_per_worker=0")
    assert line.startswith("compute = ") and "request_gpus (4) asks for GPUs but gpus_per_worker is 0" in line
    [line] = load_error("compute.request_gpus=0")
    assert line.startswith("compute.request_gpus = 0: ")
    assert config.load(None, ["compute.request_gpus=4"]).compute.request_gpus == 4
