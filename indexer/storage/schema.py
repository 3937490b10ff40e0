"""The catalog's schema, created or upgraded in place with Alembic (``indexer/storage/migrations``), on SQLite and
PostgreSQL alike, by whichever process opens the catalog first.

- A new catalog: every table is created from the models and stamped at the newest revision.
- A catalog from before migrations (tables, no ``alembic_version``): its missing tables are created (as
  flagmatch always did on open), it is stamped at the baseline ``0001``, and the later revisions run.
- A migrated catalog: the revisions it lacks run.

Several processes may open one catalog at the same moment (server workers, ingest hosts): the whole step
runs under a lock — a transaction-level advisory lock on PostgreSQL (DDL is transactional there), a file
lock beside the database file on SQLite — and the loser finds the work done."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
ADVISORY_SCHEMA = 0x666D_0003


def _config(conn: Connection):  # type: ignore[no-untyped-def]
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory
    cfg = _config(None)  # type: ignore[arg-type]
    return str(ScriptDirectory.from_config(cfg).get_current_head())


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _sqlite_lock(engine: Engine) -> Iterator[None]:
    db = engine.url.database
    if not db or db == ":memory:":
        yield
        return
    fd = os.open(f"{db}.schema.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def upgrade(engine: Engine, metadata) -> str:  # type: ignore[no-untyped-def]
    """Bring the catalog's schema to the newest revision; returns it."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    head = head_revision()
    lock = _sqlite_lock(engine) if engine.dialect.name == "sqlite" else _nothing()
    with lock, engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_SCHEMA})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return head
        cfg = _config(conn)
        if current is None:
            fresh = not inspect(conn).has_table("images")
            metadata.create_all(conn)  # a new catalog: everything; an older one: the tables it lacks
            command.stamp(cfg, head if fresh else BASELINE)
            if fresh:
                return head
        command.upgrade(cfg, "head")
    return head


@contextmanager
def _nothing() -> Iterator[None]:
    yield
