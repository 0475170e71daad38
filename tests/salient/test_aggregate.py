import json
import random

import numpy as np
import pyarrow as pa
import pytest

from salient import aggregate, plan, storage
from salient.config import AggregateConfig
from salient.metadata import ClassInfo

C, D = 4, 6
SHARD_SIZES = [10, 3, 17, 7]  # unequal on purpose
WNIDS = [f"n{c:08d}" for c in range(C)]


def _world(seed: int = 0):
    """Activations with deliberate ties; class 3 is never predicted."""
    rng = np.random.default_rng(seed)
    n = sum(SHARD_SIZES)
    feats = rng.choice(np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.25], np.float16), size=(n, D))
    feats[:, 4] = feats[:, 1]  # identical columns -> tied importance when weights tie too
    labels = rng.integers(0, C, n)
    preds = rng.integers(0, C - 1, n)
    w = rng.choice(np.array([-1.0, 0.5, 1.0, 2.0], np.float32), size=(C, D))
    w[:, 4] = w[:, 1]
    return feats, labels, preds, w


def _write(tmp_path, feats, labels, preds):
    out = str(tmp_path / "out")
    n = len(labels)
    relpaths = [f"{WNIDS[labels[i]]}/img_{i:03d}.JPEG" for i in range(n)]
    shard = np.repeat(np.arange(len(SHARD_SIZES)), SHARD_SIZES)
    plan_table = pa.table({
        "relpath": relpaths, "image_id": pa.array(range(n), pa.int64()), "label": pa.array(labels, pa.int32()),
        "wnid": [WNIDS[c] for c in labels], "bytes": pa.array([100] * n, pa.int64()), "shard": pa.array(shard, pa.int32()),
    })
    storage.write_parquet(plan.plan_uri(out), plan_table, "fp", {"classes": json.dumps(WNIDS)})
    uris = []
    for s in range(len(SHARD_SIZES)):
        rows = np.flatnonzero(shard == s)
        table = pa.table({
            "relpath": [relpaths[i] for i in rows], "image_id": pa.array(rows, pa.int64()),
            "label": pa.array(labels[rows], pa.int32()), "pred": pa.array(preds[rows], pa.int32()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(feats[rows].ravel(), pa.float16()), D),
        })
        uri = storage.join(out, "activations", f"part-{s:05d}.parquet")
        storage.write_parquet(uri, table, "fp")
        uris.append(uri)
    return out, uris, relpaths


def _brute_force(feats, labels, preds, w, grouping, F, K, KN):
    groups = preds if grouping == "prediction" else labels
    f64 = feats.astype(np.float64)
    ids = np.arange(len(labels))
    means, fis, pairs, topk_class = {}, {}, [], []
    for c in range(C):
        members = ids[groups == c]
        if not len(members):
            continue
        means[c] = f64[members].mean(axis=0)
        fis[c] = w[c].astype(np.float64) * means[c]
        ranked = sorted(range(D), key=lambda j: (-fis[c][j], j))[:F]
        for rank, j in enumerate(ranked, start=1):
            pairs.append((c, j, rank))
            best = sorted(members, key=lambda i: (-f64[i, j], i))[:K]
            topk_class += [(c, j, rank, r, int(i), float(feats[i, j])) for r, i in enumerate(best, start=1)]
    topk_neuron = []
    for j in range(D):
        best = sorted(ids, key=lambda i: (-f64[i, j], i))[:KN]
        topk_neuron += [(j, r, int(i), float(feats[i, j])) for r, i in enumerate(best, start=1)]
    return means, fis, pairs, topk_class, topk_neuron


@pytest.mark.parametrize("grouping", ["prediction", "label"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_tables_equal_brute_force(tmp_path, grouping, shuffle):
    feats, labels, preds, w = _world()
    out, uris, relpaths = _write(tmp_path, feats, labels, preds)
    if shuffle:  # merging is order-free
        random.Random(3).shuffle(uris)
    cfg = AggregateConfig(grouping=grouping, features_per_class=3, top_k_class=4, top_k_neuron=5)
    meta = [ClassInfo(c, WNIDS[c], f"class {c}", "", "") for c in range(C)]
    summary = aggregate.run(aggregate.AggregateInputs(out, uris, w, WNIDS, "fp-agg", meta), cfg)
    means, fis, pairs, topk_class, topk_neuron = _brute_force(feats, labels, preds, w, grouping, 3, 4, 5)

    classes = storage.read_parquet(f"{out}/classes.parquet").to_pylist()
    assert [r["n_images"] for r in classes] == np.bincount(labels, minlength=C).tolist()
    assert [r["n_predicted"] for r in classes] == np.bincount(preds, minlength=C).tolist()
    assert [r["name"] for r in classes] == [f"class {c}" for c in range(C)]
    empty = [r["class_index"] for r in classes if r["reason"]]
    assert empty == [c for c in range(C) if c not in means]
    if grouping == "prediction":
        assert empty == [3] and classes[3]["reason"] == "no images predicted as this class"

    imp = storage.read_parquet(f"{out}/importance.parquet").to_pylist()
    assert len(imp) == C * D
    for row in imp:
        c, j = row["class_index"], row["feature_index"]
        if c in means:
            assert row["mean_activation"] == pytest.approx(means[c][j], rel=1e-12, abs=1e-12)
            assert row["importance"] == pytest.approx(fis[c][j], rel=1e-12, abs=1e-12)
        else:
            assert row["importance"] is None and row["mean_activation"] is None

    got_pairs = [(r["class_index"], r["feature_index"], r["feature_rank"]) for r in storage.read_parquet(f"{out}/pairs.parquet").to_pylist()]
    assert got_pairs == pairs
    assert any(j in (1, 4) for _, j, _ in pairs), "the tied features 1 and 4 are exercised"
    for c, j, _ in pairs:
        if j == 4:
            assert (c, 1) in [(cc, jj) for cc, jj, _ in pairs], "ties go to the lower feature_index first"

    tc = storage.read_parquet(f"{out}/topk/class.parquet").to_pylist()
    assert [(r["class_index"], r["feature_index"], r["feature_rank"], r["rank"], r["image_id"], r["activation"]) for r in tc] == topk_class
    assert all(r["relpath"] == relpaths[r["image_id"]] and r["label"] == labels[r["image_id"]] for r in tc)
    assert all(r["wnid"] == WNIDS[r["class_index"]] for r in tc)

    tn = storage.read_parquet(f"{out}/topk/neuron.parquet").to_pylist()
    assert [(r["feature_index"], r["rank"], r["image_id"], r["activation"]) for r in tn] == topk_neuron
    assert summary["pairs"] == len(pairs) and summary["images"] == len(labels)
    assert storage.parquet_metadata(f"{out}/pairs.parquet")["fingerprint"] == "fp-agg"


def test_sort_keys_round_trip_and_order():
    acts = np.array([2.0, -1.0, 0.0, -0.0, 65504.0, 2.0, np.inf], np.float16)
    ids = np.array([5, 1, 2, 3, 4, 0, 6])
    keys = aggregate.sort_keys(acts, ids)
    back_acts, back_ids = aggregate.decode_keys(keys)
    assert back_ids.tolist() == ids.tolist()
    assert np.array_equal(back_acts, acts.astype(np.float32))
    order = np.argsort(-keys, kind="stable")
    expected = sorted(range(len(acts)), key=lambda i: (-float(acts[i]), ids[i]))
    assert [int(ids[i]) for i in order] == [int(ids[i]) for i in expected]


def test_class_count_mismatch_and_no_shards(tmp_path):
    feats, labels, preds, w = _world()
    out, uris, _ = _write(tmp_path, feats, labels, preds)
    with pytest.raises(ValueError, match="4 class folders but the model has 3 classes"):
        aggregate.run(aggregate.AggregateInputs(out, uris, w[:3], WNIDS, "fp"), AggregateConfig())
    with pytest.raises(ValueError, match="no activation shards"):
        aggregate.run(aggregate.AggregateInputs(out, [], w, WNIDS, "fp"), AggregateConfig())
