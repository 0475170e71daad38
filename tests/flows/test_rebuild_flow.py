import os

import torch
import torchvision
import yaml

from salient import cli, config, preflight, stages
from tests.helpers import current_build, make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_example_imagenet_config_validates_with_fixture_paths(tmp_path, capsys):
    """The shipped ImageNet config, its S3 paths swapped for local fixtures, passes every stage's checks."""
    make_image_folder(tmp_path / "train", classes=2, per_class=2)
    ckpt = tmp_path / "imagenet_l2_3_0.pt"
    sd = torchvision.models.resnet50(num_classes=2).state_dict()
    torch.save({"model": {f"module.model.{k}": v for k, v in sd.items()}, "epoch": 90, "optimizer": {}, "schedule": None}, ckpt)
    answers = tmp_path / "answers.csv"
    answers.write_text("WorkerId,Input.wordnet_id,Input.class_index,Input.feature_index,Input.feature_rank,Answer.main,Answer.confidence,Answer.reasons\n")
    models = yaml.safe_dump([{"name": "robust", "arch": "resnet50", "format": "robustness", "checkpoint": str(ckpt)}], default_flow_style=True).strip()
    overrides = [
        f"dataset.root={tmp_path / 'train'}", f"dataset.class_metadata={ROOT}/../shared/data/imagenet_class_metadata.csv",
        f"model.checkpoint={ckpt}", f"output={tmp_path / 'out'}", "compute.ray_address=null",
        f"annotations.answers=[{answers}]", f"evaluate.models={models}",
    ]
    path = os.path.join(ROOT, "configs", "imagenet-s3.yaml")
    cfg = config.load(path, overrides)
    assert (cfg.model.format, cfg.aggregate.features_per_class, cfg.aggregate.top_k_class, cfg.compute.gpus_per_worker) == ("robustness", 5, 65, 1)
    preflight.for_stages(cfg, stages.STAGES)
    assert cli.main(["validate", path, *sum((["--set", o] for o in overrides), [])]) == 0
    assert "config ok" in capsys.readouterr().out


def test_prefect_yaml_deploys_the_rebuild_flow():
    spec = yaml.safe_load(open(os.path.join(ROOT, "prefect.yaml")))
    (deployment,) = spec["deployments"]
    module, func = deployment["entrypoint"].split(":")
    from importlib import import_module

    flow = getattr(import_module(module.removesuffix(".py").replace("/", ".")), func)
    assert flow.name == "salient-rebuild-from-file"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert os.path.exists(os.path.join(ROOT, deployment["parameters"]["config_uri"]))
    assert deployment["schedules"][0]["cron"] and deployment["work_pool"]["name"]


def test_run_subset_of_stages(activation_world, ray_session, prefect_server, capsys):
    cfg, _ = activation_world
    path = os.path.join(os.path.dirname(cfg.output), "salient.yaml")
    with open(path, "w") as fh:
        fh.write(config.to_yaml(cfg))
    assert cli.main(["run", path, "--stages", "activations,aggregate"]) == 0
    out = capsys.readouterr().out
    assert "activations: 24 of 25 images in 6 shards" in out and "pairs over 3 classes from 24 images" in out
    assert "not published" in out and not os.path.exists(os.path.join(cfg.output, "latest"))
    assert os.path.exists(os.path.join(current_build(cfg.output), "pairs.parquet"))
    assert cli.main(["run", path, "--stages", "activations,bogus"]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def test_serve_needs_a_server_and_serves_on_one(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    bin_dir = os.path.dirname(sys.executable)
    cfg_path = tmp_path / "salient.yaml"
    cfg_path.write_text(f"output: {tmp_path / 'out'}\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    refused = subprocess.run([f"{bin_dir}/salient", "serve", str(cfg_path), "--cron", "0 3 * * 0"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "prefect server start" in refused.stderr

    port = _free_port()
    server = subprocess.Popen(
        [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Prefect server did not start"
                time.sleep(1)
        serve = subprocess.Popen(
            [f"{bin_dir}/salient", "serve", str(cfg_path), "--cron", "0 3 * * 0"],
            env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            seen = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                line = serve.stdout.readline()
                seen.append(line)
                if "is being served" in line or not line:
                    break
            assert any("'salient-rebuild-from-file' is being served" in x for x in seen), "".join(seen)
        finally:
            _stop(serve)
    finally:
        _stop(server)
