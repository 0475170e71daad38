"""The rebuild: the stages of the registry as one Prefect flow, and the same flow for scheduled
deployments. Every command that runs stages runs this flow, once.

pre-flight -> lease -> build -> each stage of the registry that applies (activations, aggregate,
discover, simulated annotators where the dataset has ground truth, ingest, generalize, evaluate
where models are configured, report) -> manifest -> publish. One Ray session serves every stage
and is stopped at the end. A full run writes one build under ``OUT/builds/<build_id>/`` (an
unfinished one is resumed), taking every result made before from the cache, so a rebuild with
nothing changed recomputes nothing; ``latest`` moves only when the manifest is written. A subset of
stages runs on the ``current`` build and publishes nothing.
"""

from __future__ import annotations

import socket
import time

from prefect import flow, get_run_logger

from salient import builds, preflight, stopping, storage, tables
from salient import stages as registry
from salient import config as cfgmod
from salient.stage import Run
from tasks.ray_pool import RayExecutor
from tasks.stage import run_stage


def _facts(run: Run, results: dict, seconds: dict[str, float]) -> dict:
    """What the manifest records besides what every manifest has."""
    config = run.config
    counts: dict[str, int] = {}
    images_s = None
    for name, summary in results.items():
        counted = registry.BY_NAME[name].counts(summary)
        counts.update(counted)
        if "images" in counted:
            images_s = seconds.get(name)
    fingerprints = {}
    for rel in storage.list_files(run.build):
        if rel.endswith(".parquet") and not rel.startswith((f"{tables.ACTIVATIONS_DIR}/", f"{tables.MASK_BLOCKS}/")):
            fingerprints[rel] = storage.parquet_metadata(storage.join(run.build, rel)).get("fingerprint")
    return {
        "inputs": {
            "dataset_root": config.dataset.root if config.dataset else None,
            "model_checkpoint": config.model.checkpoint if config.model else None,
            "model_sha256": run.preflight.digest(config.model.checkpoint) if config.model else None,
            "config": config.model_dump(mode="json"),
        },
        "stages": list(results),
        "fingerprints": fingerprints,
        "counts": counts,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "images_per_second": round(counts["images"] / images_s, 3) if counts.get("images") and images_s else None,
    }


@flow(name="salient-rebuild")
def rebuild_flow(
    config: cfgmod.Config, stages: list[str] | None = None, wait_s: float = 0.0,
    checked: preflight.Preflight | None = None,
) -> dict:
    """Build (or bring up to date) the whole dataset and publish it; ``stages`` runs those
    stages on the ``current`` build without publishing. ``wait_s``: how long to wait for another
    rebuild of the same output to finish. ``checked``: the pre-flight of these stages, when the
    caller ran it (one of other stages is run again)."""
    full = not stages
    selected = registry.select(config, stages or None)
    if checked is None or checked.stages != [s.name for s in selected]:
        checked = preflight.for_stages(config, selected)
    logger = get_run_logger()
    root = config.output
    # Prefect's SIGTERM handler is in place from here on: note a SIGTERM before it acts on it
    with stopping.noting_sigterm(), builds.holding(
        root, f"salient run ({socket.gethostname()})", wait_s=wait_s,
    ) as lease, RayExecutor(config.compute) as executor:
        layout = builds.start_run(root) if full else builds.open_current(root)
        logger.info("build %s under %s: %s", layout.build_id, root, ", ".join(s.name for s in selected))
        run = Run(config, layout, checked, executor, logger)
        results, seconds = {}, {}
        for stage in selected:
            t0 = time.perf_counter()
            results[stage.name] = run_stage(stage, run)
            seconds[stage.name] = time.perf_counter() - t0
        if full:
            manifest = builds.write_manifest(layout, _facts(run, results, seconds))
            lease.check()
            builds.publish(root, layout.build_id)
            logger.info("published build %s (%s)", layout.build_id, manifest["counts"])
    return {"build_id": layout.build_id, "build": layout.build, "published": full, "stages": results}


@flow(name="salient-rebuild-from-file")
def rebuild_from_file(config_uri: str, overrides: list[str] | None = None, stages: list[str] | None = None) -> dict:
    """The rebuild of the config file at ``config_uri`` (read when the run starts, so scheduled
    runs pick up edits), with ``--set``-style overrides."""
    return rebuild_flow(cfgmod.load(config_uri, overrides or []), stages)
