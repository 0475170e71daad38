"""The report stage: ``report/index.html``, a page per class and the strips of each class's masks,
from the build's tables and pictures. Its items are the index, each class page and each class's
mask strips, each keyed by what it shows: a rebuild remakes only what changed and takes the rest
from the cache (hard links on a local disk)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from salient import report, storage, tables
from salient.stage import Item, Run, Stage

# Items made at once: an item's time is mostly waiting for its files to reach the disk (or the store).
WRITERS = 8


class Report(Stage):
    name = "report"
    help = f"{tables.REPORT.path} and a page per class: pairs, pictures, evaluation and build facts"
    code_version = report.CODE_VERSION
    retries = 0
    unit = "pages and mask strips"

    def plan(self, run: Run) -> list[Item]:
        inputs = report.read_inputs(run.build)
        items = []
        for view in report.class_views(inputs):
            c = view["class"]["class_index"]
            masks = report.masks_view(inputs, c)
            if masks:
                items.append(Item(
                    self.key(run, masks), tables.report_masks_marker(c), tuple(report.masks_files(masks)),
                    (report.write_masks, inputs, masks), f"class {c} masks",
                ))
            items.append(Item(self.key(run, view), tables.report_class_marker(c), (tables.report_class_page(c),),
                              (report.write_class_page, view), f"class {c}"))
        index = report.index_view(inputs)
        items.append(Item(self.key(run, index), tables.stage_marker(self.name), (tables.REPORT.path,), (report.write_index, index), "index"))
        return items

    def make(self, run: Run, item: Item) -> dict:
        write, *args = item.payload
        return write(run.build, *args)

    def compute(self, run: Run, todo: list[Item], done: Callable[[Item, dict], None]) -> None:
        def make(item: Item) -> dict:
            result = {"fingerprint": item.commit_fingerprint, **self.make(run, item)}
            storage.write_json(storage.join(run.build, item.marker), result)
            return result

        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="report") as pool:
            futures = {pool.submit(make, item): item for item in todo}
            try:
                for future in as_completed(futures):
                    done(futures[future], future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        uri = storage.join(run.build, tables.REPORT.path)
        made = sum(origin == "computed" for _, _, origin in results)
        run.log.info("report written to %s (%d of %d items made, the others reused)", uri, made, len(results))
        return {
            "report": uri, "classes": sum(item.payload[0] is report.write_class_page for item, _, _ in results),
            "made": made, "reused": len(results) - made,
        }

    def describe(self, s: dict) -> str:
        return (f"report: the index and {s['classes']:,} class pages ({s['made']:,} pages or mask strips made, "
                f"{s['reused']:,} reused) -> {storage.normalize_uri(s['report'])}")
