"""Prefect task of the discovery stage: the assets of every pair on the Ray actor pool, then tasks.csv."""

from __future__ import annotations

import functools

from prefect import get_run_logger, task

from salient import builds, discover, metadata, storage
from salient.config import Config
from salient.resources import plan_workers
from tasks.ray_pool import compute_cluster, run_pool


def _build_runner(config: Config, threads: int) -> discover.DiscoverRunner:
    return discover.DiscoverRunner(config.model, config.preprocess, config.discover, threads=threads)


@task(name="discover", retries=1, retry_delay_seconds=5)
def discover_pairs(config: Config, layout: builds.Layout, max_attempts: int = 3) -> dict:
    """Images, heatmaps and feature attacks of every pair (unchanged pairs reused), and the task table."""
    logger = get_run_logger()
    weights = storage.sha256(config.model.checkpoint)
    todo, done = discover.plan_work(layout.build, config.dataset.root, weights, config.model, config.preprocess, config.discover, layout.root)
    made = sum(len(w.pairs) for w in todo)
    logger.info("%d pairs to make in %d classes, %d reused", made, len(todo), len(done))
    records = list(done)
    if todo:
        with compute_cluster(config.compute) as cluster:
            res = plan_workers(config.compute, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
            result = run_pool(
                functools.partial(_build_runner, config, res.threads), todo, res, max_attempts=max_attempts,
                on_result=lambda recs: logger.info("class %d: %d pairs made", recs[0]["class_index"], len(recs)),
            )
        if result.failed:
            lines = "; ".join(f"class {w.class_index}: {reason}" for w, reason in result.failed[:5])
            raise RuntimeError(f"{len(result.failed)} classes failed after {max_attempts} attempts ({lines}); rerun to retry them")
        made_records = [r for recs in result.results for r in recs]
        for record in made_records:
            discover.cache_pair(layout.root, layout.build, record)
        records += made_records
    builds.record_cache_use(layout.build, [f"{discover.DIRNAME}/{r['fingerprint']}" for r in records])
    meta = metadata.read_class_metadata(config.dataset.class_metadata) if config.dataset.class_metadata else None
    uri = discover.write_tasks(layout.build, records, meta, config.discover.base_url)
    logger.info("wrote %d tasks to %s", len(records), uri)
    return {"pairs": len(records), "made": made, "reused": len(done), "tasks": uri}
