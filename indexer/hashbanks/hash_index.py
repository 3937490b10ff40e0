"""FAISS binary indexes over PDQ hashes: one for the banks' entries, one for the catalog's images.

Each index follows its source by id, as the vector indexes follow the catalog: rows past the id it
covers are added on ``refresh`` (before every lookup: one indexed range query, skipped while the
catalog's change token says nothing was committed since the last look), so an import or an ingest in
another process is seen by the next query. Rows are never removed in place: a deleted entry
or image, a disabled bank and a flag change are filtered when hits are read back, so a switch takes
effect at once; ``rebuild`` (at ``reindex``) drops what was deleted. Files are published atomically with
a checkpoint (covered id, checksum); a missing or corrupt file is rebuilt from the source.

Two structures, chosen by size (``auto``): below ``mih_min`` hashes an exhaustive ``IndexBinaryFlat``
(32 bytes a hash and an 8-byte id, one popcount pass, in each process's heap); from it a multi-index
(``indexer.hashbanks.multi_index``: 16 bands of 16 bits, exact within 31 bits) in a memory-mapped file
that every worker shares through the page cache, with the rows added since its build in a flat tail until
the next ``save`` folds them in. Measured on 2 EPYC cores (``benchmarks/hashes.py``, the served path on a
real catalog, each structure in a process of its own): flat p50 1.1 ms at 1M and 11.7 ms at 10M banked
hashes; the multi-index 0.49 and 4.1 ms, p99 0.62 and 4.5 — below threatexchange's ``PDQIndex`` (FAISS's
multi-index hashing: 0.77 and 4.6 ms, p99 0.97 and 8.7, at 540–620 bytes a hash in every process). A worker
holding the multi-index adds no private memory; its file, 104 bytes a hash, is mapped once per machine.
``auto`` switches at 1M hashes.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from indexer.hashbanks.multi_index import BandIndex
from indexer.storage.catalog import Catalog, Checkpoint
from indexer.storage.files import file_sha256, publish, publish_with
from indexer.media.hashes import PDQ_BITS, PDQ_MAX_THRESHOLD, pdq_codes

log = logging.getLogger(__name__)
KINDS = ("auto", "flat", "mih")
MIH_MIN = 1_000_000
RowSource = Callable[[int, int], list[tuple[int, str]]]  # (after id, limit) -> [(id, pdq hex)]


@dataclass(frozen=True)
class HashHit:
    id: int
    distance: int


class PdqIndex:
    """One binary index of PDQ hashes, keyed by the source's ids."""

    def __init__(self, path: Path, catalog: Catalog, scope: str, rows_after: RowSource, *,
                 kind: str = "auto", mih_min: int = MIH_MIN) -> None:
        if kind not in KINDS:
            raise ValueError(f"PDQ index kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.path, self.catalog, self.scope, self.rows_after = path, catalog, scope, rows_after
        self.kind, self.mih_min = kind, mih_min
        self._lock = threading.Lock()
        self.covered = 0
        self.generation = 0
        self.index = self._flat()  # every hash (flat), or those added since the multi-index was built (its tail)
        self.sealed: BandIndex | None = None
        self._seen: object = None  # the catalog's change token at the last catch-up
        self._load()
        self._catch_up()

    # ------------------------------------------------------------------ structure
    def _wants_mih(self, n: int) -> bool:
        return self.kind == "mih" or (self.kind == "auto" and n >= self.mih_min)

    @staticmethod
    def _flat() -> faiss.IndexBinaryIDMap:
        return faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(PDQ_BITS))

    @property
    def is_mih(self) -> bool:
        return self.sealed is not None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) + (self.sealed.n if self.sealed is not None else 0)

    def _flat_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The flat part's codes and ids."""
        inner = faiss.downcast_IndexBinary(self.index.index)
        return (faiss.vector_to_array(inner.xb).reshape(-1, PDQ_BITS // 8),
                faiss.vector_to_array(self.index.id_map).astype(np.int64))

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
        self.index, self.sealed, self.covered = self._flat(), None, 0
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        while rows := self.rows_after(self.covered, 200_000):
            ids = np.fromiter((i for i, _ in rows), np.int64, len(rows))
            chunks.append((pdq_codes(h for _, h in rows), ids))
            self.covered = int(ids[-1])
        if self._wants_mih(sum(len(i) for _, i in chunks)):
            self.sealed = BandIndex.build(np.concatenate([c for c, _ in chunks] or [np.empty((0, 32), np.uint8)]),
                                          np.concatenate([i for _, i in chunks] or [np.empty(0, np.int64)]))
        else:
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
            sealed = self.sealed
            if self.index.ntotal:
                lims, dist, ids = self.index.range_search(codes, radius + 1)  # FAISS keeps distance < radius
            else:
                lims, dist, ids = np.zeros(len(hexes) + 1, np.int64), np.empty(0, np.int32), np.empty(0, np.int64)
        out: list[list[HashHit]] = []
        for q in range(len(hexes)):
            a, b = int(lims[q]), int(lims[q + 1])
            qids, qdist = ids[a:b].astype(np.int64), dist[a:b].astype(np.int64)
            if sealed is not None:  # immutable: read outside the lock
                more_ids, more_dist = sealed.search(codes[q], radius)
                qids, qdist = np.concatenate([more_ids, qids]), np.concatenate([more_dist, qdist])
            order = np.lexsort((qids, qdist))  # nearest first, ties by id: the same for both structures
            out.append([HashHit(int(qids[j]), int(qdist[j])) for j in order])
        return out

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Publish the index and its checkpoint; a multi-index first folds its tail in."""
        with self._lock:
            self._catch_up()
            cp = self.catalog.checkpoint(self.scope)
            if cp is not None and (cp.image_id, cp.ntotal, cp.generation) == (self.covered, self.ntotal,
                                                                               self.generation):
                return
            if self.sealed is not None:
                if self.index.ntotal:
                    codes, ids = self._flat_rows()
                    self.sealed = BandIndex.build(np.concatenate([self.sealed.codes, codes]),
                                                  np.concatenate([self.sealed.ids, ids]))
                    self.index = self._flat()
                publish_with(self.path, self.sealed.write)
                checksum = file_sha256(self.path)
                self.sealed = BandIndex.open(self.path)  # mapped: the page cache holds it once per machine
            else:
                data = faiss.serialize_index_binary(self.index).tobytes()
                publish(self.path, data)
                checksum = hashlib.sha256(data).hexdigest()
            self.catalog.save_checkpoint(Checkpoint(
                self.scope, self.covered, 0, self.generation, self.ntotal,
                {"kind": "mih" if self.is_mih else "flat", "bits": PDQ_BITS}, checksum))

    def _load(self) -> None:
        cp = self.catalog.checkpoint(self.scope)
        problem = "it has never been saved"
        if cp is not None:
            try:
                checksum = file_sha256(self.path)
                if checksum != cp.checksum:
                    problem = "its checksum does not match the checkpoint (truncated or corrupt)"
                elif cp.params.get("kind") == "mih":
                    self.index, self.sealed = self._flat(), BandIndex.open(self.path)
                    self.covered, self.generation = cp.image_id, cp.generation
                    return
                else:
                    self.index, self.sealed = faiss.read_index_binary(str(self.path)), None
                    self.covered, self.generation = cp.image_id, cp.generation
                    return
            except OSError as exc:
                problem = f"it cannot be read ({exc.strerror or exc})"
            except ValueError as exc:
                problem = f"it is not a PDQ index ({exc})"
            log.warning("rebuilding the %s PDQ index from the catalog: %s", self.scope, problem)
        self._rebuild()
