"""Annotation flows: simulated answers for a synthetic world, and ingestion of answer files."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.annotations import ingest_answers, simulate_answers


@flow(name="salient-simulate-annotators")
def simulate_flow(config: cfgmod.Config) -> dict:
    """Simulated workers answer every discovered pair from the world's ground truth."""
    cfgmod.check_stages(config, ["simulate"])
    with builds.holding(config.output, "salient annotate simulate"):
        return simulate_answers(config, builds.open_current(config.output))


@flow(name="salient-ingest")
def ingest_flow(config: cfgmod.Config, answers: list[str] | None = None) -> dict:
    """Core/spurious labels per pair from the answer files, by the paper's rule."""
    cfgmod.check_stages(config, ["ingest"])
    with builds.holding(config.output, "salient ingest"):
        return ingest_answers(config, builds.open_current(config.output), list(answers or []))
