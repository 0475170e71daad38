"""A build where every planned image fails is refused, naming why; a partial failure only warns."""

import json
import logging

import pytest

from salient import builds, config, stages, storage
from salient.errors import InputError
from salient.stage import execute, local_run


def _cfg(cfg: config.Config, *overrides: str) -> config.Config:
    return config.load(None, [
        f"dataset.root={cfg.dataset.root}", f"model.checkpoint={cfg.model.checkpoint}", "model.arch=tiny_resnet",
        "preprocess.resize=32", "preprocess.crop=32", f"output={cfg.output}", "compute.shard_size=5", "compute.batch_size=4",
        *overrides,
    ])


@pytest.mark.parametrize("override", ["preprocess.max_pixels=1", "preprocess.resize=13000"])
def test_every_image_failing_is_an_input_error_naming_the_reason_and_the_failure_list(activation_world, override):
    cfg, rels = activation_world
    act = stages.BY_NAME["activations"]
    run = local_run(_cfg(cfg, override), [act])
    with pytest.raises(InputError) as err:
        execute(act, run)
    message = str(err.value)
    assert len(err.value.lines) == 1
    assert f"all {len(rels)} planned images failed" in message
    # 24 images are refused for their size, the zero-byte file for being empty: the size wins.
    assert "(24 images)" in message and "preprocess.max_pixels" in message
    first_list = storage.join(run.build, "activations/part-00000.json")
    assert first_list in message and "run again" in message
    listed = json.load(open(first_list))["failures"]
    assert listed and all(f["relpath"] in rels for f in listed)


def test_some_images_failing_is_a_warning(activation_world, caplog):
    cfg, rels = activation_world
    act = stages.BY_NAME["activations"]
    with caplog.at_level(logging.WARNING):
        summary = execute(act, local_run(cfg, [act]))
    assert summary["failed"] == 1 and summary["images"] == len(rels) - 1
    assert any("1 images failed" in r.getMessage() for r in caplog.records)


def test_a_run_where_every_image_fails_publishes_nothing_and_exits_2(tmp_path, prefect_server, capsys):
    from salient import cli
    from tests.helpers import tiny_pipeline

    cfg = tiny_pipeline(tmp_path)
    path = tmp_path / "salient.yaml"
    path.write_text(config.to_yaml(cfg))
    assert cli.main(["run", str(path), "--set", "preprocess.max_pixels=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("salient: error: all 24 planned images failed, so nothing is published"), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert builds.read_pointer(cfg.output, "latest") is None
