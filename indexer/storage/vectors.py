"""Raw embeddings on disk, as fixed-size float32 rows in append-only files.

Each ingest run writes its own **segment** (``seg-<run id>.f32``, run ids come from the catalog, so
writers on several hosts sharing one home directory never write the same file) and the catalog records
each image's (segment, row). Rows are appended and fsynced *before* the catalog commits the images they
belong to, so after a crash a segment can only hold rows nobody refers to — never a missing one — and
a new run starts a new segment. Stores from before segments keep their single ``vectors.f32`` (row =
image id), read as before; ``reconcile`` still cuts that file back to the catalog after a crash.

Readers map each file read-only and keep an id → (segment, row) table, caught up from the catalog by id
(ids are committed in increasing order, see ``Catalog.write_images``)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from indexer.errors import FlagmatchError, ModelMismatchError
from indexer.storage.files import publish

DTYPE = np.float32
LEGACY = -1  # the segment number of vectors.f32 (row = image id)

# (id, segment or None, row or None) for ids above the argument, in id order
Locator = Callable[[int], Sequence[tuple[int, int | None, int | None]]]


class Segment:
    """One writer run's append-only file."""

    def __init__(self, path: Path, number: int, row_bytes: int) -> None:
        self.path, self.number, self.row_bytes = path, number, row_bytes
        self._lock = threading.Lock()

    def append(self, vectors: np.ndarray) -> int:
        """Append rows and fsync; returns the row number of the first. Rows a crashed run left after its
        last committed one are skipped over (they stay, unreferenced)."""
        data = np.ascontiguousarray(vectors, dtype=DTYPE).tobytes()
        with self._lock, open(self.path, "ab") as f:
            size = f.seek(0, os.SEEK_END)
            if size % self.row_bytes:  # a torn last row from a crash in this run's earlier life: pad it out
                pad = self.row_bytes - size % self.row_bytes
                f.write(b"\0" * pad)
                size += pad
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return size // self.row_bytes


class VectorStore:
    def __init__(self, directory: Path, dim: int, locator: Locator | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "vectors.f32"
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if int(meta["dim"]) != dim:
                raise ModelMismatchError(f"raw vectors in {self.dir} are {meta['dim']}-d, the model gives {dim}-d")
        else:
            publish(meta_path, json.dumps({"dim": dim, "dtype": "float32",
                                           "row": "catalog images.vec_segment/vec_row; vectors.f32: image id"}).encode())
        self.dim = dim
        self.row_bytes = dim * np.dtype(DTYPE).itemsize
        self.locator = locator
        self._lock = threading.Lock()
        self._maps: dict[int, np.memmap] = {}
        self._seg = np.full(1, LEGACY, np.int32)  # by image id
        self._row = np.zeros(1, np.int64)
        self._known = 0  # highest image id whose location is in the table
        if not self.path.exists():
            self.path.touch()

    # ------------------------------------------------------------------ writing

    def segment(self, number: int) -> Segment:
        """The segment of writer run ``number`` (created on first append)."""
        return Segment(self.segment_path(number), number, self.row_bytes)

    def segment_path(self, number: int) -> Path:
        return self.dir / f"seg-{number:09d}.f32"

    @property
    def rows(self) -> int:
        """Rows of the single legacy file (stores from before segments)."""
        return self.path.stat().st_size // self.row_bytes

    def reconcile(self, max_legacy_id: int) -> int:
        """Cut rows of vectors.f32 the catalog never committed (a crash between the two writes of a writer
        from before segments, or of ``append``). Returns rows dropped."""
        size = self.path.stat().st_size
        want = (max_legacy_id + 1) * self.row_bytes if max_legacy_id > 0 else 0
        if size < want:
            raise FlagmatchError(f"raw vectors end at image id {size // self.row_bytes - 1} but the catalog "
                                 f"has ids up to {max_legacy_id}: {self.path} was cut or replaced", code="corrupt_store")
        if size > want:
            with open(self.path, "r+b") as f:
                f.truncate(want)
                os.fsync(f.fileno())
            with self._lock:
                self._maps.pop(LEGACY, None)
        return (size - want) // self.row_bytes

    def append(self, first_id: int, vectors: np.ndarray) -> None:
        """Write rows first_id … first_id+n-1 of vectors.f32 (row = image id) and fsync; first_id must be
        the next free row. For single writers that choose their ids (tests, synthetic benchmark stores);
        ingest writes segments."""
        vectors = np.ascontiguousarray(vectors, dtype=DTYPE)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] vectors, got {vectors.shape}")
        with self._lock, open(self.path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(first_id, 1) * self.row_bytes
            if size > start:
                raise FlagmatchError(f"row {first_id} is already written", code="corrupt_store")
            if size == 0 and first_id >= 1:
                f.write(b"\0" * self.row_bytes)  # row 0: no image has id 0
                size = self.row_bytes
            if size != start:
                raise FlagmatchError(f"rows must be appended in order: next free row is "
                                     f"{size // self.row_bytes}, asked to write {first_id}", code="corrupt_store")
            f.seek(start)
            f.write(vectors.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def erase(self, ids: Sequence[int]) -> None:
        """Overwrite the images' rows with zeros and fsync (deleted images: their features must not be kept)."""
        ids = [int(i) for i in ids]
        if not ids:
            return
        segs, rows = self._locate(np.asarray(ids, np.int64))
        self.erase_rows(segs, rows)

    def erase_rows(self, segs: np.ndarray, rows: np.ndarray) -> None:
        """``erase`` of rows named by (segment, row): a deleted video's keyframes."""
        segs, rows = np.asarray(segs, np.int64), np.asarray(rows, np.int64)
        zero = b"\0" * self.row_bytes
        for seg in np.unique(segs):
            path = self.path if seg == LEGACY else self.segment_path(int(seg))
            with self._lock, open(path, "r+b") as f:
                n = os.fstat(f.fileno()).st_size // self.row_bytes
                for r in rows[segs == seg]:
                    if 0 < r < n or (seg != LEGACY and 0 <= r < n):
                        f.seek(int(r) * self.row_bytes)
                        f.write(zero)
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------------ reading

    def get(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Rows for ``ids`` (catalog ids), as float32 [len(ids), dim]."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        if not len(ids):
            return out
        segs, rows = self._locate(ids)
        for seg in np.unique(segs):
            mask = segs == seg
            want = rows[mask]
            out[mask] = self._mapping(int(seg), int(want.max()) + 1)[want]
        return out

    def get_rows(self, segments: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows named by (segment, row) directly — a video's keyframes, which have no catalog id of their own
        here — as float32 [n, dim]."""
        segments, rows = np.asarray(segments, np.int64), np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        for seg in np.unique(segments):
            mask = segments == seg
            want = rows[mask]
            out[mask] = self._mapping(int(seg), int(want.max()) + 1)[want]
        return out

    def present(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Whether each id's row is in its file (a segment cut short after a disk incident lacks its tail);
        ids the catalog has no location for raise as in ``get``."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(len(ids), bool)
        if not len(ids):
            return out
        segs, rows = self._locate(ids)
        for seg in np.unique(segs):
            path = self.path if seg == LEGACY else self.segment_path(int(seg))
            have = path.stat().st_size // self.row_bytes if path.exists() else 0
            mask = segs == seg
            out[mask] = rows[mask] < have
        return out

    def iter_rows(self, ids: np.ndarray, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) in chunks, for streaming jobs that must not hold everything."""
        ids = np.asarray(ids, dtype=np.int64)
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            yield part, self.get(part)

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = int(ids.max())
        if top > self._known:
            self._catch_up(top)
        if top > self._known or int(ids.min()) < 0:
            raise FlagmatchError(f"no raw vector is recorded for image id {top}", code="corrupt_store")
        return self._seg[ids], self._row[ids]

    def _catch_up(self, top: int) -> None:
        with self._lock:
            while top > self._known:
                if self.locator is None:  # no catalog to ask: every id is a vectors.f32 row
                    found = [(i, None, None) for i in range(self._known + 1, top + 1)]
                else:
                    found = list(self.locator(self._known))
                if not found:
                    return  # ids the catalog does not have (yet): _locate refuses them
                high = int(found[-1][0])
                if high >= len(self._seg):
                    size = max(high + 1, 2 * len(self._seg))
                    seg = np.full(size, LEGACY, np.int32)
                    row = np.zeros(size, np.int64)
                    seg[:len(self._seg)], row[:len(self._row)] = self._seg, self._row
                    self._seg, self._row = seg, row
                a = np.fromiter((i for i, _, _ in found), np.int64, len(found))
                self._seg[a] = np.fromiter((LEGACY if g is None else g for _, g, _ in found), np.int32, len(found))
                self._row[a] = np.fromiter((i if g is None else r for i, g, r in found), np.int64, len(found))
                self._known = high

    def _mapping(self, seg: int, need_rows: int) -> np.memmap:
        with self._lock:
            m = self._maps.get(seg)
            if m is None or len(m) < need_rows:
                path = self.path if seg == LEGACY else self.segment_path(seg)
                rows = path.stat().st_size // self.row_bytes if path.exists() else 0
                if rows < need_rows:
                    raise FlagmatchError(f"raw vector row {need_rows - 1} of {path.name} does not exist "
                                         f"(rows: {rows})", code="corrupt_store")
                m = np.memmap(path, dtype=DTYPE, mode="r", shape=(rows, self.dim))
                self._maps[seg] = m
            return m
