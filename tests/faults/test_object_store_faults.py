"""Object-storage faults during whole builds on S3 (the SeaweedFS test server): the server stopped
for seconds mid-build and started again, and a share of requests failing behind a proxy. Either
way the build completes with exactly the clean build's tables."""

from __future__ import annotations

import http.client
import http.server
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from salient import builds, storage
from tests.faults import assert_same_tables, build_tables, fault_config, spawn_run, wait_run, write_config
from tests.s3server import outage

OUTAGE_S = 8.0  # longer than botocore's own retries of a refused connection (about 8 s)
FAULT_SHARE = 0.1
PROXY_LIFETIME_S = 900.0


def _copy_world_to_s3(reference, s3_server) -> str:
    base = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    storage.copy_tree(reference.world, f"{base}/world")
    return base


@pytest.mark.heavy
def test_s3_server_down_mid_build_then_back(reference, s3_server, ray_session, prefect_server, tmp_path):
    from flows.rebuild import rebuild_flow

    base = _copy_world_to_s3(reference, s3_server)
    cfg = fault_config(f"{base}/world", reference.checkpoint, f"{base}/out")
    committed_shards = f"{s3_server.bucket}/{base.rsplit('/', 1)[1]}/out/cache/activations"
    seen: dict[str, float] = {}

    def take_the_server_down_once_a_shard_is_in() -> None:
        with s3_server.filesystem() as fs:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not any(p.endswith(".json") for p in fs.find(committed_shards)):
                fs.invalidate_cache()
                time.sleep(0.05)
        seen["down"] = time.monotonic()
        with outage(s3_server):
            time.sleep(OUTAGE_S)
        seen["up"] = time.monotonic()

    saboteur = threading.Thread(target=take_the_server_down_once_a_shard_is_in, daemon=True)
    saboteur.start()
    result = rebuild_flow(cfg)
    finished = time.monotonic()
    saboteur.join(timeout=120)

    assert "up" in seen and seen["down"] < seen["up"] < finished, "the server went down and came back while the build ran"
    assert result["published"] and builds.read_pointer(cfg.output, "latest") == result["build_id"]
    assert result["stages"]["activations"]["images"] == 24 and result["stages"]["activations"]["failed"] == 0
    assert_same_tables(build_tables(cfg.output, result["build"]), reference.tables)


class FlakyProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that fails a seeded share of the
    requests, in turn: 503 SlowDown, 500 InternalError, the connection dropped before the request
    reaches the store, and the connection dropped after the store carried it out (a lost answer).
    It stops after ``lifetime_s`` at the latest."""

    daemon_threads = True
    # Workers read many objects at once, as they do from S3; the default backlog of 5 would refuse
    # connections beyond the seeded faults.
    request_queue_size = 256

    def __init__(self, upstream: str, share: float, seed: int = 0, lifetime_s: float = PROXY_LIFETIME_S) -> None:
        super().__init__(("127.0.0.1", 0), _RelayHandler)
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.share, self.rng, self.lock = share, random.Random(seed), threading.Lock()
        self.requests, self.faults = 0, Counter()
        self._timer = threading.Timer(lifetime_s, self.shutdown)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.rng.random() >= self.share:
                return None
            kind = ("503", "500", "drop", "lost")[sum(self.faults.values()) % 4]
            self.faults[kind] += 1
            return kind

    @contextmanager
    def running(self) -> Iterator[FlakyProxy]:
        thread = threading.Thread(target=self.serve_forever, name="flaky-proxy", daemon=True)
        thread.start()
        self._timer.start()
        try:
            yield self
        finally:
            self._timer.cancel()
            self.shutdown()
            self.server_close()
            thread.join(timeout=10)


_ERRORS = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


class _RelayHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FlakyProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base class's name
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._body()
        fault = self.server.fault()
        if fault == "drop":
            self.close_connection = True
            return
        if fault in _ERRORS:
            status, reason, code, message = _ERRORS[fault]
            payload = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "transfer-encoding", "connection")}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fault == "lost":
            self.close_connection = True
            return
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay


@pytest.mark.heavy
def test_a_share_of_store_requests_failing(reference, s3_server, prefect_server, tmp_path):
    base = _copy_world_to_s3(reference, s3_server)
    cfg = fault_config(f"{base}/world", reference.checkpoint, f"{base}/out")
    path = write_config(cfg, str(tmp_path / "salient.yaml"))
    log = tmp_path / "run.log"
    with FlakyProxy(s3_server.endpoint_url, FAULT_SHARE).running() as proxy:
        proc = spawn_run(path, str(log), env={"AWS_ENDPOINT_URL": proxy.url})
        code = wait_run(proc)
    text = log.read_text()
    assert code == 0, text[-6000:]
    assert proxy.requests > 200 and sum(proxy.faults.values()) > 0.1 * proxy.requests, (proxy.requests, proxy.faults)
    assert all(proxy.faults[kind] > 5 for kind in ("503", "500", "drop", "lost")), f"every kind of fault, many times: {proxy.faults}"
    latest = builds.resolve(cfg.output)
    assert_same_tables(build_tables(cfg.output, latest), reference.tables)
