"""Prefect task of the generalisation stage: masks for the top-K images of every labelled pair."""

from __future__ import annotations

import functools

from prefect import get_run_logger, task

from salient import builds, masks, storage
from salient.config import Config
from salient.resources import plan_workers
from tasks.ray_pool import compute_cluster, run_pool


def _build_runner(config: Config, threads: int) -> masks.MaskRunner:
    return masks.MaskRunner(config.model, config.preprocess, batch_size=config.compute.batch_size, threads=threads)


@task(name="generalize", retries=1, retry_delay_seconds=5)
def generalize_masks(config: Config, layout: builds.Layout, max_attempts: int = 3) -> dict:
    """Compute the uncommitted mask blocks on the actor pool (the model runs only for pairs whose
    NAMs are not cached), then write the mask index; the whole mask store is copied from the cache
    when the same masks were made before."""
    logger = get_run_logger()
    out = layout.build
    rows = masks.plan_rows(out, config.generalize)
    stage_fp = masks.stage_fingerprint(storage.sha256(config.model.checkpoint), config.model, config.preprocess, config.generalize)
    index_fp = masks.index_fingerprint(stage_fp, rows)
    index_uri = storage.join(out, masks.INDEX_TABLE)
    fresh = storage.exists(index_uri) and storage.parquet_metadata(index_uri).get("fingerprint") == index_fp
    if not fresh and builds.read_entry(layout.root, masks.DIRNAME, index_fp) is not None:
        storage.remove(storage.join(out, masks.DIRNAME), recursive=True)
        builds.restore_entry(layout.root, masks.DIRNAME, index_fp, out)
        logger.info("%d masks reused from the cache", rows.num_rows)
    keys = masks.pair_keys(rows, stage_fp)
    cached, nam_shape = masks.cached_nams(layout.root, rows, keys)
    todo, n_blocks, index_fp = masks.prepare(
        out, config.dataset.root, rows, config.preprocess.crop, config.generalize, stage_fp, cached, nam_shape
    )
    logger.info("%d masks in %d blocks; %d blocks to compute", rows.num_rows, n_blocks, len(todo))
    if todo:
        with compute_cluster(config.compute) as cluster:
            res = plan_workers(config.compute, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
            result = run_pool(
                functools.partial(_build_runner, config, res.threads), todo, res, max_attempts=max_attempts,
                on_result=lambda s: logger.info(
                    "block %05d: %d masks, %d of them from %d images through the model", s["block"], s["masks"], s["inferred_masks"], s["images"]
                ),
            )
        if result.failed:
            lines = "; ".join(f"block {b.index:05d}: {reason}" for b, reason in result.failed[:5])
            raise RuntimeError(f"{len(result.failed)} mask blocks failed after {max_attempts} attempts ({lines}); rerun to retry them")
    if todo or not storage.exists(index_uri) or storage.parquet_metadata(index_uri).get("fingerprint") != index_fp:
        masks.write_index(out, rows, n_blocks, index_fp)
    entries = masks.cache_pair_nams(layout.root, out, rows, keys, n_blocks)
    entries.append(f"{masks.DIRNAME}/{index_fp}")
    if builds.read_entry(layout.root, masks.DIRNAME, index_fp) is None:
        rels = [f"{masks.DIRNAME}/{r}" for r in storage.list_files(storage.join(out, masks.DIRNAME))]
        builds.save_entry(layout.root, masks.DIRNAME, index_fp, out, rels)
    builds.record_cache_use(out, entries)
    images = len(set(rows.column("image_id").to_pylist()))
    inferred = sum(s["inferred_masks"] for s in result.results) if todo else 0
    return {
        "masks": rows.num_rows, "images": images, "blocks": n_blocks, "computed_blocks": len(todo),
        "inferred_masks": inferred, "index": index_uri,
    }
