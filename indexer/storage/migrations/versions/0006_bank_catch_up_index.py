"""The PDQ bank index catches up with the catalog before every lookup: "this type's entries past id N, in id
order". Without an index on (signal_type, id) SQLite planned it as a scan of every entry of the type and a
sort (204 ms at 1M entries); with it, a seek that returns nothing when nothing is new.

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a catalog from before migrations got today's tables (and this index) from create_all
    if "ix_bank_entries_type_id" not in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("bank_entries")}:
        op.create_index("ix_bank_entries_type_id", "bank_entries", ["signal_type", "id"])


def downgrade() -> None:
    op.drop_index("ix_bank_entries_type_id", "bank_entries")
