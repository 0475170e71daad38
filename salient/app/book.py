"""What the annotation app knows: the pairs of a build (from its ``pairs.parquet`` and
``classes.parquet`` and each pair's ``assets.json`` under ``discover/``, never from the
spreadsheet-safe ``discover/tasks.csv``) and every answer under ``OUT/annotations/incoming/``,
including the ones it writes there itself.

Answer files are read and checked by :mod:`salient.answers`, as ``salient ingest`` reads them, so
the app counts exactly the answers ``salient ingest`` will accept. The app writes one CSV per (app
run, worker), in the paper's columns, rewritten whole and atomically on every answer under one
lock: a reader (or ``salient ingest``) sees the file before or after an answer, never half of it,
and two app runs never share a file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from salient import builds, discover, storage, tables
from salient.answers import ANSWER_COLUMNS, Answer, Ledger, answer_files, csv_safe
from salient.errors import InputError

APP_FILE_PREFIX = "app-"
# The paper's answer columns, then MTurk's own submit-time column (ingest ignores extra columns).
APP_COLUMNS = (*ANSWER_COLUMNS, "SubmitTime")


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
    fs, _ = storage.url_to_fs(build)
    paths = [storage.url_to_fs(storage.join(build, tables.discover_pair(r["wnid"], r["feature_index"]), tables.ASSETS))[1] for r in rows]
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
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _seen: dict[str, tuple] | None = field(default=None, init=False, repr=False)
    _by_pair: dict[tuple[int, int], list[Answer]] = field(default_factory=dict, init=False, repr=False)
    _by_worker: dict[str, set[tuple[int, int]]] = field(default_factory=dict, init=False, repr=False)
    _own_rows: dict[str, list[list[str]]] = field(default_factory=dict, init=False, repr=False)
    rejected_rows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.incoming = builds.incoming(self.root)
        self._pair_of = {p.key: p for p in self.pairs}
        self._order = [p.key for p in self.pairs]

    def pair(self, class_index: int, feature_index: int) -> Pair | None:
        return self._pair_of.get((class_index, feature_index))

    def _listing(self) -> dict[str, tuple]:
        fs, path = storage.url_to_fs(self.incoming)
        if not fs.isdir(path):
            return {}
        entries = {storage.basename(e["name"]): e for e in fs.ls(path, detail=True)}
        listing = {}
        for uri in answer_files(self.root):
            e = entries.get(storage.basename(uri), {})
            listing[uri] = (e.get("size"), e.get("mtime") or e.get("LastModified") or e.get("ETag"))
        return listing

    def _reload(self) -> None:
        listing = self._listing()
        if listing == self._seen:
            return
        ledger = Ledger(self.classes)
        for uri in listing:
            ledger.read(uri)
        self._by_pair, self._by_worker = {}, {}
        for a in ledger.accepted:
            self._record(a)
        self.rejected_rows = len(ledger.rejected)
        self._seen = listing

    def _record(self, a: Answer) -> None:
        key = (a.class_index, a.feature_index)
        self._by_pair.setdefault(key, []).append(a)
        if key in self._pair_of:
            self._by_worker.setdefault(a.worker_id, set()).add(key)

    def refresh(self) -> None:
        """Take in answer files that appeared or changed since the last look."""
        with self._lock:
            self._reload()

    def add(self, worker_id: str, pair: Pair, answer: str, confidence: int, reason: str) -> Answer:
        """Append one answer to this run's file of ``worker_id``; :class:`Conflict` if the worker
        already answered the pair or it has ``needed`` answers."""
        with self._lock:
            self._reload()
            if pair.key in self._by_worker.get(worker_id, ()):
                raise Conflict(
                    f"worker {worker_id!r} already labelled class {pair.class_index} feature {pair.feature_index}; "
                    "each worker answers a pair once"
                )
            n = len(self._by_pair.get(pair.key, ()))
            if n >= self.needed:
                raise Conflict(
                    f"class {pair.class_index} feature {pair.feature_index} already has {n} answers "
                    f"({self.needed} needed); it is out of the queue"
                )
            uri = storage.join(self.incoming, f"{APP_FILE_PREFIX}{self.run_tag}-{worker_id}.csv")
            rows = self._own_rows.setdefault(uri, [])
            submitted = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            rows.append([
                worker_id, pair.wnid, str(pair.class_index), str(pair.feature_index), str(pair.feature_rank),
                answer, str(confidence), csv_safe(reason), submitted,
            ])
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(APP_COLUMNS)
            writer.writerows(rows[:-1])
            line = buf.getvalue().count("\n") + 1  # a reason may span lines
            writer.writerow(rows[-1])
            try:
                storage.write_bytes_atomic(uri, buf.getvalue().encode("utf-8"))
            except BaseException:
                rows.pop()
                raise
            record = Answer(
                pair.class_index, pair.wnid, pair.feature_index, pair.feature_rank, worker_id, answer, float(confidence),
                rows[-1][7], uri, line,
            )
            self._record(record)
            # Our own write is known; only files changed by others make the next look reread.
            self._seen = {**(self._seen or {}), uri: self._listing()[uri]}
            return record

    def answers(self, key: tuple[int, int]) -> list[Answer]:
        with self._lock:
            return list(self._by_pair.get(key, ()))

    def votes(self, key: tuple[int, int]) -> Counter[str]:
        return Counter(a.answer for a in self.answers(key))

    def n_answers(self, key: tuple[int, int]) -> int:
        with self._lock:
            return len(self._by_pair.get(key, ()))

    def answered_by(self, worker_id: str) -> set[tuple[int, int]]:
        """The build's pairs ``worker_id`` answered."""
        with self._lock:
            return set(self._by_worker.get(worker_id, ()))

    def next_pair(self, worker_id: str | None, after: tuple[int, int] | None = None) -> Pair | None:
        """The first pair after ``after`` (wrapping round) that still needs answers and that
        ``worker_id`` has not answered."""
        with self._lock:
            mine = self._by_worker.get(worker_id, set()) if worker_id else set()
            start = self._order.index(after) + 1 if after in self._pair_of else 0
            for key in self._order[start:] + self._order[:start]:
                if key != after and key not in mine and len(self._by_pair.get(key, ())) < self.needed:
                    return self._pair_of[key]
            return None

    def open_pairs(self) -> int:
        """How many pairs still need answers."""
        with self._lock:
            return sum(len(self._by_pair.get(k, ())) < self.needed for k in self._order)
