"""The append-only audit log: every reveal of a thumbnail and every decision, from the viewer, the API
or the CLI — who, what, when.
Rows are only ever inserted; nothing in flagmatch updates or deletes them."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from indexer.catalog import create_tables, utcnow


class AuditBase(DeclarativeBase):
    pass


class AuditRow(AuditBase):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text, default="{}")


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
        create_tables(AuditBase.metadata, engine)

    def record(self, actor: str, action: str, target: str, **detail: Any) -> None:
        with self.engine.begin() as c:
            c.execute(insert(AuditRow).values(at=utcnow(), actor=actor, action=action, target=target,
                                              detail=json.dumps(detail, default=str)))

    def revealed_recently(self, actor: str, target: str, minutes: int = 30) -> bool:
        since = utcnow() - dt.timedelta(minutes=minutes)
        with self.engine.connect() as c:
            return c.execute(select(AuditRow.id).where(AuditRow.actor == actor, AuditRow.action == "reveal",
                                                       AuditRow.target == target, AuditRow.at >= since)
                             .limit(1)).first() is not None

    def events(self, limit: int = 100, target: str | None = None) -> list[AuditEvent]:
        q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if target is not None:
            q = q.where(AuditRow.target == target)
        with self.engine.connect() as c:
            return [AuditEvent(r.id, r.at, r.actor, r.action, r.target, json.loads(r.detail))
                    for r in c.execute(q).all()]
