"""Hostile and broken configuration values: unknown keys at any depth, yes/no words where numbers
belong, names that would leave their folder, malformed Ray addresses, out-of-range limits. Each is
refused when the config is loaded, before any compute, on one line naming the key and its value,
as are YAML aliases, deep nesting, duplicate keys, non-finite numbers, blank strings and an output
inside the dataset; no message shows more than a few hundred characters of a value."""

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
    reason = "must not be blank" if not name else "must be usable as a file name"
    assert len(lines) == 1 and lines[0].startswith(f"evaluate.models.0.name = {name!r}: {reason}")


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


def file_error(tmp_path, text: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    return err.value.lines


def test_a_yaml_alias_bomb_is_refused_at_once_on_one_short_line(tmp_path):
    # nine levels of nine aliases: 9**9 (387 million) strings once expanded
    levels = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]" for k in range(1, 9)]
    (line,) = file_error(tmp_path, "\n".join(levels) + "\n")
    assert "aliases (*name) are not allowed" in line and "line 2" in line and len(line) < 300


def test_deep_nesting_is_refused_without_a_traceback(tmp_path):
    (line,) = file_error(tmp_path, "compute: " + "[" * 500 + "]" * 500 + "\n")
    assert f"nested more than {config.MAX_DEPTH} levels deep" in line


def test_duplicate_keys_are_refused_not_overwritten(tmp_path):
    (line,) = file_error(tmp_path, "output: /a\ncompute:\n  batch_size: 4\n  batch_size: 8\n")
    assert "duplicate key 'batch_size' (line 4" in line


@pytest.mark.parametrize("override", ["evaluate.sigmas=[0.25, .nan]", "evaluate.sigmas=[.inf]", "discover.attack_step_size=.nan", "discover.attack_step_size=-.inf"])
def test_non_finite_numbers_are_refused(override):
    (line,) = load_error(override)
    assert line.startswith(override.split("=")[0]) and "finite number" in line


@pytest.mark.parametrize("key", ["output", "dataset.root", "model.checkpoint"])
def test_blank_strings_are_refused_before_they_become_paths(tmp_path, key):
    text = {"output": "output: '   '\n", "dataset.root": "dataset:\n  root: '  '\n", "model.checkpoint": "model:\n  checkpoint: ' '\n"}[key]
    lines = file_error(tmp_path, text)
    assert any(line.startswith(f"{key} = ") and ("blank" in line or "empty" in line) for line in lines), lines
    assert not any(str(tmp_path) in line for line in lines)


def test_error_messages_show_at_most_a_few_hundred_characters_of_a_value(tmp_path):
    lines = file_error(tmp_path, f"dataset:\n  root: /data\n  bogus: {'B' * 100_000}\ncompute: {{x: {'[' * 20}1{']' * 20}}}\n")
    assert len(lines) == 2 and all(len(line) < config.SHOW_CHARS + 200 for line in lines)


@pytest.mark.parametrize("root, output, refused", [
    ("/data/imagenet", "/data/imagenet/salient", True),
    ("/data/imagenet/", "/data/imagenet", True),
    ("/data/imagenet/train", "/data/imagenet", True),
    ("/data/./imagenet", "/data/imagenet/../imagenet/out", True),
    ("s3://bucket/imagenet", "s3://bucket/imagenet/out", True),
    ("/data/imagenet", "/data/imagenet-salient", False),
    ("s3://bucket/imagenet", "s3://bucket/salient", False),
])
def test_the_output_may_not_lie_inside_the_dataset_nor_hold_it(root, output, refused):
    if refused:
        (line,) = load_error(f"dataset.root={root}", f"output={output}")
        assert line.startswith(f"output = '{output}'") and "apart from the dataset" in line
    else:
        assert config.load(None, [f"dataset.root={root}", f"output={output}"]).output == output


@pytest.mark.parametrize("kind", ["device", "folder", "oversize"])
def test_class_metadata_that_is_no_regular_file_or_too_large_is_one_line(tmp_path, monkeypatch, kind):
    from salient import metadata, preflight

    (tmp_path / "data" / "n01").mkdir(parents=True)
    big = tmp_path / "big.csv"
    big.write_text("class_index,wordnet_id,synset\n" + "0,n01,x\n" * 100)
    monkeypatch.setattr(metadata, "MAX_BYTES", 500)
    path = {"device": "/dev/zero", "folder": str(tmp_path / "data"), "oversize": str(big)}[kind]
    cfg = config.load(None, [f"dataset.root={tmp_path / 'data'}", f"dataset.class_metadata={path}", f"output={tmp_path / 'out'}"])
    (line,) = [p for p in preflight.check_dataset(cfg) if p.startswith("dataset.class_metadata")]
    expected = "more than the 500 it may have" if kind == "oversize" else "not a regular file"
    assert line.startswith(f"dataset.class_metadata = {path!r}: ") and expected in line
