"""Faults injected into whole builds: each test proves that nothing was lost or duplicated by
comparing the build's tables with those of a clean build of the same world (the ``reference``
fixture in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from salient import config, masks, storage
from salient import plan as planmod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Columns that describe the files as their store keeps them (an ETag, a modification time): the
# same world on another store, or copied, has other values there.
STORE_COLUMNS = {planmod.PLAN_TABLE: ("version",)}


@dataclass(frozen=True)
class Reference:
    """A clean, published build of the fault tests' world, and its tables."""

    world: str
    checkpoint: str
    root: str
    build: str
    tables: dict[str, list[str]]


def fault_config(world_dir: str, checkpoint: str, output: str, overrides: Iterable[str] = ()) -> config.Config:
    """The fault tests' build: 3 classes x 8 images of 32 px in shards of 2, one CPU thread per
    worker wherever it runs (so every run computes the same numbers), every stage but evaluate."""
    return config.load(None, [
        f"dataset.root={world_dir}/train", f"dataset.class_metadata={world_dir}/classes.csv",
        f"model.checkpoint={checkpoint}", "model.arch=tiny_resnet", "model.format=robustness",
        "preprocess.resize=32", "preprocess.crop=32", f"output={output}",
        "compute.shard_size=2", "compute.cpus_per_worker=1", "compute.batch_size=4",
        "aggregate.features_per_class=2", "aggregate.grouping=label",
        "discover.images_per_pair=2", "discover.attack_steps=1",
        "generalize.images_per_pair=4", "generalize.masks_per_shard=4", "evaluate.models=[]",
        *overrides,
    ])


def write_config(cfg: config.Config, path: str) -> str:
    storage.write_bytes_atomic(path, config.to_yaml(cfg).encode())
    return path


def build_tables(root: str, build: str) -> dict[str, list[str]]:
    """Every table of a build under the output root ``root`` as its rows sorted (JSON lines, the
    root written as ``OUT``), and the mask array row by row.

    Keyed by path in the build; the blocks the mask index is assembled from are left out."""
    out: dict[str, list[str]] = {}
    for rel in storage.list_files(build):
        if rel.endswith(".parquet") and not rel.startswith(f"{masks.BLOCKS}/"):
            table = storage.read_parquet(storage.join(build, rel))
            rows = table.drop_columns([c for c in STORE_COLUMNS.get(rel, ()) if c in table.column_names]).to_pylist()
            out[rel] = sorted(json.dumps(row, sort_keys=True, default=str).replace(root, "OUT") for row in rows)
    if storage.exists(storage.join(build, masks.INDEX_TABLE)):
        out[masks.ZARR_PATH] = [row.tobytes().hex() for row in masks.open_array(build)[:]]
    return out


def assert_same_tables(got: dict[str, list[str]], want: dict[str, list[str]]) -> None:
    """The same tables, each with the same rows: none lost, none duplicated, none changed."""
    assert sorted(got) == sorted(want), "a build's tables differ from the clean build's"
    for rel in want:
        assert len(got[rel]) == len(want[rel]), f"{rel}: {len(got[rel])} rows, the clean build has {len(want[rel])}"
        assert got[rel] == want[rel], f"{rel}: rows differ from the clean build's"


def spawn_run(config_path: str, log: str, env: dict[str, str] | None = None, argv: list[str] | None = None) -> subprocess.Popen:
    """``salient run CONFIG`` (or ``python ARGV``) in its own process group, on the test session's
    Prefect server, with output to ``log``."""
    from prefect.settings import PREFECT_API_URL

    full_env = {**os.environ, "PYTHONPATH": ROOT, "PREFECT_API_URL": str(PREFECT_API_URL.value()), **(env or {})}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, *(argv or ["-m", "salient.cli", "run", config_path])], cwd=ROOT, env=full_env,
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (started by :func:`spawn_run`) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_run(proc: subprocess.Popen, timeout_s: float = 900) -> int:
    """The exit status of a run started by :func:`spawn_run`; its process group is killed on the
    way out, whatever happens."""
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        kill_group(proc)
