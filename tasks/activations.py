"""Prefect tasks of the activation stage: plan, compute shards on the Ray actor pool, summarise."""

from __future__ import annotations

import functools
import sys

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from salient import activations, builds, storage
from salient import plan as planmod
from salient.config import Config
from salient.resources import plan_workers
from tasks.ray_pool import compute_cluster, run_pool


@task(name="plan-images", retries=2, retry_delay_seconds=5)
def plan_images(config: Config, layout: builds.Layout) -> dict:
    """List the dataset in ImageFolder order and write the shard plan."""
    summary = planmod.write_plan(config.dataset.root, layout.build, config.compute.shard_size)
    logger = get_run_logger()
    logger.info(
        "planned %d images in %d classes as %d shards of up to %d",
        summary["images"], summary["classes"], summary["shards"], config.compute.shard_size,
    )
    if summary["skipped"]:
        logger.warning(
            "%d entries under the dataset root are not planned (e.g. %s); the reasons are in plan.parquet's metadata",
            summary["skipped"], ", ".join(summary["skipped_examples"]),
        )
    return summary


def _build_runner(config: Config, threads: int) -> activations.ActivationRunner:
    return activations.ActivationRunner(config.model, config.preprocess, config.compute, threads=threads)


@task(name="compute-activations", retries=1, retry_delay_seconds=5)
def compute_activations(config: Config, layout: builds.Layout, max_attempts: int = 3) -> list[dict]:
    """Run every shard neither committed in the build nor cached on the actor pool; returns the stats of all shards."""
    logger = get_run_logger()
    weights = storage.sha256(config.model.checkpoint)
    todo, done = activations.shard_tasks(config.dataset.root, layout.build, weights, config.model, config.preprocess, layout.root)
    if done:
        logger.info("%d shards already computed from the same inputs; reusing them", len(done))
    if not todo:
        return done
    total = sum(len(t.shard) for t in todo)
    with compute_cluster(config.compute) as cluster:
        res = plan_workers(config.compute, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
        logger.info(
            "%d shards (%d images) on %d workers x (%g GPU, %g CPU)",
            len(todo), total, res.workers, res.gpus_per_worker, res.cpus_per_worker,
        )
        builder = functools.partial(_build_runner, config, res.threads)
        progress = Progress(
            TextColumn("activations"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            disable=not sys.stderr.isatty(), transient=True,
        )

        def on_result(stats: dict) -> None:
            progress.advance(bar, stats["planned"])
            logger.info(
                "shard %05d: %d images, %d failed, %.1f images/s (read %.1fs, decode %.1fs, infer %.1fs, write %.1fs)",
                stats["shard"], stats["images"], stats["failed"], stats["images_per_second"] or 0.0,
                *(stats["seconds"][k] for k in ("read", "decode", "infer", "write")),
            )

        def on_retry(task_: activations.ShardTask, attempt: int, reason: str) -> None:
            logger.warning("shard %05d attempt %d failed: %s; retrying", task_.shard.index, attempt, reason)

        with progress:
            bar = progress.add_task("activations", total=total)
            result = run_pool(builder, todo, res, max_attempts=max_attempts, on_result=on_result, on_retry=on_retry)
    if result.replaced_workers:
        logger.warning("replaced %d dead workers", result.replaced_workers)
    if result.failed:
        lines = "; ".join(f"shard {t.shard.index:05d}: {reason}" for t, reason in result.failed[:5])
        raise RuntimeError(f"{len(result.failed)} shards failed after {max_attempts} attempts ({lines}); rerun to retry them")
    for stats in result.results:
        stats["computed_now"] = True
    return done + result.results


@task(name="summarize-activations")
def summarize_activations(config: Config, layout: builds.Layout, stats: list[dict]) -> dict:
    """Totals, failures and a per-shard throughput table artifact."""
    summary = activations.summarize(stats, layout.build)
    summary["computed_shards"] = sum(bool(s.get("computed_now")) for s in stats)
    builds.record_cache_use(layout.build, activations.cache_entries(layout.build))
    rows = [
        {
            "shard": s["shard"], "images": s["images"], "failed": s["failed"],
            "images_per_second": s["images_per_second"], "worker": f"{s['worker']['host']}:{s['worker']['pid']}",
            "device": s["worker"]["device"],
        }
        for s in sorted(stats, key=lambda s: s["shard"])
    ]
    create_table_artifact(key="activations-shards", table=rows, description="Per-shard activation throughput")
    logger = get_run_logger()
    logger.info("activations: %d images in %d shards, %d failed", summary["images"], summary["shards"], summary["failed"])
    if summary["failed"]:
        logger.warning("failed images are listed in: %s", ", ".join(summary["failure_lists"]))
    return summary
