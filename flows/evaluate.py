"""The evaluation flow: validate -> core and spurious accuracy of every configured classifier."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.evaluate import evaluate_models


@flow(name="salient-evaluate")
def evaluate_flow(config: cfgmod.Config) -> dict:
    """Noise on core / spurious masks, per pair, per class and on average, for every model and sigma."""
    cfgmod.check_stages(config, ["evaluate"])
    with builds.holding(config.output, "salient evaluate"):
        return evaluate_models(config, builds.open_current(config.output))
