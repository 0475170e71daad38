"""The aggregate stage: feature importance, the (class, feature) pairs, and the top images per
neuron and per pair, from every committed activation shard; one item, made in the driver with the
per-shard passes spread over the executor."""

from __future__ import annotations

from salient import aggregate, metadata, tables
from salient import plan as planmod
from salient.stage import Item, Run, Stage
from salient.stages.activations import Activations


class Aggregate(Stage):
    name = "aggregate"
    help = "feature importance, (class, feature) pairs and top images per neuron"
    code_version = aggregate.CODE_VERSION
    requires = ("model", "output")
    # dataset: the class metadata names the classes in classes.parquet
    sections = ("dataset", "model", "aggregate")
    needs_discovery = True

    def plan(self, run: Run) -> list[Item]:
        shard_uris, shards_fp = Activations().committed(run)
        files = [t.path for t in tables.ALL if t.stage == self.name]
        return [self.whole(self.key(run, shards_fp), files, shard_uris)]

    def make(self, run: Run, item: Item) -> dict:
        cfg = run.config
        run.log.info("aggregating %d shards (grouping: %s)", len(item.payload), cfg.aggregate.grouping)
        meta = None
        if cfg.dataset is not None and cfg.dataset.class_metadata:
            meta = metadata.read_class_metadata(cfg.dataset.class_metadata)
        inputs = aggregate.AggregateInputs(
            build=run.build,
            shard_uris=item.payload,
            fc_weight=run.preflight.model(cfg.model.checkpoint, cfg.model.arch, cfg.model.format).fc_weight.numpy(),
            wnids=planmod.plan_classes(run.build),
            fingerprint=item.key,
            class_metadata=meta,
        )
        return aggregate.run(inputs, cfg.aggregate, map_fn=run.executor.map)

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        ((_, summary, _),) = results
        return {k: v for k, v in summary.items() if k != "fingerprint"}

    def counts(self, s: dict) -> dict[str, int]:
        return {"pairs": s["pairs"], "classes": s["classes"]}

    def describe(self, s: dict) -> str:
        return (
            f"aggregate: {s['pairs']} pairs over {s['classes']} classes from {s['images']} images (grouping: "
            f"{s['grouping']}, {s['classes_without_images']} classes without images)"
        )
