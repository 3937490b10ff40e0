"""Where images come from: folders (walked recursively), single files, a list of paths on stdin
(``-``) and manifests (CSV or JSONL with ``path`` and optional ``external_id``, ``verdict`` (a reviewer's
positive/negative for ``label``, with ``reviewer``), ``flagged``,
``label``, ``source``). A bad manifest row becomes a ``SourceError``; the rest goes on."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from indexer.storage.catalog import FlagRequest

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
MANIFEST_SOURCES = ("manual", "import")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True)
class SourceItem:
    path: str
    external_id: str | None = None
    flag: FlagRequest | None = None
    verdict: tuple[str, bool, str] | None = None  # a manifest's reviewer verdict: (label, positive, who)


@dataclass(frozen=True)
class SourceError:
    path: str
    code: str
    message: str


Source = SourceItem | SourceError


def is_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def walk(directory: Path) -> Iterator[Path]:
    """Files under ``directory`` in a stable order; hidden entries and symlinked dirs are skipped."""
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def iter_sources(args: Iterable[str], stdin: IO[str] | None = None) -> Iterator[Source]:
    for arg in args:
        if arg == "-":
            if stdin is None:
                raise ValueError("'-' given but no stdin")
            for line in stdin:
                line = line.strip()
                if line:
                    yield from _one(Path(line))
        else:
            yield from _one(Path(arg))


def _one(path: Path) -> Iterator[Source]:
    path = path.expanduser()
    if path.is_dir():
        for f in walk(path):
            yield SourceItem(str(f.resolve()))
    elif is_manifest(path):
        yield from parse_manifest(path)
    elif path.is_file():
        yield SourceItem(str(path.resolve()))
    else:
        yield SourceError(str(path), "not_found", "no such file or directory")


def count_sources(args: Iterable[str]) -> int | None:
    """How many items ``iter_sources`` will yield, or None when it cannot know (stdin)."""
    total = 0
    for arg in args:
        if arg == "-":
            return None
        p = Path(arg).expanduser()
        if p.is_dir():
            total += sum(1 for _ in walk(p))
        elif is_manifest(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                total += max(0, sum(1 for line in f if line.strip()) - (p.suffix.lower() == ".csv"))
        else:
            total += 1
    return total


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value if value is not None else "").strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"flagged must be true/false, not {value!r}")


def _row(manifest: Path, where: str, row: dict) -> Source:
    raw_path = row.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        return SourceError(where, "bad_manifest_row", "row has no path")
    p = Path(raw_path.strip()).expanduser()
    if not p.is_absolute():
        p = manifest.parent / p
    ext = row.get("external_id")
    ext = None if ext is None or str(ext).strip() == "" else str(ext).strip()[:200]
    try:
        flagged = _bool(row.get("flagged"))
    except ValueError as exc:
        return SourceError(where, "bad_manifest_row", str(exc))
    source = str(row.get("source") or "import").strip().lower()
    if source not in MANIFEST_SOURCES:
        return SourceError(where, "bad_manifest_row",
                           f"source must be one of {', '.join(MANIFEST_SOURCES)}, not {row.get('source')!r}")
    label = row.get("label")
    label = None if label is None or str(label).strip() == "" else str(label).strip()[:200]
    flag = FlagRequest(source=source, label=label, actor=f"manifest:{manifest.name}",
                       reason=f"{where}") if flagged else None
    if label is not None and not flagged:
        flag = None
    verdict = None
    if str(row.get("verdict") or "").strip():
        v = str(row.get("verdict")).strip().lower()
        if v not in _POSITIVE + _NEGATIVE:
            return SourceError(where, "bad_manifest_row", f"verdict must be positive or negative, not {row.get('verdict')!r}")
        who = str(row.get("reviewer") or f"manifest:{manifest.name}").strip()[:200]
        verdict = (label or "unsafe", v in _POSITIVE, who)
    return SourceItem(str(p.resolve()), ext, flag, verdict)


_POSITIVE = ("positive", "pos", "yes", "true", "1", "violating")
_NEGATIVE = ("negative", "neg", "no", "false", "0", "benign")


def parse_manifest(manifest: Path) -> Iterator[Source]:
    name = str(manifest)
    try:
        f = open(manifest, encoding="utf-8", newline="")
    except OSError as exc:
        yield SourceError(name, "unreadable", str(exc))
        return
    with f:
        if manifest.suffix.lower() == ".csv":
            try:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "path" not in [h.strip() for h in reader.fieldnames]:
                    yield SourceError(name, "bad_manifest", "CSV manifest needs a header row with a 'path' column")
                    return
                for row in reader:
                    where = f"{name}:{reader.line_num}"
                    clean = {(k or "").strip(): v for k, v in row.items()}
                    if None in row:  # more cells than headers
                        yield SourceError(where, "bad_manifest_row", "row has more cells than the header")
                        continue
                    yield _row(manifest, where, clean)
            except (csv.Error, UnicodeDecodeError) as exc:
                yield SourceError(name, "bad_manifest", f"cannot parse CSV: {exc}")
            return
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{name}:{n}"
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    yield SourceError(where, "bad_manifest_row", f"not JSON: {exc}")
                    continue
                if not isinstance(row, dict):
                    yield SourceError(where, "bad_manifest_row", "each line must be a JSON object")
                    continue
                yield _row(manifest, where, row)
        except UnicodeDecodeError as exc:
            yield SourceError(name, "bad_manifest", f"not UTF-8: {exc}")
