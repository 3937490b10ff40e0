"""`flagmatch serve`: gunicorn (a production WSGI server) with threaded workers. Each worker builds
its own app after the fork, so the model is loaded once per worker and torch's threads are pinned
to its share of the cores. With several workers, prometheus-client's multiprocess mode sums their
counters and histograms (a folder of per-process files, made fresh by the master for each start and
removed when it stops), so ``/metrics`` answers for the server whichever worker is asked."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication

from flagmatch import logs
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
        hooks: dict[str, Any] = {}
        if s.workers > 1 and MULTIPROC_ENV not in os.environ:
            # set before any worker imports prometheus_client: the mode is chosen at its import
            folder = tempfile.mkdtemp(prefix="flagmatch-metrics-")
            os.environ[MULTIPROC_ENV] = folder
            hooks = {"child_exit": _worker_gone, "on_exit": lambda _arbiter: shutil.rmtree(folder, True)}
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
            "logconfig_dict": logs.gunicorn_config(s.log_format),
            "limit_request_line": 8190,
            **hooks,
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


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _worker_gone(_arbiter: Any, worker: Any) -> None:
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)  # its live gauges leave; its counts stay in the sums


def serve(settings: Settings) -> None:
    FlagmatchServer(settings).run()
