"""The activations stage: list the dataset into shards, then the penultimate features and top-1
prediction of every image, one shard per work item on the GPU workers."""

from __future__ import annotations

import functools
import re
from collections import Counter

from salient import activations, builds, storage, tables
from salient import plan as planmod
from salient.config import ActivationsConfig, ComputeConfig, ModelConfig, PreprocessConfig
from salient.errors import InputError
from salient.stage import Builder, Item, Run, Stage, committed_results


def _runner(
    model: ModelConfig, preprocess: PreprocessConfig, compute: ComputeConfig, stored: ActivationsConfig, threads: int | None,
) -> activations.ActivationRunner:
    return activations.ActivationRunner(model, preprocess, compute, threads=threads, dtype=stored.dtype)


def _all_failed(stats: list[dict], summary: dict) -> str:
    """The message of a build where every planned image failed: the most common reason and where
    the failures are listed."""
    reasons = [f["reason"] for s in stats for f in s.get("failures", [])]
    # Reasons name each image's own sizes: counted with the numbers left out, shown with one image's.
    by_kind = {re.sub(r"\d[\d,.]*", "#", r): r for r in reversed(reasons)}
    kind, count = Counter(re.sub(r"\d[\d,.]*", "#", r) for r in reasons).most_common(1)[0]
    lists = summary["failure_lists"]
    more = f" and the {len(lists) - 1} other part-NNNNN.json files beside it" if len(lists) > 1 else ""
    return (
        f"all {summary['planned']} planned images failed, so nothing is published; the most common reason "
        f"({count} images): {by_kind[kind]}; every failure is listed in {lists[0]}{more}; "
        "fix the preprocess settings or the dataset and run again"
    )


class Activations(Stage):
    name = "activations"
    help = "compute penultimate activations of every image"
    code_version = activations.CODE_VERSION
    requires = ("dataset", "model", "output")
    sections = ("model", "preprocess", "compute", "activations")
    needs_discovery = True
    uses_gpus = True
    unit = "images"

    def shards(self, run: Run) -> list[Item]:
        """One item per shard of the build's plan (``plan.parquet``, written by :meth:`plan`)."""
        stage_fp = self.key(run)
        items = []
        for shard in planmod.shards_of(planmod.read_plan(run.build)):
            task = activations.ShardTask(shard, run.config.dataset.root, run.build, activations.shard_fingerprint(stage_fp, shard), stage_fp)
            items.append(Item(
                task.cache_key, tables.activation_marker(shard.index),
                (tables.activation_shard(shard.index),), task, f"shard {shard.index:05d}", len(shard),
                task.fingerprint,
            ))
        return items

    def plan(self, run: Run) -> list[Item]:
        cfg = run.config
        summary = planmod.write_plan(cfg.dataset.root, run.build, cfg.compute.shard_size)
        run.log.info(
            "planned %d images in %d classes as %d shards of up to %d",
            summary["images"], summary["classes"], summary["shards"], cfg.compute.shard_size,
        )
        if summary["skipped"]:
            run.log.warning(
                "%d entries under the dataset root are not planned (e.g. %s); the reasons are in %s's metadata",
                summary["skipped"], ", ".join(summary["skipped_examples"]), tables.PLAN.path,
            )
        return self.shards(run)

    def worker(self, run: Run) -> Builder:
        cfg = run.config
        return functools.partial(_runner, cfg.model, cfg.preprocess, cfg.compute, cfg.activations)

    def restore(self, run: Run, item: Item, entry: dict) -> dict:
        (table,) = [rel for rel in entry["files"] if rel.endswith(".parquet")]
        return activations.restore(item.payload, builds.cache(run.root, self.name, item.key, table), entry["result"])

    def on_result(self, run: Run, item: Item, result: dict) -> None:
        run.log.debug(
            "shard %05d: %d images, %d failed, %.1f images/s (read %.1fs, decode %.1fs, infer %.1fs, write %.1fs)",
            result["shard"], result["images"], result["failed"], result["images_per_second"] or 0.0,
            *(result["seconds"][k] for k in ("read", "decode", "infer", "write")),
        )

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        summary = activations.summarize([r for _, r, _ in results], run.build)
        summary["computed_shards"] = sum(origin == "computed" for _, _, origin in results)
        if summary["planned"] and not summary["images"]:
            raise InputError(_all_failed([r for _, r, _ in results], summary))
        if summary["failed"]:
            run.log.warning("%d images failed; they are listed in: %s", summary["failed"], ", ".join(summary["failure_lists"]))
        return summary

    def committed(self, run: Run) -> tuple[list[str], str]:
        """The table URIs of every shard of the build and a fingerprint of them all, for the stages
        that read them; ``InputError`` naming the shards that are missing or were computed from
        other inputs."""
        items = self.shards(run)
        missing = [storage.basename(i.marker).removesuffix(".json") for i, r in zip(items, committed_results(run, items)) if r is None]
        if missing:
            raise InputError(
                f"{len(missing)} activation shards are missing or were computed from other inputs "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} under {storage.join(run.build, tables.ACTIVATIONS_DIR)}); "
                "run `salient activations CONFIG` first"
            )
        return [storage.join(run.build, i.files[0]) for i in items], storage.fingerprint([i.commit_fingerprint for i in items])

    def counts(self, s: dict) -> dict[str, int]:
        return {"images": s["images"], "failed_images": s["failed"], "shards": s["shards"]}

    def describe(self, s: dict) -> str:
        return (
            f"activations: {s['images']} of {s['planned']} images in {s['shards']} shards -> {tables.ACTIVATIONS_DIR}/ "
            f"({s['failed']} failed)" + "".join(f"\n  failures listed in {u}" for u in s["failure_lists"])
        )
