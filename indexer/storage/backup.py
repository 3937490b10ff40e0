"""Backups of a home: ``backup`` takes a consistent snapshot while ingest and serving go on; ``restore``
builds a working home from one.

A backup is a folder ``DEST/<UTC time>/``, taken in this order:

1. Under the ``index-save`` lock (no vector index is published meanwhile): the catalog — SQLite's online
   backup API into ``catalog.sqlite`` (one read transaction: writers go on), or for PostgreSQL a
   REPEATABLE READ transaction whose snapshot is exported and handed to ``pg_dump --snapshot`` (custom
   format, ``catalog.pgdump``) — and the index files (``index/``: the FAISS scopes and their lists, the
   matching space, the PDQ indexes), so the vector indexes agree with the checkpoints in that catalog.
   (A PDQ index published between the two differs from its checkpoint and is rebuilt on first open, as
   any index whose checksum does not match.)
2. Then the rest of the home: raw vector segments (whole rows up to their size now — rows written after
   the snapshot are unreferenced in the copy, as after a crash), thumbnails, trained heads, cluster
   models, local exchange files.
3. ``manifest.json`` last: a folder without it is incomplete and never restored or linked from. It lists
   every file (size, mtime, sha256), the snapshot's heads (highest image id, flag event and audit row),
   the catalog's migration revision, and what the snapshot refers to that was gone by the time it was
   copied (thumbnails deleted after it, raw rows erased after it by a deletion).

Incremental: a file whose size and mtime equal its entry in the newest complete backup in ``DEST`` is
hard-linked from there instead of copied (thumbnails are content-addressed and never rewritten; a
segment only grows, or is erased in place, both of which change its mtime); ``full`` copies everything.

Not copied: the viewer's session key (``.secret_key``: sessions end at a restore), lock files, temp files
and build folders. A backup holds exchange credentials (catalog) and every image's thumbnail: its folders
are made readable by their owner only."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Connection, make_url

from indexer.errors import FlagmatchError
from indexer.storage.files import file_sha256
from indexer.storage.store import CATALOG_URL_FILE, Store
from indexer.storage.tables import AuditRow, CheckpointRow, FlagEventRow, ImageRow

MANIFEST = "manifest.json"
FORMAT = 1
SQLITE_COPY, PG_DUMP = "catalog.sqlite", "catalog.pgdump"
SKIP_NAMES = {".secret_key", CATALOG_URL_FILE, "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"}
CHUNK = 1 << 20

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Snapshot:
    """What the catalog copy holds."""
    engine: str
    revision: str
    image_head: int
    flag_event_head: int
    audit_head: int
    images_live: int
    checkpoints: dict[str, dict[str, Any]]


@dataclass
class BackupReport:
    path: Path
    snapshot: Snapshot
    files: int = 0
    copied_bytes: int = 0
    linked_bytes: int = 0
    gone_since: dict[str, list[str]] = field(default_factory=dict)  # thumbnails, vector rows gone after the snapshot


@dataclass(frozen=True)
class RestoreReport:
    home: Path
    snapshot: Snapshot
    files: int


# ---------------------------------------------------------------- the catalog's snapshot

def _snapshot(c: Connection, engine: str) -> tuple[Snapshot, dict[int, int], list[str]]:
    """The heads, checkpoints, raw-vector extents ({segment: rows needed}) and thumbnails the catalog
    as ``c`` sees it refers to."""
    live = ImageRow.deleted.is_(False)
    heads = [int(c.scalar(select(func.max(col))) or 0) for col in (ImageRow.id, FlagEventRow.id, AuditRow.id)]
    revision = c.scalar(text("SELECT version_num FROM alembic_version")) or ""
    cps = {r.scope: {"image_id": r.image_id, "flag_event_id": r.flag_event_id, "generation": r.generation,
                     "ntotal": r.ntotal, "checksum": r.checksum} for r in c.execute(select(CheckpointRow))}
    extents = {-1 if seg is None else int(seg): int(top) + 1 for seg, top in c.execute(
        select(ImageRow.vec_segment, func.max(func.coalesce(ImageRow.vec_row, ImageRow.id)))
        .where(live).group_by(ImageRow.vec_segment))}
    thumbs = [k for (k,) in c.execute(select(ImageRow.thumb_key).where(live, ImageRow.thumb_key != ""))]
    n_live = int(c.scalar(select(func.count()).select_from(ImageRow).where(live)) or 0)
    return Snapshot(engine, str(revision), heads[0], heads[1], heads[2], n_live, cps), extents, thumbs


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A libpq URI for pg_dump/pg_restore, its password passed in the environment (never in argv)."""
    u = make_url(url)
    env = dict(os.environ)
    if u.password:
        env["PGPASSWORD"] = str(u.password)
    return u.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        import glob
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        found = candidates[-1] if candidates else None
    if found is None:
        raise FlagmatchError(f"{name} is not installed (PostgreSQL's client programs: apt-get install "
                             f"postgresql-client)", code="config")
    return found


@contextmanager
def _catalog_copy(store: Store, folder: Path) -> Iterator[tuple[Snapshot, dict[int, int], list[str]]]:
    """Copy the catalog into ``folder`` and yield what that copy holds."""
    engine = store.catalog.engine
    if engine.dialect.name == "sqlite":
        target = folder / SQLITE_COPY
        src = engine.raw_connection()
        try:
            import sqlite3
            dst = sqlite3.connect(target)
            try:
                src.driver_connection.backup(dst)  # type: ignore[union-attr]  # one step: one read transaction
            finally:
                dst.close()
        finally:
            src.close()
        os.chmod(target, 0o600)
        copy = create_engine(f"sqlite:///{target}")
        try:
            with copy.connect() as c:
                yield _snapshot(c, "sqlite")
        finally:
            copy.dispose()
        return
    with engine.connect() as c:
        c = c.execution_options(isolation_level="REPEATABLE READ")
        with c.begin():
            c.execute(text("SET TRANSACTION READ ONLY"))
            snap_id = c.scalar(text("SELECT pg_export_snapshot()"))
            dsn, env = _libpq(str(engine.url.render_as_string(hide_password=False)))
            done = subprocess.run([_pg_tool("pg_dump"), "--format=custom", f"--snapshot={snap_id}", "--no-owner",
                                   "--file", str(folder / PG_DUMP), dsn], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise FlagmatchError(f"pg_dump failed: {done.stderr.strip()[-500:]}", code="backup_failed")
            os.chmod(folder / PG_DUMP, 0o600)
            yield _snapshot(c, "postgresql")


# ---------------------------------------------------------------- files

def _copy(src: Path, dst: Path, limit: int | None = None) -> tuple[int, str]:
    """Copy (at most ``limit`` bytes) and hash in one pass; (bytes, sha256)."""
    h = hashlib.sha256()
    n = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst, "wb") as out:
        while limit is None or n < limit:
            block = f.read(CHUNK if limit is None else min(CHUNK, limit - n))
            if not block:
                break
            out.write(block)
            h.update(block)
            n += len(block)
        out.flush()
        os.fsync(out.fileno())
    return n, h.hexdigest()


def _home_files(home: Path, under: tuple[str, ...]) -> list[Path]:
    out = []
    for top in under:
        root = home / top
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # build folders (.shards-*)
            out += [Path(dirpath) / n for n in filenames if not n.startswith(".") and n not in SKIP_NAMES]
    return sorted(out)


def _previous(dest: Path) -> tuple[Path, dict[str, dict[str, Any]]] | None:
    """The newest complete backup in ``dest`` and its files."""
    for folder in sorted((p for p in dest.iterdir() if p.is_dir()), reverse=True) if dest.exists() else []:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        return folder, manifest["files"]
    return None


class _Writer:
    """Puts files into a backup folder, linking from the previous backup what did not change."""

    def __init__(self, home: Path, folder: Path, previous: tuple[Path, dict[str, dict[str, Any]]] | None,
                 report: BackupReport) -> None:
        self.home, self.folder, self.previous, self.report = home, folder, previous, report
        self.files: dict[str, dict[str, Any]] = {}

    def add(self, path: Path, row_bytes: int = 0) -> None:
        rel = path.relative_to(self.home).as_posix()
        try:
            st = path.stat()
        except FileNotFoundError:
            return  # deleted since it was listed (a pruned index generation, a cache)
        size = st.st_size - (st.st_size % row_bytes if row_bytes else 0)  # whole rows of a growing segment
        dst = self.folder / "files" / rel
        old = self.previous[1].get(rel) if self.previous else None
        if old is not None and old["size"] == size and old["mtime_ns"] == st.st_mtime_ns:
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.previous[0] / "files" / rel, dst)  # type: ignore[index]
                self.files[rel] = old
                self.report.linked_bytes += size
                return
            except OSError:
                pass  # another file system, or the old copy is gone: copy it
        n, sha = _copy(path, dst, size if row_bytes else None)
        self.files[rel] = {"size": n, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        self.report.copied_bytes += n


def backup(store: Store, dest: Path, *, full: bool = False, progress: Progress | None = None) -> BackupReport:
    """Take a backup of ``store`` into a new folder under ``dest`` (see the module docstring)."""
    say = progress or (lambda stage, done, total: None)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = None if full else _previous(dest)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    folder = dest / stamp
    folder.mkdir(mode=0o700)
    home = store.home
    with store.exclusive("index-save"):
        say("catalog", 0, 1)
        with _catalog_copy(store, folder) as (snap, extents, thumbs):
            report = BackupReport(folder, snap)
            writer = _Writer(home, folder, previous, report)
            for path in _home_files(home, ("index",)):
                writer.add(path)
        say("catalog", 1, 1)
    meta = store.catalog.model_meta()
    row_bytes = int(meta.get("dim", 0)) * 4
    vectors = _home_files(home, ("vectors",))
    say("vectors", 0, len(vectors))
    for k, path in enumerate(vectors, 1):
        writer.add(path, row_bytes if path.suffix == ".f32" else 0)
        say("vectors", k, len(vectors))
    rest = _home_files(home, ("thumbs", "heads", "clusters", "exchanges"))
    for k, path in enumerate(rest, 1):
        writer.add(path)
        if k % 500 == 0 or k == len(rest):
            say("files", k, len(rest))
    report.files = len(writer.files)
    report.gone_since = _gone(writer.files, extents, thumbs, row_bytes)
    manifest = {"format": FORMAT, "created": stamp, "home": str(home), "snapshot": asdict(snap),
                "model": meta, "catalog": SQLITE_COPY if snap.engine == "sqlite" else PG_DUMP,
                "gone_since": report.gone_since, "files": writer.files}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return report


def _gone(files: dict[str, dict[str, Any]], extents: dict[int, int], thumbs: list[str],
          row_bytes: int) -> dict[str, list[str]]:
    """What the snapshot refers to that the copied files lack (removed after the snapshot was taken)."""
    missing_thumbs = [k for k in thumbs if f"thumbs/{k}" not in files]
    short = []
    for seg, rows in extents.items():
        name = "vectors/vectors.f32" if seg == -1 else f"vectors/seg-{seg:09d}.f32"
        have = files.get(name, {}).get("size", 0) // row_bytes if row_bytes else 0
        if have < rows:
            short.append(f"{name}: {have} of {rows} rows")
    return {"thumbnails": missing_thumbs[:1000], "vectors": short}


# ---------------------------------------------------------------- restore

def read_manifest(src: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise FlagmatchError(f"{src} is not a complete backup (no {MANIFEST}: it was interrupted, or this is "
                             f"the folder of backups — name one of them)", code="bad_backup") from None
    except ValueError as exc:
        raise FlagmatchError(f"{src / MANIFEST} is not readable JSON ({exc})", code="bad_backup") from None
    if manifest.get("format") != FORMAT:
        raise FlagmatchError(f"{src} is a backup in format {manifest.get('format')}, this flagmatch reads {FORMAT}",
                             code="bad_backup")
    return manifest


def restore(src: Path, home: Path, catalog_url: str = "", progress: Progress | None = None) -> RestoreReport:
    """Build a new home from a backup: every file checked against the manifest first, then copied; the
    catalog restored (SQLite: its copy; PostgreSQL: ``pg_restore`` into ``catalog_url``, an empty database)."""
    say = progress or (lambda stage, done, total: None)
    manifest = read_manifest(src)
    snap = Snapshot(**manifest["snapshot"])
    if home.exists() and any(home.iterdir()):
        raise FlagmatchError(f"{home} is not empty: restore into a new home", code="bad_parameter")
    if snap.engine == "postgresql" and not catalog_url.startswith(("postgresql", "postgres")):
        raise FlagmatchError("this backup's catalog is PostgreSQL: name the empty database to restore it into "
                             "with --catalog-url", code="bad_parameter")
    if snap.engine == "sqlite" and catalog_url:
        raise FlagmatchError("this backup's catalog is SQLite: it is restored into the new home, without "
                             "--catalog-url", code="bad_parameter")
    files: dict[str, dict[str, Any]] = manifest["files"]
    say("verify", 0, len(files))
    for k, (rel, entry) in enumerate(sorted(files.items()), 1):
        path = src / "files" / rel
        if not path.exists() or path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            raise FlagmatchError(f"backup file {rel} is missing or differs from its manifest entry: the backup "
                                 f"is damaged", code="bad_backup")
        if k % 500 == 0 or k == len(files):
            say("verify", k, len(files))
    home.mkdir(parents=True, exist_ok=True)
    for k, rel in enumerate(sorted(files), 1):
        target = home / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "files" / rel, target)
        if k % 500 == 0 or k == len(files):
            say("files", k, len(files))
    for sub in ("thumbs", "index", "vectors"):
        (home / sub).mkdir(exist_ok=True)
    say("catalog", 0, 1)
    if snap.engine == "sqlite":
        shutil.copyfile(src / SQLITE_COPY, home / "catalog.sqlite")
    else:
        _pg_restore(src / PG_DUMP, catalog_url)
        from indexer.storage.files import publish
        publish(home / CATALOG_URL_FILE, (catalog_url + "\n").encode(), mode=0o600)
    say("catalog", 1, 1)
    return RestoreReport(home, snap, len(files))


def _pg_restore(dump: Path, url: str) -> None:
    from indexer.storage.catalog import engine_url
    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as c:
            n = c.scalar(text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"))
    finally:
        engine.dispose()
    if n:
        raise FlagmatchError("the database named by --catalog-url has tables: restore into an empty database",
                             code="bad_parameter")
    dsn, env = _libpq(url)
    done = subprocess.run([_pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error",
                           "--dbname", dsn, str(dump)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise FlagmatchError(f"pg_restore failed: {done.stderr.strip()[-500:]}", code="restore_failed")
