"""salient.tables is the build layout: docs/outputs.md lists exactly its tables, every table names
a stage that exists, and a real build holds every table its stages write, with its key columns."""

import csv
import io
import os
import re

import pyarrow.parquet as pq
import pytest

from salient import stages, storage, tables
from salient.stage import execute, local_run
from tests.helpers import tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTSIDE_THE_REGISTRY = ("study", "run", "import")  # `salient study export|ingest`; the manifest of `salient run`; `salient import reference`


def documented_tables() -> list[tuple[str, str]]:
    """(path, stage) of every row of the `## Tables` table in docs/outputs.md, in order."""
    with open(os.path.join(ROOT, "docs", "outputs.md"), encoding="utf-8") as fh:
        text = fh.read()
    section = text.split("\n## Tables\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def test_docs_list_exactly_the_tables_of_the_layout_in_build_order():
    assert documented_tables() == [(t.path, t.stage) for t in tables.ALL]


def test_every_table_is_written_by_a_stage_there_is_and_named_once():
    assert len({t.path for t in tables.ALL}) == len(tables.ALL)
    unknown = [(t.path, t.stage) for t in tables.ALL if t.stage not in (*stages.NAMES, *OUTSIDE_THE_REGISTRY)]
    assert not unknown, f"stages that are not in salient.stages.NAMES: {unknown}"
    assert all(isinstance(t.columns, tuple) and all(isinstance(c, str) for c in t.columns) for t in tables.ALL)


def test_per_item_paths_fill_the_tables_placeholders():
    assert tables.activation_shard(7) == "activations/part-00007.parquet"
    assert tables.activation_marker(7) == "activations/part-00007.json"
    assert tables.predictions("resnet-50", 0.5) == "evaluation/predictions/resnet-50/sigma-0.5.parquet"
    assert tables.predictions_marker("m", 1.0) == "evaluation/predictions/m/sigma-1.json"
    assert tables.stage_marker("aggregate") == "stages/aggregate.json"
    with pytest.raises(storage.UnsafePathError):
        tables.predictions("../elsewhere", 0.5)


@pytest.fixture
def tiny_build(tmp_path):
    """Every stage of the registry run in this process on a 3-class world: the build directory and
    the evaluated models and sigmas."""
    cfg = tiny_pipeline(tmp_path)
    run = local_run(cfg, stages.STAGES)
    ran = [s for s in stages.STAGES if s.applies(cfg)]
    assert [s.name for s in ran] == list(stages.NAMES), "the world has ground truth and a model to evaluate"
    for stage in ran:
        execute(stage, run)
    return run.build, [(m.name, s) for m in cfg.evaluate.models for s in cfg.evaluate.sigmas]


def _columns(uri: str) -> list[str]:
    if uri.endswith(".parquet"):
        return pq.read_schema(storage.normalize_uri(uri)).names
    if uri.endswith(".csv"):
        return next(csv.reader(io.StringIO(storage.read_bytes(uri).decode("utf-8"))))
    return []


def test_a_build_holds_every_table_its_stages_write_with_its_key_columns(tiny_build):
    build, evaluated = tiny_build
    per_item = {
        tables.ACTIVATIONS: [tables.activation_shard(0)],
        tables.PREDICTIONS: [tables.predictions(model, sigma) for model, sigma in evaluated],
    }
    checked = []
    for table in tables.ALL:
        if table.stage in OUTSIDE_THE_REGISTRY:
            continue
        for rel in per_item.get(table, [table.path]):
            uri = storage.join(build, rel)
            assert storage.exists(uri), f"{rel} ({table.stage}) is missing from the build"
            missing = [c for c in table.columns if c not in _columns(uri)]
            assert not missing, f"{rel} lacks its key columns {missing}"
            checked.append(rel)
    assert len(checked) == sum(t.stage not in OUTSIDE_THE_REGISTRY for t in tables.ALL)
    assert storage.read_parquet(storage.join(build, tables.MASK_INDEX.path)).num_rows > 0, "the labels made masks"
