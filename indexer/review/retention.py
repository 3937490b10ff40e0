"""Retention: how long what a decision left behind is kept (``flagmatch retention``, run daily by cron or a
timer). Rules, each off at 0 days:

- **Thumbnails of unflagged images**: an image a reviewer unflagged (judged not unsafe) more than
  ``unflagged_thumbs_days`` ago, and not flagged again since, keeps its catalog row and raw vector (it is
  still found, still known by its hashes) but not its thumbnail: the row says so first (one transaction
  with the audit row), then the file goes. Deleted images need no rule: a deletion removes the thumbnail
  and erases the raw vector at once (``indexer.review.actions.delete_images``).
- **Audit rows** older than ``audit_days`` are deleted — never fewer than ``AUDIT_FLOOR_DAYS`` (a
  shorter setting is refused), always the oldest, and the purge itself is recorded by a new row.
- **Viewer sessions** ended or idle for more than ``sessions_days`` are forgotten, without an audit row (a
  session's row holds no content and only serves to refuse its cookie, which its limits already do; the
  sign-in itself is in the audit log).

A dry run counts what would go and changes nothing."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from indexer.errors import InvalidInputError
from indexer.storage.audit import AuditLog
from indexer.storage.sessions import SessionStore
from indexer.storage.store import Store
from indexer.storage.tables import utcnow

AUDIT_FLOOR_DAYS = 365
BATCH = 10_000


@dataclass(frozen=True)
class Policy:
    unflagged_thumbs_days: int = 0
    audit_days: int = 0
    sessions_days: int = 30

    def __post_init__(self) -> None:
        if min(self.unflagged_thumbs_days, self.audit_days, self.sessions_days) < 0:
            raise InvalidInputError("retention periods are days, 0 (keep) or more", code="bad_parameter")
        if 0 < self.audit_days < AUDIT_FLOOR_DAYS:
            raise InvalidInputError(f"audit rows are kept at least {AUDIT_FLOOR_DAYS} days (asked: "
                                    f"{self.audit_days})", code="bad_parameter")


@dataclass(frozen=True)
class Applied:
    thumbnails: int
    audit_rows: int
    sessions: int
    dry_run: bool


def apply_retention(store: Store, audit: AuditLog, sessions: SessionStore, policy: Policy, *, actor: str,
                    dry_run: bool = False, now: dt.datetime | None = None) -> Applied:
    now = now or utcnow()
    thumbs = 0
    if policy.unflagged_thumbs_days:
        cutoff = now - dt.timedelta(days=policy.unflagged_thumbs_days)
        while batch := store.catalog.unflagged_before(cutoff, BATCH):
            thumbs += len(batch)
            if dry_run:
                break  # counting one batch is enough to say there is work
            ids = [i for i, _ in batch]
            frames = [f.thumb_key for fs in store.catalog.keyframes(ids).values() for f in fs if f.thumb_key]
            with store.catalog.transaction() as tx:
                store.catalog.forget_thumbnails(ids, tx=tx)
                audit.record(actor, "retention", "thumbnails", tx=tx, ids=ids, days=policy.unflagged_thumbs_days)
            # named by the image's own sha256 (a keyframe's: its video's and its offset): no other image shares it
            for key in [k for _, k in batch] + frames:
                store.thumb_path(key).unlink(missing_ok=True)
    rows = 0
    if policy.audit_days:
        cutoff = now - dt.timedelta(days=policy.audit_days)
        if dry_run:
            rows = audit.count_before(cutoff)
        else:
            with store.catalog.transaction() as tx:
                rows = audit.purge_before(cutoff, tx=tx)
                if rows:
                    audit.record(actor, "retention", "audit", tx=tx, deleted_rows=rows, before=cutoff.isoformat(),
                                 days=policy.audit_days)
    gone = 0
    if policy.sessions_days and not dry_run:
        gone = sessions.purge_before(now - dt.timedelta(days=policy.sessions_days))
    return Applied(thumbs, rows, gone, dry_run)
