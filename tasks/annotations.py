"""Prefect tasks for annotations: the simulated annotator and ingestion of answer files."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from salient import aggregate, builds, groundtruth, ingest, simulate, storage
from salient.config import Config


@task(name="simulate-annotators")
def simulate_answers(config: Config, layout: builds.Layout) -> dict:
    """Answers of simulated workers, from the world's ground truth, under annotations/incoming/."""
    uri, split = groundtruth.find(config.dataset.root, config.dataset.groundtruth)
    summary = simulate.simulate(layout.build, config.dataset.root, uri, split, config.preprocess, config.annotations, layout.root)
    get_run_logger().info("simulated %d answers for %d pairs -> %s", summary["answers"], summary["pairs"], summary["uri"])
    return summary


@task(name="ingest-answers")
def ingest_answers(config: Config, layout: builds.Layout, answers: list[str]) -> dict:
    """Labels per pair from every answer file given, configured, or dropped under OUT/annotations/incoming/."""
    logger = get_run_logger()
    files = ingest.answer_files(layout.root, [*answers, *config.annotations.answers])
    pairs_uri = storage.join(layout.build, aggregate.PAIRS_TABLE)
    build_pairs = None
    if storage.exists(pairs_uri):
        build_pairs = {(r["class_index"], r["feature_index"]) for r in storage.read_parquet(pairs_uri, ["class_index", "feature_index"]).to_pylist()}
    metadata_uri = config.dataset.class_metadata if config.dataset is not None else None
    summary = ingest.ingest(
        layout.build, files, ingest.known_classes(layout.build, metadata_uri), build_pairs, config.annotations.min_answers, layout.root
    )
    logger.info(
        "%d answers accepted, %d rejected; %d pairs: %d spurious, %d core, %d insufficient",
        summary["accepted"], summary["rejected"], summary["pairs"], summary["spurious"], summary["core"], summary["insufficient"],
    )
    create_markdown_artifact(
        key="ingest-summary", markdown="\n".join(f"- **{k}**: {v}" for k, v in summary.items()), description="Ingestion summary"
    )
    return summary
