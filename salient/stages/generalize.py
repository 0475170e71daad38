"""The generalize stage: soft masks (the pairs' NAMs) for the top-K images of every labelled
pair, into ``masks/masks.zarr`` with ``masks/index.parquet``. An item is a block of masks, exactly
one Zarr shard, written by one worker. Besides the blocks, each pair's NAMs are kept by the model,
preprocessing and the pair's top images, so a late answer that labels one more pair runs the
model only on that pair's images."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pyarrow as pa

from salient import builds, masks, storage, tables
from salient.config import ComputeConfig, ModelConfig, PreprocessConfig
from salient.stage import Builder, Item, Run, Stage


def _runner(model: ModelConfig, preprocess: PreprocessConfig, compute: ComputeConfig, threads: int | None) -> masks.MaskRunner:
    return masks.MaskRunner(model, preprocess, compute, threads=threads)


INDEX = "generalize-index"  # the cache entries of masks/index.parquet, by the index's fingerprint


class Generalize(Stage):
    name = "generalize"
    help = "soft masks for the top-K images of every labelled pair (Zarr + Parquet index)"
    code_version = masks.CODE_VERSION
    requires = ("dataset", "model", "output")
    sections = ("model", "preprocess", "compute", "generalize")
    needs_discovery = True
    uses_gpus = True
    unit = "masks"

    def _rows(self, run: Run) -> tuple[pa.Table, str, dict[tuple[int, int], str]]:
        """The mask rows, the stage's key, and each pair's NAM cache key."""
        rows = masks.plan_rows(run.build, run.config.generalize)
        stage_fp = self.key(run)
        return rows, stage_fp, masks.pair_keys(rows, stage_fp)

    def plan(self, run: Run) -> list[Item]:
        cfg = run.config
        rows, stage_fp, _ = self._rows(run)
        blocks = masks.prepare(run.build, cfg.dataset.root, rows, cfg.preprocess.crop, cfg.generalize, stage_fp)
        return [
            Item(
                b.fingerprint, tables.mask_block_marker(b.index),
                (tables.mask_block_nams(b.index), tables.mask_shard_object(b.index)), b, f"block {b.index:05d}", len(b.relpaths),
            )
            for b in blocks
        ]

    def worker(self, run: Run) -> Builder:
        cfg = run.config
        return functools.partial(_runner, cfg.model, cfg.preprocess, cfg.compute)

    def compute(self, run: Run, todo: list[Item], done: Callable[[Item, dict], None]) -> None:
        self.use_cached_nams(run, todo)
        super().compute(run, todo, done)

    def use_cached_nams(self, run: Run, todo: list[Item]) -> None:
        """Give the blocks to make the cached NAMs of their pairs (read here, not when planning:
        a rerun that takes every block from the cache reads none)."""
        rows, _, keys = self._rows(run)
        masks.use_cached_nams(run.root, rows, keys, [item.payload for item in todo])

    def on_result(self, run: Run, item: Item, result: dict) -> None:
        run.log.debug(
            "block %05d: %d masks, %d of them from %d images through the model",
            result["block"], result["masks"], result["inferred_masks"], result["images"],
        )

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        rows, stage_fp, keys = self._rows(run)
        index_fp = masks.index_fingerprint(stage_fp, rows)
        index_uri = storage.join(run.build, tables.MASK_INDEX.path)
        in_build = storage.exists(index_uri) and storage.parquet_metadata(index_uri).get("fingerprint") == index_fp
        if not in_build and builds.restore_entry(run.root, INDEX, index_fp, run.build) is None:
            masks.write_index(run.build, rows, len(results), index_fp)
            builds.save_entry(run.root, INDEX, index_fp, run.build, [tables.MASK_INDEX.path])
        used = [f"{INDEX}/{index_fp}"]
        if any(origin == "computed" for _, _, origin in results):
            used += masks.cache_pair_nams(run.root, run.build, rows, keys, len(results))
        else:  # the blocks were all made before, and their pairs' NAMs kept then
            used += [f"{masks.NAMS_STAGE}/{key}" for key in keys.values()]
        builds.record_cache_use(run.build, used)
        computed = [r for _, r, origin in results if origin == "computed"]
        return {
            "masks": rows.num_rows, "images": len(set(rows.column("image_id").to_pylist())), "blocks": len(results),
            "computed_blocks": len(computed), "inferred_masks": sum(r["inferred_masks"] for r in computed), "index": index_uri,
        }

    def counts(self, s: dict) -> dict[str, int]:
        return {"masks": s["masks"]}

    def describe(self, s: dict) -> str:
        return (
            f"generalize: {s['masks']} masks of {s['images']} images in {s['blocks']} Zarr shards "
            f"({s['computed_blocks']} computed) -> {s['index']}"
        )
