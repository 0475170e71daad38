"""Prefect task of the aggregation stage: both passes over the shards as Ray tasks."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from salient import activations, aggregate, metadata, models, storage
from salient import plan as planmod
from salient.config import Config
from tasks.ray_pool import ray_cluster, ray_map


def aggregate_inputs(config: Config) -> aggregate.AggregateInputs:
    """The committed shards of this config's build and the model's final layer."""
    weights = storage.sha256(config.model.checkpoint)
    uris, shards_fp = activations.committed_shards(config.output, weights, config.model, config.preprocess)
    model = models.load(config.model.checkpoint, config.model.arch, config.model.format)
    meta = None
    if config.dataset is not None and config.dataset.class_metadata:
        meta = metadata.read_class_metadata(config.dataset.class_metadata)
    return aggregate.AggregateInputs(
        out=config.output,
        shard_uris=uris,
        fc_weight=model.fc_weight.numpy(),
        wnids=planmod.plan_classes(config.output),
        fingerprint=storage.fingerprint(aggregate.CODE_VERSION, shards_fp, config.aggregate.model_dump()),
        class_metadata=meta,
    )


@task(name="aggregate", retries=1, retry_delay_seconds=5)
def aggregate_shards(config: Config) -> dict:
    """Feature importance, pairs, top images per neuron and per pair, written as Parquet."""
    logger = get_run_logger()
    inputs = aggregate_inputs(config)
    logger.info("aggregating %d shards (grouping: %s)", len(inputs.shard_uris), config.aggregate.grouping)
    with ray_cluster(config.compute.ray_address):
        summary = aggregate.run(inputs, config.aggregate, map_fn=ray_map)
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
