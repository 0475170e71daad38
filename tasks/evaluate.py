"""Prefect task of the evaluation stage: every model and sigma on the Ray actor pool, results cached."""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task

from salient import builds, evaluate, plots, storage
from salient.config import Config, EvalModelConfig
from salient.masks import INDEX_TABLE
from salient.resources import plan_workers
from tasks.ray_pool import compute_cluster, run_pool

STAGE = "evaluation"
RESULTS = "results.parquet"


def _build_runner(config: Config, layout: builds.Layout, entry: EvalModelConfig, sigmas: list[float], threads: int) -> evaluate.EvalRunner:
    e = config.evaluate
    return evaluate.EvalRunner(
        entry, layout.build, config.dataset.root, config.preprocess, sigmas, e.trials, e.seed,
        batch_size=config.compute.batch_size, threads=threads,
    )


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_models(config: Config, layout: builds.Layout, max_attempts: int = 3) -> dict:
    """Clean, core and spurious accuracy of every configured model at every sigma, as tables and plots."""
    logger = get_run_logger()
    e = config.evaluate
    if not e.models:
        raise ValueError("evaluate.models is empty; list the classifiers to measure ({name, arch, checkpoint, format})")
    index_uri = storage.join(layout.build, INDEX_TABLE)
    index = storage.read_parquet(index_uri)
    index_fp = storage.parquet_metadata(index_uri)["fingerprint"]
    blocks = evaluate.blocks_of(evaluate.plan_images(index), e.images_per_block)
    results: dict[tuple[str, float], pa.Table] = {}
    reused = 0
    used: list[str] = []
    for entry in e.models:
        sha = storage.sha256(entry.checkpoint)
        keys = {s: evaluate.cache_key(entry, sha, s, e.trials, e.seed, index_fp, config.preprocess) for s in e.sigmas}
        missing = [s for s, k in keys.items() if builds.read_entry(layout.root, STAGE, k) is None]
        reused += len(e.sigmas) - len(missing)
        if missing and blocks:
            logger.info("%s: %d images in %d blocks at sigma %s", entry.name, index.num_rows, len(blocks), missing)
            with compute_cluster(config.compute) as cluster:
                res = plan_workers(config.compute, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
                run = run_pool(functools.partial(_build_runner, config, layout, entry, missing, res.threads), blocks, res, max_attempts=max_attempts)
            if run.failed:
                raise RuntimeError(f"{entry.name}: {len(run.failed)} blocks failed ({run.failed[0][1]}); rerun to retry them")
            table = pa.concat_tables(run.results)
            clean = table.filter(pc.equal(table.column("condition"), evaluate.CLEAN))
            for s in missing:
                part = pa.concat_tables([clean, table.filter(pc.equal(table.column("sigma"), s))])
                storage.write_parquet(builds.cache(layout.root, STAGE, keys[s], RESULTS), part, keys[s])
                builds.commit_entry(layout.root, STAGE, keys[s], {"files": [RESULTS], "model": entry.name, "sigma": s})
        for s in e.sigmas:
            uri = builds.cache(layout.root, STAGE, keys[s], RESULTS)
            results[(entry.name, s)] = storage.read_parquet(uri) if storage.exists(uri) else evaluate.results_table([])
            used.append(f"{STAGE}/{keys[s]}")
    pairs, classes, summary = evaluate.build_tables(index, results)
    fp = storage.fingerprint(evaluate.CODE_VERSION, index_fp, config.evaluate.model_dump())
    for uri, table in ((evaluate.PAIRS_TABLE, pairs), (evaluate.CLASSES_TABLE, classes), (evaluate.SUMMARY_TABLE, summary)):
        storage.write_parquet(storage.join(layout.build, uri), table, fp)
    builds.record_cache_use(layout.build, used)
    for entry in e.models:
        chart = plots.accuracy_chart(
            entry.name,
            [r for r in summary.to_pylist() if r["model"] == entry.name],
            [r for r in pairs.to_pylist() if r["model"] == entry.name and r["sigma"] == e.sigmas[-1]],
            e.sigmas[-1],
        )
        storage.write_bytes_atomic(storage.join(layout.build, evaluate.DIRNAME, f"{storage.safe_relpath(entry.name)}.png"), chart)
    logger.info("evaluated %d models x %d sigmas (%d reused from cache)", len(e.models), len(e.sigmas), reused)
    return {"models": len(e.models), "sigmas": len(e.sigmas), "reused": reused, "summary": summary.to_pylist()}
