"""Baseline: the catalog as flagmatch created it before migrations existed (images, paths, flag events,
ingest runs and errors, hashes, banks, checkpoints, verdicts, head scores). Stores from then are stamped
at this revision; their missing tables were already created, table by table, when they were opened.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # the baseline tables are created by indexer.storage.schema before stamping (see its docstring)


def downgrade() -> None:
    pass
