"""Copy families: a cluster member can belong to a family of verified copies of one picture inside its cluster
(``clustering.job.copy_families``); runs made before have none.

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a catalog from before migrations got today's tables from create_all: the step is skipped where done
    if "family" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("cluster_members")}:
        op.add_column("cluster_members", sa.Column("family", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cluster_members") as batch:
        batch.drop_column("family")
