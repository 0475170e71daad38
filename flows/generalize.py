"""The generalisation flow: validate -> masks for the top-K images of every labelled pair."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.generalize import generalize_masks


@flow(name="salient-generalize")
def generalize_flow(config: cfgmod.Config) -> dict:
    """Soft masks (the pairs' NAMs) into masks/masks.zarr, described by masks/index.parquet."""
    cfgmod.check_stages(config, ["generalize"])
    with builds.holding(config.output, "salient generalize"):
        return generalize_masks(config, builds.open_current(config.output))
