"""Two FAISS indexes kept in step with the catalog: ``all`` (every live image) and ``flagged``.

Ids are catalog ids. Small collections use an exact inner-product index; past ``exact_threshold``
the index is IVF-PQ (optionally OPQ) trained on a sample of the raw vectors, and the top
``k * rerank`` candidates are re-ranked exactly from the raw vectors. Files are written atomically
(temp file, fsync, rename, fsync the folder) and the catalog records what each covers (a checkpoint:
highest image id, highest flag event, generation, checksum). On open, an index behind its checkpoint
catches up from the catalog and raw vectors; a missing, truncated or corrupt file is rebuilt.
Searches share a read lock; catch-up takes the write lock briefly; a rebuild is built aside and
swapped in, so readers keep answering from the old index until the new one is published."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from indexer.catalog import Checkpoint
from indexer.errors import InvalidInputError
from indexer.store import Store
from indexer.vectors import VectorStore

log = logging.getLogger(__name__)
SCOPES = ("flagged", "all")
MIN_IVF = 10_000  # PQ's 256 centroids per sub-quantizer need ~10k training points: stay exact below


@dataclass(frozen=True)
class IndexConfig:
    exact_threshold: int = 50_000
    nlist: int = 0            # 0: from N
    pq_m: int = 0             # 0: from the dimension
    opq: str = "auto"         # auto | on | off
    nprobe: int = 0           # 0: nlist / 32, at least 16
    rerank: int = 10          # candidates re-ranked exactly = k × rerank (0: no re-ranking)
    use_gpu: str = "auto"     # auto | on | off
    save_seconds: float = 30.0
    refresh_seconds: float = 0.5  # readers look for catalog changes and published rebuilds this often
    seed: int = 1234


@dataclass(frozen=True)
class IndexParams:
    kind: str                 # flat | ivfpq
    dim: int
    nlist: int = 0
    pq_m: int = 0
    opq_dim: int = 0          # 0: no OPQ
    trained_n: int = 0

    @property
    def factory(self) -> str:
        if self.kind == "flat":
            return "IDMap2,Flat"
        pre = f"OPQ{self.pq_m}_{self.opq_dim}," if self.opq_dim else ""
        return f"{pre}IVF{self.nlist},PQ{self.pq_m}x8"


@dataclass(frozen=True)
class Hits:
    ids: np.ndarray          # int64 [m], best first, never -1
    similarities: np.ndarray  # float32 [m], cosine


def choose_params(n: int, dim: int, cfg: IndexConfig) -> IndexParams:
    """Exact below the threshold; above it IVF-PQ with nlist ≈ 4·√N and PQ codes of ≈ dim/4 bytes."""
    if n < max(cfg.exact_threshold, MIN_IVF):
        return IndexParams("flat", dim)
    # nlist ≈ 4·√N (a power of two), with ≥ 39 training points per list
    nlist = cfg.nlist or int(min(65536, 2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(n // 39))))
    opq = cfg.opq == "on" or (cfg.opq == "auto" and dim >= 512)
    work_dim = dim
    if opq:
        work_dim = dim // 2 if dim >= 512 else dim
    target = cfg.pq_m or min(64, max(8, work_dim // 4 if work_dim <= 256 else work_dim // 8))
    pq_m = max(m for m in range(1, target + 1) if work_dim % m == 0)
    return IndexParams("ivfpq", dim, nlist, pq_m, work_dim if opq else 0, n)


def _gpu_available(cfg: IndexConfig) -> bool:
    if cfg.use_gpu == "off":
        return False
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if cfg.use_gpu == "on" and n == 0:
        raise InvalidInputError("use_gpu=on but faiss sees no GPU (install the gpu extra on a GPU machine)")
    return n > 0


class _RWLock:
    """Many readers or one writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ScopeIndex:
    """One faiss index, the ids it holds, and the catalog state it covers."""

    def __init__(self, scope: str, index: faiss.Index, params: IndexParams, image_id: int,
                 flag_event_id: int, generation: int, ids: set[int] | None) -> None:
        self.scope, self.index, self.params = scope, index, params
        self.image_id, self.flag_event_id, self.generation = image_id, flag_event_id, generation
        # The flagged scope changes membership at random; it tracks its ids. The all scope only ever
        # gets ids above image_id, so it needs no set (which would cost ~60 bytes per vector).
        self.ids = ids
        self.gpu_index: faiss.Index | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        if self.params.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = nprobe or max(16, self.params.nlist // 32)

    @property
    def nprobe(self) -> int | None:
        return int(faiss.extract_index_ivf(self.index).nprobe) if self.params.kind == "ivfpq" else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.ids is not None:
            keep = np.array([i not in self.ids for i in ids.tolist()], dtype=bool)
            ids, vectors = ids[keep], vectors[keep]
        else:
            keep = ids > self.image_id
            ids, vectors = ids[keep], vectors[keep]
        if len(ids) == 0:
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        if self.ids is not None:
            self.ids.update(ids.tolist())
        self.gpu_index = None

    def remove(self, ids: np.ndarray) -> None:
        if self.ids is not None:
            ids = np.array([i for i in ids.tolist() if i in self.ids], dtype=np.int64)
        if len(ids):
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64)))
            if self.ids is not None:
                self.ids.difference_update(ids.tolist())
            self.gpu_index = None


def _index_ids(index: faiss.Index) -> set[int]:
    """The ids held by a flat IDMap2 or an IVF index."""
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorIndex:
    """The ``all`` and ``flagged`` indexes of one store."""

    def __init__(self, store: Store, cfg: IndexConfig, *, vectors: VectorStore | None = None) -> None:
        self.store, self.cfg = store, cfg
        self.vectors = vectors or store.open_vectors()
        self.dim = self.vectors.dim
        self._lock = _RWLock()
        self._mutate = threading.Lock()  # one catch-up / rebuild at a time
        self._scopes: dict[str, ScopeIndex] = {}
        self._gpu = _gpu_available(cfg)
        self._last_save = 0.0
        self._last_refresh = time.monotonic()
        self._refreshing = threading.Event()
        for scope in SCOPES:
            self._scopes[scope] = self._open_scope(scope)
        self.catch_up()

    # ------------------------------------------------------------------ opening and building
    def path(self, scope: str) -> Path:
        return self.store.index_dir / f"{scope}.faiss"

    def _open_scope(self, scope: str) -> ScopeIndex:
        cp = self.store.catalog.checkpoint(scope)
        path = self.path(scope)
        if cp is None:
            if path.exists():
                log.warning("index %s has no checkpoint in the catalog: rebuilding from the raw vectors", path)
            return self._build(scope, generation=1)
        problem = None
        try:
            data = path.read_bytes()
        except OSError as exc:
            problem = f"cannot read it ({exc.strerror})"
        else:
            if hashlib.sha256(data).hexdigest() != cp.checksum:
                problem = "its checksum does not match the checkpoint (truncated or corrupt)"
        if problem is None:
            try:
                index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
                params = IndexParams(**cp.params)
                if index.d != self.dim:
                    raise ValueError(f"index is {index.d}-d, vectors are {self.dim}-d")
            except (RuntimeError, ValueError, TypeError) as exc:
                problem = f"faiss cannot load it ({str(exc).splitlines()[0]})"
        if problem is not None:
            log.warning("index %s: %s; rebuilding from the raw vectors", path, problem)
            return self._build(scope, generation=cp.generation + 1)
        s = ScopeIndex(scope, index, params, cp.image_id, cp.flag_event_id, cp.generation,
                       _index_ids(index) if scope == "flagged" else None)
        s.set_nprobe(self.cfg.nprobe)
        return s

    def _members(self, scope: str, upto: int) -> np.ndarray:
        ids = self.store.catalog.image_ids(flagged=True if scope == "flagged" else None, upto=upto)
        return np.asarray(ids, dtype=np.int64)

    def _build(self, scope: str, generation: int, params: IndexParams | None = None) -> ScopeIndex:
        """Build a scope from the raw vectors (outside any lock; the caller swaps it in)."""
        image_head, event_head = self.store.catalog.head()
        ids = self._members(scope, image_head)
        params = params or choose_params(len(ids), self.dim, self.cfg)
        index = faiss.index_factory(self.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
        if params.kind == "ivfpq":
            # polysemous codes are never used for search here, and training them costs ~10× the PQ itself
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
            rng = np.random.default_rng(self.cfg.seed)
            n_train = int(min(len(ids), max(40 * params.nlist, 50_000), 200_000))
            sample = np.sort(rng.choice(ids, size=n_train, replace=False)) if n_train < len(ids) else ids
            self._train(index, self.vectors.get(sample))
            params = IndexParams(**{**asdict(params), "trained_n": int(len(ids))})
        for part, vecs in self.vectors.iter_rows(ids):
            index.add_with_ids(vecs, part)
        s = ScopeIndex(scope, index, params, image_head, event_head, generation,
                       set(ids.tolist()) if scope == "flagged" else None)
        s.set_nprobe(self.cfg.nprobe)
        return s

    def _train(self, index: faiss.Index, sample: np.ndarray) -> None:
        if self._gpu:
            res = faiss.StandardGpuResources()
            ivf = faiss.extract_index_ivf(index)
            # the coarse quantizer's k-means is the expensive part: run it on the GPU
            ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(ivf.d))
        index.train(np.ascontiguousarray(sample, np.float32))

    # ------------------------------------------------------------------ keeping up with the catalog
    def catch_up(self) -> bool:
        """Bring both scopes up to the catalog: new images, flag changes, published rebuilds,
        and an automatic retrain when a scope crossed the exact threshold or grew ~4× past its training."""
        changed = False
        with self._mutate:
            for scope in SCOPES:
                cp = self.store.catalog.checkpoint(scope)
                cur = self._scopes[scope]
                if cp is not None and cp.generation > cur.generation:
                    fresh = self._open_scope(scope)  # another process published a rebuild
                    with self._lock.write():
                        self._scopes[scope] = cur = fresh
                    changed = True
            image_head, event_head = self.store.catalog.head()
            with self._lock.write():
                for scope in SCOPES:
                    changed |= self._apply(self._scopes[scope], image_head, event_head)
            for scope in SCOPES:
                s = self._scopes[scope]
                if self._needs_retrain(s):
                    log.info("retraining the %s index (%d vectors, %s)", scope, s.ntotal, s.params.kind)
                    self._swap(self._build(scope, s.generation + 1))
                    changed = True
        return changed

    def maybe_refresh(self) -> None:
        """Catch up when the last look is older than ``refresh_seconds`` (cheap: two catalog reads)."""
        if time.monotonic() - self._last_refresh < self.cfg.refresh_seconds:
            return
        self._last_refresh = time.monotonic()
        image_head, event_head = self.store.catalog.head()
        gens = [cp.generation if (cp := self.store.catalog.checkpoint(sc)) else 0 for sc in SCOPES]
        behind = any(g > self._scopes[sc].generation for g, sc in zip(gens, SCOPES)) or any(
            image_head > s.image_id or event_head > s.flag_event_id for s in self._scopes.values())
        if behind and not self._refreshing.is_set():
            # catch up in the background: requests keep being answered from what is loaded
            self._refreshing.set()
            threading.Thread(target=self._background_catch_up, name="index-refresh", daemon=True).start()

    def _background_catch_up(self) -> None:
        try:
            self.catch_up()
        except Exception:  # a failed refresh must not take the reader down; the next one retries
            log.exception("index refresh failed")
        finally:
            self._refreshing.clear()

    def _apply(self, s: ScopeIndex, image_head: int, event_head: int) -> bool:
        changed = False
        if image_head > s.image_id:
            new_ids = np.asarray(self.store.catalog.image_ids(
                flagged=True if s.scope == "flagged" else None, after=s.image_id, upto=image_head), np.int64)
            if len(new_ids):
                s.add(new_ids, self.vectors.get(new_ids))
                changed = True
            s.image_id = image_head
        if event_head > s.flag_event_id:
            if s.scope == "flagged":
                touched = {e.image_id for e in self.store.catalog.flag_events_after(s.flag_event_id)
                           if e.image_id <= s.image_id}
                if touched:
                    now = self.store.catalog.live(touched, flagged=True)
                    add = np.array(sorted(i for i in now if i not in s.ids), np.int64)
                    rem = np.array(sorted(i for i in touched if i not in now), np.int64)
                    if len(add):
                        s.add(add, self.vectors.get(add))
                    if len(rem):
                        s.remove(rem)
                    changed = bool(len(add) or len(rem))
            s.flag_event_id = event_head
        return changed

    def _needs_retrain(self, s: ScopeIndex) -> bool:
        n = s.ntotal
        if s.params.kind == "flat":
            return choose_params(n, self.dim, self.cfg).kind != "flat"
        return n >= 4 * max(s.params.trained_n, 1)

    def _swap(self, fresh: ScopeIndex) -> None:
        with self._lock.write():
            self._scopes[fresh.scope] = fresh
        image_head, event_head = self.store.catalog.head()
        with self._lock.write():
            self._apply(fresh, image_head, event_head)

    # ------------------------------------------------------------------ the public API
    def search(self, vectors: np.ndarray, k: int, scope: str = "flagged", *,
               exclude: set[int] | None = None) -> list[Hits]:
        """Nearest neighbours by cosine for each query row; only live (and, for ``flagged``, still
        flagged) images, re-checked against the catalog."""
        if scope not in SCOPES:
            raise InvalidInputError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if k < 1:
            raise InvalidInputError("k must be at least 1")
        self.maybe_refresh()
        q = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        if q.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors are {q.shape[1]}-d, the index is {self.dim}-d")
        want = k + (len(exclude) if exclude else 0) + 8  # room for rows the catalog guard drops
        with self._lock.read():
            s = self._scopes[scope]
            if s.ntotal == 0:
                return [Hits(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in q]
            if s.params.kind == "flat" or self.cfg.rerank <= 0:  # rerank 0: PQ similarities as they are
                sims, ids = self._search_index(s, q, min(want, s.ntotal))
            else:
                _, cand = self._search_index(s, q, min(want * max(self.cfg.rerank, 1), s.ntotal))
                sims, ids = self._rerank(q, cand, want)
        allowed = self.store.catalog.live((int(i) for i in np.unique(ids) if i >= 0), flagged=scope == "flagged")
        out = []
        for row_ids, row_sims in zip(ids, sims):
            keep = [j for j, i in enumerate(row_ids) if i >= 0 and int(i) in allowed
                    and not (exclude and int(i) in exclude)][:k]
            out.append(Hits(row_ids[keep].astype(np.int64), row_sims[keep].astype(np.float32)))
        return out

    def _search_index(self, s: ScopeIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = s.index
        if self._gpu:
            if s.gpu_index is None:
                s.gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, s.index)
            index = s.gpu_index
        return index.search(q, k)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids_out = np.full((len(q), k), -1, np.int64)
        sims_out = np.full((len(q), k), -np.inf, np.float32)
        for r, (qv, c) in enumerate(zip(q, cand)):
            c = c[c >= 0]
            if not len(c):
                continue
            exact = self.vectors.get(c) @ qv
            top = np.argsort(-exact, kind="stable")[:k]
            ids_out[r, :len(top)] = c[top]
            sims_out[r, :len(top)] = exact[top]
        return sims_out, ids_out

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """New images (ingest): into ``all`` now; flagged ones reach ``flagged`` through the flag events."""
        ids = np.asarray(ids, np.int64)
        with self._mutate, self._lock.write():
            s = self._scopes["all"]
            s.add(ids, np.asarray(vectors, np.float32))
            s.image_id = max(s.image_id, int(np.max(ids)))

    # IndexSink protocol, for ingest
    def added(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.add(ids, vectors)

    def flags_changed(self) -> None:
        self.catch_up()

    def remove(self, ids: np.ndarray | list[int]) -> None:
        """Drop ids from both scopes now (deleted images)."""
        arr = np.asarray(ids, np.int64)
        with self._mutate, self._lock.write():
            for s in self._scopes.values():
                s.remove(arr)

    def rebuild(self, scope: str | None = None, params: IndexParams | None = None) -> None:
        """Retrain and rebuild from the raw vectors; readers use the old index until the swap."""
        for sc in ([scope] if scope else list(SCOPES)):
            with self._mutate:
                fresh = self._build(sc, self._scopes[sc].generation + 1, params)
                self._swap(fresh)

    def stats(self) -> dict[str, dict]:
        with self._lock.read():
            return {sc: {"kind": s.params.kind, "factory": s.params.factory, "vectors": s.ntotal,
                         "covers_image_id": s.image_id, "covers_flag_event": s.flag_event_id,
                         "generation": s.generation, "nprobe": s.nprobe,
                         "gpu": self._gpu}
                    for sc, s in self._scopes.items()}

    def generation(self) -> tuple[int, ...]:
        return tuple(self._scopes[s].generation for s in SCOPES)

    # ------------------------------------------------------------------ persistence
    def save(self, scopes: tuple[str, ...] = SCOPES) -> None:
        """Write each scope atomically and record its checkpoint. A scope whose published generation
        is newer than ours (another process rebuilt it) is reloaded instead of overwritten."""
        lock_path = self.store.index_dir / ".save.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.catch_up()
            for scope in scopes:
                cp = self.store.catalog.checkpoint(scope)
                with self._lock.read():
                    s = self._scopes[scope]
                    if cp is not None and cp.generation > s.generation:
                        continue
                    data = faiss.serialize_index(s.index).tobytes()
                    meta = (s.image_id, s.flag_event_id, s.generation, s.ntotal, asdict(s.params))
                if cp is not None and (cp.image_id, cp.flag_event_id, cp.generation, cp.ntotal) == meta[:4]:
                    continue  # nothing changed since the last save
                path = self.path(scope)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_dir(path.parent)
                self.store.catalog.save_checkpoint(Checkpoint(scope, meta[0], meta[1], meta[2], meta[3], meta[4],
                                                              hashlib.sha256(data).hexdigest()))
        finally:
            os.close(fd)
        self._last_save = time.monotonic()

    def maybe_save(self) -> None:
        if time.monotonic() - self._last_save >= self.cfg.save_seconds:
            self.save()

    def sync_flags_and_save(self) -> None:
        self.save(("flagged",))
