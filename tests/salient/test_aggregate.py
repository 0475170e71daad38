import json
import math
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
    """Plan and activation shards of ``feats``, stored in their own dtype (float16 or float32)."""
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
            "features": pa.FixedSizeListArray.from_arrays(pa.array(feats[rows].ravel(), pa.from_numpy_dtype(feats.dtype)), D),
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


def _candidates(labels, preds, rule, c):
    """The images of class ``c``'s candidate set ``rule``, by brute force."""
    by_label, by_pred = labels == c, preds == c
    keep = {"label": by_label, "prediction": by_pred, "label_and_prediction": by_label & by_pred}[rule]
    return np.flatnonzero(keep)


def _near_ties(seed: int = 0):
    """float32 activations whose float16 roundings collide: values 2**-16 apart around 0.5, 1 and 2
    (float16 steps there are 2**-11 to 2**-9), exact repeats (tied activations), and 0.0 / -0.0."""
    rng = np.random.default_rng(seed)
    n = sum(SHARD_SIZES)
    base = rng.choice(np.array([0.5, 1.0, 2.0], np.float32), size=(n, D))
    feats = (base + rng.integers(0, 6, (n, D)).astype(np.float32) * np.float32(2.0**-16)).astype(np.float32)
    feats[rng.random((n, D)) < 0.1] = np.float32(0.0)
    feats[rng.random((n, D)) < 0.1] = np.float32(-0.0)
    labels = rng.integers(0, C, n)
    preds = np.where(rng.random(n) < 0.5, labels, rng.integers(0, C, n))
    w = rng.choice(np.array([-1.0, 0.5, 1.0, 2.0], np.float32), size=(C, D))
    return feats, labels, preds, w


@pytest.mark.parametrize("grouping", ["prediction", "label"])
def test_float32_rankings_equal_a_float32_brute_force_with_near_ties(tmp_path, grouping):
    feats, labels, preds, w = _near_ties()
    out, uris, _ = _write(tmp_path, feats, labels, preds)
    random.Random(5).shuffle(uris)
    K = 6
    cfg = AggregateConfig(grouping=grouping, features_per_class=3, top_k_class=K, top_k_neuron=7)
    aggregate.run(aggregate.AggregateInputs(out, uris, w, WNIDS, "fp"), cfg)
    ids = np.arange(len(labels))

    def ranked(members, j, k):
        # documented order (docs/design.md §2): activation descending (0.0 equals -0.0), then image_id ascending
        return [(int(i), float(feats[i, j])) for i in sorted(members, key=lambda i: (-float(feats[i, j]), i))[:k]]

    # float16 would have ranked these differently: the test data has ties that only float32 breaks
    as16 = feats.astype(np.float16)
    assert any(
        [i for i, _ in ranked(ids, j, 7)] != sorted(ids, key=lambda i: (-float(as16[i, j]), i))[:7] for j in range(D)
    )

    tn = storage.read_parquet(f"{out}/topk/neuron.parquet").to_pylist()
    assert [(r["feature_index"], r["image_id"], r["activation"]) for r in tn] == [
        (j, i, a) for j in range(D) for i, a in ranked(ids, j, 7)
    ]
    assert storage.read_parquet(f"{out}/topk/neuron.parquet").schema.field("activation").type == pa.float32()

    groups = preds if grouping == "prediction" else labels
    imp = {(r["class_index"], r["feature_index"]): r for r in storage.read_parquet(f"{out}/importance.parquet").to_pylist()}
    expected_pairs = []
    for c in range(C):
        members = ids[groups == c]
        fi = [float(w[c, j]) * math.fsum(float(feats[i, j]) for i in members) / len(members) for j in range(D)]
        for j in range(D):
            assert imp[(c, j)]["importance"] == pytest.approx(fi[j], rel=1e-12, abs=1e-15)
        expected_pairs += [(c, j) for j in sorted(range(D), key=lambda j: (-fi[j], j))[:3]]
    pairs = [(r["class_index"], r["feature_index"]) for r in storage.read_parquet(f"{out}/pairs.parquet").to_pylist()]
    assert pairs == expected_pairs

    tc = storage.read_parquet(f"{out}/topk/class.parquet").to_pylist()
    assert [(r["class_index"], r["feature_index"], r["image_id"], r["activation"]) for r in tc] == [
        (c, j, i, a) for c, j in pairs for i, a in ranked(ids[groups == c], j, K)
    ]
    cand = storage.read_parquet(f"{out}/topk/candidates.parquet").to_pylist()
    for rule in aggregate.CANDIDATES:
        got = [(r["class_index"], r["feature_index"], r["rank"], r["image_id"], r["activation"]) for r in cand if r["candidates"] == rule]
        want = [(c, j, rank, i, a) for c, j in pairs for rank, (i, a) in enumerate(ranked(_candidates(labels, preds, rule, c), j, K), start=1)]
        assert got == want, rule
    assert {r["candidates"] for r in cand} == set(aggregate.CANDIDATES)


def test_float16_and_float32_keys_order_exactly_and_decode_back():
    rng = np.random.default_rng(1)
    acts32 = np.concatenate([
        np.float32(1.0) + np.arange(8, dtype=np.float32) * np.float32(2.0**-23),  # adjacent float32 values
        np.array([0.0, -0.0, -1.0, -1.0 - 2.0**-23, 3.4e38, -3.4e38, 1e-45, -1e-45, np.inf, -np.inf], np.float32),
    ]).astype(np.float32)
    ids = rng.permutation(len(acts32))
    ids[1] = ids[0]  # the same image twice: equal keys when the activations are equal
    with np.errstate(over="ignore"):  # +-3.4e38 become +-inf in float16
        acts16 = acts32.astype(np.float16)
    for acts in (acts32, acts16):
        keys = aggregate.sort_keys(acts, ids)
        back, back_ids = aggregate.decode_keys(keys)
        assert back_ids.tolist() == ids.tolist() and np.array_equal(back, acts.astype(np.float32))
        got = [(float(a), int(i)) for a, i in zip(*aggregate.decode_keys(aggregate.top_k(keys[:, None], len(acts))[:, 0]))]
        assert got == sorted(((float(a), int(i)) for a, i in zip(acts, ids)), key=lambda t: (-t[0], t[1]))
    padded = aggregate.top_k(aggregate.sort_keys(acts32[:3], ids[:3])[:, None], 5)[:, 0]
    back, back_ids = aggregate.decode_keys(padded)
    assert back_ids.tolist()[3:] == [-1, -1] and np.isnan(back[3:]).all() and (back_ids[:3] >= 0).all()


def test_a_shards_partials_hold_only_its_own_classes_and_pairs(tmp_path):
    """What a shard sends back grows with the shard, not with the classes or pairs of the dataset
    (1,000 shards x 1,000 classes x 2,048 features would be 32 GB of class sums otherwise)."""
    rng = np.random.default_rng(3)
    n = sum(SHARD_SIZES)  # the first shard is rows 0-9
    feats = rng.random((n, D)).astype(np.float32)
    labels = np.array([1] * 6 + [2] * 4 + [0] * (n - 10))
    preds = np.array([1] * 5 + [3] * 5 + [0] * (n - 10))
    _, uris, _ = _write(tmp_path, feats, labels, preds)
    part = aggregate.shard_partial(uris[0], 1000, 4)
    g_label, g_pred = aggregate.GROUPINGS.index("label"), aggregate.GROUPINGS.index("prediction")
    first = np.arange(10)
    assert part.classes[g_label].tolist() == [1, 2] and part.counts[g_label].tolist() == [6, 4]
    assert part.classes[g_pred].tolist() == [1, 3] and part.counts[g_pred].tolist() == [5, 5]
    assert np.allclose(part.sums[g_label], [feats[first][labels[first] == c].astype(np.float64).sum(0) for c in (1, 2)])
    pairs = [(c, j) for c in range(1000) for j in (0, 5)]  # 2,000 pairs, of which those of classes 1, 2 and 3 have images here
    present, keys = aggregate.shard_pair_keys(uris[0], pairs, 3)
    assert sorted({pairs[p][0] for p in present}) == [1, 2, 3] and keys.shape == (len(aggregate.CANDIDATES), 3, 6)
