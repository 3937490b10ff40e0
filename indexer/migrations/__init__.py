"""The catalog's schema history, as Alembic migrations (applied by ``indexer.schema.upgrade``)."""
