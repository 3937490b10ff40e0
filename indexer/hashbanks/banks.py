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
import io
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Iterator, Sequence

from indexer.errors import InvalidInputError
from indexer.media.hashes import SIGNAL_ALIASES, canonical_type, guess_type, validate_signal
from indexer.storage.banks import (CHUNK, ROLES, Bank, BankEntry, BankStore, NewEntry, batches as _batches,
                                   check_name)

__all__ = ["Bank", "BankEntry", "Banks", "BadRow", "ImportReport", "NewEntry", "ROLES", "EXPORT_FORMATS",
           "check_name", "read_list", "write_list"]

# a PDQ or MD5 row is under 1 kB; a vPDQ row is ~80 bytes a second of video (8 MiB: a day of it)
MAX_LINE = 8 * 1024 * 1024

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



class Banks(BankStore):
    """The bank store (``indexer.storage.banks``) with hash lists in and out."""

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

        for chunk in _batches(rows(), CHUNK):
            with self.catalog.session() as s, s.begin():
                new, dup = self.insert_chunk(s, bank.id, chunk)
            report.added += len(new)
            report.already_banked += dup
            for e in chunk:
                report.by_type[e.signal_type] = report.by_type.get(e.signal_type, 0) + 1
        return report

    def export_flagged(self, out: IO[str], *, fmt: str = "te", signal_types: Sequence[str] = ("pdq",),
                       collab: str = "flagmatch") -> int:
        """Write the flagged images' hashes as a list another team (or ``threatexchange``) can read; returns rows."""
        return write_list(out, self.flagged_signals(signal_types), fmt=fmt, collab=collab)

    def export_bank(self, name: str, out: IO[str], *, fmt: str = "te") -> int:
        bank = self.get(name, counts=False)

        def rows() -> Iterator[tuple[str, str, str]]:
            after = 0
            while page := self.page(bank.name, after=after, limit=5000):
                for e in page:
                    yield e.signal_type, e.signal, " ".join(e.tags)
                after = page[-1].id
        return write_list(out, rows(), fmt=fmt, collab=bank.name)




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
    head = first.split(None, 1)
    if len(head) == 2 and SIGNAL_ALIASES.get(head[0].lower()) == "vpdq" and head[1].startswith("["):
        # threatexchange's file rows "<type> <signal>", a vPDQ signal with commas and spaces of its own
        return _Layout(None, hash_col=1, type_col=0), False
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
    if layout.delimiter is None and layout.type_col == 0 and SIGNAL_ALIASES.get(cells[0].lower()) == "vpdq":
        value = text.partition(" ")[2]  # threatexchange's file rows: "<type> <signal>", the signal has spaces
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
