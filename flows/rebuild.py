"""The rebuild: every stage as one Prefect flow, and the same flow for scheduled deployments.

validate -> lease -> plan -> activations -> aggregate -> discover -> simulated annotators (synthetic
worlds only) -> ingest -> generalize -> evaluate (when models are configured) -> report -> manifest
-> publish. Each run writes one build under ``OUT/builds/<build_id>/`` (an unfinished one is
resumed), taking every result computed before from the cache, so a rebuild with nothing changed
recomputes nothing; ``latest`` moves only when the manifest is written.
"""

from __future__ import annotations

import socket
import time

from prefect import flow, get_run_logger

from salient import builds, groundtruth, storage
from salient import config as cfgmod
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


def run_stage(name: str, config: cfgmod.Config, layout: builds.Layout) -> dict:
    """One stage's Prefect tasks, inside the calling flow."""
    if name == "activations":
        plan_images(config, layout)
        return summarize_activations(config, layout, compute_activations(config, layout))
    return {
        "aggregate": aggregate_shards, "discover": discover_pairs, "simulate": simulate_answers,
        "ingest": lambda c, lay: ingest_answers(c, lay, []), "generalize": generalize_masks,
        "evaluate": evaluate_models, "report": write_report,
    }[name](config, layout)


def _facts(config: cfgmod.Config, layout: builds.Layout, results: dict, seconds: dict[str, float]) -> dict:
    """What the manifest records besides what every manifest has."""
    counts: dict[str, int] = {}
    if "activations" in results:
        a = results["activations"]
        counts.update(images=a["images"], failed_images=a["failed"], shards=a["shards"])
    if "aggregate" in results:
        counts.update(pairs=results["aggregate"]["pairs"], classes=results["aggregate"]["classes"])
    if "ingest" in results:
        i = results["ingest"]
        counts.update(spurious_pairs=i["spurious"], core_pairs=i["core"], pending_pairs=i["insufficient"], answers=i["accepted"])
    if "generalize" in results:
        counts.update(masks=results["generalize"]["masks"])
    fingerprints = {}
    for rel in storage.list_files(layout.build):
        if rel.endswith(".parquet") and not rel.startswith(("activations/", "masks/blocks/")):
            fingerprints[rel] = storage.parquet_metadata(storage.join(layout.build, rel)).get("fingerprint")
    return {
        "inputs": {
            "dataset_root": config.dataset.root if config.dataset else None,
            "model_checkpoint": config.model.checkpoint if config.model else None,
            "model_sha256": storage.sha256(config.model.checkpoint) if config.model else None,
            "config": config.model_dump(mode="json"),
        },
        "stages": list(results),
        "fingerprints": fingerprints,
        "counts": counts,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "images_per_second": round(counts["images"] / seconds["activations"], 3) if counts.get("images") and seconds.get("activations") else None,
    }


@flow(name="salient-rebuild")
def rebuild_flow(config: cfgmod.Config, stages: list[str] | None = None, wait_s: float = 0.0) -> dict:
    """Build (or bring up to date) the whole dataset and publish it; ``stages`` runs a subset on the
    ``current`` build without publishing. ``wait_s``: how long to wait for another rebuild of the
    same output to finish."""
    full = not stages
    selected = [s for s in cfgmod.STAGES if s in (stages or default_stages(config))]
    cfgmod.check_stages(config, stages or selected)
    logger = get_run_logger()
    root = config.output
    with builds.holding(root, f"salient run ({socket.gethostname()})", wait_s=wait_s) as lease:
        layout = builds.start_run(root) if full else builds.open_current(root)
        logger.info("build %s under %s", layout.build_id, root)
        results, seconds = {}, {}
        for name in selected:
            logger.info("stage %s", name)
            t0 = time.perf_counter()
            results[name] = run_stage(name, config, layout)
            seconds[name] = time.perf_counter() - t0
        if full:
            manifest = builds.write_manifest(layout, _facts(config, layout, results, seconds))
            lease.check()
            builds.publish(root, layout.build_id)
            logger.info("published build %s (%s)", layout.build_id, manifest["counts"])
    return {"build_id": layout.build_id, "build": layout.build, "published": full, "stages": results}


@flow(name="salient-rebuild-from-file")
def rebuild_from_file(config_uri: str, overrides: list[str] | None = None, stages: list[str] | None = None) -> dict:
    """The rebuild of the config file at ``config_uri`` (read when the run starts, so scheduled
    runs pick up edits), with ``--set``-style overrides."""
    return rebuild_flow(cfgmod.load(config_uri, overrides or []), stages)
