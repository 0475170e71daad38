"""The release layout: an export read back by a re-implementation of the original loader's file
access, and the loader's extra Resize/CenterCrop of the mask."""

import os
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
import pandas as pd
from PIL import Image
from torchvision import transforms

from salient import cli
from salient.dataset import SalientMasks
from salient.errors import InputError
from salient.reference import OTHER_CLASS, export_reference, loader_alignment
from tests.salient.test_masks import CROP, _build, _generalize

# Greyscale JPEG at quality 95 of a smooth 8-bit mask: no pixel moves by more than this.
JPEG_TOLERANCE = 6


def _loader_items(images_path, masks_path, class_index, feature_indices, resize, crop):
    """What the original ``SalientImageNet`` loader does, written out: ``eval`` of the dict, the
    paths it builds, pandas' read of the names, PIL opens, the transform on image and mask."""
    transform = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor()])
    wordnet_dict = eval(open(os.path.join(masks_path, "wordnet_dict.py")).read())
    wnid = wordnet_dict[class_index]
    image_dir, mask_dir = os.path.join(images_path, "train", wnid), os.path.join(masks_path, wnid)
    names_df = pd.read_csv(os.path.join(mask_dir, "image_names_map.csv"))
    features_of = defaultdict(list)
    for j in feature_indices:
        for name in names_df[str(j)].to_numpy():
            features_of[name].append(j)
    for name in np.unique(np.array(list(features_of))):
        image = transform(Image.open(os.path.join(image_dir, name + ".JPEG")).convert("RGB"))
        per_feature = {}
        for j in features_of[name]:
            per_feature[j] = np.asarray(Image.open(os.path.join(mask_dir, f"feature_{j}", name + ".JPEG")))
        yield wnid, name, image, per_feature


def test_the_original_loader_opens_every_exported_mask(tmp_path):
    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    store = SalientMasks(out)
    dest = tmp_path / "release"
    images_path = tmp_path / "imagenet"
    images_path.mkdir()
    os.symlink(root, images_path / "train")

    summary = export_reference(out, str(dest))

    # class 1's top images include one filed under class 0: its two masks (one per feature of class 1) stay out
    own = [i for i in range(len(store)) if store.row(i)["relpath"].startswith(store.row(i)["wnid"] + "/")]
    assert len(own) == len(store) - 2
    assert summary["masks"] == len(own) and summary["left_out"] == 2 and summary["left_out_reasons"] == {OTHER_CLASS: 2}
    left = pd.read_csv(dest / "left_out.csv")
    assert sorted(left["relpath"]) == ["n0000/img_000.JPEG"] * 2 and set(left["wnid"]) == {"n0001"}

    pairs = defaultdict(set)
    for i in own:
        pairs[store.row(i)["class_index"]].add(store.row(i)["feature_index"])
    seen = 0
    for c, features in pairs.items():
        for wnid, name, image, per_feature in _loader_items(str(images_path), str(dest), c, sorted(features), CROP, CROP):
            assert wnid == f"n{c:04d}" and image.shape == (3, CROP, CROP)
            for j, mask in per_feature.items():
                stored = store.find(f"{wnid}/{name}.JPEG", j).astype(int)
                assert mask.shape == stored.shape and np.abs(mask.astype(int) - stored).max() <= JPEG_TOLERANCE
                seen += 1
    assert seen == len(own)


def test_export_reference_command_reports_what_it_left_out(tmp_path, capsys):
    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    assert cli.main(["export", "reference", out, str(tmp_path / "release")]) == 0
    printed = capsys.readouterr().out
    assert "left out 2 masks: image filed under another class folder (listed in left_out.csv)" in printed


def test_loader_alignment_zooms_the_mask_by_resize_over_crop_about_its_centre():
    # a vertical edge 56 px from the left of a 224 mask; Resize(256)/CenterCrop(224) moves it to
    # 112 - (112 - 56) * 256 / 224 = 48
    mask = np.zeros((224, 224), np.uint8)
    mask[:, :56] = 255
    got = loader_alignment(mask[None], 256, 224)[0].astype(int)
    assert got.shape == (224, 224)
    assert (got[:, :47] == 255).all() and (got[:, 50:] == 0).all()
    assert np.array_equal(loader_alignment(mask[None], 224, 224)[0], mask)


def _answers_csv(path, store):
    """Five answers per labelled pair of ``store`` in the paper's schema, voting for its label."""
    vote = {"core": "main_object", "spurious": "background"}
    lines = ["WorkerId,Input.wordnet_id,Input.class_index,Input.feature_index,Input.feature_rank,Answer.main,Answer.confidence,Answer.reasons"]
    pairs = {(r["class_index"], r["wnid"], r["feature_index"], r["feature_rank"], r["label"]) for r in store.index.to_pylist()}
    for c, wnid, j, rank, label in sorted(pairs):
        lines += [f"{w},{wnid},{c},{j},{rank},{vote[label]},4,seen" for w in range(5)]
    path.write_text("\n".join(lines) + "\n")
    return {(c, j): label for c, _, j, _, label in pairs}


def test_import_round_trips_an_export_and_evaluate_runs_on_it(tmp_path, capsys):
    from salient import config, storage
    from tests.helpers import current_build, run_stages

    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    store = SalientMasks(out)
    release = tmp_path / "release"
    export_reference(out, str(release))
    labels = _answers_csv(tmp_path / "answers.csv", store)
    # a listed image that is not in the dataset, and a class folder the dict does not name
    (release / "n0000" / "image_names_map.csv").write_text((release / "n0000" / "image_names_map.csv").read_text() + "gone\n")
    (release / "n0009").mkdir()
    (release / "n0009" / "image_names_map.csv").write_text("5\nimg_000\n")
    cfg = config.load(None, [
        f"dataset.root={root}", "preprocess.resize=32", "preprocess.crop=32", f"output={tmp_path / 'imported'}",
        "compute.gpus_per_worker=0", "generalize.masks_per_shard=2",
        f"evaluate.models=[{{name: tiny, arch: tiny_resnet, format: robustness, checkpoint: {ckpt}}}]", "evaluate.sigmas=[0.5]",
    ])
    config_path = tmp_path / "salient.yaml"
    config_path.write_text(config.to_yaml(cfg))

    assert cli.main(["import", "reference", str(release), str(config_path), "--answers", str(tmp_path / "answers.csv")]) == 0
    printed = capsys.readouterr().out
    assert "rejected 1: image missing under dataset.root" in printed and "rejected 1: unknown wnid" in printed

    imported = SalientMasks(cfg.output)
    own = [i for i in range(len(store)) if store.row(i)["relpath"].startswith(store.row(i)["wnid"] + "/")]
    assert len(imported) == len(own)
    for i in range(len(imported)):
        r = imported.row(i)
        assert r["activation"] is None and r["image_label"] == r["class_index"]
        assert labels[(r["class_index"], r["feature_index"])] == r["label"]
        stored = store.find(r["relpath"], r["feature_index"]).astype(int)
        assert np.abs(imported.mask(i).astype(int) - stored).max() <= JPEG_TOLERANCE
        # rank: the position in image_names_map.csv, where the image of another class folder is not
        ranked = sorted(store.row(k)["rank"] for k in own if (store.row(k)["class_index"], store.row(k)["feature_index"]) == (r["class_index"], r["feature_index"]))
        assert ranked[r["rank"] - 1] == store.row(store.rows_for(r["relpath"], r["feature_index"])[0])["rank"]
    got = storage.read_parquet(f"{imported.build}/annotations/labels.parquet").to_pylist()
    assert {(r["class_index"], r["feature_index"]): r["label"] for r in got} == labels
    rejected = storage.read_parquet(f"{imported.build}/masks/rejected.parquet").to_pylist()
    assert sorted(r["relpath"] or r["wnid"] for r in rejected) == ["n0000/gone.JPEG", "n0009"]
    with pytest.raises(InputError, match="holds no NAMs"):  # a release holds masks, not the maps they came from
        imported.rebuild(0, 64)

    first = run_stages(cfg, "evaluate")
    assert first["reused"] == 0
    pairs = storage.read_parquet(f"{current_build(cfg.output)}/evaluation/pairs.parquet").to_pylist()
    expected = {}
    for i in own:
        key = (store.row(i)["class_index"], store.row(i)["feature_index"])
        expected[key] = expected.get(key, 0) + 1
    assert {(r["class_index"], r["feature_index"]): r["n_images"] for r in pairs} == expected

    cfg.evaluate.mask_alignment = "reference"  # another input of evaluate: nothing reused
    assert run_stages(cfg, "evaluate")["reused"] == 0


def test_an_export_with_unequal_columns_gives_the_loader_no_blank_cell_and_imports_without_repeats(tmp_path):
    import pyarrow.parquet as pq

    from salient.aggregate import TOPK_CANDIDATES_TABLE
    from salient.reference import _release_rows

    root, out, ckpt = _build(tmp_path)
    # class 1's second feature loses its last top image: its column is one name shorter than the first's
    topk = pq.read_table(f"{out}/{TOPK_CANDIDATES_TABLE}").to_pylist()
    second = max(r["feature_index"] for r in topk if r["class_index"] == 1)
    last = max(r["rank"] for r in topk if (r["class_index"], r["feature_index"]) == (1, second))
    kept = [r for r in topk if (r["class_index"], r["feature_index"], r["rank"]) != (1, second, last)]
    pq.write_table(pa.Table.from_pylist(kept, schema=pq.read_schema(f"{out}/{TOPK_CANDIDATES_TABLE}")), f"{out}/{TOPK_CANDIDATES_TABLE}")
    _generalize(root, out, ckpt)
    store = SalientMasks(out)
    dest = tmp_path / "release"
    export_reference(out, str(dest))

    expected: dict[tuple[int, int], set[str]] = defaultdict(set)  # what the build holds for the loader
    for i in range(len(store)):
        r = store.row(i)
        if r["relpath"].startswith(r["wnid"] + "/"):
            expected[(r["class_index"], r["feature_index"])].add(r["relpath"].split("/")[1].removesuffix(".JPEG"))
    assert len(expected[(1, second)]) + 1 == max(len(v) for (c, _), v in expected.items() if c == 1)

    for c in {c for c, _ in expected}:
        wnid = f"n{c:04d}"
        table = pd.read_csv(dest / wnid / "image_names_map.csv")
        assert not table.isna().any().any()
        for j in (j for k, j in expected if k == c):
            listed = table[str(j)].to_numpy()
            assert all(isinstance(name, str) and (dest / wnid / f"feature_{j}" / f"{name}.JPEG").exists() for name in listed)
            assert set(listed) == expected[(c, j)]
    # the loader itself, on every feature of class 1 at once
    images_path = tmp_path / "imagenet"
    images_path.mkdir()
    os.symlink(root, images_path / "train")
    features_of = defaultdict(set)
    for (c, j), names in expected.items():
        for name in names:
            if c == 1:
                features_of[name].add(j)
    loaded = _loader_items(str(images_path), str(dest), 1, sorted({j for c, j in expected if c == 1}), CROP, CROP)
    assert {name: set(per_feature) for _, name, _, per_feature in loaded} == features_of

    rows, _, rejected = _release_rows(str(dest), {c: f"n{c:04d}" for c in range(3)}, None, str(root), CROP)
    assert not rejected
    assert sorted((r["class_index"], r["feature_index"], r["relpath"]) for r in rows) == sorted(
        (c, j, f"n{c:04d}/{n}.JPEG") for (c, j), names in expected.items() for n in names
    )
    assert sorted(r["rank"] for r in rows if (r["class_index"], r["feature_index"]) == (1, second)) == list(range(1, len(expected[(1, second)]) + 1))


@pytest.mark.parametrize("name", ["123", "0001", "1e5", "NA", "nan", "null", "None"])
def test_a_name_pandas_would_not_read_back_as_that_string_is_left_out(name):
    from salient.reference import NOT_A_STRING, loadable_name

    assert loadable_name(f"n0001/{name}.JPEG", "n0001") == (None, NOT_A_STRING)
    assert loadable_name("n0001/n0001_123.JPEG", "n0001") == ("n0001_123", None)
