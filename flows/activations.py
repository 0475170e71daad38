"""The activation flow: validate -> plan -> compute shards on Ray -> summarise."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.activations import compute_activations, plan_images, summarize_activations


@flow(name="salient-activations")
def activations_flow(config: cfgmod.Config) -> dict:
    """Penultimate activations and predictions of every image under ``dataset.root``."""
    cfgmod.check_stages(config, ["activations"])
    with builds.holding(config.output, "salient activations"):
        layout = builds.open_current(config.output)
        plan_images(config, layout)
        stats = compute_activations(config, layout)
        return summarize_activations(config, layout, stats)
