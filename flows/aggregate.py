"""The aggregation flow: validate -> aggregate the committed activation shards."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.aggregate import aggregate_shards


@flow(name="salient-aggregate")
def aggregate_flow(config: cfgmod.Config) -> dict:
    """Feature importance, the (class, feature) pairs and the top images, from committed activations."""
    cfgmod.check_stages(config, ["aggregate"])
    with builds.holding(config.output, "salient aggregate"):
        return aggregate_shards(config, builds.open_current(config.output))
