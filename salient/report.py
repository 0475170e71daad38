"""The build report: ``report/index.html``, self-contained next to its PNGs, for people.

Per class: its pairs with label and kind, the discovery strips (top images, heatmaps, feature
attacks) and a few masks; then the evaluation charts and tables, and build facts (counts,
failures, throughput). Every text shown is escaped; every picture is a file under ``report/``.
"""

from __future__ import annotations

import html
from collections import defaultdict

import numpy as np

from salient import activations, discover, storage, tables
from salient.plan import plan_uri

MASKS_PER_PAIR = 5

_CSS = """
body{font-family:sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
.spurious{color:#b3261e;font-weight:bold}.core{color:#1a5fb4;font-weight:bold}
.pair{margin:1em 0 2em 0}.strip{display:block;margin:.2em 0;image-rendering:pixelated;max-width:100%}
.facts td:first-child{font-weight:bold}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: float | None) -> str:
    """A fraction with three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def _copy(build: str, src_rel: str, dest_rel: str) -> str:
    """Copy ``build/src_rel`` to ``build/report/dest_rel``; returns the path relative to the report."""
    storage.write_bytes_atomic(storage.join(build, tables.report_file(dest_rel)), storage.read_bytes(storage.join(build, src_rel)))
    return dest_rel


def _mask_strip(store, rows: list[int]) -> bytes:
    tiles = [np.repeat(store.mask(i)[:, :, None], 3, axis=2) for i in rows]
    return discover.png_strip(tiles)


def _read(build: str, table: tables.Table) -> list[dict] | None:
    uri = storage.join(build, table.path)
    return storage.read_parquet(uri).to_pylist() if storage.exists(uri) else None


def build_facts(build: str) -> list[tuple[str, str]]:
    """(name, value) rows about the build directory ``build``: images, failures, throughput, pairs,
    labels, masks."""
    facts: list[tuple[str, str]] = []
    if storage.exists(plan_uri(build)):
        stats = activations.all_stats(build)
        if stats:
            s = activations.summarize(stats, build)
            facts += [
                ("images planned", f"{s['planned']:,}"), ("images with activations", f"{s['images']:,}"),
                ("images that failed", f"{s['failed']:,}" + (f" (listed in {', '.join(s['failure_lists'])})" if s["failed"] else "")),
                ("activation shards", str(s["shards"])),
                ("activation throughput", f"{s['images_per_worker_second'] or 0:.1f} images per worker-second"),
            ]
    classes = _read(build, tables.CLASSES)
    pairs = _read(build, tables.PAIRS)
    if classes is not None and pairs is not None:
        facts += [("classes", str(len(classes))), ("(class, feature) pairs", str(len(pairs))),
                  ("classes without images", str(sum(1 for c in classes if c["reason"])))]
    labels = _read(build, tables.LABELS)
    if labels is not None:
        counts = defaultdict(int)
        for r in labels:
            counts[r["label"]] += 1
        facts.append(("labels", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
    index = _read(build, tables.MASK_INDEX)
    if index is not None:
        facts.append(("masks", f"{len(index):,} of {len({r['image_id'] for r in index}):,} images"))
    return facts


def write_report(build: str, title: str = "Salient build report") -> str:
    """Write ``report/index.html`` and its pictures into the build directory ``build``; returns the page's URI."""
    from salient.dataset import SalientMasks

    pairs = _read(build, tables.PAIRS) or []
    classes = {c["class_index"]: c for c in _read(build, tables.CLASSES) or []}
    labels = {(r["class_index"], r["feature_index"]): r for r in _read(build, tables.LABELS) or []}
    store = SalientMasks(build) if storage.exists(storage.join(build, tables.MASK_INDEX.path)) else None
    mask_rows: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    if store is not None:
        cols = store.index.select(["class_index", "feature_index", "rank"]).to_pydict()
        for i, (c, j, rank) in enumerate(zip(cols["class_index"], cols["feature_index"], cols["rank"])):
            mask_rows[(c, j)].append((rank, i))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><h2>Build facts</h2><table class='facts'>"]
    parts += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in build_facts(build)]
    parts.append("</table>")

    summary = _read(build, tables.EVAL_SUMMARY)
    if summary:
        parts.append("<h2>Evaluation</h2><p>Core accuracy: noise on the spurious masks; spurious accuracy: noise on the core masks. Means over classes.</p>")
        parts.append("<table><tr><th>model</th><th>sigma</th><th>clean</th><th>core acc</th><th>spurious acc</th><th>core drop</th><th>spurious drop</th></tr>")
        for r in summary:
            parts.append(
                f"<tr><td>{_e(r['model'])}</td><td>{r['sigma']:g}</td><td>{fmt(r['mean_clean_acc'])}</td><td>{fmt(r['mean_core_acc'])}</td>"
                f"<td>{fmt(r['mean_spurious_acc'])}</td><td>{fmt(r['mean_core_drop'])}</td><td>{fmt(r['mean_spurious_drop'])}</td></tr>"
            )
        parts.append("</table>")
        for name in sorted({r["model"] for r in summary}):
            chart = tables.evaluation_chart(name)
            if storage.exists(storage.join(build, chart)):
                rel = _copy(build, chart, chart)  # at the same path under report/
                parts.append(f"<img class='strip' src='{_e(rel)}' alt='{_e(name)} accuracy chart'>")

    parts.append("<h2>Classes and their features</h2>")
    by_class: dict[int, list[dict]] = defaultdict(list)
    for p in pairs:
        by_class[p["class_index"]].append(p)
    for c in sorted(classes):
        info = classes[c]
        parts.append(f"<h3 id='class-{c}'>{c}: {_e(info['wnid'])} {_e(info.get('name') or '')}</h3>")
        if info["reason"]:
            parts.append(f"<p>No pairs: {_e(info['reason'])}.</p>")
        for p in sorted(by_class[c], key=lambda p: p["feature_rank"]):
            j = p["feature_index"]
            lab = labels.get((c, j))
            label = lab["label"] if lab else "pending"
            kind = f" ({lab['kind']})" if lab and lab["kind"] and lab["kind"] != "core" else ""
            parts.append(
                f"<div class='pair'><p>feature {j} (rank {p['feature_rank']}, importance {p['importance']:.3f}): "
                f"<span class='{_e(label)}'>{_e(label)}{_e(kind)}</span></p>"
            )
            for strip in discover.STRIPS:
                src = f"{tables.discover_pair(p['wnid'], j)}/{strip}.png"
                if storage.exists(storage.join(build, src)):
                    rel = _copy(build, src, f"pairs/{p['wnid']}/feature_{j}/{strip}.png")
                    parts.append(f"<img class='strip' src='{_e(rel)}' alt='{_e(strip)} of feature {j}'>")
            rows = [i for _, i in sorted(mask_rows.get((c, j), []))[:MASKS_PER_PAIR]]
            if rows:
                rel = f"pairs/{p['wnid']}/feature_{j}/masks.png"
                storage.write_bytes_atomic(storage.join(build, tables.report_file(rel)), _mask_strip(store, rows))
                parts.append(f"<img class='strip' src='{_e(rel)}' alt='masks of feature {j}'>")
            parts.append("</div>")
    parts.append("</body></html>")
    uri = storage.join(build, tables.REPORT.path)
    storage.write_bytes_atomic(uri, "\n".join(parts).encode("utf-8"))
    return uri

