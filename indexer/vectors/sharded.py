"""Building a large IVF-PQ index in shards and serving it memory-mapped.

The driver trains the coarse quantizer and PQ (and OPQ) on a sample, as a local build does; the member ids
are cut into shards and each shard — the trained empty index, its ids' raw vectors read and moved into
the matching space, added — is written to a file of its own, with the exact top-10 of the tuning queries
among its vectors. Shards are built here one after another (``local_runner``) or as tasks on a Ray cluster
(``indexer.ingest.ray.shard_runner``); either way the driver then merges the shards' inverted lists into
one file with FAISS's on-disk merge (``faiss.contrib.ondisk``), tunes nprobe and re-rank depth against the
shards' merged truth, and publishes a normal index generation whose lists are memory-mapped read-only
(``indexer.vectors.faiss_index.LayeredIndex``), so a host can serve an index larger than its RAM."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from indexer.vectors.faiss_index import ExactTopK
from indexer.vectors.space import MatchingSpace
from indexer.storage.vectors import VectorStore




@dataclass(frozen=True)
class ShardPlan:
    scope: str
    trained: bytes            # the trained, empty index (serialized)
    space: MatchingSpace
    ids: np.ndarray           # the scope's members, sorted
    queries: np.ndarray       # the tuner's held-out queries, in the space
    query_ids: np.ndarray
    folder: Path              # where the shard files go (reachable by the driver)
    shard_rows: int = 250_000  # at most; a 1024-d shard then reads ~1 GB of raw vectors

    def parts(self, at_least: int = 1) -> list[np.ndarray]:
        """The member ids cut into contiguous shards: ≤ ``shard_rows`` each, and at least ``at_least`` of
        them (one per CPU of a cluster) when there are that many vectors."""
        n = max(-(-len(self.ids) // max(self.shard_rows, 1)), min(at_least, len(self.ids)), 1)
        return [p for p in np.array_split(self.ids, n) if len(p)]


@dataclass(frozen=True)
class ShardResult:
    path: Path
    added: int
    sims: np.ndarray          # exact top-10 similarities of the plan's queries among this shard's vectors
    ids: np.ndarray


ShardRunner = Callable[[ShardPlan], list[ShardResult]]


def build_shard(trained: bytes, space: MatchingSpace, queries: np.ndarray, query_ids: np.ndarray, ids: np.ndarray,
                path: Path, vectors: VectorStore) -> ShardResult:
    """Add one shard's vectors to the trained index and write it; the same code runs here and on Ray workers."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    truth = ExactTopK(queries, query_ids, 10)
    for part, raw in vectors.iter_rows(ids):
        vecs = space.apply(raw)
        index.add_with_ids(vecs, part)
        truth.feed(part, vecs)
    faiss.write_index(index, str(path))
    return ShardResult(path, int(index.ntotal), truth.sims, truth.ids)


def local_runner(vectors: VectorStore) -> ShardRunner:
    """Shards built in this process, one after another (a host without a cluster still gets the
    memory-mapped layout, and never holds more than one shard's codes in memory)."""
    def run(plan: ShardPlan) -> list[ShardResult]:
        return [build_shard(plan.trained, plan.space, plan.queries, plan.query_ids, part,
                            plan.folder / f"shard-{k:05d}.faiss", vectors) for k, part in enumerate(plan.parts())]
    return run
