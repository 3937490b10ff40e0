"""FAISS, knowing nothing of the catalog: which index to build for N vectors, training it (on the
GPU when faiss has one), the ids it holds, (de)serialising it, and tuning its search parameters to a
recall target measured against exact search.

Small collections use an exact inner-product index; past ``exact_threshold`` the index is IVF-PQ
(optionally OPQ) and the top ``k × rerank`` candidates are re-ranked exactly by the caller."""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Callable

import faiss
import numpy as np

from indexer.errors import InvalidInputError
from indexer.storage.files import publish  # noqa: F401  (index files are published: fx.publish)

MIN_IVF = 10_000  # PQ's 256 centroids per sub-quantizer need ~10k training points: stay exact below
NPROBES = (8, 16, 32, 64, 128, 256, 512, 1024)
RERANKS = (2, 4, 8, 16, 32)


@dataclass(frozen=True)
class IndexConfig:
    exact_threshold: int = 50_000
    nlist: int = 0            # 0: from N
    pq_m: int = 0             # 0: from the dimension
    opq: str = "auto"         # auto | on | off
    nprobe: int = 0           # 0: tuned at build time to target_recall
    rerank: int = 0           # candidates re-ranked exactly = k × rerank (0: tuned at build time)
    target_recall: float = 0.98
    tune_ms: float = 2.0      # the tuner prefers settings whose single-query p50 stays under this
    use_gpu: str = "auto"     # auto | on | off
    save_seconds: float = 30.0
    refresh_seconds: float = 0.5  # readers look for catalog changes and published rebuilds this often
    shard_rows: int = 250_000  # vectors per shard in a sharded build (``indexer.vectors.sharded``)
    seed: int = 1234


@dataclass(frozen=True)
class IndexParams:
    kind: str                 # flat | ivfpq
    dim: int                  # the dimension of the vectors it holds (the matching space's)
    nlist: int = 0
    pq_m: int = 0
    opq_dim: int = 0          # 0: no OPQ
    trained_n: int = 0
    nprobe: int = 0           # chosen at build (tuned or from the config)
    rerank: int = 0
    recall: float | None = None   # recall@10 measured at build on a held-out sample (1.0 for flat)
    recall_p50_ms: float | None = None
    space_version: int = 0    # the matching space the vectors were transformed with
    space_sha256: str = ""
    on_disk: str = ""         # the memory-mapped inverted lists of a sharded build (a file in the index folder)

    @property
    def factory(self) -> str:
        if self.kind == "flat":
            return "IDMap2,Flat"
        pre = f"OPQ{self.pq_m}_{self.opq_dim}," if self.opq_dim else ""
        return f"{pre}IVF{self.nlist},PQ{self.pq_m}x8"


def choose_params(n: int, dim: int, cfg: IndexConfig) -> IndexParams:
    """Exact below the threshold; above it IVF-PQ with nlist ≈ 4·√N and PQ codes of ≈ dim/4 bytes."""
    if n < max(cfg.exact_threshold, MIN_IVF):
        return IndexParams("flat", dim, recall=1.0)
    # nlist ≈ 4·√N (a power of two), with ≥ 39 training points per list
    nlist = cfg.nlist or int(min(65536, 2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(n // 39))))
    opq = cfg.opq == "on" or (cfg.opq == "auto" and dim >= 512)
    work_dim = dim
    if opq:
        work_dim = dim // 2 if dim >= 512 else dim
    target = cfg.pq_m or min(64, max(8, work_dim // 4 if work_dim <= 256 else work_dim // 8))
    pq_m = max(m for m in range(1, target + 1) if work_dim % m == 0)
    return IndexParams("ivfpq", dim, nlist, pq_m, work_dim if opq else 0, n)


def gpu_available(use_gpu: str) -> bool:
    if use_gpu == "off":
        return False
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "on" and n == 0:
        raise InvalidInputError("use_gpu=on but faiss sees no GPU (install the gpu extra on a GPU machine)")
    return n > 0


def new_index(params: IndexParams) -> faiss.Index:
    index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    if params.kind == "ivfpq":
        # polysemous codes are never used for search here, and training them costs ~10× the PQ itself
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    return index


def train(index: faiss.Index, sample: np.ndarray, *, gpu: bool) -> None:
    if gpu:
        res = faiss.StandardGpuResources()
        ivf = faiss.extract_index_ivf(index)
        # the coarse quantizer's k-means is the expensive part: run it on the GPU
        ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(ivf.d))
    index.train(np.ascontiguousarray(sample, np.float32))


def set_nprobe(index: AnyIndex, params: IndexParams, nprobe: int) -> None:
    if params.kind == "ivfpq":
        value = min(params.nlist, nprobe or params.nprobe or max(16, params.nlist // 32))
        if isinstance(index, LayeredIndex):
            index.nprobe = value
        else:
            faiss.extract_index_ivf(index).nprobe = value


def get_nprobe(index: AnyIndex, params: IndexParams) -> int | None:
    if params.kind != "ivfpq":
        return None
    return index.nprobe if isinstance(index, LayeredIndex) else int(faiss.extract_index_ivf(index).nprobe)


def remove_ids(index: AnyIndex, ids: np.ndarray) -> None:
    ids = np.ascontiguousarray(ids, np.int64)
    if isinstance(index, LayeredIndex):
        index.remove(ids)
    else:
        index.remove_ids(faiss.IDSelectorBatch(ids))


def held_ids(index: AnyIndex) -> set[int]:
    """The ids held by a flat IDMap2, an IVF index or a layered on-disk index."""
    if isinstance(index, LayeredIndex):
        return (held_ids(index.base) - index.removed) | held_ids(index.delta)
    if isinstance(index, faiss.IndexIDMap2) or hasattr(index, "id_map"):
        return set(faiss.vector_to_array(index.id_map).tolist())
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    out: set[int] = set()
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            out.update(faiss.rev_swig_ptr(inv.get_ids(lst), n).tolist())
    return out


def serialize(index: AnyIndex) -> bytes:
    if isinstance(index, LayeredIndex):
        return index.to_bytes()
    return bytes(faiss.serialize_index(index).tobytes())


def deserialize(data: bytes, folder: Path | None = None) -> AnyIndex:
    """An index from ``serialize``'s bytes; a layered index maps its inverted lists from ``folder``."""
    if data[:len(LAYERED_MAGIC)] == LAYERED_MAGIC:
        if folder is None:
            raise ValueError("a layered index needs the folder of its inverted lists")
        return LayeredIndex.from_bytes(data, folder)
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# ------------------------------------------------------------------ sharded builds, memory-mapped serving

LAYERED_MAGIC = b"FMLAYER1"


def merge_shards(trained: bytes, shards: list[Path], ivfdata: Path) -> bytes:
    """Merge the shards' inverted lists into one file with FAISS's own on-disk merge; returns the index's
    bytes (quantizer, codebooks and the lists' offsets — the codes stay in ``ivfdata``, fsynced)."""
    from faiss.contrib.ondisk import merge_ondisk
    ivfdata.unlink(missing_ok=True)  # a crashed build's leftover of the same generation
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    # FAISS prints the file's growth on the C stdout: send it to stderr, where a command's logs go
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        merge_ondisk(index, [str(p) for p in shards], str(ivfdata))
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    data = bytes(faiss.serialize_index(index).tobytes())
    del index  # unmaps the lists before the file is synced
    with open(ivfdata, "rb+") as f:
        os.fsync(f.fileno())
    return data


def _relocate(base: bytes, old: str, new: str) -> bytes:
    """Point a serialized on-disk IVF index at its lists' file where it is now. FAISS stores that file's path
    as the last field but one of the index (a length-prefixed string, then the total size); the layout is
    checked before anything is changed."""
    o, n = old.encode(), new.encode()
    if len(base) < len(o) + 16 or base[-8 - len(o):-8] != o or base[-16 - len(o):-8 - len(o)] != struct.pack("<Q", len(o)):
        raise ValueError("the on-disk index does not end with the path of its inverted lists")
    return base[:-16 - len(o)] + struct.pack("<Q", len(n)) + n + base[-8:]


class LayeredIndex:
    """A sharded build served memory-mapped, and what changed since.

    ``base`` is the merged IVF index whose inverted lists live in an on-disk file (opened read-only: many
    processes map it, none writes it, and the OS pages it in, so it may be larger than RAM); ``delta`` is an
    in-memory index of the same training that takes vectors added after the build; ``removed`` holds ids
    the base must no longer return (deleted images, unflagged ones), filtered inside FAISS's scan. Searches
    query both and merge by similarity, so a layered index answers like one index of the same training."""

    def __init__(self, base: faiss.Index, delta: faiss.Index, lists_file: Path, base_top_id: int,
                 removed: set[int] | None = None, base_removed: int = 0) -> None:
        self.base, self.delta, self.lists_file = base, delta, lists_file
        self.base_top_id = base_top_id     # the highest id the base can hold
        self.removed = removed or set()
        self.base_removed = base_removed   # how many of the base's vectors ``removed`` hides
        self._params: faiss.SearchParameters | None = None
        self._keep: tuple[object, ...] = ()
        self.low_delta = {i for i in held_ids(delta) if i <= base_top_id} if delta.ntotal else set()
        # FAISS starts 32 threads per search to prefetch the probed lists: 4.0 against 1.2 ms p50 measured on a
        # single 60k-vector query (page-cache hits); the kernel pages the lists in on demand instead
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(base).invlists).prefetch_nthread = 0
        self.nprobe = int(faiss.extract_index_ivf(base).nprobe)

    @property
    def d(self) -> int:
        return int(self.base.d)

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal) - self.base_removed + int(self.delta.ntotal)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = int(value)
        faiss.extract_index_ivf(self.delta).nprobe = self._nprobe
        self._params = None

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.delta.add_with_ids(vectors, ids)
        # ids the base could hold that now sit in the delta (re-flagged after a removal, or flagged after the
        # build): a later removal takes them from the delta and leaves the base as it is
        self.low_delta.update(i for i in ids.tolist() if i <= self.base_top_id)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids the delta holds from it; hide the others from the base (whose file never changes)."""
        in_delta = {i for i in ids.tolist() if i > self.base_top_id or i in self.low_delta}
        if in_delta and self.delta.ntotal:
            self.delta.remove_ids(faiss.IDSelectorBatch(np.fromiter(in_delta, np.int64, len(in_delta))))
        self.low_delta.difference_update(in_delta)
        hide = [i for i in ids.tolist() if i <= self.base_top_id and i not in self.removed and i not in in_delta]
        self.removed.update(hide)
        self.base_removed += len(hide)
        self._params = None

    def _search_params(self) -> faiss.SearchParameters:
        if self._params is None:
            ivf = faiss.SearchParametersIVF()
            ivf.nprobe = self._nprobe
            keep: list[object] = [ivf]
            if self.removed:
                batch = faiss.IDSelectorBatch(np.fromiter(self.removed, np.int64, len(self.removed)))
                ivf.sel = sel = faiss.IDSelectorNot(batch)
                keep += [batch, sel]  # the parameters point at them: keep them alive
            params: faiss.SearchParameters = ivf
            if isinstance(self.base, faiss.IndexPreTransform):
                params = faiss.SearchParametersPreTransform()
                params.index_params = ivf
                keep.append(params)
            self._params, self._keep = params, tuple(keep)
        return self._params

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = self.base.search(q, k, params=self._search_params())
        if self.delta.ntotal:
            s2, i2 = self.delta.search(q, k)
            sims, ids = np.concatenate([sims, s2], 1), np.concatenate([ids, i2], 1)
            order = np.argsort(-np.where(ids >= 0, sims, -np.inf), axis=1, kind="stable")[:, :k]
            sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
        return sims, ids

    def to_bytes(self) -> bytes:
        base = bytes(faiss.serialize_index(self.base).tobytes())
        delta = bytes(faiss.serialize_index(self.delta).tobytes())
        removed = np.fromiter(sorted(self.removed), np.int64, len(self.removed)).tobytes()
        head = json.dumps({"lists": self.lists_file.name, "path": str(self.lists_file),
                           "lists_bytes": self.lists_file.stat().st_size, "base_top_id": self.base_top_id,
                           "base_removed": self.base_removed, "sizes": [len(base), len(delta), len(removed)]}).encode()
        return LAYERED_MAGIC + struct.pack("<Q", len(head)) + head + base + delta + removed

    @classmethod
    def from_bytes(cls, data: bytes, folder: Path) -> "LayeredIndex":
        at = len(LAYERED_MAGIC)
        (n,) = struct.unpack("<Q", data[at:at + 8])
        head = json.loads(data[at + 8:at + 8 + n])
        at += 8 + n
        sizes = head["sizes"]
        base, delta, removed = (data[at:at + sizes[0]], data[at + sizes[0]:at + sizes[0] + sizes[1]],
                                data[at + sizes[0] + sizes[1]:at + sum(sizes)])
        lists = folder / head["lists"]
        if not lists.is_file():
            raise ValueError(f"its inverted lists {lists.name} are missing")
        if lists.stat().st_size != head["lists_bytes"]:
            raise ValueError(f"its inverted lists {lists.name} are {lists.stat().st_size} bytes, "
                             f"not {head['lists_bytes']} (truncated or replaced)")
        base = _relocate(base, head["path"], str(lists))
        b = faiss.deserialize_index(np.frombuffer(base, dtype=np.uint8), faiss.IO_FLAG_READ_ONLY)
        d = faiss.deserialize_index(np.frombuffer(delta, dtype=np.uint8))
        return cls(b, d, lists, int(head["base_top_id"]), set(np.frombuffer(removed, np.int64).tolist()),
                   int(head["base_removed"]))

    @classmethod
    def open_built(cls, base: bytes, trained: bytes, lists: Path, base_top_id: int) -> "LayeredIndex":
        """The result of ``merge_shards`` opened read-only, with an empty delta of the same training."""
        b = faiss.deserialize_index(np.frombuffer(base, dtype=np.uint8), faiss.IO_FLAG_READ_ONLY)
        return cls(b, faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8)), lists, base_top_id)


AnyIndex = faiss.Index | LayeredIndex


class ExactTopK:
    """Exact top-k inner products of a few queries against vectors fed in chunks (the ground truth
    for tuning, collected while the index is being filled)."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int) -> None:
        self.q, self.qids, self.k = queries, query_ids, k
        self.sims = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def feed(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(self.q) or not len(ids):
            return
        s = self.q @ vectors.T
        s[self.qids[:, None] == ids[None, :]] = -np.inf  # a query never counts itself
        kk = min(self.k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        self.merge(np.take_along_axis(s, part, 1), ids[part])

    def merge(self, sims: np.ndarray, ids: np.ndarray) -> None:
        """Fold in another top list of the same queries (a shard's, fed elsewhere)."""
        cs = np.concatenate([self.sims, sims], axis=1)
        ci = np.concatenate([self.ids, ids], axis=1)
        top = np.argsort(-cs, axis=1, kind="stable")[:, : self.k]
        self.sims, self.ids = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)


@dataclass(frozen=True)
class Tuning:
    nprobe: int
    rerank: int
    recall: float
    p50_ms: float


Reranker = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def tune(index: faiss.Index, params: IndexParams, truth: ExactTopK, rerank: Reranker, cfg: IndexConfig,
         k: int = 10) -> Tuning:
    """The cheapest (nprobe, rerank) whose recall@k on the held-out queries reaches the target.

    nprobe grows in powers of two; for each, one search fetches the deepest candidate list and every
    shallower re-rank depth is its prefix (IVF-PQ returns candidates best first). Settings fixed in the
    config are kept and only measured. When nothing reaches the target within ``NPROBES`` the best
    recall seen is kept, and the checkpoint records what it is."""
    q, gt = truth.q, truth.ids[:, :k]
    ivf = faiss.extract_index_ivf(index)
    probes = [cfg.nprobe] if cfg.nprobe else [p for p in NPROBES if p <= params.nlist] or [params.nlist]
    depths = [cfg.rerank] if cfg.rerank else list(RERANKS)
    best: tuple[float, int, int] = (-1.0, probes[0], depths[0])  # (recall, nprobe, depth): the best seen
    for nprobe in probes:
        ivf.nprobe = nprobe
        _, cand = index.search(q, k * max(depths) + 1)
        for depth in depths:
            _, ids = rerank(q, cand[:, : k * depth + 1], k + 1)
            got = _recall(ids, truth.qids, gt, k)
            if got > best[0]:
                best = (got, nprobe, depth)
            if got >= cfg.target_recall:
                break
        if best[0] >= cfg.target_recall:
            break
    recall, nprobe, depth = best
    ivf.nprobe = nprobe
    p50 = _p50_ms(q[:100], lambda one: rerank(one, index.search(one, k * depth + 1)[1], k + 1))
    return Tuning(nprobe, depth, recall, p50)


def _recall(ids: np.ndarray, qids: np.ndarray, gt: np.ndarray, k: int) -> float:
    hit = total = 0
    for row, qid, want in zip(ids, qids, gt):
        got = [i for i in row.tolist() if i != qid and i >= 0][:k]
        want_set = {i for i in want.tolist() if i >= 0}
        hit += len(want_set.intersection(got))
        total += len(want_set)
    return hit / total if total else 1.0


def _p50_ms(q: np.ndarray, one: Callable[[np.ndarray], object]) -> float:
    times = []
    for row in q:
        t = time.perf_counter()
        one(row[None])
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)) if times else 0.0


def with_tuning(params: IndexParams, t: Tuning) -> IndexParams:
    return replace(params, nprobe=t.nprobe, rerank=t.rerank, recall=round(t.recall, 4),
                   recall_p50_ms=round(t.p50_ms, 3))
