"""Ingest: human answers in the paper's CSV schema become validated answers, one label per
(class, feature) pair, and a list of rejected rows (design.md §2 "Annotation", §3 "ingest").

Every row is checked; a bad row or a bad file is listed in ``rejected.parquet`` with a reason and
never counts, and the other rows and files still ingest. The labelling rule is the paper's:
a pair is spurious iff at least 3 of its answers are ``separate_object`` or ``background``.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import math
import posixpath
import re
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from salient import storage

CODE_VERSION = "ingest-1"

ANSWER_COLUMNS = (
    "WorkerId",
    "Input.wordnet_id",
    "Input.class_index",
    "Input.feature_index",
    "Input.feature_rank",
    "Answer.main",
    "Answer.confidence",
    "Answer.reasons",
)
# Input.wordnet_id, Input.feature_rank and Answer.reasons may be absent; the rest is needed per row.
REQUIRED_COLUMNS = ("WorkerId", "Input.class_index", "Input.feature_index", "Answer.main", "Answer.confidence")

ANSWERS = ("main_object", "separate_object", "background")
LABELS = ("core", "spurious", "insufficient")
KINDS = ("background", "separate_object", "ambiguous")
SPURIOUS_VOTES = 3
CONFIDENCE_MIN, CONFIDENCE_MAX = 1.0, 5.0

REASON_KINDS = (
    "unknown_answer",
    "missing_id",
    "non_integer_id",
    "class_out_of_range",
    "wnid_mismatch",
    "non_numeric_confidence",
    "confidence_out_of_range",
    "duplicate_answer",
    "missing_worker",
    "field_too_large",
    "missing_columns",
    "unreadable_file",
)

INCOMING = "annotations/incoming"
ANSWERS_TABLE = "annotations/answers.parquet"
LABELS_TABLE = "annotations/labels.parquet"
REJECTED_TABLE = "annotations/rejected.parquet"

MAX_FIELD_CHARS = 1_000_000
MAX_ID = 2**31 - 1  # ids are stored as int32, like the aggregate tables

_INTEGER = re.compile(r"[0-9]+(?:\.0*)?")  # "3" and "3.0"; no sign, exponent or fraction

ANSWERS_SCHEMA = pa.schema([
    ("class_index", pa.int32()),
    ("wnid", pa.string()),
    ("feature_index", pa.int32()),
    ("feature_rank", pa.int32()),
    ("worker_id", pa.string()),
    ("answer", pa.string()),
    ("confidence", pa.float64()),
    ("reason", pa.string()),
    ("file", pa.string()),
    ("line", pa.int64()),
])
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
REJECTED_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("line", pa.int64()),
    ("reason", pa.string()),
    ("reason_kind", pa.string()),
    ("raw", pa.string()),
])


def answer_files(out: str, extra: Sequence[str] = (), folder: str = INCOMING) -> list[str]:
    """The answer files to ingest: ``extra`` in the given order, then every ``*.csv`` directly under
    ``<out>/<folder>/`` (default ``annotations/incoming/``) by name; a file named twice is kept
    once, at its first place."""
    incoming = storage.join(out, folder)
    fs, path = storage.url_to_fs(incoming)
    found: list[str] = []
    if fs.isdir(path):
        names = (posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "file")
        found = [storage.join(incoming, n) for n in sorted(n for n in names if n.endswith(".csv") and not n.startswith("."))]
    seen: set[str] = set()
    files = []
    for uri in [*extra, *found]:
        key = storage.normalize_uri(uri)
        if key not in seen:
            seen.add(key)
            files.append(uri)
    return files


def check_inputs(out: str, answer_uris: Sequence[str], classes: Mapping[int, str] | None, folder: str, how: str) -> None:
    """Raise ``ValueError`` for an empty output, no, repeated or missing answer files, or empty classes.

    ``how`` tells how to give answer files; ``folder`` is where dropped files are picked up."""
    if not out:
        raise ValueError("out is empty; give the output root (a path or URI)")
    if not answer_uris:
        raise ValueError(f"no answer files to ingest: {how} under {storage.join(out, folder)}/")
    repeated = sorted(u for u, n in Counter(answer_uris).items() if n > 1)
    if repeated:
        raise ValueError(f"answer files listed more than once: {', '.join(repeated)}; list each file once")
    missing = [u for u in answer_uris if not storage.exists(u)]
    if missing:
        raise ValueError(f"answer files not found: {', '.join(missing)}; check the paths and {storage.join(out, folder)}/")
    if classes is not None and not classes:
        raise ValueError("classes is empty; pass None to skip the class check, or the dataset's classes")


def known_classes(out: str, class_metadata: str | None = None) -> dict[int, str] | None:
    """class_index -> wnid from a class metadata CSV, else from the build's ``classes.parquet``,
    else None (no class check)."""
    from salient.aggregate import CLASSES_TABLE
    from salient.metadata import read_class_metadata

    if class_metadata:
        return {c.class_index: c.wnid for c in read_class_metadata(class_metadata)}
    uri = storage.join(out, CLASSES_TABLE)
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


class _Rejected(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class _Answer:
    class_index: int
    wnid: str | None
    feature_index: int
    feature_rank: int | None
    worker_id: str
    answer: str
    confidence: float
    reason: str
    file: str
    line: int


@dataclass
class _Ledger:
    """Accepted answers and rejected rows, in file order then line order."""

    accepted: list[_Answer] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0

    def reject(self, file: str, line: int, kind: str, reason: str, raw: Any = None) -> None:
        self.rejected.append({
            "file": file, "line": line, "reason": reason, "reason_kind": kind,
            "raw": None if raw is None else json.dumps(raw, ensure_ascii=False),
        })


_FIELD_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    # The csv field size limit is process-wide; restore it so other readers keep their own.
    with _FIELD_LIMIT_LOCK:
        previous = csv.field_size_limit(limit)
        try:
            yield
        finally:
            csv.field_size_limit(previous)


def _records(text: str) -> Iterator[tuple[int, list[str] | None]]:
    """(first line, cells) of each CSV record; cells None for a record with a field longer than
    :data:`MAX_FIELD_CHARS`. Run under a field limit above ``len(text)``: an oversized field is read
    whole, so what follows it is read as the records it is, never as text cut out of that field."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    previous = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _Rejected("unreadable_file", f"not valid CSV at line {reader.line_num}: {exc}") from None
        start, previous = previous + 1, reader.line_num
        if any(len(cell) > MAX_FIELD_CHARS for cell in row):
            yield start, None
        elif any(cell.strip() for cell in row):
            yield start, row


# UTF-32 first: its little-endian mark begins with UTF-16's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode(data: bytes) -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark is dropped); ``_Rejected`` for any other encoding."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise _Rejected("unreadable_file", f"the file is {name} (it starts with a {name} byte-order mark); save it as UTF-8 CSV")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _Rejected(
            "unreadable_file",
            f"byte {nul} (line {_line_of(data, nul)}) is a NUL byte: the file is binary, or UTF-16 "
            "without a byte-order mark; save it as UTF-8 CSV",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Rejected(
            "unreadable_file",
            f"byte {exc.start} (line {_line_of(data, exc.start)}) is not UTF-8 (the file may be Latin-1, "
            "Windows-1252 or binary); save it as UTF-8 CSV",
        ) from None


def _parse_id(column: str, text: str, minimum: int = 0) -> int:
    if not text:
        raise _Rejected("missing_id", f"{column} is empty")
    if not _INTEGER.fullmatch(text):
        raise _Rejected("non_integer_id", f"{column} {text!r} is not a non-negative integer")
    value = int(text.split(".")[0])
    if not minimum <= value <= MAX_ID:
        raise _Rejected("non_integer_id", f"{column} {text!r} is outside {minimum}..{MAX_ID}")
    return value


def _validate(
    cells: Mapping[str, str],
    file: str,
    line: int,
    classes: Mapping[int, str] | None,
    wnid_of: dict[int, tuple[str, str, int]],
    first_answer: dict[tuple[str, int, int], tuple[str, int]],
) -> _Answer:
    worker = cells.get("WorkerId", "")
    if not worker:
        raise _Rejected("missing_worker", "WorkerId is empty")
    class_index = _parse_id("Input.class_index", cells.get("Input.class_index", ""))
    feature_index = _parse_id("Input.feature_index", cells.get("Input.feature_index", ""))
    rank_text = cells.get("Input.feature_rank", "")
    feature_rank = _parse_id("Input.feature_rank", rank_text, minimum=1) if rank_text else None
    wnid = cells.get("Input.wordnet_id", "") or None
    if classes is not None:
        if class_index not in classes:
            raise _Rejected("class_out_of_range", f"Input.class_index {class_index} is not a class of this dataset")
        if wnid is not None and wnid != classes[class_index]:
            raise _Rejected(
                "wnid_mismatch",
                f"Input.wordnet_id {wnid!r} is not {classes[class_index]!r}, the wnid of class {class_index}",
            )
        wnid = classes[class_index]
    elif class_index in wnid_of:
        known, known_file, known_line = wnid_of[class_index]
        if wnid is not None and wnid != known:
            raise _Rejected(
                "wnid_mismatch",
                f"Input.wordnet_id {wnid!r} differs from {known!r} given for class {class_index} at {known_file}:{known_line}",
            )
        wnid = known
    answer = cells.get("Answer.main", "")
    if answer not in ANSWERS:
        raise _Rejected("unknown_answer", f"Answer.main {answer!r} is not one of {', '.join(ANSWERS)}")
    confidence_text = cells.get("Answer.confidence", "")
    try:
        confidence = float(confidence_text)
    except ValueError:
        confidence = math.nan
    if not math.isfinite(confidence):
        raise _Rejected("non_numeric_confidence", f"Answer.confidence {confidence_text!r} is not a number")
    if not CONFIDENCE_MIN <= confidence <= CONFIDENCE_MAX:
        raise _Rejected(
            "confidence_out_of_range",
            f"Answer.confidence {confidence_text!r} is outside {CONFIDENCE_MIN:g}..{CONFIDENCE_MAX:g}",
        )
    key = (worker, class_index, feature_index)
    if key in first_answer:
        first_file, first_line = first_answer[key]
        raise _Rejected(
            "duplicate_answer",
            f"worker {worker!r} already answered class {class_index} feature {feature_index} at {first_file}:{first_line}",
        )
    first_answer[key] = (file, line)
    if classes is None and wnid is not None:
        wnid_of.setdefault(class_index, (wnid, file, line))
    return _Answer(
        class_index, wnid, feature_index, feature_rank, worker, answer, confidence,
        cells.get("Answer.reasons", ""), file, line,
    )


def read_answer_file(
    uri: str,
    data: bytes,
    ledger: _Ledger,
    classes: Mapping[int, str] | None,
    wnid_of: dict[int, tuple[str, str, int]],
    first_answer: dict[tuple[str, int, int], tuple[str, int]],
    validate: Callable[..., _Answer] | None = None,
    columns: Sequence[str] = ANSWER_COLUMNS,
) -> None:
    """Validate every row of one answer file into ``ledger`` (accepted answers and rejected rows).

    ``validate`` checks one row's cells (default: the discovery answers); ``columns`` are the
    expected header named in messages. A file that cannot be read is one rejected row."""
    validate = validate or _validate
    try:
        text = _decode(data)
        with _field_limit(len(text) + 1):
            records = list(_records(text))
    except _Rejected as exc:
        ledger.reject(uri, 0, exc.kind, f"{exc.reason}; no row of this file was used")
        return
    expected = ", ".join(columns)
    header_line, header_cells = records[0] if records else (1, None)
    if header_cells is None:
        why = f"the header row has a field longer than {MAX_FIELD_CHARS:,} characters" if records else "the file is empty"
        ledger.reject(uri, header_line, "missing_columns", f"{why}; expected a header row with the columns {expected}")
        return
    header = [h.strip() for h in header_cells]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        ledger.reject(
            uri, header_line, "missing_columns",
            f"missing columns {', '.join(missing)}; expected the columns {expected}", header,
        )
        return
    position = {name: i for i, name in reversed(list(enumerate(header)))}
    for line, row in records[1:]:
        ledger.rows += 1
        if row is None:
            ledger.reject(uri, line, "field_too_large", f"a field is longer than {MAX_FIELD_CHARS:,} characters; the row was not used")
            continue
        cells = {name: row[i].strip() if i < len(row) else "" for name, i in position.items()}
        try:
            ledger.accepted.append(validate(cells, uri, line, classes, wnid_of, first_answer))
        except _Rejected as exc:
            raw: dict[str, Any] = dict(zip(header, row))
            if len(row) > len(header):
                raw["_extra"] = row[len(header):]
            ledger.reject(uri, line, exc.kind, exc.reason, raw)


@dataclass
class _Pair:
    votes: Counter[str] = field(default_factory=Counter)
    confidence_sum: float = 0.0
    ranks: Counter[int] = field(default_factory=Counter)


def _label_rows(
    ledger: _Ledger,
    wnids: Mapping[int, str],
    build: set[tuple[int, int]] | None,
    min_answers: int,
) -> list[dict[str, Any]]:
    pairs: dict[tuple[int, int], _Pair] = {key: _Pair() for key in build or ()}
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
            "label": label, "kind": kind, "in_build": None if build is None else (c, j) in build,
        })
    return rows


def ingest(
    out: str,
    answer_uris: Sequence[str],
    classes: Mapping[int, str] | None = None,
    build_pairs: Collection[tuple[int, int]] | None = None,
    min_answers: int = 5,
    answers_root: str | None = None,
) -> dict:
    """Validate every answer in ``answer_uris``, label every pair, and write ``answers.parquet``,
    ``labels.parquet`` and ``rejected.parquet`` under ``<out>/annotations/``; returns a summary.

    ``answers_root`` is the output root whose ``annotations/incoming/`` holds dropped answer files
    (default ``out``); it is named in errors.

    ``classes`` maps class_index to wnid (None: no class check). ``build_pairs`` are the
    (class_index, feature_index) pairs of the build (None: no build); pairs of the build without
    answers are labelled ``insufficient``, answered pairs outside it are labelled and counted.
    ``rows`` counts the answer rows read, ``rejected`` the entries of ``rejected.parquet`` (rows and
    whole files).
    """
    if min_answers < 1:
        raise ValueError(f"min_answers = {min_answers}: must be at least 1 (annotations.min_answers)")
    check_inputs(answers_root or out, answer_uris, classes, INCOMING, "pass --answers FILE, set annotations.answers, or put CSV files")
    build = None if build_pairs is None else {(int(c), int(j)) for c, j in build_pairs}

    ledger = _Ledger()
    wnid_of: dict[int, tuple[str, str, int]] = {}
    first_answer: dict[tuple[str, int, int], tuple[str, int]] = {}
    digests = []
    for uri in answer_uris:
        data = storage.read_bytes(uri)
        digests.append((uri, hashlib.sha256(data).hexdigest()))
        read_answer_file(uri, data, ledger, classes, wnid_of, first_answer)
    wnids = classes if classes is not None else {c: w for c, (w, _, _) in wnid_of.items()}
    labels = _label_rows(ledger, wnids, build, min_answers)

    fp = storage.fingerprint(
        CODE_VERSION, digests, min_answers,
        None if classes is None else sorted(classes.items()),
        None if build is None else sorted(build),
    )
    meta = {"code_version": CODE_VERSION, "min_answers": min_answers}
    accepted = ledger.accepted
    storage.write_parquet(
        storage.join(out, ANSWERS_TABLE),
        pa.table({
            "class_index": [a.class_index for a in accepted],
            "wnid": [a.wnid for a in accepted],
            "feature_index": [a.feature_index for a in accepted],
            "feature_rank": [a.feature_rank for a in accepted],
            "worker_id": [a.worker_id for a in accepted],
            "answer": [a.answer for a in accepted],
            "confidence": [a.confidence for a in accepted],
            "reason": [a.reason for a in accepted],
            "file": [a.file for a in accepted],
            "line": [a.line for a in accepted],
        }, schema=ANSWERS_SCHEMA),
        fp, meta,
    )
    storage.write_parquet(storage.join(out, LABELS_TABLE), pa.Table.from_pylist(labels, schema=LABELS_SCHEMA), fp, meta)
    storage.write_parquet(
        storage.join(out, REJECTED_TABLE), pa.Table.from_pylist(ledger.rejected, schema=REJECTED_SCHEMA), fp, meta
    )

    spurious = [r for r in labels if r["label"] == "spurious"]
    return {
        "files": len(answer_uris),
        "rows": ledger.rows,
        "accepted": len(accepted),
        "rejected": len(ledger.rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason_kind"] for r in ledger.rejected).items())),
        "pairs": len(labels),
        "spurious": len(spurious),
        "core": sum(r["label"] == "core" for r in labels),
        "insufficient": sum(r["label"] == "insufficient" for r in labels),
        "kinds": {k: sum(r["kind"] == k for r in spurious) for k in KINDS},
        "classes_with_spurious": len({r["class_index"] for r in spurious}),
        "pairs_not_in_build": None if build is None else sum(not r["in_build"] for r in labels),
        "pairs_without_answers": None if build is None else sum(r["n_answers"] == 0 for r in labels),
        "fingerprint": fp,
    }
