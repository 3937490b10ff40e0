"""The runtime: every part a server process needs, built once from Settings and handed to the API
and the viewer (``web.app.create_app``). The store, the audit log and the cluster store are opened at
once; the model, the indexes and the search service by ``load`` (``ready`` is set then, or
``load_error`` says why not)."""
from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import TYPE_CHECKING, Literal

from flagmatch import wiring
from flagmatch.settings import Settings
from indexer.storage.clusters import ClusterStore
from indexer.storage.audit import AuditLog
from indexer.models.embed import Embedder, SerialEmbedder
from search.auth import TokenSet
from indexer.storage.sessions import RequestLedger, SessionStore
from search.service import SearchService

if TYPE_CHECKING:
    from flask import Flask
    from indexer.vectors.vector_index import VectorIndex

log = logging.getLogger(__name__)
LoadMode = Literal["now", "background", "none"]


class Runtime:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.tokens = TokenSet.parse(settings.api_tokens)
        self.store = wiring.open_store(settings)
        self.audit = AuditLog(self.store.catalog.engine)
        self.clusters = ClusterStore(self.store)
        self.sessions = SessionStore(self.store.catalog.engine, idle=dt.timedelta(minutes=settings.session_idle),
                                     absolute=dt.timedelta(hours=settings.session_max))
        self.requests = RequestLedger(self.store.catalog.engine)  # idempotent writes
        self.embedder = embedder
        self.index: VectorIndex | None = None
        self.service: SearchService | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None

    def load(self) -> None:
        """Load the model, the indexes and the search service; a failure is kept for /readyz."""
        try:
            if self.embedder is None:
                self.embedder = SerialEmbedder(wiring.load_embedder(self.settings, self.store),
                                               lanes=self.settings.serve_lanes)
            if not self.store.catalog.model_meta():
                # a new store serves from the start (an HMA deployment may hold banks and no images): it is
                # tied to the loaded model as its first ingest would tie it
                info = self.embedder.info
                self.store.bind_model(info.model_id, info.dim, info.preprocessing, info.source)
            self.index = wiring.open_index(self.store, self.settings)
            self.service = wiring.search_service(self.settings, self.store, self.index, self.embedder)
            if self.service.hashes is not None:  # the PDQ indexes load before the first request, not during it
                _ = self.service.hashes.bank_index, self.service.hashes.image_index
            self.ready.set()
        except Exception as exc:  # reported by /readyz; the process stays up to say so
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("flagmatch failed to load")

    def session_actor(self, session_id: str | None) -> str | None:
        """The moderator of a live viewer session bound to a token still configured, else None."""
        return self.sessions.actor(session_id, self.tokens.fingerprints())

    def start(self, mode: LoadMode) -> None:
        """``now``: block until loaded; ``background``: load on a thread (the server answers /healthz
        and a 503 /readyz meanwhile); ``none``: never (tests of the not-ready state)."""
        if mode == "now":
            self.load()
        elif mode == "background":
            threading.Thread(target=self.load, name="flagmatch-load", daemon=True).start()


def build_app(settings: Settings, *, embedder: Embedder | None = None, load: LoadMode = "now") -> "Flask":
    """The API and the viewer over a Runtime built from ``settings``."""
    from web.app import create_app
    runtime = Runtime(settings, embedder)
    app = create_app(runtime)
    runtime.start(load)
    return app
