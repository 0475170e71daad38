import hashlib
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from salient import evaluate
from salient.errors import InputError
from salient.stream import Batch

H = W = 8
REGION = (slice(0, 4), slice(0, 4))  # the "cue" region a test model looks at
SEED = 7


def _index(rows):
    """A mask index: (class_index, feature_index, label, image_id[, image_label]) per mask row; an
    image is filed under its pair's class unless given."""
    return pa.table({
        "class_index": [r[0] for r in rows], "feature_index": [r[1] for r in rows], "feature_rank": [1] * len(rows),
        "label": [r[2] for r in rows], "image_id": [r[3] for r in rows], "relpath": [f"img{r[3]}.png" for r in rows],
        "image_label": [r[4] if len(r) > 4 else r[0] for r in rows],
    })


ROWS = [(0, 10, "core", 1), (0, 10, "core", 2), (0, 20, "spurious", 2), (0, 20, "spurious", 3), (1, 30, "spurious", 4)]


def _random_rows(n_images=14, seed=0):
    """A bigger index in mask-row order: each image in 1 to 4 pairs of 3 classes."""
    rng = np.random.default_rng(seed)
    pairs = [(c, j, "core" if j % 2 else "spurious") for c in range(3) for j in (c * 10, c * 10 + 1, c * 10 + 2)]
    rows = []
    for iid in range(n_images):
        for k in sorted(rng.choice(len(pairs), size=rng.integers(1, 5), replace=False)):
            c, j, label = pairs[k]
            rows.append((c, j, label, 100 + iid))
    return rows


def _pixels(image_id):
    g = torch.Generator().manual_seed(image_id)
    x = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    x[:, REGION[0], REGION[1]] = 128  # a flat region: what the cue-only model checks
    return x


def _cue_masks(rows, inside):
    """Mask rows: feature 20's masks (spurious) cover REGION, all others cover the rest."""
    def load(row):
        m = np.zeros((H, W), np.uint8)
        region = np.zeros((H, W), bool)
        region[REGION] = True
        m[region if (rows[row][1] == 20) == inside else ~region] = 255
        return m
    return load


def _soft_masks(row):
    return np.random.default_rng(1000 + row).integers(0, 256, (H, W), dtype=np.uint8)


def cue_only(x):
    """Class 0 when the region is flat (its cue), else class 1: it looks at nothing else."""
    spread = x[:, :, REGION[0], REGION[1]].flatten(1).std(dim=1)
    return (spread > 0.01).long()


def pixel_sum(x):
    """Sensitive to every pixel, so any change in the noise shows."""
    return (x.flatten(1).sum(dim=1) * 1000).long() % 97


def pixel_max(x):
    return (x.flatten(1).amax(dim=1) * 1000).long() % 89


def _feed(block, split):
    """The block's images as a stream hands them over, ``split`` images a batch."""
    for s in range(0, len(block.images), split):
        positions = list(range(s, min(s + split, len(block.images))))
        pixels = torch.stack([_pixels(block.images[p].image_id) for p in positions])
        yield Batch(positions, pixels, [1] * len(positions), [])


def _plain(table):
    """A predictions table as sorted tuples, NaN sigma as None (NaN never equals itself)."""
    out = [tuple(None if k == "sigma" and math.isnan(v) else v for k, v in r.items()) for r in table.to_pylist()]
    return sorted(out, key=str)


def _run(models, rows, load_mask, batch_size=64, block_size=10, shard_rows=1, split=4, trials=1):
    """Every model's predictions over every block of ``rows``, as sorted tuples."""
    out = {name: [] for name in models}
    for block in evaluate.blocks_of(evaluate.plan_images(_index(rows)), block_size, shard_rows):
        masks = torch.from_numpy(np.stack([load_mask(r) for r in range(block.lo, block.hi)]))
        got = evaluate.evaluate_block(models, block, _feed(block, split), masks, trials, SEED, batch_size)
        for name, table in got.items():
            out[name] += _plain(table)
    return {name: sorted(v, key=str) for name, v in out.items()}


def _noise(trial, image_id):
    """The documented draw: a CPU generator seeded from the sha256 of "seed:trial:image_id"."""
    digest = hashlib.sha256(f"{SEED}:{trial}:{image_id}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn((3, H, W), generator=g)


def _expected(predict, rows, load_mask, sigmas, trials):
    """The predictions the formula gives, one image at a time: clean, and
    clip(x + sigma * N * M, 0, 1) with M the max of each pair's, and each class-and-label set's, masks."""
    conditions = {}  # image -> [(key, class, mask rows)]
    for r, (c, j, label, iid) in enumerate(rows):
        conditions.setdefault(iid, []).append((f"pair:{c}:{j}", c, [r]))
    sets = {}
    for r, (c, _, label, iid) in enumerate(rows):
        sets.setdefault((iid, c, label), []).append(r)
    for (iid, c, label), rs in sets.items():
        conditions[iid].append((f"{label}:{c}", c, rs))
    out = []
    for iid, conds in conditions.items():
        x = _pixels(iid).float() / 255.0
        out.append((iid, "clean", -1, None, -1, int(predict(x[None])[0])))
        for trial in range(trials):
            noise = _noise(trial, iid)
            for key, c, rs in conds:
                m = torch.from_numpy(np.max(np.stack([load_mask(r) for r in rs]), axis=0).astype(np.float32) / 255.0)
                for sigma in sigmas:
                    noisy = (x + sigma * noise * m).clamp(0, 1)
                    out.append((iid, key, c, sigma, trial, int(predict(noisy[None])[0])))
    return sorted(out, key=str)


def test_sigma_zero_and_zero_masks_change_nothing():
    for sigmas, load in (([0.0], _cue_masks(ROWS, True)), ([0.5, 1.0], lambda row: np.zeros((H, W), np.uint8))):
        res = _run({"m": (cue_only, sigmas)}, ROWS, load)["m"]
        clean = {r[0]: r[5] for r in res if r[1] == evaluate.CLEAN}
        noisy = [r for r in res if r[1] != evaluate.CLEAN]
        assert len(noisy) == len(sigmas) * (5 + 5) and all(r[5] == clean[r[0]] for r in noisy)


def test_a_cue_only_model_loses_accuracy_under_noise_on_the_cue_only():
    res = _run({"cue_only": (cue_only, [0.5])}, ROWS, _cue_masks(ROWS, True))["cue_only"]
    clean = {r[0]: r[5] for r in res if r[1] == evaluate.CLEAN}
    assert set(clean.values()) == {0}, "clean images show the cue"
    by = {r[1] + f"@{r[0]}": r[5] for r in res if r[1] != evaluate.CLEAN}
    assert by["pair:0:20@2"] == by["pair:0:20@3"] == 1, "noise on the cue region flips the prediction"
    assert by["pair:0:10@1"] == by["pair:0:10@2"] == 0, "noise elsewhere does not"
    table = evaluate.results_table([(*r[:3], math.nan if r[3] is None else r[3], *r[4:]) for r in res])
    tables = evaluate.build_tables(_index(ROWS), {("cue_only", 0.5): table})
    classes = {r["class_index"]: r for r in tables[1].to_pylist()}
    # class 0: core images {1, 2}, spurious images {2, 3}; noise on spurious masks hits the cue
    assert classes[0]["core_acc"] == 0.0 and classes[0]["spurious_acc"] == 1.0
    assert classes[0]["clean_acc"] == 1.0 and classes[0]["core_drop"] == 1.0 and classes[0]["spurious_drop"] == 0.0
    assert (classes[0]["n_core_images"], classes[0]["n_spurious_images"], classes[0]["n_images"]) == (2, 2, 3)
    # class 1 has no core pair: its spurious accuracy is undefined, not a guess
    assert classes[1]["spurious_acc"] is None and classes[1]["n_core_images"] == 0
    # all images are predicted 0, so class 1 is never right
    assert classes[1]["clean_acc"] == 0.0
    summary = tables[2].to_pylist()[0]
    assert summary["mean_core_acc"] == pytest.approx(0.0) and summary["n_classes_core_acc"] == 2
    assert summary["mean_spurious_acc"] == 1.0 and summary["n_classes_spurious_acc"] == 1
    # each noisy accuracy's baseline is the clean accuracy of the same images, averaged over the
    # same classes: spurious images of class 0 {2, 3} right, of class 1 {4} wrong
    assert summary["mean_clean_acc_spurious_images"] == 0.5 and summary["n_classes_clean_acc_spurious_images"] == 2
    assert summary["mean_core_drop"] == pytest.approx(summary["mean_clean_acc_spurious_images"] - summary["mean_core_acc"])
    assert summary["mean_clean_acc_core_images"] == 1.0 and summary["n_classes_clean_acc_core_images"] == 1
    pairs = {(r["class_index"], r["feature_index"]): r for r in tables[0].to_pylist()}
    assert pairs[(0, 20)]["drop"] == 1.0 and pairs[(0, 10)]["drop"] == 0.0 and pairs[(0, 20)]["n_images"] == 2


@pytest.mark.parametrize("batch_size, block_size, shard_rows, split", [(64, 100, 1, 4), (1, 1, 1, 1), (3, 2, 4, 3), (5, 3, 5, 2), (7, 4, 16, 5)])
def test_results_are_the_formula_for_any_batch_size_block_and_feed(batch_size, block_size, shard_rows, split):
    rows = _random_rows()
    expected = _expected(pixel_sum, rows, _soft_masks, [0.3, 0.7], trials=2)
    got = _run({"m": (pixel_sum, [0.3, 0.7])}, rows, _soft_masks, batch_size, block_size, shard_rows, split, trials=2)["m"]
    assert got == expected


def test_two_models_in_one_worker_predict_as_each_alone():
    rows = _random_rows(seed=1)
    both = _run({"sum": (pixel_sum, [0.3, 0.7]), "max": (pixel_max, [0.7])}, rows, _soft_masks, batch_size=5, block_size=3, split=4, trials=2)
    alone_sum = _run({"sum": (pixel_sum, [0.3, 0.7])}, rows, _soft_masks, batch_size=5, block_size=3, split=4, trials=2)["sum"]
    alone_max = _run({"max": (pixel_max, [0.7])}, rows, _soft_masks, batch_size=5, block_size=3, split=4, trials=2)["max"]
    assert both["sum"] == alone_sum == _expected(pixel_sum, rows, _soft_masks, [0.3, 0.7], trials=2)
    assert both["max"] == alone_max == _expected(pixel_max, rows, _soft_masks, [0.7], trials=2)


def test_every_variant_is_built_once_for_all_the_models_that_need_it():
    rows = _random_rows(n_images=6, seed=2)
    calls = []  # (model, where its input is, the input)

    def recording(name):
        def predict(x):
            calls.append((name, x.data_ptr(), x.clone()))
            return pixel_sum(x)
        return predict

    _run({"a": (recording("a"), [0.3, 0.7]), "b": (recording("b"), [0.7])}, rows, _soft_masks, batch_size=4, block_size=100)
    images = len({r[3] for r in rows})
    conditions = len(rows) + len({(r[3], r[0], r[2]) for r in rows})
    a = [x for name, _, x in calls if name == "a"]
    assert sum(map(len, a)) == images + 2 * conditions
    assert sum(len(x) for name, _, x in calls if name == "b") == images + conditions
    for k, (name, where, x) in enumerate(calls):
        if name == "b":
            before, at, seen = calls[k - 1]
            assert before == "a" and at == where and torch.equal(seen, x), "b runs on the batch made for a, as it is"
    assert all(len(x) == 4 for x in a[:-3]), "batches across images, full but the last of each kind (clean, each sigma)"


def test_noise_is_reproducible_per_image_and_trial_and_the_documented_draw_on_the_cpu():
    a = evaluate.image_noise(SEED, 0, 42, (3, H, W))
    assert torch.equal(a, _noise(0, 42)) and torch.equal(a, evaluate.image_noise(SEED, 0, 42, (3, H, W), "cpu"))
    assert not torch.equal(a, evaluate.image_noise(SEED, 1, 42, (3, H, W)))
    assert not torch.equal(a, evaluate.image_noise(SEED, 0, 43, (3, H, W)))


def test_blocks_end_on_shard_boundaries_and_cover_every_image_once():
    # rows per image: 1, 3, 1, 2, 2, 1, 4, 1 -> image ends at rows 1, 4, 5, 7, 9, 10, 14, 15
    counts = [1, 3, 1, 2, 2, 1, 4, 1]
    rows = [(0, j, "core", iid) for iid, n in enumerate(counts) for j in range(n)]
    work = evaluate.plan_images(_index(rows))
    blocks = evaluate.blocks_of(work, 2, 5)
    # the first cut with >= 2 images on a multiple of 5 is after image 2 (row 5), then after
    # image 5 (row 10; row 15 is the end)
    assert [[w.image_id for w in b.images] for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [(b.lo, b.hi) for b in blocks] == [(0, 5), (5, 10), (10, 15)]
    assert [b.index for b in blocks] == [0, 1, 2]
    # shards of 4 rows: image 1 ends on row 4; image 4 (rows 7, 8) straddles row 8 and image 6
    # (rows 10..13) row 12, so the second block runs to the end
    assert [(b.lo, b.hi) for b in evaluate.blocks_of(work, 1, 4)] == [(0, 4), (4, 15)]
    assert [w.image_id for b in evaluate.blocks_of(work, 1, 4) for w in b.images] == list(range(8))


def test_an_image_that_cannot_be_read_fails_its_block():
    block = evaluate.blocks_of(evaluate.plan_images(_index(ROWS)), 10, 1)[0]
    broken = [Batch([0], _pixels(1)[None], [1], [(1, "OSError: truncated")])]
    masks = torch.from_numpy(np.stack([_soft_masks(r) for r in range(block.lo, block.hi)]))
    with pytest.raises(InputError, match=r"img2\.png: OSError: truncated"):
        evaluate.evaluate_block({"m": (pixel_sum, [0.5])}, block, broken, masks, 1, SEED, 8)


def test_an_image_is_scored_only_for_the_class_it_is_filed_under():
    # image 5 (filed under class 0) has a mask of class 1's pair, image 2 one of class 1's too
    rows = ROWS + [(1, 30, "spurious", 5, 0), (1, 30, "spurious", 2, 0)]
    work = evaluate.plan_images(_index(rows))
    assert [w.image_id for w in work] == [1, 2, 3, 4], "image 5 has no condition to score"
    conds = {w.image_id: sorted(c.key for c in w.conditions) for w in work}
    assert conds[2] == ["core:0", "pair:0:10", "pair:0:20", "spurious:0"], "image 2 counts for class 0 only"
    assert all(r < len(ROWS) for w in work for c in w.conditions for r in c.rows)
    # everything predicted 1: class 1's only scored image (4) is right, the others do not count
    preds = [(iid, evaluate.CLEAN, -1, math.nan, -1, 1) for iid in (1, 2, 3, 4)]
    preds += [(w.image_id, c.key, c.class_index, 0.5, 0, 1) for w in work for c in w.conditions]
    pairs, classes, _ = evaluate.build_tables(_index(rows), {("m", 0.5): evaluate.results_table(preds)})
    pair = next(r for r in pairs.to_pylist() if r["class_index"] == 1)
    assert (pair["n_images"], pair["n_other_class_images"], pair["clean_acc"], pair["noisy_acc"]) == (1, 2, 1.0, 1.0)
    by_class = {r["class_index"]: r for r in classes.to_pylist()}
    assert by_class[1]["n_images"] == by_class[1]["n_spurious_images"] == 1 and by_class[1]["clean_acc"] == 1.0
    assert by_class[0]["n_images"] == 3 and by_class[0]["clean_acc"] == 0.0
