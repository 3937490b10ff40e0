"""How flagmatch's processes log (setting ``log_format``): one line per record on stderr, as text or as
one JSON object (``python-json-logger``, the formatter log shippers expect: every ``extra`` field of a
record becomes a key of its object, an exception its ``exc_info`` string, newlines escaped so a line is
always a record).

The server (``flagmatch serve``) always configures logging, gunicorn's own logger included, so its
lines share one format; the CLI's commands do when ``log_format`` is ``json`` (in text, a terminal
keeps Python's default: warnings and errors only, next to the progress bars).

Never logged: image bytes, tokens, cookies, request bodies or query strings. The access line of a
request (``web.app``'s edges) names the route, the path, the status, the actor, the request id and the
stage timings; nothing else of the request."""
from __future__ import annotations

import logging
import sys
from typing import Any

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(process)d %(message)s"  # and "timestamp": ISO 8601, UTC
_RENAME = {"levelname": "level", "name": "logger", "process": "pid"}
# libraries' start-up chatter at INFO (which CPU build FAISS loaded, Alembic's plugins)
QUIET = ("faiss.loader", "alembic.runtime.plugins")


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (a test runner's capture, a CLI
    runner's buffer), never to a stream that was replaced and closed since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "text":
        return logging.Formatter(TEXT)
    from pythonjsonlogger.json import JsonFormatter
    return JsonFormatter(JSON_FIELDS, rename_fields=_RENAME, json_ensure_ascii=False, timestamp=True)


def configure(fmt: str, level: int = logging.INFO) -> None:
    """Route every logger through one stderr handler in ``fmt`` (idempotent: a second call replaces the
    handler the first one installed, never adds another)."""
    handler = StderrHandler()
    handler.setFormatter(formatter(fmt))
    handler.set_name("flagmatch")
    for name in ("", "gunicorn.error"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "flagmatch"]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
    # gunicorn's logger writes its own lines: keep them from reaching the root's handler a second time
    logging.getLogger("gunicorn.error").propagate = False
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def gunicorn_config(fmt: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: its master's and workers' lines in ``fmt`` from the first line on."""
    formatter(fmt)  # refuse an unknown format before the server starts
    form = {"()": "flagmatch.logs.formatter", "fmt": fmt}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"flagmatch": form},
        "handlers": {"stderr": {"()": "flagmatch.logs.StderrHandler", "formatter": "flagmatch"}},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {"gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
                    "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False},
                    **{name: {"level": "WARNING"} for name in QUIET}},
    }
