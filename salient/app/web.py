"""The annotation web app (FastAPI): people label a build's (class, feature) pairs in a browser.

Pages: ``/`` (the pairs and their progress), ``/pairs/{class}/{feature}`` (one task: the class,
example images, the three strips and the paper's three questions), ``/review`` (votes, labels and
Fleiss' kappa). ``POST /api/answers`` takes one answer as JSON and appends it under
``OUT/annotations/incoming/`` in the paper's columns; ``GET /api/progress`` says what a worker has done.

Safety: every text is escaped by the templates (autoescape) and a Content-Security-Policy allows
only this app's own script; only the build's discovery strips and one example strip per class are
served (by name, from the pairs of the build); answer bodies are limited to 64 KiB; ids are
validated against the build. With a token, every request needs it (header ``X-Salient-Token``,
``Authorization: Bearer``, or the cookie set by opening any page once with ``?token=``). Bound to
a loopback address, requests must name a loopback host (no DNS rebinding); elsewhere a token is required.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlencode

import jinja2
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from salient import builds, ingest, storage, tables
from salient.agreement import fleiss_kappa
from salient.answers import ANSWERS, CONFIDENCE_MAX, CONFIDENCE_MIN, MAX_ID
from salient.app.book import AnswerBook, Conflict, read_pairs
from salient.app.examples import ClassExamples
from salient.config import Config
from salient.errors import InputError

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "SALIENT_APP_TOKEN"
TOKEN_HEADER = "x-salient-token"
TOKEN_COOKIE = "salient_token"
WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
            f"environment variable {TOKEN_ENV} (people then open the app once with ?token=...), or keep --host 127.0.0.1"
        )


def settings_from_config(cfg: Config, build_id: str | None = None, token: str | None = None) -> AppSettings:
    """The app's settings for a config: its output root, the build ``build_id`` (default: latest)."""
    assert cfg.output is not None
    build = builds.resolve(cfg.output, build_id)
    return AppSettings(
        root=cfg.output, build=build, build_id=storage.basename(build), min_answers=cfg.annotations.min_answers,
        resize=cfg.preprocess.resize, crop=cfg.preprocess.crop, token=token,
    )


WorkerId = Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN)]
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
        if any(ch < " " and ch not in "\n\t" for ch in value):
            raise ValueError("the reason contains control characters; use plain text")
        return value


def _problems(exc: ValidationError) -> list[dict]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]


def _same(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


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

    app = FastAPI(title="Salient annotation", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.token is not None:
            given = request.query_params.get("token")
            if given is not None and request.method == "GET" and _same(given, settings.token):
                # Trade the token in the URL for a cookie, and drop it from the address bar.
                query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
                response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict")
                return response
            auth = request.headers.get("authorization", "")
            supplied = (
                request.headers.get(TOKEN_HEADER)
                or (auth[7:] if auth.lower().startswith("bearer ") else None)
                or request.cookies.get(TOKEN_COOKIE)
            )
            if not supplied or not _same(supplied, settings.token):
                return PlainTextResponse(
                    "this annotation app needs its token: open the link you were given (it ends in ?token=...), "
                    "or send the header X-Salient-Token",
                    status_code=401, headers=SECURITY_HEADERS,
                )
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(name: str, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context))

    def rows() -> list[dict]:
        out = []
        for i, p in enumerate(pairs):
            n = book.n_answers(p.key)
            out.append({"i": i + 1, "pair": p, "n": n, "done": n >= settings.min_answers})
        return out

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        book.refresh()
        first = book.next_pair(None)
        return page("index.html", rows=rows(), first=first, open=book.open_pairs(), total=len(pairs))

    @app.get("/pairs/{class_index}/{feature_index}", response_class=HTMLResponse)
    def task(class_index: int, feature_index: int) -> HTMLResponse:
        pair = book.pair(class_index, feature_index)
        if pair is None:
            raise HTTPException(404, f"class {class_index} feature {feature_index} is not a pair of build {settings.build_id}")
        book.refresh()
        i = pairs.index(pair)
        return page(
            "pair.html", pair=pair, n=book.n_answers(pair.key), position=i + 1, total=len(pairs),
            previous=pairs[i - 1] if i > 0 else None, following=pairs[i + 1] if i + 1 < len(pairs) else None,
            examples=examples.available,
        )

    @app.get("/review", response_class=HTMLResponse)
    def review() -> HTMLResponse:
        book.refresh()
        table, enough, labels = [], [], Counter()
        for p in pairs:
            answers = book.answers(p.key)
            votes = Counter(a.answer for a in answers)
            counts = [votes[a] for a in ANSWERS]
            label, kind = ingest.label_votes(*counts, settings.min_answers)
            labels[label] += 1
            if len(answers) >= settings.min_answers:
                enough.append(counts)
            confidence = sum(a.confidence for a in answers) / len(answers) if answers else None
            table.append({"pair": p, "votes": counts, "n": len(answers), "label": label, "kind": kind,
                          "confidence": confidence, "answers": answers})
        return page(
            "review.html", table=table, kappa=fleiss_kappa(enough), kappa_pairs=len(enough), labels=labels,
            answers=sum(r["n"] for r in table), rejected=book.rejected_rows,
        )

    @app.get("/assets/{path:path}")
    def asset(path: str) -> Response:
        if path not in assets:
            raise HTTPException(404, "no such asset in this build")
        try:
            data = storage.read_bytes(storage.join(settings.build, tables.DISCOVER_DIR, storage.safe_relpath(path)))
        except FileNotFoundError:
            raise HTTPException(404, f"{path} is listed in {tables.TASKS.path} but missing; rerun `salient discover CONFIG`") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/classes/{class_index}/examples.png")
    def class_examples(class_index: int) -> Response:
        strip = examples.strip(class_index) if class_index in class_indices and examples.available else None
        if strip is None:
            raise HTTPException(404, f"no example images of class {class_index} in build {settings.build_id}")
        return Response(strip, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/progress")
    def progress(worker_id: str | None = None) -> JSONResponse:
        if worker_id is not None:
            try:
                _WORKER_ID.validate_python(worker_id)
            except ValidationError as exc:
                return JSONResponse({"detail": _problems(exc)}, status_code=422)
        book.refresh()
        mine = book.answered_by(worker_id) if worker_id else set()
        following = book.next_pair(worker_id)
        return JSONResponse({
            "pairs": len(pairs), "open": book.open_pairs(), "labelled_by_you": len(mine),
            "answered": sorted(f"{c}/{j}" for c, j in mine), "next": following.url if following else None,
        })

    @app.post("/api/answers", status_code=201)
    async def post_answer(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return JSONResponse({"detail": "send the answer as JSON (Content-Type: application/json)"}, status_code=415)
        too_large = JSONResponse({"detail": f"the body is larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return too_large
        try:
            given = AnswerIn.model_validate_json(bytes(body))
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
            "labelled_by_you": len(book.answered_by(given.worker_id)), "pairs": len(pairs),
            "next": following.url if following else None,
        }, status_code=201)

    if settings.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    return app


def serve(settings: AppSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    check_access(host, settings.token)
    if is_loopback(host):
        settings = dataclasses.replace(settings, allowed_hosts=(*LOOPBACK_HOSTS, host))
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    print(f"annotating build {settings.build_id}: http://{shown}:{port}/" + (" (open it with ?token=<the token>)" if settings.token else ""))
    print(f"answers go to {builds.incoming(settings.root)}/; `salient ingest CONFIG` turns them into labels")
    uvicorn.run(app, host=host, port=port, server_header=False, log_level="info")


def token_from_env(given: str | None) -> str | None:
    """The token given on the command line, else ``$SALIENT_APP_TOKEN``, else None."""
    return given or os.environ.get(TOKEN_ENV) or None
