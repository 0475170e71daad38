"""Class folders whose names start like spreadsheet formulas (- = + @) are labelled end to end
through the annotation app and ingest: programs read wnids from the build's Parquet tables and
discovery's JSON, never from the spreadsheet-safe tasks.csv. And every table that names classes
follows the class metadata the build was made with."""

import csv
import os
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from salient import config, ingest, storage, tables
from salient.answers import answer_files
from salient.app import AppSettings, create_app
from salient.app.book import read_pairs
from tests.helpers import build_stages, jpeg_bytes, make_checkpoint

# Sorted by code point, as ImageFolder orders them: class indices 0..3.
WNIDS = ["+n03", "-n01", "=n02", "@n04"]
BUILD_ID = "20260101T000000Z-abcdef"
METADATA_COLUMNS = ["class_index", "synset", "wordnet_id", "gloss", "supercategory"]


def _write_metadata(path, tag: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(METADATA_COLUMNS)
        w.writerows([i, f"{tag} name {i}", wnid, f"{tag} gloss {i}", f"{tag} group"] for i, wnid in enumerate(WNIDS))


@pytest.fixture(scope="module")
def hostile_world(tmp_path_factory):
    """4 classes named like formulas x 8 random images (32 px), their metadata, a random
    tiny_resnet, and a build through discovery."""
    tmp = tmp_path_factory.mktemp("wnids")
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (tmp / "data" / wnid).mkdir(parents=True)
        for i in range(8):
            (tmp / "data" / wnid / f"img_{i}.JPEG").write_bytes(jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    metadata = tmp / "classes.csv"
    _write_metadata(metadata, "old")
    cfg = config.load(None, [
        f"dataset.root={tmp / 'data'}", f"dataset.class_metadata={metadata}",
        f"model.checkpoint={make_checkpoint(tmp / 'tiny.pt', num_classes=4)}", "model.arch=tiny_resnet",
        "model.format=robustness", "preprocess.resize=32", "preprocess.crop=32", f"output={tmp / 'out'}",
        "compute.shard_size=16", "compute.gpus_per_worker=0", "aggregate.features_per_class=1",
        "aggregate.grouping=label", "discover.images_per_pair=2", "discover.attack_steps=1",
    ])
    build = build_stages(cfg, BUILD_ID, ["activations", "aggregate", "discover"])
    return SimpleNamespace(cfg=cfg, root=cfg.output, build=build, metadata=metadata)


def _tasks(build: str) -> list[dict]:
    with open(os.path.join(build, tables.TASKS.path), newline="") as fh:
        return list(csv.DictReader(fh))


def _classes(build: str) -> dict[int, dict]:
    return {r["class_index"]: r for r in storage.read_parquet(storage.join(build, tables.CLASSES.path)).to_pylist()}


def test_formula_like_class_folders_are_labelled_through_the_app_and_ingest(hostile_world, tmp_path):
    w = hostile_world
    assert [r["wnid"] for r in _tasks(w.build)] == ["'" + wnid for wnid in WNIDS], "the export stays spreadsheet-safe"
    pairs = read_pairs(w.build)
    assert [p.wnid for p in pairs] == WNIDS and [p.class_name for p in pairs] == [f"old name {i}" for i in range(4)]
    assert all(set(p.strips) == {"images", "heatmaps", "attacks"} for p in pairs)

    settings = AppSettings(root=str(tmp_path), build=w.build, build_id=BUILD_ID, resize=32, crop=32)
    client = TestClient(create_app(settings))
    for p in pairs:
        for k in range(5):
            body = {
                "worker_id": f"worker{k}", "class_index": p.class_index, "feature_index": p.feature_index,
                "answer": "background" if k < 3 else "main_object", "confidence": 4, "reason": "the backdrop",
            }
            r = client.post("/api/answers", json=body)
            assert r.status_code == 201, r.text
        assert client.get(f"/assets/{p.strips['images']}").status_code == 200

    files = answer_files(str(tmp_path))
    build_pairs = [p.key for p in pairs]
    summary = ingest.ingest(w.build, files, ingest.known_classes(w.build), build_pairs, answers_root=str(tmp_path))
    assert (summary["accepted"], summary["rejected"]) == (20, 0)
    labels = storage.read_parquet(storage.join(w.build, tables.LABELS.path)).to_pylist()
    assert [(r["wnid"], r["label"], r["kind"]) for r in labels] == [(wnid, "spurious", "background") for wnid in WNIDS]


def test_a_crowd_answer_with_the_exports_wnid_counts(hostile_world, tmp_path):
    """A crowd platform fed tasks.csv sends its wnid cell back as shown: ``'-n01`` is class ``-n01``."""
    w = hostile_world
    task = next(t for t in _tasks(w.build) if t["wnid"] == "'-n01")
    path = tmp_path / "crowd.csv"
    with open(path, "w", newline="") as fh:
        cw = csv.writer(fh)
        cw.writerow(["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Answer.main", "Answer.confidence"])
        cw.writerows([f"c{k}", task["wnid"], task["class_index"], task["feature_index"], "main_object", 3] for k in range(5))
        cw.writerow(["c9", "'=n02", task["class_index"], task["feature_index"], "main_object", 3])  # another class's wnid
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [str(path)], ingest.known_classes(w.build))
    assert (summary["accepted"], summary["rejected"]) == (5, 1)
    [label] = storage.read_parquet(storage.join(out, tables.LABELS.path)).to_pylist()
    assert (label["wnid"], label["label"]) == ("-n01", "core")
    [bad] = storage.read_parquet(storage.join(out, tables.REJECTED.path)).to_pylist()
    assert bad["reason_kind"] == "wnid_mismatch"


def test_every_table_naming_classes_follows_the_class_metadata(hostile_world, tmp_path):
    w = hostile_world
    cfg = w.cfg.model_copy(deep=True)
    metadata = tmp_path / "classes.csv"
    cfg.dataset.class_metadata = str(metadata)

    def names_everywhere(build: str) -> dict[str, list]:
        classes = _classes(build)
        pairs = read_pairs(build)
        index = open(os.path.join(build, tables.REPORT.path)).read()
        pages = [open(os.path.join(build, tables.report_class_page(i))).read() for i in range(4)]
        return {
            "classes.parquet": [(classes[i]["name"], classes[i]["definition"], classes[i]["supercategory"]) for i in range(4)],
            "tasks.csv": [(t["class_name"], t["definition"], t["supercategory"]) for t in _tasks(build)],
            "app": [(p.class_name, p.definition, p.supercategory) for p in pairs],
            "report": [f"{i}: {wnid} {classes[i]['name']}" in pages[i] and f"<td>{wnid}</td><td><a href='classes/{i:05d}.html'>{classes[i]['name']}</a>" in index
                       for i, wnid in enumerate(WNIDS)],
        }

    def expected(tag: str) -> dict[str, list]:
        shown = [(f"{tag} name {i}", f"{tag} gloss {i}", f"{tag} group") for i in range(4)]
        return {"classes.parquet": shown, "tasks.csv": shown, "app": shown, "report": [True] * 4}

    # A new build after the metadata changed: every table names the classes anew.
    _write_metadata(metadata, "new")
    second = build_stages(cfg, "20260101T000001Z-bbbbbb", ["activations", "aggregate", "discover", "report"])
    assert names_everywhere(second) == expected("new")
    assert _classes(w.build)[0]["name"] == "old name 0", "the first build is left as it was"

    # Discovery alone on that build after another change takes the names from the build's classes
    # table, not from the file: the tables of one build never contradict each other...
    _write_metadata(metadata, "third")
    build_stages(cfg, "20260101T000001Z-bbbbbb", ["discover", "report"])
    assert names_everywhere(second) == expected("new")
    # ...and the aggregation, whose key holds the metadata's content, brings them all up to date.
    build_stages(cfg, "20260101T000001Z-bbbbbb", ["aggregate", "discover", "report"])
    assert names_everywhere(second) == expected("third")
