"""Human answers in the paper's CSV schema (docs/design.md §2 "Annotation"): where answer files are, how
a file is read, which rows count, and the ledger that keeps them.

An answer file is a UTF-8 CSV (``*.csv`` in any letter case) with a header row naming at least
:data:`REQUIRED_COLUMNS`. A file that cannot be read as such (another encoding, binary data, no
header) is rejected whole; otherwise every row is checked on its own, and a bad row is rejected with a
reason and never counts. Broken quoting rejects the line where the broken record starts and reading
goes on with the next line. Each worker's first answer to a (class, feature) pair counts; a later one
is rejected. Any other file in the answers folder is listed as rejected, never ignored.
Reading, checking and the ledger are shared by the discovery ingest (:mod:`salient.ingest`), the
generalisation study (:mod:`salient.study`) and the annotation app (:mod:`salient.app`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from salient import storage
from salient.errors import InputError

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
    "non_ascii_worker_id",
    "control_character",
    "field_too_large",
    "unreadable_row",
    "bare_carriage_return",
    "repeated_header",
    "missing_columns",
    "duplicate_column",
    "unreadable_file",
    "not_an_answer_file",
)

INCOMING = "annotations/incoming"
# Characters no answer may hold: C0 controls but tab and line feed, DEL and C1 (escape codes that a
# terminal or a spreadsheet would act on). A line break in a reason is written LF (CRLF is read as LF).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

MAX_FIELD_CHARS = 1_000_000
MAX_ID = 2**31 - 1  # ids are stored as int32, like the aggregate tables

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
REJECTED_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("line", pa.int64()),
    ("reason", pa.string()),
    ("reason_kind", pa.string()),
    ("raw", pa.string()),
])

_INTEGER = re.compile(r"[0-9]+(?:\.0*)?")  # "3" and "3.0"; no sign, exponent or fraction
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?")  # ASCII digits: no "３", "1e0", "nan" or "inf"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """A cell that spreadsheet programs will not run as a formula: text starting with = + - @, a
    tab or a carriage return, also after leading spaces or line breaks (which some programs trim),
    gets a leading ``'``."""
    return f"'{value}" if isinstance(value, str) and value.lstrip(" \n").startswith(_FORMULA_START) else value


def _is_answer_file(name: str) -> bool:
    return name.lower().endswith(".csv") and not name.startswith(".")


def _in_flight(name: str) -> bool:
    # storage.write_bytes_atomic's temporary file: an answer file being written right now
    return name.startswith(".") and bool(_TEMPORARY.search(name))


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")


def _kind_of(mode: int) -> str:
    """What an entry that is not a regular file is, by its ``st_mode``."""
    kinds = (
        (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
    )
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _listing(root: str, folder: str) -> tuple[str, list[str], dict[str, str]]:
    """The folder ``<root>/<folder>``, every regular file under it (paths relative to it, sorted), and
    every other entry under it that holds no file (path relative to it -> what it is: a named pipe,
    an empty folder, ...); none when the folder does not exist."""
    incoming = storage.join(root, folder)
    fs, path = storage.url_to_fs(incoming)
    if not fs.isdir(path):
        return incoming, [], {}
    base = path.rstrip("/") + "/"
    entries = {name.removeprefix(base): info for name, info in fs.find(path, withdirs=True, detail=True).items() if name.startswith(base)}
    files = sorted(name for name, info in entries.items() if info.get("type") == "file")
    parents = {posixpath.dirname(name) for name in entries}
    others = {
        name: "an empty folder" if info.get("type") == "directory" else _kind_of(info.get("mode", 0))
        for name, info in entries.items()
        if info.get("type") != "file" and not (info.get("type") == "directory" and name in parents)
    }
    return incoming, files, others


def answer_files(root: str, extra: Sequence[str] = (), folder: str = INCOMING) -> list[str]:
    """The answer files to ingest: ``extra`` in the given order, then every ``*.csv`` (any letter
    case, not hidden) directly under ``<root>/<folder>/`` (``root`` is the output root; ``folder``
    defaults to ``annotations/incoming/``) by name; a file named twice is kept once, at its first place."""
    incoming, names, _ = _listing(root, folder)
    found = [storage.join(incoming, n) for n in names if "/" not in n and _is_answer_file(n)]
    seen: set[str] = set()
    files = []
    for uri in [*extra, *found]:
        key = storage.normalize_uri(uri)
        if key not in seen:
            seen.add(key)
            files.append(uri)
    return files


def other_files(root: str, folder: str = INCOMING) -> list[tuple[str, str]]:
    """(URI, why it is not read) of every entry under ``<root>/<folder>/`` that :func:`answer_files`
    does not take: other names, hidden files, files in subfolders, symbolic links, named pipes,
    devices, empty folders. Files being written atomically right now are left out."""
    incoming, names, others = _listing(root, folder)
    out = []
    for rel, what in others.items():
        why = what if what == "an empty folder" else f"{what}, not a regular file; put the CSV file itself there"
        out.append((storage.join(incoming, rel), f"not read: it is {why}"))
    for rel in names:
        name = posixpath.basename(rel)
        if "/" in rel:
            why = f"it is in a subfolder; move it directly under {incoming}/ to have it read"
        elif _is_answer_file(name) or _in_flight(name):
            continue
        elif name.startswith("."):
            why = "it is a hidden file (its name starts with a dot); rename it to a visible .csv name to have it read"
        else:
            why = "its name does not end in .csv; answer files are CSV, save it as .csv to have it read"
        out.append((storage.join(incoming, rel), f"not read: {why}"))
    return sorted(out)


def check_inputs(root: str, answer_uris: Sequence[str], classes: Mapping[int, str] | None, folder: str, how: str) -> None:
    """Raise :class:`InputError` for an empty output root, no, repeated or missing answer files, or empty classes.

    ``how`` tells how to give answer files; ``folder`` (under the output root ``root``) is where
    dropped files are picked up."""
    if not root:
        raise InputError("root is empty; give the output root (a path or URI)")
    if not answer_uris:
        others = [storage.basename(uri) for uri, _ in other_files(root, folder)]
        found = f" (found only files that are not read: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
        raise InputError(f"no answer files to ingest: {how} under {storage.join(root, folder)}/{found}")
    repeated = sorted(u for u, n in Counter(answer_uris).items() if n > 1)
    if repeated:
        raise InputError(f"answer files listed more than once: {', '.join(repeated)}; list each file once")
    missing = [u for u in answer_uris if not storage.exists(u)]
    if missing:
        raise InputError(f"answer files not found: {', '.join(missing)}; check the paths and {storage.join(root, folder)}/")
    odd = [f"{u} is {_kind_of(mode)}" for u in answer_uris if (mode := _local_mode(u)) is not None and not stat.S_ISREG(mode)]
    if odd:
        raise InputError(
            f"answer files that are not regular files: {'; '.join(odd)}; give CSV files (for a folder, the CSV files in it)"
        )
    if classes is not None and not classes:
        raise InputError("classes is empty; pass None to skip the class check, or the dataset's classes")


def _local_mode(uri: str) -> int | None:
    """The ``st_mode`` of the local file ``uri`` (links followed); None for an object-store URI."""
    fs, path = storage.url_to_fs(uri)
    return os.stat(path).st_mode if isinstance(fs, LocalFileSystem) else None


def read_answer_file(uri: str) -> bytes:
    """The bytes of the answer file at ``uri``; :class:`Rejected` for a local entry that is not a
    regular file (a named pipe, a device, a folder), which is never read. On a local disk it is read
    under a shared lock, so that an answer being appended (:func:`append_answer_records`) is read
    whole or not at all."""
    fs, path = storage.url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem):
        return storage.read_bytes(uri)
    # Non-blocking: opening a named pipe would otherwise wait for a writer. The check is on the
    # opened file, so a file swapped for a pipe after check_inputs is caught too.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise Rejected("not_an_answer_file", f"it is {_kind_of(mode)}, not a regular file; put the answer CSV file there instead")
        with contextlib.suppress(OSError):  # a filesystem without locks is read as before
            fcntl.flock(fd, fcntl.LOCK_SH)
        with open(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)  # and with it the lock


def append_answer_records(path: str, data: bytes) -> None:
    """Append ``data``, whole CSV records, to the existing local answer file at ``path`` and flush it to
    disk, under an exclusive lock: a reader (:func:`read_answer_file`) sees the file before or after
    them, never part of them. On an error the file is cut back to its length before."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks is written as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            rest = memoryview(data)
            while rest:
                rest = rest[os.write(fd, rest):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)  # and with it the lock


def worker_identity(worker_id: str) -> str:
    """The worker that ``worker_id`` names, the same in every answer file and in the annotation app:
    its Unicode NFKC form, case-folded (``ALICE``, ``alice`` and fullwidth ``ＡＬＩＣＥ`` are one worker).
    :class:`Rejected` (``non_ascii_worker_id``) when that is not all ASCII, so that no look-alike
    letter of another script (Cyrillic ``а`` for Latin ``a``) makes a second worker."""
    identity = unicodedata.normalize("NFKC", worker_id).casefold()
    if not identity.isascii():
        raise Rejected(
            "non_ascii_worker_id",
            f"WorkerId {worker_id!r} holds letters outside ASCII (after Unicode NFKC normalisation); worker ids are ASCII",
        )
    return identity


class Rejected(Exception):
    """A row or a file that does not count: ``kind`` is one of :data:`REASON_KINDS`, ``reason`` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """One accepted answer: the pair, who answered what, and where it was read (file and first line)."""

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


@dataclass(frozen=True)
class Rejection:
    """One rejected row (``line`` its first line) or file (``line`` 0 or the header's line), with the
    reason; ``raw`` is the row's cells by column as JSON, None when there is no row to show."""

    file: str
    line: int
    reason: str
    reason_kind: str
    raw: str | None


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


def _records(lines: Sequence[str]) -> Iterator[tuple[int, list[str] | Rejected | None]]:
    """(first line, cells) of each CSV record of ``lines`` (a text's lines, ends kept); cells None for a record with a field longer than
    :data:`MAX_FIELD_CHARS`, a :class:`Rejected` for a record that is not valid CSV (a stray quote):
    that record's first line is given up and reading goes on with the next line, so the records
    before and after it still count. Run under a field limit above ``len(text)``: an oversized field
    is read whole, so what follows it is read as the records it is, never as text cut out of that field."""
    start = 0  # lines before the current reader's first
    while start < len(lines):
        reader = csv.reader((lines[i] for i in range(start, len(lines))), strict=True)
        previous = 0
        try:
            for row in reader:
                first, previous = start + previous + 1, reader.line_num
                if any(len(cell) > MAX_FIELD_CHARS for cell in row):
                    yield first, None
                elif any(cell.strip() for cell in row):
                    yield first, row
            return
        except csv.Error as exc:
            first = start + previous + 1
            skipped = f"line {first} was not used and reading went on at line {first + 1}"
            if "new-line character seen in unquoted field" in str(exc):
                yield first, Rejected(
                    "bare_carriage_return",
                    f"line {start + reader.line_num} holds a carriage return (CR) that does not end the line, outside "
                    f"quotes, in the record that starts at line {first}: {skipped}; remove the CR or quote the field",
                )
            else:
                yield first, Rejected(
                    "unreadable_row",
                    f"not valid CSV at line {start + reader.line_num} ({exc}), in the record that starts at line {first}: "
                    f"{skipped}; check its quotes",
                )
            start = first


# UTF-32 first: its little-endian mark begins with UTF-16's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode(data: bytes) -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark is dropped); :class:`Rejected` for any other
    encoding: a NUL byte in the first line, or in a file that is not UTF-8, is taken for UTF-16
    without a byte-order mark or binary data (a NUL byte in a later line of a UTF-8 file rejects its row only)."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise Rejected("unreadable_file", f"the file is {name} (it starts with a {name} byte-order mark); save it as UTF-8 CSV")
    nul = data.find(b"\x00")
    try:
        text, bad = data.decode("utf-8-sig"), -1
    except UnicodeDecodeError as exc:
        text, bad = None, exc.start
    if nul >= 0 and (text is None or _line_of(data, nul) == 1):
        raise Rejected(
            "unreadable_file",
            f"byte {nul} (line {_line_of(data, nul)}) is a NUL byte: the file is binary, or UTF-16 "
            "without a byte-order mark; save it as UTF-8 CSV",
        )
    if text is None:
        raise Rejected(
            "unreadable_file",
            f"byte {bad} (line {_line_of(data, bad)}) is not UTF-8 (the file may be Latin-1, "
            "Windows-1252 or binary); save it as UTF-8 CSV",
        )
    return text


def _parse_id(column: str, text: str, minimum: int = 0) -> int:
    if not text:
        raise Rejected("missing_id", f"{column} is empty")
    if not _INTEGER.fullmatch(text):
        raise Rejected("non_integer_id", f"{column} {text!r} is not a non-negative integer")
    value = int(text.split(".")[0])
    if not minimum <= value <= MAX_ID:
        raise Rejected("non_integer_id", f"{column} {text!r} is outside {minimum}..{MAX_ID}")
    return value


@dataclass
class Ledger:
    """Accepted answers and rejected rows of the answer files read, in file order then line order.

    ``classes`` maps class_index to wnid (None: no class check; then a class keeps the first wnid
    it was given with). A subclass may override :meth:`validate` and :attr:`columns` for answers of
    another kind.
    """

    columns: ClassVar[Sequence[str]] = ANSWER_COLUMNS  # the expected header, named in messages

    classes: Mapping[int, str] | None = None
    accepted: list[Answer] = field(default_factory=list, init=False)
    rejected: list[Rejection] = field(default_factory=list, init=False)
    rows: int = field(default=0, init=False)  # answer rows read, header rows not counted
    digests: list[tuple[str, str]] = field(default_factory=list, init=False)  # (uri, SHA-256) of each file read
    _wnid_of: dict[int, tuple[str, str, int]] = field(default_factory=dict, init=False, repr=False)
    _first_answer: dict[tuple[str, int, int], tuple[str, int]] = field(default_factory=dict, init=False, repr=False)

    @property
    def wnids(self) -> Mapping[int, str]:
        """class_index -> wnid: ``classes``, or without them the wnid each class was first given with."""
        if self.classes is not None:
            return self.classes
        return {c: w for c, (w, _, _) in self._wnid_of.items()}

    def rejected_by_reason(self) -> dict[str, int]:
        """How many rows and files were rejected, per reason kind, by kind name."""
        return dict(sorted(Counter(r.reason_kind for r in self.rejected).items()))

    def reject(self, file: str, line: int, kind: str, reason: str, raw: Any = None) -> None:
        """List a rejected row or file; ``raw`` is what to show of it (kept as JSON)."""
        self.rejected.append(Rejection(file, line, reason, kind, None if raw is None else json.dumps(raw, ensure_ascii=False)))

    def read(self, uri: str) -> None:
        """Check every row of the answer file at ``uri`` into the ledger; a file that cannot be read
        is one rejected entry."""
        try:
            data = read_answer_file(uri)
        except Rejected as exc:
            self.reject(uri, 0, exc.kind, exc.reason)
            return
        self.digests.append((uri, hashlib.sha256(data).hexdigest()))
        try:
            text = _decode(data)
            if "\n" not in text:  # lines that end in CR alone (classic Mac OS): CR is the line end
                text = text.replace("\r", "\n")
            # Lines end at LF only: a CR elsewhere stays in its line, where the CSV reader rejects it.
            lines = io.StringIO(text, newline="\n").readlines()
            with _field_limit(len(text) + 1):
                records = list(_records(lines))
        except Rejected as exc:
            self.reject(uri, 0, exc.kind, f"{exc.reason}; no row of this file was used")
            return
        expected = ", ".join(self.columns)
        header_line, header_cells = records[0] if records else (1, None)
        if not isinstance(header_cells, list):
            if isinstance(header_cells, Rejected):
                why = f"the header row is not valid CSV ({header_cells.reason})"
            elif records:
                why = f"the header row has a field longer than {MAX_FIELD_CHARS:,} characters"
            else:
                why = "the file is empty"
            self.reject(uri, header_line, "missing_columns", f"{why}; expected a header row with the columns {expected}; no row of this file was used")
            return
        header = [h.strip() for h in header_cells]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            self.reject(
                uri, header_line, "missing_columns",
                f"missing columns {', '.join(missing)}; expected the columns {expected}", header,
            )
            return
        duplicated = [c for c in self.columns if header.count(c) > 1]
        if duplicated:
            self.reject(
                uri, header_line, "duplicate_column",
                f"the header names {', '.join(duplicated)} more than once; keep one column of each name; no row of this file was used",
                header,
            )
            return
        position = {name: i for i, name in reversed(list(enumerate(header)))}
        for line, row in records[1:]:
            self.rows += 1
            if row is None:
                self.reject(uri, line, "field_too_large", f"a field is longer than {MAX_FIELD_CHARS:,} characters; the row was not used")
                continue
            if isinstance(row, Rejected):
                self.reject(uri, line, row.kind, row.reason, lines[line - 1].rstrip("\r\n")[:MAX_FIELD_CHARS])
                continue
            cells = {name: row[i].strip() if i < len(row) else "" for name, i in position.items()}
            try:
                if [c.strip().lstrip("\ufeff") for c in row] == header:  # files joined together, byte-order marks and all
                    raise Rejected("repeated_header", "the header row is repeated here; it is not an answer")
                if any("\x00" in c for c in row):  # in any column, read or not
                    raise Rejected("control_character", "a field holds a NUL byte (U+0000), which is not text; use plain text")
                self.accepted.append(self.validate(cells, uri, line))
            except Rejected as exc:
                raw: dict[str, Any] = dict(zip(header, row))
                if len(row) > len(header):
                    raw["_extra"] = row[len(header):]
                self.reject(uri, line, exc.kind, exc.reason, raw)

    def validate(self, cells: Mapping[str, str], file: str, line: int) -> Answer:
        """The answer in one row's ``cells`` (column -> stripped text) at ``file``:``line``, taken as
        the worker's answer to its pair; :class:`Rejected` if the row does not count."""
        worker = cells.get("WorkerId", "")
        if not worker:
            raise Rejected("missing_worker", "WorkerId is empty")
        for column, value in cells.items():
            bad = CONTROL.search(value.replace("\r\n", "\n"))
            if bad:
                raise Rejected("control_character", f"{column} holds the control character U+{ord(bad.group()):04X}; use plain text")
        worker = worker_identity(worker)
        class_index = _parse_id("Input.class_index", cells.get("Input.class_index", ""))
        feature_index = _parse_id("Input.feature_index", cells.get("Input.feature_index", ""))
        rank_text = cells.get("Input.feature_rank", "")
        feature_rank = _parse_id("Input.feature_rank", rank_text, minimum=1) if rank_text else None
        wnid = cells.get("Input.wordnet_id", "") or None
        classes = self.classes
        if classes is not None:
            if class_index not in classes:
                raise Rejected("class_out_of_range", f"Input.class_index {class_index} is not a class of this dataset")
            # A crowd task made from discover/tasks.csv carries the wnid as that export shows it.
            if wnid is not None and wnid not in (classes[class_index], csv_safe(classes[class_index])):
                raise Rejected(
                    "wnid_mismatch",
                    f"Input.wordnet_id {wnid!r} is not {classes[class_index]!r}, the wnid of class {class_index}",
                )
            wnid = classes[class_index]
        elif class_index in self._wnid_of:
            known, known_file, known_line = self._wnid_of[class_index]
            if wnid is not None and wnid != known:
                raise Rejected(
                    "wnid_mismatch",
                    f"Input.wordnet_id {wnid!r} differs from {known!r} given for class {class_index} at {known_file}:{known_line}",
                )
            wnid = known
        answer = cells.get("Answer.main", "")
        if answer not in ANSWERS:
            raise Rejected("unknown_answer", f"Answer.main {answer!r} is not one of {', '.join(ANSWERS)}")
        confidence_text = cells.get("Answer.confidence", "")
        if not _NUMBER.fullmatch(confidence_text):
            raise Rejected(
                "non_numeric_confidence", f"Answer.confidence {confidence_text!r} is not a number in ASCII digits, like 4 or 4.5"
            )
        confidence = float(confidence_text)
        if not CONFIDENCE_MIN <= confidence <= CONFIDENCE_MAX:
            raise Rejected(
                "confidence_out_of_range",
                f"Answer.confidence {confidence_text!r} is outside {CONFIDENCE_MIN:g}..{CONFIDENCE_MAX:g}",
            )
        key = (worker, class_index, feature_index)
        if key in self._first_answer:
            first_file, first_line = self._first_answer[key]
            raise Rejected(
                "duplicate_answer",
                f"worker {worker!r} already answered class {class_index} feature {feature_index} at {first_file}:{first_line}",
            )
        self._first_answer[key] = (file, line)
        if classes is None and wnid is not None:
            self._wnid_of.setdefault(class_index, (wnid, file, line))
        return Answer(
            class_index, wnid, feature_index, feature_rank, worker, answer, confidence,
            cells.get("Answer.reasons", ""), file, line,
        )

    def accepted_table(self, schema: pa.Schema = ANSWERS_SCHEMA) -> pa.Table:
        """The accepted answers as a table of ``schema``'s columns (some of :data:`ANSWERS_SCHEMA`'s)."""
        return _table(self.accepted, schema)

    def rejected_table(self) -> pa.Table:
        """The rejected rows and files as a table of :data:`REJECTED_SCHEMA`."""
        return _table(self.rejected, REJECTED_SCHEMA)


def _table(records: Sequence[Answer | Rejection], schema: pa.Schema) -> pa.Table:
    return pa.table({name: [getattr(r, name) for r in records] for name in schema.names}, schema=schema)
