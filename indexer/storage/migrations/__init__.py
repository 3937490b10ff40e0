"""The catalog's schema history, as Alembic migrations (applied by ``indexer.storage.schema.upgrade``)."""
