"""The data directory: the catalog, the raw vectors, the thumbnails and the writer lock, opened together
so that they are always reconciled with each other before anything reads or writes."""
from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from indexer.storage.catalog import ADVISORY_WRITERS, Catalog
from indexer.errors import FlagmatchError, ModelMismatchError
from indexer.storage.files import publish
from indexer.storage.vectors import VectorStore

CATALOG_URL_FILE = "catalog.url"  # in the home: the catalog's URL when it is a database server


@dataclass(frozen=True)
class Original:
    """A stored image's bytes read back from where it was ingested, or why not (``code``: no_path,
    unreadable, changed)."""
    data: bytes | None
    path: str
    code: str = ""
    message: str = ""


def read_original(paths: Sequence[str], sha256: str, max_bytes: int) -> Original:
    """The first of ``paths`` that still holds the bytes with this sha256 (a file since edited or replaced
    is not the image any more)."""
    last = Original(None, "", "no_path", "no path is recorded for this image")
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            last = Original(None, path, "unreadable", exc.strerror or str(exc))
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            last = Original(None, path, "changed", "the file no longer holds the image's bytes (sha256 differs)")
            continue
        return Original(data, path)
    return last


class Store:
    def __init__(self, home: Path, catalog_url: str) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "thumbs").mkdir(exist_ok=True)
        (self.home / "index").mkdir(exist_ok=True)
        self.catalog = Catalog(catalog_url)
        self._vectors: VectorStore | None = None
        if not catalog_url.startswith("sqlite"):
            self._record_catalog(catalog_url)

    def _record_catalog(self, url: str) -> None:
        """Write the catalog's URL into the home directory once (readable by its owner only: it may hold a
        password), so other hosts and commands given only the home use the same database."""
        path = self.home / CATALOG_URL_FILE
        if path.exists():
            return
        publish(path, (url + "\n").encode(), mode=0o600)

    @property
    def thumbs_dir(self) -> Path:
        return self.home / "thumbs"

    @property
    def index_dir(self) -> Path:
        return self.home / "index"

    def bind_model(self, model_id: str, dim: int, preprocessing: str, source: str = "") -> VectorStore:
        """Tie the store to a model (refusing a different one) and open the raw vectors (once)."""
        self.catalog.bind_model(model_id, dim, preprocessing, source)
        if self._vectors is None or self._vectors.dim != dim:
            self._vectors = VectorStore(self.home / "vectors", dim, self.catalog.vector_locations)
        return self._vectors

    def open_vectors(self) -> VectorStore:
        """Open the raw vectors with the dimension recorded in the catalog (for readers without a model)."""
        if self._vectors is None:
            meta = self.catalog.model_meta()
            if "dim" not in meta:
                raise FlagmatchError("the store is empty: ingest some images first", code="empty_store")
            self._vectors = VectorStore(self.home / "vectors", int(meta["dim"]), self.catalog.vector_locations)
        return self._vectors

    def check_model(self, model_id: str) -> None:
        meta = self.catalog.model_meta()
        if meta.get("model_id") not in (None, model_id):
            raise ModelMismatchError(f"this store was built with model {meta['model_id']}; the loaded model is "
                                     f"{model_id}. Serve with the model the store was built with (--model)")

    @contextmanager
    def writer(self) -> Iterator[None]:
        """A writer's lock for the length of a run. SQLite: the one-writer file lock (released by the kernel
        if the process dies). PostgreSQL: a shared advisory lock — any number of ingest processes, on any
        hosts, write one catalog at once (ids are given out per transaction, raw vectors go to each run's
        own segment); it is held on a connection of its own, so the server releases it if the process dies.
        On entry, rows of the legacy vectors.f32 a crashed writer appended but never committed are cut."""
        if self.catalog.engine.dialect.name == "postgresql":
            with self.catalog.advisory_lock(ADVISORY_WRITERS, shared=True):
                self._reconcile()
                yield
            return
        lock_path = self.home / ".writer.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FlagmatchError(f"another flagmatch process is writing to {self.home} "
                                     f"(ingest or reindex); wait for it to finish", code="busy") from None
            self._reconcile()
            yield
        finally:
            os.close(fd)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """One process at a time, across hosts, for ``name`` (publishing index files): a PostgreSQL advisory
        lock when the catalog is there (a file lock on shared storage is not reliable between hosts), else a
        file lock in the home directory."""
        if self.catalog.engine.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(f"flagmatch:{name}".encode()).digest()[:8], "big", signed=True)
            with self.catalog.advisory_lock(key):
                yield
            return
        fd = os.open(self.home / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reconcile(self) -> None:
        if self._vectors is not None:
            self._vectors.reconcile(self.catalog.max_legacy_id())

    def thumb_path(self, key: str) -> Path:
        return self.thumbs_dir / key

    @staticmethod
    def thumb_key(sha: str) -> str:
        """Where the thumbnail named ``sha`` lives under thumbs/."""
        return f"{sha[:2]}/{sha[2:4]}/{sha}.webp"

    def write_thumbnail(self, sha: str, data: bytes) -> str:
        key = self.thumb_key(sha)
        path = self.thumbs_dir / key
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            publish(path, data, durable=False)
        return key

    def close(self) -> None:
        self.catalog.close()
