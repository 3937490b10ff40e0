"""Video: an item has a kind ("image" or "video") and a duration; a video's keyframes are rows of their own with
their offsets, vectors and thumbnails; a stored video's vPDQ sits beside its MD5; a bank entry can carry a
payload (a vPDQ, kilobytes long, keyed in ``signal`` by its sha256).

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    # a catalog from before migrations got today's tables from create_all: each step is skipped where done
    have = _columns("images")
    if "kind" not in have:  # plain ADD COLUMNs: rebuilding ``images`` would drop the keys that point at it
        op.add_column("images", sa.Column("kind", sa.String(8), nullable=False, server_default="image"))
    if "duration_s" not in have:
        op.add_column("images", sa.Column("duration_s", sa.Float(), nullable=True))
    if "vpdq" not in _columns("image_signals"):
        op.add_column("image_signals", sa.Column("vpdq", sa.Text(), nullable=True))
    if "payload" not in _columns("bank_entries"):
        op.add_column("bank_entries", sa.Column("payload", sa.Text(), nullable=True))
    if not sa.inspect(op.get_bind()).has_table("keyframes"):
        op.create_table("keyframes",
                        sa.Column("id", sa.Integer(), primary_key=True),
                        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
                        sa.Column("offset_s", sa.Float(), nullable=False),
                        sa.Column("scene_cut", sa.Boolean(), nullable=False),
                        sa.Column("p_unsafe", sa.Float(), nullable=False),
                        sa.Column("thumb_key", sa.String(128), nullable=False),
                        sa.Column("vec_segment", sa.Integer(), nullable=False),
                        sa.Column("vec_row", sa.Integer(), nullable=False))
        op.create_index("ix_keyframes_image_id", "keyframes", ["image_id"])


def downgrade() -> None:
    op.drop_index("ix_keyframes_image_id", "keyframes")
    op.drop_table("keyframes")
    for table, col in (("bank_entries", "payload"), ("image_signals", "vpdq"), ("images", "duration_s"),
                       ("images", "kind")):
        with op.batch_alter_table(table) as t:
            t.drop_column(col)
