"""The "Use the dataset" snippets of docs/outputs.md (docs/snippets/), each run as a user would run it
against a published demo build, its output checked against the build's Parquet files read with pyarrow."""

import glob
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from salient import cli, demo, train, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = os.path.join(ROOT, "docs", "snippets")
SIZE = 32
MASKS_PER_PAIR = 4


@pytest.fixture(scope="module")
def published(tmp_path_factory, ray_session, prefect_server):
    """A tiny demo world and model, one `salient run` on it: ``(output root, latest build dir, env for snippets)``."""
    base = tmp_path_factory.mktemp("downstream")
    world_dir = os.path.join(base, "world")
    world.synthesize(world_dir, classes=3, per_class=8, size=SIZE, seed=0)
    train.train_demo(world_dir, os.path.join(base, "models", "biased.pt"), epochs=2)
    cfg = demo.demo_config(str(base), SIZE)
    cfg["compute"].update({"shard_size": 10, "gpus_per_worker": 0})
    cfg["aggregate"] = {"features_per_class": 2, "grouping": "label"}
    cfg["discover"] = {"images_per_pair": 3, "attack_steps": 3}
    cfg["generalize"] = {"images_per_pair": MASKS_PER_PAIR, "masks_per_shard": 5}
    cfg["evaluate"] = {"models": [m for m in cfg["evaluate"]["models"] if m["name"] == "biased"], "sigmas": [0.5]}
    config_path = os.path.join(base, "salient.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    assert cli.main(["run", config_path]) == 0
    out = cfg["output"]
    with open(os.path.join(out, "latest")) as fh:
        pointer = json.load(fh)
    build = os.path.join(out, pointer["path"])
    assert os.path.exists(os.path.join(build, "manifest.json")), "the published build is complete"
    env = {**os.environ, "SALIENT_OUT": out, "HF_HOME": str(base / "hf")}
    return out, build, env


def run_snippet(name: str, env: dict) -> list[str]:
    """Run ``docs/snippets/<name>`` as a script; its stdout lines."""
    done = subprocess.run(
        [sys.executable, os.path.join(SNIPPETS, name)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr}"
    return done.stdout.splitlines()


def read(build: str, rel: str) -> list[dict]:
    return pq.read_table(os.path.join(build, rel)).to_pylist()


def class_names(build: str) -> dict[int, str]:
    return {r["class_index"]: r["name"] for r in read(build, "classes.parquet")}


def spurious_pairs(build: str) -> list[dict]:
    """Spurious label rows in (class, feature rank) order."""
    rows = [r for r in read(build, "annotations/labels.parquet") if r["label"] == "spurious"]
    return sorted(rows, key=lambda r: (r["class_index"], r["feature_rank"]))


def test_the_demo_build_has_what_the_snippets_show(published):
    _, build, _ = published
    labels = read(build, "annotations/labels.parquet")
    assert len(labels) == 3 * 2, "3 classes x 2 features"
    assert spurious_pairs(build), "the biased demo model has spurious pairs to show"
    assert len(read(build, "masks/index.parquet")) == MASKS_PER_PAIR * sum(r["label"] in ("core", "spurious") for r in labels)


def test_pandas(published):
    _, build, env = published
    lines = run_snippet("pandas_pairs.py", env)
    names = class_names(build)
    labels = read(build, "annotations/labels.parquet")
    header = lines[0].split()
    assert header[0] == "label" and lines[1].split() == ["name"]
    columns = header[1:]
    assert columns == sorted({r["label"] for r in labels})
    table = {}
    for line in lines[2:2 + len(names)]:
        name, *counts = line.split()
        table[name] = dict(zip(columns, map(int, counts)))
    expected = Counter((names[r["class_index"]], r["label"]) for r in labels)
    assert table == {n: {c: expected[(n, c)] for c in columns} for n in sorted(set(names.values()))}
    assert lines[2 + len(names):] == [
        f"spurious: {names[r['class_index']]} feature {r['feature_index']} ({r['kind']})" for r in spurious_pairs(build)
    ]


def test_polars(published):
    _, build, env = published
    lines = run_snippet("polars_topk.py", env)
    pairs = {(r["class_index"], r["feature_index"]) for r in spurious_pairs(build)}
    top = [r for r in read(build, "topk/class.parquet") if (r["class_index"], r["feature_index"]) in pairs]
    assert lines[0] == f"{len(top)} top images of {len(pairs)} spurious pairs"
    first = sorted((r["class_index"], r["feature_index"], r["relpath"]) for r in top if r["rank"] == 1)
    assert len(first) == len(pairs)
    assert lines[1:] == [f"class {c} feature {f}: {rel}" for c, f, rel in first]


def test_duckdb(published):
    _, build, env = published
    lines = run_snippet("duckdb_sql.py", env)
    names = class_names(build)
    by_name: dict[str, list[int]] = {}
    for r in spurious_pairs(build):
        by_name.setdefault(names[r["class_index"]], []).append(r["feature_index"])
    assert lines == [f"{n}: {len(f)} spurious pairs, features {f}" for n, f in sorted(by_name.items())]


def test_hf_datasets(published):
    _, build, env = published
    lines = run_snippet("hf_datasets.py", env)
    index = read(build, "masks/index.parquet")
    spurious = [r for r in index if r["label"] == "spurious"]
    assert lines[0] == f"{len(index)} masks, {len(spurious)} from spurious pairs over {len({r['relpath'] for r in spurious})} images"
    first = spurious[0]
    assert lines[1] == str({"row": first["row"], "relpath": first["relpath"], "feature_index": first["feature_index"], "kind": first["kind"]})


def rebuilt_mask(row: dict) -> np.ndarray:
    """A mask from its index row alone: the stored NAM, bilinearly upsampled (half-pixel centres) to the
    crop, times 255 (the stored NAM is float16, so values may differ from the stored mask by one)."""
    nam = torch.tensor(row["nam"], dtype=torch.float32).reshape(1, 1, row["nam_h"], row["nam_w"])
    up = F.interpolate(nam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    return np.round(255 * up.numpy())


def test_zarr(published):
    _, build, env = published
    lines = run_snippet("zarr_masks.py", env)
    index = read(build, "masks/index.parquet")
    assert lines[0] == f"masks ({len(index)}, {SIZE}, {SIZE}) uint8"
    first = index[0]
    head, stats = lines[1].split(": max ")
    assert head == f"{first['relpath']} feature {first['feature_index']} ({first['label']})"
    top, mean = stats.split(", mean ")
    expected = rebuilt_mask(first)
    assert abs(int(top) - expected.max()) <= 1
    assert float(mean) == pytest.approx(expected.mean() / 255, abs=2e-3)


def test_torch_dataset(published):
    _, build, env = published
    lines = run_snippet("torch_dataset.py", env)
    index = read(build, "masks/index.parquet")
    images = list(dict.fromkeys(r["relpath"] for r in index))
    batch = min(4, len(images))
    assert lines[0] == (
        f"{len(images)} images; batch: image ({batch}, 3, {SIZE}, {SIZE}), core ({batch}, {SIZE}, {SIZE}), spurious ({batch}, {SIZE}, {SIZE})"
    )
    label_of = {r["relpath"]: r["image_label"] for r in index}
    spurious_rows = [r for r in index if r["relpath"] == images[0] and r["label"] == "spurious"]
    expected_max = max((rebuilt_mask(r).max() for r in spurious_rows), default=0.0) / 255
    prefix, value = lines[1].rsplit(" ", 1)
    assert prefix == f"labels {[label_of[rel] for rel in images[:batch]]}, spurious mask max"
    assert float(value) == pytest.approx(expected_max, abs=1.5 / 255)


def test_outputs_doc_shows_each_snippet_verbatim():
    with open(os.path.join(ROOT, "docs", "outputs.md")) as fh:
        doc = fh.read()
    assert "\n## Use the dataset\n" in doc, 'docs/outputs.md needs its "## Use the dataset" section showing docs/snippets/*.py'
    snippets = sorted(glob.glob(os.path.join(SNIPPETS, "*.py")))
    assert snippets
    for path in snippets:
        with open(path) as fh:
            code = fh.read().strip()
        assert code in doc, f"docs/outputs.md does not show {os.path.relpath(path, ROOT)} as it is"
