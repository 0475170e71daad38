"""The annotation app at 30 and at 5,000 pairs: milliseconds to start it, render the index, find a
worker's next pair and store an answer (through HTTP with FastAPI's test client, and at the answer
book itself), on builds written by the scale test's own writer.

    python -m benchmarks.app
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from fastapi.testclient import TestClient

from benchmarks.common import environment, save
from salient.app import create_app, web
from salient.app.book import AnswerBook, read_pairs
from tests.salient.test_app_scale import _key, _settings, write_build


def _median_ms(run, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(classes: int, per_class: int, answers_before: int, repeats: int = 50) -> dict[str, float]:
    """Milliseconds to start the app, render the index, find a worker's next pair and store an answer, for
    a build of ``classes`` x ``per_class`` pairs with ``answers_before`` crowd answers (4 per pair from the
    start, so the pairs stay open); the next pair and the stored answer also at the book, without HTTP."""
    with tempfile.TemporaryDirectory() as tmp:
        build, root = Path(tmp) / "build", Path(tmp) / "out"
        pairs = write_build(build, classes, per_class)
        incoming = root / "annotations" / "incoming"
        incoming.mkdir(parents=True)
        with open(incoming / "crowd.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["WorkerId", "Input.class_index", "Input.feature_index", "Answer.main", "Answer.confidence", "Answer.reasons"])
            w.writerows([f"crowd{n % 4}", pairs[n // 4]["class_index"], pairs[n // 4]["feature_index"], "main_object", 3, "crowd"]
                        for n in range(answers_before))
        settings = _settings(build, root, needed=5)
        out = {"pairs": len(pairs), "answers before": answers_before}
        start = time.perf_counter()
        client = TestClient(create_app(settings))
        out["start (s)"] = time.perf_counter() - start
        tracemalloc.start()
        create_app(settings)
        out["start, peak Python memory (MB)"] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        out["GET / (ms)"] = _median_ms(lambda i: client.get("/"), repeats)
        out["GET /?q=tabby (ms)"] = _median_ms(lambda i: client.get("/?q=tabby"), repeats)
        shown = ",".join(_key(r) for r in pairs[:web.PAGE_SIZE])  # what a page of the index asks
        progress = {"worker_id": "crowd0", "pairs": shown}
        out["GET /api/progress, next pair (ms)"] = _median_ms(lambda i: client.get("/api/progress", params=progress), repeats)

        def post(i: int) -> None:
            r = pairs[-1 - i]
            body = {"worker_id": "me", "class_index": r["class_index"], "feature_index": r["feature_index"],
                    "answer": "background", "confidence": 3, "reason": "the sky"}
            assert client.post("/api/answers", json=body).status_code == 201

        stores = min(repeats, len(pairs) // 2)  # each to another pair
        out["POST /api/answers (ms)"] = _median_ms(post, stores)
        answers = AnswerBook(str(root), read_pairs(str(build)), None, 5)
        answers.refresh()
        out["book.next_pair (ms)"] = _median_ms(lambda i: answers.next_pair("crowd0"), repeats)
        add = lambda i: answers.add("book", answers.pairs[i], "background", 3, "the sky")  # noqa: E731
        out["book.add (ms)"] = _median_ms(add, stores)
        if len(pairs) > 1000 + repeats:  # the same worker's answers 1001 on, in one file
            for i in range(stores, 1000):
                add(i)
            out["book.add, after 1000 by the worker (ms)"] = _median_ms(lambda i: add(1000 + i), repeats)
        return out


def main() -> None:
    rows = [measure(*shape) for shape in ((6, 5, 0), (1000, 5, 0), (1000, 5, 19_000))]
    result = {"benchmark": "app", "builds": rows, "environment": environment()}
    names = list(dict.fromkeys(k for r in rows for k in r))
    md = "# The annotation app\n\n| | " + " | ".join(f"{r['pairs']:,} pairs, {r['answers before']:,} answers" for r in rows) + " |\n"
    md += "|---|" + "---|" * len(rows) + "\n"
    md += "".join(f"| {n} | " + " | ".join(f"{r[n]:,.3f}" if n in r else "" for r in rows) + " |\n" for n in names[2:])
    save("app", result, md)


if __name__ == "__main__":
    main()
