"""Ingest: human answers in the paper's CSV schema become validated answers, one label per
(class, feature) pair, and a list of rejected rows (docs/design.md §2 "Annotation", §3 "ingest").

Every row is checked; a bad row or a bad file, and every file under ``annotations/incoming/`` that
is not read, is listed in ``rejected.parquet`` with a reason and never counts, and the other rows
and files still ingest (reading and checking answers is
:mod:`salient.answers`). The labelling rule is the paper's:
a pair is spurious iff at least 3 of its answers are ``separate_object`` or ``background``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from salient import storage, tables
from salient.answers import INCOMING, Ledger, check_inputs, other_files

CODE_VERSION = "ingest-2"

LABELS = ("core", "spurious", "insufficient")
KINDS = ("background", "separate_object", "ambiguous")
SPURIOUS_VOTES = 3

# The tables this writes, in salient.tables; these names stay for callers outside salient/.
ANSWERS_TABLE = tables.ANSWERS.path
LABELS_TABLE = tables.LABELS.path
REJECTED_TABLE = tables.REJECTED.path

LABELS_SCHEMA = pa.schema([
    ("class_index", pa.int32()),
    ("wnid", pa.string()),
    ("feature_index", pa.int32()),
    ("feature_rank", pa.int32()),
    ("votes_main_object", pa.int64()),
    ("votes_separate_object", pa.int64()),
    ("votes_background", pa.int64()),
    ("n_answers", pa.int64()),
    ("mean_confidence", pa.float64()),
    ("label", pa.string()),
    ("kind", pa.string()),
    ("in_build", pa.bool_()),
])


def known_classes(build: str, class_metadata: str | None = None) -> dict[int, str] | None:
    """class_index -> wnid from a class metadata CSV, else from the ``classes.parquet`` of the build
    directory ``build``, else None (no class check)."""
    from salient.metadata import read_class_metadata

    if class_metadata:
        return {c.class_index: c.wnid for c in read_class_metadata(class_metadata)}
    uri = storage.join(build, tables.CLASSES.path)
    if storage.exists(uri):
        return {r["class_index"]: r["wnid"] for r in storage.read_parquet(uri, ["class_index", "wnid"]).to_pylist()}
    return None


def label_votes(main_object: int, separate_object: int, background: int, min_answers: int = 5) -> tuple[str, str | None]:
    """(label, kind) of a pair with these votes: the paper's rule, or ``insufficient`` (kind None)
    with fewer than ``min_answers`` answers."""
    if main_object + separate_object + background < min_answers:
        return "insufficient", None
    if separate_object + background < SPURIOUS_VOTES:
        return "core", "core"
    if background >= SPURIOUS_VOTES:
        return "spurious", "background"
    if separate_object >= SPURIOUS_VOTES:
        return "spurious", "separate_object"
    return "spurious", "ambiguous"


@dataclass
class _Pair:
    votes: Counter[str] = field(default_factory=Counter)
    confidence_sum: float = 0.0
    ranks: Counter[int] = field(default_factory=Counter)


def _label_rows(ledger: Ledger, in_build: set[tuple[int, int]] | None, min_answers: int) -> list[dict[str, Any]]:
    wnids = ledger.wnids
    pairs: dict[tuple[int, int], _Pair] = {key: _Pair() for key in in_build or ()}
    for a in ledger.accepted:
        pair = pairs.setdefault((a.class_index, a.feature_index), _Pair())
        pair.votes[a.answer] += 1
        pair.confidence_sum += a.confidence
        if a.feature_rank is not None:
            pair.ranks[a.feature_rank] += 1
    rows = []
    for (c, j), pair in sorted(pairs.items()):
        n = sum(pair.votes.values())
        label, kind = label_votes(pair.votes["main_object"], pair.votes["separate_object"], pair.votes["background"], min_answers)
        # The most common rank, the smallest on a tie, so the result does not depend on row order.
        rank = min(pair.ranks.items(), key=lambda rc: (-rc[1], rc[0]))[0] if pair.ranks else None
        rows.append({
            "class_index": c, "wnid": wnids.get(c), "feature_index": j, "feature_rank": rank,
            "votes_main_object": pair.votes["main_object"],
            "votes_separate_object": pair.votes["separate_object"],
            "votes_background": pair.votes["background"],
            "n_answers": n, "mean_confidence": pair.confidence_sum / n if n else None,
            "label": label, "kind": kind, "in_build": None if in_build is None else (c, j) in in_build,
        })
    return rows


def ingest(
    build: str,
    answer_uris: Sequence[str],
    classes: Mapping[int, str] | None = None,
    build_pairs: Collection[tuple[int, int]] | None = None,
    min_answers: int = 5,
    answers_root: str | None = None,
) -> dict:
    """Validate every answer in ``answer_uris``, label every pair, and write ``answers.parquet``,
    ``labels.parquet`` and ``rejected.parquet`` under ``<build>/annotations/`` (``build`` is the
    build directory); returns a summary.

    ``answers_root`` is the output root whose ``annotations/incoming/`` holds dropped answer files
    (default ``build``); it is named in errors, and every other file there is listed as rejected.

    ``classes`` maps class_index to wnid (None: no class check). ``build_pairs`` are the
    (class_index, feature_index) pairs of the build (None: no build); pairs of the build without
    answers are labelled ``insufficient``, answered pairs outside it are labelled and counted.
    ``rows`` counts the answer rows read, ``rejected`` the entries of ``rejected.parquet`` (rows and
    whole files).
    """
    if min_answers < 1:
        raise ValueError(f"min_answers = {min_answers}: must be at least 1 (annotations.min_answers)")
    check_inputs(answers_root or build, answer_uris, classes, INCOMING, "pass --answers FILE, set annotations.answers, or put CSV files")
    in_build = None if build_pairs is None else {(int(c), int(j)) for c, j in build_pairs}

    ledger = Ledger(classes)
    for uri in answer_uris:
        ledger.read(uri)
    read = {storage.normalize_uri(u) for u in answer_uris}
    unread = [(uri, why) for uri, why in other_files(answers_root or build) if storage.normalize_uri(uri) not in read]
    for uri, why in unread:
        ledger.reject(uri, 0, "not_an_answer_file", why)
    labels = _label_rows(ledger, in_build, min_answers)

    fp = storage.fingerprint(
        CODE_VERSION, ledger.digests, unread, min_answers,
        None if classes is None else sorted(classes.items()),
        None if in_build is None else sorted(in_build),
    )
    meta = {"code_version": CODE_VERSION, "min_answers": min_answers}
    storage.write_parquet(storage.join(build, tables.ANSWERS.path), ledger.accepted_table(), fp, meta)
    storage.write_parquet(storage.join(build, tables.LABELS.path), pa.Table.from_pylist(labels, schema=LABELS_SCHEMA), fp, meta)
    storage.write_parquet(storage.join(build, tables.REJECTED.path), ledger.rejected_table(), fp, meta)

    spurious = [r for r in labels if r["label"] == "spurious"]
    return {
        "files": len(answer_uris),
        "rows": ledger.rows,
        "accepted": len(ledger.accepted),
        "rejected": len(ledger.rejected),
        "rejected_by_reason": ledger.rejected_by_reason(),
        "pairs": len(labels),
        "spurious": len(spurious),
        "core": sum(r["label"] == "core" for r in labels),
        "insufficient": sum(r["label"] == "insufficient" for r in labels),
        "kinds": {k: sum(r["kind"] == k for r in spurious) for k in KINDS},
        "classes_with_spurious": len({r["class_index"] for r in spurious}),
        "pairs_not_in_build": None if in_build is None else sum(not r["in_build"] for r in labels),
        "pairs_without_answers": None if in_build is None else sum(r["n_answers"] == 0 for r in labels),
        "fingerprint": fp,
    }
