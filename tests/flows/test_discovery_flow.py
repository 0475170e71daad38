import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from salient import cli, config, discover, storage, world
from salient.dataset import SalientMasks
from tests.helpers import current_build, make_checkpoint, run_stages


@pytest.fixture
def tiny_world_config(tmp_path):
    world.synthesize(str(tmp_path / "world"), classes=3, per_class=8, size=32, seed=0)
    ckpt = make_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    return config.load(None, [
        f"dataset.root={tmp_path / 'world' / 'train'}", f"dataset.class_metadata={tmp_path / 'world' / 'classes.csv'}",
        f"model.checkpoint={ckpt}", "model.arch=tiny_resnet", "model.format=robustness",
        "preprocess.resize=32", "preprocess.crop=32", f"output={tmp_path / 'out'}",
        "compute.shard_size=10", "compute.gpus_per_worker=0", "aggregate.features_per_class=2",
        "discover.images_per_pair=3", "discover.attack_steps=3", "aggregate.grouping=label",
    ])


def test_discover_simulate_ingest_generalize(tiny_world_config, ray_session, prefect_server):
    cfg = tiny_world_config
    run_stages(cfg, "activations")
    out = current_build(cfg.output)
    run_stages(cfg, "aggregate")
    summary = run_stages(cfg, "discover")
    assert (summary["pairs"], summary["made"], summary["reused"]) == (6, 6, 0)

    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(summary["tasks"]).decode())))
    pairs = storage.read_parquet(f"{out}/pairs.parquet").to_pylist()
    assert [(int(r["class_index"]), int(r["feature_index"])) for r in rows] == [(p["class_index"], p["feature_index"]) for p in pairs]
    assert rows[0]["class_name"] == "circle" and rows[0]["definition"].startswith("a filled circle")
    for r in rows:
        for strip in discover.STRIPS:
            path = os.path.join(out, "discover", r[f"{strip}_url"])
            with Image.open(path) as im:
                assert im.size == (3 * 32 + 2 * 2, 32), "three 32 px tiles, 2 px apart"
        assert len(r["image_ids"].split(";")) == 3
    record = storage.read_json(os.path.join(out, "discover", rows[0]["wnid"], f"feature_{rows[0]['feature_index']}", "assets.json"))
    assert (record["nam_h"], record["nam_w"]) == (4, 4) and len(record["nams"]) == 3
    assert max(max(n) for n in record["nams"]) == pytest.approx(1.0, abs=1e-3), "NAMs are divided by their max"

    again = run_stages(cfg, "discover")
    assert (again["made"], again["reused"]) == (0, 6), "unchanged pairs are not remade"

    sim = run_stages(cfg, "simulate")
    assert sim["answers"] == 6 * 5
    labels = run_stages(cfg, "ingest")
    assert (labels["pairs"], labels["accepted"], labels["rejected"]) == (6, 30, 0)
    assert labels["spurious"] + labels["core"] == 6 and labels["pairs_not_in_build"] == 0
    table = storage.read_parquet(f"{out}/annotations/labels.parquet").to_pylist()
    votes = np.array([[r["votes_main_object"], r["votes_separate_object"], r["votes_background"]] for r in table])
    assert (votes.sum(axis=1) == 5).all()
    assert all((r["label"] == "spurious") == (r["votes_separate_object"] + r["votes_background"] >= 3) for r in table)

    labelled = sum(r["label"] in ("core", "spurious") for r in table)
    cfg.generalize.images_per_pair = 4
    cfg.generalize.masks_per_shard = 5
    gen = run_stages(cfg, "generalize")
    assert gen["masks"] == labelled * 4 and gen["computed_blocks"] == gen["blocks"] == -(-labelled * 4 // 5)
    store = SalientMasks(cfg.output, os.path.basename(out))
    assert len(store) == gen["masks"] and store.array.shape == (gen["masks"], 32, 32)
    assert run_stages(cfg, "generalize")["computed_blocks"] == 0, "a rerun recomputes no mask"

    config_path = os.path.join(os.path.dirname(cfg.output), "salient.yaml")
    with open(config_path, "w") as fh:
        fh.write(config.to_yaml(cfg))
    assert cli.main(["study", "export", config_path]) == 0
    study_rows = list(csv.DictReader(open(os.path.join(out, "study", "tasks.csv"))))
    assert len(study_rows) == labelled and study_rows[0]["a_ranks"] == "1;2;3" and study_rows[0]["b_ranks"] == "4"
    reference = os.path.join(os.path.dirname(cfg.output), "reference")
    assert cli.main(["export", "reference", cfg.output, reference, "--build", os.path.basename(out)]) == 0

    cfg.evaluate.models = [config.EvalModelConfig(name="tiny", arch="tiny_resnet", checkpoint=cfg.model.checkpoint)]
    cfg.evaluate.sigmas = [0.0, 0.5]
    first = run_stages(cfg, "evaluate")
    assert (first["models"], first["sigmas"], first["reused"]) == (1, 2, 0)
    pairs_eval = storage.read_parquet(f"{out}/evaluation/pairs.parquet").to_pylist()
    assert len(pairs_eval) == 2 * labelled
    assert all(r["noisy_acc"] == r["clean_acc"] for r in pairs_eval if r["sigma"] == 0.0)
    assert all(0.0 <= r["clean_acc"] <= 1.0 for r in pairs_eval)
    assert os.path.exists(f"{out}/evaluation/tiny.png")
    again = run_stages(cfg, "evaluate")
    assert again["reused"] == 2 and again["summary"] == first["summary"]
