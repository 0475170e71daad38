"""A Ray worker SIGKILLed mid-block in the generalisation stage: the block is computed again and the
mask index and the mask array come out exactly as in a clean build."""

import functools
import os
import shutil
import signal

import numpy as np

from salient import masks, storage
from tests.faults import assert_same_tables, build_tables, fault_config

KILLED_BLOCK = 1


class _KillBeforeCommit:
    """Runs mask blocks; the first time block ``KILLED_BLOCK`` is about to be committed, fills its
    rows of the mask array with 255 (a torn write) and SIGKILLs its own process."""

    def __init__(self, runner: masks.MaskRunner, once: str) -> None:
        self.runner, self.once = runner, once

    def __call__(self, block: masks.MaskBlock) -> dict:
        if block.index != KILLED_BLOCK or os.path.exists(self.once):
            return self.runner(block)
        open(self.once, "w").close()
        commit = storage.write_json

        def torn_then_killed(uri: str, obj: object) -> None:
            if uri == masks.block_marker(block.build, block.index):
                arr = masks.open_array(block.build, mode="r+")
                arr[block.start : block.start + len(block.relpaths)] = np.full((len(block.relpaths), *arr.shape[1:]), 255, np.uint8)
                os.kill(os.getpid(), signal.SIGKILL)
            commit(uri, obj)

        storage.write_json = torn_then_killed  # this process dies before the marker is written
        return self.runner(block)


def _killing_runner(once: str, model, preprocess, compute, threads: int | None) -> _KillBeforeCommit:
    return _KillBeforeCommit(masks.MaskRunner(model, preprocess, compute, threads=threads), once)


def test_worker_killed_mid_block_loses_and_duplicates_no_mask(reference, tmp_path, monkeypatch, ray_session, prefect_server):
    import salient.stages.generalize
    from flows.rebuild import rebuild_flow

    # a rebuild of the clean build's output root in which only the masks are not cached
    root = tmp_path / "out"
    shutil.copytree(reference.root, root)
    for stage in ("generalize", masks.NAMS_STAGE):
        shutil.rmtree(root / "cache" / stage)
    once = tmp_path / "killed-once"
    monkeypatch.setattr(salient.stages.generalize, "_runner", functools.partial(_killing_runner, str(once)))

    result = rebuild_flow(fault_config(reference.world, reference.checkpoint, str(root)))

    assert once.exists(), "the worker was killed"
    generalize = result["stages"]["generalize"]
    assert generalize["computed_blocks"] == generalize["blocks"] > KILLED_BLOCK
    assert generalize["inferred_masks"] == generalize["masks"], "every mask was computed in this build"
    assert result["published"] and result["build"] != reference.build
    assert_same_tables(build_tables(str(root), result["build"]), reference.tables)
