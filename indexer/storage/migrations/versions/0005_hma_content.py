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


def upgrade() -> None:
    with op.batch_alter_table("bank_entries") as t:
        t.add_column(sa.Column("content_id", sa.Integer(), nullable=True))
        t.add_column(sa.Column("note", sa.String(255), nullable=True))
        t.add_column(sa.Column("meta", sa.Text(), nullable=True))
        t.add_column(sa.Column("disable_until_ts", sa.Integer(), nullable=True))
        t.create_index("ix_bank_entries_content_id", ["content_id"])
    op.execute("UPDATE bank_entries SET content_id = id")
    with op.batch_alter_table("banks") as t:
        t.add_column(sa.Column("enabled_ratio", sa.Float(), nullable=True))
    op.execute("UPDATE banks SET enabled_ratio = CASE WHEN enabled THEN 1.0 ELSE 0.0 END")
    with op.batch_alter_table("banks") as t:
        t.alter_column("enabled_ratio", existing_type=sa.Float(), nullable=False)
    op.create_table("exchanges",
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
    op.create_table("signal_type_config",
                    sa.Column("name", sa.String(32), primary_key=True),
                    sa.Column("enabled_ratio", sa.Float(), nullable=False))
    op.create_table("exchange_credentials",
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
