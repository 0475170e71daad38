"""Prefect task of the generalisation stage: masks for the top-K images of every labelled pair."""

from __future__ import annotations

import functools

from prefect import get_run_logger, task

from salient import masks, storage
from salient.config import Config
from salient.resources import plan_workers
from tasks.ray_pool import ray_cluster, run_pool


def _build_runner(config: Config, threads: int) -> masks.MaskRunner:
    return masks.MaskRunner(config.model, config.preprocess, batch_size=config.compute.batch_size, threads=threads)


@task(name="generalize", retries=1, retry_delay_seconds=5)
def generalize_masks(config: Config, max_attempts: int = 3) -> dict:
    """Compute the uncommitted mask blocks on the actor pool, then write the mask index."""
    logger = get_run_logger()
    rows = masks.plan_rows(config.output, config.generalize)
    stage_fp = masks.stage_fingerprint(storage.sha256(config.model.checkpoint), config.model, config.preprocess, config.generalize)
    todo, n_blocks, index_fp = masks.prepare(config.output, config.dataset.root, rows, config.preprocess.crop, config.generalize, stage_fp)
    logger.info("%d masks in %d blocks; %d blocks to compute", rows.num_rows, n_blocks, len(todo))
    if todo:
        with ray_cluster(config.compute.ray_address) as cluster:
            res = plan_workers(config.compute, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
            result = run_pool(
                functools.partial(_build_runner, config, res.threads), todo, res, max_attempts=max_attempts,
                on_result=lambda s: logger.info("block %05d: %d masks from %d images", s["block"], s["masks"], s["images"]),
            )
        if result.failed:
            lines = "; ".join(f"block {b.index:05d}: {reason}" for b, reason in result.failed[:5])
            raise RuntimeError(f"{len(result.failed)} mask blocks failed after {max_attempts} attempts ({lines}); rerun to retry them")
    index_uri = storage.join(config.output, masks.INDEX_TABLE)
    if todo or not storage.exists(index_uri) or storage.parquet_metadata(index_uri).get("fingerprint") != index_fp:
        masks.write_index(config.output, rows, n_blocks, index_fp)
    images = len(set(rows.column("image_id").to_pylist()))
    return {"masks": rows.num_rows, "images": images, "blocks": n_blocks, "computed_blocks": len(todo), "index": index_uri}
