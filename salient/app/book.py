"""What the annotation app knows: the pairs of a build (from its ``pairs.parquet`` and
``classes.parquet`` and each pair's ``assets.json`` under ``discover/``, never from the
spreadsheet-safe ``discover/tasks.csv``) and every answer under ``OUT/annotations/incoming/``,
including the ones it writes there itself.

Answer files are read and checked by :mod:`salient.answers`, as ``salient ingest`` reads them, so
the app counts exactly the answers ``salient ingest`` will accept. The app writes one CSV per (app
run, worker), in the paper's columns: on a local disk each answer is appended to it, flushed to disk
and under a lock that readers take too, so a reader (or ``salient ingest``) sees the file before or
after an answer, never half of it. Object stores cannot append: there each answer rewrites the file
whole, and a file takes at most :data:`OBJECT_FILE_ANSWERS` answers before the worker's next one
begins. Two app runs never share a file.

Per-pair answer counts, per-worker answered pairs and the queue of pairs that need answers are kept in
memory and updated as answers are stored, so that neither storing an answer nor finding a worker's
next pair takes longer with more pairs or more answers.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from salient import builds, discover, storage, tables
from salient.answers import ANSWER_COLUMNS, ANSWERS, Answer, Ledger, answer_files, append_answer_records, csv_safe
from salient.errors import InputError

APP_FILE_PREFIX = "app-"
# The paper's answer columns, then MTurk's own submit-time column (ingest ignores extra columns).
APP_COLUMNS = (*ANSWER_COLUMNS, "SubmitTime")
# Object stores cannot append, so there a file is rewritten on every answer: this bounds what one answer costs.
OBJECT_FILE_ANSWERS = 100
STATES = ("all", "open", "complete", "mine")  # the index's filters: see AnswerBook.select


class Conflict(Exception):
    """An answer the queue does not take: the worker already answered the pair, or it is full."""


@dataclass(frozen=True)
class Pair:
    """One (class, feature) pair as annotators see it."""

    class_index: int
    wnid: str
    class_name: str
    definition: str
    supercategory: str
    feature_index: int
    feature_rank: int
    strips: Mapping[str, str]  # strip name -> file path relative to discover/

    @property
    def key(self) -> tuple[int, int]:
        return (self.class_index, self.feature_index)

    @property
    def url(self) -> str:
        return f"/pairs/{self.class_index}/{self.feature_index}"


def read_pairs(build: str) -> list[Pair]:
    """The pairs of the build at ``build`` by class, then feature rank, with what discovery made for them."""
    uri = storage.join(build, tables.PAIRS.path)
    if not storage.exists(uri):
        raise InputError(f"{uri} is missing: the build has no pairs; run `salient aggregate CONFIG` and `salient discover CONFIG` first")
    rows = storage.read_parquet(uri, ["class_index", "wnid", "feature_index", "feature_rank"]).to_pylist()
    rows.sort(key=lambda r: (r["class_index"], r["feature_rank"], r["feature_index"]))
    names = discover.class_names(build)
    fs, root = storage.url_to_fs(build)
    paths = [storage.join(root, tables.discover_pair(r["wnid"], r["feature_index"]), tables.ASSETS) for r in rows]
    pairs = []
    for r, data in zip(rows, storage.cat_many(fs, paths)):
        c, wnid, j = r["class_index"], storage.safe_relpath(r["wnid"]), r["feature_index"]
        if isinstance(data, BaseException):
            raise InputError(
                f"class {c} feature {j} has no discovery assets ({tables.discover_pair(wnid, j)}/{tables.ASSETS} is missing); "
                "run `salient discover CONFIG` first"
            )
        made = json.loads(data).get("files", {})
        info = names.get(c, {})
        pairs.append(Pair(
            c, wnid, info.get("name") or "", info.get("definition") or "", info.get("supercategory") or "", j,
            r["feature_rank"], {s: f"{wnid}/feature_{j}/{s}.png" for s in discover.STRIPS if s in made},
        ))
    return pairs




class Skips:
    """The positions 0, 1, 2, ..., some of them taken out for good: the first one left at or after a
    position, in amortised near-constant time however many are taken out."""

    def __init__(self) -> None:
        # A taken position -> a later one such that every position between is taken too; shortened as
        # it is followed, as in a union-find.
        self._past: dict[int, int] = {}

    def take(self, start: int, stop: int | None = None) -> None:
        """Take out ``start``, or with ``stop`` every position of [start, stop)."""
        stop = start + 1 if stop is None else stop
        if stop > self._past.get(start, start):
            self._past[start] = stop

    def first(self, i: int) -> int:
        """The first position left at or after ``i``."""
        path = []
        while i in self._past:
            path.append(i)
            i = self._past[i]
        for p in path:
            self._past[p] = i
        return i


@dataclass
class _OwnFile:
    """The file this app run writes for one worker."""

    uri: str
    lines: int  # lines written so far, the header's included
    records: list[str] | None  # on an object store, the answers to rewrite it with; None where it is appended to


def _stamp(entry: Mapping) -> tuple:
    """What tells that a listed file changed: its size and modification time (or tag)."""
    return entry.get("size"), entry.get("mtime") or entry.get("LastModified") or entry.get("ETag")


def _csv_lines(*rows: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


_HEADER = _csv_lines(APP_COLUMNS)


@dataclass
class AnswerBook:
    """The answers to a build's pairs: read from ``OUT/annotations/incoming/``, added by the app.

    ``needed`` answers take a pair out of the queue. ``run_tag`` names this app run's files.
    """

    root: str
    pairs: Sequence[Pair]
    classes: Mapping[int, str] | None
    needed: int
    run_tag: str = field(default_factory=builds.new_build_id)  # a sortable time and a random suffix
    rejected_rows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.incoming = builds.incoming(self.root)
        self._lock = threading.Lock()
        self._position = {p.key: i for i, p in enumerate(self.pairs)}
        self._text = [(p.wnid.casefold(), p.class_name.casefold()) for p in self.pairs]
        self._seen: dict[str, tuple] = {}  # answer file -> its stamp when last read or written
        self._own: dict[str, _OwnFile] = {}  # worker -> the file this run writes for them
        self._clear()

    def _clear(self) -> None:
        n = len(self.pairs)
        self._answers: list[list[Answer]] = [[] for _ in range(n)]  # by position
        self._votes = [[0] * len(ANSWERS) for _ in range(n)]
        self._mine: dict[str, set[int]] = {}  # worker -> positions of the pairs they answered
        self._open = Skips()  # taken out: the pairs with enough answers
        # worker -> taken out: the pairs they answered, and closed ones met while looking for their next
        self._not_for: dict[str, Skips] = {}
        self._n_open = n

    def pair(self, class_index: int, feature_index: int) -> Pair | None:
        """The build's pair (class_index, feature_index), or None."""
        i = self._position.get((class_index, feature_index))
        return None if i is None else self.pairs[i]

    def position(self, pair: Pair) -> int:
        """Where ``pair`` is in the build's order, from 0."""
        return self._position[pair.key]

    def _listing(self) -> dict[str, tuple]:
        fs, path = storage.url_to_fs(self.incoming)
        if not fs.isdir(path):
            return {}
        entries = {storage.basename(e["name"]): e for e in fs.ls(path, detail=True)}
        return {uri: _stamp(entries.get(storage.basename(uri), {})) for uri in answer_files(self.root)}

    def _reload(self) -> None:
        listing = self._listing()
        if listing == self._seen:
            return
        ledger = Ledger(self.classes)
        for uri in listing:
            ledger.read(uri)
        self._clear()
        for a in ledger.accepted:
            self._record(a)
        self.rejected_rows = len(ledger.rejected)
        self._seen = listing

    def _record(self, a: Answer) -> None:
        i = self._position.get((a.class_index, a.feature_index))
        if i is None:  # an answer to a pair of another build
            return
        self._answers[i].append(a)
        self._votes[i][ANSWERS.index(a.answer)] += 1
        self._mine.setdefault(a.worker_id, set()).add(i)
        self._not_for.setdefault(a.worker_id, Skips()).take(i)
        if len(self._answers[i]) == self.needed:
            self._open.take(i)
            self._n_open -= 1

    def refresh(self) -> None:
        """Take in answer files that appeared or changed since the last look."""
        with self._lock:
            self._reload()

    def add(self, worker_id: str, pair: Pair, answer: str, confidence: int, reason: str) -> Answer:
        """Store one answer in this run's file of ``worker_id``; :class:`Conflict` if the worker already
        answered the pair or it has ``needed`` answers."""
        with self._lock:
            self._reload()
            i = self._position[pair.key]
            if i in self._mine.get(worker_id, ()):
                raise Conflict(
                    f"worker {worker_id!r} already labelled class {pair.class_index} feature {pair.feature_index}; "
                    "each worker answers a pair once"
                )
            n = len(self._answers[i])
            if n >= self.needed:
                raise Conflict(
                    f"class {pair.class_index} feature {pair.feature_index} already has {n} answers "
                    f"({self.needed} needed); it is out of the queue"
                )
            submitted = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            row = [
                worker_id, pair.wnid, str(pair.class_index), str(pair.feature_index), str(pair.feature_rank),
                answer, str(confidence), csv_safe(reason), submitted,
            ]
            uri, line = self._write(worker_id, _csv_lines(row))
            record = Answer(
                pair.class_index, pair.wnid, pair.feature_index, pair.feature_rank, worker_id, answer, float(confidence),
                row[7], uri, line,
            )
            self._record(record)
            return record

    def _write(self, worker_id: str, text: str) -> tuple[str, int]:
        """Add the CSV record ``text`` to this run's file of ``worker_id``: (the file, the record's first line)."""
        fs, _ = storage.url_to_fs(self.incoming)
        own = self._own.get(worker_id)
        if own is None or (own.records is not None and len(own.records) >= OBJECT_FILE_ANSWERS):
            tag = self.run_tag if own is None else builds.new_build_id()
            uri = storage.join(self.incoming, f"{APP_FILE_PREFIX}{tag}-{worker_id}.csv")
            own = _OwnFile(uri, 1, None if isinstance(fs, LocalFileSystem) else [])
        path = storage.url_to_fs(own.uri)[1]
        if own.records is not None:
            storage.write_bytes_atomic(own.uri, (_HEADER + "".join(own.records) + text).encode("utf-8"))
            own.records.append(text)
        elif own.lines == 1:
            # Made whole under its name, header and first answer, so no reader sees an empty file.
            if not storage.create_exclusive(own.uri, (_HEADER + text).encode("utf-8")):
                raise FileExistsError(f"{own.uri} exists already: another app run has this run's tag; restart the app")
        else:
            append_answer_records(path, text.encode("utf-8"))
        line = own.lines + 1
        own.lines += text.count("\n")  # a reason may span lines
        self._own[worker_id] = own
        # Our own write is known; only files changed by others make the next look reread.
        self._seen[own.uri] = _stamp(fs.info(path))
        return own.uri, line

    def answers(self, key: tuple[int, int]) -> list[Answer]:
        """The answers to the build's pair ``key``, in the order they were read or given."""
        with self._lock:
            return list(self._answers[self._position[key]])

    def votes(self, key: tuple[int, int]) -> list[int]:
        """How many answers to the build's pair ``key`` say each of :data:`salient.answers.ANSWERS`."""
        with self._lock:
            return list(self._votes[self._position[key]])

    def n_answers(self, key: tuple[int, int]) -> int:
        """How many answers the build's pair ``key`` has."""
        with self._lock:
            return len(self._answers[self._position[key]])

    def answered_by(self, worker_id: str, among: Sequence[tuple[int, int]] | None = None) -> set[tuple[int, int]]:
        """The build's pairs ``worker_id`` answered (of ``among``, when given)."""
        with self._lock:
            mine = self._mine.get(worker_id, set())
            if among is None:
                return {self.pairs[i].key for i in mine}
            return {k for k in among if self._position.get(k) in mine}

    def n_answered_by(self, worker_id: str) -> int:
        """How many of the build's pairs ``worker_id`` answered."""
        with self._lock:
            return len(self._mine.get(worker_id, ()))

    def _first_todo(self, worker_id: str | None, start: int) -> int:
        """The position of the first pair at or after ``start`` that needs answers and that ``worker_id`` has
        not answered; ``len(pairs)`` when there is none."""
        skips = self._not_for.get(worker_id) if worker_id else None
        if skips is None:
            return self._open.first(start)
        i = skips.first(start)
        while i < len(self.pairs):
            j = self._open.first(i)
            if j == i:
                return i
            skips.take(i, j)  # closed for everyone: never looked at again for this worker
            i = skips.first(j)
        return i

    def next_pair(self, worker_id: str | None, after: tuple[int, int] | None = None) -> Pair | None:
        """The first pair after ``after`` (wrapping round) that still needs answers and that
        ``worker_id`` has not answered."""
        with self._lock:
            start = self._position[after] + 1 if after in self._position else 0
            i = self._first_todo(worker_id, start)
            if i == len(self.pairs) and start:
                i = self._first_todo(worker_id, 0)
                if i >= start - 1:  # none but ``after`` itself
                    return None
            return self.pairs[i] if i < len(self.pairs) else None

    def open_pairs(self) -> int:
        """How many pairs still need answers."""
        with self._lock:
            return self._n_open

    def select(self, text: str = "", state: str = "all", worker_id: str | None = None) -> Sequence[Pair]:
        """The pairs, in the build's order, whose wnid or class name holds ``text`` (in any letter case) and that
        are in ``state`` (one of :data:`STATES`): any, ``open`` (needing answers), ``complete`` (with
        ``needed`` answers) or ``mine`` (answered by ``worker_id``)."""
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
        text = text.casefold()
        with self._lock:
            if state == "all" and not text:
                return self.pairs
            if state == "mine":
                positions = sorted(self._mine.get(worker_id, ()) if worker_id else ())
            else:
                positions = range(len(self.pairs))
            return [
                self.pairs[i] for i in positions
                if (not text or text in self._text[i][0] or text in self._text[i][1])
                and (state != "open" or len(self._answers[i]) < self.needed)
                and (state != "complete" or len(self._answers[i]) >= self.needed)
            ]
