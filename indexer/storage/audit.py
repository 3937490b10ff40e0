"""The append-only audit log: every reveal of a thumbnail and every decision, from the viewer, the API
or the CLI — who, what, when.
Rows are only ever inserted; nothing in flagmatch updates them, and only the retention job deletes the
oldest (never younger than its floor, and itself audited). A row written while a request
is served carries its request id (``detail.request_id``, from ``REQUEST_ID``, which the server's edge
sets), the same id as the request's log line and its error answer."""
from __future__ import annotations

import datetime as dt
import json
from contextvars import ContextVar
from dataclasses import dataclass
import re
from typing import Any, Iterator, Mapping

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from indexer.storage.catalog import Transaction
from indexer.storage.tables import utcnow
from indexer.storage.tables import AuditRow
from indexer.errors import InvalidInputError


MAX_PAGE = 1000
REQUEST_ID: ContextVar[str | None] = ContextVar("flagmatch_request_id", default=None)


@dataclass(frozen=True)
class AuditQuery:
    actor: str | None = None
    action: str | None = None
    target: str | None = None      # exact, or a prefix ending in "*" ("cluster:*", "image:12")
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    before_id: int | None = None


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, actor: str, action: str, target: str, *, tx: Transaction | None = None, **detail: Any) -> int:
        """Append one row and return its id; inside ``tx`` (``Catalog.transaction``) it commits with the
        decision it records."""
        request_id = REQUEST_ID.get()
        if request_id is not None:
            detail.setdefault("request_id", request_id)
        stmt = insert(AuditRow).values(at=utcnow(), actor=actor, action=action, target=target,
                                       detail=json.dumps(detail, default=str))
        if tx is not None:
            return int(tx.execute(stmt).inserted_primary_key[0])
        with self.engine.begin() as c:
            return int(c.execute(stmt).inserted_primary_key[0])

    def trail(self, batch: int = 10_000) -> "Iterator[tuple[int, dt.datetime]]":
        """(id, time) of every row in id order, streamed (the consistency check reads the whole trail)."""
        with self.engine.connect() as c:
            for row_id, at in c.execute(select(AuditRow.id, AuditRow.at).order_by(AuditRow.id)).yield_per(batch):
                yield int(row_id), at

    def count_before(self, cutoff: dt.datetime) -> int:
        from sqlalchemy import func
        with self.engine.connect() as c:
            return int(c.scalar(select(func.count()).select_from(AuditRow).where(AuditRow.at < cutoff)) or 0)

    def purge_before(self, cutoff: dt.datetime, tx: Transaction | None = None) -> int:
        """Delete the rows older than ``cutoff`` (retention, ``indexer.review.retention``: the only deletion
        ever made here, always of the oldest rows, and itself recorded by a new row); how many."""
        from sqlalchemy import delete
        stmt = delete(AuditRow).where(AuditRow.at < cutoff)
        if tx is not None:
            return int(tx.execute(stmt).rowcount or 0)
        with self.engine.begin() as c:
            return int(c.execute(stmt).rowcount or 0)

    def event(self, event_id: int) -> AuditEvent | None:
        with self.engine.connect() as c:
            r = c.execute(select(AuditRow).where(AuditRow.id == event_id)).first()
        return None if r is None else AuditEvent(r.id, r.at, r.actor, r.action, r.target, json.loads(r.detail))

    def revealed_recently(self, actor: str, target: str, minutes: int = 30) -> bool:
        since = utcnow() - dt.timedelta(minutes=minutes)
        with self.engine.connect() as c:
            return c.execute(select(AuditRow.id).where(AuditRow.actor == actor, AuditRow.action == "reveal",
                                                       AuditRow.target == target, AuditRow.at >= since)
                             .limit(1)).first() is not None

    def events(self, limit: int = 100, target: str | None = None, *, query: "AuditQuery | None" = None
               ) -> list[AuditEvent]:
        """Newest first. ``query`` filters by actor, action, target (a trailing ``*`` matches a prefix)
        and time, and pages with ``before_id`` (the id of the last row of the previous page)."""
        q = query or AuditQuery(target=target)
        stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
        if q.actor:
            stmt = stmt.where(AuditRow.actor == q.actor)
        if q.action:
            stmt = stmt.where(AuditRow.action == q.action)
        if q.target:
            stmt = stmt.where(AuditRow.target.startswith(q.target[:-1], autoescape=True) if q.target.endswith("*")
                              else AuditRow.target == q.target)
        if q.since is not None:
            stmt = stmt.where(AuditRow.at >= q.since)
        if q.until is not None:
            stmt = stmt.where(AuditRow.at < q.until)
        if q.before_id is not None:
            stmt = stmt.where(AuditRow.id < q.before_id)
        with self.engine.connect() as c:
            return [AuditEvent(r.id, r.at, r.actor, r.action, r.target, json.loads(r.detail))
                    for r in c.execute(stmt).all()]


def to_json(e: AuditEvent) -> dict[str, Any]:
    return {"id": e.id, "at": e.at.replace(tzinfo=dt.timezone.utc).isoformat(), "actor": e.actor,
            "action": e.action, "target": e.target, "detail": e.detail}


def to_csv(events: list[AuditEvent]) -> str:
    """id, at, actor, action, target, detail (JSON) — one row per event, RFC 4180 quoting."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "at", "actor", "action", "target", "detail"])
    for e in events:
        row = to_json(e)
        w.writerow([row["id"], row["at"], e.actor, e.action, e.target, json.dumps(e.detail, sort_keys=True)])
    return buf.getvalue()


def parse_query(args: Mapping[str, Any]) -> tuple[AuditQuery, int]:
    """Filters and a page size from query parameters (the API, the CLI's JSON and the viewer share them)."""
    known = {"actor", "action", "target", "since", "until", "before_id", "limit", "format"}
    unknown = set(args) - known
    if unknown:
        raise InvalidInputError(f"unknown parameter(s): {', '.join(sorted(unknown))}", code="bad_parameter")

    def when(name: str) -> dt.datetime | None:
        raw = args.get(name)
        if raw is None:
            return None
        try:
            t = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
            return t.astimezone(dt.timezone.utc).replace(tzinfo=None) if t.tzinfo else t
        except (ValueError, OverflowError):
            raise InvalidInputError(f"{name} must be an ISO 8601 time", code="bad_parameter") from None

    def integer(name: str, default: int | None, lo: int, hi: int) -> int | None:
        raw = args.get(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]{1,19}", str(raw)) or not lo <= int(raw) <= hi:
            raise InvalidInputError(f"{name} must be an integer from {lo} to {hi}", code="bad_parameter")
        return int(raw)

    text: dict[str, str | None] = {}
    for key in ("actor", "action", "target"):
        raw = args.get(key)
        if raw is not None and len(str(raw)) > 200:
            raise InvalidInputError(f"{key} is at most 200 characters", code="bad_parameter")
        text[key] = str(raw).strip() or None if raw is not None else None
    q = AuditQuery(text["actor"], text["action"], text["target"], when("since"), when("until"),
                   integer("before_id", None, 1, 2**63 - 1))
    return q, int(integer("limit", 100, 1, MAX_PAGE) or 100)
