"""A real PostgreSQL server for the tests: each test (or module) gets a database of its own, made with
``CREATE DATABASE`` and dropped afterwards. The server comes from ``FLAGMATCH_TEST_POSTGRES``, an
SQLAlchemy URL of a database the tests may create others from (``.ci/run`` starts Debian's cluster and
sets it, e.g. ``postgresql+psycopg://root@/postgres?host=/var/run/postgresql``). Without it, or when the
server does not answer, the PostgreSQL variants are skipped with the reason — never passed silently."""
from __future__ import annotations

import itertools
import os
import uuid
from functools import lru_cache

import pytest

ENV = "FLAGMATCH_TEST_POSTGRES"
_names = itertools.count()
_created: list[str] = []


@lru_cache(maxsize=1)
def _admin() -> tuple[object | None, str]:
    """(engine, "") when the server answers, else (None, why)."""
    url = os.environ.get(ENV, "")
    if not url:
        return None, f"PostgreSQL tests need a server: set {ENV} to an SQLAlchemy URL (see .ci/run)"
    try:
        from sqlalchemy import create_engine, text
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)
                               if url.startswith("postgresql://") else url, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text("select 1"))
        return engine, ""
    except Exception as exc:  # driver missing, server down, no role: say which
        return None, f"PostgreSQL at {ENV}={url} does not answer: {type(exc).__name__}: {str(exc).splitlines()[0]}"


def require() -> object:
    engine, why = _admin()
    if engine is None:
        pytest.skip(why)
    return engine


def create_database(template: str | None = None) -> str:
    """A new empty database (or a copy of ``template``'s database URL) and its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    engine = require()
    name = f"fm_test_{os.getpid()}_{next(_names)}_{uuid.uuid4().hex[:6]}"
    with engine.connect() as c:  # type: ignore[attr-defined]
        if template:
            src = make_url(template).database
            # a template may have no other session: close what the module's own store left open
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": src})
            c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{src}"'))
        else:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    _created.append(name)
    return make_url(engine.url).set(database=name).render_as_string(hide_password=False)  # type: ignore[attr-defined]


def drop_database(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    engine, _ = _admin()
    if engine is None:
        return
    with engine.connect() as c:  # type: ignore[attr-defined]
        c.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def drop_all() -> None:
    """Drop every database this test process created (the end of the session)."""
    from sqlalchemy import text
    engine, _ = _admin()
    if engine is None:
        return
    with engine.connect() as c:  # type: ignore[attr-defined]
        for name in _created:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    _created.clear()
    engine.dispose()  # type: ignore[attr-defined]
