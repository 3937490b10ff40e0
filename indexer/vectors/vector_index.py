"""The ``all`` (every live image) and ``flagged`` FAISS indexes of one store, kept in step with the
catalog; the FAISS work itself is ``indexer.vectors.faiss_index``, the matching space ``indexer.vectors.space``.

Ids are catalog ids. Vectors go into the indexes through the matching space (queries too), and the
top ``k × rerank`` IVF-PQ candidates are re-ranked exactly from the raw vectors in that space. Files
are written atomically (temp file, fsync, rename, fsync the folder) and the catalog records what each
covers (a checkpoint: highest image id, highest flag event, generation, checksum, the space version
and the recall measured at build). On open, an index behind its checkpoint catches up from the catalog
and raw vectors; a missing, truncated or corrupt index or space file is rebuilt with a warning.
Searches share a read lock; catch-up takes the write lock briefly; a rebuild (and a refitted space)
is built aside and swapped in, so readers keep answering from the old index until the new one is
published."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np

from indexer.vectors import faiss_index as fx
from indexer.vectors import space as spaces
from indexer.storage.catalog import Checkpoint
from indexer.errors import FlagmatchError, InvalidInputError
from indexer.storage.files import publish
from indexer.vectors.faiss_index import IndexConfig, IndexParams, LayeredIndex, choose_params
from indexer.vectors.regions import RegionHits, RegionIndex
from indexer.vectors.frames import FrameHits, FrameIndex
from indexer.vectors.sharded import ShardPlan, ShardRunner, local_runner
from indexer.vectors.space import MatchingSpace, SpaceConfig
from indexer.storage.store import Store
from indexer.storage.vectors import VectorStore

log = logging.getLogger(__name__)
SCOPES = ("flagged", "all")
TUNE_QUERIES = 500  # held-out stored vectors the recall tuner queries with
MIN_PAIRS = 200     # fewer re-upload pairs than this cannot estimate the edit noise: PCA-whitening instead
PairSource = Callable[[int], tuple[np.ndarray, np.ndarray]]
ViewSource = Callable[[int], tuple[np.ndarray, np.ndarray]]  # n → (image ids, embeddings of a hard view of each)

__all__ = ["SCOPES", "Hits", "IndexConfig", "IndexParams", "VectorIndex", "choose_params"]


@dataclass(frozen=True)
class Hits:
    ids: np.ndarray          # int64 [m], best first, never -1
    similarities: np.ndarray  # float32 [m], cosine in the matching space


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
    """One faiss index, the space its vectors are in, the ids it holds, and the catalog state it covers."""

    def __init__(self, scope: str, index: fx.AnyIndex, params: IndexParams, space: MatchingSpace, image_id: int,
                 flag_event_id: int, generation: int, ids: set[int] | None) -> None:
        self.scope, self.index, self.params, self.space = scope, index, params, space
        self.image_id, self.flag_event_id, self.generation = image_id, flag_event_id, generation
        # The flagged scope changes membership at random; it tracks its ids. The all scope only ever
        # gets ids above image_id, so it needs no set (which would cost ~60 bytes per vector).
        self.ids = ids
        self.gpu_index: faiss.Index | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, raw: np.ndarray) -> None:
        """Add raw vectors (transformed into this index's space here)."""
        if self.ids is not None:
            keep = np.array([i not in self.ids for i in ids.tolist()], dtype=bool)
        else:
            keep = ids > self.image_id
        ids, raw = ids[keep], raw[keep]
        if len(ids) == 0:
            return
        self.index.add_with_ids(self.space.apply(raw), np.ascontiguousarray(ids, np.int64))
        if self.ids is not None:
            self.ids.update(ids.tolist())
        self.gpu_index = None

    def remove(self, ids: np.ndarray) -> None:
        if self.ids is not None:
            ids = np.array([i for i in ids.tolist() if i in self.ids], dtype=np.int64)
        if len(ids):
            fx.remove_ids(self.index, ids)
            if self.ids is not None:
                self.ids.difference_update(ids.tolist())
            self.gpu_index = None


class VectorIndex:
    """The ``all`` and ``flagged`` indexes of one store, and the matching space they share."""

    def __init__(self, store: Store, cfg: IndexConfig, space_cfg: SpaceConfig = SpaceConfig(), *,
                 vectors: VectorStore | None = None, pairs: PairSource | None = None,
                 views: ViewSource | None = None, auto_rebuild: bool = True) -> None:
        """``pairs``: re-upload pairs for a learned space (a process with the model passes
        ``indexer.vectors.space.reupload_pairs`` over it); without it a space is fitted by PCA-whitening.
        ``views``: hard views of stored images for the copy-detection head (``indexer.vectors.space.hard_views``;
        with ``space_cfg.head``).
        ``auto_rebuild=False``: catching up never refits or retrains (a caller about to ``rebuild``
        would otherwise build everything twice)."""
        self.store, self.cfg, self.space_cfg, self.pairs, self.views = store, cfg, space_cfg, pairs, views
        self.auto_rebuild = auto_rebuild
        self.vectors = vectors or store.open_vectors()
        self.dim = self.vectors.dim
        self._lock = _RWLock()
        self._mutate = threading.Lock()  # one catch-up / rebuild at a time
        self._scopes: dict[str, ScopeIndex] = {}
        self._gpu = fx.gpu_available(cfg.use_gpu)
        self._last_save = 0.0
        self._last_refresh = time.monotonic()
        self._refreshing = threading.Event()
        self.space = self._current_space()
        for scope in SCOPES:
            self._scopes[scope] = self._open_scope(scope)
        self.frames = FrameIndex(store.catalog, self.vectors)  # every video's keyframes (indexer.vectors.frames)
        self.regions = RegionIndex(store.index_dir)  # flagged images' windows (indexer.vectors.regions)
        self.catch_up()

    # ------------------------------------------------------------------ the matching space
    def _current_space(self) -> MatchingSpace:
        """The space of the newest published checkpoint; a missing or corrupt file is refitted."""
        if self.space_cfg.dim <= 0:  # matching spaces turned off: search the raw features
            return MatchingSpace.identity(self.dim)
        cps = [cp for sc in SCOPES if (cp := self.store.catalog.checkpoint(sc)) is not None]
        if not cps:
            return self._fit_space()
        newest = max(cps, key=lambda cp: int(cp.params.get("space_version", 0)))
        try:
            return spaces.for_checkpoint(self.store.index_dir, newest, self.dim)
        except ValueError as exc:
            log.warning("matching space: %s; refitting it from the raw vectors", exc)
            return self._fit_space()

    def _fit_space(self) -> MatchingSpace:
        """Fit a new space on the live images (the identity below ``space_cfg.min_vectors``) and save it
        under a new version; indexes built with it publish it."""
        image_head, _ = self.store.catalog.head()
        ids = np.asarray(self.store.catalog.image_ids(flagged=None, upto=image_head), np.int64)
        if len(ids) < max(self.space_cfg.min_vectors, 2) or self.space_cfg.dim <= 0:
            return MatchingSpace.identity(self.dim)
        rng = np.random.default_rng(self.space_cfg.seed)
        if len(ids) > self.space_cfg.sample:
            ids = np.sort(rng.choice(ids, size=self.space_cfg.sample, replace=False))
        version = max(spaces.versions(self.store.index_dir) + [int(cp.params.get("space_version", 0))
                      for sc in SCOPES if (cp := self.store.catalog.checkpoint(sc)) is not None] + [0]) + 1
        t = time.perf_counter()
        sample = self.vectors.get(ids)
        a, b = self.pairs(self.space_cfg.pairs) if self.pairs is not None else (None, None)
        if a is not None and b is not None and len(a) >= MIN_PAIRS:
            view_ids, views = (self.views(self.space_cfg.head_images)
                               if self.views is not None and self.space_cfg.head_images > 0 else (None, None))
            if view_ids is None or views is None or len(view_ids) < self.space_cfg.head_min_views:
                space = spaces.fit_learned(sample, a, b, self.space_cfg, version)
            else:
                # the hard views count as edit noise too (the linear part), then the head learns what is left
                anchors = self.vectors.get(view_ids)
                space = spaces.fit_learned(sample, np.concatenate([a, anchors]), np.concatenate([b, views]),
                                           self.space_cfg, version)
                if self.space_cfg.head:
                    # negatives: other stored images, never one of those the head learns to find
                    bank = sample[~np.isin(ids, view_ids)][: 4 * self.space_cfg.head_negatives + 20_000]
                    space = spaces.fit_head(space, view_ids, anchors, views, bank, self.space_cfg)
        else:
            space = spaces.fit(sample, self.space_cfg, version)
        fitted = spaces.save(self.store.index_dir, space)
        log.info("matching space %s, in %.1fs", fitted.summary(), time.perf_counter() - t)
        return fitted

    def _needs_space(self) -> bool:
        """Enough vectors to fit a first space, or 4× the vectors the space was fitted on (until the fit
        reads its full sample): the space follows the corpus in geometric steps, so refits stay rare."""
        if self.space_cfg.dim <= 0:
            return False
        n = self._scopes["all"].ntotal
        if self.space.is_identity:
            return n >= self.space_cfg.min_vectors
        return self.space.fitted_n < self.space_cfg.sample and n >= 4 * self.space.fitted_n

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
                index = fx.deserialize(data, self.store.index_dir)
                params = IndexParams(**cp.params)
                if index.d != params.dim:
                    raise ValueError(f"index is {index.d}-d, its checkpoint says {params.dim}-d")
            except (RuntimeError, ValueError, TypeError) as exc:
                problem = f"faiss cannot load it ({str(exc).splitlines()[0]})"
        if problem is None and params.space_version != self.space.version:
            problem = (f"it was built in matching space {params.space_version}, which is not the current "
                       f"space {self.space.version}")
        if problem is not None:
            log.warning("index %s: %s; rebuilding from the raw vectors", path, problem)
            return self._build(scope, generation=cp.generation + 1)
        s = ScopeIndex(scope, index, params, self.space, cp.image_id, cp.flag_event_id, cp.generation,
                       fx.held_ids(index) if scope == "flagged" else None)
        fx.set_nprobe(s.index, params, self.cfg.nprobe)
        return s

    def _members(self, scope: str, upto: int) -> np.ndarray:
        ids = self.store.catalog.image_ids(flagged=True if scope == "flagged" else None, upto=upto)
        return np.asarray(ids, dtype=np.int64)

    def _build(self, scope: str, generation: int, params: IndexParams | None = None,
               space: MatchingSpace | None = None, shards: ShardRunner | None = None) -> ScopeIndex:
        """Build a scope from the raw vectors (outside any lock; the caller swaps it in). An IVF-PQ
        index is tuned to ``cfg.target_recall`` on held-out stored vectors while it is filled. With
        ``shards`` an IVF-PQ index is filled in shards (here or on a cluster) and merged into
        memory-mapped lists (``indexer.vectors.sharded``)."""
        space = space or self.space
        image_head, event_head = self.store.catalog.head()
        ids = self._members(scope, image_head)
        params = params or choose_params(len(ids), space.dim, self.cfg)
        params = replace(params, dim=space.dim, space_version=space.version, space_sha256=space.sha256)
        index: fx.AnyIndex = fx.new_index(params)
        rng = np.random.default_rng(self.cfg.seed)
        truth = None
        if params.kind == "ivfpq":
            n_train = int(min(len(ids), max(40 * params.nlist, 50_000), 200_000))
            sample = np.sort(rng.choice(ids, size=n_train, replace=False)) if n_train < len(ids) else ids
            fx.train(index, space.apply(self.vectors.get(sample)), gpu=self._gpu)
            params = replace(params, trained_n=int(len(ids)))
            qids = np.sort(rng.choice(ids, size=min(TUNE_QUERIES, len(ids)), replace=False))
            truth = fx.ExactTopK(space.apply(self.vectors.get(qids)), qids, 10)
        if truth is not None and shards is not None:
            index, params = self._fill_sharded(scope, generation, index, params, space, ids, truth, shards)
        else:
            for part, raw in self.vectors.iter_rows(ids):
                vecs = space.apply(raw)
                index.add_with_ids(vecs, part)
                if truth is not None:
                    truth.feed(part, vecs)
        if truth is not None:
            t = fx.tune(index.base if isinstance(index, LayeredIndex) else index, params, truth,
                        lambda q, c, k: self._rerank(space, q, c, k), self.cfg)
            params = fx.with_tuning(params, t)
            log.info("index %s: %s tuned to nprobe %d, re-rank %d×: recall@10 %.3f, p50 %.2f ms",
                     scope, params.factory, t.nprobe, t.rerank, t.recall, t.p50_ms)
            if t.recall < self.cfg.target_recall or t.p50_ms > self.cfg.tune_ms:
                log.warning("index %s: recall@10 %.3f at p50 %.2f ms misses the target %.2f within %.1f ms",
                            scope, t.recall, t.p50_ms, self.cfg.target_recall, self.cfg.tune_ms)
        s = ScopeIndex(scope, index, params, space, image_head, event_head, generation,
                       set(ids.tolist()) if scope == "flagged" else None)
        fx.set_nprobe(s.index, params, self.cfg.nprobe)
        return s

    def _fill_sharded(self, scope: str, generation: int, trained_index: faiss.Index, params: IndexParams,
                      space: MatchingSpace, ids: np.ndarray, truth: fx.ExactTopK,
                      shards: ShardRunner) -> tuple[LayeredIndex, IndexParams]:
        """Fill a trained IVF index in shards, merge them into ``<scope>-g<generation>-….ivfdata`` and open it
        memory-mapped; the shards' exact top lists become the tuner's truth."""
        trained = fx.serialize(trained_index)
        folder = self.store.index_dir / f".shards-{scope}-g{generation}-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        # a name of its own: two processes building the same generation at once never write one file
        lists = self.store.index_dir / f"{scope}-g{generation}-{os.getpid()}-{os.urandom(4).hex()}.ivfdata"
        t = time.perf_counter()
        try:
            results = shards(ShardPlan(scope, trained, space, ids, truth.q, truth.qids, folder, self.cfg.shard_rows))
            added = sum(r.added for r in results)
            if added != len(ids):
                raise FlagmatchError(f"the shards of {scope} hold {added} vectors; the scope has {len(ids)}",
                                     code="shard_mismatch")
            for r in results:
                truth.merge(r.sims, r.ids)
            t_shards = time.perf_counter() - t
            base = fx.merge_shards(trained, [r.path for r in results], lists)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("index %s: %d vectors in %d shards (%.1fs), merged into %s (%.1fs)", scope, added, len(results),
                 t_shards, lists.name, time.perf_counter() - t - t_shards)
        layered = LayeredIndex.open_built(base, trained, lists, int(ids.max()) if len(ids) else 0)
        return layered, replace(params, on_disk=lists.name)

    # ------------------------------------------------------------------ keeping up with the catalog
    def catch_up(self) -> bool:
        """Bring both scopes up to the catalog: new images, flag changes, published rebuilds, a first
        matching space once enough vectors exist, and a retrain when a scope crossed the exact
        threshold or grew ~4× past its training (the space is refitted then too)."""
        changed = False
        with self._mutate:
            for scope in SCOPES:
                cp = self.store.catalog.checkpoint(scope)
                cur = self._scopes[scope]
                if cp is not None and cp.generation > cur.generation:
                    self._adopt_published(cp)
                    fresh = self._open_scope(scope)  # another process published a rebuild
                    with self._lock.write():
                        self._scopes[scope] = cur = fresh
                    changed = True
            image_head, event_head = self.store.catalog.head()
            with self._lock.write():
                flags = self._apply(self._scopes["flagged"], image_head, event_head)
                changed |= self._apply(self._scopes["all"], image_head, event_head) | flags
                frames = self.frames.sync(self.space)
                if frames or flags or not self.frames.marked:
                    self.frames.mark(self._scopes["flagged"].ids or set())
                changed |= frames
                self.regions.sync(self.space)
            if self.auto_rebuild and (self._needs_space()
                                      or any(self._needs_retrain(self._scopes[sc]) for sc in SCOPES)):
                log.info("refitting the matching space and rebuilding the indexes (%d vectors)",
                         self._scopes["all"].ntotal)
                # an index served memory-mapped is rebuilt the same way (in shards, here)
                layered = any(isinstance(sc.index, LayeredIndex) for sc in self._scopes.values())
                self._rebuild_all(shards=local_runner(self.vectors) if layered else None)
                changed = True
        return changed

    def _adopt_published(self, cp: Checkpoint) -> None:
        """Another process published a rebuild: take its space when it is newer than ours."""
        version = int(cp.params.get("space_version", 0))
        if version > self.space.version:
            try:
                self.space = spaces.for_checkpoint(self.store.index_dir, cp, self.dim)
            except ValueError as exc:
                log.warning("matching space %d: %s; keeping space %d", version, exc, self.space.version)

    def _rebuild_all(self, params: dict[str, IndexParams] | None = None, shards: ShardRunner | None = None) -> None:
        """(under ``_mutate``) Refit the space, build both scopes with it aside (``params`` per scope where
        given), swap them in."""
        space = self._fit_space()
        fresh = [self._build(sc, self._scopes[sc].generation + 1, (params or {}).get(sc), space, shards)
                 for sc in SCOPES]
        self.space = space
        for f in fresh:
            self._swap(f)
        with self._lock.write():
            self.frames.sync(space)
            self.frames.mark(self._scopes["flagged"].ids or set())
            self.regions.sync(space)

    def maybe_refresh(self) -> None:
        """Catch up when the last look is older than ``refresh_seconds`` (cheap: two catalog reads and a stat
        of the region file)."""
        if time.monotonic() - self._last_refresh < self.cfg.refresh_seconds:
            return
        self._last_refresh = time.monotonic()
        with self._lock.read():
            space = self.space
        self.regions.sync(space)
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
                    assert s.ids is not None
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
            return choose_params(n, s.space.dim, self.cfg).kind != "flat"
        return n >= 4 * max(s.params.trained_n, 1)

    def _swap(self, fresh: ScopeIndex) -> None:
        with self._lock.write():
            self._scopes[fresh.scope] = fresh
        image_head, event_head = self.store.catalog.head()
        with self._lock.write():
            self._apply(fresh, image_head, event_head)

    # ------------------------------------------------------------------ the public API
    def search(self, vectors: np.ndarray, k: int, scope: str = "flagged", *,
               exclude: list[set[int]] | set[int] | None = None, live: bool = True) -> list[Hits]:
        """Nearest neighbours by cosine in the matching space for each row of raw query vectors, all
        rows in one FAISS call. ``exclude``: ids to leave out (one set for all rows, or one per row).
        ``live``: re-check against the catalog that each hit is live (and, for ``flagged``, still
        flagged); a caller that reads the hits' records anyway passes False and checks them itself —
        the hits then include up to ``k + 8`` rows beyond the excluded ones so it has room to drop."""
        if scope not in SCOPES:
            raise InvalidInputError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if k < 1:
            raise InvalidInputError("k must be at least 1")
        self.maybe_refresh()
        raw = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        if raw.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors are {raw.shape[1]}-d, the index is {self.dim}-d")
        per_row = exclude if isinstance(exclude, list) else [exclude or set()] * len(raw)
        want = k + max((len(e) for e in per_row), default=0) + 8  # room for rows the catalog guard drops
        with self._lock.read():
            s = self._scopes[scope]
            if s.ntotal == 0:
                return [Hits(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in raw]
            q = s.space.apply(raw)
            rerank = s.params.rerank or self.cfg.rerank
            if s.params.kind == "flat":
                sims, ids = self._search_index(s, q, min(want, s.ntotal))
            else:
                _, cand = self._search_index(s, q, min(want * max(rerank, 1), s.ntotal))
                sims, ids = self._rerank(s.space, q, cand, want)
        allowed = self.store.catalog.live((int(i) for i in np.unique(ids) if i >= 0),
                                          flagged=scope == "flagged") if live else None
        out = []
        for row_ids, row_sims, ex in zip(ids, sims, per_row):
            keep = [j for j, i in enumerate(row_ids.tolist()) if i >= 0 and (allowed is None or i in allowed)
                    and i not in ex]
            keep = keep[:k] if live else keep
            out.append(Hits(row_ids[keep].astype(np.int64), row_sims[keep].astype(np.float32)))
        return out

    def search_frames(self, vectors: np.ndarray, k: int, scope: str = "flagged") -> list[FrameHits]:
        """The nearest stored keyframes of each row of raw query vectors (``indexer.vectors.frames``), in the
        space the image indexes search; ``flagged``: only keyframes of videos flagged now (by the flagged
        scope's own membership). Deleted videos are the caller's to drop."""
        if scope not in SCOPES:
            raise InvalidInputError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        raw = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        with self._lock.read():
            return self.frames.search(self.space.apply(raw), k, flagged=scope == "flagged")

    def search_regions(self, vectors: np.ndarray, k: int) -> list[RegionHits]:
        """The nearest windows of flagged images (``indexer.vectors.regions``) of each row of raw query vectors,
        in the space the image indexes search. Images unflagged or deleted since the region file was written are
        the caller's to drop, as it drops image hits."""
        raw = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        with self._lock.read():
            return self.regions.search(self.space.apply(raw), k)

    def _search_index(self, s: ScopeIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = s.index
        if isinstance(index, LayeredIndex):  # memory-mapped lists stay on this host's page cache
            return index.search(q, k)
        if self._gpu:
            if s.gpu_index is None:
                s.gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, s.index)
            index = s.gpu_index
        return index.search(q, k)

    def _rerank(self, space: MatchingSpace, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities in ``space`` for each row's candidates, best ``k`` first (one read of the raw
        vectors and one transform for all rows)."""
        ids_out = np.full((len(q), k), -1, np.int64)
        sims_out = np.full((len(q), k), -np.inf, np.float32)
        flat = np.unique(cand[cand >= 0])
        if not len(flat):
            return sims_out, ids_out
        exact_vecs = space.apply(self.vectors.get(flat))
        for r, (qv, c) in enumerate(zip(q, cand)):
            c = c[c >= 0]
            if not len(c):
                continue
            exact = exact_vecs[np.searchsorted(flat, c)] @ qv
            top = np.argsort(-exact, kind="stable")[:k]
            ids_out[r, :len(top)] = c[top]
            sims_out[r, :len(top)] = exact[top]
        return sims_out, ids_out

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """New images (ingest): into ``all`` now; flagged ones reach ``flagged`` through the flag events."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        with self._mutate:
            s = self._scopes["all"]
            if int(ids.min()) > s.image_id + 1:
                # other writers committed ids in between (several ingest processes on one catalog): take
                # theirs from the catalog first, so the covered id never passes an image the index lacks
                image_head, event_head = self.store.catalog.head()
                with self._lock.write():
                    for sc in SCOPES:
                        self._apply(self._scopes[sc], min(image_head, int(ids.min()) - 1),
                                    self._scopes[sc].flag_event_id)
            with self._lock.write():
                keep = ids > s.image_id
                s.add(ids[keep], np.asarray(vectors, np.float32)[keep])
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

    def rebuild(self, scope: str | None = None, params: IndexParams | None = None, *, refit: bool = True,
                shards: ShardRunner | None = None) -> None:
        """Retrain and rebuild from the raw vectors (``reindex``), refitting the matching space first
        (both scopes are rebuilt then: they share it); readers use the old indexes until the swap.
        ``shards``: fill IVF-PQ indexes in shards and serve them memory-mapped (``indexer.vectors.sharded``)."""
        with self._mutate:
            if refit:
                self._rebuild_all({sc: params for sc in ([scope] if scope else SCOPES)} if params else None, shards)
            else:
                for sc in ([scope] if scope else list(SCOPES)):
                    self._swap(self._build(sc, self._scopes[sc].generation + 1, params, shards=shards))

    def generations(self) -> dict:
        """{"scopes": {scope: generation}, "space": version} of what searches use now."""
        with self._lock.read():
            return {"scopes": {sc: s.generation for sc, s in self._scopes.items()}, "space": self.space.version}

    def members(self, scope: str) -> set[int]:
        """The image ids ``scope`` holds now (for the consistency check: it should be the catalog's)."""
        with self._lock.read():
            return fx.held_ids(self._scopes[scope].index)

    def stats(self) -> dict[str, dict]:
        with self._lock.read():
            return {sc: {"kind": s.params.kind, "factory": s.params.factory, "vectors": s.ntotal,
                         "covers_image_id": s.image_id, "covers_flag_event": s.flag_event_id,
                         "generation": s.generation, "nprobe": fx.get_nprobe(s.index, s.params),
                         "rerank": s.params.rerank or self.cfg.rerank, "recall_at_10": s.params.recall,
                         "space": s.space.describe(), "gpu": self._gpu and not isinstance(s.index, LayeredIndex),
                         "on_disk": self._on_disk(s)}
                    for sc, s in self._scopes.items()}

    def _on_disk(self, s: ScopeIndex) -> dict | None:
        if not isinstance(s.index, LayeredIndex):
            return None
        return {"lists": s.index.lists_file.name, "bytes": s.index.lists_file.stat().st_size,
                "added_since": int(s.index.delta.ntotal), "hidden_since": s.index.base_removed}

    # ------------------------------------------------------------------ persistence
    def save(self, scopes: tuple[str, ...] = SCOPES) -> None:
        """Write each scope atomically and record its checkpoint. A scope whose published generation
        is newer than ours (another process rebuilt it) is reloaded instead of overwritten."""
        with self.store.exclusive("index-save"):
            self.catch_up()
            for scope in scopes:
                cp = self.store.catalog.checkpoint(scope)
                with self._lock.read():
                    s = self._scopes[scope]
                    if cp is not None and cp.generation > s.generation:
                        continue
                    data = fx.serialize(s.index)
                    meta = (s.image_id, s.flag_event_id, s.generation, s.ntotal, asdict(s.params))
                if cp is not None and (cp.image_id, cp.flag_event_id, cp.generation, cp.ntotal) == meta[:4]:
                    continue  # nothing changed since the last save
                publish(self.path(scope), data)
                self.store.catalog.save_checkpoint(Checkpoint(scope, meta[0], meta[1], meta[2], meta[3], meta[4],
                                                              hashlib.sha256(data).hexdigest()))
            spaces.prune(self.store.index_dir, {int(cp.params.get("space_version", 0)) for sc in SCOPES
                                                if (cp := self.store.catalog.checkpoint(sc)) is not None})
            self._prune_lists()
        self._last_save = time.monotonic()

    def _prune_lists(self) -> None:
        """Delete memory-mapped lists two or more generations behind their scope's checkpoint. The previous
        generation's stays: a process that read the old checkpoint a moment ago may be opening it now
        (processes that already map a deleted file keep reading it)."""
        for scope in SCOPES:
            cp = self.store.catalog.checkpoint(scope)
            if cp is None:
                continue
            for f in self.store.index_dir.glob(f"{scope}-g*.ivfdata"):
                gen = f.name[len(scope) + 2:].split("-", 1)[0]
                if gen.isdigit() and int(gen) < cp.generation - 1:
                    f.unlink(missing_ok=True)

    def maybe_save(self) -> None:
        if time.monotonic() - self._last_save >= self.cfg.save_seconds:
            self.save()
