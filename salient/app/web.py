"""The annotation web app (FastAPI): people label a build's (class, feature) pairs in a browser.

Pages: ``/`` (the pairs and their progress, :data:`PAGE_SIZE` at a time, filtered by class and by
state), ``/pairs/{class}/{feature}`` (one task: the class, example images, the three strips and the
paper's three questions), ``/review`` (votes, labels and Fleiss' kappa; its table paged and filtered
as the index). ``POST /api/answers`` takes one answer as JSON and appends it under
``OUT/annotations/incoming/`` in the paper's columns; ``GET /api/progress`` says what a worker has
done and which pair is theirs next.

Safety: every text is escaped by the templates (autoescape) and a Content-Security-Policy allows
only this app's own script; only the build's discovery strips and one example strip per class are
served (by name, from the pairs of the build); answer bodies are limited to 64 KiB; ids are
validated against the build; text fields refuse control characters. With a token, every request
needs it (header ``X-Salient-Token``, ``Authorization: Bearer``, or the HttpOnly cookie set by posting
it once to the ``/login`` form); a token in a URL is never accepted, and the access log shows no query
strings. Bound to a loopback address, requests must name a loopback host (no DNS rebinding); elsewhere a
token is required. Headers and bodies that do not arrive within ``read_timeout_s`` end the connection;
more than 100 headers or 16 KiB of them are a 431.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, quote, urlencode

import h11
import jinja2
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fsspec.implementations.local import LocalFileSystem
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from salient import builds, ingest, storage, tables
from salient.agreement import fleiss_kappa
from salient.answers import ANSWERS, CONFIDENCE_MAX, CONFIDENCE_MIN, CONTROL, MAX_ID, worker_identity
from salient.app.book import STATES, AnswerBook, Conflict, Pair, read_pairs
from salient.app.examples import ClassExamples
from salient.config import Config
from salient.errors import InputError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_LOGIN_BYTES = 4 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
READ_TIMEOUT_S = 10.0
MAX_REASON_CHARS = 2000
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "SALIENT_APP_TOKEN"
TOKEN_HEADER = "x-salient-token"
TOKEN_COOKIE = "salient_token"
WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
PAGE_SIZE = 100  # pairs on a page of the index and of the review
MAX_SEARCH_CHARS = 100
_NOT_IN_SEARCH = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PAIR_KEY = re.compile(r"([0-9]{1,10})/([0-9]{1,10})")
# Browsers drop tabs and line breaks from addresses and read a backslash as a slash: "/\t/evil" is "//evil".
_NOT_IN_NEXT = re.compile(r"[\\\x00-\x20\x7f-\x9f]")

_HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
ANSWER_TEXT = {
    "main_object": "main object",
    "separate_object": "separate object",
    "background": "background",
}


@dataclass(frozen=True)
class AppSettings:
    """Where the app reads and writes, and who may use it."""

    root: str  # the output root OUT: answers go to OUT/annotations/incoming/
    build: str  # the build directory whose discover/ assets are shown
    build_id: str
    min_answers: int = 5  # answers that take a pair out of the queue (annotations.min_answers)
    resize: int = 256
    crop: int = 224
    token: str | None = None
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted; None: any
    read_timeout_s: float = READ_TIMEOUT_S  # for a request's headers, and for its body


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host name of a Host header, lower case and without port or IPv6 brackets (``[::1]:80`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        return name if bracket and (not rest or rest.startswith(":")) else ""
    return header.partition(":")[0]


def safe_next(path: str) -> str:
    """``path`` when it is a path on this site (``/...``, not ``//host`` nor ``/\\host``), else ``/``."""
    if not path.startswith("/") or path.startswith("//") or _NOT_IN_NEXT.search(path):
        return "/"
    return quote(path, safe="/-._~")


def check_access(host: str, token: str | None) -> None:
    """:class:`InputError` unless the app may listen on ``host`` with ``token``: off loopback, a token is required."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise InputError(
            f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
            "`python -c \"import secrets; print(secrets.token_urlsafe(24))\"`"
        )
    if token is None and not is_loopback(host):
        raise InputError(
            f"--host {host} is reachable from other machines: give a shared token with --token or the "
            f"environment variable {TOKEN_ENV} (people then enter it once on the app's first page), or keep --host 127.0.0.1"
        )


def settings_from_config(
    cfg: Config, build_id: str | None = None, token: str | None = None, read_timeout_s: float = READ_TIMEOUT_S
) -> AppSettings:
    """The app's settings for a config: its output root, the build ``build_id`` (default: latest)."""
    assert cfg.output is not None
    if build_id is None and builds.read_pointer(cfg.output, "latest") is None:
        unpublished = builds.read_pointer(cfg.output, "current")
        if unpublished is not None:
            raise InputError(
                f"{cfg.output!r} has no published build yet (`salient run CONFIG` or `salient publish OUT` publishes "
                f"one); to label the pairs of the unpublished current build, add --build {unpublished}"
            )
    build = builds.resolve(cfg.output, build_id)
    return AppSettings(
        root=cfg.output, build=build, build_id=storage.basename(build), min_answers=cfg.annotations.min_answers,
        resize=cfg.preprocess.resize, crop=cfg.preprocess.crop, token=token, read_timeout_s=read_timeout_s,
    )


# The pattern allows ASCII only, so worker_identity (the rule of answer files) never refuses what it gets.
WorkerId = Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN), AfterValidator(worker_identity)]
_WORKER_ID = TypeAdapter(WorkerId)


class AnswerIn(BaseModel):
    """One answer as posted to ``/api/answers``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    worker_id: WorkerId
    class_index: int = Field(ge=0, le=MAX_ID)
    feature_index: int = Field(ge=0, le=MAX_ID)
    answer: Literal[ANSWERS]
    confidence: int = Field(ge=int(CONFIDENCE_MIN), le=int(CONFIDENCE_MAX))
    reason: str = Field(max_length=MAX_REASON_CHARS)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        value = value.replace("\r\n", "\n").strip()
        if not value:
            raise ValueError("a reason is required: say what the red region shows")
        bad = CONTROL.search(value)
        if bad:
            raise ValueError(f"the reason contains the control character U+{ord(bad.group()):04X}; use plain text")
        return value


PageNumber = Annotated[int, Query(alias="page", ge=1, le=MAX_ID)]
Search = Annotated[str, Query(max_length=MAX_SEARCH_CHARS)]
State = Annotated[Literal[STATES], Query()]
WorkerQuery = Annotated[str | None, Query(pattern=WORKER_ID_PATTERN)]
# "CLASS/FEATURE," for every pair of a page, ids of up to 10 digits
PairList = Annotated[str | None, Query(alias="pairs", max_length=PAGE_SIZE * 22)]


@dataclass(frozen=True)
class Listing:
    """One page of the pairs that match the filters of a request to the index or the review."""

    path: str  # of the page, for the links to its other pages
    pairs: Sequence[Pair]  # on this page
    offset: int  # matching pairs before this page's
    matching: int
    number: int
    pages: int
    q: str
    state: str
    worker: str | None

    def url(self, number: int) -> str:
        """The address of page ``number`` with the same filters."""
        query = {"q": self.q, "state": self.state if self.state != "all" else "", "worker": self.worker or "",
                 "page": str(number) if number > 1 else ""}
        given = {k: v for k, v in query.items() if v}
        return self.path + ("?" + urlencode(given) if given else "")


def _invalid(name: str, msg: str) -> HTTPException:
    """A 422 for the query parameter ``name``, in the shape of FastAPI's own."""
    return HTTPException(422, [{"loc": ["query", name], "msg": msg, "type": "value_error"}])


def _pair_keys(text: str) -> list[tuple[int, int]]:
    """The (class, feature) pairs of ``CLASS/FEATURE,CLASS/FEATURE...`` (none for an empty text)."""
    keys = []
    for item in text.split(",") if text else ():
        m = _PAIR_KEY.fullmatch(item)
        if m is None:
            raise _invalid("pairs", f"{item[:40]!r} is not CLASS/FEATURE: give pairs as CLASS/FEATURE separated by commas, e.g. 3/7,3/9")
        keys.append((int(m.group(1)), int(m.group(2))))
    return keys


def _problems(exc: ValidationError) -> list[dict]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]


def _same(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes | Response:
    """The request's body, or the response that refuses it: 413 over ``limit`` bytes, 408 when it does not
    arrive within ``timeout_s`` (the connection is then closed), nothing sent when the client has left."""
    too_large = JSONResponse({"detail": f"the body is larger than {limit} bytes"}, status_code=413)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return too_large
    except TimeoutError:
        return JSONResponse({"detail": f"the body did not arrive within {timeout_s:g} s"}, status_code=408)
    except ClientDisconnect:
        log.info("%s left during its request to %s", _peer(request.client), request.url.path)
        return Response(status_code=400)  # never sent: there is no one to send it to
    return bytes(body)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def _read_regular(root: str, rel: str) -> bytes:
    """The bytes of the regular file ``rel`` inside ``root``; FileNotFoundError for a folder, a device, a
    pipe, or a path with a symbolic link anywhere below ``root``."""
    uri = storage.under(root, rel)
    fs, path = storage.url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem):  # object stores have neither links nor devices
        if fs.isdir(path):
            raise FileNotFoundError(f"{uri} is a folder")
        return storage.read_bytes(uri)
    if os.path.realpath(path) != os.path.join(os.path.realpath(storage.url_to_fs(root)[1]), rel):
        raise FileNotFoundError(f"{uri} is reached through a symbolic link")
    # O_NOFOLLOW: the last component cannot become a link after the check; O_NONBLOCK: a pipe does not hang.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise FileNotFoundError(f"{uri} is not a regular file")
        return fh.read()


def create_app(settings: AppSettings) -> FastAPI:
    """The app for one build; reads the build's pairs and the answers there are now."""
    pairs = read_pairs(settings.build)
    book = AnswerBook(settings.root, pairs, ingest.known_classes(settings.build), settings.min_answers)
    book.refresh()
    examples = ClassExamples(settings.build, settings.resize, settings.crop)
    assets = {rel for p in pairs for rel in p.strips.values()}
    class_indices = {p.class_index for p in pairs}
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.globals.update(build_id=settings.build_id, needed=settings.min_answers, answer_text=ANSWER_TEXT)

    # No redirects to add a or drop a trailing slash: the only redirect is the login's, to a checked path.
    app = FastAPI(title="Salient annotation", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")

    def page(name: str, status_code: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), status_code=status_code)

    def signed_in(request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        supplied = (
            request.headers.get(TOKEN_HEADER)
            or (auth[7:] if auth.lower().startswith("bearer ") else None)
            or request.cookies.get(TOKEN_COOKIE)
        )
        return bool(supplied) and settings.token is not None and _same(supplied, settings.token)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.allowed_hosts is not None and host_name(request.headers.get("host", "")) not in settings.allowed_hosts:
            return PlainTextResponse("Invalid host header", status_code=400, headers=SECURITY_HEADERS)
        path = request.url.path
        if settings.token is not None and path != "/login" and not path.startswith("/static/") and not signed_in(request):
            if request.method in ("GET", "HEAD"):
                response = page("login.html", status_code=401, next=safe_next(path), wrong=False)
            else:
                response = PlainTextResponse(
                    "this annotation app needs its token: enter it on the app's first page, "
                    "or send the header X-Salient-Token", status_code=401,
                )
            response.headers.update(SECURITY_HEADERS)
            return response
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> HTMLResponse:
        if settings.token is None:
            raise HTTPException(404, "this app has no token to enter")
        return page("login.html", next=safe_next(request.query_params.get("next", "/")), wrong=False)

    @app.post("/login")
    async def login(request: Request) -> Response:
        if settings.token is None:
            raise HTTPException(404, "this app has no token to enter")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return PlainTextResponse("post the token from the app's login form", status_code=415)
        body = await _read_body(request, MAX_LOGIN_BYTES, settings.read_timeout_s)
        if isinstance(body, Response):
            return body
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        given, target = (form.get("token") or [""])[0], safe_next((form.get("next") or ["/"])[0])
        if not _same(given, settings.token):
            return page("login.html", status_code=401, next=target, wrong=True)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict")
        return response

    def listing(path: str, number: int, q: str, state: str, worker: str | None) -> Listing:
        bad = _NOT_IN_SEARCH.search(q)
        if bad:
            raise _invalid("q", f"the search holds the control character U+{ord(bad.group()):04X}; search for plain text")
        if state == "mine" and worker is None:
            raise _invalid("worker", "state=mine lists the pairs a worker answered: add worker=YOUR_WORKER_ID")
        worker = worker and worker_identity(worker)
        matching = book.select(q.strip(), state, worker)
        pages = max(1, -(-len(matching) // PAGE_SIZE))
        if number > pages:
            raise HTTPException(404, f"page {number} is past the last page, {pages}, of the {len(matching)} pairs that match")
        start = (number - 1) * PAGE_SIZE
        return Listing(path, matching[start:start + PAGE_SIZE], start, len(matching), number, pages, q, state, worker)

    @app.get("/", response_class=HTMLResponse)
    def index(page_number: PageNumber = 1, q: Search = "", state: State = "all", worker: WorkerQuery = None) -> HTMLResponse:
        book.refresh()
        shown = listing("/", page_number, q, state, worker)
        rows = []
        for p in shown.pairs:
            n = book.n_answers(p.key)
            rows.append({"i": book.position(p) + 1, "pair": p, "n": n, "done": n >= settings.min_answers})
        return page(
            "index.html", listing=shown, rows=rows, first=book.next_pair(None), open=book.open_pairs(), total=len(pairs),
        )

    @app.get("/pairs/{class_index}/{feature_index}", response_class=HTMLResponse)
    def task(class_index: int, feature_index: int) -> HTMLResponse:
        pair = book.pair(class_index, feature_index)
        if pair is None:
            raise HTTPException(404, f"class {class_index} feature {feature_index} is not a pair of build {settings.build_id}")
        book.refresh()
        i = book.position(pair)
        return page(
            "pair.html", pair=pair, n=book.n_answers(pair.key), position=i + 1, total=len(pairs),
            previous=pairs[i - 1] if i > 0 else None, following=pairs[i + 1] if i + 1 < len(pairs) else None,
            examples=examples.available,
        )

    @app.get("/review", response_class=HTMLResponse)
    def review(page_number: PageNumber = 1, q: Search = "", state: State = "all", worker: WorkerQuery = None) -> HTMLResponse:
        book.refresh()
        shown = listing("/review", page_number, q, state, worker)
        enough, labels, n_answers = [], Counter(), 0
        for p in pairs:
            counts = book.votes(p.key)
            labels[ingest.label_votes(*counts, settings.min_answers)[0]] += 1
            n_answers += sum(counts)
            if sum(counts) >= settings.min_answers:
                enough.append(counts)
        table = []
        for p in shown.pairs:
            answers = book.answers(p.key)
            counts = book.votes(p.key)
            label, kind = ingest.label_votes(*counts, settings.min_answers)
            confidence = sum(a.confidence for a in answers) / len(answers) if answers else None
            table.append({"pair": p, "votes": counts, "n": len(answers), "label": label, "kind": kind,
                          "confidence": confidence, "answers": answers})
        return page(
            "review.html", listing=shown, table=table, kappa=fleiss_kappa(enough), kappa_pairs=len(enough), labels=labels,
            answers=n_answers, rejected=book.rejected_rows,
        )

    @app.get("/assets/{path:path}")
    def asset(path: str) -> Response:
        if path not in assets:
            raise HTTPException(404, "no such asset in this build")
        try:
            data = _read_regular(settings.build, f"{tables.DISCOVER_DIR}/{storage.safe_relpath(path)}")
        except OSError:
            raise HTTPException(
                404, f"{path} is a pair's strip of this build but is missing or not a regular file; rerun `salient discover CONFIG`"
            ) from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/classes/{class_index}/examples.png")
    def class_examples(class_index: int) -> Response:
        strip = examples.strip(class_index) if class_index in class_indices and examples.available else None
        if strip is None:
            raise HTTPException(404, f"no example images of class {class_index} in build {settings.build_id}")
        return Response(strip, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/progress")
    def progress(worker_id: str | None = None, pairs_shown: PairList = None) -> JSONResponse:
        if worker_id is not None:
            try:
                worker_id = _WORKER_ID.validate_python(worker_id)
            except ValidationError as exc:
                return JSONResponse({"detail": _problems(exc)}, status_code=422)
        among = _pair_keys(pairs_shown) if pairs_shown is not None else None
        book.refresh()
        mine = book.answered_by(worker_id, among) if worker_id else set()
        following = book.next_pair(worker_id)
        return JSONResponse({
            "pairs": len(pairs), "open": book.open_pairs(),
            "labelled_by_you": book.n_answered_by(worker_id) if worker_id else 0,
            "answered": sorted(f"{c}/{j}" for c, j in mine), "next": following.url if following else None,
        })

    @app.post("/api/answers", status_code=201)
    async def post_answer(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return JSONResponse({"detail": "send the answer as JSON (Content-Type: application/json)"}, status_code=415)
        body = await _read_body(request, MAX_BODY_BYTES, settings.read_timeout_s)
        if isinstance(body, Response):
            return body
        try:
            given = AnswerIn.model_validate_json(body)
        except ValidationError as exc:
            return JSONResponse({"detail": _problems(exc)}, status_code=422)
        pair = book.pair(given.class_index, given.feature_index)
        if pair is None:
            return JSONResponse({"detail": [{
                "loc": ["body", "feature_index"], "type": "unknown_pair",
                "msg": f"class {given.class_index} feature {given.feature_index} is not a pair of build {settings.build_id}",
            }]}, status_code=422)
        try:
            await run_in_threadpool(book.add, given.worker_id, pair, given.answer, given.confidence, given.reason)
        except Conflict as exc:
            following = book.next_pair(given.worker_id, pair.key)
            return JSONResponse({"detail": str(exc), "next": following.url if following else None}, status_code=409)
        following = book.next_pair(given.worker_id, pair.key)
        return JSONResponse({
            "n_answers": book.n_answers(pair.key), "needed": settings.min_answers,
            "labelled_by_you": book.n_answered_by(given.worker_id), "pairs": len(pairs),
            "next": following.url if following else None,
        }, status_code=201)

    return app


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose next request's headers have not all arrived
    within ``timeout_keep_alive`` seconds of its opening or of the previous response (uvicorn alone only
    times out a connection that sends nothing at all after a response)."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._late)

    def _late(self) -> None:
        waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():
            log.info("closed a connection from %s whose request headers did not arrive in time", _peer(self.client))
            self.transport.close()


class HeaderLimits:
    """ASGI middleware answering 431 (and closing the connection) to a request with more than
    :data:`MAX_HEADERS` headers or more than :data:`MAX_HEADER_BYTES` of them, names and values."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(name) + len(value) + 4 for name, value in headers)  # as sent: "name: value\r\n"
            if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
                detail = (
                    f"the request has {len(headers)} headers of {size:,} bytes; at most {MAX_HEADERS} headers "
                    f"of {MAX_HEADER_BYTES:,} bytes in all are accepted: send fewer or shorter headers (clear this site's cookies)"
                )
                await JSONResponse({"detail": detail}, status_code=431, headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RedactedAccessLog(logging.Filter):
    """Shows uvicorn's access-log lines (``client - "METHOD path HTTP/v" status``, the path percent-encoded)
    with any query string as ``?[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5 and isinstance(record.args[2], str):
            path, query, _ = record.args[2].partition("?")
            record.args = (*record.args[:2], path + ("?[redacted]" if query else ""), *record.args[3:])
        return True


_ACCESS_FILTER = RedactedAccessLog()


def server(settings: AppSettings, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Server:
    """The uvicorn server of the app on ``host:port``, not started: a loopback host admits only loopback Host
    headers; headers and bodies must arrive within ``settings.read_timeout_s``; headers are limited by
    :class:`HeaderLimits` (and by h11 while they arrive)."""
    check_access(host, settings.token)
    if is_loopback(host):
        settings = dataclasses.replace(settings, allowed_hosts=(*LOOPBACK_HOSTS, host))
    config = uvicorn.Config(
        HeaderLimits(create_app(settings)), host=host, port=port, http=HeaderDeadline, server_header=False, log_level="info",
        timeout_keep_alive=settings.read_timeout_s, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    logging.getLogger("uvicorn.access").addFilter(_ACCESS_FILTER)  # after the Config has set uvicorn's logging up
    return uvicorn.Server(config)


def serve(settings: AppSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    running = server(settings, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"annotating build {settings.build_id}: http://{shown}:{port}/" + (" (people enter the token on its first page)" if settings.token else ""))
    print(f"answers go to {builds.incoming(settings.root)}/; `salient ingest CONFIG` turns them into labels")
    running.run()


def token_from_env(given: str | None) -> str | None:
    """The token given on the command line, else ``$SALIENT_APP_TOKEN``, else None."""
    return given or os.environ.get(TOKEN_ENV) or None
