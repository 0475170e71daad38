"""The evaluate stage: clean, core and spurious accuracy of every configured classifier at every
noise level. An item is one (model, sigma): the model's predictions on every masked image, clean
and noisy, kept in ``evaluation/predictions/<model>/sigma-<sigma>.parquet``. One pool of workers
goes over blocks of images; each worker holds every model with missing items and runs each of them
at its missing sigmas on every image it decodes. The tables and charts are made from the
predictions, and kept in the cache by the predictions' keys: a rerun with the same predictions
takes them from there."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from salient import builds, evaluate, plots, preflight, storage, tables
from salient.config import ComputeConfig, Config, EvalModelConfig, PreprocessConfig
from salient.dataset import SalientMasks
from salient.errors import InputError
from salient.stage import Item, Progress, Run, Stage, fail


def _runner(
    models: list[tuple[EvalModelConfig, list[float]]], build: str, root: str, preprocess: PreprocessConfig, compute: ComputeConfig,
    trials: int, seed: int, mask_alignment: str, threads: int | None,
) -> evaluate.EvalRunner:
    return evaluate.EvalRunner(models, build, root, preprocess, compute, trials, seed, mask_alignment, threads=threads)


def _index(run: Run) -> tuple[str, str]:
    uri = storage.join(run.build, tables.MASK_INDEX.path)
    if not storage.exists(uri):
        raise InputError(f"{uri} is missing: the build has no masks yet; run `salient generalize CONFIG` first")
    return uri, storage.parquet_metadata(uri)["fingerprint"]


TABLES = "evaluate-tables"  # the cache entries of the tables and charts


class Evaluate(Stage):
    name = "evaluate"
    help = "core and spurious accuracy of classifiers under noise on the masks"
    code_version = evaluate.CODE_VERSION
    requires = ("dataset", "output")
    sections = ("preprocess", "compute", "evaluate")
    uses_gpus = True
    unit = None  # its items finish together; compute shows the images' progress

    def applies(self, config: Config) -> bool:
        return bool(config.evaluate.models)

    def check(self, config: Config, found: preflight.Preflight) -> list[str]:
        return preflight.check_eval_models(config, found)

    def plan(self, run: Run) -> list[Item]:
        _, index_fp = _index(run)
        # The whole config of the stage, with its lists of models and sigmas replaced by the item's
        # own: adding a model or a sigma recomputes nothing that was there.
        identity = run.identity(*self.sections)
        models, _ = identity["evaluate"].pop("models"), identity["evaluate"].pop("sigmas")
        items = []
        for entry, model_identity in zip(run.config.evaluate.models, models):
            for sigma in run.config.evaluate.sigmas:
                key = storage.fingerprint(self.name, self.code_version, identity, model_identity, sigma, index_fp)
                items.append(Item(
                    key, tables.predictions_marker(entry.name, sigma), (tables.predictions(entry.name, sigma),), (entry, sigma),
                    f"{entry.name} sigma {sigma:g}",
                ))
        return items

    def compute(self, run: Run, todo: list[Item], done: Callable[[Item, dict], None]) -> None:
        cfg, e = run.config, run.config.evaluate
        _index(run)
        store = SalientMasks(run.build)
        size = store.array.shape[1:]
        if tuple(size) != (cfg.preprocess.crop,) * 2:
            raise InputError(
                f"{run.build}: the masks are {size[0]}x{size[1]} pixels but preprocess.crop is {cfg.preprocess.crop}; "
                "set it back, or run `salient generalize CONFIG` to remake the masks"
            )
        work = evaluate.plan_images(store.index)
        blocks = evaluate.blocks_of(work, e.images_per_block, store.shard_rows)
        models: dict[str, tuple[EvalModelConfig, list[float]]] = {}
        for item in todo:
            entry, sigma = item.payload
            models.setdefault(entry.name, (entry, []))[1].append(sigma)
        run.log.info(
            "evaluate: %d images in %d blocks; %s", len(work), len(blocks),
            "; ".join(f"{name} at sigma {', '.join(f'{s:g}' for s in sigmas)}" for name, (_, sigmas) in models.items()),
        )
        results: list[evaluate.BlockResult] = []
        if blocks:
            with Progress(run.log, self.name, len(work), "images") as advance:
                pooled = run.executor.pool(
                    functools.partial(_runner, list(models.values()), run.build, cfg.dataset.root, cfg.preprocess, cfg.compute, e.trials, e.seed, e.mask_alignment),
                    blocks, uses_gpus=True, max_attempts=self.max_attempts, on_result=lambda block, _: advance(len(block.images)),
                )
            fail(self, [(item, pooled.failed[0][1]) for item in todo] if pooled.failed else [])
            results = pooled.results
            feed = {k: sum(r.feed[k] for r in results) for k in ("images", "read_s", "decode_s", "wait_s")}
            run.log.info("evaluate: read %(images)d images (read %(read_s).1f s, decode %(decode_s).1f s, device waited %(wait_s).1f s)", feed)
        # The kind of device that drew the noise: results are the same on every device of one kind.
        noise_device = ",".join(sorted({r.noise_device for r in results})) or None
        for name in models:
            table = pa.concat_tables([r.predictions[name] for r in results]) if results else evaluate.results_table([])
            is_clean = pc.equal(table.column("condition"), evaluate.CLEAN)
            for item in (item for item in todo if item.payload[0].name == name):
                sigma = item.payload[1]
                part = table.filter(pc.or_(is_clean, pc.equal(table.column("sigma"), sigma))).sort_by(evaluate.RESULT_ORDER)
                storage.write_parquet(storage.join(run.build, item.files[0]), part, item.key)
                result_row = {"fingerprint": item.key, "model": name, "sigma": sigma, "predictions": part.num_rows, "noise_device": noise_device}
                storage.write_json(storage.join(run.build, item.marker), result_row)
                done(item, result_row)

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        e = run.config.evaluate
        reused = sum(origin != "computed" for _, _, origin in results)
        run.log.info("evaluated %d models x %d sigmas (%d reused)", len(e.models), len(e.sigmas), reused)
        # The tables and charts follow from the predictions alone: kept as one cache entry, keyed by them.
        key = self.key(run, TABLES, [item.key for item, _, _ in results])
        files = [tables.evaluation_chart(m.name) for m in e.models] + [t.path for t in (tables.EVAL_PAIRS, tables.EVAL_CLASSES, tables.EVAL_SUMMARY)]
        summary_uri = storage.join(run.build, tables.EVAL_SUMMARY.path)
        in_build = storage.exists(summary_uri) and storage.parquet_metadata(summary_uri).get("fingerprint") == key
        if not in_build and builds.restore_entry(run.root, TABLES, key, run.build) is None:
            self._write_tables(run, results, key)
            builds.save_entry(run.root, TABLES, key, run.build, files)
        builds.record_cache_use(run.build, [f"{TABLES}/{key}"])
        summary = storage.read_parquet(summary_uri)
        return {"models": len(e.models), "sigmas": len(e.sigmas), "reused": reused, "summary": summary.to_pylist()}

    def _write_tables(self, run: Run, results: list[tuple[Item, dict, str]], key: str) -> None:
        """The evaluation's tables and one chart per model, from the predictions of ``results``."""
        e = run.config.evaluate
        index_uri, _ = _index(run)
        index = storage.read_parquet(index_uri)
        predictions = {
            (item.payload[0].name, item.payload[1]): storage.read_parquet(storage.join(run.build, item.files[0]))
            for item, _, _ in results
        }
        pairs, classes, summary = evaluate.build_tables(index, predictions)
        # the summary last: its fingerprint says the tables and charts are complete
        sigma = max(e.sigmas)  # the per-pair and per-class panels show the largest noise, as the report's class table does
        summary_rows = summary.to_pylist()
        pair_rows, class_rows = ([r for r in table.to_pylist() if r["sigma"] == sigma] for table in (pairs, classes))
        for entry in e.models:
            chart = plots.accuracy_chart(
                entry.name,
                [r for r in summary_rows if r["model"] == entry.name],
                [r for r in pair_rows if r["model"] == entry.name],
                [r for r in class_rows if r["model"] == entry.name],
                sigma,
            )
            storage.write_bytes_atomic(storage.join(run.build, tables.evaluation_chart(entry.name)), chart)
        for written, table in ((tables.EVAL_PAIRS, pairs), (tables.EVAL_CLASSES, classes), (tables.EVAL_SUMMARY, summary)):
            storage.write_parquet(storage.join(run.build, written.path), table, key)

    def describe(self, s: dict) -> str:
        from salient.report import fmt

        rows = "\n".join(
            f"  {r['model']:<12} sigma {r['sigma']:<5g} clean {fmt(r['mean_clean_acc']):>5}  core {fmt(r['mean_core_acc']):>5} "
            f"({r['n_classes_core_acc']} classes)  spurious {fmt(r['mean_spurious_acc']):>5} ({r['n_classes_spurious_acc']} classes)"
            for r in s["summary"]
        )
        return (
            "evaluate: mean over classes (clean / core acc = noise on spurious masks / spurious acc = noise on core masks)\n"
            + rows + f"\n  tables and plots -> {tables.EVALUATION_DIR}/ in the build"
        )
