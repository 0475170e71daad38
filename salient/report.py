"""The build report, for people: ``report/index.html`` and one page per class.

The index shows the build's facts, the evaluation's summary and charts, and a table of every class
that sorts and filters in the browser (a small inline script: the pages work offline, from
``file://`` too); each row links to the class's page, ``report/classes/NNNNN.html``, named by class
index. A class page shows its pairs with label, kind, importance, votes and accuracy drops, their
discovery strips (top images, heatmaps, feature attacks) and a strip of their masks.

Pictures the build already holds (``discover/``, ``evaluation/``) are referenced by relative URL,
never copied, so a synced copy of a build on an object store browses the same; the mask strips
under ``report/masks/`` are the only pictures the report makes. Every text shown is escaped.

Each page, and each class's mask strips, is made from its *view*, the plain data it shows
(:func:`class_view`, :func:`masks_view`, :func:`index_view`): the report stage keys their cache
entries by their views, so each is made again exactly when what it shows changes (a new model's
evaluation remakes the pages, not the mask strips).
"""

from __future__ import annotations

import hashlib
import html
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from salient import activations, discover, plots, storage, tables
from salient.plan import plan_uri

if TYPE_CHECKING:
    from salient.dataset import SalientMasks

CODE_VERSION = "report-2"  # 2: a page per class, pictures referenced in place, evaluation charts by matplotlib
TITLE = "Salient build report"
MASKS_PER_PAIR = 5
# Mask tiles are stored at most this many pixels high and shown at the crop size: masks are smooth
# (upsampled 7 x 7 maps), and a quarter of the pixels of 5,000 strips encode in a quarter of the time.
MASK_TILE = 112
_GAP = 2  # pixels between the tiles of a mask strip, at the stored size

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0 auto;padding:1.2em 2em 3em;max-width:1400px}
h1{font-size:1.55em;margin:.3em 0 .5em}h2{font-size:1.2em;margin:1.6em 0 .5em;padding-bottom:.2em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:.2em 0 .4em}a{color:#0b57d0}nav{margin:.2em 0 .8em}nav a{margin-right:1.2em}
table{border-collapse:collapse;margin:.4em 0 1em;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e4e4e4;padding:.22em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f6;font-weight:600}.n{text-align:right}.muted,figcaption{color:#666}
.facts th{background:none;font-weight:600}
.core{color:#1a5fb4;font-weight:600}.spurious{color:#c01c28;font-weight:600}.pending,.insufficient{color:#777;font-weight:600}
#classes thead th{position:sticky;top:0;z-index:1}#classes td{text-align:right}
#classes td:nth-child(2),#classes td:nth-child(3),#classes td:nth-child(8){text-align:left}
th[data-type]{cursor:pointer;user-select:none;white-space:nowrap}
th[data-type]::after{content:" \\2195";color:#aaa}th[aria-sort=ascending]::after{content:" \\25B2";color:#222}
th[aria-sort=descending]::after{content:" \\25BC";color:#222}
.controls{display:flex;flex-wrap:wrap;gap:.6em 1.2em;align-items:center;margin:.6em 0}
.controls input,.controls select{font:inherit;padding:.3em .5em}.controls input{width:24em}
.pair{border:1px solid #e4e4e4;border-radius:6px;padding:.6em 1em;margin:1em 0}
figure{margin:.5em 0}figcaption{font-size:.85em}
img.strip{display:block;max-width:100%;height:auto;image-rendering:pixelated;background:#fff}
img.masks{image-rendering:auto;background:#8fb3e8}img.chart{display:block;max-width:100%;height:auto;margin:.4em 0}
"""

# Sorts the class table by a clicked header (again: the other way; numbers by value, n/a last) and
# filters its rows by the words typed (all must occur in the row) and by the select.
_SCRIPT = """
(function () {
  var table = document.getElementById("classes");
  if (!table) return;
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  var text = new Map(rows.map(function (r) { return [r, r.textContent.toLowerCase()]; }));
  var query = document.getElementById("filter"), show = document.getElementById("show");
  var count = document.getElementById("count"), total = rows.length;
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function column(key) { return heads.findIndex(function (h) { return h.dataset.key === key; }); }
  function filter() {
    var words = query.value.toLowerCase().split(/\\s+/).filter(Boolean), want = show.value, n = 0;
    var col = column(want === "none" ? "pairs" : want);
    rows.forEach(function (r) {
      var ok = words.every(function (w) { return text.get(r).indexOf(w) >= 0; });
      if (ok && want) {
        var pairs = Number(r.cells[col].textContent);
        ok = want === "none" ? pairs === 0 : pairs > 0;
      }
      r.hidden = !ok;
      if (ok) n++;
    });
    count.textContent = "Showing " + n.toLocaleString("en") + " of " + total.toLocaleString("en") + " classes";
  }
  function value(r, col, numeric) {  // numbers by value ("n/a" is NaN), text by its lower case
    var v = r.cells[col].textContent;
    return numeric ? Number(v) : v.toLowerCase();
  }
  heads.forEach(function (th, col) {
    if (!th.dataset.type) return;
    th.tabIndex = 0;
    function sort() {
      var numeric = th.dataset.type === "number", dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      var keyed = rows.map(function (r, i) { return [value(r, col, numeric), i, r]; });
      keyed.sort(function (a, b) {
        var x = a[0], y = b[0];
        if (numeric && isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;
        if (numeric ? (x !== y && !isNaN(x)) : x !== y) return (x < y ? -1 : 1) * dir;
        return a[1] - b[1];
      });
      rows = keyed.map(function (k) { return k[2]; });
      var frag = document.createDocumentFragment();
      rows.forEach(function (r) { frag.appendChild(r); });
      body.appendChild(frag);
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
  });
  query.addEventListener("input", filter);
  show.addEventListener("change", filter);
  filter();
})();
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: float | None) -> str:
    """A fraction with three decimals, or n/a."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _url(rel: str, depth: int) -> str:
    """The URL of ``rel`` (relative to the build) from a page ``depth`` folders below the build,
    each path part quoted (wnids and model names may hold any character a file name can)."""
    return "../" * depth + "/".join(quote(part, safe="") for part in rel.split("/"))


def _page(title: str, body: Sequence[str], script: str = "") -> bytes:
    head = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
    )
    tail = f"<script>{script}</script></body></html>" if script else "</body></html>"
    return (head + "\n".join(body) + tail).encode("utf-8")


def _label_of(label_row: dict | None) -> str:
    """A pair's label as shown: core, spurious, insufficient (answers in, too few agree) or pending."""
    return label_row["label"] if label_row and label_row.get("label") else "pending"


@dataclass
class Inputs:
    """What the report shows, read once from the build directory ``build``."""

    build: str
    classes: list[dict] = field(default_factory=list)  # classes.parquet, by class index
    pairs: dict[int, list[dict]] = field(default_factory=dict)  # per class, by feature rank
    labels: dict[tuple[int, int], dict] = field(default_factory=dict)
    eval_pairs: dict[tuple[int, int], list[dict]] = field(default_factory=dict)
    eval_classes: dict[int, list[dict]] = field(default_factory=dict)
    summary: list[dict] = field(default_factory=list)
    charts: dict[str, str] = field(default_factory=dict)  # model -> its chart, where the build has one
    strips: set[str] = field(default_factory=set)  # the discovery strips the build holds
    facts: list[tuple[str, str]] = field(default_factory=list)
    mask_rows: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # rows shown per pair
    mask_keys: dict[tuple[int, int], list] = field(default_factory=dict)  # what those masks' pixels depend on
    mask_shape: tuple[int, int] | None = None
    mask_source: str | None = None  # the index's fingerprint, where its rows hold no NAMs
    masks: SalientMasks | None = None

    @property
    def models(self) -> list[str]:
        """The evaluated models, in the summary's order."""
        return list(dict.fromkeys(r["model"] for r in self.summary))

    @property
    def chart_sigma(self) -> float | None:
        """The noise level of the per-pair and per-class charts and of the class table's drops: the largest."""
        return max((r["sigma"] for r in self.summary), default=None)


def _read(build: str, table: tables.Table) -> pa.Table | None:
    uri = storage.join(build, table.path)
    return storage.read_parquet(uri) if storage.exists(uri) else None


def _rows(table: pa.Table | None) -> list[dict]:
    return [] if table is None else table.to_pylist()


def read_inputs(build: str) -> Inputs:
    """Read every table the report shows from the build directory ``build``, once."""
    from salient.dataset import SalientMasks

    out = Inputs(build)
    classes, pairs, labels = (_read(build, t) for t in (tables.CLASSES, tables.PAIRS, tables.LABELS))
    out.classes = sorted(_rows(classes), key=lambda r: r["class_index"])
    for p in sorted(_rows(pairs), key=lambda p: (p["class_index"], p["feature_rank"])):
        out.pairs.setdefault(p["class_index"], []).append(p)
    out.labels = {(r["class_index"], r["feature_index"]): r for r in _rows(labels)}
    for r in _rows(_read(build, tables.EVAL_PAIRS)):
        out.eval_pairs.setdefault((r["class_index"], r["feature_index"]), []).append(r)
    for r in _rows(_read(build, tables.EVAL_CLASSES)):
        out.eval_classes.setdefault(r["class_index"], []).append(r)
    out.summary = _rows(_read(build, tables.EVAL_SUMMARY))
    out.charts = {m: tables.evaluation_chart(m) for m in out.models if storage.exists(storage.join(build, tables.evaluation_chart(m)))}
    names = {f"{strip}.png" for strip in discover.STRIPS}
    out.strips = {
        f"{tables.DISCOVER_DIR}/{rel}" for rel in storage.list_files(storage.join(build, tables.DISCOVER_DIR))
        if rel.rsplit("/", 1)[-1] in names
    }
    index = None
    if storage.exists(storage.join(build, tables.MASK_INDEX.path)):
        out.masks = SalientMasks(build)
        index = out.masks.index
        out.mask_shape = tuple(out.masks.array.shape[1:])
        _shown_masks(out, index)
    out.facts = build_facts(build, classes, pairs, labels, index)
    return out


def _shown_masks(out: Inputs, index: pa.Table) -> None:
    """The first :data:`MASKS_PER_PAIR` masks of every pair by rank, and what their pixels depend on."""
    n = index.num_rows
    order = index.select(["class_index", "feature_index", "rank"]).append_column("i", pa.array(np.arange(n), pa.int64()))
    order = order.sort_by([("class_index", "ascending"), ("feature_index", "ascending"), ("rank", "ascending")])
    c, j = order.column("class_index").to_numpy(), order.column("feature_index").to_numpy()
    starts = np.r_[True, (c[1:] != c[:-1]) | (j[1:] != j[:-1])] if n else np.zeros(0, bool)
    position = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else np.zeros(0, int)
    shown = order.filter(pa.array(position < MASKS_PER_PAIR))
    rows = shown.column("i").to_numpy()
    picked = index.take(pa.array(rows))
    nam = picked.column("nam")
    if nam.null_count or not len(nam) or not pa.types.is_fixed_size_list(nam.type):
        # Masks imported from a release have no NAM: their index's fingerprint stands for their pixels.
        digests = [None] * len(rows)
        out.mask_source = storage.parquet_metadata(storage.join(out.build, tables.MASK_INDEX.path)).get("fingerprint")
    else:
        values = np.asarray(pc.list_flatten(nam.combine_chunks()).to_numpy(zero_copy_only=False), np.float16).reshape(len(rows), -1)
        digests = [hashlib.blake2b(v.tobytes(), digest_size=12).hexdigest() for v in values]
    cols = picked.select(["class_index", "feature_index", "rank", "relpath", "activation"]).to_pydict()
    for row, c_, j_, rank, rel, act, digest in zip(rows.tolist(), *cols.values(), digests):
        out.mask_rows.setdefault((c_, j_), []).append(row)
        out.mask_keys.setdefault((c_, j_), []).append([rank, rel, act, digest])


def build_facts(
    build: str, classes: pa.Table | None, pairs: pa.Table | None, labels: pa.Table | None, masks: pa.Table | None,
) -> list[tuple[str, str]]:
    """(name, value) rows about the build directory ``build`` and its tables as read: images,
    failures, throughput, classes, pairs, labels, masks."""
    facts: list[tuple[str, str]] = []
    if storage.exists(plan_uri(build)):
        stats = activations.all_stats(build)
        if stats:
            s = activations.summarize(stats, build)
            lists = [storage.basename(u) for u in s["failure_lists"]]
            listed = ", ".join(f"{tables.ACTIVATIONS_DIR}/{name}" for name in lists[:5]) + (f" and {len(lists) - 5} more" if len(lists) > 5 else "")
            facts += [
                ("images planned", f"{s['planned']:,}"), ("images with activations", f"{s['images']:,}"),
                ("images that failed", f"{s['failed']:,}" + (f" (listed in {listed})" if s["failed"] else "")),
                ("activation shards", f"{s['shards']:,}"),
                ("activation throughput", f"{s['images_per_worker_second'] or 0:.1f} images per worker-second"),
            ]
    if classes is not None and pairs is not None:
        no_images = sum(1 for r in classes.column("reason").to_pylist() if r) if "reason" in classes.column_names else 0
        facts += [("classes", f"{classes.num_rows:,}"), ("(class, feature) pairs", f"{pairs.num_rows:,}"),
                  ("classes without pairs", f"{no_images:,}")]
    if labels is not None:
        counts = pc.value_counts(labels.column("label")).to_pylist()
        facts.append(("labels", ", ".join(f"{c['values']} {c['counts']:,}" for c in sorted(counts, key=lambda c: str(c["values"])))))
    if masks is not None:
        images = pc.count_distinct(masks.column("image_id")).as_py()
        facts.append(("masks", f"{masks.num_rows:,} of {images:,} images"))
    return facts


def _pair_view(inputs: Inputs, c: int, wnid: str, p: dict) -> dict:
    j = p["feature_index"]
    lab = inputs.labels.get((c, j)) or {}
    folder = tables.discover_pair(wnid, j)
    return {
        "feature_index": j, "feature_rank": p["feature_rank"], "importance": p.get("importance"),
        "label": _label_of(lab), "kind": lab.get("kind"),
        "votes": [lab.get(f"votes_{a}") for a in ("main_object", "separate_object", "background")],
        "n_answers": lab.get("n_answers"), "mean_confidence": lab.get("mean_confidence"),
        "strips": [s for s in discover.STRIPS if f"{folder}/{s}.png" in inputs.strips],
        "evaluation": sorted(
            ([r["model"], r["sigma"], r.get("n_images"), r["clean_acc"], r["noisy_acc"], r["drop"]] for r in inputs.eval_pairs.get((c, j), [])),
            key=lambda r: (r[0], r[1]),
        ),
        "masks": [m[0] for m in inputs.mask_keys.get((c, j), [])],  # the ranks of the masks shown
    }


_CLASS_FIELDS = ("class_index", "wnid", "name", "definition", "supercategory", "n_images", "n_predicted", "n_group", "reason")
_EVAL_CLASS_FIELDS = (
    "model", "sigma", "n_images", "n_core_images", "clean_acc_core_images", "spurious_acc", "spurious_drop",
    "n_spurious_images", "clean_acc_spurious_images", "core_acc", "core_drop",
)


def class_view(inputs: Inputs, position: int, title: str = TITLE) -> dict:
    """What the page of the class at ``position`` in ``inputs.classes`` shows (JSON-able)."""
    info = inputs.classes[position]
    c = info["class_index"]
    neighbours = [inputs.classes[k]["class_index"] if 0 <= k < len(inputs.classes) else None for k in (position - 1, position + 1)]
    return {
        "title": title,
        "class": {k: info.get(k) for k in _CLASS_FIELDS},
        "previous": neighbours[0], "next": neighbours[1],
        "evaluation": sorted(([r.get(k) for k in _EVAL_CLASS_FIELDS] for r in inputs.eval_classes.get(c, [])), key=lambda r: (r[0], r[1])),
        "pairs": [_pair_view(inputs, c, info["wnid"], p) for p in inputs.pairs.get(c, [])],
        "mask_shape": list(inputs.mask_shape) if inputs.mask_shape else None,
    }


def masks_view(inputs: Inputs, class_index: int) -> dict | None:
    """What the mask strips of a class are made from (JSON-able): per pair with masks, the masks
    shown with what their pixels come from; None for a class without masks."""
    pairs = [[p["feature_index"], inputs.mask_keys[(class_index, p["feature_index"])]]
             for p in inputs.pairs.get(class_index, []) if (class_index, p["feature_index"]) in inputs.mask_keys]
    if not pairs:
        return None
    return {"class_index": class_index, "pairs": pairs, "shape": list(inputs.mask_shape), "source": inputs.mask_source}


def masks_files(view: dict) -> list[str]:
    """The mask strips of a class, relative to the build."""
    return [tables.report_masks(view["class_index"], j) for j, _ in view["pairs"]]


def write_masks(build: str, inputs: Inputs, view: dict) -> dict:
    """Write the mask strips of a class (:func:`masks_files`) from its ``view``; returns what it wrote."""
    c = view["class_index"]
    rows = [inputs.mask_rows[(c, j)] for j, _ in view["pairs"]]
    shown = inputs.masks.take([r for pair in rows for r in pair])  # the class's masks sit together: a few requests
    start = 0
    for (j, _), pair in zip(view["pairs"], rows):
        storage.write_bytes_atomic(storage.join(build, tables.report_masks(c, j)), _mask_strip(shown[start : start + len(pair)]))
        start += len(pair)
    return {"class_index": c, "mask_strips": len(view["pairs"])}


def _strip_geometry(n: int, shape: Sequence[int]) -> tuple[int, int, int]:
    """(step, width, height) of a strip of ``n`` masks of ``shape``: every ``step``-th pixel is
    kept; the strip is shown at width x height, the masks' own size."""
    step = max(1, math.ceil(shape[0] / MASK_TILE))
    h, w = -(-shape[0] // step), -(-shape[1] // step)
    return step, (n * (w + _GAP) - _GAP) * step, h * step


def _mask_strip(masks: Sequence[np.ndarray]) -> bytes:
    """Masks side by side, each cut to at most :data:`MASK_TILE` pixels high, as a greyscale PNG
    whose gaps are transparent (any grey could be a mask's own value)."""
    from PIL import Image

    step = _strip_geometry(len(masks), masks[0].shape)[0]
    tiles = [m[::step, ::step] for m in masks]
    h, w = tiles[0].shape
    canvas = np.zeros((h, len(tiles) * (w + _GAP) - _GAP, 2), np.uint8)
    for i, tile in enumerate(tiles):
        canvas[:, i * (w + _GAP) : i * (w + _GAP) + w] = np.stack([tile, np.full_like(tile, 255)], axis=2)
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="LA").save(buf, format="PNG", compress_level=1)  # speed over a few percent of size
    return buf.getvalue()


def _label_html(label: str, kind: str | None) -> str:
    extra = f" ({kind.replace('_', ' ')})" if kind and kind != "core" and label == "spurious" else ""
    return f"<span class='{_e(label)}'>{_e(label)}{_e(extra)}</span>"


def _class_heading(info: dict) -> str:
    return f"{info['class_index']}: {info['wnid']} {info.get('name') or ''}".rstrip()


def write_class_page(build: str, view: dict) -> dict:
    """Write the page of one class from its ``view``; returns what it shows."""
    info = view["class"]
    c = info["class_index"]
    back = f"../index.html#c{c:05d}"
    nav = [f"<a href='{_e(back)}'>&larr; all classes</a>"]
    if view["previous"] is not None:
        nav.append(f"<a href='{_e(storage.basename(tables.report_class_page(view['previous'])))}'>&lsaquo; class {view['previous']}</a>")
    if view["next"] is not None:
        nav.append(f"<a href='{_e(storage.basename(tables.report_class_page(view['next'])))}'>class {view['next']} &rsaquo;</a>")
    body = [f"<nav>{''.join(nav)}</nav>", f"<h1>{_e(_class_heading(info))}</h1>"]
    if info.get("definition") or info.get("supercategory"):
        sup = f" <span class='muted'>({_e(info['supercategory'])})</span>" if info.get("supercategory") else ""
        body.append(f"<p>{_e(info.get('definition') or '')}{sup}</p>")
    facts = [("images filed under it", info.get("n_images")), ("images predicted as it", info.get("n_predicted")),
             ("images in D(c)", info.get("n_group")), ("pairs", len(view["pairs"]))]
    body.append("<table class='facts'>" + "".join(f"<tr><th>{_e(k)}</th><td class='n'>{_count(v)}</td></tr>" for k, v in facts) + "</table>")
    if info.get("reason"):
        body.append(f"<p>No pairs: {_e(info['reason'])}.</p>")
    if view["evaluation"]:
        body.append(
            "<h2>Evaluation</h2><p class='muted'>Accuracy with noise on the masks of one kind, over the images of that kind's "
            "pairs, against their clean accuracy.</p><table><tr><th rowspan='2'>model</th><th rowspan='2' class='n'>sigma</th>"
            "<th rowspan='2' class='n'>images</th><th colspan='4'>noise on the core masks (core pairs' images)</th>"
            "<th colspan='4'>noise on the spurious masks (spurious pairs' images)</th></tr><tr>"
            + "".join(f"<th class='n'>images</th><th class='n'>clean</th><th class='n'>{acc} acc</th><th class='n'>drop</th>" for acc in ("spurious", "core"))
            + "</tr>"
        )
        for model, sigma, n, *rest in view["evaluation"]:
            cells = [_count(n)] + [_count(v) if k % 4 == 0 else fmt(v) for k, v in enumerate(rest)]
            body.append(f"<tr><td>{_e(model)}</td><td class='n'>{sigma:g}</td>" + "".join(f"<td class='n'>{v}</td>" for v in cells) + "</tr>")
        body.append("</table>")
    if view["pairs"]:
        body.append("<h2>Features</h2><table><tr><th class='n'>rank</th><th>feature</th><th>label</th><th class='n'>importance</th></tr>")
        for p in view["pairs"]:
            body.append(
                f"<tr><td class='n'>{p['feature_rank']}</td><td><a href='#feature-{p['feature_index']}'>feature {p['feature_index']}</a></td>"
                f"<td>{_label_html(p['label'], p['kind'])}</td><td class='n'>{_e(_importance(p['importance']))}</td></tr>"
            )
        body.append("</table>")
    body += [_pair_html(info, p, view["mask_shape"]) for p in view["pairs"]]
    storage.write_bytes_atomic(storage.join(build, tables.report_class_page(c)), _page(f"{_class_heading(info)} - {view['title']}", body))
    return {"class_index": c, "pairs": len(view["pairs"])}


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _importance(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pair_html(info: dict, p: dict, mask_shape: list[int] | None) -> str:
    """One pair's section of its class page; ``mask_shape``: the masks' size."""
    c, j = info["class_index"], p["feature_index"]
    votes = ", ".join(f"{name} {v}" for name, v in zip(("main object", "separate object", "background"), p["votes"]) if v is not None)
    answers = (
        f"; {p['n_answers']} answers" + (f", mean confidence {p['mean_confidence']:.1f}" if p["mean_confidence"] is not None else "")
        if p["n_answers"] is not None else ""
    )
    parts = [
        f"<section class='pair' id='feature-{j}'><h3>Feature {j} &middot; {_label_html(p['label'], p['kind'])}</h3>",
        f"<p>rank {p['feature_rank']}, importance {_e(_importance(p['importance']))}"
        + (f"; votes: {_e(votes)}{_e(answers)}" if votes else "") + "</p>",
    ]
    if p["evaluation"]:
        parts.append("<table><tr><th>model</th><th class='n'>sigma</th><th class='n'>images</th><th class='n'>clean acc</th>"
                     "<th class='n'>noisy acc</th><th class='n'>drop</th></tr>")
        parts += [
            f"<tr><td>{_e(m)}</td><td class='n'>{s:g}</td><td class='n'>{_count(n)}</td>"
            f"<td class='n'>{fmt(clean)}</td><td class='n'>{fmt(noisy)}</td><td class='n'>{fmt(drop)}</td></tr>"
            for m, s, n, clean, noisy, drop in p["evaluation"]
        ]
        parts.append("</table>")
    folder = tables.discover_pair(info["wnid"], j)
    captions = {"images": "top images", "heatmaps": "heatmaps (red: the feature)", "attacks": "feature attacks (the feature amplified)"}
    for strip in p["strips"]:
        parts.append(
            f"<figure><img class='strip' loading='lazy' src='{_e(_url(f'{folder}/{strip}.png', 2))}' alt='{_e(captions[strip])} of feature {j}'>"
            f"<figcaption>{_e(captions[strip])}</figcaption></figure>"
        )
    if p["masks"]:
        rel, (_, width, height) = tables.report_masks(c, j), _strip_geometry(len(p["masks"]), mask_shape)
        ranks = ", ".join(str(rank) for rank in p["masks"])
        parts.append(
            f"<figure><img class='strip masks' loading='lazy' src='{_e(_url(rel, 2))}' width='{width}' height='{height}' alt='masks of feature {j}'>"
            f"<figcaption>masks (bright: the feature) of the top images that got one, ranks {_e(ranks)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "".join(parts)


def index_view(inputs: Inputs, title: str = TITLE) -> dict:
    """What ``report/index.html`` shows (JSON-able)."""
    sigma = inputs.chart_sigma
    drops = {(r["model"], r["class_index"]): (r.get("core_drop"), r.get("spurious_drop"))
             for rows in inputs.eval_classes.values() for r in rows if r["sigma"] == sigma}
    rows = []
    for info in inputs.classes:
        c = info["class_index"]
        labels = [_label_of(inputs.labels.get((c, p["feature_index"]))) for p in inputs.pairs.get(c, [])]
        kinds: dict[str, int] = defaultdict(int)
        for p in inputs.pairs.get(c, []):
            lab = inputs.labels.get((c, p["feature_index"]))
            if lab and lab.get("label") == "spurious" and lab.get("kind"):
                kinds[lab["kind"]] += 1
        rows.append([
            c, info["wnid"], info.get("name"), len(labels), labels.count("core"), labels.count("spurious"),
            len(labels) - labels.count("core") - labels.count("spurious"),
            ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in sorted(kinds.items())),
            [list(drops.get((m, c), (None, None))) for m in inputs.models],
        ])
    return {
        "title": title, "facts": [list(f) for f in inputs.facts], "summary": inputs.summary, "models": inputs.models,
        "charts": inputs.charts, "chart_sigma": sigma, "chart_size": list(plots.CHART_SIZE), "classes": rows,
    }


def write_index(build: str, view: dict) -> dict:
    """Write ``report/index.html`` from its ``view``; returns what it shows."""
    title = view["title"]
    body = [f"<h1>{_e(title)}</h1>", "<nav><a href='#facts'>Build facts</a>"
            + ("<a href='#evaluation'>Evaluation</a>" if view["summary"] else "") + "<a href='#classes-section'>Classes</a></nav>"]
    body.append("<h2 id='facts'>Build facts</h2><table class='facts'>")
    body += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in view["facts"]]
    body.append("</table>")
    if view["summary"]:
        body.append(
            "<h2 id='evaluation'>Evaluation</h2><p class='muted'>Means over classes. Core accuracy: noise on the spurious masks; "
            "spurious accuracy: noise on the core masks; each drop is against the clean accuracy of the same images.</p>"
            "<table><tr><th>model</th><th class='n'>sigma</th><th class='n'>clean</th><th class='n'>core acc</th>"
            "<th class='n'>spurious acc</th><th class='n'>core drop</th><th class='n'>spurious drop</th></tr>"
        )
        for r in view["summary"]:
            body.append(
                f"<tr><td>{_e(r['model'])}</td><td class='n'>{r['sigma']:g}</td><td class='n'>{fmt(r['mean_clean_acc'])}</td>"
                f"<td class='n'>{fmt(r['mean_core_acc'])}</td><td class='n'>{fmt(r['mean_spurious_acc'])}</td>"
                f"<td class='n'>{fmt(r['mean_core_drop'])}</td><td class='n'>{fmt(r['mean_spurious_drop'])}</td></tr>"
            )
        body.append("</table>")
        width, height = view["chart_size"]
        for model, rel in view["charts"].items():
            body.append(
                f"<img class='chart' loading='lazy' src='{_e(_url(rel, 1))}' width='{width}' height='{height}' alt='{_e(model)}: accuracy charts'>"
            )
    body.append(_class_table(view))
    storage.write_bytes_atomic(storage.join(build, tables.REPORT.path), _page(title, body, _SCRIPT if view["classes"] else ""))
    return {"classes": len(view["classes"])}


def _class_table(view: dict) -> str:
    rows, models = view["classes"], view["models"]
    parts = ["<h2 id='classes-section'>Classes</h2>"]
    if not rows:
        return parts[0] + "<p>The build has no classes yet (run `salient aggregate CONFIG`).</p>"
    if models:
        parts.append(
            f"<p class='muted'>Drops at sigma {view['chart_sigma']:g}: core drop, noise on the spurious masks; spurious drop, "
            "noise on the core masks. Click a header to sort; type to filter (every word must match).</p>"
        )
    parts.append(
        "<div class='controls'><input id='filter' type='search' placeholder='Filter: index, wnid, name, kind...' aria-label='filter classes'>"
        "<select id='show' aria-label='which classes'><option value=''>all classes</option>"
        "<option value='spurious'>with spurious pairs</option><option value='core'>with core pairs</option>"
        "<option value='pending'>with undecided pairs (pending or insufficient)</option><option value='none'>without pairs</option></select>"
        f"<span id='count' role='status'>{len(rows):,} classes</span></div>"
    )
    # (header, key, type); text columns are the 2nd, 3rd and 8th (the CSS aligns them left)
    heads = [("#", "index", "number"), ("wnid", "wnid", "text"), ("name", "name", "text"), ("pairs", "pairs", "number"),
             ("core", "core", "number"), ("spurious", "spurious", "number"), ("undecided", "pending", "number"),
             ("spurious kinds", "kinds", "text")]
    heads += [(f"{m} {d} drop", f"drop-{k}-{d}", "number") for k, m in enumerate(models) for d in ("core", "spurious")]
    parts.append("<table id='classes'><thead><tr>" + "".join(
        f"<th data-key='{key}' data-type='{t}'{' class=n' if t == 'number' else ''}>{_e(h)}</th>" for h, key, t in heads
    ) + "</tr></thead><tbody>")
    for c, wnid, name, n, core, spurious, pending, kinds, drops in rows:
        href = _e(storage.basename(tables.report_class_page(c)))
        cells = "".join(f"<td>{fmt(d)}</td>" for pair in drops for d in pair)
        parts.append(
            f"<tr id='c{c:05d}'><td><a href='classes/{href}'>{c}</a></td><td>{_e(wnid)}</td><td><a href='classes/{href}'>{_e(name or '')}</a></td>"
            f"<td>{n}</td><td>{core}</td><td>{spurious}</td><td>{pending}</td><td>{_e(kinds)}</td>{cells}</tr>"
        )
    parts.append("</tbody></table>")
    return "\n".join(parts)


def class_views(inputs: Inputs, title: str = TITLE) -> Iterable[dict]:
    """The view of every class page, in class order."""
    return (class_view(inputs, k, title) for k in range(len(inputs.classes)))


def write_report(build: str, title: str = TITLE) -> str:
    """Write the whole report into the build directory ``build`` in this process, without the
    stage's cache; returns the URI of its index."""
    inputs = read_inputs(build)
    for view in class_views(inputs, title):
        masks = masks_view(inputs, view["class"]["class_index"])
        if masks:
            write_masks(build, inputs, masks)
        write_class_page(build, view)
    write_index(build, index_view(inputs, title))
    return storage.join(build, tables.REPORT.path)
