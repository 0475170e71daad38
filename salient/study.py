"""The generalisation study, for people (docs/design.md §2 "Generalisation").

A pair's label, given on its top-5 images, is applied to its top-K images without more human work.
The paper checked this by showing workers, per pair, the top-5 images and heatmaps (side A) against
the last 5 images kept (side B: ranks 61..65 when K = 65) and asking whether both sides show the
same visual feature: ``same | different | A_unclear | B_unclear``, a confidence 1..5 and a reason.

Export, per pair, under ``study/<wnid>/feature_<j>/``: ``a_images.png``, ``a_heatmaps.png``,
``b_images.png``, ``b_heatmaps.png`` (strips as in ``discover``) and ``assets.json`` (the
fingerprint of what the strips depend on, so unchanged pairs are not remade); ``study/tasks.csv``
has one crowd-task row per pair. Heatmaps are drawn from the NAMs stored in ``masks/index.parquet``,
so no model is needed. A pair with fewer than ``2 * images_per_side`` images keeps A as close to
the annotated top images as it can and gives B what is left, so the two sides never share an image
(see :func:`sides`); a pair with fewer than 2 images is skipped.

Ingest validates answers as the discovery ingest does and writes, under ``annotations/``,
``generalization.parquet`` (one row per pair, with its agreement rate),
``generalization_answers.parquet`` (every accepted answer, reasons included) and
``generalization_rejected.parquet`` (every rejected row or file, with a reason).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from salient import answers, images, nam, storage, tables
from salient.dataset import require_nams
from salient.discover import csv_safe, png_strip
from salient.errors import InputError
from salient.metadata import ClassInfo

CODE_VERSION = "study-1"
EXPORT_THREADS = 8  # classes exported at once (reads and writes overlap the drawing)
STRIPS = ("a_images", "a_heatmaps", "b_images", "b_heatmaps")
TASK_COLUMNS = (
    "class_index", "wnid", "class_name", "definition", "supercategory", "feature_index", "feature_rank", "label",
    *(f"{s}_url" for s in STRIPS), "a_ranks", "b_ranks", "a_image_ids", "b_image_ids",
)
INDEX_COLUMNS = (
    "class_index", "wnid", "feature_index", "feature_rank", "label", "rank", "image_id", "relpath", "nam", "nam_h", "nam_w",
)

STUDY_ANSWERS = ("same", "different", "A_unclear", "B_unclear")
ANSWER_COLUMNS = (
    "WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index",
    "Answer.main", "Answer.confidence", "Answer.reasons",
)

STUDY_INCOMING = "annotations/study_incoming"
# The tables the study writes, in salient.tables; these names stay for callers outside salient/.
GENERALIZATION_TABLE = tables.GENERALIZATION.path
GENERALIZATION_ANSWERS_TABLE = tables.GENERALIZATION_ANSWERS.path
GENERALIZATION_REJECTED_TABLE = tables.GENERALIZATION_REJECTED.path

GENERALIZATION_SCHEMA = pa.schema([
    ("class_index", pa.int32()),
    ("wnid", pa.string()),
    ("feature_index", pa.int32()),
    ("votes_same", pa.int64()),
    ("votes_different", pa.int64()),
    ("votes_a_unclear", pa.int64()),
    ("votes_b_unclear", pa.int64()),
    ("n_answers", pa.int64()),
    ("agreement", pa.float64()),
    ("mean_confidence", pa.float64()),
])
ANSWERS_SCHEMA = answers.ANSWERS_SCHEMA.remove(answers.ANSWERS_SCHEMA.get_field_index("feature_rank"))


def study_dir(build: str, wnid: str, feature: int) -> str:
    """The folder of one pair's study assets in the build directory ``build``."""
    return storage.join(build, tables.study_pair(wnid, feature))


def sides(n: int, images_per_side: int) -> tuple[int, int]:
    """(images on side A, images on side B) for a pair with ``n`` ranked images: A is the first
    ``min(images_per_side, n - 1)`` ranks, B the last ``min(images_per_side, n - len(A))``, so the
    sides never share an image (K = 65 gives ranks 1..5 against 61..65; K = 7 gives 1..5 against 6..7)."""
    if images_per_side < 1:
        raise ValueError(f"images_per_side = {images_per_side}: must be at least 1")
    if n < 2:
        raise ValueError(f"a pair needs at least 2 images for the study, not {n}")
    a = min(images_per_side, n - 1)
    return a, min(images_per_side, n - a)


def _read_index(build: str) -> pa.Table:
    uri = storage.join(build, tables.MASK_INDEX.path)
    if not storage.exists(uri):
        raise InputError(f"no mask index at {uri}; run `salient generalize CONFIG` first")
    table = storage.read_parquet(uri)
    missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{uri} lacks the columns {', '.join(missing)}; rerun `salient generalize CONFIG`")
    return table.select(list(INDEX_COLUMNS))


def _pairs(table: pa.Table) -> list[np.ndarray]:
    """Row positions of each pair, by rank, pairs ordered by (class_index, feature_index)."""
    cls = table.column("class_index").to_numpy()
    feat = table.column("feature_index").to_numpy()
    rank = table.column("rank").to_numpy()
    order = np.lexsort((rank, feat, cls))
    cls, feat, rank = cls[order], feat[order], rank[order]
    new_pair = (cls[1:] != cls[:-1]) | (feat[1:] != feat[:-1])
    repeated = np.flatnonzero(~new_pair & (rank[1:] == rank[:-1]))
    if repeated.size:
        i = repeated[0]
        raise InputError(
            f"{tables.MASK_INDEX.path} has rank {rank[i]} twice for class {cls[i]} feature {feat[i]}; "
            "rerun `salient generalize CONFIG`"
        )
    return np.split(order, np.flatnonzero(new_pair) + 1) if order.size else []


def _image(root: str, relpath: str, resize: int, crop: int, cache: dict[str, np.ndarray]) -> np.ndarray:
    if relpath not in cache:
        uri = storage.under(root, relpath)
        try:
            pixels = images.load_image(storage.read_bytes(uri), resize, crop)
        except images.DECODE_ERRORS as exc:
            raise InputError(f"cannot read image {uri} ({images.describe_error(exc)}); check the dataset root") from exc
        cache[relpath] = pixels.permute(1, 2, 0).numpy()
    return cache[relpath]


def _side_tiles(rows: Sequence[dict], maps: np.ndarray, root: str, resize: int, crop: int,
                cache: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(image tiles, heatmap tiles) of ``rows``, ``maps`` their low-resolution NAMs ``[n, h, w]``."""
    masks = nam.upsample(torch.from_numpy(maps), crop).numpy()
    pix = [_image(root, r["relpath"], resize, crop, cache) for r in rows]
    return [nam.to_uint8(p) for p in pix], [nam.to_uint8(nam.heatmap(p, m)) for p, m in zip(pix, masks)]


def export_study(
    build: str,
    root: str,
    resize: int,
    crop: int,
    images_per_side: int = 5,
    metadata: Sequence[ClassInfo] | None = None,
    base_url: str | None = None,
) -> dict:
    """Write the study's assets for every pair of ``<build>/masks/index.parquet`` and ``study/tasks.csv``
    into the build directory ``build``.

    ``root`` is the image dataset the index's relpaths point into, ``resize``/``crop`` its
    preprocessing. Task URLs are relative to ``study/``, or prefixed by ``base_url``. Returns
    ``{pairs, skipped, made, tasks}``: pairs exported, pairs skipped for having fewer than 2 images,
    pairs whose strips were (re)made by this call, and the URI of ``tasks.csv``.
    """
    if not build:
        raise ValueError("build is empty; give the build directory (a path or URI)")
    if resize < 1 or crop < 1:
        raise ValueError(f"resize = {resize}, crop = {crop}: both must be positive (preprocess.resize, preprocess.crop)")
    if images_per_side < 1:
        raise ValueError(f"images_per_side = {images_per_side}: must be at least 1")
    table = _read_index(build)
    require_nams(table, f"{build}: study export")
    h_w = {(h, w) for h, w in zip(table.column("nam_h").to_pylist(), table.column("nam_w").to_pylist())}
    if len(h_w) > 1:
        raise InputError(f"{tables.MASK_INDEX.path} mixes NAM sizes {sorted(h_w)}; rerun `salient generalize CONFIG`")
    h, w = h_w.pop() if h_w else (0, 0)
    by_wnid = {c.wnid: c for c in metadata or []}
    prefix = (base_url.rstrip("/") + "/") if base_url else ""
    source = storage.normalize_uri(root)

    def export_class(pairs: list[np.ndarray]) -> list[tuple[list[Any], bool]]:
        cache: dict[str, np.ndarray] = {}  # a class's pairs share many images
        out = []
        for positions in pairs:
            a, b = sides(len(positions), images_per_side)
            chosen = table.take(np.concatenate([positions[:a], positions[len(positions) - b:]]))
            rows = chosen.drop_columns(["nam"]).to_pylist()
            maps = chosen.column("nam").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            maps = maps.astype(np.float32).reshape(len(rows), h, w)
            first = rows[0]
            c, j, wnid = first["class_index"], first["feature_index"], first["wnid"]
            folder = study_dir(build, wnid, j)
            files = {s: f"{wnid}/feature_{j}/{s}.png" for s in STRIPS}
            fp = storage.fingerprint(
                CODE_VERSION, source, resize, crop, [(r["rank"], r["image_id"], r["relpath"]) for r in rows], a,
                hashlib.sha256(maps.tobytes()).hexdigest(),
            )
            record_uri = storage.join(folder, tables.ASSETS)
            fresh = not (storage.exists(record_uri) and storage.read_json(record_uri).get("fingerprint") == fp)
            if fresh:
                strips = dict(zip(STRIPS, (
                    *_side_tiles(rows[:a], maps[:a], source, resize, crop, cache),
                    *_side_tiles(rows[a:], maps[a:], source, resize, crop, cache),
                )))
                for name, tiles in strips.items():
                    storage.write_bytes_atomic(storage.join(folder, f"{name}.png"), png_strip(tiles))
                storage.write_json(record_uri, {"fingerprint": fp, "files": files})
            info = by_wnid.get(wnid)
            out.append(([
                c, wnid, info.name if info else "", info.definition if info else "", info.supercategory if info else "",
                j, first["feature_rank"], first["label"], *(prefix + files[s] for s in STRIPS),
                ";".join(str(r["rank"]) for r in rows[:a]), ";".join(str(r["rank"]) for r in rows[a:]),
                ";".join(str(r["image_id"]) for r in rows[:a]), ";".join(str(r["image_id"]) for r in rows[a:]),
            ], fresh))
        return out

    by_class: dict[int, list[np.ndarray]] = {}
    skipped = 0
    classes = table.column("class_index").to_numpy()
    for positions in _pairs(table):
        if len(positions) < 2:
            skipped += 1
        else:
            by_class.setdefault(int(classes[positions[0]]), []).append(positions)
    with ThreadPoolExecutor(max_workers=EXPORT_THREADS, thread_name_prefix="study") as pool:
        done = [pair for pairs in pool.map(export_class, by_class.values()) for pair in pairs]
    tasks = [task for task, _ in done]
    made = sum(fresh for _, fresh in done)

    tasks.sort(key=lambda t: (t[0], t[6], t[5]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TASK_COLUMNS)
    writer.writerows([csv_safe(v) for v in t] for t in tasks)
    uri = storage.join(build, tables.STUDY_TASKS.path)
    storage.write_bytes_atomic(uri, buf.getvalue().encode("utf-8"))
    return {"pairs": len(tasks), "skipped": skipped, "made": made, "tasks": uri}


def study_answer_files(root: str, extra: Sequence[str] = ()) -> list[str]:
    """The study's answer files: ``extra`` in the given order, then every ``*.csv`` directly under
    ``<root>/annotations/study_incoming/`` (``root`` is the output root) by name; a file named twice
    is kept once, at its first place."""
    return answers.answer_files(root, extra, STUDY_INCOMING)


class _StudyLedger(answers.Ledger):
    """The study's answers: one of :data:`STUDY_ANSWERS`, no feature rank; the rest as in discovery."""

    columns: ClassVar[Sequence[str]] = ANSWER_COLUMNS

    def validate(self, cells: Mapping[str, str], file: str, line: int) -> answers.Answer:
        answer = cells.get("Answer.main", "")
        if answer not in STUDY_ANSWERS:
            raise answers.Rejected("unknown_answer", f"Answer.main {answer!r} is not one of {', '.join(STUDY_ANSWERS)}")
        # Everything but the answer is checked as in discovery: hand it an answer it accepts.
        cells = {k: v for k, v in cells.items() if k != "Input.feature_rank"} | {"Answer.main": answers.ANSWERS[0]}
        return dataclasses.replace(super().validate(cells, file, line), answer=answer)


def _pair_rows(accepted: Sequence[answers.Answer], wnids: Mapping[int, str]) -> list[dict[str, Any]]:
    votes: dict[tuple[int, int], Counter[str]] = {}
    confidences: dict[tuple[int, int], list[float]] = {}
    for a in accepted:
        votes.setdefault((a.class_index, a.feature_index), Counter())[a.answer] += 1
        confidences.setdefault((a.class_index, a.feature_index), []).append(a.confidence)
    rows = []
    for (c, j), v in sorted(votes.items()):
        decided = v["same"] + v["different"]
        n = sum(v.values())
        rows.append({
            "class_index": c, "wnid": wnids.get(c), "feature_index": j,
            "votes_same": v["same"], "votes_different": v["different"],
            "votes_a_unclear": v["A_unclear"], "votes_b_unclear": v["B_unclear"],
            "n_answers": n,
            "agreement": v["same"] / decided if decided else None,
            # fsum: the mean does not depend on the order of the answers
            "mean_confidence": math.fsum(confidences[c, j]) / n,
        })
    return rows


def ingest_study(
    build: str, answer_uris: Sequence[str], classes: Mapping[int, str] | None = None, answers_root: str | None = None
) -> dict:
    """Validate the study's answers and write ``generalization.parquet`` (per pair: votes, agreement =
    same / (same + different), mean confidence), ``generalization_answers.parquet`` and
    ``generalization_rejected.parquet`` under ``<build>/annotations/`` (``build`` is the build
    directory); returns a summary.

    ``classes`` maps class_index to wnid (None: no class check). Rows are checked as in the
    discovery ingest; a worker's second answer to a pair is rejected, the first counts. The
    summary's ``overall_agreement`` is total same / (total same + total different), None without either.
    ``answers_root`` is the output root whose ``annotations/study_incoming/`` holds dropped answer
    files (default ``build``).
    """
    answers.check_inputs(answers_root or build, answer_uris, classes, STUDY_INCOMING, "pass study answer files (--answers FILE), or put CSV files")

    ledger = _StudyLedger(classes)
    for uri in answer_uris:
        ledger.read(uri)
    pairs = _pair_rows(ledger.accepted, ledger.wnids)
    same = sum(p["votes_same"] for p in pairs)
    decided = same + sum(p["votes_different"] for p in pairs)
    overall = same / decided if decided else None

    fp = storage.fingerprint(CODE_VERSION, ledger.digests, None if classes is None else sorted(classes.items()))
    meta = {"code_version": CODE_VERSION, "overall_agreement": "" if overall is None else repr(overall)}
    storage.write_parquet(
        storage.join(build, tables.GENERALIZATION.path), pa.Table.from_pylist(pairs, schema=GENERALIZATION_SCHEMA), fp, meta
    )
    storage.write_parquet(storage.join(build, tables.GENERALIZATION_ANSWERS.path), ledger.accepted_table(ANSWERS_SCHEMA), fp, meta)
    storage.write_parquet(storage.join(build, tables.GENERALIZATION_REJECTED.path), ledger.rejected_table(), fp, meta)
    return {
        "files": len(answer_uris),
        "rows": ledger.rows,
        "answers": len(ledger.accepted),
        "rejected": len(ledger.rejected),
        "rejected_by_reason": ledger.rejected_by_reason(),
        "pairs": len(pairs),
        "votes": {a: sum(x.answer == a for x in ledger.accepted) for a in STUDY_ANSWERS},
        "overall_agreement": overall,
        "fingerprint": fp,
    }
