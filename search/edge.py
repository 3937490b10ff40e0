"""The HTTP edge, written once for every route (the JSON API, the HMA routes and the viewer): the error
envelope ``{"error": {"code", "message", "request_id"}}``, the one map from domain errors to HTTP statuses,
token and session auth with CSRF, readiness, request bodies validated against their declarations
(``search.schemas``), and health routes. It owns ``Runtime``: the protocol of what routes need from the
server's runtime (``flagmatch.runtime.Runtime`` has it), so nothing here imports upward."""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from indexer.errors import (ClusteringError, DecodeError, FetchError, FlagmatchError, InvalidInputError, ModelLoadError,
                            ModelMismatchError, NotFoundError, OverloadedError)
from indexer.models.embed import Embedder
from indexer.storage.audit import AuditLog
from indexer.storage.clusters import ClusterStore
from indexer.storage.sessions import RequestLedger, SessionStore
from indexer.storage.store import Store
from indexer.vectors.vector_index import VectorIndex
from search.auth import TokenSet, csrf_ok, session_actor
from search.service import SearchService

M = TypeVar("M", bound=BaseModel)


class EdgeSettings(Protocol):
    """The settings the routes read (``flagmatch.settings.Settings`` has them)."""
    @property
    def open_reads(self) -> bool: ...
    @property
    def metrics_open(self) -> bool: ...
    @property
    def metrics(self) -> bool: ...
    @property
    def access_log(self) -> bool: ...
    @property
    def queue_similarity(self) -> float: ...
    @property
    def review_labels(self) -> tuple[str, ...]: ...
    @property
    def review_reasons(self) -> tuple[str, ...]: ...
    @property
    def blur_strength(self) -> str: ...
    @property
    def max_upload_bytes(self) -> int: ...
    @property
    def max_file_bytes(self) -> int: ...
    @property
    def rate_limit(self) -> str: ...
    @property
    def request_nice(self) -> int: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def home_path(self) -> Path: ...
    @property
    def health_min_free_gb(self) -> float: ...
    @property
    def health_max_index_lag(self) -> float: ...
    @property
    def health_max_replica_lag(self) -> float: ...
    @property
    def hma_open(self) -> bool: ...
    @property
    def fetch_allow(self) -> tuple[str, ...]: ...
    @property
    def fetch_max_bytes(self) -> int: ...
    @property
    def fetch_timeout(self) -> float: ...
    @property
    def exchange_apis(self) -> tuple[str, ...]: ...


class Runtime(Protocol):
    """What a server process hands its routes: opened at start, the model side (``embedder``, ``index``,
    ``service``) once ``ready`` is set."""
    settings: EdgeSettings
    tokens: TokenSet
    store: Store
    audit: AuditLog
    clusters: ClusterStore
    sessions: SessionStore
    requests: RequestLedger
    embedder: Embedder | None
    index: VectorIndex | None
    service: SearchService | None
    ready: threading.Event
    load_error: str | None

    def session_actor(self, session_id: str | None) -> str | None: ...


def runtime() -> Runtime:
    return current_app.extensions["flagmatch"]  # type: ignore[no-any-return]


def error(status: int, code: str, message: str, *, retry_after: int | None = None) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    request_id = g.get("request_id")
    if request_id:
        body["request_id"] = request_id
    resp = jsonify({"error": body})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="flagmatch"'
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def http_status(exc: FlagmatchError) -> int:
    """The one place a domain error becomes an HTTP status (the viewer uses it too)."""
    if exc.code == "unsupported_media_type":
        return 415
    if isinstance(exc, FetchError):
        # refused by policy (off, not on the allow-list): 403; a bad URL, or a fetch that failed: 400
        return {"fetch_off": 403, "fetch_refused": 403, "fetch_too_large": 413,
                "fetch_not_media": 415}.get(exc.code, 400)
    if isinstance(exc, DecodeError):
        return {"too_large": 413, "unsupported_format": 415}.get(exc.code, 400)
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (ModelMismatchError, ClusteringError)):
        return 409
    if isinstance(exc, (ModelLoadError, OverloadedError)) or exc.code == "empty_store":
        return 503
    return 400


def register_errors(bp: Blueprint) -> None:
    """Domain errors raised by ``bp``'s routes answer in the envelope, with their status."""
    @bp.errorhandler(FlagmatchError)
    def _domain_error(exc: FlagmatchError) -> Response:
        return error(http_status(exc), exc.code, exc.message,
                     retry_after=exc.retry_after if isinstance(exc, OverloadedError) else None)


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
              429: "rate_limited", 500: "internal", 503: "unavailable"}


def http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors (unknown route, wrong method, body too large, rate limit) as JSON."""
    status = exc.code or 500
    resp = error(status, HTTP_CODES.get(status, "http_error"), exc.description or HTTP_CODES.get(status, "error"))
    if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    if status == 429:
        retry = getattr(exc, "retry_after", None)
        resp.headers["Retry-After"] = str(int(retry) if retry else 1)
    return resp


# ------------------------------------------------------------------ auth

def authorize(write: bool) -> Response | None:
    """Reads may be open (setting open_reads); writes always need a token."""
    rt = runtime()
    token = rt.tokens.from_header(request.headers.get("Authorization"))
    actor = rt.tokens.actor(token) or session_actor()
    if actor is None and request.headers.get("Authorization") is not None:
        return error(401, "unauthorized", "the bearer token is not valid")
    if actor is None and (write or not rt.settings.open_reads):
        return error(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)")
    g.actor = actor or "anonymous"
    return None


def needs(write: bool) -> Callable:
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            denied = authorize(write)
            if denied is not None:
                return denied
            if write and csrf_required():
                return error(403, "csrf", "missing or wrong CSRF token")
            return fn(*a, **kw)
        return wrapper
    return deco


def csrf_required() -> bool:
    """Requests authenticated by the viewer's session cookie must carry its CSRF token."""
    rt = runtime()
    if rt.tokens.from_header(request.headers.get("Authorization")):
        return False
    return session_actor() is not None and not csrf_ok(request.headers.get("X-CSRF-Token"))


def need_ready() -> Response | None:
    if not runtime().ready.is_set():
        return error(503, "not_ready", "the model and index are still loading", retry_after=5)
    return None


# ------------------------------------------------------------------ request bodies

def json_body() -> dict[str, Any]:
    """The optional JSON object body of a write (absent: {})."""
    if not request.data:
        return {}
    if not request.is_json:
        raise UnsupportedBody("the body, when there is one, must be application/json")
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InvalidInputError("the body must be a JSON object", code="bad_body")
    return data


class UnsupportedBody(InvalidInputError):
    code = "unsupported_media_type"


def parse(model: type[M], data: Any) -> M:
    """``data`` (a decoded JSON body) checked against its declaration: the first problem becomes a 400 that
    names the field (``unknown field(s): …`` for a field the declaration lacks)."""
    if not isinstance(data, dict):
        raise InvalidInputError("the body must be a JSON object", code="bad_body")
    unknown = set(data) - set(model.model_fields)
    if unknown:
        raise InvalidInputError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}", code="bad_parameter")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInputError(f"{where}: {first['msg']}", code=getattr(model, "error_codes", {}).get(
            where, "bad_parameter")) from None


# ------------------------------------------------------------------ a request's route and a response's stages

def route_name() -> str:
    """The URL rule the request matched (``/api/v1/images/<int:image_id>``), never the raw path, so ids and
    probes cannot explode a metric's series or a log's cardinality; ``unmatched`` for a 404 of no route."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def server_timing(resp: Response) -> dict[str, float]:
    """The stages a response's ``Server-Timing`` header reports, in seconds (unparseable parts skipped);
    parsed once per request (the metrics and the access line both read it)."""
    if "server_timing" in g:
        return g.server_timing  # type: ignore[no-any-return]
    out: dict[str, float] = {}
    for part in resp.headers.get("Server-Timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        try:
            if name and dur:
                out[name] = float(dur) / 1000
        except ValueError:
            continue
    g.server_timing = out
    return out


# ------------------------------------------------------------------ health

def register_health(app: Flask) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        """200 while this replica can answer searches (``degraded`` when a non-critical check fails: low disk,
        index or replica lag), 503 while loading or when a critical part fails; each check's figures in
        ``checks`` (``search.health``) and the generation and matching space it answers from."""
        rt: Runtime = app.extensions["flagmatch"]
        if not rt.ready.is_set():
            resp = jsonify({"status": "loading" if rt.load_error is None else "failed", "error": rt.load_error})
            resp.status_code = 503
            return resp
        body = server_health(rt)
        resp = jsonify({**body, "status": {"ok": "ready"}.get(body["status"], body["status"])})
        resp.status_code = 503 if body["status"] == "failing" else 200
        return resp


def server_health(rt: Runtime) -> dict[str, Any]:
    """``search.health`` for this server process: its loaded model and indexes."""
    from search.health import Limits, health
    scopes = None
    extra: dict[str, Any] = {}
    if rt.index is not None:
        gens = rt.index.generations()
        extra = {"generation": gens["scopes"], "space": gens["space"]}
        scopes = {sc: (st["generation"], st["covers_image_id"]) for sc, st in rt.index.stats().items()}
    model = ({"ok": True, "model_id": rt.embedder.info.model_id} if rt.embedder is not None
             else {"ok": False, "error": rt.load_error or "no model is loaded"})
    body = health(rt.store, scopes=scopes, space=extra.get("space"), model=model, limits=Limits.of(rt.settings))
    if rt.index is not None:
        # measured first, then the look for what is new (in the background): after a reindex every replica
        # moves to the published generation within the index refresh interval
        rt.index.maybe_refresh()
    return {**body, **extra}
