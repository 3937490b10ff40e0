"""`flagmatch serve`: gunicorn (a production WSGI server) with threaded workers. Each worker builds
its own app after the fork, so the model is loaded once per worker and torch's threads are pinned
to its share of the cores."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication

from flagmatch.settings import Settings

if TYPE_CHECKING:
    from flask import Flask


class FlagmatchServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, extra: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.extra = extra or {}
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        cfg = {
            "bind": f"{s.host}:{s.port}",
            "workers": max(1, s.workers),
            "threads": max(1, s.threads),
            "worker_class": "gthread",
            "preload_app": False,   # torch and FAISS must be initialised in the worker, after the fork
            "timeout": 120,
            "graceful_timeout": 30,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "info",
            "limit_request_line": 8190,
            **self.extra,
        }
        for key, value in cfg.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from flagmatch.runtime import build_app
        s = self.settings
        if s.torch_threads <= 0:
            s = s.replace(torch_threads=max(1, (os.cpu_count() or 1) // max(1, s.workers)))
        import faiss
        faiss.omp_set_num_threads(1)  # one query per request thread; the server runs several
        # Load before the worker accepts connections: a worker never answers 503 while a ready sibling
        # could have answered. A failed load still serves /healthz and a 503 /readyz saying why.
        return build_app(s, load="now")


def serve(settings: Settings) -> None:
    FlagmatchServer(settings).run()
