"""The rebuild: every stage as one Prefect flow, and the same flow for scheduled deployments.

validate -> plan -> activations -> aggregate -> discover -> simulated annotators (synthetic worlds
only) -> ingest -> generalize -> evaluate (when models are configured) -> report. Every stage
reuses what is already committed for the same inputs, so a rebuild with nothing changed
recomputes nothing.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from salient import config as cfgmod
from salient import groundtruth
from tasks.activations import compute_activations, plan_images, summarize_activations
from tasks.aggregate import aggregate_shards
from tasks.annotations import ingest_answers, simulate_answers
from tasks.discover import discover_pairs
from tasks.evaluate import evaluate_models
from tasks.generalize import generalize_masks
from tasks.report import write_report


def _has_groundtruth(config: cfgmod.Config) -> bool:
    if config.dataset is None:
        return False
    try:
        groundtruth.find(config.dataset.root, config.dataset.groundtruth)
    except ValueError:
        return False
    return True


def default_stages(config: cfgmod.Config) -> list[str]:
    """Every stage that applies: the simulated annotators only where the dataset has ground truth,
    evaluation only where models are configured."""
    stages = list(cfgmod.STAGES)
    if not _has_groundtruth(config):
        stages.remove("simulate")
    if not config.evaluate.models:
        stages.remove("evaluate")
    return stages


def run_stage(name: str, config: cfgmod.Config) -> dict:
    """One stage's Prefect tasks, inside the calling flow."""
    if name == "activations":
        plan_images(config)
        return summarize_activations(config, compute_activations(config))
    return {
        "aggregate": aggregate_shards, "discover": discover_pairs, "simulate": simulate_answers,
        "ingest": lambda c: ingest_answers(c, []), "generalize": generalize_masks,
        "evaluate": evaluate_models, "report": write_report,
    }[name](config)


@flow(name="salient-rebuild")
def rebuild_flow(config: cfgmod.Config, stages: list[str] | None = None) -> dict:
    """Build (or bring up to date) the whole dataset; ``stages`` runs a subset, in pipeline order."""
    selected = [s for s in cfgmod.STAGES if s in (stages or default_stages(config))]
    cfgmod.check_stages(config, stages or selected)
    logger = get_run_logger()
    results = {}
    for name in selected:
        logger.info("stage %s", name)
        results[name] = run_stage(name, config)
    return results


@flow(name="salient-rebuild-from-file")
def rebuild_from_file(config_uri: str, overrides: list[str] | None = None, stages: list[str] | None = None) -> dict:
    """The rebuild of the config file at ``config_uri`` (read when the run starts, so scheduled
    runs pick up edits), with ``--set``-style overrides."""
    return rebuild_flow(cfgmod.load(config_uri, overrides or []), stages)
