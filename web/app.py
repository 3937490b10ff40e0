"""The Flask app factory: the JSON API (search.api) and the viewer (web.views) over one Runtime that
holds the store, the model, the index and the search service, loaded once per process."""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request, session

from flagmatch import wiring
from indexer.embed import Embedder
from indexer.errors import FlagmatchError
from search.auth import TokenSet
from search.service import SearchService

log = logging.getLogger(__name__)


class Runtime:
    """Everything a request needs, built once per server process."""

    def __init__(self, settings: Any, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.tokens = TokenSet.parse(settings.api_tokens)
        self.store = wiring.open_store(settings)
        self.embedder = embedder
        self.index = None
        self.service: SearchService | None = None
        self.cluster_lookup = None
        self.ready = threading.Event()
        self.load_error: str | None = None

    def load(self) -> None:
        try:
            if self.embedder is None:
                from indexer.embed import SerialEmbedder
                self.embedder = SerialEmbedder(wiring.load_embedder(self.settings))
            if not self.store.catalog.model_meta():
                raise FlagmatchError("the store is empty: ingest images first", code="empty_store")
            self.index = wiring.open_index(self.store, self.settings)
            self.cluster_lookup = wiring.cluster_lookup(self.store)
            self.service = SearchService(self.store, self.index, self.embedder, max_pixels=self.settings.max_pixels,
                                         cluster_lookup=self.cluster_lookup)
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

    @app.errorhandler(413)
    def _too_large(exc: Any) -> Response:
        resp = jsonify({"error": {"code": "body_too_large",
                                  "message": f"request body over {settings.max_upload_bytes:,} bytes"}})
        resp.status_code = 413
        return resp

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
