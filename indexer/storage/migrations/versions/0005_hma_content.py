"""HMA's bank content and exchanges. A bank entry belongs to a piece of content (``content_id``, the first
entry's id; every existing entry is its own content, so the ids HMA clients hold stay valid) with a note, the
client's metadata and a "disabled until" time; a bank has HMA's fractional ``enabled_ratio`` (1 where it was
enabled, 0 where not); hash exchanges, their credentials and HMA's signal type switches get tables of their own.

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def _indexes(table: str) -> set[str]:
    return {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes(table)}


def _create(name: str, *columns: sa.Column) -> None:
    if not sa.inspect(op.get_bind()).has_table(name):
        op.create_table(name, *columns)


def upgrade() -> None:
    # a catalog from before migrations got today's tables from create_all before the revisions ran: each
    # step is skipped where its result is already there
    have = _columns("bank_entries")
    with op.batch_alter_table("bank_entries") as t:
        for col in (sa.Column("content_id", sa.Integer(), nullable=True), sa.Column("note", sa.String(255), nullable=True),
                    sa.Column("meta", sa.Text(), nullable=True),
                    sa.Column("disable_until_ts", sa.Integer(), nullable=True)):
            if col.name not in have:
                t.add_column(col)
        if "ix_bank_entries_content_id" not in _indexes("bank_entries"):
            t.create_index("ix_bank_entries_content_id", ["content_id"])
    op.execute("UPDATE bank_entries SET content_id = id WHERE content_id IS NULL")
    if "enabled_ratio" not in _columns("banks"):
        # a plain ADD COLUMN with a default (no table rebuild: on SQLite rebuilding ``banks`` would drop a
        # table bank entries' foreign key points at)
        op.add_column("banks", sa.Column("enabled_ratio", sa.Float(), nullable=False, server_default="1.0"))
        op.execute("UPDATE banks SET enabled_ratio = CASE WHEN enabled THEN 1.0 ELSE 0.0 END")
    _create("exchanges",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("api", sa.String(64), nullable=False),
            sa.Column("config", sa.Text(), nullable=False),
            sa.Column("enabled", sa.Boolean(), nullable=False),
            sa.Column("checkpoint", sa.Text(), nullable=True),
            sa.Column("checkpoint_ts", sa.Integer(), nullable=True),
            sa.Column("running_since", sa.Integer(), nullable=True),
            sa.Column("last_complete_ts", sa.Integer(), nullable=True),
            sa.Column("last_succeeded", sa.Boolean(), nullable=True),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("up_to_date", sa.Boolean(), nullable=False),
            sa.Column("fetched_items", sa.Integer(), nullable=False))
    _create("signal_type_config",
            sa.Column("name", sa.String(32), primary_key=True),
            sa.Column("enabled_ratio", sa.Float(), nullable=False))
    _create("exchange_credentials",
            sa.Column("api", sa.String(64), primary_key=True),
            sa.Column("credential", sa.Text(), nullable=False))


def downgrade() -> None:
    op.drop_table("exchange_credentials")
    op.drop_table("signal_type_config")
    op.drop_table("exchanges")
    with op.batch_alter_table("banks") as t:
        t.drop_column("enabled_ratio")
    with op.batch_alter_table("bank_entries") as t:
        t.drop_index("ix_bank_entries_content_id")
        for c in ("disable_until_ts", "meta", "note", "content_id"):
            t.drop_column(c)
