"""The simulate stage: simulated workers answer every discovered pair from a synthetic world's
ground truth, into ``OUT/annotations/incoming/`` like people's answers. It runs only where the
dataset has ground truth, and is cheap, so it has no items and nothing cached."""

from __future__ import annotations

from salient import groundtruth, simulate
from salient.config import Config
from salient.errors import InputError
from salient.stage import Item, Run, Stage


class Simulate(Stage):
    name = "simulate"
    group = "annotate"
    help = "simulated workers answer every pair from a synthetic world's ground truth"
    code_version = "simulate-1"
    requires = ("dataset", "output")
    retries = 0

    def applies(self, config: Config) -> bool:
        if config.dataset is None:
            return False
        try:
            groundtruth.find(config.dataset.root, config.dataset.groundtruth)
        except InputError:
            return False
        return True

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        cfg = run.config
        uri, split = groundtruth.find(cfg.dataset.root, cfg.dataset.groundtruth)
        summary = simulate.simulate(run.build, cfg.dataset.root, uri, split, cfg.preprocess, cfg.annotations, run.root)
        run.log.info("simulated %d answers for %d pairs -> %s", summary["answers"], summary["pairs"], summary["uri"])
        return summary

    def describe(self, s: dict) -> str:
        return f"simulated annotators: {s['answers']} answers for {s['pairs']} pairs -> {s['uri']}"
