"""Hash banks in the catalog: named lists of signals (PDQ, MD5) from one source, with an enabled switch, a
per-bank PDQ threshold and a role — ``match`` (a hit is evidence) or ``negative`` (known-benign hashes
whose hits suppress every match of the same query). An entry needs no image. Reading and writing hash
lists in the formats teams exchange is ``indexer.hashbanks``' work, above this."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from indexer.errors import InvalidInputError, NotFoundError
from indexer.media.hashes import PDQ_DEFAULT_THRESHOLD, PDQ_MAX_THRESHOLD, PDQ_MIN_QUALITY, canonical_type
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

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source, "role": self.role, "enabled": self.enabled,
                "pdq_threshold": self.pdq_threshold, "entries": self.entries,
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

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "bank": self.bank, "signal_type": self.signal_type, "signal": self.signal,
                "quality": self.quality, "external_id": self.external_id, "tags": list(self.tags),
                "image_id": self.image_id, "added_at": self.added_at.isoformat(timespec="seconds") + "Z"}


@dataclass(frozen=True)
class NewEntry:
    signal_type: str
    signal: str
    quality: int | None = None
    external_id: str | None = None
    tags: tuple[str, ...] = ()
    image_id: int | None = None
    line: int = 0  # where it was read from, for the report



def check_name(name: str) -> str:
    if not BANK_NAME.match(name or ""):
        raise InvalidInputError(f"a bank name is 1–64 upper-case letters, digits or underscores, not starting "
                                f"with a digit (as HMA names banks), not {name!r}", code="bad_bank_name")
    return name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInputError(f"a bank's role is one of {', '.join(ROLES)}, not {role!r}", code="bad_parameter")
    return role


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
               pdq_threshold: int = PDQ_DEFAULT_THRESHOLD, tx: Transaction | None = None) -> Bank:
        check_name(name)
        _check_role(role)
        _check_threshold(pdq_threshold)
        with self.catalog.transaction(tx) as s:
            if s.scalar(select(BankRow.id).where(BankRow.name == name)) is not None:
                raise InvalidInputError(f"bank {name} already exists", code="conflict")
            s.add(BankRow(name=name, source=source, role=role, enabled=enabled, pdq_threshold=pdq_threshold))
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
                         r.created_at) for r in s.scalars(q)]

    def update(self, name: str, *, enabled: bool | None = None, role: str | None = None,
               pdq_threshold: int | None = None, source: str | None = None, rename: str | None = None,
               tx: Transaction | None = None) -> Bank:
        values: dict[str, object] = {"updated_at": utcnow()}
        if enabled is not None:
            values["enabled"] = bool(enabled)
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
    def add(self, name: str, entries: Iterable[NewEntry], *, tx: Transaction | None = None) -> tuple[list[int], int]:
        """Add entries to a bank in one transaction; entries already there are skipped.
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

    def insert_chunk(self, s: Session, bank_id: int, chunk: Sequence[NewEntry]) -> tuple[list[int], int]:
        have: set[tuple[str, str]] = set()
        for st in {e.signal_type for e in chunk}:
            sigs = [e.signal for e in chunk if e.signal_type == st]
            have.update((st, v) for v in s.scalars(select(BankEntryRow.signal).where(
                BankEntryRow.bank_id == bank_id, BankEntryRow.signal_type == st, BankEntryRow.signal.in_(sigs))))
        rows, seen = [], set()
        for e in chunk:
            key = (e.signal_type, e.signal)
            if key in have or key in seen:
                continue
            seen.add(key)
            rows.append({"bank_id": bank_id, "signal_type": e.signal_type, "signal": e.signal, "quality": e.quality,
                         "external_id": e.external_id, "tags": " ".join(e.tags)[:MAX_TAG_CHARS],
                         "image_id": e.image_id, "added_at": utcnow()})
        if not rows:
            return [], len(chunk)
        s.execute(insert(BankEntryRow), rows)
        new: list[int] = []
        for st in {r["signal_type"] for r in rows}:
            sigs = [r["signal"] for r in rows if r["signal_type"] == st]
            new.extend(s.scalars(select(BankEntryRow.id).where(
                BankEntryRow.bank_id == bank_id, BankEntryRow.signal_type == st, BankEntryRow.signal.in_(sigs))))
        return sorted(new), len(chunk) - len(rows)

    def remove_entry(self, name: str, entry_id: int, *, tx: Transaction | None = None) -> int:
        bank = self.get(name, counts=False)
        with self.catalog.transaction(tx) as s:
            return int(s.execute(delete(BankEntryRow).where(BankEntryRow.bank_id == bank.id,
                                                            BankEntryRow.id == int(entry_id))).rowcount or 0)

    def find(self, name: str, signal_type: str, signal: str) -> int | None:
        """The id of ``signal`` in bank ``name``, if banked."""
        with self.catalog.session() as s:
            return s.scalar(select(BankEntryRow.id).join(BankRow, BankRow.id == BankEntryRow.bank_id).where(
                BankRow.name == name, BankEntryRow.signal_type == signal_type, BankEntryRow.signal == signal))

    def count(self, signal_type: str) -> int:
        with self.catalog.session() as s:
            return int(s.scalar(select(func.count()).select_from(BankEntryRow)
                                .where(BankEntryRow.signal_type == signal_type)) or 0)

    def entries(self, ids: Iterable[int]) -> dict[int, BankEntry]:
        ids = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, BankEntry] = {}
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
        """(entry id, PDQ) past ``entry_id`` whose hash may match (quality unknown, or ≥ the minimum)."""
        with self.catalog.session() as s:
            q = (select(BankEntryRow.id, BankEntryRow.signal)
                 .where(BankEntryRow.id > entry_id, BankEntryRow.signal_type == "pdq",
                        (BankEntryRow.quality.is_(None)) | (BankEntryRow.quality >= PDQ_MIN_QUALITY))
                 .order_by(BankEntryRow.id).limit(limit))
            return [(int(i), str(h)) for i, h in s.execute(q)]

    def md5_entries(self, md5: str) -> list[BankEntry]:
        with self.catalog.session() as s:
            names = dict(s.execute(select(BankRow.id, BankRow.name)).all())
            return [_entry(r, names) for r in s.scalars(select(BankEntryRow).where(
                BankEntryRow.signal_type == "md5", BankEntryRow.signal == md5))]

    def head(self) -> int:
        with self.catalog.session() as s:
            return int(s.scalar(select(func.max(BankEntryRow.id))) or 0)


    def flagged_signals(self, signal_types: Sequence[str]) -> Iterator[tuple[str, str, str]]:
        """(signal type, signal, label) of every live flagged image's hashes, PDQ only where its quality
        passes, in image id order — what a team exports to share."""
        with self.catalog.session() as s:
            q = (select(ImageRow.id, ImageRow.flag_label, ImageSignalRow.md5, ImageSignalRow.pdq,
                        ImageSignalRow.pdq_quality)
                 .join(ImageSignalRow, ImageSignalRow.image_id == ImageRow.id)
                 .where(ImageRow.flagged, ImageRow.deleted.is_(False)).order_by(ImageRow.id))
            for _id, label, md5, pdq, quality in s.execute(q).yield_per(5000):
                if "pdq" in signal_types and pdq and (quality or 0) >= PDQ_MIN_QUALITY:
                    yield "pdq", pdq, label or ""
                if "md5" in signal_types and md5:
                    yield "md5", md5, label or ""


def _entry(r: BankEntryRow, names: dict[int, str]) -> BankEntry:
    return BankEntry(r.id, names.get(r.bank_id, "?"), r.signal_type, r.signal, r.quality, r.external_id,
                     tuple(r.tags.split()) if r.tags else (), r.image_id, r.added_at)



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
