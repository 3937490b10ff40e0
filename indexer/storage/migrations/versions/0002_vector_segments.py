"""Raw vectors in per-run segment files: images.vec_segment and images.vec_row (NULL for the rows of the
single vectors.f32 of older stores, whose row is the image id). Flag sources widened to 128 characters
(``head:<label>@v<n>`` with a long label did not fit in 64 on PostgreSQL, which enforces lengths).

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    have = _columns("images")
    with op.batch_alter_table("images") as t:
        if "vec_segment" not in have:
            t.add_column(sa.Column("vec_segment", sa.Integer(), nullable=True))
        if "vec_row" not in have:
            t.add_column(sa.Column("vec_row", sa.Integer(), nullable=True))
    if op.get_bind().dialect.name != "sqlite":  # SQLite does not enforce VARCHAR lengths
        op.alter_column("images", "flag_source", type_=sa.String(128), existing_nullable=True)
        op.alter_column("flag_events", "source", type_=sa.String(128), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("images") as t:
        t.drop_column("vec_row")
        t.drop_column("vec_segment")
