"""The discover stage: what annotators see for every (class, feature) pair (its top images,
heatmaps and feature attacks) and the crowd-task table ``discover/tasks.csv``. An item is a pair;
the workers make the pairs of a few classes at once (about ``compute.batch_size`` images; a
class's pairs always together)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from salient import discover, tables
from salient.config import ComputeConfig, DiscoverConfig, ModelConfig, PreprocessConfig
from salient.stage import Item, Run, Stage, fail


def _runner(
    model: ModelConfig, preprocess: PreprocessConfig, compute: ComputeConfig, cfg: DiscoverConfig, threads: int | None,
) -> discover.DiscoverRunner:
    return discover.DiscoverRunner(model, preprocess, compute, cfg, threads=threads)


class Discover(Stage):
    name = "discover"
    help = "top images, heatmaps and feature attacks per pair, and the crowd-task table"
    code_version = discover.CODE_VERSION
    requires = ("dataset", "model", "output")
    sections = ("model", "preprocess", "compute", "discover")
    needs_discovery = True
    uses_gpus = True
    unit = "pairs"

    def plan(self, run: Run) -> list[Item]:
        items = []
        for p in discover.plan_pairs(run.build, self.key(run), run.config.discover.images_per_pair):
            folder = tables.discover_pair(p.wnid, p.feature_index)
            files = tuple(f"{folder}/{strip}.png" for strip in discover.STRIPS) if p.image_ids else ()
            items.append(Item(p.fingerprint, f"{folder}/{tables.ASSETS}", files, p, f"class {p.class_index} feature {p.feature_index}"))
        return items

    def compute(self, run: Run, todo: list[Item], done: Callable[[Item, dict], None]) -> None:
        cfg = run.config
        classes: dict[int, discover.ClassWork] = {}
        for item in todo:
            p = item.payload
            classes.setdefault(p.class_index, discover.ClassWork(p.class_index, cfg.dataset.root, run.build)).pairs.append(p)
        by_fp = {item.key: item for item in todo}

        def made(group: list[discover.ClassWork], records: list[dict]) -> None:
            for record in records:
                done(by_fp[record["fingerprint"]], record)

        result = run.executor.pool(
            functools.partial(_runner, cfg.model, cfg.preprocess, cfg.compute, cfg.discover),
            discover.group_classes([classes[c] for c in sorted(classes)], cfg.compute.batch_size),
            uses_gpus=True, on_result=made, max_attempts=self.max_attempts,
        )
        fail(self, [(by_fp[p.fingerprint], reason) for group, reason in result.failed for work in group for p in work.pairs])

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        uri = discover.write_tasks(run.build, [r for _, r, _ in results], run.config.discover.base_url)
        made = sum(origin == "computed" for _, _, origin in results)
        run.log.info("wrote %d tasks to %s", len(results), uri)
        return {"pairs": len(results), "made": made, "reused": len(results) - made, "tasks": uri}

    def describe(self, s: dict) -> str:
        return f"discover: {s['pairs']} pairs ({s['made']} made, {s['reused']} reused) -> {s['tasks']}"
