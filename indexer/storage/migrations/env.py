"""Alembic's entry point for the catalog: migrations run on the connection ``indexer.storage.schema`` hands over
(inside its lock and transaction), never on a URL of their own."""
from __future__ import annotations

from alembic import context

from indexer.storage.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
context.run_migrations()
