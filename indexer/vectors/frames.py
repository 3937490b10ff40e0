"""The keyframes of every stored video, searchable in the matching space of the image indexes
(``indexer.vectors.vector_index`` owns one and keeps it in step). A search answers, per query row, the
nearest keyframes with the video each belongs to and its offset in that video.

Exact inner product (faiss ``IndexFlatIP``) over the keyframes transformed into the current space, held in
memory and built from the raw vectors at open: keyframes are a few per video, and the exact index costs
nothing to keep in step (rows are only appended). It follows the catalog by keyframe id (ids are given in
increasing order, with their video's row, under the catalog's id lock) and is rebuilt whenever the space
changes. ``flagged`` searches pass only the keyframes of flagged videos (a bitmap over the rows, made again
whenever rows or flags change, so no frame row ever changes when a video is flagged). Deleted videos'
keyframes stay in the index and are dropped by the caller's catalog read, as image hits are."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.storage.catalog import Catalog
from indexer.storage.vectors import VectorStore
from indexer.vectors.space import MatchingSpace

log = logging.getLogger(__name__)
PAGE = 50_000  # keyframes read from the catalog at a time


@dataclass(frozen=True)
class FrameHits:
    """One query row's nearest keyframes, best first."""
    keyframe_ids: np.ndarray  # int64 [m]
    owners: np.ndarray        # int64 [m]: the video (catalog item) each belongs to
    offsets: np.ndarray       # float32 [m]: seconds into that video
    similarities: np.ndarray  # float32 [m]


def _empty() -> FrameHits:
    return FrameHits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))


class FrameIndex:
    def __init__(self, catalog: Catalog, vectors: VectorStore) -> None:
        self.catalog, self.vectors = catalog, vectors
        self.space_version = -1
        self.covered = 0  # highest keyframe id held
        self._index: faiss.Index | None = None
        self._ids = np.zeros(0, np.int64)
        self._owners = np.zeros(0, np.int64)
        self._offsets = np.zeros(0, np.float32)
        self._bits: np.ndarray | None = None  # packed: the rows of flagged videos (``mark``)

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def sync(self, space: MatchingSpace) -> bool:
        """Take in the keyframes committed since the last sync (all of them again when ``space`` is not the one
        held). The caller holds the owning index's write lock. Returns whether anything changed."""
        if space.version != self.space_version or self._index is None or self._index.d != space.dim:
            self._index = faiss.IndexFlatIP(space.dim)
            self._ids, self._owners = np.zeros(0, np.int64), np.zeros(0, np.int64)
            self._offsets = np.zeros(0, np.float32)
            self.covered, self.space_version = 0, space.version
        changed = False
        while page := self.catalog.keyframes_after(self.covered, PAGE):
            raw = self.vectors.get_rows(np.array([k.vec_segment for k in page]), np.array([k.vec_row for k in page]))
            self._index.add(space.apply(raw))
            self._ids = np.concatenate([self._ids, np.array([k.id for k in page], np.int64)])
            self._owners = np.concatenate([self._owners, np.array([k.image_id for k in page], np.int64)])
            self._offsets = np.concatenate([self._offsets, np.array([k.offset_s for k in page], np.float32)])
            self.covered = page[-1].id
            changed = True
        if changed:
            self._bits = None  # new rows: marked again before the next flagged search
            log.debug("frame index: %d keyframes (space %d)", self.ntotal, self.space_version)
        return changed

    def mark(self, flagged: set[int]) -> None:
        """Which rows belong to flagged videos (``flagged``: the flagged scope's ids), as the bitmap flagged
        searches pass to faiss: made when the rows or the flags changed (the caller holds the write lock), in
        one pass over the videos, not per search."""
        if not self.ntotal:
            self._bits = None
            return
        owners, inverse = np.unique(self._owners, return_inverse=True)
        keep = np.fromiter((int(o) in flagged for o in owners), bool, len(owners))[inverse]
        self._bits = np.packbits(keep, bitorder="little")

    @property
    def marked(self) -> bool:
        return self._bits is not None or not self.ntotal

    def search(self, q: np.ndarray, k: int, flagged: bool = False) -> list[FrameHits]:
        """The ``k`` nearest keyframes of each row of ``q`` (already in the held space); ``flagged``: only
        keyframes of flagged videos (as last ``mark``ed). The caller holds the owning index's read lock."""
        n = self.ntotal
        if n == 0 or self._index is None:
            return [_empty() for _ in range(len(q))]
        params = None
        if flagged:
            bits = self._bits  # (faiss reads it through a pointer: held until the end)
            if bits is None or not bits.any():
                return [_empty() for _ in range(len(q))]
            selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            params = faiss.SearchParameters(sel=selector)
        sims, pos = self._index.search(np.ascontiguousarray(q, np.float32), min(k, n), params=params)
        out = []
        for s, p in zip(sims, pos):
            ok = p >= 0
            p = p[ok]
            out.append(FrameHits(self._ids[p], self._owners[p], self._offsets[p], s[ok].astype(np.float32)))
        return out
