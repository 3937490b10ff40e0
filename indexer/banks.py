"""Hash banks: named lists of signals (PDQ, MD5) from one source — an industry list, a partner, a team's own
exports — with an enabled switch, a per-bank PDQ threshold and a role: ``match`` (a hit is evidence) or
``negative`` (known-benign hashes whose hits suppress every match of the same query). An entry needs no image.

Lists come in the shapes teams have (``read_list``): the ``threatexchange`` CLI's ``dataset -P`` text and
``--csv`` exports, its ``hash`` output and local-file lists (``<type> <hash>`` per line), and plain lists of
hex hashes, one per line or CSV/TSV with optional id and tag columns. A list is read as a stream, line by
line: a bad row (wrong length, not hex, an unsupported signal type, a duplicate, an overlong line) is
reported with its line number and the rest is imported."""
from __future__ import annotations

import csv
import datetime as dt
import io
import re
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Iterator, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from indexer.catalog import BankEntryRow, BankRow, Catalog, ImageRow, ImageSignalRow, utcnow
from indexer.errors import InvalidInputError, NotFoundError
from indexer.hashes import (PDQ_DEFAULT_THRESHOLD, PDQ_MAX_THRESHOLD, PDQ_MIN_QUALITY, SIGNAL_ALIASES,
                            canonical_type, guess_type, validate_signal)

ROLES = ("match", "negative")
# HMA's bank names (so its clients and ours name banks the same way): upper case, digits, underscores.
BANK_NAME = re.compile(r"^[A-Z0-9_]{1,64}$")
MAX_LINE = 64 * 1024          # a hash list's row is under 1 kB; a longer one is not a row
MAX_TAG_CHARS = 2000
_CHUNK = 5000                 # rows per transaction on import


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


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class ImportReport:
    bank: str
    lines: int = 0
    added: int = 0
    already_banked: int = 0
    bad_rows: int = 0
    bad: list[BadRow] = field(default_factory=list)  # the first MAX_REPORTED; all go to ``on_bad``
    by_type: dict[str, int] = field(default_factory=dict)

    MAX_REPORTED = 1000

    def to_json(self) -> dict[str, object]:
        return {"bank": self.bank, "lines": self.lines, "added": self.added, "already_banked": self.already_banked,
                "bad_rows": self.bad_rows, "by_type": self.by_type,
                "bad": [{"line": b.line, "reason": b.reason} for b in self.bad]}


def check_name(name: str) -> str:
    if not BANK_NAME.match(name or ""):
        raise InvalidInputError(f"a bank name is 1–64 upper-case letters, digits or underscores "
                                f"(as HMA names banks), not {name!r}", code="bad_bank_name")
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


class Banks:
    """Bank and entry reads and writes over the catalog. Every write is one transaction."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- banks
    def create(self, name: str, *, source: str = "", role: str = "match", enabled: bool = True,
               pdq_threshold: int = PDQ_DEFAULT_THRESHOLD) -> Bank:
        check_name(name)
        _check_role(role)
        _check_threshold(pdq_threshold)
        with self.catalog.session() as s, s.begin():
            if s.scalar(select(BankRow.id).where(BankRow.name == name)) is not None:
                raise InvalidInputError(f"bank {name} already exists", code="conflict")
            s.add(BankRow(name=name, source=source, role=role, enabled=enabled, pdq_threshold=pdq_threshold))
        return self.get(name)

    def get(self, name: str, *, counts: bool = True) -> Bank:
        """A bank; ``counts=False`` leaves ``entries`` at 0 instead of counting them (for internal lookups)."""
        for b in self._banks(name, counts):
            return b
        raise NotFoundError(f"no bank named {name!r}")

    def list(self, *, counts: bool = True) -> list[Bank]:
        """Every bank; ``counts=False`` skips counting entries (what a lookup reads: one small table)."""
        return self._banks(None, counts)

    def _banks(self, name: str | None, with_counts: bool = True) -> list[Bank]:
        with self.catalog.session() as s:
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
               pdq_threshold: int | None = None, source: str | None = None, rename: str | None = None) -> Bank:
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
        with self.catalog.session() as s, s.begin():
            if rename is not None and rename != name and \
                    s.scalar(select(BankRow.id).where(BankRow.name == rename)) is not None:
                raise InvalidInputError(f"bank {rename} already exists", code="conflict")
            if s.execute(update(BankRow).where(BankRow.name == name).values(**values)).rowcount == 0:
                raise NotFoundError(f"no bank named {name!r}")
        return self.get(rename or name)

    def delete(self, name: str) -> int:
        """Delete a bank and its entries; returns how many entries went."""
        with self.catalog.session() as s, s.begin():
            bank_id = s.scalar(select(BankRow.id).where(BankRow.name == name))
            if bank_id is None:
                raise NotFoundError(f"no bank named {name!r}")
            n = s.execute(delete(BankEntryRow).where(BankEntryRow.bank_id == bank_id)).rowcount
            s.execute(delete(BankRow).where(BankRow.id == bank_id))
        return int(n or 0)

    # -- entries
    def add(self, name: str, entries: Iterable[NewEntry]) -> tuple[list[int], int]:
        """Add entries to a bank in one transaction; entries already there are skipped.
        Returns (the new entries' ids, how many were already banked)."""
        bank = self.get(name, counts=False)
        ids: list[int] = []
        dup = 0
        with self.catalog.session() as s, s.begin():
            for chunk in _batches(entries, _CHUNK):
                new, d = self._insert(s, bank.id, chunk)
                ids.extend(new)
                dup += d
        return ids, dup

    def _insert(self, s: Session, bank_id: int, chunk: Sequence[NewEntry]) -> tuple[list[int], int]:
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

    def remove_entry(self, name: str, entry_id: int) -> int:
        bank = self.get(name, counts=False)
        with self.catalog.session() as s, s.begin():
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

    # -- lists in and out
    def import_list(self, name: str, stream: IO[bytes], *, default_type: str | None = None,
                    on_bad: Callable[[BadRow], None] | None = None) -> ImportReport:
        """Stream a hash list into a bank, committing every few thousand rows (an interrupted import keeps
        what it committed; running it again adds the rest)."""
        bank = self.get(name, counts=False)
        report = ImportReport(bank.name)
        seen: dict[tuple[str, str], int] = {}

        def bad(row: BadRow) -> None:
            report.bad_rows += 1
            if len(report.bad) < ImportReport.MAX_REPORTED:
                report.bad.append(row)
            if on_bad is not None:
                on_bad(row)

        def rows() -> Iterator[NewEntry]:
            for item in read_list(stream, default_type=default_type):
                report.lines = item.line
                if isinstance(item, BadRow):
                    bad(item)
                    continue
                key = (item.signal_type, item.signal)
                if key in seen:
                    bad(BadRow(item.line, f"duplicate of line {seen[key]}"))
                    continue
                if len(seen) < 2_000_000:  # beyond that the bank's unique key still drops the repeat
                    seen[key] = item.line
                yield item

        for chunk in _batches(rows(), _CHUNK):
            with self.catalog.session() as s, s.begin():
                new, dup = self._insert(s, bank.id, chunk)
            report.added += len(new)
            report.already_banked += dup
            for e in chunk:
                report.by_type[e.signal_type] = report.by_type.get(e.signal_type, 0) + 1
        return report

    def export_flagged(self, out: IO[str], *, fmt: str = "te", signal_types: Sequence[str] = ("pdq",),
                       collab: str = "flagmatch") -> int:
        """Write the flagged images' hashes as a list another team (or ``threatexchange``) can read; returns rows."""
        def rows() -> Iterator[tuple[str, str, str]]:
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
        return write_list(out, rows(), fmt=fmt, collab=collab)

    def export_bank(self, name: str, out: IO[str], *, fmt: str = "te") -> int:
        bank = self.get(name, counts=False)

        def rows() -> Iterator[tuple[str, str, str]]:
            after = 0
            while page := self.page(bank.name, after=after, limit=5000):
                for e in page:
                    yield e.signal_type, e.signal, " ".join(e.tags)
                after = page[-1].id
        return write_list(out, rows(), fmt=fmt, collab=bank.name)


def _entry(r: BankEntryRow, names: dict[int, str]) -> BankEntry:
    return BankEntry(r.id, names.get(r.bank_id, "?"), r.signal_type, r.signal, r.quality, r.external_id,
                     tuple(r.tags.split()) if r.tags else (), r.image_id, r.added_at)


def _batches(it: Iterable[NewEntry], n: int) -> Iterator[list[NewEntry]]:
    chunk: list[NewEntry] = []
    for e in it:
        chunk.append(e)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------ list formats

EXPORT_FORMATS = ("te", "csv", "hex")
# Column names that say what a header cell holds (threatexchange's CSV, HMA's, and what people write).
_HASH_COLS = ("signal_str", "signal", "hash", "hash_value", "value", "indicator", "pdq", "md5", "pdq_hash")
_TYPE_COLS = ("signal_type", "type", "hash_type", "indicator_type")
_ID_COLS = ("id", "content_id", "external_id", "entry_id", "media_id")
_TAG_COLS = ("tags", "tag", "labels", "label", "category")
_QUALITY_COLS = ("quality", "pdq_quality")


@dataclass(frozen=True)
class _Layout:
    delimiter: str | None  # None: whitespace-separated text
    hash_col: int = 0
    type_col: int | None = None
    id_col: int | None = None
    tag_cols: tuple[int, ...] = ()
    quality_col: int | None = None
    implied_type: str | None = None  # a header named "pdq" or "md5" says the type


def read_list(stream: IO[bytes], *, default_type: str | None = None) -> Iterator[NewEntry | BadRow]:
    """Rows of a hash list, in order, each a ``NewEntry`` or a ``BadRow`` with its 1-based line number.
    Blank lines and ``#`` comments are skipped."""
    if default_type is not None:
        default_type = canonical_type(default_type)
    layout: _Layout | None = None
    line_no = 0
    while True:
        raw = stream.readline(MAX_LINE + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the overlong line
                raw = stream.readline(MAX_LINE + 1)
            yield BadRow(line_no, f"line is longer than {MAX_LINE // 1024} KiB: not a hash list row")
            continue
        text = raw.decode("utf-8", errors="replace").strip().lstrip("\ufeff")
        if not text or text.startswith("#"):
            continue
        if layout is None:
            layout, is_header = _layout_of(text)
            if is_header:
                continue
        yield _row(text, line_no, layout, default_type)


def _split(text: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return text.split()
    return [c.strip() for c in next(csv.reader(io.StringIO(text), delimiter=delimiter))]


def _layout_of(first: str) -> tuple[_Layout, bool]:
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    cells = [c.lower() for c in _split(first, delimiter)]
    if delimiter is not None and any(c in _HASH_COLS for c in cells):
        def col(names: tuple[str, ...]) -> int | None:
            return next((i for i, c in enumerate(cells) if c in names), None)
        hash_col = col(_HASH_COLS)
        assert hash_col is not None
        implied = SIGNAL_ALIASES.get(cells[hash_col]) if cells[hash_col] in ("pdq", "md5", "pdq_hash") or \
            cells[hash_col] in SIGNAL_ALIASES else None
        if cells[hash_col] == "pdq_hash":
            implied = "pdq"
        return _Layout(delimiter, hash_col, col(_TYPE_COLS), col(_ID_COLS),
                       tuple(i for i, c in enumerate(cells) if c in _TAG_COLS), col(_QUALITY_COLS), implied), True
    # no header: "<type> <hash> …" (threatexchange's text) or "<hash> [id] [tags…]"
    if cells and (cells[0] in SIGNAL_ALIASES or (guess_type(cells[0]) is None and len(cells) > 1
                                                 and guess_type(cells[1]) is not None)):
        return _Layout(delimiter, hash_col=1, type_col=0,
                       id_col=2 if delimiter is not None else None,
                       tag_cols=(3,) if delimiter is not None else ()), False
    return _Layout(delimiter, hash_col=0, id_col=1, tag_cols=(2,)), False


def _row(text: str, line: int, layout: _Layout, default_type: str | None) -> NewEntry | BadRow:
    try:
        cells = _split(text, layout.delimiter)
    except csv.Error as exc:
        return BadRow(line, f"not a CSV row: {exc}")
    if layout.hash_col >= len(cells) or not cells[layout.hash_col]:
        return BadRow(line, "no hash in this row")
    value = cells[layout.hash_col]
    try:
        if layout.type_col is not None and layout.type_col < len(cells) and cells[layout.type_col]:
            st = canonical_type(cells[layout.type_col])
        else:
            st = layout.implied_type or default_type or guess_type(value) or ""
            if not st:
                return BadRow(line, f"cannot tell the signal type of a {len(value.strip())}-character value "
                                    f"(PDQ has 64 hex digits, MD5 32): give --type")
        signal = validate_signal(st, value)
    except InvalidInputError as exc:
        return BadRow(line, exc.message)
    ext = cells[layout.id_col] if layout.id_col is not None and layout.id_col < len(cells) else None
    if layout.delimiter is None and layout.type_col is not None:
        ext = None  # threatexchange's text rows carry a collab name and an opinion, not an id
    tags = tuple(t for c in layout.tag_cols if c < len(cells) for t in cells[c].replace(";", " ").split())
    quality: int | None = None
    if layout.quality_col is not None and layout.quality_col < len(cells) and cells[layout.quality_col]:
        try:
            quality = int(cells[layout.quality_col])
        except ValueError:
            return BadRow(line, f"quality {cells[layout.quality_col]!r} is not a whole number")
        if not 0 <= quality <= 100:
            return BadRow(line, f"quality {quality} is not 0–100")
    return NewEntry(st, signal, quality, (ext or None) and ext[:200], tags, None, line)


def write_list(out: IO[str], rows: Iterable[tuple[str, str, str]], *, fmt: str, collab: str) -> int:
    """Write (signal type, hash, tags) rows as ``te`` (``<type> <hash>`` lines: threatexchange's local-file
    list), ``csv`` (threatexchange's ``dataset -P --csv`` columns) or ``hex`` (bare hashes)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}", code="bad_parameter")
    n = 0
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["signal_type", "signal_str", "collab", "category", "tags"])
    for st, signal, tags in rows:
        name = "video_md5" if st == "md5" and fmt != "hex" else st  # threatexchange's name for an MD5
        if writer is not None:
            writer.writerow([name, signal, collab, "POSITIVE_CLASS", tags])
        elif fmt == "te":
            out.write(f"{name} {signal}\n")
        else:
            out.write(f"{signal}\n")
        n += 1
    return n
