"""Prefect task of the evaluation stage: every model and sigma on the Ray actor pool, results cached."""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task

from salient import evaluate, plots, storage
from salient.config import Config, EvalModelConfig
from salient.masks import INDEX_TABLE
from salient.resources import plan_workers
from tasks.ray_pool import ray_cluster, run_pool


def _build_runner(config: Config, entry: EvalModelConfig, sigmas: list[float], threads: int) -> evaluate.EvalRunner:
    e = config.evaluate
    return evaluate.EvalRunner(
        entry, config.output, config.dataset.root, config.preprocess, sigmas, e.trials, e.seed,
        batch_size=config.compute.batch_size, threads=threads,
    )


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_models(config: Config, max_attempts: int = 3) -> dict:
    """Clean, core and spurious accuracy of every configured model at every sigma, as tables and plots."""
    logger = get_run_logger()
    e = config.evaluate
    if not e.models:
        raise ValueError("evaluate.models is empty; list the classifiers to measure ({name, arch, checkpoint, format})")
    index_uri = storage.join(config.output, INDEX_TABLE)
    index = storage.read_parquet(index_uri)
    index_fp = storage.parquet_metadata(index_uri)["fingerprint"]
    blocks = evaluate.blocks_of(evaluate.plan_images(index), e.images_per_block)
    results: dict[tuple[str, float], pa.Table] = {}
    reused = 0
    for entry in e.models:
        sha = storage.sha256(entry.checkpoint)
        keys = {s: evaluate.cache_key(entry, sha, s, e.trials, e.seed, index_fp, config.preprocess) for s in e.sigmas}
        missing = [s for s, k in keys.items() if not storage.exists(evaluate.cache_uri(config.output, entry.name, k))]
        reused += len(e.sigmas) - len(missing)
        if missing and blocks:
            logger.info("%s: %d images in %d blocks at sigma %s", entry.name, index.num_rows, len(blocks), missing)
            with ray_cluster(config.compute.ray_address) as cluster:
                res = plan_workers(config.compute, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
                run = run_pool(functools.partial(_build_runner, config, entry, missing, res.threads), blocks, res, max_attempts=max_attempts)
            if run.failed:
                raise RuntimeError(f"{entry.name}: {len(run.failed)} blocks failed ({run.failed[0][1]}); rerun to retry them")
            table = pa.concat_tables(run.results)
            clean = table.filter(pc.equal(table.column("condition"), evaluate.CLEAN))
            for s in missing:
                part = pa.concat_tables([clean, table.filter(pc.equal(table.column("sigma"), s))])
                storage.write_parquet(evaluate.cache_uri(config.output, entry.name, keys[s]), part, keys[s])
        for s in e.sigmas:
            uri = evaluate.cache_uri(config.output, entry.name, keys[s])
            results[(entry.name, s)] = storage.read_parquet(uri) if storage.exists(uri) else evaluate.results_table([])
    pairs, classes, summary = evaluate.build_tables(index, results)
    fp = storage.fingerprint(evaluate.CODE_VERSION, index_fp, config.evaluate.model_dump())
    for uri, table in ((evaluate.PAIRS_TABLE, pairs), (evaluate.CLASSES_TABLE, classes), (evaluate.SUMMARY_TABLE, summary)):
        storage.write_parquet(storage.join(config.output, uri), table, fp)
    for entry in e.models:
        chart = plots.accuracy_chart(
            entry.name,
            [r for r in summary.to_pylist() if r["model"] == entry.name],
            [r for r in pairs.to_pylist() if r["model"] == entry.name and r["sigma"] == e.sigmas[-1]],
            e.sigmas[-1],
        )
        storage.write_bytes_atomic(storage.join(config.output, evaluate.DIRNAME, f"{storage.safe_relpath(entry.name)}.png"), chart)
    logger.info("evaluated %d models x %d sigmas (%d reused from cache)", len(e.models), len(e.sigmas), reused)
    return {"models": len(e.models), "sigmas": len(e.sigmas), "reused": reused, "summary": summary.to_pylist()}
