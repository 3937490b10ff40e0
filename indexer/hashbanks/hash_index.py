"""FAISS binary indexes over PDQ hashes: one for the banks' entries, one for the catalog's images.

Each index follows its source by id, as the vector indexes follow the catalog: rows past the id it
covers are added on ``refresh`` (before every lookup: one indexed range query, skipped while the
catalog's change token says nothing was committed since the last look), so an import or an ingest in
another process is seen by the next query. Rows are never removed in place: a deleted entry
or image, a disabled bank and a flag change are filtered when hits are read back, so a switch takes
effect at once; ``rebuild`` (at ``reindex``) drops what was deleted. Files are published atomically with
a checkpoint (covered id, checksum); a missing or corrupt file is rebuilt from the source.

Two structures, chosen by size (``auto``): below ``mih_min`` hashes an exhaustive ``IndexBinaryFlat``
(32 bytes a hash and an 8-byte id, one popcount pass); above it the multi-index hashing HMA uses,
``IndexBinaryMultiHash`` with 16 bands of 16 bits — a hash within 31 bits of the query shares at least one
band with it up to one flipped bit (pigeonhole: 16 bands × 2 bits would be 32), so ``nflip = radius // 16``
finds every match exactly. Measured on 2 cores: flat scans at memory bandwidth, p50 1.0 ms at 1M and
11–13 ms at 10M banked hashes in 40 bytes a hash; multi-index hashing (threatexchange's ``PDQIndex`` is the
same FAISS structure) answers in 0.75–0.79 and 6.9–8.3 ms alone in a process but at 7–12× the memory, and
slower than flat in a process that also holds the catalog and other indexes (``benchmarks/hashes.py``,
1.5 and 25.6 ms). ``auto`` therefore stays flat up to 100M, keeping each server worker's memory small;
``mih`` (or a lower ``mih_min``) buys the faster lookups with that memory."""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from indexer.storage.catalog import Catalog, Checkpoint
from indexer.storage.files import publish
from indexer.media.hashes import PDQ_BITS, PDQ_MAX_THRESHOLD, pdq_codes

log = logging.getLogger(__name__)
KINDS = ("auto", "flat", "mih")
MIH_BANDS = 16
RowSource = Callable[[int, int], list[tuple[int, str]]]  # (after id, limit) -> [(id, pdq hex)]


@dataclass(frozen=True)
class HashHit:
    id: int
    distance: int


class PdqIndex:
    """One binary index of PDQ hashes, keyed by the source's ids."""

    def __init__(self, path: Path, catalog: Catalog, scope: str, rows_after: RowSource, *,
                 kind: str = "auto", mih_min: int = 100_000_000) -> None:
        if kind not in KINDS:
            raise ValueError(f"PDQ index kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.path, self.catalog, self.scope, self.rows_after = path, catalog, scope, rows_after
        self.kind, self.mih_min = kind, mih_min
        self._lock = threading.Lock()
        self.covered = 0
        self.generation = 0
        self.index = self._new(0)
        self._seen: object = None  # the catalog's change token at the last catch-up
        self._load()
        self._catch_up()

    # ------------------------------------------------------------------ structure
    def _wants_mih(self, n: int) -> bool:
        return self.kind == "mih" or (self.kind == "auto" and n >= self.mih_min)

    def _new(self, n: int) -> faiss.IndexBinary:
        inner = faiss.IndexBinaryMultiHash(PDQ_BITS, MIH_BANDS, PDQ_BITS // MIH_BANDS) if self._wants_mih(n) \
            else faiss.IndexBinaryFlat(PDQ_BITS)
        return faiss.IndexBinaryIDMap(inner)

    @property
    def is_mih(self) -> bool:
        return isinstance(faiss.downcast_IndexBinary(self.index.index), faiss.IndexBinaryMultiHash)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # ------------------------------------------------------------------ keeping up with the source
    def refresh(self) -> int:
        """Add the source's rows past the covered id; returns how many were added."""
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> int:
        token = self.catalog.change_token()  # read first: a commit after it is seen by the next look
        if token == self._seen:
            return 0  # nothing committed anywhere since the last look: no rows to read, no rebuild to load
        cp = self.catalog.checkpoint(self.scope)
        if cp is not None and cp.generation > self.generation:  # another process rebuilt and published it
            self._load()
        added = 0
        while rows := self.rows_after(self.covered, 200_000):
            ids = np.fromiter((i for i, _ in rows), np.int64, len(rows))
            self.index.add_with_ids(pdq_codes(h for _, h in rows), ids)
            self.covered = int(ids[-1])
            added += len(rows)
        if added and not self.is_mih and self._wants_mih(self.ntotal):
            self._rebuild()  # grew past the size where multi-index hashing pays
        self._seen = token
        return added

    def rebuild(self) -> None:
        with self._lock:
            self._rebuild()

    def _rebuild(self) -> None:
        cp = self.catalog.checkpoint(self.scope)
        self.generation = max(self.generation, cp.generation if cp is not None else 0)
        self.index, self.covered = self._new(0), 0
        rows_total = 0
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        while rows := self.rows_after(self.covered, 200_000):
            ids = np.fromiter((i for i, _ in rows), np.int64, len(rows))
            chunks.append((pdq_codes(h for _, h in rows), ids))
            self.covered = int(ids[-1])
            rows_total += len(rows)
        self.index = self._new(rows_total)
        for codes, ids in chunks:
            self.index.add_with_ids(codes, ids)
        self.generation += 1

    # ------------------------------------------------------------------ lookups
    def search(self, hexes: Sequence[str], radius: int) -> list[list[HashHit]]:
        """Per query hash, every indexed hash within ``radius`` bits (inclusive), nearest first (ties by id)."""
        if not hexes:
            return []
        radius = max(0, min(int(radius), PDQ_MAX_THRESHOLD))
        codes = pdq_codes(hexes)
        with self._lock:
            self._catch_up()
            if self.ntotal == 0:
                return [[] for _ in hexes]
            if self.is_mih:
                faiss.downcast_IndexBinary(self.index.index).nflip = radius // MIH_BANDS
            lims, dist, ids = self.index.range_search(codes, radius + 1)  # FAISS keeps distance < radius
        out: list[list[HashHit]] = []
        for q in range(len(hexes)):
            a, b = int(lims[q]), int(lims[q + 1])
            order = np.lexsort((ids[a:b], dist[a:b]))  # nearest first, ties by id: the same for both structures
            out.append([HashHit(int(ids[a + j]), int(dist[a + j])) for j in order])
        return out

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        with self._lock:
            self._catch_up()
            cp = self.catalog.checkpoint(self.scope)
            if cp is not None and (cp.image_id, cp.ntotal, cp.generation) == (self.covered, self.ntotal,
                                                                               self.generation):
                return
            data = faiss.serialize_index_binary(self.index).tobytes()
            publish(self.path, data)
            self.catalog.save_checkpoint(Checkpoint(
                self.scope, self.covered, 0, self.generation, self.ntotal,
                {"kind": "mih" if self.is_mih else "flat", "bits": PDQ_BITS}, hashlib.sha256(data).hexdigest()))

    def _load(self) -> None:
        cp = self.catalog.checkpoint(self.scope)
        problem = "it has never been saved"
        if cp is not None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                problem = f"it cannot be read ({exc.strerror or exc})"
            else:
                if hashlib.sha256(data).hexdigest() != cp.checksum:
                    problem = "its checksum does not match the checkpoint (truncated or corrupt)"
                else:
                    self.index = faiss.deserialize_index_binary(np.frombuffer(data, dtype=np.uint8))
                    self.covered, self.generation = cp.image_id, cp.generation
                    return
            log.warning("rebuilding the %s PDQ index from the catalog: %s", self.scope, problem)
        self._rebuild()
