"""Raw embeddings on disk: one fixed-size float32 row per image, row i = image id i (row 0 unused).
Rows are appended and fsynced *before* the catalog commits the images they belong to, so after a
crash the file can only be ahead of the catalog; ``reconcile`` cuts it back to the catalog."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from indexer.errors import FlagmatchError, ModelMismatchError

DTYPE = np.float32


class VectorStore:
    def __init__(self, directory: Path, dim: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "vectors.f32"
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if int(meta["dim"]) != dim:
                raise ModelMismatchError(f"raw vectors in {self.dir} are {meta['dim']}-d, the model gives {dim}-d")
        else:
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"dim": dim, "dtype": "float32", "row": "image id"}))
            os.replace(tmp, meta_path)
        self.dim = dim
        self.row_bytes = dim * np.dtype(DTYPE).itemsize
        self._lock = threading.Lock()
        self._map: np.memmap | None = None
        self._map_rows = 0
        if not self.path.exists():
            self.path.touch()

    @property
    def rows(self) -> int:
        return self.path.stat().st_size // self.row_bytes

    def reconcile(self, max_image_id: int) -> int:
        """Cut rows the catalog never committed (a crash between the two writes). Returns rows dropped."""
        size = self.path.stat().st_size
        want = (max_image_id + 1) * self.row_bytes if max_image_id > 0 else 0
        if size < want:
            raise FlagmatchError(f"raw vectors end at image id {size // self.row_bytes - 1} but the catalog "
                                 f"has ids up to {max_image_id}: {self.path} was cut or replaced", code="corrupt_store")
        if size > want:
            with open(self.path, "r+b") as f:
                f.truncate(want)
                os.fsync(f.fileno())
            self._map = None
        return (size - want) // self.row_bytes

    def append(self, first_id: int, vectors: np.ndarray) -> None:
        """Write rows first_id … first_id+n-1 and fsync; first_id must be the next free row."""
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
        """Overwrite rows with zeros and fsync (deleted images: their features must not be kept)."""
        zero = b"\0" * self.row_bytes
        with self._lock, open(self.path, "r+b") as f:
            rows = os.fstat(f.fileno()).st_size // self.row_bytes
            for i in ids:
                if 0 < i < rows:
                    f.seek(int(i) * self.row_bytes)
                    f.write(zero)
            f.flush()
            os.fsync(f.fileno())

    def get(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Rows for ``ids`` (catalog ids), as float32 [len(ids), dim]."""
        ids = np.asarray(ids, dtype=np.int64)
        m = self._mapping(int(ids.max()) + 1 if len(ids) else 0)
        return np.asarray(m[ids], dtype=np.float32)

    def _mapping(self, need_rows: int) -> np.memmap:
        with self._lock:
            if self._map is None or self._map_rows < need_rows:
                rows = self.rows
                if rows < need_rows:
                    raise FlagmatchError(f"raw vector row {need_rows - 1} does not exist (rows: {rows})",
                                         code="corrupt_store")
                self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(rows, self.dim))
                self._map_rows = rows
            return self._map

    def iter_rows(self, ids: np.ndarray, chunk: int = 65536):
        """Yield (ids, vectors) in chunks, for streaming jobs that must not hold everything."""
        ids = np.asarray(ids, dtype=np.int64)
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            yield part, self.get(part)
