import os

import torch
import torchvision
import yaml

from salient import cli, config
from tests.helpers import make_image_folder

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
    config.check_stages(cfg, config.STAGES)
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
    assert "activations: 24 of 25 images in 5 shards" in out and "pairs over 3 classes from 24 images" in out
    assert os.path.exists(os.path.join(cfg.output, "pairs.parquet"))
    assert cli.main(["run", path, "--stages", "activations,bogus"]) == 2
