"""Hash banks in the catalog: named lists of signals (PDQ, MD5) from one source, with an enabled switch, a
per-bank PDQ threshold and a role — ``match`` (a hit is evidence) or ``negative`` (known-benign hashes
whose hits suppress every match of the same query). An entry needs no image. Reading and writing hash
lists in the formats teams exchange is ``indexer.hashbanks``' work, above this."""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.orm import Session

from indexer.errors import InvalidInputError, NotFoundError
from indexer.media.hashes import (PDQ_DEFAULT_THRESHOLD, PDQ_MAX_THRESHOLD, PDQ_MIN_QUALITY, canonical_type,
                                  signal_key)
from indexer.storage.catalog import Catalog, Transaction
from indexer.storage.tables import BankEntryRow, BankRow, ImageRow, ImageSignalRow, utcnow

ROLES = ("match", "negative")
# HMA's bank names (so its clients and ours name banks the same way): upper case, digits, underscores, not
# starting with a digit (OMM's rule: [A-Z_][A-Z0-9_]*).
BANK_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
CHUNK = 5000                  # rows per transaction on import
MAX_TAG_CHARS = 2000



@dataclass(frozen=True)
class Bank:
    id: int
    name: str
    source: str
    role: str
    enabled: bool
    pdq_threshold: int
    entries: int
    created_at: dt.datetime
    enabled_ratio: float = 1.0  # HMA's matching_enabled_ratio; ``enabled`` is ratio > 0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source, "role": self.role, "enabled": self.enabled,
                "enabled_ratio": self.enabled_ratio, "pdq_threshold": self.pdq_threshold, "entries": self.entries,
                "created_at": self.created_at.isoformat(timespec="seconds") + "Z"}


@dataclass(frozen=True)
class BankEntry:
    id: int
    bank: str
    signal_type: str
    signal: str
    quality: int | None
    external_id: str | None
    tags: tuple[str, ...]
    image_id: int | None
    added_at: dt.datetime
    content_id: int = 0
    note: str | None = None
    metadata: dict[str, object] | None = None
    disable_until_ts: int | None = None

    def disabled(self, now: float) -> bool:
        """Is the content switched off for matching at Unix time ``now`` (HMA's ``disable_until_ts``)?"""
        return self.disable_until_ts is not None and self.disable_until_ts > now

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "content_id": self.content_id, "bank": self.bank, "signal_type": self.signal_type,
                "signal": self.signal, "quality": self.quality, "external_id": self.external_id,
                "tags": list(self.tags), "image_id": self.image_id, "note": self.note, "metadata": self.metadata,
                "disable_until_ts": self.disable_until_ts,
                "added_at": self.added_at.isoformat(timespec="seconds") + "Z"}


@dataclass(frozen=True)
class NewEntry:
    signal_type: str
    signal: str
    quality: int | None = None
    external_id: str | None = None
    tags: tuple[str, ...] = ()
    image_id: int | None = None
    line: int = 0  # where it was read from, for the report
    note: str | None = None
    metadata: dict[str, object] | None = None



def check_name(name: str) -> str:
    if not BANK_NAME.match(name or ""):
        raise InvalidInputError(f"a bank name is 1–64 upper-case letters, digits or underscores, not starting "
                                f"with a digit (as HMA names banks), not {name!r}", code="bad_bank_name")
    return name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInputError(f"a bank's role is one of {', '.join(ROLES)}, not {role!r}", code="bad_parameter")
    return role


MAX_NOTE_CHARS = 255     # OMM's limit on a content's note
# the latest disable_until_ts taken: as OMM, a time more than five years ahead is refused (a typo, not a plan)
MAX_DISABLE_SECONDS = 5 * 365 * 24 * 3600
UNSET: object = object()  # "not given" (None is a value: it clears)


def check_note(note: object) -> str | None:
    if note is None or note == "":
        return None
    if not isinstance(note, str):
        raise InvalidInputError("note should be a string", code="bad_parameter")  # OMM's messages
    if len(note) > MAX_NOTE_CHARS:
        raise InvalidInputError(f"note must be at most {MAX_NOTE_CHARS} characters", code="bad_parameter")
    return note


def check_ratio(r: object) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
        raise InvalidInputError(f"enabled_ratio is a number from 0 to 1, not {r!r}", code="bad_parameter")
    return float(r)


def check_disable_until(ts: object, now: float) -> int | None:
    """A content's "disabled until" Unix time; None or 0: enabled."""
    if ts is None:
        return None
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise InvalidInputError("disable_until_ts must be a non-negative integer", code="bad_parameter")
    if ts == 0:
        return None
    if ts > now + MAX_DISABLE_SECONDS:
        raise InvalidInputError("disable_until_ts must be less than 5 years in the future", code="bad_parameter")
    return ts


def _check_threshold(t: int) -> int:
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= PDQ_MAX_THRESHOLD:
        raise InvalidInputError(f"a PDQ threshold is a whole number of bits 0–{PDQ_MAX_THRESHOLD} "
                                f"(PDQ's own is {PDQ_DEFAULT_THRESHOLD}), not {t!r}", code="bad_parameter")
    return t


class BankStore:
    """Bank and entry reads and writes over the catalog. Every write is one transaction (the caller's ``tx``
    when given: a bank change commits with its audit row, ``indexer.review.banks``)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- banks
    def create(self, name: str, *, source: str = "", role: str = "match", enabled: bool = True,
               pdq_threshold: int = PDQ_DEFAULT_THRESHOLD, enabled_ratio: float | None = None,
               tx: Transaction | None = None) -> Bank:
        check_name(name)
        ratio = check_ratio(enabled_ratio) if enabled_ratio is not None else (1.0 if enabled else 0.0)
        _check_role(role)
        _check_threshold(pdq_threshold)
        with self.catalog.transaction(tx) as s:
            if s.scalar(select(BankRow.id).where(BankRow.name == name)) is not None:
                raise InvalidInputError(f"bank {name} already exists", code="conflict")
            s.add(BankRow(name=name, source=source, role=role, enabled=ratio > 0, enabled_ratio=ratio,
                          pdq_threshold=pdq_threshold))
        return self._get(name, tx)

    def get(self, name: str, *, counts: bool = True) -> Bank:
        """A bank; ``counts=False`` leaves ``entries`` at 0 instead of counting them (for internal lookups)."""
        for b in self._banks(name, counts):
            return b
        raise NotFoundError(f"no bank named {name!r}")

    def list(self, *, counts: bool = True) -> list[Bank]:
        """Every bank; ``counts=False`` skips counting entries (what a lookup reads: one small table)."""
        return self._banks(None, counts)

    def _get(self, name: str, tx: Transaction | None) -> Bank:
        """``get``, read inside ``tx`` when given (a change not committed yet)."""
        for b in self._banks(name, True, tx):
            return b
        raise NotFoundError(f"no bank named {name!r}")

    def _banks(self, name: str | None, with_counts: bool = True, tx: Transaction | None = None) -> list[Bank]:
        with self.catalog.transaction(tx) if tx is not None else self.catalog.session() as s:
            counts: dict[int, int] = {}
            if with_counts:
                q = select(BankEntryRow.bank_id, func.count()).group_by(BankEntryRow.bank_id)
                if name is not None:
                    q = q.where(BankEntryRow.bank_id.in_(select(BankRow.id).where(BankRow.name == name)))
                counts = dict(s.execute(q).all())
            q = select(BankRow).order_by(BankRow.name)
            if name is not None:
                q = q.where(BankRow.name == name)
            return [Bank(r.id, r.name, r.source, r.role, r.enabled, r.pdq_threshold, int(counts.get(r.id, 0)),
                         r.created_at, float(r.enabled_ratio)) for r in s.scalars(q)]

    def update(self, name: str, *, enabled: bool | None = None, role: str | None = None,
               pdq_threshold: int | None = None, source: str | None = None, rename: str | None = None,
               enabled_ratio: float | None = None, tx: Transaction | None = None) -> Bank:
        """Change a bank. ``enabled`` sets the ratio to 1 or 0; ``enabled_ratio`` sets it (and ``enabled`` is
        ratio > 0)."""
        values: dict[str, object] = {"updated_at": utcnow()}
        if enabled is not None:
            values["enabled"], values["enabled_ratio"] = bool(enabled), 1.0 if enabled else 0.0
        if enabled_ratio is not None:
            r = check_ratio(enabled_ratio)
            values["enabled"], values["enabled_ratio"] = r > 0, r
        if role is not None:
            values["role"] = _check_role(role)
        if pdq_threshold is not None:
            values["pdq_threshold"] = _check_threshold(pdq_threshold)
        if source is not None:
            values["source"] = source
        if rename is not None and rename != name:
            values["name"] = check_name(rename)
        with self.catalog.transaction(tx) as s:
            if rename is not None and rename != name and \
                    s.scalar(select(BankRow.id).where(BankRow.name == rename)) is not None:
                raise InvalidInputError(f"bank {rename} already exists", code="conflict")
            if s.execute(update(BankRow).where(BankRow.name == name).values(**values)).rowcount == 0:
                raise NotFoundError(f"no bank named {name!r}")
        return self._get(rename or name, tx)

    def delete(self, name: str, *, tx: Transaction | None = None) -> int:
        """Delete a bank and its entries; returns how many entries went."""
        with self.catalog.transaction(tx) as s:
            bank_id = s.scalar(select(BankRow.id).where(BankRow.name == name))
            if bank_id is None:
                raise NotFoundError(f"no bank named {name!r}")
            n = s.execute(delete(BankEntryRow).where(BankEntryRow.bank_id == bank_id)).rowcount
            s.execute(delete(BankRow).where(BankRow.id == bank_id))
        return int(n or 0)

    # -- entries
    def add_content(self, name: str, entries: Sequence[NewEntry], *, disable_until_ts: int | None = None,
                    tx: Transaction | None = None) -> tuple[int, bool]:
        """Bank one piece of content (HMA's ``/c/bank/X/content`` and ``/signal``): its signals become entries
        sharing one content id, the first new entry's. A content whose signals are all banked already is that
        content (its id is answered, nothing changes). Returns (content id, whether anything was new)."""
        bank = self.get(name, counts=False)
        with self.catalog.transaction(tx) as s:
            new, _ = self.insert_chunk(s, bank.id, list(entries), grouped=True, disable_until_ts=disable_until_ts)
            if new:
                return min(new), True
            e = entries[0]
            cid = s.scalar(select(BankEntryRow.content_id).where(
                BankEntryRow.bank_id == bank.id, BankEntryRow.signal_type == e.signal_type,
                BankEntryRow.signal == signal_key(e.signal_type, e.signal)))
            return int(cid or 0), False

    def add(self, name: str, entries: Iterable[NewEntry], *, tx: Transaction | None = None) -> tuple[list[int], int]:
        """Add entries to a bank in one transaction, each its own content; entries already there are skipped.
        Returns (the new entries' ids, how many were already banked)."""
        bank = self.get(name, counts=False)
        ids: list[int] = []
        dup = 0
        with self.catalog.transaction(tx) as s:
            for chunk in batches(entries, CHUNK):
                new, d = self.insert_chunk(s, bank.id, chunk)
                ids.extend(new)
                dup += d
        return ids, dup

    def insert_chunk(self, s: Session, bank_id: int, chunk: Sequence[NewEntry], *, grouped: bool = False,
                     disable_until_ts: int | None = None) -> tuple[list[int], int]:
        """Insert the entries not banked yet; each is its own content, or (``grouped``) all are one."""
        have: set[tuple[str, str]] = set()
        for st in {e.signal_type for e in chunk}:
            sigs = [signal_key(st, e.signal) for e in chunk if e.signal_type == st]
            have.update((st, v) for v in s.scalars(select(BankEntryRow.signal).where(
                BankEntryRow.bank_id == bank_id, BankEntryRow.signal_type == st, BankEntryRow.signal.in_(sigs))))
        rows, seen = [], set()
        for e in chunk:
            key = (e.signal_type, signal_key(e.signal_type, e.signal))
            if key in have or key in seen:
                continue
            seen.add(key)
            rows.append({"bank_id": bank_id, "signal_type": e.signal_type, "signal": key[1],
                         "payload": e.signal if key[1] != e.signal else None, "quality": e.quality,
                         "external_id": e.external_id, "tags": " ".join(e.tags)[:MAX_TAG_CHARS],
                         "image_id": e.image_id, "added_at": utcnow(), "note": check_note(e.note),
                         "meta": json.dumps(e.metadata) if e.metadata is not None else None,
                         "disable_until_ts": disable_until_ts})
        if not rows:
            return [], len(chunk)
        s.execute(insert(BankEntryRow), rows)
        new: list[int] = []
        for st in {r["signal_type"] for r in rows}:
            sigs = [r["signal"] for r in rows if r["signal_type"] == st]
            new.extend(s.scalars(select(BankEntryRow.id).where(
                BankEntryRow.bank_id == bank_id, BankEntryRow.signal_type == st, BankEntryRow.signal.in_(sigs))))
        new.sort()
        if grouped:
            s.execute(update(BankEntryRow).where(BankEntryRow.id.in_(new)).values(content_id=new[0]))
        else:
            s.execute(update(BankEntryRow).where(BankEntryRow.id.in_(new)).values(content_id=BankEntryRow.id))
        return new, len(chunk) - len(rows)

    def remove_entry(self, name: str, content_id: int, *, tx: Transaction | None = None) -> int:
        """Take a content (every signal of it) out of a bank; 1 if it was there, else 0."""
        bank = self.get(name, counts=False)
        with self.catalog.transaction(tx) as s:
            return 1 if s.execute(delete(BankEntryRow).where(BankEntryRow.bank_id == bank.id,
                                                             BankEntryRow.content_id == int(content_id))).rowcount \
                else 0

    def remove_external(self, name: str, external_ids: Sequence[str], *, tx: Transaction | None = None) -> int:
        """Take out of bank ``name`` every entry with one of these external ids (an exchange's deleted keys)."""
        bank = self.get(name, counts=False)
        n = 0
        with self.catalog.transaction(tx) as s:
            for i in range(0, len(external_ids), 500):
                n += int(s.execute(delete(BankEntryRow).where(
                    BankEntryRow.bank_id == bank.id,
                    BankEntryRow.external_id.in_(list(external_ids[i:i + 500])))).rowcount or 0)
        return n

    def content(self, name: str, content_id: int) -> list[BankEntry]:
        """The entries (signals) of one content of bank ``name``; NotFoundError if the bank or content is not
        there."""
        bank = self.get(name, counts=False)
        with self.catalog.session() as s:
            rows = list(s.scalars(select(BankEntryRow).where(BankEntryRow.bank_id == bank.id,
                                                             BankEntryRow.content_id == int(content_id))
                                  .order_by(BankEntryRow.id)))
        if not rows:
            raise NotFoundError(f"bank {name} has no content {content_id}")
        return [_entry(r, {bank.id: bank.name}) for r in rows]

    def update_content(self, name: str, content_id: int, *, note: object = UNSET, disable_until_ts: object = UNSET,
                       now: float, tx: Transaction | None = None) -> list[BankEntry]:
        """Set a content's note (``""`` or None clears it) or the time it is disabled until (None: enabled)."""
        values: dict[str, object] = {}
        if note is not UNSET:
            values["note"] = check_note(note)
        if disable_until_ts is not UNSET:
            values["disable_until_ts"] = check_disable_until(disable_until_ts, now)
        bank = self.get(name, counts=False)
        with self.catalog.transaction(tx) as s:
            if values and not s.execute(update(BankEntryRow).where(
                    BankEntryRow.bank_id == bank.id, BankEntryRow.content_id == int(content_id)).values(**values)
                    ).rowcount:
                raise NotFoundError(f"bank {name} has no content {content_id}")
            rows = list(s.scalars(select(BankEntryRow).where(BankEntryRow.bank_id == bank.id,
                                                             BankEntryRow.content_id == int(content_id))
                                  .order_by(BankEntryRow.id)))
        if not rows:
            raise NotFoundError(f"bank {name} has no content {content_id}")
        return [_entry(r, {bank.id: bank.name}) for r in rows]

    def find(self, name: str, signal_type: str, signal: str) -> int | None:
        """The id of ``signal`` in bank ``name``, if banked."""
        with self.catalog.session() as s:
            return s.scalar(select(BankEntryRow.id).join(BankRow, BankRow.id == BankEntryRow.bank_id).where(
                BankRow.name == name, BankEntryRow.signal_type == signal_type,
                BankEntryRow.signal == signal_key(signal_type, signal)))

    def count(self, signal_type: str) -> int:
        with self.catalog.session() as s:
            return int(s.scalar(select(func.count()).select_from(BankEntryRow)
                                .where(BankEntryRow.signal_type == signal_type)) or 0)

    def entries(self, ids: Iterable[int]) -> dict[int, BankEntry]:
        ids = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, BankEntry] = {}
        if not ids:
            return out
        with self.catalog.session() as s:
            names = dict(s.execute(select(BankRow.id, BankRow.name)).all())
            for i in range(0, len(ids), 500):
                for r in s.scalars(select(BankEntryRow).where(BankEntryRow.id.in_(ids[i:i + 500]))):
                    out[r.id] = _entry(r, names)
        return out

    def page(self, name: str, *, after: int = 0, limit: int = 1000, signal_type: str | None = None) -> list[BankEntry]:
        bank = self.get(name, counts=False)
        with self.catalog.session() as s:
            q = select(BankEntryRow).where(BankEntryRow.bank_id == bank.id, BankEntryRow.id > after)
            if signal_type is not None:
                q = q.where(BankEntryRow.signal_type == canonical_type(signal_type))
            return [_entry(r, {bank.id: bank.name}) for r in s.scalars(q.order_by(BankEntryRow.id).limit(limit))]

    def pdq_rows_after(self, entry_id: int, limit: int = 100_000) -> list[tuple[int, str]]:
        """(entry id, PDQ) past ``entry_id`` whose hash may match (quality unknown, or ≥ the minimum): the bank
        index's catch-up before every lookup, a seek on ``ix_bank_entries_type_id`` that reads only new rows."""
        with self.catalog.session() as s:
            return [(int(i), str(h)) for i, h in s.execute(pdq_rows_after_query(entry_id, limit))]

    def md5_entries(self, md5: str) -> list[BankEntry]:
        with self.catalog.session() as s:
            names = dict(s.execute(select(BankRow.id, BankRow.name)).all())
            return [_entry(r, names) for r in s.scalars(select(BankEntryRow).where(
                BankEntryRow.signal_type == "md5", BankEntryRow.signal == md5))]

    def vpdq_state(self) -> tuple[int, int]:
        """(how many vPDQ entries, the highest id): what the in-memory vPDQ bank index was built from."""
        with self.catalog.session() as s:
            n, top = s.execute(select(func.count(), func.max(BankEntryRow.id))
                               .where(BankEntryRow.signal_type == "vpdq")).one()
            return int(n or 0), int(top or 0)

    def vpdq_entries(self) -> list[tuple[int, str]]:
        """(entry id, vPDQ) of every banked vPDQ."""
        with self.catalog.session() as s:
            return [(int(i), str(p)) for i, p in s.execute(
                select(BankEntryRow.id, BankEntryRow.payload).where(BankEntryRow.signal_type == "vpdq",
                                                                    BankEntryRow.payload.is_not(None))
                .order_by(BankEntryRow.id))]

    def added_ts(self, entry_id: int) -> int | None:
        """Unix time entry ``entry_id`` was banked (HMA's ``built_to`` for an index covering up to it)."""
        with self.catalog.session() as s:
            at = s.scalar(select(BankEntryRow.added_at).where(BankEntryRow.id == int(entry_id)))
        return int(at.replace(tzinfo=dt.timezone.utc).timestamp()) if at is not None else None

    def newest_ts(self, signal_type: str) -> int | None:
        """Unix time the newest entry of a signal type was banked."""
        with self.catalog.session() as s:
            i = s.scalar(select(func.max(BankEntryRow.id)).where(BankEntryRow.signal_type == signal_type))
        return self.added_ts(i) if i is not None else None

    def head(self) -> int:
        with self.catalog.session() as s:
            return int(s.scalar(select(func.max(BankEntryRow.id))) or 0)


    def flagged_signals(self, signal_types: Sequence[str]) -> Iterator[tuple[str, str, str]]:
        """(signal type, signal, label) of every live flagged image's hashes, PDQ only where its quality
        passes, in image id order — what a team exports to share."""
        with self.catalog.session() as s:
            q = (select(ImageRow.id, ImageRow.flag_label, ImageSignalRow.md5, ImageSignalRow.pdq,
                        ImageSignalRow.pdq_quality, ImageSignalRow.vpdq)
                 .join(ImageSignalRow, ImageSignalRow.image_id == ImageRow.id)
                 .where(ImageRow.flagged, ImageRow.deleted.is_(False)).order_by(ImageRow.id))
            for _id, label, md5, pdq, quality, vpdq in s.execute(q).yield_per(5000):
                if "pdq" in signal_types and pdq and (quality or 0) >= PDQ_MIN_QUALITY:
                    yield "pdq", pdq, label or ""
                if "md5" in signal_types and md5:
                    yield "md5", md5, label or ""
                if "vpdq" in signal_types and vpdq:
                    yield "vpdq", vpdq, label or ""


def pdq_rows_after_query(entry_id: int, limit: int) -> Select[tuple[int, str]]:
    return (select(BankEntryRow.id, BankEntryRow.signal)
            .where(BankEntryRow.signal_type == "pdq", BankEntryRow.id > entry_id,
                   (BankEntryRow.quality.is_(None)) | (BankEntryRow.quality >= PDQ_MIN_QUALITY))
            .order_by(BankEntryRow.id).limit(limit))


def _entry(r: BankEntryRow, names: dict[int, str]) -> BankEntry:
    return BankEntry(r.id, names.get(r.bank_id, "?"), r.signal_type, r.payload or r.signal, r.quality, r.external_id,
                     tuple(r.tags.split()) if r.tags else (), r.image_id, r.added_at, int(r.content_id or r.id),
                     r.note, json.loads(r.meta) if r.meta else None, r.disable_until_ts)



def batches(it: Iterable[NewEntry], n: int) -> Iterator[list[NewEntry]]:
    chunk: list[NewEntry] = []
    for e in it:
        chunk.append(e)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------ list formats
