"""The Flask app factory: the JSON API (search.api) and the viewer (web.views) over one Runtime that
holds the store, the model, the index and the search service, loaded once per process."""
from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import threading
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request, session
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.routing import IntegerConverter

from flagmatch import wiring
from flagmatch.settings import Settings
from indexer.audit import AuditLog
from indexer.embed import Embedder
from indexer.vector_index import VectorIndex
from indexer.errors import FlagmatchError
from search.auth import TokenSet
from search.admission import Admission
from search.service import SearchService

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Runtime:
    """Everything a request needs, built once per server process: the store, the audit log and the
    cluster store at once; the model, the index and the search service by ``load`` (``ready`` is set then)."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        from clustering.store import ClusterStore
        self.settings = settings
        self.tokens = TokenSet.parse(settings.api_tokens)
        self.store = wiring.open_store(settings)
        self.audit = AuditLog(self.store.catalog.engine)
        self.clusters = ClusterStore(self.store)
        self.embedder = embedder
        self.index: VectorIndex | None = None
        self.service: SearchService | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None

    def load(self) -> None:
        try:
            if self.embedder is None:
                from indexer.embed import SerialEmbedder
                self.embedder = SerialEmbedder(wiring.load_embedder(self.settings, self.store))
            if not self.store.catalog.model_meta():
                raise FlagmatchError("the store is empty: ingest images first", code="empty_store")
            self.index = wiring.open_index(self.store, self.settings)
            self.service = SearchService(self.store, self.index, self.embedder, limits=wiring.decode_limits(self.settings),
                                         admission=Admission(self.settings.admission_bytes, self.settings.admission_wait),
                                         cluster_lookup=self.clusters.lookup)
            self.ready.set()
        except Exception as exc:  # reported by /readyz; the process stays up to say so
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("flagmatch failed to load")

    # -- the viewer's session (the API accepts it too, with a CSRF token for writes)
    @staticmethod
    def session_actor() -> str | None:
        try:
            return session.get("actor")
        except RuntimeError:
            return None

    @staticmethod
    def csrf_ok(token: str | None) -> bool:
        expected = session.get("csrf")
        return bool(token and expected and hmac.compare_digest(str(token).encode(), str(expected).encode()))


class Int64Converter(IntegerConverter):
    """``<int:…>`` in every route: a non-negative integer that fits SQL's 64-bit BIGINT."""

    regex = r"\d{1,19}"

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(map, *args, **kwargs)


def _is_api() -> bool:
    return request.path.startswith("/api/")


def install_edges(app: Flask, settings: Settings) -> None:
    """What every request passes through: a request id, the rate limit, and JSON errors under /api/ for
    every status — an unknown route, a wrong method, a body too large, a crash (logged with the request
    id, answered without a stack)."""
    from search.api import error, http_error

    @app.before_request
    def _request_id() -> None:
        sent = request.headers.get("X-Request-Id", "")
        g.request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex

    @app.after_request
    def _echo_request_id(resp: Response) -> Response:
        if "request_id" in g:
            resp.headers["X-Request-Id"] = g.request_id
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response | HTTPException:
        if exc.code == 413:
            exc.description = f"request body over {settings.max_upload_bytes:,} bytes"
        return http_error(exc) if _is_api() or exc.code == 413 else exc

    @app.errorhandler(InternalServerError)
    def _crash(exc: InternalServerError) -> Response | tuple[str, int]:
        original = getattr(exc, "original_exception", None) or exc
        log.error("request %s %s failed [request id %s]", request.method, request.path, g.get("request_id"),
                  exc_info=(type(original), original, original.__traceback__))
        if _is_api():
            return error(500, "internal", "the server failed on this request; quote the request id to its operator")
        return f"internal error (request id {g.get('request_id')})", 500

    if settings.rate_limit:
        from flask_limiter import Limiter

        def _client_key() -> str:
            from search.auth import TokenSet
            tokens: TokenSet = app.extensions["flagmatch"].tokens
            return tokens.from_header(request.headers.get("Authorization")) or request.remote_addr or "-"

        # per worker process (memory storage): with N workers a client gets up to N× the limit
        Limiter(key_func=_client_key, app=app, default_limits=[settings.rate_limit], storage_uri="memory://",
                headers_enabled=True, default_limits_exempt_when=lambda: request.path in ("/healthz", "/readyz"))


def _secret_key(settings: Any) -> str:
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.home_path) / ".secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def create_app(settings: Any, *, embedder: Embedder | None = None, load: str = "now") -> Flask:
    """``load``: "now" (block until model and index are loaded), "background" (serve /healthz and a
    503 /readyz meanwhile) or "none" (tests of the not-ready state)."""
    from search.api import bp as api_bp, register_health

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
    rt = Runtime(settings, embedder)
    app.extensions["flagmatch"] = rt
    app.register_blueprint(api_bp)
    register_health(app)
    try:
        from web.views import bp as views_bp
        app.register_blueprint(views_bp)
    except ImportError:
        pass

    install_edges(app, settings)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.path.startswith("/api/"):
            resp.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
            resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp

    if load == "now":
        rt.load()
    elif load == "background":
        threading.Thread(target=rt.load, name="flagmatch-load", daemon=True).start()
    return app
