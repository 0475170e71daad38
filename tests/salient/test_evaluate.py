import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from salient import evaluate

H = W = 8
REGION = (slice(0, 4), slice(0, 4))  # the "cue" region a test model looks at


def _index(rows):
    """A mask index: (class_index, feature_index, label, image_id) per mask row."""
    return pa.table({
        "class_index": [r[0] for r in rows], "feature_index": [r[1] for r in rows], "feature_rank": [1] * len(rows),
        "label": [r[2] for r in rows], "image_id": [r[3] for r in rows], "relpath": [f"img{r[3]}.png" for r in rows],
    })


ROWS = [(0, 10, "core", 1), (0, 10, "core", 2), (0, 20, "spurious", 2), (0, 20, "spurious", 3), (1, 30, "spurious", 4)]


def _image(relpath):
    g = torch.Generator().manual_seed(int(relpath[3:-4]))
    x = torch.rand(3, H, W, generator=g)
    x[:, REGION[0], REGION[1]] = 0.5  # a flat region: what the cue-only model checks
    return x


def _masks(inside):
    """Mask rows: feature 20's masks (spurious) cover REGION, all others cover the rest."""
    def load(row):
        m = np.zeros((H, W), np.uint8)
        region = np.zeros((H, W), bool)
        region[REGION] = True
        feature = ROWS[row][1]
        m[region if (feature == 20) == inside else ~region] = 255
        return m
    return load


def cue_only(x):
    """Class 0 when the region is flat (its cue), else class 1: it looks at nothing else."""
    spread = x[:, :, REGION[0], REGION[1]].flatten(1).std(dim=1)
    return (spread > 0.01).long()


def _run(predict, load_mask, sigmas, batch_size=64, block_size=10, trials=1):
    work = evaluate.plan_images(_index(ROWS))
    out = []
    for block in evaluate.blocks_of(work, block_size):
        out += evaluate.evaluate_block(predict, block, _image, load_mask, sigmas, trials, seed=7, batch_size=batch_size)
    return out


def test_sigma_zero_and_zero_masks_change_nothing():
    for sigmas, load in (([0.0], _masks(True)), ([0.5, 1.0], lambda row: np.zeros((H, W), np.uint8))):
        res = _run(cue_only, load, sigmas)
        clean = {r[0]: r[5] for r in res if r[1] == evaluate.CLEAN}
        noisy = [r for r in res if r[1] != evaluate.CLEAN]
        assert noisy and all(r[5] == clean[r[0]] for r in noisy)


def test_a_cue_only_model_loses_accuracy_under_noise_on_the_cue_only():
    res = _run(cue_only, _masks(True), [0.5])
    clean = {r[0]: r[5] for r in res if r[1] == evaluate.CLEAN}
    assert set(clean.values()) == {0}, "clean images show the cue"
    by = {r[1] + f"@{r[0]}": r[5] for r in res if r[1] != evaluate.CLEAN}
    assert by["pair:0:20@2"] == by["pair:0:20@3"] == 1, "noise on the cue region flips the prediction"
    assert by["pair:0:10@1"] == by["pair:0:10@2"] == 0, "noise elsewhere does not"
    tables = evaluate.build_tables(_index(ROWS), {("cue_only", 0.5): evaluate.results_table(res)})
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
    pairs = {(r["class_index"], r["feature_index"]): r for r in tables[0].to_pylist()}
    assert pairs[(0, 20)]["drop"] == 1.0 and pairs[(0, 10)]["drop"] == 0.0 and pairs[(0, 20)]["n_images"] == 2


def test_results_do_not_depend_on_batch_size_or_how_images_are_split():
    def noisy_argmax(x):  # sensitive to every pixel, so any change in the noise shows
        return (x.flatten(1).sum(dim=1) * 1000).long() % 97

    reference = sorted(_run(noisy_argmax, _masks(True), [0.3, 0.7], batch_size=64, block_size=10, trials=2), key=str)
    for batch, block in ((1, 1), (3, 2), (5, 3)):
        assert sorted(_run(noisy_argmax, _masks(True), [0.3, 0.7], batch_size=batch, block_size=block, trials=2), key=str) == reference


def test_noise_is_reproducible_per_image_and_trial():
    a = evaluate.image_noise(1, 0, 42, (3, 4, 4))
    assert torch.equal(a, evaluate.image_noise(1, 0, 42, (3, 4, 4)))
    assert not torch.equal(a, evaluate.image_noise(1, 1, 42, (3, 4, 4)))
    assert not torch.equal(a, evaluate.image_noise(1, 0, 43, (3, 4, 4)))
    x = torch.full((1, 3, 2, 2), 0.5)
    noisy = evaluate.add_noise(x.clone(), torch.tensor([[[1.0, 0.0], [0.5, 0.0]]]), torch.ones(1, 3, 2, 2), 0.25)
    assert noisy[0, 0].tolist() == [[0.75, 0.5], [0.625, 0.5]]
    assert math.isnan([r for r in evaluate.evaluate_block(cue_only, evaluate.blocks_of(evaluate.plan_images(_index(ROWS[:1])), 5)[0], _image, _masks(True), [0.1], 1, 0, 8) if r[1] == evaluate.CLEAN][0][3])
