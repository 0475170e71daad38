"""Which images get masks and count in evaluation: with D(c) the images *predicted* c and a model
that predicts across classes, masks go only to images filed under their pair's class
(``generalize.candidates: label``, the default), and evaluation never scores an image for a class
it is not filed under (also when ``candidates: prediction`` gives such images masks)."""

from collections import Counter

import pyarrow.compute as pc
import pytest

from salient import stages, storage, tables
from salient.stage import execute, local_run
from tests.helpers import read_activation_rows, tiny_pipeline


def _build(base, candidates):
    """Every stage on the 3-class world under ``base``, D(c) the images predicted c, masks for the
    top 5 images of the candidate set ``candidates``: (config, build directory)."""
    cfg = tiny_pipeline(base)
    cfg.aggregate.grouping = "prediction"
    cfg.generalize.candidates = candidates
    cfg.generalize.images_per_pair = 5
    run = local_run(cfg, stages.STAGES)
    for stage in stages.STAGES:
        if stage.applies(cfg):
            execute(stage, run)
    return cfg, run.build


@pytest.fixture(scope="module")
def cross_class_build(tmp_path_factory):
    """(config, build with ``prediction`` candidates, build with ``label`` candidates)."""
    cfg, by_prediction = _build(tmp_path_factory.mktemp("by-prediction"), "prediction")
    _, by_label = _build(tmp_path_factory.mktemp("by-label"), "label")
    return cfg, by_prediction, by_label


def _read(build, table):
    return storage.read_parquet(storage.join(build, table.path)).to_pylist()


def _labels(build):
    rows = storage.read_parquet(storage.join(build, tables.PLAN.path), ["image_id", "label"]).to_pydict()
    return dict(zip(rows["image_id"], rows["label"]))


def test_the_model_predicts_across_classes_so_d_c_holds_other_folders(cross_class_build):
    _, build, _ = cross_class_build
    top = _read(build, tables.TOPK_CLASS)
    assert any(r["label"] != r["class_index"] for r in top), "the test needs a D(c) with images of other classes"


def test_label_candidates_give_masks_only_to_images_of_the_pairs_class(cross_class_build):
    _, _, build = cross_class_build
    folder = _labels(build)
    index = _read(build, tables.MASK_INDEX)
    assert index, "labelled pairs got masks"
    assert all(folder[r["image_id"]] == r["class_index"] == r["image_label"] for r in index)
    # and they are the pair's top images among its class folder, by the stored activations
    acts = read_activation_rows(build).to_pydict()
    feats = dict(zip(acts["image_id"], acts["features"]))
    for (c, j), got in _by_pair(index).items():
        members = [i for i, lb in folder.items() if lb == c and i in feats]
        want = sorted(members, key=lambda i: (-feats[i][j], i))[:5]
        assert got == want


def _by_pair(index):
    out = {}
    for r in sorted(index, key=lambda r: r["rank"]):
        out.setdefault((r["class_index"], r["feature_index"]), []).append(r["image_id"])
    return out


@pytest.mark.parametrize("candidates", ["prediction", "label"])
def test_no_evaluation_count_uses_an_image_of_another_class(cross_class_build, candidates):
    cfg, by_prediction, by_label = cross_class_build
    build = by_prediction if candidates == "prediction" else by_label
    folder = _labels(build)
    index = _read(build, tables.MASK_INDEX)
    if candidates == "prediction":
        assert any(r["image_label"] != r["class_index"] for r in index), "prediction candidates mask other folders"
    scored = Counter((r["class_index"], r["feature_index"]) for r in index if folder[r["image_id"]] == r["class_index"])
    other = Counter((r["class_index"], r["feature_index"]) for r in index if folder[r["image_id"]] != r["class_index"])
    for model in cfg.evaluate.models:
        for sigma in cfg.evaluate.sigmas:
            preds = storage.read_parquet(storage.join(build, tables.predictions(model.name, sigma)))
            noisy = preds.filter(pc.invert(pc.equal(preds.column("condition"), "clean"))).to_pylist()
            assert noisy and all(folder[r["image_id"]] == r["class_index"] for r in noisy)
    pairs = _read(build, tables.EVAL_PAIRS)
    assert {(r["class_index"], r["feature_index"]): r["n_images"] for r in pairs} == {
        (r["class_index"], r["feature_index"]): scored[(r["class_index"], r["feature_index"])] for r in pairs
    }
    assert all(r["n_other_class_images"] == other[(r["class_index"], r["feature_index"])] for r in pairs)
    classes = _read(build, tables.EVAL_CLASSES)
    for r in classes:
        members = {x["image_id"] for x in index if x["class_index"] == r["class_index"] and folder[x["image_id"]] == x["class_index"]}
        assert r["n_images"] == len(members)
