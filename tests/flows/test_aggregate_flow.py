import numpy as np
import pytest

from salient import activations, cli, models, storage
from salient.stage import local_run
from salient.stages.activations import Activations
from tests.helpers import current_build, read_activation_rows, run_stages


def test_aggregate_flow_matches_brute_force_on_real_activations(activation_world, ray_session, prefect_server, capsys):
    cfg, _ = activation_world
    cfg.aggregate.grouping = "label"
    cfg.aggregate.features_per_class = 2
    cfg.aggregate.top_k_class = 3
    cfg.aggregate.top_k_neuron = 4
    summary = run_stages(cfg, "activations", "aggregate")

    out = current_build(cfg.output)
    rows = read_activation_rows(out).sort_by("image_id")
    ids = rows.column("image_id").to_numpy()
    labels = rows.column("label").to_numpy()
    feats = np.asarray(rows.column("features").to_pylist(), dtype=np.float64)
    w = models.load(cfg.model.checkpoint, "tiny_resnet").fc_weight.numpy().astype(np.float64)
    expected_pairs, expected_top = [], []
    for c in range(3):
        members = np.flatnonzero(labels == c)
        fi = w[c] * feats[members].mean(axis=0)
        for rank, j in enumerate(sorted(range(feats.shape[1]), key=lambda j: (-fi[j], j))[:2], start=1):
            expected_pairs.append((c, j, rank))
            best = sorted(members, key=lambda i: (-feats[i, j], ids[i]))[:3]
            expected_top += [(c, j, r, int(ids[i])) for r, i in enumerate(best, start=1)]
    pairs = storage.read_parquet(f"{out}/pairs.parquet").to_pylist()
    assert [(p["class_index"], p["feature_index"], p["feature_rank"]) for p in pairs] == expected_pairs
    top = storage.read_parquet(f"{out}/topk/class.parquet").to_pylist()
    assert [(t["class_index"], t["feature_index"], t["rank"], t["image_id"]) for t in top] == expected_top
    assert summary["images"] == 24 and summary["pairs"] == 6

    storage.remove(activations.stats_uri(out, 2))
    capsys.readouterr()
    assert cli.main(["aggregate", _config_file(cfg)]) == 2
    assert "1 activation shards are missing or were computed from other inputs (part-00002" in capsys.readouterr().err


def _config_file(cfg):
    from salient.config import to_yaml

    path = f"{cfg.output}/../salient.yaml"
    with open(path, "w") as fh:
        fh.write(to_yaml(cfg))
    return path


def test_missing_shard_is_named(activation_world):
    from salient import plan

    cfg, _ = activation_world
    run = local_run(cfg)
    plan.write_plan(cfg.dataset.root, run.build, cfg.compute.shard_size)
    with pytest.raises(ValueError, match=r"6 activation shards are missing .*part-00000, part-00001"):
        Activations().committed(run)
