"""Every table flagmatch keeps, on one SQLAlchemy metadata under one Alembic history
(``indexer.storage.migrations``): the catalog (images, paths, flags, hashes, banks, checkpoints), reviewer
verdicts, the review queue and head scores, the audit log, the clustering job's runs and identities, viewer
sessions and write-request ids. ORM rows never leave ``indexer.storage``: its repositories hand out frozen
dataclasses."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MAX_LABEL = 200  # a policy label (flags, verdicts, heads, clusters)
MAX_REASON = 2000  # a reviewer's reason or note
MAX_ACTOR = 200


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------- catalog


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    p_unsafe: Mapped[float] = mapped_column(Float)
    model_id: Mapped[str] = mapped_column(String(128))
    thumb_key: Mapped[str] = mapped_column(String(128))
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    flag_source: Mapped[str | None] = mapped_column(String(128), nullable=True)  # model, manual, … head:<label>@v<n>
    flag_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    flagged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # where the raw vector is (indexer.storage.vectors): a writer run's segment file and its row there; NULL for
    # images written before segments existed (row = image id in the single vectors.f32)
    vec_segment: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vec_row: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # "image", or "video": a clip whose vector is its keyframes' mean and whose tile is its most unsafe keyframe
    kind: Mapped[str] = mapped_column(String(8), default="image", server_default="image")
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # a video's length


class KeyframeRow(Base):
    """One keyframe of a video item (indexer.media.video): where in the clip, its own raw vector, P(unsafe) and
    thumbnail. Ids are given in increasing order with the video's own row (the frame index follows them)."""
    __tablename__ = "keyframes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    offset_s: Mapped[float] = mapped_column(Float)
    scene_cut: Mapped[bool] = mapped_column(Boolean, default=False)
    p_unsafe: Mapped[float] = mapped_column(Float)
    thumb_key: Mapped[str] = mapped_column(String(128))
    vec_segment: Mapped[int] = mapped_column(Integer)
    vec_row: Mapped[int] = mapped_column(Integer)


class PathRow(Base):
    __tablename__ = "image_paths"
    __table_args__ = (UniqueConstraint("image_id", "path"), Index("ix_paths_external", "external_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    first_seen: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class FlagEventRow(Base):
    """Append-only: every flag and unflag, who/what/when/why."""
    __tablename__ = "flag_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    action: Mapped[str] = mapped_column(String(8))  # flag | unflag
    source: Mapped[str] = mapped_column(String(128))
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class IngestErrorRow(Base):
    __tablename__ = "ingest_errors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    path: Mapped[str] = mapped_column(Text)
    code: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class IngestRunRow(Base):
    __tablename__ = "ingest_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    model_id: Mapped[str] = mapped_column(String(128))
    backend: Mapped[str] = mapped_column(String(16))
    precision: Mapped[str] = mapped_column(String(8))
    counts: Mapped[str] = mapped_column(Text, default="{}")


class ImageSignalRow(Base):
    """The hashes an image is known by outside flagmatch (indexer.media.hashes). A row of its own, so stores made
    before hashes existed gain the table on open and are back-filled by ``flagmatch hashes backfill``."""
    __tablename__ = "image_signals"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True, autoincrement=False)
    md5: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    pdq: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: could not be hashed
    pdq_quality: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vpdq: Mapped[str | None] = mapped_column(Text, nullable=True)  # a video's vPDQ, threatexchange's signal string


class BankRow(Base):
    """A named list of signals from one source (indexer.hashbanks.banks)."""
    __tablename__ = "banks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(Text, default="")
    role: Mapped[str] = mapped_column(String(16), default="match")  # match | negative
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # HMA's matching_enabled_ratio: the share of HMA lookups the bank answers (a rollout knob); 0 when off
    enabled_ratio: Mapped[float] = mapped_column(Float, default=1.0)
    pdq_threshold: Mapped[int] = mapped_column(Integer, default=31)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class BankEntryRow(Base):
    """One signal in a bank; its id is the "content id" HMA clients see. Needs no image. Ids are never given
    twice (SQLite's AUTOINCREMENT; PostgreSQL's sequence): the PDQ bank index follows entries by id, and a
    reused id would name another hash there."""
    __tablename__ = "bank_entries"
    __table_args__ = (UniqueConstraint("bank_id", "signal_type", "signal"),
                      Index("ix_bank_entries_signal", "signal_type", "signal"),
                      # the bank index's catch-up: one type's entries past a watermark, in id order
                      Index("ix_bank_entries_type_id", "signal_type", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bank_id: Mapped[int] = mapped_column(ForeignKey("banks.id"), index=True)
    signal_type: Mapped[str] = mapped_column(String(16))
    # the signal; for a vPDQ (kilobytes, too long for a unique index) the sha256 of ``payload``, which holds it
    signal: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)
    quality: Mapped[int | None] = mapped_column(Integer, nullable=True)  # PDQ quality when the list gives it
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tags: Mapped[str] = mapped_column(Text, default="")  # space-separated
    image_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # banked from a stored image
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # HMA's bank content: the signals of one piece of content share its id (the first entry's); the note, the
    # client's metadata and the "disabled until" time are the content's, kept on each of its entries
    content_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    note: Mapped[str | None] = mapped_column(String(255), nullable=True)
    meta: Mapped[str | None] = mapped_column(Text, nullable=True)            # JSON object, as the client sent it
    disable_until_ts: Mapped[int | None] = mapped_column(Integer, nullable=True)  # Unix seconds


class ExchangeRow(Base):
    """A hash exchange (threatexchange's SignalExchangeAPI: ThreatExchange, NCMEC, StopNCII, a local file, the
    static sample) fetched into the bank of the same name (indexer.hashbanks.exchanges)."""
    __tablename__ = "exchanges"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)   # = its bank's name
    api: Mapped[str] = mapped_column(String(64))
    config: Mapped[str] = mapped_column(Text, default="{}")           # the API's collaboration config, JSON
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)  # the API's checkpoint, JSON
    checkpoint_ts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    running_since: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_complete_ts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_succeeded: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    up_to_date: Mapped[bool] = mapped_column(Boolean, default=False)
    fetched_items: Mapped[int] = mapped_column(Integer, default=0)


class SignalTypeRow(Base):
    """A signal type's switch as HMA sets it (``PUT /c/signal_type/<name>``); a type without a row is on."""
    __tablename__ = "signal_type_config"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    enabled_ratio: Mapped[float] = mapped_column(Float)


class ExchangeCredentialRow(Base):
    """An exchange API's credentials (threatexchange's credential dataclass, JSON), set through /c/exchanges."""
    __tablename__ = "exchange_credentials"
    api: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential: Mapped[str] = mapped_column(Text)


class CheckpointRow(Base):
    """Which catalog state a saved index file covers."""
    __tablename__ = "index_checkpoints"
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    image_id: Mapped[int] = mapped_column(Integer)       # highest image id covered
    flag_event_id: Mapped[int] = mapped_column(Integer)  # highest flag event applied
    generation: Mapped[int] = mapped_column(Integer)     # bumps on every retrain/rebuild
    ntotal: Mapped[int] = mapped_column(Integer)
    params: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64))
    saved_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

# ---------------------------------------------------------------- verdicts


class VerdictRow(Base):
    __tablename__ = "verdicts"
    __table_args__ = (Index("ix_verdicts_label_image", "label", "image_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    label: Mapped[str] = mapped_column(String(MAX_LABEL))
    positive: Mapped[bool] = mapped_column(Boolean)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(32))  # viewer | api | cli | cluster | queue | manifest
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class QueueCandidateRow(Base):
    """An unflagged image found near one a reviewer just flagged (retroactive matching): it joins the
    review queue until someone gives a verdict on it for that label."""
    __tablename__ = "queue_candidates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    label: Mapped[str] = mapped_column(String(MAX_LABEL))
    seed_image_id: Mapped[int] = mapped_column(Integer)
    similarity: Mapped[float] = mapped_column(Float)
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

# ---------------------------------------------------------------- heads


class HeadScoreRow(Base):
    __tablename__ = "head_scores"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    label: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    p: Mapped[float] = mapped_column(Float)

# ---------------------------------------------------------------- audit


class AuditRow(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text, default="{}")

# ---------------------------------------------------------------- clusters


class RunRow(Base):
    __tablename__ = "cluster_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done | failed
    scope: Mapped[str] = mapped_column(String(16), default="full")       # full | recent
    since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    model_id: Mapped[str] = mapped_column(String(128))
    params: Mapped[str] = mapped_column(Text)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    n_clusters: Mapped[int] = mapped_column(Integer, default=0)
    n_noise: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[str] = mapped_column(Text, default="{}")
    timings: Mapped[str] = mapped_column(Text, default="{}")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class IdentityRow(Base):
    """A cluster as people know it: keeps its id, name and review across runs."""
    __tablename__ = "cluster_identities"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="unreviewed")
    reviewed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    first_run_id: Mapped[int] = mapped_column(Integer)


class RunClusterRow(Base):
    __tablename__ = "run_clusters"
    run_id: Mapped[int] = mapped_column(ForeignKey("cluster_runs.id"), primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("cluster_identities.id"), primary_key=True)
    label: Mapped[int] = mapped_column(Integer)  # HDBSCAN's label in this run (for incremental assignment)
    size: Mapped[int] = mapped_column(Integer)
    prev_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    change: Mapped[str] = mapped_column(String(16))  # new | grown | shrunk | stable | merged | split
    persistence: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_probability: Mapped[float] = mapped_column(Float)
    exemplars: Mapped[str] = mapped_column(Text)  # JSON list of image ids, most central first
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)


class MemberRow(Base):
    __tablename__ = "cluster_members"
    __table_args__ = (Index("ix_members_run_cluster", "run_id", "cluster_id"),)
    run_id: Mapped[int] = mapped_column(ForeignKey("cluster_runs.id"), primary_key=True)
    image_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: unclustered (noise)
    probability: Mapped[float] = mapped_column(Float)
    outlier_score: Mapped[float] = mapped_column(Float)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    provisional: Mapped[bool] = mapped_column(Boolean, default=False)
    family: Mapped[int | None] = mapped_column(Integer, nullable=True)  # copies of one picture inside the cluster

# ---------------------------------------------------------------- sessions


class SessionRow(Base):
    __tablename__ = "viewer_sessions"
    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    actor: Mapped[str] = mapped_column(String(200))
    token_fingerprint: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)


class RequestRow(Base):
    """A write request's id (the viewer's forms and ``Idempotency-Key`` on the API): claimed before the
    action runs, so a double submit — two clicks, a retried POST, two racing requests — is one action."""
    __tablename__ = "write_requests"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of actor + request id
    actor: Mapped[str] = mapped_column(String(200))
    at: Mapped[dt.datetime] = mapped_column(DateTime)
