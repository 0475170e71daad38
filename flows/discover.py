"""The discovery flow: validate -> the assets and task table of every (class, feature) pair."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.discover import discover_pairs


@flow(name="salient-discover")
def discover_flow(config: cfgmod.Config) -> dict:
    """Top images, heatmaps and feature attacks per pair, and discover/tasks.csv."""
    cfgmod.check_stages(config, ["discover"])
    with builds.holding(config.output, "salient discover"):
        return discover_pairs(config, builds.open_current(config.output))
