"""Bank entry ids are never given twice. SQLite gives a deleted highest rowid to the next row unless the table
says AUTOINCREMENT; the PDQ bank index follows entries by id, so a bank or entry deleted and a signal banked
after it left the index matching the old hash under the new entry's id (and never indexing the new one). On
SQLite the table is rebuilt with AUTOINCREMENT, rows and ids kept; PostgreSQL's sequences never reuse.

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("bank_entries", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    pass
