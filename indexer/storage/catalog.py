"""The catalog: facts about every image, its paths, flags (with an append-only history), ingest errors
and runs, the model the store was built with and the index checkpoints. SQLAlchemy 2; SQLite in WAL
mode by default. ORM rows never leave this module: callers get dataclasses."""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import urllib.parse
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from sqlalchemy import (create_engine, delete, event, func, select, text, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from indexer.errors import FlagmatchError, InvalidInputError, ModelMismatchError, NotFoundError
from indexer.media.hashes import Pdq, Signals
from indexer.storage.tables import (Base, BankEntryRow, BankRow, CheckpointRow, FlagEventRow, ImageRow, ImageSignalRow,
                                    IngestErrorRow, IngestRunRow, KeyframeRow, MetaRow, PathRow, utcnow)

FLAG_SOURCES = ("model", "manual", "import", "review")
T = TypeVar("T")

# An open catalog transaction, handed to the repositories' writers (``tx=``) so that a decision and
# everything it implies commit as one; callers hold it, never look inside it.
Transaction = Session


# PostgreSQL advisory lock keys (one 64-bit space per database): flagmatch's, told apart by their low bits
ADVISORY_IDS = 0x666D_0001      # giving out image ids (held by each catalog transaction that adds images)
ADVISORY_WRITERS = 0x666D_0002  # ingest runs hold it shared; an operation that must run alone, exclusive


# ---------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class NewImage:
    id: int
    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int
    frames: int
    p_unsafe: float
    thumb_key: str
    paths: tuple[tuple[str, str | None], ...]  # (path, external_id)
    md5: str | None = None
    pdq: Pdq | None = None
    flags: "tuple[FlagRequest, ...]" = ()  # applied in the same transaction, to whatever id the image ends up with
    vec_segment: int | None = None     # where its raw vector was written (None: row = id in vectors.f32)
    vec_row: int | None = None
    kind: str = "image"                # or "video"
    duration_s: float | None = None
    vpdq: str | None = None            # a video's vPDQ
    keyframes: "tuple[NewKeyframe, ...]" = ()  # a video's, their vectors in the same segment as its own


@dataclass(frozen=True)
class NewKeyframe:
    offset_s: float
    scene_cut: bool
    p_unsafe: float
    thumb_key: str
    vec_row: int


@dataclass(frozen=True)
class KeyframeRecord:
    id: int
    image_id: int
    offset_s: float
    scene_cut: bool
    p_unsafe: float
    thumb_key: str
    vec_segment: int
    vec_row: int


@dataclass(frozen=True)
class BatchResult:
    ids: list[int]      # the id of each image written, in order (an image another writer committed first: its id)
    new: list[bool]     # whether that id is this batch's (False: the same bytes were already in the catalog)
    flagged: int        # how many images became flagged


@dataclass(frozen=True)
class FlagRequest:
    source: str
    label: str | None
    actor: str
    reason: str | None = None


@dataclass(frozen=True)
class FlagEvent:
    id: int
    image_id: int
    action: str
    source: str
    label: str | None
    actor: str
    reason: str | None
    at: dt.datetime


@dataclass(frozen=True)
class ImageRecord:
    id: int
    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int
    frames: int
    p_unsafe: float
    model_id: str
    thumb_key: str
    flagged: bool
    flag_source: str | None
    flag_label: str | None
    flagged_at: dt.datetime | None
    deleted: bool
    created_at: dt.datetime
    paths: tuple[str, ...] = ()
    external_ids: tuple[str, ...] = ()
    history: tuple[FlagEvent, ...] = ()
    kind: str = "image"
    duration_s: float | None = None


@dataclass(frozen=True)
class Checkpoint:
    scope: str
    image_id: int
    flag_event_id: int
    generation: int
    ntotal: int
    params: dict[str, Any]
    checksum: str


@dataclass
class IngestCounts:
    new: int = 0
    duplicates: int = 0
    flagged: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    decode_cpu_s: float = 0.0  # CPU seconds the run's decode threads spent decoding


def _image_record(r: ImageRow | Any, paths: Sequence[PathRow | Any] = (), history: Sequence[FlagEventRow] = ()
                  ) -> ImageRecord:
    """A record from an ORM row or a plain row of the same columns (``get_many`` reads plain rows)."""
    return ImageRecord(
        id=r.id, sha256=r.sha256, size_bytes=r.size_bytes, format=r.format, width=r.width,
        height=r.height, frames=r.frames, p_unsafe=r.p_unsafe, model_id=r.model_id,
        thumb_key=r.thumb_key, flagged=r.flagged, flag_source=r.flag_source, flag_label=r.flag_label,
        flagged_at=r.flagged_at, deleted=r.deleted, created_at=r.created_at,
        paths=tuple(p.path for p in paths),
        external_ids=tuple(sorted({p.external_id for p in paths if p.external_id})),
        history=tuple(_event(e) for e in history), kind=r.kind or "image", duration_s=r.duration_s)


def _keyframe(r: KeyframeRow | Any) -> KeyframeRecord:
    return KeyframeRecord(int(r.id), int(r.image_id), float(r.offset_s), bool(r.scene_cut), float(r.p_unsafe),
                          str(r.thumb_key), int(r.vec_segment), int(r.vec_row))


def _event(e: FlagEventRow) -> FlagEvent:
    return FlagEvent(e.id, e.image_id, e.action, e.source, e.label, e.actor, e.reason, e.at)


# ---------------------------------------------------------------------------------- catalog

def engine_url(url: str) -> str:
    """The URL with its driver: PostgreSQL runs on psycopg 3 (``pip install 'flagmatch[postgres]'``), so a
    plain ``postgresql://`` URL is read as ``postgresql+psycopg://``."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def make_engine(url: str) -> Engine:
    url = engine_url(url)
    if url.startswith("postgresql+psycopg"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise FlagmatchError("the catalog URL names PostgreSQL, which needs the psycopg driver: "
                                 "pip install 'flagmatch[postgres]'", code="config") from None
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:  # engine setup: the one SQLite-only place
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "close")
        def _sqlite_optimize(conn: Any, _record: Any) -> None:
            # SQLite's advice for keeping the planner's statistics fresh: as a connection closes, analyse
            # what its queries showed would benefit (after a large import, the bank entries' index)
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:  # a read-only or busy database: the statistics wait for the next close
                pass
        return engine
    return create_engine(url, pool_pre_ping=True)


def create_tables(metadata: Any, engine: Engine) -> None:
    """create_all that tolerates another process creating the same tables at the same moment
    (server workers start together): "already exists" means the other one won; look again."""
    from sqlalchemy.exc import OperationalError, ProgrammingError
    for attempt in range(5):
        try:
            metadata.create_all(engine)
            return
        except (OperationalError, ProgrammingError) as exc:
            if "already exists" not in str(exc) or attempt == 4:
                raise


class Catalog:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        from indexer.storage import schema
        schema.upgrade(self.engine, Base.metadata)  # create, or migrate in place (Alembic)
        # a catalog dropped without close() (a short command, a test) still closes its pooled connections:
        # a database server would otherwise keep a session per forgotten connection until the process ends
        weakref.finalize(self, self.engine.dispose)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._watch_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
        self._unchanged: dict[str, tuple[object, Any]] = {}

    def session(self) -> Session:
        return self._session()

    # -- change detection
    def unless_changed(self, key: str, read: Callable[[], T]) -> T:
        """``read()``'s answer, read again only after something was committed (``change_token``): for the
        small tables every request consults (the banks, the current clustering run). The answer is shared
        between threads, so it must be immutable."""
        token = self.change_token()  # first: a commit after it makes the next call read again
        kept = self._unchanged.get(key)
        if kept is not None and kept[0] == token:
            return kept[1]  # type: ignore[no-any-return]
        value = read()
        self._unchanged[key] = (token, value)
        return value

    def change_token(self) -> object:
        """A value equal between two calls only if nothing was committed to the catalog in between, by any
        process (it may also differ with nothing of interest changed). A reader that keeps up with a table
        (the hash indexes before every lookup) skips its reads while the token holds: one statement instead of
        two catalog round trips.

        SQLite: ``PRAGMA data_version`` on a connection of the catalog's own that never writes — SQLite changes
        it for every commit made through any other connection, in this process or another. PostgreSQL: the
        server's current snapshot (``xmin:xmax:in-progress``); two equal snapshots see the same committed
        transactions, so the same data. A database only one connection can see (in-memory SQLite) gives a new
        token every call."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as c:
                return c.exec_driver_sql("SELECT pg_current_snapshot()::text").scalar()
        path = self.engine.url.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return object()
        with self._watch_lock:
            if self._watch is None:
                self._watch = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True,
                                              check_same_thread=False, isolation_level=None)
                weakref.finalize(self, self._watch.close)
            return self._watch.execute("PRAGMA data_version").fetchone()[0]

    @contextmanager
    def transaction(self, tx: Transaction | None = None) -> Iterator[Transaction]:
        """One transaction for a decision and everything it implies (verdicts, queue, audit row, cluster
        identity): the repositories' writers take it as ``tx`` and write inside it, so all of it commits
        together or none of it does. Given an open ``tx``, joins it."""
        if tx is not None:
            yield tx
            return
        with self.session() as s, s.begin():
            yield s

    def close(self) -> None:
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        self.engine.dispose()

    # -- the model the store is tied to
    def model_meta(self) -> dict[str, str]:
        with self.session() as s:
            return {r.key: r.value for r in s.scalars(select(MetaRow))}

    def bind_model(self, model_id: str, dim: int, preprocessing: str, source: str = "") -> None:
        """Record the model on first use (and where to load it from); refuse a different one afterwards."""
        with self.session() as s, s.begin():
            self._lock_ids(s)  # two writers binding a new catalog at once: one records, the other checks
            meta = {r.key: r.value for r in s.scalars(select(MetaRow))}
            if "model_id" not in meta:
                s.add_all([MetaRow(key="model_id", value=model_id), MetaRow(key="dim", value=str(dim)),
                           MetaRow(key="preprocessing", value=preprocessing)])
                if source:
                    s.add(MetaRow(key="model_source", value=source))
                return
            if meta["model_id"] != model_id or int(meta["dim"]) != dim:
                raise ModelMismatchError(
                    f"this store was built with model {meta['model_id']} ({meta['dim']}-d); the loaded model is "
                    f"{model_id} ({dim}-d). Use the same model (--model), or a new --home for the new one")
            if source and "model_source" not in meta:  # a store from before sources were recorded
                s.add(MetaRow(key="model_source", value=source))

    # -- ids and lookups
    def max_image_id(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.max(ImageRow.id))) or 0)

    def max_legacy_id(self) -> int:
        """The highest id whose raw vector is a row of the legacy vectors.f32 (no segment)."""
        with self.session() as s:
            return int(s.scalar(select(func.max(ImageRow.id)).where(ImageRow.vec_segment.is_(None))) or 0)

    @contextmanager
    def advisory_lock(self, key: int, *, shared: bool = False, wait: bool = True) -> Iterator[None]:
        """A PostgreSQL session-level advisory lock, held on a connection of its own until the block ends
        (or the process dies: the server drops its locks with the connection)."""
        fn = ("pg_advisory_lock_shared" if shared else "pg_advisory_lock") if wait else \
             ("pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock")
        conn = self.engine.connect()
        try:
            got = conn.execute(text(f"SELECT {fn}(:k)"), {"k": key}).scalar()
            conn.commit()
            if not wait and not got:
                raise FlagmatchError("another flagmatch process holds this catalog's lock; wait for it to finish",
                                     code="busy")
            try:
                yield
            finally:
                conn.execute(text(f"SELECT pg_advisory_unlock{'_shared' if shared else ''}(:k)"), {"k": key})
                conn.commit()
        finally:
            conn.close()

    def known_sha(self, sha: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(ImageRow.id).where(ImageRow.sha256 == sha))

    def lookup_shas(self, shas: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """{sha256: (image id, deleted)} for the given contents the catalog has."""
        out: dict[str, tuple[int, bool]] = {}
        with self.session() as s:
            for part in range(0, len(shas), 500):
                for sha, i, deleted in s.execute(select(ImageRow.sha256, ImageRow.id, ImageRow.deleted)
                                                 .where(ImageRow.sha256.in_(list(shas[part:part + 500])))):
                    out[sha] = (int(i), bool(deleted))
        return out

    def deleted_sha(self, sha: str) -> bool:
        """Whether these bytes were deleted (kept by sha256 only, so they are never taken in again)."""
        with self.session() as s:
            return bool(s.scalar(select(ImageRow.deleted).where(ImageRow.sha256 == sha)))

    def resolve(self, ref: str | int) -> int:
        """An image id from an id, a sha256 or an external id."""
        with self.session() as s:
            text = str(ref).strip()
            if text.isdigit() and s.get(ImageRow, int(text)) is not None:
                return int(text)
            if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
                found = s.scalar(select(ImageRow.id).where(ImageRow.sha256 == text.lower()))
                if found is not None:
                    return int(found)
            ids = set(s.scalars(select(PathRow.image_id).where(PathRow.external_id == text)))
            if len(ids) == 1:
                return ids.pop()
            if len(ids) > 1:
                raise InvalidInputError(f"external id {text!r} names {len(ids)} different images; use an id")
        raise NotFoundError(f"no image with id, sha256 or external id {text!r}")

    def get(self, image_id: int) -> ImageRecord:
        with self.session() as s:
            r = s.get(ImageRow, image_id)
            if r is None:
                raise NotFoundError(f"no image with id {image_id}")
            paths = s.scalars(select(PathRow).where(PathRow.image_id == image_id).order_by(PathRow.id)).all()
            hist = s.scalars(select(FlagEventRow).where(FlagEventRow.image_id == image_id)
                             .order_by(FlagEventRow.id)).all()
            return _image_record(r, paths, hist)

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, ImageRecord] = {}
        if not ids:
            return out
        images, paths = ImageRow.__table__, PathRow.__table__
        # the read behind every hit of every search: one statement (each image joined with its paths, in the
        # order they were seen), plain rows, no ORM instances
        q = (select(images, paths.c.path, paths.c.external_id)
             .join(paths, paths.c.image_id == images.c.id, isouter=True).order_by(images.c.id, paths.c.id))
        with self.engine.connect() as c:
            for chunk in _chunks(ids, 500):
                rows: dict[int, tuple[Any, list[Any]]] = {}
                for r in c.execute(q.where(images.c.id.in_(chunk))):
                    rows.setdefault(r.id, (r, []))[1].extend([r] if r.path is not None else [])
                for i, (r, found) in rows.items():
                    out[i] = _image_record(r, found)
        return out

    def live(self, ids: Iterable[int], *, flagged: bool = False) -> set[int]:
        """Of ``ids``, those not deleted (and, with ``flagged``, flagged) now: the query-time guard."""
        ids = [int(i) for i in ids]
        out: set[int] = set()
        with self.session() as s:
            for chunk in _chunks(ids, 500):
                q = select(ImageRow.id).where(ImageRow.id.in_(chunk), ImageRow.deleted.is_(False))
                out.update(s.scalars(q.where(ImageRow.flagged) if flagged else q))
        return out

    def point_facts(self, ids: Sequence[int]) -> dict[int, tuple[float, bool, bool]]:
        """(P(unsafe), flagged, deleted) of each of ``ids``, without hydrating records (the map's colours)."""
        out: dict[int, tuple[float, bool, bool]] = {}
        with self.session() as s:
            for chunk in _chunks(list(ids), 20_000):
                out.update((int(i), (float(p), bool(f), bool(d))) for i, p, f, d in s.execute(
                    select(ImageRow.id, ImageRow.p_unsafe, ImageRow.flagged, ImageRow.deleted)
                    .where(ImageRow.id.in_(chunk))))
        return out

    def flag_states(self, ids: Sequence[int]) -> dict[int, bool]:
        """Whether each of ``ids`` is flagged now (live images only): one light query per 500."""
        out: dict[int, bool] = {}
        with self.session() as s:
            for chunk in _chunks(list(ids), 500):
                out.update((int(i), bool(f)) for i, f in s.execute(
                    select(ImageRow.id, ImageRow.flagged).where(ImageRow.id.in_(chunk), ImageRow.deleted.is_(False))))
        return out

    def image_ids(self, *, flagged: bool | None = None, after: int = 0, upto: int | None = None,
                  flagged_since: dt.datetime | None = None) -> list[int]:
        with self.session() as s:
            q = select(ImageRow.id).where(ImageRow.id > after, ImageRow.deleted.is_(False))
            if upto is not None:
                q = q.where(ImageRow.id <= upto)
            if flagged is not None:
                q = q.where(ImageRow.flagged.is_(flagged))
            if flagged_since is not None:
                q = q.where(ImageRow.flagged_at >= flagged_since)
            return list(s.scalars(q.order_by(ImageRow.id)))

    def flag_events_after(self, event_id: int) -> list[FlagEvent]:
        with self.session() as s:
            return [_event(e) for e in s.scalars(select(FlagEventRow).where(FlagEventRow.id > event_id)
                                                 .order_by(FlagEventRow.id))]

    def head(self) -> tuple[int, int]:
        """(highest image id, highest flag event id): what an up-to-date index covers."""
        with self.session() as s:
            return (int(s.scalar(select(func.max(ImageRow.id))) or 0),
                    int(s.scalar(select(func.max(FlagEventRow.id))) or 0))

    def first_created_after(self, image_id: int) -> dt.datetime | None:
        """When the first image after ``image_id`` was written (how long an index covering up to
        ``image_id`` has been behind), or None when there is none."""
        with self.session() as s:
            return s.scalar(select(ImageRow.created_at).where(ImageRow.id > image_id).order_by(ImageRow.id).limit(1))

    def unflagged_before(self, cutoff: dt.datetime, limit: int = 10_000) -> list[tuple[int, str]]:
        """(id, thumbnail key) of live images that still have a thumbnail and whose last flag event is an
        unflag older than ``cutoff`` (judged not unsafe, and long enough ago)."""
        last = (select(FlagEventRow.image_id, func.max(FlagEventRow.id).label("last"))
                .group_by(FlagEventRow.image_id).subquery())
        with self.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.thumb_key)
                             .join(last, last.c.image_id == ImageRow.id)
                             .join(FlagEventRow, FlagEventRow.id == last.c.last)
                             .where(FlagEventRow.action == "unflag", FlagEventRow.at < cutoff,
                                    ImageRow.flagged.is_(False), ImageRow.deleted.is_(False),
                                    ImageRow.thumb_key != "")
                             .order_by(ImageRow.id).limit(limit))
            return [(int(i), str(k)) for i, k in rows]

    def forget_thumbnails(self, image_ids: Sequence[int], tx: Transaction | None = None) -> None:
        """Record that these images (and a video's keyframes) keep no thumbnail (retention); the files go after
        the commit."""
        with self.transaction(tx) as s:
            s.execute(update(ImageRow).where(ImageRow.id.in_(list(image_ids))).values(thumb_key="", updated_at=utcnow()))
            s.execute(update(KeyframeRow).where(KeyframeRow.image_id.in_(list(image_ids))).values(thumb_key=""))

    def forget_keyframes(self, image_ids: Sequence[int]) -> None:
        """Remove deleted videos' keyframe rows, once their thumbnails and vectors are gone (``delete_images``)."""
        with self.transaction() as s:
            for chunk in _chunks(list(image_ids), 500):
                s.execute(delete(KeyframeRow).where(KeyframeRow.image_id.in_(chunk)))

    def replica_lag(self) -> float | None:
        """Seconds a PostgreSQL standby's replay is behind (None on a primary, and on SQLite)."""
        if self.engine.dialect.name != "postgresql":
            return None
        with self.engine.connect() as c:
            standby, lag = c.execute(text("SELECT pg_is_in_recovery(), EXTRACT(EPOCH FROM (now() - "
                                          "pg_last_xact_replay_timestamp()))")).one()
        return float(lag or 0.0) if standby else None

    # -- writes
    def write_batch(self, images: Sequence[NewImage], model_id: str,
                    extra_paths: Sequence[tuple[int, str, str | None]] = (),
                    flags: Sequence[tuple[int, FlagRequest]] = (),
                    errors: Sequence[tuple[str, str, str]] = (), run_id: int | None = None) -> int:
        """One transaction: new images with their paths, paths seen for known images, flags, errors.
        Returns how many images became flagged."""
        return self.write_images(images, model_id, extra_paths, flags, errors, run_id).flagged

    def write_images(self, images: Sequence[NewImage], model_id: str,
                     extra_paths: Sequence[tuple[int, str, str | None]] = (),
                     flags: Sequence[tuple[int, FlagRequest]] = (),
                     errors: Sequence[tuple[str, str, str]] = (), run_id: int | None = None) -> BatchResult:
        """``write_batch`` for writers that let the catalog choose ids (``NewImage.id`` 0): ids are given out
        inside the transaction under the catalog's id lock, so they are committed in increasing order
        whatever the number of writers (readers that follow the catalog by id never skip one). Bytes another
        writer committed first (same sha256) become a path of that image — its path, external id and flag
        are kept — and their id is returned with ``new`` False."""
        now = utcnow()
        with self.session() as s, s.begin():
            if any(im.id <= 0 for im in images) or flags or any(im.flags for im in images):
                self._lock_ids(s)  # new ids and flag events are committed in id order
            wanted = [im.sha256 for im in images if im.id <= 0]
            taken: dict[str, int] = {sha: int(i) for sha, i in s.execute(
                select(ImageRow.sha256, ImageRow.id).where(ImageRow.sha256.in_(wanted)))} if wanted else {}
            next_id = int(s.scalar(select(func.max(ImageRow.id))) or 0) + 1
            ids: list[int] = []
            new: list[bool] = []
            fresh: list[tuple[int, NewImage]] = []
            extra = list(extra_paths)
            flag_list = list(flags)
            for im in images:
                if im.id <= 0 and im.sha256 in taken:  # another writer was first with these bytes
                    image_id = taken[im.sha256]
                    ids.append(image_id)
                    new.append(False)
                    extra.extend((image_id, path, ext) for path, ext in im.paths)
                else:
                    image_id = im.id if im.id > 0 else next_id
                    next_id = max(next_id, image_id + 1)
                    taken[im.sha256] = image_id
                    ids.append(image_id)
                    new.append(True)
                    fresh.append((image_id, im))
                flag_list.extend((image_id, req) for req in im.flags)
            for image_id, im in fresh:
                s.add(ImageRow(id=image_id, sha256=im.sha256, size_bytes=im.size_bytes, format=im.format,
                               width=im.width, height=im.height, frames=im.frames, p_unsafe=float(im.p_unsafe),
                               model_id=model_id, thumb_key=im.thumb_key, created_at=now, updated_at=now,
                               vec_segment=im.vec_segment, vec_row=im.vec_row, kind=im.kind,
                               duration_s=im.duration_s))
            s.flush()
            for image_id, im in fresh:
                if im.md5 is not None or im.pdq is not None or im.vpdq is not None:
                    s.add(_signal_row(image_id, im.md5, im.pdq, im.vpdq))
                for kf in im.keyframes:  # (their ids follow the image ids' order: the same id lock)
                    s.add(KeyframeRow(image_id=image_id, offset_s=kf.offset_s, scene_cut=kf.scene_cut,
                                      p_unsafe=float(kf.p_unsafe), thumb_key=kf.thumb_key,
                                      vec_segment=int(im.vec_segment if im.vec_segment is not None else -1),
                                      vec_row=kf.vec_row))
            seen: set[tuple[int, str]] = set()
            for image_id, im in fresh:
                for path, ext in im.paths:
                    seen.add((image_id, path))
                    s.add(PathRow(image_id=image_id, path=path, external_id=ext, first_seen=now))
            for image_id, path, ext in extra:
                if (image_id, path) in seen:
                    continue
                seen.add((image_id, path))
                existing = s.scalar(select(PathRow).where(PathRow.image_id == image_id, PathRow.path == path))
                if existing is None:
                    s.add(PathRow(image_id=image_id, path=path, external_id=ext, first_seen=now))
                elif ext and existing.external_id != ext:
                    existing.external_id = ext
            s.flush()
            flagged = {image_id for image_id, req in flag_list
                       if self._apply_flag(s, image_id, req, flag=True, only_if_changed=True, now=now)}
            for path, code, message in errors:
                s.add(IngestErrorRow(run_id=run_id, path=path, code=code, message=message, at=now))
        return BatchResult(ids, new, len(flagged))

    def _lock_ids(self, s: Session) -> None:
        """Hold the catalog's id lock until this transaction ends. PostgreSQL: a transaction-level advisory
        lock (several ingest hosts); SQLite: its one database write lock, taken now rather than at the first
        write (``BEGIN IMMEDIATE`` semantics), so reading the highest id and writing after it are one step."""
        if self.engine.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_IDS})
        elif self.engine.dialect.name == "sqlite":
            s.execute(text("UPDATE meta SET value = value WHERE key = 'model_id'"))  # takes the write lock

    def vector_locations(self, after: int, limit: int = 1_000_000) -> list[tuple[int, int | None, int | None]]:
        """(image id, segment, row) for ids above ``after``, in id order (deleted images too: their rows
        are zeroed, never reused)."""
        with self.session() as s:
            return [(int(i), seg, row) for i, seg, row in s.execute(
                select(ImageRow.id, ImageRow.vec_segment, ImageRow.vec_row).where(ImageRow.id > after)
                .order_by(ImageRow.id).limit(limit))]

    def _apply_flag(self, s: Session, image_id: int, req: FlagRequest, *, flag: bool,
                    only_if_changed: bool, now: dt.datetime) -> bool:
        if req.source not in FLAG_SOURCES and not req.source.startswith("head:"):
            raise InvalidInputError(f"flag source must be one of {', '.join(FLAG_SOURCES)} or head:<label>@v<n>, "
                                    f"not {req.source!r}")
        row = s.get(ImageRow, image_id)
        if row is None:
            raise NotFoundError(f"no image with id {image_id}")
        if only_if_changed and row.flagged == flag:
            return False
        s.add(FlagEventRow(image_id=image_id, action="flag" if flag else "unflag", source=req.source,
                           label=req.label, actor=req.actor, reason=req.reason, at=now))
        row.flagged = flag
        row.flag_source = req.source if flag else None
        row.flag_label = req.label if flag else None
        row.flagged_at = now if flag else None
        row.updated_at = now
        return True

    def set_flag(self, image_ids: Sequence[int], req: FlagRequest, *, flag: bool,
                 tx: Transaction | None = None) -> list[int]:
        """Flag or unflag; returns the ids whose state changed. A re-flag with a new label is recorded too."""
        changed: list[int] = []
        now = utcnow()
        with self.transaction(tx) as s:
            self._lock_ids(s)  # flag events are committed in id order (replicas follow them by id)
            for image_id in image_ids:
                row = s.get(ImageRow, image_id)
                if row is None:
                    raise NotFoundError(f"no image with id {image_id}")
                relabel = flag and row.flagged and req.label is not None and req.label != row.flag_label
                if self._apply_flag(s, image_id, req, flag=flag, only_if_changed=not relabel, now=now):
                    changed.append(image_id)
        return changed

    def mark_deleted(self, image_ids: Sequence[int], actor: str, reason: str | None,
                     tx: Transaction | None = None) -> None:
        now = utcnow()
        with self.transaction(tx) as s:
            self._lock_ids(s)
            for image_id in image_ids:
                row = s.get(ImageRow, image_id)
                if row is None:
                    raise NotFoundError(f"no image with id {image_id}")
                if row.flagged:
                    self._apply_flag(s, image_id, FlagRequest(row.flag_source or "manual", None, actor, reason),
                                     flag=False, only_if_changed=True, now=now)
                row.deleted = True
                row.thumb_key = ""
                row.updated_at = now
                s.execute(delete(PathRow).where(PathRow.image_id == image_id))  # where it came from goes too

    # -- hashes
    def signals(self, ids: Iterable[int]) -> dict[int, Signals]:
        ids = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, Signals] = {}
        if not ids:
            return out
        t = ImageSignalRow.__table__
        with self.engine.connect() as c:  # plain rows, as get_many
            for chunk in _chunks(ids, 500):
                for r in c.execute(select(t).where(t.c.image_id.in_(chunk))):
                    out[r.image_id] = _signals(r)
        return out

    def pdq_rows_after(self, image_id: int, limit: int = 100_000) -> list[tuple[int, str]]:
        """(image id, PDQ) of live images past ``image_id`` whose hash may match (quality ≥ the minimum)."""
        from indexer.media.hashes import PDQ_MIN_QUALITY
        with self.session() as s:
            q = (select(ImageSignalRow.image_id, ImageSignalRow.pdq)
                 .join(ImageRow, ImageRow.id == ImageSignalRow.image_id)
                 .where(ImageSignalRow.image_id > image_id, ImageSignalRow.pdq.is_not(None),
                        ImageSignalRow.pdq_quality >= PDQ_MIN_QUALITY, ImageRow.deleted.is_(False))
                 .order_by(ImageSignalRow.image_id).limit(limit))
            return [(int(i), str(h)) for i, h in s.execute(q)]

    def vpdq_rows(self) -> list[tuple[int, str]]:
        """(image id, vPDQ) of every live video."""
        with self.session() as s:
            q = (select(ImageSignalRow.image_id, ImageSignalRow.vpdq)
                 .join(ImageRow, ImageRow.id == ImageSignalRow.image_id)
                 .where(ImageSignalRow.vpdq.is_not(None), ImageRow.deleted.is_(False)).order_by(ImageSignalRow.image_id))
            return [(int(i), str(v)) for i, v in s.execute(q)]

    def vpdq_state(self) -> tuple[int, int]:
        """(live videos with a vPDQ, the highest such id): what an in-memory vPDQ index was built from."""
        with self.session() as s:
            n, top = s.execute(select(func.count(), func.max(ImageSignalRow.image_id))
                               .join(ImageRow, ImageRow.id == ImageSignalRow.image_id)
                               .where(ImageSignalRow.vpdq.is_not(None), ImageRow.deleted.is_(False))).one()
            return int(n or 0), int(top or 0)

    # -- a video's keyframes
    def keyframes(self, image_ids: Iterable[int]) -> dict[int, list[KeyframeRecord]]:
        """The keyframes of each of ``image_ids`` (videos; an image has none), in clip order."""
        out: dict[int, list[KeyframeRecord]] = {}
        t = KeyframeRow.__table__
        with self.engine.connect() as c:
            for chunk in _chunks(list(dict.fromkeys(int(i) for i in image_ids)), 500):
                for r in c.execute(select(t).where(t.c.image_id.in_(chunk)).order_by(t.c.image_id, t.c.offset_s)):
                    out.setdefault(int(r.image_id), []).append(_keyframe(r))
        return out

    def keyframe(self, image_id: int, keyframe_id: int) -> KeyframeRecord:
        """One keyframe of a video; NotFoundError unless ``keyframe_id`` is one of ``image_id``'s."""
        with self.session() as s:
            r = s.get(KeyframeRow, keyframe_id)
            if r is None or r.image_id != image_id:
                raise NotFoundError(f"image {image_id} has no keyframe {keyframe_id}")
            return _keyframe(r)

    def keyframes_after(self, keyframe_id: int, limit: int = 100_000) -> list[KeyframeRecord]:
        """Keyframes of live videos past ``keyframe_id``, in id order (what the frame index follows)."""
        t, im = KeyframeRow.__table__, ImageRow.__table__
        with self.engine.connect() as c:
            q = (select(t).join(im, im.c.id == t.c.image_id).where(t.c.id > keyframe_id, im.c.deleted.is_(False))
                 .order_by(t.c.id).limit(limit))
            return [_keyframe(r) for r in c.execute(q)]

    def max_keyframe_id(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.max(KeyframeRow.id))) or 0)

    def images_with_md5(self, md5: str) -> list[int]:
        with self.session() as s:
            return list(s.scalars(select(ImageSignalRow.image_id).join(ImageRow, ImageRow.id == ImageSignalRow.image_id)
                                  .where(ImageSignalRow.md5 == md5, ImageRow.deleted.is_(False))))

    def unhashed(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, tuple[str, ...]]]:
        """Live images past ``after`` with no hashes yet: (id, sha256, the paths they were seen at)."""
        with self.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.sha256)
                             .outerjoin(ImageSignalRow, ImageSignalRow.image_id == ImageRow.id)
                             .where(ImageRow.id > after, ImageRow.deleted.is_(False),
                                    ImageSignalRow.image_id.is_(None)).order_by(ImageRow.id).limit(limit)).all()
            paths: dict[int, list[str]] = {}
            for chunk in _chunks([r[0] for r in rows], 500):
                for p in s.scalars(select(PathRow).where(PathRow.image_id.in_(chunk)).order_by(PathRow.id)):
                    paths.setdefault(p.image_id, []).append(p.path)
            return [(int(i), str(sha), tuple(paths.get(i, ()))) for i, sha in rows]

    def count_unhashed(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ImageRow)
                                .outerjoin(ImageSignalRow, ImageSignalRow.image_id == ImageRow.id)
                                .where(ImageRow.deleted.is_(False), ImageSignalRow.image_id.is_(None))) or 0)

    def set_signals(self, rows: Sequence[tuple[int, str | None, Pdq | None]]) -> None:
        """Record (image id, md5, PDQ) for images hashed after the fact; an image hashed already is left alone."""
        with self.session() as s, s.begin():
            for image_id, md5, pdq in rows:
                if s.get(ImageSignalRow, image_id) is None:
                    s.add(_signal_row(image_id, md5, pdq))

    # -- runs, errors, stats
    def start_run(self, model_id: str, backend: str, precision: str) -> int:
        with self.session() as s, s.begin():
            r = IngestRunRow(model_id=model_id, backend=backend, precision=precision)
            s.add(r)
            s.flush()
            return int(r.id)

    def finish_run(self, run_id: int, counts: IngestCounts) -> None:
        with self.session() as s, s.begin():
            s.execute(update(IngestRunRow).where(IngestRunRow.id == run_id)
                      .values(finished_at=utcnow(), counts=json.dumps(counts.__dict__)))

    def errors(self, limit: int = 50) -> list[tuple[str, str, str]]:
        with self.session() as s:
            rows = s.scalars(select(IngestErrorRow).order_by(IngestErrorRow.id.desc()).limit(limit))
            return [(r.path, r.code, r.message) for r in rows]

    def stats(self) -> dict[str, Any]:
        with self.session() as s:
            live = ImageRow.deleted.is_(False)
            by_source = dict(s.execute(select(ImageRow.flag_source, func.count()).where(ImageRow.flagged, live)
                                       .group_by(ImageRow.flag_source)).all())
            err = dict(s.execute(select(IngestErrorRow.code, func.count()).group_by(IngestErrorRow.code)).all())
            last = s.scalar(select(IngestRunRow).order_by(IngestRunRow.id.desc()).limit(1))
            meta = {r.key: r.value for r in s.scalars(select(MetaRow))}
            return {
                "images": int(s.scalar(select(func.count()).select_from(ImageRow).where(live)) or 0),
                "videos": int(s.scalar(select(func.count()).select_from(ImageRow)
                                       .where(live, ImageRow.kind == "video")) or 0),
                "keyframes": int(s.scalar(select(func.count()).select_from(KeyframeRow)) or 0),
                "flagged": int(sum(by_source.values())),
                "flagged_by_source": {str(k): int(v) for k, v in by_source.items()},
                "paths": int(s.scalar(select(func.count()).select_from(PathRow)) or 0),
                "errors": {str(k): int(v) for k, v in err.items()},
                "model_id": meta.get("model_id"),
                "dim": int(meta["dim"]) if "dim" in meta else None,
                "hashes": {
                    "images_hashed": int(s.scalar(select(func.count()).select_from(ImageSignalRow)) or 0),
                    "banks": int(s.scalar(select(func.count()).select_from(BankRow)) or 0),
                    "banked_signals": int(s.scalar(select(func.count()).select_from(BankEntryRow)) or 0)},
                "last_run": None if last is None else {
                    "id": last.id, "started_at": last.started_at.isoformat(timespec="seconds"),
                    "finished_at": last.finished_at.isoformat(timespec="seconds") if last.finished_at else None,
                    "backend": last.backend, "precision": last.precision, "counts": json.loads(last.counts)},
            }

    # -- index checkpoints
    def checkpoint(self, scope: str) -> Checkpoint | None:
        with self.session() as s:
            r = s.get(CheckpointRow, scope)
            if r is None:
                return None
            return Checkpoint(r.scope, r.image_id, r.flag_event_id, r.generation, r.ntotal,
                              json.loads(r.params), r.checksum)

    def save_checkpoint(self, cp: Checkpoint) -> None:
        with self.session() as s, s.begin():
            r = s.get(CheckpointRow, cp.scope)
            if r is None:
                r = CheckpointRow(scope=cp.scope)
                s.add(r)
            r.image_id, r.flag_event_id, r.generation = cp.image_id, cp.flag_event_id, cp.generation
            r.ntotal, r.params, r.checksum, r.saved_at = cp.ntotal, json.dumps(cp.params), cp.checksum, utcnow()


def _signal_row(image_id: int, md5: str | None, pdq: Pdq | None, vpdq: str | None = None) -> ImageSignalRow:
    return ImageSignalRow(image_id=image_id, md5=md5, pdq=pdq.hash if pdq else None,
                          pdq_quality=pdq.quality if pdq else None, vpdq=vpdq)


def _signals(r: ImageSignalRow | Any) -> Signals:  # an ORM row or a plain row of its columns
    return Signals(r.md5 or "", Pdq(r.pdq, int(r.pdq_quality or 0)) if r.pdq else None, r.vpdq)


def _chunks(seq: Sequence[int], n: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


__all__ = ["Catalog", "NewImage", "NewKeyframe", "KeyframeRecord", "FlagRequest", "FlagEvent", "ImageRecord", "Checkpoint", "IngestCounts",
           "FLAG_SOURCES", "IntegrityError", "utcnow"]
