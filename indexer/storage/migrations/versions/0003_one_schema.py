"""One schema: the audit log, the clustering job's tables, viewer sessions and write-request ids join the
catalog's history. Before this revision each had a metadata of its own, created with ``create_all`` when
its module first opened the database, so a store may already hold any of them (with these columns) or
none: each table is created where it is missing and left as it is where it exists.

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("audit_log", "cluster_runs", "cluster_identities", "run_clusters", "cluster_members",
          "viewer_sessions", "write_requests")


def _create(name: str, *columns: sa.Column | sa.Index | sa.ForeignKeyConstraint) -> None:
    if not sa.inspect(op.get_bind()).has_table(name):
        cols = [c for c in columns if not isinstance(c, sa.Index)]
        op.create_table(name, *cols)
        for ix in (c for c in columns if isinstance(c, sa.Index)):
            op.create_index(ix.name, name, [str(e) for e in ix.expressions])


def upgrade() -> None:
    _create("audit_log",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("at", sa.DateTime(), nullable=False),
            sa.Column("actor", sa.String(200), nullable=False),
            sa.Column("action", sa.String(40), nullable=False),
            sa.Column("target", sa.String(200), nullable=False),
            sa.Column("detail", sa.Text(), nullable=False),
            sa.Index("ix_audit_log_at", "at"), sa.Index("ix_audit_log_actor", "actor"))
    _create("cluster_runs",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("scope", sa.String(16), nullable=False),
            sa.Column("since", sa.DateTime(), nullable=True),
            sa.Column("model_id", sa.String(128), nullable=False),
            sa.Column("params", sa.Text(), nullable=False),
            sa.Column("n_images", sa.Integer(), nullable=False),
            sa.Column("n_clusters", sa.Integer(), nullable=False),
            sa.Column("n_noise", sa.Integer(), nullable=False),
            sa.Column("summary", sa.Text(), nullable=False),
            sa.Column("timings", sa.Text(), nullable=False),
            sa.Column("started_at", sa.DateTime(), nullable=False),
            sa.Column("finished_at", sa.DateTime(), nullable=True),
            sa.Column("error", sa.Text(), nullable=True))
    _create("cluster_identities",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("name", sa.String(200), nullable=True),
            sa.Column("label", sa.String(200), nullable=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("reviewed_by", sa.String(200), nullable=True),
            sa.Column("reviewed_at", sa.DateTime(), nullable=True),
            sa.Column("first_run_id", sa.Integer(), nullable=False))
    _create("run_clusters",
            sa.Column("run_id", sa.Integer(), sa.ForeignKey("cluster_runs.id"), primary_key=True),
            sa.Column("cluster_id", sa.Integer(), sa.ForeignKey("cluster_identities.id"), primary_key=True),
            sa.Column("label", sa.Integer(), nullable=False),
            sa.Column("size", sa.Integer(), nullable=False),
            sa.Column("prev_size", sa.Integer(), nullable=True),
            sa.Column("change", sa.String(16), nullable=False),
            sa.Column("persistence", sa.Float(), nullable=True),
            sa.Column("mean_probability", sa.Float(), nullable=False),
            sa.Column("exemplars", sa.Text(), nullable=False),
            sa.Column("x", sa.Float(), nullable=False),
            sa.Column("y", sa.Float(), nullable=False))
    _create("cluster_members",
            sa.Column("run_id", sa.Integer(), sa.ForeignKey("cluster_runs.id"), primary_key=True),
            sa.Column("image_id", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("cluster_id", sa.Integer(), nullable=True),
            sa.Column("probability", sa.Float(), nullable=False),
            sa.Column("outlier_score", sa.Float(), nullable=False),
            sa.Column("x", sa.Float(), nullable=False),
            sa.Column("y", sa.Float(), nullable=False),
            sa.Column("provisional", sa.Boolean(), nullable=False),
            sa.Index("ix_members_run_cluster", "run_id", "cluster_id"))
    _create("viewer_sessions",
            sa.Column("id_sha256", sa.String(64), primary_key=True),
            sa.Column("actor", sa.String(200), nullable=False),
            sa.Column("token_fingerprint", sa.String(64), nullable=False),
            sa.Column("opened_at", sa.DateTime(), nullable=False),
            sa.Column("last_seen", sa.DateTime(), nullable=False),
            sa.Column("ended_at", sa.DateTime(), nullable=True),
            sa.Column("end_reason", sa.String(40), nullable=True))
    _create("write_requests",
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("actor", sa.String(200), nullable=False),
            sa.Column("at", sa.DateTime(), nullable=False))


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
