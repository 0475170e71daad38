"""The build report: a page per class and an index, every text escaped, every picture a file of the
build referenced where it lies (never copied), pages remade only when what they show changes; and
the evaluation charts, for one pair or 5,000."""

import gc
import io
import os
import re
import uuid

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from salient import aggregate, discover, plots, report, storage, tables
from salient.dataset import SalientMasks
from salient.stage import execute
from salient.stages.report import Report
from tests.salient.test_masks import _build, _generalize
from tests.salient.test_report_browser import pictures, report_run, synthetic_build

def _report_files(build: str) -> dict[str, tuple[int, int]]:
    """Every file under report/ with its inode and modification time."""
    out = {}
    for folder, _, names in os.walk(os.path.join(build, tables.REPORT_DIR)):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), build)] = (st.st_ino, st.st_mtime_ns)
    return out


def test_report_shows_every_pair_with_pictures_and_escapes_text(tmp_path):
    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    index = storage.read_parquet(f"{out}/masks/index.parquet").to_pylist()
    pairs = sorted({(r["class_index"], r["wnid"], r["feature_index"]) for r in index})
    storage.write_parquet(f"{out}/{aggregate.PAIRS_TABLE}", pa.table({
        "class_index": [c for c, _, _ in pairs], "wnid": [w for _, w, _ in pairs], "feature_index": [j for _, _, j in pairs],
        "feature_rank": list(range(1, len(pairs) + 1)), "importance": [0.5] * len(pairs),
    }), "fp")
    storage.write_parquet(f"{out}/{aggregate.CLASSES_TABLE}", pa.table({
        "class_index": [0, 1, 2], "wnid": ["n0000", "n0001", "n0002"],
        "name": ["<script>alert(1)</script>", "b & c", None], "reason": [None, None, "no images predicted as this class"],
    }), "fp")
    strip = io.BytesIO()
    Image.new("RGB", (40, 8), "red").save(strip, format="PNG")
    with_strips = pairs[0]  # discovery ran for this pair only
    for name in discover.STRIPS:
        storage.write_bytes_atomic(f"{out}/{tables.discover_pair(with_strips[1], with_strips[2])}/{name}.png", strip.getvalue())

    page = report.write_report(out, "a <title>")
    assert page == storage.join(out, tables.REPORT.path)
    text = open(page, encoding="utf-8").read()
    assert "<title>a &lt;title&gt;</title>" in text
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "b &amp; c" in text
    rows = re.findall(r"<tr id='c(\d{5})'><td><a href='classes/(\d{5})\.html'>", text)
    assert rows == [(f"{c:05d}", f"{c:05d}") for c in range(3)], "one row per class, linking its page"

    pages = {c: open(os.path.join(out, tables.report_class_page(c)), encoding="utf-8").read() for c in range(3)}
    assert "<h1>0: n0000 &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in pages[0] and "<script>alert" not in pages[0]
    assert "No pairs: no images predicted as this class." in pages[2]
    shown = {c: pictures(out, tables.report_class_page(c)) for c in range(3)}
    for c, wnid, j in pairs:
        assert f"id='feature-{j}'" in pages[c]
        assert tables.report_masks(c, j) in shown[c], "a mask strip per pair with masks"
    assert [p for p in shown[with_strips[0]] if p.startswith("discover/")] == [
        f"{tables.discover_pair(with_strips[1], with_strips[2])}/{name}.png" for name in discover.STRIPS
    ], "the build's own discovery strips, referenced in place"
    assert all(p.startswith(("discover/", "report/masks/")) for c in shown for p in shown[c])
    assert all(" loading='lazy' " in tag for tag in re.findall(r"<img [^>]*>", "".join(pages.values())))

    made = sorted(_report_files(out))
    assert made == sorted([tables.REPORT.path, *(tables.report_class_page(c) for c in range(3)),
                           *(tables.report_masks(c, j) for c, _, j in pairs)]), "only pages and mask strips: nothing copied"
    strip_png = Image.open(os.path.join(out, tables.report_masks(*pairs[0][::2])))
    assert strip_png.mode == "LA" and strip_png.size == (3 * 32 + 2 * 2, 32), "three masks at the crop size, 2 px apart"
    first = np.asarray(SalientMasks(out).mask(min(r["row"] for r in index if (r["class_index"], r["feature_index"]) == pairs[0][::2] and r["rank"] == 1)))
    assert np.array_equal(np.asarray(strip_png)[:, :32, 0], first), "the stored mask itself, at the crop size"


def test_the_masks_shown_are_read_by_their_chunks_alone(tmp_path):
    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    store = SalientMasks(out)
    assert store.shard_rows == 2 and len(store) > 4
    os.remove(os.path.join(out, tables.mask_shard_object(1)))  # as if all its masks were zero: never written
    rows = [len(store) - 1, 0, 3, 2, 0]
    assert np.array_equal(store.take(rows), np.stack([store.mask(i) for i in rows]))
    assert not store.take(rows[2:4]).any() and store.take([]).shape == (0, 32, 32)


def test_a_rerun_rewrites_nothing_and_a_change_remakes_only_its_pages(tmp_path):
    root = str(tmp_path / "out")
    first = report_run(root, "20260101T000000Z-aaaaaa")
    made = synthetic_build(first.build, n_classes=20, crop=8)
    summary = execute(Report(), first)
    with_masks = len({c for c, *_ in made["masked"]})
    items = 1 + 20 + with_masks  # the index, a page per class, the mask strips of each class with masks
    assert (summary["classes"], summary["made"], summary["reused"]) == (20, items, 0)
    files = _report_files(first.build)
    assert len(files) == 1 + 2 * 20 + with_masks + len(made["masked"]), "pages and strips, with their markers"

    # the same build again: every page's marker names what it shows, nothing is touched
    assert execute(Report(), first)["made"] == 0
    assert _report_files(first.build) == files

    # a new build with the same tables takes every page from the cache: hard links, not copies
    second = report_run(root, "20260101T000001Z-bbbbbb")
    storage.copy_tree(first.build, second.build, skip=(tables.REPORT_DIR, "stages", tables.CACHE_REFS))
    summary = execute(Report(), second)
    assert (summary["made"], summary["reused"]) == (0, items)
    again = _report_files(second.build)
    assert {rel: ino for rel, (ino, _) in again.items()} == {rel: ino for rel, (ino, _) in files.items()}

    # one pair of class 3 labelled anew: its page and the index (whose counts change) are made again
    labels = storage.read_parquet(storage.join(second.build, tables.LABELS.path)).to_pylist()
    changed = next(r for r in labels if r["class_index"] == 3 and r["label"] == "insufficient")
    changed["label"], changed["kind"] = "core", "core"
    storage.write_parquet(storage.join(second.build, tables.LABELS.path), pa.Table.from_pylist(labels), "fp2")
    summary = execute(Report(), second)
    assert summary["made"] == 2
    after = _report_files(second.build)
    remade = {rel for rel in after if after[rel] != again.get(rel)}
    assert remade == {tables.REPORT.path, tables.report_class_page(3), tables.report_class_marker(3)}
    assert "<span class='core'>core</span>" in open(os.path.join(second.build, tables.report_class_page(3)), encoding="utf-8").read()

    # a second model evaluated: every page shows it, the mask strips stay as they were
    for table in (tables.EVAL_PAIRS, tables.EVAL_CLASSES, tables.EVAL_SUMMARY):
        rows = storage.read_parquet(storage.join(second.build, table.path))
        other = rows.set_column(0, "model", pa.array(["other"] * rows.num_rows))
        storage.write_parquet(storage.join(second.build, table.path), pa.concat_tables([rows, other]), "fp3")
    assert execute(Report(), second)["made"] == 1 + with_masks, "the index and the pages of the evaluated classes"
    latest = _report_files(second.build)
    strips = {rel for rel in latest if rel.endswith(".png")}
    assert strips and all(latest[rel] == after[rel] for rel in strips)


def test_a_report_on_s3_browses_the_same_once_synced(s3_server, tmp_path):
    """The stage writes the report of a build on S3; a second run writes nothing; a local copy of
    the build shows every picture through its relative links."""
    local = report_run(str(tmp_path / "local"), "20260101T000000Z-aaaaaa")
    made = synthetic_build(local.build, n_classes=6, crop=8)
    run = report_run(f"s3://{s3_server.bucket}/{uuid.uuid4().hex}", "20260101T000000Z-aaaaaa")
    storage.copy_tree(local.build, run.build)
    summary = execute(Report(), run)
    assert (summary["classes"], summary["reused"]) == (6, 0)
    assert execute(Report(), run)["made"] == 0
    rows = list(range(len(SalientMasks(local.build))))[::-3]
    assert np.array_equal(SalientMasks(run.build).take(rows), SalientMasks(local.build).take(rows))

    synced = str(tmp_path / "synced")
    storage.copy_tree(run.build, synced)
    shown = [p for c in range(6) for p in pictures(synced, tables.report_class_page(c))]
    assert len(shown) == 3 * len(made["pairs"]) + len(made["masked"])


def test_the_mask_strips_key_follows_their_pixels_source(tmp_path):
    """What a class's mask strips are keyed by is what their pixels are made from: each mask's NAM,
    or, for masks imported without NAMs, the mask index's fingerprint."""
    build = str(tmp_path / "b")
    synthetic_build(build, n_classes=3, crop=8)
    view = report.masks_view(report.read_inputs(build), 0)
    assert view["pairs"] and all(m[3] for _, shown in view["pairs"] for m in shown) and view["source"] is None
    uri = storage.join(build, tables.MASK_INDEX.path)
    index = storage.read_parquet(uri)
    nulls = pa.array([None] * index.num_rows, pa.list_(pa.float16()))
    storage.write_parquet(uri, index.set_column(index.column_names.index("nam"), "nam", nulls), "imported-1")
    view = report.masks_view(report.read_inputs(build), 0)
    assert view["source"] == "imported-1" and all(m[3] is None for _, shown in view["pairs"] for m in shown)


def test_an_empty_build_gets_an_index_that_says_so(tmp_path):
    page = report.write_report(str(tmp_path / "empty"))
    text = open(page, encoding="utf-8").read()
    assert "The build has no classes yet" in text and "<script>" not in text


def test_urls_of_pictures_quote_every_part():
    assert report._url("discover/n01 #%?&'/feature_3/images.png", 2) == "../../discover/n01%20%23%25%3F%26%27/feature_3/images.png"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("n_pairs, labels", [(1, ("core",)), (5000, ("core", "spurious")), (40, ("spurious",)), (0, ())])
def test_the_evaluation_chart_draws_any_number_of_pairs(n_pairs, labels):
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    pairs = [{"sigma": 0.5, "label": labels[i % len(labels)], "drop": None if i % 97 == 5 else float(rng.uniform(-1, 1))} for i in range(n_pairs)]
    classes = [{"sigma": 0.5, "core_acc": None if "spurious" not in labels else float(rng.random()),
                "spurious_acc": None if "core" not in labels else float(rng.random())} for _ in range(max(1, n_pairs // 5))]
    summary = [{"sigma": s, "mean_clean_acc": 0.9, "mean_core_acc": None if "spurious" not in labels else 0.5,
                "mean_spurious_acc": 0.7} for s in (0.25, 0.5) if n_pairs]  # no pairs labelled: no evaluation at all
    png = plots.accuracy_chart("model $x$ <1>", summary, pairs, classes, 0.5)
    assert _png_size(png) == plots.CHART_SIZE
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Figure], "no figure outlives the chart"
