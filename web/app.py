"""The Flask app factory: the JSON API (search.api, web.decisions), the HMA routes (search.hma) and the viewer (web.views) over a Runtime that
``flagmatch.runtime`` has already built (``flagmatch.runtime.build_app`` does both)."""
from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, Response, flash, g, redirect, request, session
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.routing import IntegerConverter

from indexer.models.threads import REQUEST, worker_started
from search.api import bp as api_bp
from search.metrics import install_metrics
from indexer.storage.audit import REQUEST_ID
from search.edge import EdgeSettings, Runtime, error, http_error, register_health, route_name, server_timing
from search.hma import hma_http_error, register_hma
from search.hma_openapi import register_openapi
from web.decisions import bp as decisions_bp
from web.views import bp as views_bp


log = logging.getLogger(__name__)
access = logging.getLogger("flagmatch.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Int64Converter(IntegerConverter):
    """``<int:…>`` in every route: a non-negative integer that fits SQL's 64-bit BIGINT."""

    regex = r"\d{1,19}"

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(map, *args, **kwargs)


API_PREFIXES = ("/api/", "/h/", "/m/", "/c/")  # flagmatch's API and the HMA-compatible routes
HMA_PREFIXES = ("/h/", "/m/", "/c/", "/status", "/openapi/")


def _is_api() -> bool:
    return request.path.startswith(API_PREFIXES)


def install_edges(app: Flask, runtime: Runtime) -> None:
    """What every request passes through: a request id, the rate limit, and JSON errors under /api/ for
    every status — an unknown route, a wrong method, a body too large, a crash (logged with the request
    id, answered without a stack)."""
    settings = runtime.settings
    niced = threading.local()

    @app.before_request
    def _priority() -> None:
        """With ``request_nice``, each request thread runs below the model's threads (once per thread: a thread's
        niceness cannot be lowered back). The model's operators run a thread per core and wait for the slowest, so one request
        thread preempting one of them stalls the whole model (measured: a JSON-busy thread in the same process
        took the ViT from 20 to 12 images/s on 2 cores; the same thread niced, 20.5)."""
        if not getattr(niced, "done", False):
            # never the process's main thread (an in-process server, a test client): its niceness would pass to
            # every thread and process it starts afterwards
            if threading.current_thread() is not threading.main_thread():
                worker_started(REQUEST, settings.request_nice)
            niced.done = True

    @app.before_request
    def _request_id() -> None:
        sent = request.headers.get("X-Request-Id", "")
        g.request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        g.arrived = time.perf_counter()
        REQUEST_ID.set(g.request_id)  # the audit rows this request writes carry it

    @app.teardown_request
    def _forget_request_id(_exc: BaseException | None) -> None:
        REQUEST_ID.set(None)  # request threads are reused

    @app.before_request
    def _viewer_session() -> None:
        sid = session.get("sid")
        g.session_actor = runtime.session_actor(sid)
        if sid and g.session_actor is None:
            session.clear()  # ended (signed out, token removed, idle, expired): the cookie is worth nothing

    @app.before_request
    def _once() -> Response | None:
        """A write that carries a request id (the viewer's forms add one; API clients send
        ``Idempotency-Key``) is done once: a repeat is answered without acting again."""
        if request.method not in ("POST", "PUT", "DELETE", "PATCH"):
            return None
        rid = request.headers.get("Idempotency-Key") or (request.form.get("request_id") if request.mimetype in (
            "application/x-www-form-urlencoded", "multipart/form-data") else None)
        if not rid or not _REQUEST_ID.fullmatch(rid):
            return None
        token = runtime.tokens.from_header(request.headers.get("Authorization"))
        who = runtime.tokens.actor(token) or g.get("session_actor")
        if who is None:
            return None  # not signed in: the route refuses it
        if runtime.requests.claim(who, rid):
            g.claimed = (who, rid)
            return None
        if _is_api():
            return error(409, "duplicate_request", "a request with this Idempotency-Key was already processed")
        flash("That was already done: the same form arrived twice, and was acted on once.")
        nxt = request.form.get("next") or request.referrer or "/"
        return redirect(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/")

    @app.after_request
    def _release_failed(resp: Response) -> Response:
        claimed = g.pop("claimed", None)
        if claimed is not None and (resp.status_code >= 400 or g.pop("action_failed", False)):
            runtime.requests.release(*claimed)  # it failed: the same form may be sent again
        return resp

    @app.after_request
    def _echo_request_id(resp: Response) -> Response:
        if "request_id" in g:
            resp.headers["X-Request-Id"] = g.request_id
        return resp

    @app.after_request
    def _access_line(resp: Response) -> Response:
        """One line per request: never the query string, a header or a body (tokens, cookies, image bytes)."""
        if not settings.access_log or request.path in ("/healthz", "/readyz", "/status/live"):
            return resp  # probes every few seconds would drown the rest
        route = route_name()
        ms = (time.perf_counter() - g.arrived) * 1000 if "arrived" in g else None
        actor = g.get("actor") or g.get("session_actor") or "-"
        stages = {name: round(sec * 1000, 2) for name, sec in server_timing(resp).items()}
        access.info("%s %s %d %.1f ms [%s] %s", request.method, request.path, resp.status_code, ms or 0.0,
                    g.get("request_id"), actor,
                    extra={"request_id": g.get("request_id"), "actor": actor, "method": request.method,
                           "route": route, "path": request.path, "status": resp.status_code,
                           "duration_ms": None if ms is None else round(ms, 2), "stages_ms": stages})
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response | HTTPException:
        if exc.code == 413:
            exc.description = f"request body over {settings.max_upload_bytes:,} bytes"
            _drain_body(2 * settings.max_upload_bytes)
        if request.path.startswith(HMA_PREFIXES):  # HMA's clients read {"message"}, on every status
            return hma_http_error(exc)
        if _is_api() or exc.code == 413:
            return http_error(exc)
        resp = _error_page(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or exc.name)
        if exc.code == 405 and getattr(exc, "valid_methods", None):  # RFC 9110: a 405 says what is allowed
            resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(InternalServerError)
    def _crash(exc: InternalServerError) -> Response | tuple[str, int]:
        original = getattr(exc, "original_exception", None) or exc
        log.error("request %s %s failed [request id %s]", request.method, request.path, g.get("request_id"),
                  exc_info=(type(original), original, original.__traceback__))
        if _is_api():
            return error(500, "internal", "the server failed on this request; quote the request id to its operator")
        return _error_page(500, "internal", f"The server failed on this request; quote request id "
                                           f"{g.get('request_id')} to its operator.")

    if settings.rate_limit:
        from flask_limiter import Limiter

        def _client_key() -> str:
            return runtime.tokens.from_header(request.headers.get("Authorization")) or request.remote_addr or "-"

        # per worker process (memory storage): with N workers a client gets up to N× the limit
        Limiter(key_func=_client_key, app=app, default_limits=[settings.rate_limit], storage_uri="memory://",
                headers_enabled=True, default_limits_exempt_when=lambda: request.path in ("/healthz", "/readyz"))


def _error_page(status: int, code: str, message: str) -> Response:
    """The viewer's page for an HTTP error (a wrong address, a wrong method, a refused form, a crash): styled,
    with the navigation and a way back, never Werkzeug's bare page."""
    from flask import render_template
    back = request.referrer if request.referrer and request.referrer.startswith(request.host_url) else None
    resp = Response(render_template("error.html", status=status, code=code, message=message, back=back),
                    status=status, mimetype="text/html")
    return resp


def _drain_body(limit: int) -> None:
    """Read (and drop) what is left of a refused body, up to ``limit`` bytes: closing a socket with unread
    input makes the kernel send a reset, and the client may lose the 413 that explains the refusal."""
    stream = request.environ.get("wsgi.input")
    left = limit
    try:
        while stream is not None and left > 0:
            chunk = stream.read(min(65536, left))
            if not chunk:
                break
            left -= len(chunk)
    except Exception:  # a client that went away, a malformed chunk: nothing left to save
        pass


def _secret_key(settings: EdgeSettings) -> str:
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.home_path) / ".secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def create_app(runtime: Runtime) -> Flask:
    """The API and the viewer over ``runtime`` (loaded or not: until it is ready the API answers 503)."""
    settings = runtime.settings
    app = Flask(__name__, static_folder=None)  # the viewer blueprint serves /static
    app.url_map.converters["int"] = Int64Converter  # ids beyond 64 bits match no route: a 404, never a 500
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        MAX_FORM_MEMORY_SIZE=settings.max_upload_bytes,
        SECRET_KEY=_secret_key(settings),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_NAME="flagmatch_session",
        JSON_SORT_KEYS=False,
    )
    app.extensions["flagmatch"] = runtime
    app.register_blueprint(api_bp)
    app.register_blueprint(decisions_bp)
    register_hma(app)
    register_openapi(app)
    register_health(app)
    app.register_blueprint(views_bp)

    install_edges(app, runtime)
    if runtime.settings.metrics:
        install_metrics(app, runtime)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if not _is_api():
            resp.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
            resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp

    return app
