"""A compact multi-index over 256-bit PDQ hashes, read from one memory-mapped file.

Multi-index hashing (Norouzi et al.; threatexchange's ``PDQIndex`` uses FAISS's ``IndexBinaryMultiHash``)
cuts each hash into 16 bands of 16 bits. A hash within 31 bits of the query agrees with it on at least one
band up to one flipped bit (pigeonhole: 16 bands × 2 flipped bits would be 32), so probing each band's
bucket for the query's value and its 16 one-bit neighbours finds every match exactly; the candidates'
full distances are then counted and those beyond the radius dropped. Wider radii (up to PDQ's 64) fall back
to an exhaustive count over the same codes.

Why not FAISS's structure: it keeps a hash map of vectors per band in the process heap — 300–480 bytes a
hash, rebuilt in every server worker. Here each band is a counting sort: the row numbers ordered by the
band's value (``uint32``) and 65,537 bucket offsets, so a hash costs 32 (code) + 8 (id) + 16 × 4 (orders)
= 104 bytes, in a file every worker maps read-only and the page cache holds once. Lookups cost a few numpy
calls whatever the size: 0.49 ms at 1M and 4.1 ms at 10M on 2 EPYC cores (``benchmarks/hashes.py``).

File layout (little-endian, every section 8-byte aligned): ``MAGIC``, n (int64), offsets (16 × 65,537
int64), ids (n int64), codes (n × 32 uint8), orders (16 × n uint32). A built index is immutable; rows added
later live beside it (``indexer.hashbanks.hash_index``) until the next build."""
from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np

MAGIC = b"FMBANDS1"
BANDS = 16
BUCKETS = 1 << 16
CODE_BYTES = 32
_ONE_BIT = np.array([0] + [1 << i for i in range(BANDS)], np.int64)  # the value itself and its 16 neighbours
_BAND = np.arange(BANDS)[:, None]
_SCAN_ROWS = 1 << 20  # rows a wide-radius scan counts at once (32 MiB of codes)


class BandIndex:
    """Immutable: ``build`` in memory or ``open`` a file written by ``write``."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, orders: np.ndarray, offsets: np.ndarray) -> None:
        self.ids, self.codes, self.orders, self.offsets = ids, codes, orders, offsets
        self.n = int(len(ids))
        self._words = codes.view(np.uint64).reshape(self.n, CODE_BYTES // 8)
        self._flat_orders = orders.reshape(-1)
        self._base = (np.arange(BANDS, dtype=np.int64) * self.n)[:, None]

    # ------------------------------------------------------------------ building and files
    @classmethod
    def build(cls, codes: np.ndarray, ids: np.ndarray) -> "BandIndex":
        """Index ``codes`` (n × 32 uint8) under ``ids`` (n int64)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, CODE_BYTES)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(codes) != len(ids):
            raise ValueError(f"{len(codes)} codes and {len(ids)} ids")
        if len(ids) >= 1 << 32:
            raise ValueError("a band index holds fewer than 2**32 hashes")
        values = codes.view(np.uint16)  # n × 16, one band a column
        orders = np.empty((BANDS, len(ids)), np.uint32)
        offsets = np.zeros((BANDS, BUCKETS + 1), np.int64)
        for b in range(BANDS):
            v = values[:, b]
            orders[b] = np.argsort(v, kind="stable")
            np.cumsum(np.bincount(v, minlength=BUCKETS), out=offsets[b, 1:])
        return cls(ids, codes, orders, offsets)

    def write(self, f: IO[bytes]) -> None:
        f.write(MAGIC)
        f.write(np.int64(self.n).tobytes())
        for part in (self.offsets, self.ids, self.codes, self.orders):
            f.write(np.ascontiguousarray(part).tobytes())

    @classmethod
    def open(cls, path: Path) -> "BandIndex":
        """Map a written file read-only; raises ``ValueError`` when it is not one or is cut short."""
        size = path.stat().st_size
        head = np.memmap(path, np.uint8, mode="r", shape=(16,)) if size >= 16 else None
        if head is None or bytes(head[:8]) != MAGIC:
            raise ValueError("not a band index file")
        n = int(np.frombuffer(bytes(head[8:16]), np.int64)[0])
        sizes = (BANDS * (BUCKETS + 1) * 8, n * 8, n * CODE_BYTES, BANDS * n * 4)
        if n < 0 or size != 16 + sum(sizes):
            raise ValueError(f"band index file of {size} bytes does not hold {n} hashes")
        pos = 16

        def part(dtype: type, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
            nonlocal pos
            arr = np.memmap(path, dtype, mode="r", offset=pos, shape=shape) if nbytes else np.empty(shape, dtype)
            pos += nbytes
            return arr
        offsets = part(np.int64, (BANDS, BUCKETS + 1), sizes[0])
        ids = part(np.int64, (n,), sizes[1])
        codes = part(np.uint8, (n, CODE_BYTES), sizes[2])
        orders = part(np.uint32, (BANDS, n), sizes[3])
        return cls(ids, codes, orders, offsets)

    # ------------------------------------------------------------------ lookups
    def search(self, code: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """Every indexed hash within ``radius`` bits of one 32-byte ``code``: (ids, distances), unordered."""
        if self.n == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        q = np.ascontiguousarray(code, dtype=np.uint8).reshape(CODE_BYTES)
        qwords = q.view(np.uint64)
        if radius >= 2 * BANDS:  # a band may differ in 2+ bits: probing would touch most buckets; count all
            found = [self._scan(s, qwords, radius) for s in range(0, self.n, _SCAN_ROWS)]
            rows = np.concatenate([r for r, _ in found])
            return np.asarray(self.ids[rows]), np.concatenate([d for _, d in found])
        probes = q.view(np.uint16).astype(np.int64)[:, None] ^ _ONE_BIT[None, :]  # 16 bands × 17 values
        first = self.offsets[_BAND, probes]
        lens = (self.offsets[_BAND, probes + 1] - first).ravel()
        total = int(lens.sum())
        if total == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        starts = (first + self._base).ravel()
        # positions of every probed bucket's entries, concatenated: start of each run + 0..len-1
        pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)
        rows = self._flat_orders[pos].astype(np.int64)  # a row appears once per band it shares
        dist = np.bitwise_count(self._words[rows] ^ qwords).sum(axis=1, dtype=np.int64)
        keep = dist <= radius
        rows, at = np.unique(rows[keep], return_index=True)  # only the few hits are deduplicated
        return np.asarray(self.ids[rows]), dist[keep][at]

    def _scan(self, start: int, qwords: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        dist = np.bitwise_count(self._words[start:start + _SCAN_ROWS] ^ qwords).sum(axis=1, dtype=np.int64)
        hit = np.flatnonzero(dist <= radius)
        return hit + start, dist[hit]
