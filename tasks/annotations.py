"""Prefect tasks for annotations: the simulated annotator and ingestion of answer files."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from salient import aggregate, groundtruth, ingest, metadata, simulate, storage
from salient.config import Config


@task(name="simulate-annotators")
def simulate_answers(config: Config) -> dict:
    """Answers of simulated workers, from the world's ground truth, under annotations/incoming/."""
    uri, split = groundtruth.find(config.dataset.root, config.dataset.groundtruth)
    summary = simulate.simulate(config.output, config.dataset.root, uri, split, config.preprocess, config.annotations)
    get_run_logger().info("simulated %d answers for %d pairs -> %s", summary["answers"], summary["pairs"], summary["uri"])
    return summary


def _classes(config: Config) -> dict[int, str] | None:
    """class_index -> wnid from dataset.class_metadata, else from the build's classes table, else None."""
    if config.dataset is not None and config.dataset.class_metadata:
        return {c.class_index: c.wnid for c in metadata.read_class_metadata(config.dataset.class_metadata)}
    uri = storage.join(config.output, aggregate.CLASSES_TABLE)
    if storage.exists(uri):
        return {r["class_index"]: r["wnid"] for r in storage.read_parquet(uri, ["class_index", "wnid"]).to_pylist()}
    return None


@task(name="ingest-answers")
def ingest_answers(config: Config, answers: list[str]) -> dict:
    """Labels per pair from every answer file given, configured, or dropped under annotations/incoming/."""
    logger = get_run_logger()
    files = ingest.answer_files(config.output, [*answers, *config.annotations.answers])
    pairs_uri = storage.join(config.output, aggregate.PAIRS_TABLE)
    build_pairs = None
    if storage.exists(pairs_uri):
        build_pairs = {(r["class_index"], r["feature_index"]) for r in storage.read_parquet(pairs_uri, ["class_index", "feature_index"]).to_pylist()}
    summary = ingest.ingest(config.output, files, _classes(config), build_pairs, config.annotations.min_answers)
    logger.info(
        "%d answers accepted, %d rejected; %d pairs: %d spurious, %d core, %d insufficient",
        summary["accepted"], summary["rejected"], summary["pairs"], summary["spurious"], summary["core"], summary["insufficient"],
    )
    create_markdown_artifact(
        key="ingest-summary", markdown="\n".join(f"- **{k}**: {v}" for k, v in summary.items()), description="Ingestion summary"
    )
    return summary
