"""Inputs that used to pass the checks and then crash, hang or leak: file names that are not UTF-8,
a pipe in a class folder, sizes no machine can hold, credentials in a URI, a 5,000-character output,
a symbolic link that leads back to itself. Each is skipped with a reason or refused on one short
line with an input or config exit code (2), never an internal error (1)."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from salient import cli, config
from salient import plan as planmod

NOT_UTF8 = "the file name is not valid UTF-8; rename it"


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="JPEG")


def _touch(directory: Path, name: bytes) -> None:
    os.close(os.open(os.path.join(os.fsencode(directory), name), os.O_CREAT | os.O_WRONLY, 0o644))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture()
def odd_root(tmp_path: Path) -> Path:
    """Two good images, a file and a class folder whose names are not UTF-8, and a pipe named like an image."""
    root = tmp_path / "data"
    _image(root / "n01" / "a.JPEG")
    _image(root / "n02" / "b.JPEG")
    _touch(root / "n01", b"x\xff.JPEG")
    os.mkdir(os.path.join(os.fsencode(root), b"n\xfe03"))
    _touch(root, b"n\xfe03/c.JPEG")
    os.mkfifo(root / "n02" / "pipe.JPEG")
    return root


def test_names_that_are_not_utf8_and_a_pipe_are_skipped_with_a_reason(odd_root, tmp_path):
    listing = planmod.list_images(str(odd_root))
    assert listing.classes == ["n01", "n02"]
    assert listing.table.column("relpath").to_pylist() == ["n01/a.JPEG", "n02/b.JPEG"]
    assert listing.skipped == [
        ("n01/x\\xff.JPEG", NOT_UTF8),
        ("n02/pipe.JPEG", "not a regular file (a link, a pipe, a socket or a device): images must be regular files"),
        ("n\\xfe03/", NOT_UTF8),
    ]
    summary = planmod.write_plan(str(odd_root), str(tmp_path / "build"), shard_size=10)
    assert (summary["images"], summary["skipped"]) == (2, 3)
    entries = planmod.plan_skipped(str(tmp_path / "build"))["entries"]
    assert {e["relpath"] for e in entries} == {"n01/x\\xff.JPEG", "n02/pipe.JPEG", "n\\xfe03/"}
    json.dumps(entries).encode("utf-8")  # storable as text


@pytest.mark.parametrize("key, value", [
    ("compute.batch_size", "1.0e+32"),
    ("compute.shard_size", "1.0e+32"),
    ("aggregate.top_k_class", "4611686018427387904"),
    ("aggregate.top_k_neuron", "1000000000000"),
    ("generalize.masks_per_shard", "1099511627776"),
    ("compute.batch_size", "65537"),
    ("compute.shard_size", "10000001"),
    ("aggregate.top_k_neuron", "10001"),
    ("generalize.masks_per_shard", "65537"),
    ("preprocess.resize", "13378"),
    ("discover.attack_steps", "100001"),
    ("evaluate.trials", "100001"),
    ("compute.scale_up_timeout_s", "1.0e+300"),
    ("evaluate.seed", "-1"),
])
def test_sizes_no_machine_can_hold_are_refused_by_validate(key, value, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output: out\n")
    code, text = _cli(["validate", str(path), "--set", f"{key}={value}"], capsys)
    [line] = text.splitlines()
    assert code == 2 and line.startswith(f"salient: config error: {key} = "), text
    assert "\x1b" not in line and len(line) < 300


@pytest.mark.parametrize("key, value", [
    ("compute.batch_size", 65536), ("compute.shard_size", 10_000_000), ("aggregate.top_k_class", 10_000),
    ("generalize.masks_per_shard", 65536), ("preprocess.resize", 13377), ("evaluate.seed", 2**32 - 1),
])
def test_the_bounds_themselves_are_allowed(key, value):
    cfg = config.load(None, [f"{key}={value}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("key", ["output", "dataset.root", "model.checkpoint", "annotations.answers"])
def test_credentials_in_a_uri_are_refused_and_never_shown(command, key, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"
    path.write_text(
        f"dataset: {{root: {tmp_path}/data}}\nmodel: {{checkpoint: {tmp_path}/m.pt}}\noutput: {tmp_path}/out\n"
    )
    code, text = _cli([command, str(path), "--set", f"{key}={[uri] if key == 'annotations.answers' else uri}"], capsys)
    assert code == 2, text
    assert SECRET not in text and "AKIAEXAMPLE" not in text
    assert "s3://***@bucket/x" in text and "AWS_ACCESS_KEY_ID" in text


def test_credentials_in_the_config_files_uri_are_never_shown(capsys):
    code, text = _cli(["validate", f"s3://AKIAEXAMPLE:{SECRET}@bucket/c.yaml"], capsys)
    assert code == 2 and SECRET not in text and "AKIAEXAMPLE" not in text, text


def test_a_long_output_that_cannot_be_written_gives_a_short_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / "c.yaml"
    path.write_text(f"output: {tmp_path}/file/{'o' * 5000}\n")
    code, text = _cli(["validate", str(path)], capsys)
    [line] = text.splitlines()
    assert code == 2 and ": not writable (" in line
    assert len(line) < 600


def test_a_checkpoint_that_links_to_itself_is_an_input_error(tmp_path, capsys):
    os.symlink("loop.pt", tmp_path / "loop.pt")
    path = tmp_path / "c.yaml"
    path.write_text("model: {checkpoint: loop.pt, arch: tiny_resnet}\n")
    code, text = _cli(["validate", str(path)], capsys)
    [line] = text.splitlines()
    assert code == 2 and "link loop" in line and "resumes" not in line, text


def test_a_config_file_that_links_to_itself_is_an_input_error(tmp_path, capsys):
    os.symlink("c.yaml", tmp_path / "c.yaml")
    code, text = _cli(["validate", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and "link loop" in text and "resumes" not in text, text


def test_a_store_error_says_the_build_resumes_only_when_one_was_running():
    exc = PermissionError(13, "Permission denied", "/out/x")
    assert cli.describe_store_error(exc, building=True).endswith("the build resumes where it stopped")
    assert "resumes" not in cli.describe_store_error(exc, building=False)
    long = OSError(5, "Input/output error", "/out/" + "x" * 5000)
    assert len(cli.describe_store_error(long, building=True)) < 400
    assert cli.describe_store_error(long, building=True).startswith("[Errno 5] Input/output error: '/out/xxx")
    assert "\n" not in cli.describe_store_error(OSError("Parameter validation failed:\nInvalid bucket name"), building=False)
