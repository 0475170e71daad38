"""Prefect task of the aggregation stage: both passes over the shards as Ray tasks."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from salient import activations, aggregate, builds, metadata, models, storage
from salient import plan as planmod
from salient.config import Config
from tasks.ray_pool import compute_cluster, ray_map

STAGE = "aggregate"


def aggregate_inputs(config: Config, out: str) -> aggregate.AggregateInputs:
    """The committed shards of the build at ``out`` and the model's final layer."""
    weights = storage.sha256(config.model.checkpoint)
    uris, shards_fp = activations.committed_shards(out, weights, config.model, config.preprocess)
    model = models.load(config.model.checkpoint, config.model.arch, config.model.format)
    meta = None
    if config.dataset is not None and config.dataset.class_metadata:
        meta = metadata.read_class_metadata(config.dataset.class_metadata)
    return aggregate.AggregateInputs(
        out=out,
        shard_uris=uris,
        fc_weight=model.fc_weight.numpy(),
        wnids=planmod.plan_classes(out),
        fingerprint=storage.fingerprint(aggregate.CODE_VERSION, shards_fp, config.aggregate.model_dump()),
        class_metadata=meta,
    )


@task(name="aggregate", retries=1, retry_delay_seconds=5)
def aggregate_shards(config: Config, layout: builds.Layout) -> dict:
    """Feature importance, pairs, top images per neuron and per pair, written as Parquet (or copied
    from the cache when the same shards were aggregated the same way before)."""
    logger = get_run_logger()
    inputs = aggregate_inputs(config, layout.build)
    entry = builds.restore_entry(layout.root, STAGE, inputs.fingerprint, layout.build)
    if entry is not None:
        summary = builds.read_entry(layout.root, STAGE, inputs.fingerprint)["summary"]
        logger.info("aggregation of these %d shards reused from the cache", len(inputs.shard_uris))
    else:
        logger.info("aggregating %d shards (grouping: %s)", len(inputs.shard_uris), config.aggregate.grouping)
        with compute_cluster(config.compute, uses_gpus=False):
            summary = aggregate.run(inputs, config.aggregate, map_fn=ray_map)
        entry = builds.save_entry(layout.root, STAGE, inputs.fingerprint, layout.build, list(aggregate.TABLES), {"summary": summary})
    builds.record_cache_use(layout.build, [entry])
    logger.info(
        "%d images, %d pairs over %d classes (%d classes without images)",
        summary["images"], summary["pairs"], summary["classes"], summary["classes_without_images"],
    )
    create_markdown_artifact(
        key="aggregate-summary",
        markdown="\n".join(f"- **{k}**: {v}" for k, v in summary.items()),
        description="Aggregation summary",
    )
    return summary
