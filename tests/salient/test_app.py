"""The annotation app: API safety and validation, concurrent answers, the reviewer page, and a real
browser labelling pairs as two workers before `salient ingest` turns the answers into labels."""

import contextlib
import csv
import dataclasses
import http.client
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from salient import builds, config, discover, storage, world
from salient.app import AppSettings, check_access, create_app, web
from salient.errors import InputError
from tests.browser import broken_images, browser, console_errors, free_port, full_page_screenshot, serve_app  # noqa: F401
from tests.helpers import build_stages, make_checkpoint

BUILD_ID = "20260101T000000Z-abcdef"
PAPER_COLUMNS = [
    "WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Input.feature_rank",
    "Answer.main", "Answer.confidence", "Answer.reasons",
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def app_world(tmp_path_factory):
    """A demo world (3 classes x 8 images, 32 px), a build with discovery assets under OUT/builds/<id>
    that both pointers name, and a config file."""
    tmp = tmp_path_factory.mktemp("annotate")
    world.synthesize(str(tmp / "world"), classes=3, per_class=8, size=32, seed=0)
    ckpt = make_checkpoint(tmp / "tiny.pt", num_classes=3)
    root = str(tmp / "out")
    cfg = config.load(None, [
        f"dataset.root={tmp / 'world' / 'train'}", f"dataset.class_metadata={tmp / 'world' / 'classes.csv'}",
        f"model.checkpoint={ckpt}", "model.arch=tiny_resnet", "model.format=robustness",
        "preprocess.resize=32", "preprocess.crop=32", f"output={root}",
        "compute.shard_size=10", "compute.gpus_per_worker=0", "aggregate.features_per_class=2",
        "aggregate.grouping=label", "discover.images_per_pair=3", "discover.attack_steps=3",
    ])
    build = build_stages(cfg, BUILD_ID, ["activations", "aggregate", "discover"])
    builds.write_pointer(root, "latest", BUILD_ID)
    builds.write_pointer(root, "current", BUILD_ID)
    path = tmp / "salient.yaml"
    path.write_text(config.to_yaml(cfg))
    tasks = list(csv.DictReader(open(os.path.join(build, "discover", "tasks.csv"))))
    classes = {int(r["class_index"]): r for r in csv.DictReader(open(tmp / "world" / "classes.csv"))}
    return SimpleNamespace(cfg=cfg, root=root, build=build, config=str(path), tasks=tasks, classes=classes)


def _settings(app_world, root, **kw) -> AppSettings:
    return AppSettings(root=str(root), build=app_world.build, build_id=BUILD_ID, resize=32, crop=32, **kw)


def _answer(task: dict, worker: str = "alice", **kw) -> dict:
    body = {
        "worker_id": worker, "class_index": int(task["class_index"]), "feature_index": int(task["feature_index"]),
        "answer": "background", "confidence": 4, "reason": "the red is on the backdrop",
    }
    return {**body, **kw}


def _incoming_rows(root) -> list[dict]:
    folder = os.path.join(str(root), "annotations", "incoming")
    rows = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".csv"):
            with open(os.path.join(folder, name), newline="") as fh:
                reader = csv.DictReader(fh)
                assert reader.fieldnames[:8] == PAPER_COLUMNS, name
                rows += [dict(r, _file=name) for r in reader]
    return rows


def _write_crowd(root, rows: list[list]) -> None:
    folder = os.path.join(str(root), "annotations", "incoming")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "crowd.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(PAPER_COLUMNS)
        w.writerows(rows)


def _crowd_row(task: dict, worker: str, answer: str, confidence: int = 3, reason: str = "crowd") -> list:
    return [worker, task["wnid"], task["class_index"], task["feature_index"], task["feature_rank"], answer, confidence, reason]


def test_answer_lands_in_incoming_in_the_papers_columns(app_world, tmp_path):
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    task = app_world.tasks[1]
    r = client.post("/api/answers", json=_answer(task, reason='line one\nsays "hi", =1+1'))
    assert r.status_code == 201, r.text
    assert r.json()["n_answers"] == 1 and r.json()["labelled_by_you"] == 1
    [row] = _incoming_rows(tmp_path)
    assert row["_file"].startswith("app-") and row["_file"].endswith("-alice.csv")
    assert (row["WorkerId"], row["Input.wordnet_id"], row["Input.class_index"], row["Input.feature_index"]) == (
        "alice", task["wnid"], task["class_index"], task["feature_index"])
    assert (row["Input.feature_rank"], row["Answer.main"], row["Answer.confidence"]) == (task["feature_rank"], "background", "4")
    assert row["Answer.reasons"] == 'line one\nsays "hi", =1+1', "quotes, commas and newlines survive the CSV"
    assert row["SubmitTime"].endswith("+00:00")

    second = client.post("/api/answers", json=_answer(app_world.tasks[2], reason="=HYPERLINK()"))
    assert second.status_code == 201
    rows = _incoming_rows(tmp_path)
    assert len(rows) == 2 and len({r["_file"] for r in rows}) == 1, "one file per worker, appended to"
    assert rows[1]["Answer.reasons"] == "'=HYPERLINK()", "a formula-like reason is defused for spreadsheets"


# The hostile answer bodies of the corpus: one field of a valid answer replaced, and the status due.
BAD_BODIES = [
    (b["field"], b["value"], b["status"])
    for b in json.loads((Path(__file__).parents[1] / "hostile" / "requests" / "answer_bodies.json").read_text())["bodies"]
]


@pytest.mark.parametrize(("field", "value", "status"), BAD_BODIES)
def test_invalid_answers_are_refused_and_write_nothing(app_world, tmp_path, field, value, status):
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    r = client.post("/api/answers", json=_answer(app_world.tasks[0], **{field: value}))
    assert r.status_code == status, (field, value, r.text)
    assert any(field in d["loc"] for d in r.json()["detail"]), r.json()
    assert _incoming_rows(tmp_path) == []


def test_tabs_and_line_breaks_stay_in_reasons(app_world, tmp_path):
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    r = client.post("/api/answers", json=_answer(app_world.tasks[0], reason="red:\tthe sky\r\nand the sea é"))
    assert r.status_code == 201, r.text
    assert _incoming_rows(tmp_path)[0]["Answer.reasons"] == "red:\tthe sky\nand the sea é", "CRLF is stored as LF"
    control = client.post("/api/answers", json=_answer(app_world.tasks[1], reason="a\x85b"))
    assert "U+0085" in control.json()["detail"][0]["msg"]


def test_unknown_pairs_extra_fields_and_non_json_are_refused(app_world, tmp_path):
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    task = app_world.tasks[0]
    known = {(int(t["class_index"]), int(t["feature_index"])) for t in app_world.tasks}
    missing_feature = next(j for j in range(1000) if (int(task["class_index"]), j) not in known)
    for body in (_answer(task, class_index=99), _answer(task, feature_index=missing_feature)):
        r = client.post("/api/answers", json=body)
        assert r.status_code == 422 and "not a pair of build" in r.json()["detail"][0]["msg"]
    body = _answer(task)
    del body["reason"]
    assert client.post("/api/answers", json=body).status_code == 422, "a reason is required"
    assert client.post("/api/answers", json={**_answer(task), "admin": True}).status_code == 422
    for raw in (b"{not json", b"[1, 2]", b'"text"', b""):
        assert client.post("/api/answers", content=raw, headers={"Content-Type": "application/json"}).status_code == 422
    form = client.post("/api/answers", data={"worker_id": "alice"})
    assert form.status_code == 415, "a cross-site HTML form cannot post answers"
    assert client.get("/pairs/abc/1").status_code == 422
    assert client.get(f"/pairs/99/{task['feature_index']}").status_code == 404
    assert client.get("/api/progress", params={"worker_id": "../x"}).status_code == 422
    assert _incoming_rows(tmp_path) == []


def test_bodies_over_64_kib_are_413(app_world, tmp_path):
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    task = app_world.tasks[0]
    exact = json.dumps(_answer(task)).encode()
    exact += b" " * (64 * 1024 - len(exact))
    assert len(exact) == 65536
    assert client.post("/api/answers", content=exact, headers={"Content-Type": "application/json"}).status_code == 201
    over = exact + b" "
    r = client.post("/api/answers", content=over, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    huge = client.post("/api/answers", content=b"{" + b" " * 10_000_000 + b"}", headers={"Content-Type": "application/json"})
    assert huge.status_code == 413

    def chunks():  # no Content-Length: the body is counted as it streams in
        for _ in range(20):
            yield b" " * 4096
    streamed = client.post("/api/answers", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert client.post("/api/answers", content=b"{}", headers={"Content-Type": "application/json", "Content-Length": "70000"}).status_code == 413
    assert len(_incoming_rows(tmp_path)) == 1


def _raw_request(base: str, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    """``method path`` exactly as written (no client-side normalisation of ``..``, ``//`` or escapes)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}


def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    status, body, _ = _raw_request(base, "GET", path)
    return status, body


def test_nothing_outside_the_build_assets_is_served(app_world, tmp_path):
    secret = os.path.join(app_world.build, "discover", "secret.txt")
    with open(secret, "w") as fh:
        fh.write("SECRET-CONTENT")
    task = app_world.tasks[0]
    asset = f"{task['wnid']}/feature_{task['feature_index']}/images.png"
    attempts = [
        "/assets/../../etc/passwd", "/assets/..%2F..%2F..%2Fetc%2Fpasswd", "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/assets/%2e%2e%2f%2e%2e%2fsalient.yaml", "/assets//etc/passwd", "/assets/%2Fetc%2Fpasswd",
        "/assets/secret.txt", f"/assets/{task['wnid']}/feature_{task['feature_index']}/assets.json",
        f"/assets/{task['wnid']}/feature_{task['feature_index']}/../../secret.txt",
        "/assets/" + asset.replace("/", "%5c"), "/static/../web.py", "/static/..%2fweb.py", "/static/%2e%2e/book.py",
        "/static/../../../../etc/passwd", "/classes/..%2f..%2fsecret.txt/examples.png", "/assets/%00",
    ]
    try:
        with serve_app(create_app(_settings(app_world, tmp_path))) as base:
            ok, png = _raw_get(base, f"/assets/{asset}")
            assert ok == 200 and png.startswith(b"\x89PNG")
            for path in attempts:
                status, body = _raw_get(base, path)
                assert status in (400, 404, 422), (path, status)
                assert b"SECRET-CONTENT" not in body and b"root:" not in body and b"import" not in body, path
    finally:
        os.remove(secret)


def test_queue_refuses_repeats_and_full_pairs(app_world, tmp_path):
    client = TestClient(create_app(_settings(app_world, tmp_path, min_answers=2)))
    first, second = app_world.tasks[0], app_world.tasks[1]
    url = f"/pairs/{first['class_index']}/{first['feature_index']}"
    assert client.post("/api/answers", json=_answer(first, "alice")).status_code == 201
    again = client.post("/api/answers", json=_answer(first, "alice", answer="main_object"))
    assert again.status_code == 409 and "already labelled" in again.json()["detail"]
    r = client.post("/api/answers", json=_answer(first, "bob"))
    assert r.status_code == 201 and r.json()["n_answers"] == 2
    assert r.json()["next"] == f"/pairs/{second['class_index']}/{second['feature_index']}"
    full = client.post("/api/answers", json=_answer(first, "carol"))
    assert full.status_code == 409 and "out of the queue" in full.json()["detail"]
    carol = client.get("/api/progress", params={"worker_id": "carol"}).json()
    assert carol["labelled_by_you"] == 0 and carol["next"] != url and carol["open"] == len(app_world.tasks) - 1
    alice = client.get("/api/progress", params={"worker_id": "alice"}).json()
    assert alice["labelled_by_you"] == 1 and alice["answered"] == [f"{first['class_index']}/{first['feature_index']}"]
    rows = _incoming_rows(tmp_path)
    assert sorted(r["WorkerId"] for r in rows) == ["alice", "bob"], "refused answers are not written"


def test_concurrent_answers_are_all_kept(app_world, tmp_path):
    """60 answers posted at once by 10 workers to 6 pairs needing 5 each: exactly 30 land, none lost."""
    app = create_app(_settings(app_world, tmp_path, min_answers=5))
    with serve_app(app) as base:
        def post(job):
            worker, task = job
            req = urllib.request.Request(
                f"{base}/api/answers", data=json.dumps(_answer(task, worker, reason=f"by {worker}")).encode(),
                headers={"Content-Type": "application/json"}, method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        jobs = [(f"w{i}", t) for t in app_world.tasks for i in range(10)]
        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = list(pool.map(post, jobs))
    assert sorted(set(statuses)) == [201, 409] and statuses.count(201) == 5 * len(app_world.tasks)
    rows = _incoming_rows(tmp_path)
    assert len(rows) == statuses.count(201)
    per_pair = {}
    for r in rows:
        per_pair.setdefault((r["Input.class_index"], r["Input.feature_index"]), set()).add(r["WorkerId"])
    assert sorted(len(w) for w in per_pair.values()) == [5] * len(app_world.tasks)
    assert all(r["Answer.reasons"] == f"by {r['WorkerId']}" for r in rows)


def test_review_page_votes_labels_kappa_and_escaping(app_world, tmp_path):
    a, b, c = app_world.tasks[:3]
    _write_crowd(tmp_path, [
        *[_crowd_row(a, f"m{i}", "main_object") for i in range(4)], _crowd_row(a, "m4", "background"),
        _crowd_row(b, "m0", "separate_object"), *[_crowd_row(b, f"m{i}", "background") for i in range(1, 5)],
        _crowd_row(c, "m0", "main_object", reason="<b>bold</b> & <script>alert(1)</script>"),
        _crowd_row(c, "m1", "nonsense"),  # rejected by ingest's row check, so not counted
    ])
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    page = client.get("/review")
    assert page.status_code == 200
    html_text = page.text
    # a: main 4, background 1 -> core; b: separate 1, background 4 -> spurious (background);
    # kappa over a and b: P = 0.6, P_e = 0.4^2 + 0.1^2 + 0.5^2 = 0.42, kappa = 0.18 / 0.58 = 0.310.
    assert '<b id="kappa">0.310</b>' in html_text and '<span id="kappa-pairs">2</span>' in html_text
    assert "spurious 1, core 1, insufficient 4" in html_text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "<script>alert" not in html_text and "<b>bold" not in html_text
    assert "1 rows of the answer files are invalid" in html_text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_task_page_shows_the_class_and_its_examples(app_world, tmp_path):
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    task = app_world.tasks[0]
    info = app_world.classes[int(task["class_index"])]
    page = client.get(f"/pairs/{task['class_index']}/{task['feature_index']}")
    assert page.status_code == 200
    for text in (info["synset"], info["gloss"], info["supercategory"], task["wnid"]):
        assert text and text in page.text
    for strip in discover.STRIPS:
        assert f'src="/assets/{task["wnid"]}/feature_{task["feature_index"]}/{strip}.png"' in page.text
    examples = client.get(f"/classes/{task['class_index']}/examples.png")
    assert examples.status_code == 200
    with Image.open(io.BytesIO(examples.content)) as im:
        assert im.size == (5 * 32 + 4 * 2, 32), "five of the class's 8 images, 32 px, 2 px apart"
    assert client.get("/classes/99/examples.png").status_code == 404


def test_token_and_host_rules(app_world, tmp_path):
    token = "s3cret-token-of-24-chars"
    client = TestClient(create_app(_settings(app_world, tmp_path, token=token)))
    task = app_world.tasks[0]
    assert client.get("/").status_code == 401
    assert client.post("/api/answers", json=_answer(task)).status_code == 401
    assert client.get("/", headers={"X-Salient-Token": "wrong-token-wrong-token"}).status_code == 401
    assert client.get("/", headers={"X-Salient-Token": token}).status_code == 200
    assert client.post("/api/answers", json=_answer(task), headers={"Authorization": f"Bearer {token}"}).status_code == 201
    in_url = client.get(f"/review?token={token}", follow_redirects=False)
    assert in_url.status_code == 401 and "set-cookie" not in in_url.headers, "a token in a URL is not accepted"
    assert 'action="/login"' in in_url.text and token not in in_url.text, "the login form, without the token"
    assert client.post(f"/api/answers?token={token}", json=_answer(task)).status_code == 401
    wrong = client.post("/login", data={"token": "wrong-token-wrong-token", "next": "/review"}, follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers and "not the token" in wrong.text
    assert client.post("/login", json={"token": token}).status_code == 415
    r = client.post("/login", data={"token": token, "next": "/review"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/review").status_code == 200, "the cookie carries the token from then on"
    assert len(_incoming_rows(tmp_path)) == 1

    with pytest.raises(InputError, match="SALIENT_APP_TOKEN"):
        check_access("0.0.0.0", None)
    with pytest.raises(InputError, match="at least 16"):
        check_access("0.0.0.0", "short")
    check_access("0.0.0.0", token)
    check_access("127.0.0.1", None)
    check_access("localhost", None)

    guarded = TestClient(create_app(_settings(app_world, tmp_path, allowed_hosts=("127.0.0.1", "localhost"))))
    assert guarded.get("/", headers={"Host": "evil.example"}).status_code == 400, "DNS rebinding is refused"
    assert guarded.get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert guarded.get("/", headers={"Host": "127.0.0.1.evil.example"}).status_code == 400
    v6 = TestClient(create_app(_settings(app_world, tmp_path, allowed_hosts=("127.0.0.1", "localhost", "::1"))))
    for host in ("[::1]:8000", "[::1]", "LOCALHOST:8000"):
        assert v6.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("::1", "[::1].evil.example", "[::2]:8000", ""):
        assert v6.get("/", headers={"Host": host}).status_code == 400, host


@pytest.mark.parametrize("target", [
    "//evil.example/", "/\\evil.example/", "https://evil.example/", "evil.example", "/\t/evil.example", "/\n/evil.example", " //evil.example", "",
])
def test_the_login_redirects_only_to_paths_of_this_site(app_world, tmp_path, target):
    token = "s3cret-token-of-24-chars"
    client = TestClient(create_app(_settings(app_world, tmp_path, token=token)))
    r = client.post("/login", data={"token": token, "next": target}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/", (target, r.headers["location"])


def test_no_redirect_leaves_the_site(app_world, tmp_path):
    """`GET //evil.example/?token=T` once answered 303 to `//evil.example/`, which a browser reads as another host."""
    token = "s3cret-token-of-24-chars"
    for settings in (_settings(app_world, tmp_path, token=token), _settings(app_world, tmp_path)):
        with serve_app(create_app(settings)) as base:
            for path in (f"//evil.example/?token={token}", f"//evil.example/review?token={token}", "/review/", "//evil.example/"):
                status, _, headers = _raw_request(base, "GET", path)
                location = headers.get("location", "")
                assert not 300 <= status < 400 or (location.startswith("/") and not location.startswith("//")), (path, status, location)
                assert status in (401, 404), (path, status)


def test_serve_command_refuses_open_hosts_and_unknown_builds(app_world, capsys, monkeypatch):
    from salient import cli

    monkeypatch.delenv("SALIENT_APP_TOKEN", raising=False)
    assert cli.main(["annotate", "serve", app_world.config, "--host", "0.0.0.0"]) == 2
    assert "--token or the environment variable SALIENT_APP_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("SALIENT_APP_TOKEN", "short")
    assert cli.main(["annotate", "serve", app_world.config, "--host", "0.0.0.0"]) == 2
    assert "use at least 16" in capsys.readouterr().err
    assert cli.main(["annotate", "serve", app_world.config, "--build", "no-such-build"]) == 2
    assert "build 'no-such-build' does not exist" in capsys.readouterr().err


def _wait_for_server(base: str, proc: subprocess.Popen, log: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`salient annotate serve` exited with {proc.returncode}:\n{open(log).read()}")
        try:
            with urllib.request.urlopen(base + "/", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"`salient annotate serve` did not answer within {timeout:g} s:\n{open(log).read()}")


def _label(driver, base: str, task: dict, answer: str, confidence: int, reason: str, worker: str | None, screenshot: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/pairs/{task['class_index']}/{task['feature_index']}")
    assert broken_images(driver) == [], "every strip and the class's examples load"
    driver.find_element(By.CSS_SELECTOR, f'input[name="answer"][value="{answer}"]').click()
    driver.find_element(By.CSS_SELECTOR, f'input[name="confidence"][value="{confidence}"]').click()
    driver.find_element(By.ID, "reason").send_keys(reason)
    row = driver.find_element(By.ID, "worker-row")
    if worker is not None:
        assert row.is_displayed(), "the worker id is asked on the first submit"
        assert not driver.find_element(By.ID, "change-worker").is_displayed()
        driver.find_element(By.ID, "worker-id").send_keys(worker)
    else:
        assert not row.is_displayed(), "the worker id is remembered in the browser"
    if screenshot:
        full_page_screenshot(driver, screenshot)
    driver.find_element(By.ID, "submit").click()


def _wait_url(driver, url: str) -> None:
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(ec.url_to_be(url), f"expected {url}, at {driver.current_url}")


def _wait_text(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(ec.text_to_be_present_in_element((By.ID, element_id), text))


INJECTION = '<script>window.pwned = 1; document.title = "pwned"</script><img src="x" onerror="window.pwned = 2">it <b>is</b> red'


def test_two_workers_label_in_a_browser_and_ingest_labels(app_world, browser, prefect_server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    root, tasks = app_world.root, app_world.tasks
    a, b, c = tasks[:3]
    url = lambda t: f"/pairs/{t['class_index']}/{t['feature_index']}"  # noqa: E731
    # Three crowd answers each for the first two pairs arrive by file, beside the app's answers.
    _write_crowd(root, [
        _crowd_row(a, "crowd1", "background"), _crowd_row(a, "crowd2", "background"), _crowd_row(a, "crowd3", "main_object"),
        _crowd_row(b, "crowd1", "main_object"), _crowd_row(b, "crowd2", "separate_object"), _crowd_row(b, "crowd3", "separate_object"),
    ])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = str(tmp_path / "serve.log")
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("SALIENT_APP_TOKEN", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "salient.cli", "annotate", "serve", app_world.config, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    screenshot = os.path.join(ROOT, "docs", "annotate-task.png") if os.environ.get("SALIENT_WRITE_SCREENSHOTS") == "1" else str(tmp_path / "annotate-task.png")
    os.makedirs(os.path.dirname(screenshot), exist_ok=True)
    driver = browser
    try:
        _wait_for_server(base, proc, log)
        driver.get(base + "/")
        console_errors(driver)
        _wait_text(driver, "progress", f"{len(tasks)} of {len(tasks)} pairs need answers")
        driver.find_element(By.ID, "start").click()
        _wait_url(driver, base + url(a))

        _label(driver, base, a, "background", 4, "the red covers the textured backdrop", "alice", screenshot)
        _wait_url(driver, base + url(b))
        _label(driver, base, b, "separate_object", 3, "a small object beside the shape", None)
        _wait_url(driver, base + url(c))
        _label(driver, base, c, "main_object", 5, "the shape itself", None)
        _wait_url(driver, base + url(tasks[3]))
        _wait_text(driver, "progress", f"3 of {len(tasks)} labelled by you")
        _wait_text(driver, "worker-name", "alice")

        driver.find_element(By.ID, "change-worker").click()
        _wait_text(driver, "worker-name", "not set")
        _label(driver, base, a, "main_object", 2, INJECTION, "bob")
        _wait_url(driver, base + url(b))  # a now has 5 answers and is out of the queue
        _label(driver, base, b, "main_object", 3, "the whole shape lights up", None)
        _wait_url(driver, base + url(c))
        _label(driver, base, c, "background", 1, "hard to say, mostly backdrop", None)
        _wait_url(driver, base + url(tasks[3]))
        _wait_text(driver, "progress", f"3 of {len(tasks)} labelled by you")

        driver.get(base + "/")
        _wait_text(driver, "progress", f"3 of {len(tasks)} labelled by you")
        row_a = driver.find_element(By.CSS_SELECTOR, f'tr[data-pair="{a["class_index"]}/{a["feature_index"]}"]')
        assert "done" in row_a.get_attribute("class") and "5 / 5" in row_a.text and "labelled" in row_a.text
        Select(driver.find_element(By.ID, "filter-state")).select_by_value("mine")  # needs the id this browser keeps
        driver.find_element(By.CSS_SELECTOR, "#filters button").click()
        _wait_url(driver, base + "/?q=&state=mine&worker=bob")
        shown = [r.get_attribute("data-pair") for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-pair]")]
        assert shown == [f"{t['class_index']}/{t['feature_index']}" for t in (a, b, c)], "the pairs bob labelled"

        driver.get(base + "/review")
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-pair="{a["class_index"]}/{a["feature_index"]}"]')
        shown = [e.text for e in row.find_elements(By.CSS_SELECTOR, ".reason")]
        assert INJECTION in shown, "the reason is shown as the text it is"
        assert driver.execute_script("return window.pwned === undefined && document.querySelectorAll('img[src=\"x\"], .reason script, .reason b').length === 0")
        assert driver.title != "pwned"
        # a: background, background, main (crowd) + alice background + bob main; b: main, separate,
        # separate (crowd) + alice separate + bob main. Kappa over a [2, 0, 3] and b [2, 3, 0]:
        # P = 0.4, P_e = 0.4^2 + 0.3^2 + 0.3^2 = 0.34, kappa = 0.06 / 0.66 = 0.091.
        assert driver.find_element(By.ID, "kappa").text == "0.091"
        assert console_errors(driver) == []
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    with Image.open(screenshot) as im:
        assert im.size[0] >= 1000
    rows = [r for r in _incoming_rows(root) if r["_file"].startswith("app-")]
    got = sorted((r["WorkerId"], r["Input.class_index"], r["Input.feature_index"], r["Input.wordnet_id"], r["Answer.main"], r["Answer.confidence"], r["Answer.reasons"]) for r in rows)
    want = sorted([
        ("alice", a["class_index"], a["feature_index"], a["wnid"], "background", "4", "the red covers the textured backdrop"),
        ("alice", b["class_index"], b["feature_index"], b["wnid"], "separate_object", "3", "a small object beside the shape"),
        ("alice", c["class_index"], c["feature_index"], c["wnid"], "main_object", "5", "the shape itself"),
        ("bob", a["class_index"], a["feature_index"], a["wnid"], "main_object", "2", INJECTION),
        ("bob", b["class_index"], b["feature_index"], b["wnid"], "main_object", "3", "the whole shape lights up"),
        ("bob", c["class_index"], c["feature_index"], c["wnid"], "background", "1", "hard to say, mostly backdrop"),
    ])
    assert got == want

    from salient import cli

    assert cli.main(["ingest", app_world.config]) == 0
    labels_uri = storage.join(builds.resolve(root, pointer="current"), "annotations", "labels.parquet")
    labels = {(r["class_index"], r["feature_index"]): r for r in storage.read_parquet(labels_uri).to_pylist()}
    key = lambda t: (int(t["class_index"]), int(t["feature_index"]))  # noqa: E731
    assert (labels[key(a)]["votes_main_object"], labels[key(a)]["votes_separate_object"], labels[key(a)]["votes_background"]) == (2, 0, 3)
    assert (labels[key(a)]["label"], labels[key(a)]["kind"]) == ("spurious", "background")
    assert (labels[key(b)]["votes_main_object"], labels[key(b)]["votes_separate_object"], labels[key(b)]["votes_background"]) == (2, 3, 0)
    assert (labels[key(b)]["label"], labels[key(b)]["kind"]) == ("spurious", "separate_object")
    assert (labels[key(c)]["n_answers"], labels[key(c)]["label"]) == (2, "insufficient")
    assert all(labels[key(t)]["label"] == "insufficient" and labels[key(t)]["n_answers"] == 0 for t in tasks[3:])


@contextlib.contextmanager
def _running(server) -> Iterator[None]:
    """Run a ``uvicorn.Server`` made by ``web.server`` in a thread until the block ends."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(30)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _logged(*names: str) -> Iterator[_Records]:
    """Every record logged to the loggers ``names`` (each set to INFO) while the block runs."""
    handler, loggers = _Records(), [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_the_access_log_shows_no_token_nor_query(app_world, tmp_path):
    token = "s3cret-token-of-24-chars"
    port = free_port()
    server = web.server(_settings(app_world, tmp_path, token=token), "127.0.0.1", port)
    with _logged("uvicorn.access") as log, _running(server):
        base = f"http://127.0.0.1:{port}"
        for path in (f"/review?token={token}", f"/?next=1&token={token}", "/api/progress?worker_id=x%0a127.0.0.1%20-%20GET"):
            assert _raw_request(base, "GET", path)[0] == 401
    lines = [r.getMessage() for r in log.records]
    assert len(lines) == 3, lines
    assert all(token not in line and "\n" not in line for line in lines), lines
    assert '"GET /review?[redacted] HTTP/1.1" 401' in lines[0] and "/api/progress?[redacted]" in lines[2]


def test_strips_are_regular_files_inside_the_build(app_world, tmp_path):
    """A link in discover/ (to a file outside, or a folder on the way), a folder and a pipe in place of a
    listed strip are 404, never served nor a 500."""
    build = tmp_path / "build"
    shutil.copytree(app_world.build, build, symlinks=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG SECRET-CONTENT")
    first, second = app_world.tasks[0], app_world.tasks[1]
    folder = lambda t: build / "discover" / t["wnid"] / f"feature_{t['feature_index']}"  # noqa: E731
    url = lambda t, strip: f"/assets/{t['wnid']}/feature_{t['feature_index']}/{strip}.png"  # noqa: E731
    (folder(first) / "images.png").unlink()
    (folder(first) / "images.png").symlink_to(outside)
    (folder(first) / "heatmaps.png").unlink()
    (folder(first) / "heatmaps.png").mkdir()
    (folder(first) / "attacks.png").unlink()
    os.mkfifo(folder(first) / "attacks.png")
    moved = tmp_path / "moved"
    shutil.move(folder(second), moved)
    folder(second).symlink_to(moved)
    settings = dataclasses.replace(_settings(app_world, tmp_path), build=str(build))
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    third = app_world.tasks[2]
    ok = client.get(url(third, "images"))
    assert ok.status_code == 200 and ok.content.startswith(b"\x89PNG")
    for path in (url(first, "images"), url(first, "heatmaps"), url(first, "attacks"), url(second, "images")):
        r = client.get(path)
        assert r.status_code == 404 and b"SECRET-CONTENT" not in r.content, (path, r.status_code)
        assert "not a regular file" in r.json()["detail"]


def _can_bind_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_bind_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_loopback_answers_its_own_url(app_world, tmp_path):
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    with _running(web.server(_settings(app_world, tmp_path), "::1", port)):
        with urllib.request.urlopen(f"http://[::1]:{port}/", timeout=10) as resp:
            assert resp.status == 200, "the URL the app prints"
        conn = http.client.HTTPConnection("::1", port, timeout=10)
        conn.request("GET", "/", headers={"Host": "evil.example"})
        assert conn.getresponse().status == 400, "other Host names are still refused"
        conn.close()


def _stall(port: int, data: bytes, host: str = "127.0.0.1") -> tuple[float, bytes]:
    """Send ``data``, then wait: the seconds until the server closes the connection, and what it sent."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=8) as conn:
        conn.sendall(data)
        got = b""
        while chunk := conn.recv(4096):
            got += chunk
    return time.monotonic() - start, got


def test_stalled_headers_and_bodies_are_dropped(app_world, tmp_path):
    token = "s3cret-token-of-24-chars"
    port = free_port()
    server = web.server(_settings(app_world, tmp_path, token=token, read_timeout_s=1.0), "127.0.0.1", port)
    head = f"Host: 127.0.0.1\r\nX-Salient-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with _running(server):
        took, got = _stall(port, b"")
        assert took < 4 and got == b"", "a connection that sends nothing"
        took, got = _stall(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sal")
        assert took < 4 and got == b"", "headers that stop half way"
        took, got = _stall(port, f"POST /api/answers HTTP/1.1\r\n{head}{{".encode())
        assert took < 4 and got.startswith(b"HTTP/1.1 408 "), "a body stalled at 1 of 100 bytes"
        form = head.replace("application/json", "application/x-www-form-urlencoded")
        took, got = _stall(port, f"POST /login HTTP/1.1\r\n{form}token=".encode())
        assert took < 4 and got.startswith(b"HTTP/1.1 408 ")
        took, got = _stall(port, f"GET /api/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Salient-Token: {token}\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 200 ") and 0.5 < took < 4, "a kept-alive connection is closed once idle"
    assert _incoming_rows(tmp_path) == []


def test_a_client_leaving_mid_answer_is_one_info_line(app_world, tmp_path):
    with _logged("uvicorn", "uvicorn.error", "salient.app.web") as log:
        with serve_app(create_app(_settings(app_world, tmp_path))) as base:
            port = int(base.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=8) as conn:
                conn.sendall(b"POST /api/answers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{")
                time.sleep(0.3)
            time.sleep(1.0)
    worse = [r.getMessage() for r in log.records if r.levelno > logging.INFO]
    assert worse == [], worse
    left = [r for r in log.records if "left" in r.getMessage()]
    assert len(left) == 1 and left[0].levelno == logging.INFO and left[0].exc_info is None
    assert _incoming_rows(tmp_path) == []


def test_serve_right_after_discover_names_the_unpublished_build(app_world, tmp_path, capsys, monkeypatch):
    from salient import cli

    root = tmp_path / "out"
    shutil.copytree(app_world.build, root / "builds" / BUILD_ID)
    builds.write_pointer(str(root), "current", BUILD_ID)  # as `salient discover` leaves it: nothing published
    monkeypatch.delenv("SALIENT_APP_TOKEN", raising=False)
    assert cli.main(["annotate", "serve", app_world.config, "--set", f"output={root}"]) == 2
    err = capsys.readouterr().err
    assert "no published build" in err and f"--build {BUILD_ID}" in err, err
    assert cli.main(["annotate", "serve", app_world.config, "--read-timeout", "nan"]) == 2
    assert "--read-timeout nan" in capsys.readouterr().err


def test_the_login_form_in_a_browser(app_world, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    token = "s3cret-token-of-24-chars"
    driver = browser
    with serve_app(create_app(_settings(app_world, tmp_path, token=token))) as base:
        driver.delete_all_cookies()
        driver.get(base + "/review")
        driver.find_element(By.ID, "token").send_keys("wrong-token-wrong-token")
        driver.find_element(By.ID, "enter").click()
        _wait_text(driver, "wrong", "not the token")
        console_errors(driver)  # the two 401 pages so far
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "enter").click()
        _wait_url(driver, base + "/review")
        driver.find_element(By.ID, "kappa")  # the review page itself
        [cookie] = driver.get_cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert token not in driver.current_url and console_errors(driver) == []
        driver.delete_all_cookies()


def _exchange(port: int, parts: list[bytes]) -> bytes:
    """Send ``parts`` on one connection, a moment apart, then read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=8) as conn:
        for part in parts:
            try:
                conn.sendall(part)
            except (BrokenPipeError, ConnectionResetError):  # refused before the rest was sent
                break
            time.sleep(0.05)
        got = b""
        try:
            while chunk := conn.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got


def test_too_many_or_too_large_headers_are_refused(app_world, tmp_path):
    port = free_port()
    get = b"GET /api/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    many = b"".join(b"X-Filler-%d: v\r\n" % i for i in range(5000))  # about 65 KB
    cookie = b"Cookie: salient_token=" + b"a" * 37_000 + b"\r\n"
    fine = b"".join(b"X-Filler-%d: v\r\n" % i for i in range(web.MAX_HEADERS - 3)) + b"Cookie: a=" + b"b" * 8000 + b"\r\n"
    with _running(web.server(_settings(app_world, tmp_path), "127.0.0.1", port)):
        for name, extra in (("5,000 headers", many), ("a 37 KB cookie", cookie), ("101 headers", many[: many.index(b"X-Filler-99:")])):
            got = _exchange(port, [get + extra + b"\r\n"])
            assert got.startswith(b"HTTP/1.1 431 "), (name, got[:200])
            assert b"at most 100 headers" in got
        # the same, arriving a piece at a time: h11 stops reading them past the limit
        pieces = [get] + [cookie[k : k + 4096] for k in range(0, len(cookie), 4096)] + [b"\r\n"]
        got = _exchange(port, pieces)
        assert got.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), got[:200]
        got = _exchange(port, [get + fine + b"\r\n"])
        assert got.startswith(b"HTTP/1.1 200 "), ("100 headers of about 9 KB pass", got[:200])
    assert _incoming_rows(tmp_path) == []


def test_worker_ids_follow_the_identity_rule_of_answer_files(app_world, tmp_path):
    first, second = app_world.tasks[0], app_world.tasks[1]
    _write_crowd(tmp_path, [_crowd_row(second, "CAROL", "background")])
    client = TestClient(create_app(_settings(app_world, tmp_path)))
    assert client.post("/api/answers", json=_answer(first, "ALICE")).status_code == 201
    again = client.post("/api/answers", json=_answer(first, "alice", answer="background"))
    assert again.status_code == 409 and "'alice' already labelled" in again.json()["detail"]
    alice = client.get("/api/progress", params={"worker_id": "Alice"}).json()
    assert alice["labelled_by_you"] == 1 and alice["answered"] == [f"{first['class_index']}/{first['feature_index']}"]
    carol = client.get("/api/progress", params={"worker_id": "carol"}).json()
    assert carol["answered"] == [f"{second['class_index']}/{second['feature_index']}"], "the crowd file's CAROL is carol"
    assert client.post("/api/answers", json=_answer(second, "Carol")).status_code == 409
    assert [r["WorkerId"] for r in _incoming_rows(tmp_path) if r["WorkerId"] != "CAROL"] == ["alice"]
