"""The report at ImageNet's size (1,000 classes, 5,000 pairs) in a real browser: the index filters,
sorts and links to every class page, and a class page loads its pictures with no error. The build's
tables are written directly, with the columns of salient/tables.py, and small pictures."""

import html
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr
from PIL import Image

from salient import config, discover, masks, plots, storage, tables
from salient import nam as nam_maps
from salient.stage import Run, execute
from salient.stages.report import Report
from tests.browser import broken_images, browser, console_errors  # noqa: F401 -- session fixture: headless Chromium

pytestmark = pytest.mark.slow  # the 1,000-class build and its report take a dozen seconds

LABELS = ("core", "spurious", "core", "insufficient", None, "core", "spurious")  # taken in turn; None: no answers yet
KINDS = {"core": "core", "spurious": "background", "insufficient": None}
VOTES = {"core": (4, 1, 0), "spurious": (1, 0, 4), "insufficient": (1, 0, 2)}  # main object, separate object, background
MODEL = "resnet-50"
SIGMAS = (0.25, 1.0)
SHARD = 256  # masks per Zarr shard object, as generalize writes them
HOSTILE_WNID = "n05 #%?&'<b>"  # a class folder name that must be quoted in URLs and escaped in text


def _strips(crop: int) -> dict[str, bytes]:
    """Three made-up discovery strips of 5 tiles (a disc on a gradient; its heatmap; its attack), as PNG."""
    y, x = np.mgrid[0:crop, 0:crop] / crop
    tiles = []
    for k in range(5):
        disc = ((x - 0.3 - k / 10) ** 2 + (y - 0.5) ** 2 < 0.06).astype(np.float32)
        tiles.append(np.stack([0.3 + 0.5 * y, 0.4 + 0.2 * x, 0.3 + 0.6 * disc], axis=2))
    heat = [np.clip(t * 0.5 + np.stack([t[..., 2], 0 * t[..., 2], 1 - t[..., 2]], axis=2) * 0.5, 0, 1) for t in tiles]
    noise = np.random.default_rng(0)
    attack = [np.clip(t + noise.normal(0, 0.15, t.shape), 0, 1) for t in tiles]
    out = {}
    for name, group in zip(discover.STRIPS, (tiles, heat, attack)):
        out[name] = discover.png_strip([(255 * t).astype(np.uint8) for t in group])
    return out


def synthetic_build(build: str, n_classes: int = 1000, per_class: int = 5, crop: int = 48, masks_per_pair: int = 5) -> dict:
    """Write the tables the report reads for ``n_classes`` x ``per_class`` pairs into the build
    directory ``build``: classes (the last one without pairs), pairs, labels, discovery strips (three
    small PNGs, hard-linked), masks (``crop`` px, from random 3 x 3 NAMs) of every core or spurious pair, the evaluation of
    one model at two sigmas and its chart. Returns what was written, for the checks."""
    rng = np.random.default_rng(0)
    wnids = [HOSTILE_WNID if c == 5 else f"n{c:08d}" for c in range(n_classes)]
    storage.write_parquet(storage.join(build, tables.CLASSES.path), pa.table({
        "class_index": list(range(n_classes)), "wnid": wnids,
        "name": [f"class <{c}> & co" if c % 100 == 7 else f"thing{c}" for c in range(n_classes)],
        "definition": [f"the definition of thing {c}" for c in range(n_classes)], "supercategory": ["stuff"] * n_classes,
        "n_images": [1300] * n_classes, "n_predicted": [1250] * n_classes, "n_group": [1250] * n_classes,
        "reason": [None] * (n_classes - 1) + ["no images predicted as this class"],
    }), "fp")
    pairs = [(c, (c * 7 + r * 131) % 2048, r + 1) for c in range(n_classes - 1) for r in range(per_class)]
    storage.write_parquet(storage.join(build, tables.PAIRS.path), pa.table({
        "class_index": [c for c, _, _ in pairs], "wnid": [wnids[c] for c, _, _ in pairs], "feature_index": [j for _, j, _ in pairs],
        "feature_rank": [r for _, _, r in pairs], "importance": rng.random(len(pairs)), "mean_activation": rng.random(len(pairs)),
        "n_group": [1250] * len(pairs),
    }), "fp")
    labelled = [(c, j, r, LABELS[(3 * c + r) % len(LABELS)]) for c, j, r in pairs]
    answered = [p for p in labelled if p[3] is not None]
    storage.write_parquet(storage.join(build, tables.LABELS.path), pa.table({
        "class_index": [c for c, *_ in answered], "wnid": [wnids[c] for c, *_ in answered], "feature_index": [j for _, j, _, _ in answered],
        "feature_rank": [r for _, _, r, _ in answered], "votes_main_object": [VOTES[lb][0] for *_, lb in answered],
        "votes_separate_object": [VOTES[lb][1] for *_, lb in answered], "votes_background": [VOTES[lb][2] for *_, lb in answered],
        "n_answers": [sum(VOTES[lb]) for *_, lb in answered], "mean_confidence": [4.0] * len(answered), "label": [lb for *_, lb in answered],
        "kind": [KINDS[lb] for *_, lb in answered], "in_build": [True] * len(answered),
    }), "fp")

    originals = {}
    for strip, png in _strips(crop).items():
        originals[strip] = storage.join(build, f"{strip}.tmp")
        storage.write_bytes_atomic(originals[strip], png)
    for c, j, _ in pairs:
        folder = discover.pair_dir(build, wnids[c], j)
        os.makedirs(folder)
        for strip, png in originals.items():
            os.link(png, f"{folder}/{strip}.png")
    for png in originals.values():
        os.unlink(png)

    masked = [(c, j, r, lb) for c, j, r, lb in labelled if lb in ("core", "spurious")]
    rows = [(c, j, r, lb, k) for c, j, r, lb in masked for k in range(1, masks_per_pair + 1)]
    rows.sort(key=lambda x: (x[0] * 100 + x[4], x[0], x[1]))  # by image, as generalize orders them
    n = len(rows)
    nam = rng.random((n, 9)).astype(np.float16)
    pixels = nam_maps.to_uint8(nam_maps.upsample(torch.from_numpy(nam.astype(np.float32)).reshape(n, 3, 3), crop).numpy())
    storage.write_parquet(storage.join(build, tables.MASK_INDEX.path), pa.table({
        "row": np.arange(n), "class_index": [x[0] for x in rows], "wnid": [wnids[x[0]] for x in rows],
        "feature_index": [x[1] for x in rows], "feature_rank": [x[2] for x in rows], "label": [x[3] for x in rows],
        "kind": [KINDS[x[3]] for x in rows], "image_id": [x[0] * 100 + x[4] for x in rows],
        "relpath": [f"{wnids[x[0]]}/{wnids[x[0]]}_{x[4]}.JPEG" for x in rows], "image_label": [x[0] for x in rows],
        "rank": [x[4] for x in rows], "activation": rng.random(n).astype(np.float32),
        "nam": pa.FixedSizeListArray.from_arrays(pa.array(nam.ravel(), pa.float16()), 9),
        "nam_h": np.full(n, 3, np.int32), "nam_w": np.full(n, 3, np.int32),
    }), "fp")
    array = zarr.create_array(
        store=storage.join(build, tables.MASKS.path), shape=(n, crop, crop), chunks=(1, crop, crop), shards=(SHARD, crop, crop),
        dtype="uint8", fill_value=0, compressors=masks.COMPRESSORS["zstd"](),
    )
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, n, SHARD):
            masks.write_shard(build, array, start, pixels[start : start + SHARD], pool)

    drop = {(c, j, s): float(np.clip(rng.normal(s * (0.5 if lb == "spurious" else 0.1), 0.1), -0.2, 0.8)) for c, j, _, lb in masked for s in SIGMAS}
    eval_pairs = [
        {"model": MODEL, "sigma": s, "class_index": c, "feature_index": j, "feature_rank": r, "label": lb, "n_images": masks_per_pair,
         "n_other_class_images": 0, "clean_acc": 0.8, "noisy_acc": 0.8 - drop[c, j, s], "drop": drop[c, j, s]}
        for c, j, r, lb in masked for s in SIGMAS
    ]
    storage.write_parquet(storage.join(build, tables.EVAL_PAIRS.path), pa.Table.from_pylist(eval_pairs), "fp")
    by_class: dict[int, list[tuple[int, str]]] = {}
    for c, j, _, lb in masked:
        by_class.setdefault(c, []).append((j, lb))
    eval_classes = []
    for c, features in by_class.items():
        for s in SIGMAS:
            core = [drop[c, j, s] for j, lb in features if lb == "core"]
            spurious = [drop[c, j, s] for j, lb in features if lb == "spurious"]
            eval_classes.append({
                "model": MODEL, "sigma": s, "class_index": c, "n_images": 10, "n_core_images": 5 * len(core),
                "n_spurious_images": 5 * len(spurious), "clean_acc": 0.8, "clean_acc_core_images": 0.8, "clean_acc_spurious_images": 0.8,
                "core_acc": 0.8 - max(spurious) if spurious else None, "spurious_acc": 0.8 - max(core) if core else None,
                "core_drop": max(spurious) if spurious else None, "spurious_drop": max(core) if core else None,
            })
    storage.write_parquet(storage.join(build, tables.EVAL_CLASSES.path), pa.Table.from_pylist(eval_classes), "fp")
    summary = []
    for s in SIGMAS:
        mean = {k: float(np.mean([r[k] for r in eval_classes if r["sigma"] == s and r[k] is not None])) for k in ("core_acc", "spurious_acc", "core_drop", "spurious_drop")}
        summary.append({"model": MODEL, "sigma": s, "mean_clean_acc": 0.8, "mean_clean_acc_core_images": 0.8, "mean_clean_acc_spurious_images": 0.8,
                        **{f"mean_{k}": v for k, v in mean.items()}})
    storage.write_parquet(storage.join(build, tables.EVAL_SUMMARY.path), pa.Table.from_pylist(summary), "fp")
    storage.write_bytes_atomic(
        storage.join(build, tables.evaluation_chart(MODEL)),
        plots.accuracy_chart(MODEL, summary, [r for r in eval_pairs if r["sigma"] == max(SIGMAS)],
                             [r for r in eval_classes if r["sigma"] == max(SIGMAS)], max(SIGMAS)),
    )
    return {"classes": n_classes, "pairs": pairs, "labelled": labelled, "masked": masked, "wnids": wnids}


def report_run(root: str, build_id: str) -> Run:
    """A run of the report stage in this process on build ``build_id`` of the output root ``root``."""
    from salient import builds, preflight

    cfg = config.load(None, [f"output={root}"])
    return Run(cfg, builds.Layout(root, build_id), preflight.for_stages(cfg, [Report()]))


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    """The report of a synthetic 1,000-class build, made by the report stage: (build, facts, seconds)."""
    root = str(tmp_path_factory.mktemp("big") / "out")
    run = report_run(root, "20260101T000000Z-aaaaaa")
    made = synthetic_build(run.build)
    t0 = time.perf_counter()
    summary = execute(Report(), run)
    seconds = time.perf_counter() - t0
    assert (summary["classes"], summary["made"]) == (1000, 1001 + len({c for c, *_ in made["masked"]}))
    return run.build, made, seconds


def _load_pictures(driver) -> None:
    """Scroll to the end (pictures load lazily, when near) and wait until every picture has loaded or failed."""
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight);")
    driver.execute_script("return Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));")


def _visible_rows(driver) -> int:
    return driver.execute_script("return Array.from(document.querySelectorAll('#classes tbody tr')).filter(r => !r.hidden).length;")


def _column(driver, col: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#classes tbody tr')).filter(r => !r.hidden).map(r => r.cells[arguments[0]].textContent);",
        col,
    )


def test_the_index_of_1000_classes_filters_sorts_and_links_every_class_page(big_report, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    build, made, seconds = big_report
    index = os.path.join(build, tables.REPORT.path)
    browser.get("file://" + index)
    _load_pictures(browser)
    assert console_errors(browser) == []
    assert broken_images(browser) == [] and browser.execute_script("return document.images.length;") == 1, "the model's chart"
    assert _visible_rows(browser) == 1000
    assert browser.find_element(By.ID, "count").text == "Showing 1,000 of 1,000 classes"

    # every class has a link to its page, named by its index, and the page is there
    links = browser.execute_script("return Array.from(document.querySelectorAll('#classes tbody tr td:first-child a')).map(a => a.href);")
    assert len(links) == 1000
    for c, href in enumerate(links):
        assert href == f"file://{build}/{tables.report_class_page(c)}"
        assert os.path.isfile(os.path.join(build, tables.report_class_page(c)))

    # filter: words typed narrow the rows; the select keeps classes with spurious pairs
    box = browser.find_element(By.ID, "filter")
    box.send_keys("thing12")  # thing12, thing120..129, thing1200.. (none)
    assert _visible_rows(browser) == 11 and set(_column(browser, 2)) == {"thing12", *(f"thing{k}" for k in range(120, 130))}
    box.clear()
    box.send_keys("<7> & co")
    assert _column(browser, 2) == ["class <7> & co"], "escaped text is matched as shown"
    box.clear()
    box.send_keys(" ")  # clear() fires no input event
    assert _visible_rows(browser) == 1000
    spurious = len({c for c, _, _, lb in made["labelled"] if lb == "spurious"})
    browser.execute_script("const s = document.getElementById('show'); s.value = 'spurious'; s.dispatchEvent(new Event('change'));")
    assert _visible_rows(browser) == spurious
    browser.execute_script("const s = document.getElementById('show'); s.value = 'none'; s.dispatchEvent(new Event('change'));")
    assert _column(browser, 0) == ["999"], "the class without pairs"
    browser.execute_script("const s = document.getElementById('show'); s.value = ''; s.dispatchEvent(new Event('change'));")

    # sort: a numeric column by value, again the other way, with n/a last both times
    header = browser.find_element(By.XPATH, "//table[@id='classes']//th[normalize-space()='resnet-50 core drop']")
    for order in ("ascending", "descending"):
        header.click()
        values = _column(browser, 8)
        numbers = [float(v) for v in values if v != "n/a"]
        assert numbers == sorted(numbers, reverse=order == "descending") and header.get_attribute("aria-sort") == order
        assert "n/a" in values and values == [f"{v:.3f}" for v in numbers] + ["n/a"] * values.count("n/a")
    browser.find_element(By.XPATH, "//table[@id='classes']//th[normalize-space()='name']").click()
    assert _column(browser, 2)[:3] == ["class <107> & co", "class <207> & co", "class <307> & co"], "text sorts as text"
    browser.find_element(By.XPATH, "//table[@id='classes']//th[normalize-space()='#']").click()
    assert _column(browser, 0) == [str(c) for c in range(1000)]

    # a class page: its pairs' pictures all load (class 5's folder name quoted), and its link leads back
    for c in (0, 5, 7):
        browser.get(links[c])
        assert browser.find_element(By.TAG_NAME, "h1").text == f"{c}: {made['wnids'][c]} " + ("class <7> & co" if c == 7 else f"thing{c}")
        _load_pictures(browser)
        strips = 3 * 5 + sum(1 for c2, *_ in made["masked"] if c2 == c)
        assert browser.execute_script("return document.images.length;") == strips
        assert broken_images(browser) == [] and console_errors(browser) == []
    browser.find_element(By.LINK_TEXT, "← all classes").click()
    assert browser.current_url.endswith(f"{tables.REPORT.path}#c00007")


def pictures(build: str, page_rel: str) -> list[str]:
    """The pictures a page of the build shows, as paths relative to the build; each must be a file."""
    text = open(os.path.join(build, page_rel), encoding="utf-8").read()
    folder = os.path.dirname(os.path.join(build, page_rel))
    out = []
    for src in re.findall(r"<img [^>]*src='([^']+)'", text):
        path = os.path.normpath(os.path.join(folder, unquote(html.unescape(src))))
        assert os.path.isfile(path), f"{page_rel} shows {src}, which is not a file"
        out.append(os.path.relpath(path, build))
    return out


def test_the_report_of_1000_classes_takes_seconds_shows_every_picture_in_place_and_stays_small(big_report):
    build, made, seconds = big_report
    assert seconds < 60, f"the report of 1,000 classes took {seconds:.1f} s"
    masked = {(c, j) for c, j, _, _ in made["masked"]}
    for c in range(1000):
        expected = [f"{tables.discover_pair(made['wnids'][c], j)}/{strip}.png" for c2, j, _ in made["pairs"] if c2 == c for strip in discover.STRIPS]
        expected += [tables.report_masks(c, j) for c2, j, _ in made["pairs"] if c2 == c and (c, j) in masked]
        assert sorted(pictures(build, tables.report_class_page(c))) == sorted(expected)
    made_files = [os.path.relpath(os.path.join(d, f), os.path.join(build, tables.REPORT_DIR)) for d, _, fs in os.walk(os.path.join(build, tables.REPORT_DIR)) for f in fs]
    assert {f.split("/")[0] for f in made_files} == {"index.html", "classes", "masks"}, "nothing copied"
    assert sum(f.endswith(".png") for f in made_files) == len(masked), "the mask strips are its only pictures"
    assert os.path.getsize(os.path.join(build, tables.REPORT.path)) < 500_000
    assert max(os.path.getsize(os.path.join(build, tables.report_class_page(c))) for c in range(1000)) < 20_000


def _screenshot(driver, path: str, height: int) -> None:
    """The top ``height`` pixels of the page, in at most 256 colours (the docs keep them small)."""
    driver.set_window_size(1280, height)
    try:
        driver.save_screenshot(path)
    finally:
        driver.set_window_size(1280, 1000)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def test_screenshots_of_the_report(big_report, browser, tmp_path):  # noqa: F811
    """The index sorted by the drop under noise on the spurious masks, and a class page; with
    SALIENT_WRITE_SCREENSHOTS=1 they are written to docs/."""
    from selenium.webdriver.common.by import By

    build, _, _ = big_report
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")
    out = docs if os.environ.get("SALIENT_WRITE_SCREENSHOTS") == "1" else str(tmp_path)
    browser.get("file://" + os.path.join(build, tables.REPORT.path))
    header = browser.find_element(By.XPATH, "//table[@id='classes']//th[normalize-space()='resnet-50 core drop']")
    header.click()
    header.click()
    browser.execute_script("window.scrollTo(0, 0);")
    _screenshot(browser, os.path.join(out, "report-index.png"), 1800)
    browser.get("file://" + os.path.join(build, tables.report_class_page(7)))
    _screenshot(browser, os.path.join(out, "report-class.png"), 1500)
    for name in ("report-index.png", "report-class.png"):
        assert 10_000 < os.path.getsize(os.path.join(out, name)) < 300_000
