"""The annotation app at ImageNet's size, 1,000 classes x 5 pairs, on tables written here with pyarrow:
the index pages and filters reach every pair once, the next pair a worker gets is the one a scan of
every pair finds, and the answers land where and as ``salient ingest`` reads them. The times are
measured by ``python -m benchmarks.app``."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from salient import discover, ingest, tables
from salient.answers import Ledger, answer_files
from salient.app import AppSettings, book, create_app, web
from salient.app.book import AnswerBook, read_pairs

BUILD_ID = "20260101T000000Z-abcdef"
CLASSES, PER_CLASS = 1000, 5
NEEDED = 3


def write_build(build: Path, classes: int, per_class: int, seed: int = 0) -> list[dict]:
    """A build directory holding what the app reads (``classes.parquet``, ``pairs.parquet``, and an
    ``assets.json`` per pair under ``discover/``), with the pairs' rows shuffled and their features out
    of rank order; returns the pairs in the order the app shows them, worked out here."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{c:08d}" for c in range(classes)]
    names = [f"Class {c} {'Tabby' if c % 7 == 0 else 'hound'}" for c in range(classes)]
    (build / "discover").mkdir(parents=True)
    pq.write_table(pa.table({
        "class_index": pa.array(range(classes), pa.int32()),
        "wnid": pa.array(wnids, pa.string()),
        "name": pa.array(names, pa.string()),
        "definition": pa.array([f"the definition of class {c}" for c in range(classes)], pa.string()),
        "supercategory": pa.array(["animal"] * classes, pa.string()),
    }), build / tables.CLASSES.path)
    rows = []
    for c in range(classes):
        features = rng.choice(2048, per_class, replace=False)
        rows += [{"class_index": c, "wnid": wnids[c], "feature_index": int(j), "feature_rank": r + 1} for r, j in enumerate(features)]
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    pq.write_table(pa.table({
        "class_index": pa.array([r["class_index"] for r in shuffled], pa.int32()),
        "wnid": pa.array([r["wnid"] for r in shuffled], pa.string()),
        "feature_index": pa.array([r["feature_index"] for r in shuffled], pa.int32()),
        "feature_rank": pa.array([r["feature_rank"] for r in shuffled], pa.int32()),
    }), build / tables.PAIRS.path)
    for r in rows:
        folder = build / tables.discover_pair(r["wnid"], r["feature_index"])
        folder.mkdir(parents=True)
        files = {s: f"{r['wnid']}/feature_{r['feature_index']}/{s}.png" for s in discover.STRIPS}
        nams = np.round(rng.random((5, 49)), 4).tolist()  # as discovery writes them: 5 images, 7 x 7
        (folder / tables.ASSETS).write_text(json.dumps({**r, "image_ids": [0, 1, 2, 3, 4], "files": files, "nam_h": 7, "nam_w": 7, "nams": nams}))
    return sorted(
        ({**r, "name": names[r["class_index"]]} for r in rows), key=lambda r: (r["class_index"], r["feature_rank"], r["feature_index"])
    )


def _settings(build: Path, root: Path, needed: int = NEEDED) -> AppSettings:
    return AppSettings(root=str(root), build=str(build), build_id=BUILD_ID, min_answers=needed)


def _key(r: dict) -> str:
    return f"{r['class_index']}/{r['feature_index']}"


def _url(r: dict) -> str:
    return f"/pairs/{r['class_index']}/{r['feature_index']}"


def _walk(client: TestClient, url: str) -> tuple[list[str], int]:
    """The pairs listed on ``url`` and every page after it (following the pager's links), and the pages seen."""
    keys, pages = [], 0
    while url:
        r = client.get(url)
        assert r.status_code == 200, (url, r.text)
        shown = re.findall(r'<tr data-pair="([0-9]+/[0-9]+)"', r.text)
        assert len(shown) <= web.PAGE_SIZE, url
        keys += shown
        pages += 1
        following = re.search(r'<a href="([^"]+)" rel="next">', r.text)
        url = html.unescape(following.group(1)) if following else None
    return keys, pages


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet")
    build = tmp / "build"
    return SimpleNamespace(build=build, pairs=write_build(build, CLASSES, PER_CLASS))


def test_the_index_shows_a_page_and_its_pager_and_filters_reach_every_pair_once(imagenet, tmp_path):
    client = TestClient(create_app(_settings(imagenet.build, tmp_path)))
    every = [_key(r) for r in imagenet.pairs]
    first = client.get("/")
    assert re.findall(r'<tr data-pair="([0-9]+/[0-9]+)"', first.text) == every[:web.PAGE_SIZE]
    assert "5000 of 5000 pairs still need answers" in first.text
    assert f"pairs 1&ndash;{web.PAGE_SIZE} of 5000, page 1 of {5000 // web.PAGE_SIZE}" in first.text

    keys, pages = _walk(client, "/")
    assert keys == every and pages == 5000 // web.PAGE_SIZE, "each pair once, in the build's order"
    for q in ("tabby", "n0000012", " CLASS 99 "):
        needle = q.strip().casefold()
        want = [_key(r) for r in imagenet.pairs if needle in r["wnid"].casefold() or needle in r["name"].casefold()]
        assert want and _walk(client, "/?" + urlencode({"q": q}))[0] == want, q
    assert _walk(client, "/?q=no-such-class") == ([], 1)
    assert _walk(client, "/review?q=tabby")[0] == [_key(r) for r in imagenet.pairs if "Tabby" in r["name"]]

    for bad in ("/?page=0", "/?page=x", "/?page=99999999999", "/?state=done", "/?state=mine", "/?worker=../x&state=mine",
                "/?q=%0a", "/?q=" + "a" * 101, "/api/progress?worker_id=w&pairs=1/2,3", "/review?state=nope"):
        r = client.get(bad)
        assert r.status_code == 422, (bad, r.status_code)
        assert r.json()["detail"], bad
    past = client.get("/?page=51")
    assert past.status_code == 404 and "last page, 50" in past.json()["detail"]


def _brute_next(pairs: list[dict], counts: list[int], mine: set[int], after: int | None, needed: int = NEEDED) -> str | None:
    """The next pair by a scan of every pair, as docs/annotation.md says: after ``after``, wrapping round."""
    order = list(range(len(pairs))) if after is None else [*range(after + 1, len(pairs)), *range(after)]
    return next((_url(pairs[i]) for i in order if counts[i] < needed and i not in mine), None)


def test_the_queue_matches_a_scan_from_every_pair_as_answers_come(tmp_path):
    """12 pairs needing 2 answers, answered at random by 4 workers until none is left: after each answer,
    every worker's next pair after every pair (and from the start) is the one a scan finds."""
    pairs = write_build(tmp_path / "build", 4, 3)
    answers = AnswerBook(str(tmp_path / "out"), read_pairs(str(tmp_path / "build")), None, 2)
    counts, mine, rng = [0] * len(pairs), {f"w{k}": set() for k in range(4)}, np.random.default_rng(2)
    while any(n < 2 for n in counts):
        worker, i = f"w{rng.integers(0, 4)}", int(rng.integers(0, len(pairs)))
        if counts[i] < 2 and i not in mine[worker]:
            answers.add(worker, answers.pairs[i], "background", 3, "sky")
            counts[i] += 1
            mine[worker].add(i)
        for w in [*mine, "newcomer"]:
            for after in [None, *range(len(pairs))]:
                got = answers.next_pair(w, None if after is None else answers.pairs[after].key)
                assert (got.url if got else None) == _brute_next(pairs, counts, mine.get(w, set()), after, 2), (w, after)
    assert answers.next_pair(None) is None and answers.open_pairs() == 0


@pytest.fixture(scope="module")
def answered(imagenet, tmp_path_factory):
    """602 answers posted by 6 workers: w0 labels the pairs in order, the others pick pairs at random
    among the first 400, then w0 and w1 label the last pair; each response's next pair is checked
    against a scan of every pair."""
    root = tmp_path_factory.mktemp("answered")
    client = TestClient(create_app(_settings(imagenet.build, root)))
    pairs, rng = imagenet.pairs, np.random.default_rng(1)
    counts, mine = [0] * len(pairs), {f"w{k}": set() for k in range(6)}
    stored = []
    last = len(pairs) - 1  # answered last: the next pair is found round the end
    plan = [("w0", i) for i in range(100)] + [(f"w{rng.integers(1, 6)}", int(rng.integers(0, 400))) for _ in range(500)]
    plan += [("w0", last), ("w1", last)]
    for n, (worker, i) in enumerate(plan):
        r = pairs[i]
        body = {"worker_id": worker, "class_index": r["class_index"], "feature_index": r["feature_index"],
                "answer": ("main_object", "separate_object", "background")[n % 3], "confidence": 1 + n % 5,
                "reason": f"answer {n}\nsays {worker}"}
        got = client.post("/api/answers", json=body)
        if i in mine[worker] or counts[i] >= NEEDED:
            assert got.status_code == 409, got.text
        else:
            assert got.status_code == 201, got.text
            counts[i] += 1
            mine[worker].add(i)
            stored.append(body)
        assert got.json()["next"] == _brute_next(pairs, counts, mine[worker], i), (n, worker, i)
    return SimpleNamespace(root=root, client=client, counts=counts, mine=mine, stored=stored)


def test_the_next_pair_is_the_one_a_scan_of_every_pair_finds(imagenet, answered):
    pairs, counts = imagenet.pairs, answered.counts
    assert 0 < sum(c >= NEEDED for c in counts) < 400 and len(answered.stored) > 300
    for worker, mine in {**answered.mine, "newcomer": set()}.items():
        p = answered.client.get("/api/progress", params={"worker_id": worker}).json()
        assert p["next"] == _brute_next(pairs, counts, mine, None), worker
        assert (p["labelled_by_you"], p["open"]) == (len(mine), sum(c < NEEDED for c in counts))
        shown = [_key(pairs[i]) for i in (0, 1, 2, 450)]
        among = answered.client.get("/api/progress", params={"worker_id": worker, "pairs": ",".join(shown)}).json()
        assert among["answered"] == sorted(_key(pairs[i]) for i in (0, 1, 2, 450) if i in mine)
    restarted = TestClient(create_app(_settings(imagenet.build, answered.root)))
    for worker, mine in answered.mine.items():
        p = restarted.get("/api/progress", params={"worker_id": worker}).json()
        assert (p["next"], p["labelled_by_you"]) == (_brute_next(pairs, counts, mine, None), len(mine)), "read back from the files"


def test_the_state_filters_list_what_the_answers_say(imagenet, answered):
    pairs, counts, client = imagenet.pairs, answered.counts, answered.client
    assert _walk(client, "/?state=open")[0] == [_key(r) for r, n in zip(pairs, counts) if n < NEEDED]
    assert _walk(client, "/?state=complete")[0] == [_key(r) for r, n in zip(pairs, counts) if n >= NEEDED]
    assert _walk(client, "/?state=mine&worker=w3")[0] == [_key(pairs[i]) for i in sorted(answered.mine["w3"])]
    assert _walk(client, "/?state=complete&q=tabby")[0] == [
        _key(r) for r, n in zip(pairs, counts) if n >= NEEDED and "Tabby" in r["name"]
    ]
    review = client.get("/review")
    assert f"insufficient {sum(n < NEEDED for n in counts)}" in review.text
    assert f'<td id="answers">{len(answered.stored)}</td>' in review.text


def test_the_answers_are_appended_where_ingest_reads_them(imagenet, answered):
    files = answer_files(str(answered.root))
    assert len(files) == 6 and all(re.search(r"/app-[0-9TZ]+-[0-9a-f]{6}-w[0-5]\.csv$", f) for f in files)
    ledger = Ledger(ingest.known_classes(str(imagenet.build)))
    for uri in files:
        ledger.read(uri)
    assert ledger.rejected == []
    got = sorted((a.worker_id, a.class_index, a.feature_index, a.answer, int(a.confidence), a.reason) for a in ledger.accepted)
    want = sorted((b["worker_id"], b["class_index"], b["feature_index"], b["answer"], b["confidence"], b["reason"]) for b in answered.stored)
    assert got == want
    for a in ledger.accepted:  # the line each answer starts on, as the app recorded it
        with open(a.file, newline="") as fh:
            assert fh.read().split("\n")[a.line - 1].startswith(f"{a.worker_id},"), (a.file, a.line)

    out = answered.root / "ingested"
    build_pairs = [(r["class_index"], r["feature_index"]) for r in imagenet.pairs]
    summary = ingest.ingest(
        str(out), files, ingest.known_classes(str(imagenet.build)), build_pairs, min_answers=NEEDED, answers_root=str(answered.root),
    )
    assert (summary["accepted"], summary["rejected"]) == (len(answered.stored), 0)
    labels = pq.read_table(out / tables.LABELS.path).to_pylist()
    complete = {(imagenet.pairs[i]["class_index"], imagenet.pairs[i]["feature_index"]) for i, n in enumerate(answered.counts) if n >= NEEDED}
    assert {(r["class_index"], r["feature_index"]) for r in labels if r["label"] != "insufficient"} == complete


def test_an_object_store_gets_a_file_per_hundred_answers(imagenet, monkeypatch):
    """Object stores cannot append: each answer rewrites its file, which takes OBJECT_FILE_ANSWERS at most."""
    monkeypatch.setattr(book, "OBJECT_FILE_ANSWERS", 2)
    root = f"memory://app-scale-{os.getpid()}"
    client = TestClient(create_app(_settings(imagenet.build, root)))
    for r in imagenet.pairs[:5]:
        body = {"worker_id": "w", "class_index": r["class_index"], "feature_index": r["feature_index"],
                "answer": "background", "confidence": 3, "reason": "sky"}
        assert client.post("/api/answers", json=body).status_code == 201
    files = answer_files(root)
    ledger = Ledger()
    for uri in files:
        ledger.read(uri)
    assert len(files) == 3 and all(f.endswith("-w.csv") for f in files)
    assert sorted(len([a for a in ledger.accepted if a.file == f]) for f in files) == [1, 2, 2]
    assert sorted(_key(vars(a)) for a in ledger.accepted) == sorted(_key(r) for r in imagenet.pairs[:5])
    assert client.get("/api/progress", params={"worker_id": "w"}).json()["labelled_by_you"] == 5


def test_a_reader_never_sees_half_an_appended_answer(imagenet, tmp_path):
    """Answers of about 8 KB (they cross page boundaries) appended while another thread reads the file over and over."""
    pairs = read_pairs(str(imagenet.build))
    answers = AnswerBook(str(tmp_path), pairs, None, NEEDED)
    reason = "é" * 2000
    answers.add("w", pairs[0], "background", 3, reason)
    [uri] = answer_files(str(tmp_path))
    done, problems, reads = threading.Event(), [], [0]

    def read_over_and_over() -> None:
        while not done.is_set():
            ledger = Ledger()
            ledger.read(uri)
            reads[0] += 1
            if ledger.rejected or any(a.reason != reason for a in ledger.accepted):
                problems.append((ledger.rejected[:1], len(ledger.accepted)))

    reader = threading.Thread(target=read_over_and_over)
    reader.start()
    try:
        for p in pairs[1:600]:
            answers.add("w", p, "background", 3, reason)
    finally:
        done.set()
        reader.join()
    assert problems == [] and reads[0] > 0
    with open(uri.removeprefix("file://"), newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 600
