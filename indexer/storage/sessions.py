"""Viewer sessions kept server-side, in the catalog, and bound to the token that opened them.

The browser holds only a random session id (in Flask's signed cookie); the catalog holds its sha256,
the moderator, the fingerprint of the token they signed in with, and when it was opened and last
used. A session ends at sign-out, when its token is no longer configured (a server restarted without
it), after ``idle`` without a request and at ``absolute`` age — whichever comes first; a copied cookie
is worth nothing after that."""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import Engine, select, update

from indexer.storage.tables import utcnow
from indexer.storage.tables import RequestRow, SessionRow

TOUCH_EVERY = dt.timedelta(seconds=60)  # last_seen is written at most this often per session


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


class SessionStore:
    def __init__(self, engine: Engine, *, idle: dt.timedelta, absolute: dt.timedelta) -> None:
        self.engine, self.idle, self.absolute = engine, idle, absolute

    def open(self, actor: str, token_fingerprint: str) -> str:
        """A new session; returns its id (only its hash is stored)."""
        session_id = secrets.token_urlsafe(32)
        now = utcnow()
        with self.engine.begin() as c:
            c.execute(SessionRow.__table__.insert().values(
                id_sha256=_key(session_id), actor=actor, token_fingerprint=token_fingerprint, opened_at=now,
                last_seen=now))
        return session_id

    def actor(self, session_id: str | None, live_tokens: set[str], now: dt.datetime | None = None) -> str | None:
        """The moderator of a live session, or None (ending it when it has just expired)."""
        if not session_id:
            return None
        now = now or utcnow()
        key = _key(session_id)
        with self.engine.connect() as c:
            row = c.execute(select(SessionRow).where(SessionRow.id_sha256 == key)).first()
        if row is None or row.ended_at is not None:
            return None
        reason = None
        if row.token_fingerprint not in live_tokens:
            reason = "token removed"
        elif now - row.opened_at > self.absolute:
            reason = "expired"
        elif now - row.last_seen > self.idle:
            reason = "idle"
        if reason is not None:
            self.end(session_id, reason, now=now)
            return None
        if now - row.last_seen > TOUCH_EVERY:
            with self.engine.begin() as c:
                c.execute(update(SessionRow).where(SessionRow.id_sha256 == key).values(last_seen=now))
        return str(row.actor)

    def live(self, now: dt.datetime | None = None) -> int:
        """Sessions neither ended nor past their idle or absolute limit."""
        from sqlalchemy import func
        now = now or utcnow()
        with self.engine.connect() as c:
            return int(c.scalar(select(func.count()).select_from(SessionRow).where(
                SessionRow.ended_at.is_(None), SessionRow.last_seen > now - self.idle,
                SessionRow.opened_at > now - self.absolute)) or 0)

    def purge_before(self, cutoff: dt.datetime) -> int:
        """Forget sessions ended, or last used, before ``cutoff`` (retention); how many."""
        from sqlalchemy import delete, or_
        with self.engine.begin() as c:
            return int(c.execute(delete(SessionRow).where(or_(SessionRow.ended_at < cutoff,
                                                              SessionRow.last_seen < cutoff))).rowcount or 0)

    def end(self, session_id: str | None, reason: str, now: dt.datetime | None = None) -> None:
        if not session_id:
            return
        with self.engine.begin() as c:
            c.execute(update(SessionRow).where(SessionRow.id_sha256 == _key(session_id), SessionRow.ended_at.is_(None))
                      .values(ended_at=now or utcnow(), end_reason=reason))


class RequestLedger:
    """Claim a request id once. A claim is released when its action fails, so the same form can be sent again."""

    KEEP = dt.timedelta(days=2)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _key(actor: str, request_id: str) -> str:
        return hashlib.sha256(f"{actor}\x00{request_id}".encode("utf-8", "replace")).hexdigest()

    def claim(self, actor: str, request_id: str) -> bool:
        """True for the first claim of (actor, request id); False when it was claimed already."""
        from sqlalchemy.exc import IntegrityError
        now = utcnow()
        try:
            with self.engine.begin() as c:
                c.execute(RequestRow.__table__.insert().values(key=self._key(actor, request_id), actor=actor, at=now))
        except IntegrityError:
            return False
        if secrets.randbelow(200) == 0:  # now and then, forget claims nobody can still be retrying
            with self.engine.begin() as c:
                c.execute(RequestRow.__table__.delete().where(RequestRow.at < now - self.KEEP))
        return True

    def release(self, actor: str, request_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(RequestRow.__table__.delete().where(RequestRow.key == self._key(actor, request_id)))
