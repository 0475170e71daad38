"""The ingest stage: core/spurious labels per pair, by the paper's rule, from every answer file
configured (``annotations.answers``) or dropped under ``OUT/annotations/incoming/``. Answers
arrive outside the build at any time, so it reads them all on every run; it has no items."""

from __future__ import annotations

import argparse

from salient import aggregate, answers, ingest, storage
from salient.config import Config
from salient.stage import Item, Run, Stage


class Ingest(Stage):
    name = "ingest"
    help = "core/spurious labels per pair from answer CSVs in the paper's schema"
    code_version = ingest.CODE_VERSION
    retries = 0

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        cfg = run.config
        files = answers.answer_files(run.root, cfg.annotations.answers)
        pairs_uri = storage.join(run.build, aggregate.PAIRS_TABLE)
        build_pairs = None
        if storage.exists(pairs_uri):
            rows = storage.read_parquet(pairs_uri, ["class_index", "feature_index"]).to_pylist()
            build_pairs = {(r["class_index"], r["feature_index"]) for r in rows}
        metadata_uri = cfg.dataset.class_metadata if cfg.dataset is not None else None
        summary = ingest.ingest(
            run.build, files, ingest.known_classes(run.build, metadata_uri), build_pairs, cfg.annotations.min_answers, run.root
        )
        run.log.info(
            "%d answers accepted, %d rejected; %d pairs: %d spurious, %d core, %d insufficient",
            summary["accepted"], summary["rejected"], summary["pairs"], summary["spurious"], summary["core"], summary["insufficient"],
        )
        return summary

    def counts(self, s: dict) -> dict[str, int]:
        return {"spurious_pairs": s["spurious"], "core_pairs": s["core"], "pending_pairs": s["insufficient"], "answers": s["accepted"]}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--answers", action="append", default=[], metavar="URI", help="an answer CSV (repeatable)")

    def with_arguments(self, config: Config, args: argparse.Namespace) -> Config:
        if args.answers:
            config.annotations.answers = [*args.answers, *config.annotations.answers]
        return config

    def describe(self, s: dict) -> str:
        return (
            f"ingest: {s['accepted']} answers accepted, {s['rejected']} rejected; {s['pairs']} pairs: {s['spurious']} "
            f"spurious, {s['core']} core, {s['insufficient']} insufficient; {s['classes_with_spurious']} classes with a "
            f"spurious feature" + (f"; {s['pairs_not_in_build']} pairs not in this build" if s.get("pairs_not_in_build") else "")
        )
