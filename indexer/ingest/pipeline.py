"""The ingest pipeline: read → decode (and hash: MD5 of the bytes, PDQ of the pixels) → embed → write.

Reading, hashing and decoding run in a thread pool (Pillow releases the GIL while it decodes) while
the model runs the previous batch on the main thread. Content already in the catalog (same sha256)
is never decoded or embedded again. Each write is: thumbnails, raw vectors (fsynced), then one catalog
transaction — so a crash at any moment loses nothing and duplicates nothing on the next run.

A clip (``indexer.media.video``: told from its bytes) is decoded into its keyframes and hashed (MD5, vPDQ) on
the same threads; each keyframe is a model input of the same batches, and the write adds the clip's item (its
keyframes' mean vector) with its keyframes' rows, thumbnails and raw vectors in the same order and
transaction."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from indexer.storage.catalog import FlagRequest, IngestCounts, NewImage, NewKeyframe
from indexer.media.decode import DEFAULT_LIMITS, DecodedImage, DecodeLimits, InputSpec, decode
from indexer.media.video import DecodedVideo, VideoLimits, decode_video, is_video
from indexer.models.embed import Embedder, blank_like
from indexer.errors import DecodeError
from indexer.storage import verdicts
from indexer.media.hashes import Pdq, md5_of
from indexer.review.heads import Head, save_scores
from indexer.ingest.sources import Source, SourceError, SourceItem
from indexer.storage.store import Store, read_original
from indexer.models.threads import DECODE, MODEL, name_os_thread, worker_started


@dataclass(frozen=True)
class IngestOptions:
    flag_threshold: float
    batch_size: int = 32
    decode_workers: int = 2
    limits: DecodeLimits = DEFAULT_LIMITS
    max_file_bytes: int = 200 * 1024 * 1024
    thumb_size: int = 256
    model_lanes: int = 0  # batches the model runs at once, one thread each (0: as many as cores where it helps)
    decode_nice: int = 19  # the decode threads' niceness, above the model's (see indexer.media.decode.lower_priority)
    video: VideoLimits = VideoLimits()


# ------------------------------------------------------------------ what the stages pass along

@dataclass(frozen=True)
class Decoded:
    item: SourceItem
    sha256: str
    size: int
    image: DecodedImage
    md5: str
    video: DecodedVideo | None = None  # a clip: ``image`` is its first keyframe, its rows are every keyframe

    @property
    def rows(self) -> list[np.ndarray]:
        """The model inputs it needs: the image's pixels, or each keyframe's."""
        return [f.image.pixels for f in self.video.frames] if self.video is not None else [self.image.pixels]


@dataclass(frozen=True)
class Duplicate:
    item: SourceItem
    sha256: str
    image_id: int | None  # None: its first copy is still in flight in this run


@dataclass(frozen=True)
class Failed:
    path: str
    code: str
    message: str
    sha256: str | None = None


@dataclass
class Batch:
    """Decoded images waiting for the model, and what else the same write will record."""
    decoded: list[Decoded] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)

    def __len__(self) -> int:
        """Model inputs: an image is one, a clip one per keyframe."""
        return sum(len(d.rows) for d in self.decoded)


@dataclass(frozen=True)
class EmbeddedBatch:
    batch: Batch
    vectors: np.ndarray  # float32 [n, d], L2-normalised: an image's own, a clip's keyframes' mean
    p_unsafe: np.ndarray  # float32 [n]: an image's own, a clip's most unsafe keyframe's
    # a clip's keyframes, by position: (vectors, P(unsafe), which of its decoded keyframes they are)
    frames: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


class Progress(Protocol):
    def update(self, n: int, *, errors: int) -> None: ...


class IndexSink(Protocol):
    """What the vector index needs to hear from ingest."""
    def added(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def flags_changed(self) -> None: ...


# ------------------------------------------------------------------ the stages

def read_source(path: str, max_bytes: int) -> bytes | Failed:
    """A source file's bytes, or why not (``too_large`` over ``max_bytes``, ``unreadable``)."""
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            return Failed(path, "too_large", f"file is {size:,} bytes, over the cap of {max_bytes:,}")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        return Failed(path, "unreadable", exc.strerror or str(exc))


def deleted_failure(path: str, sha: str, image_id: int) -> Failed:
    """Bytes a reviewer deleted are never taken in again."""
    return Failed(path, "deleted", f"these bytes were deleted (image {image_id}): not taken in again", sha)


class Reader:
    """Read + hash + claim + decode one source item (runs in the decode threads)."""

    def __init__(self, store: Store, embedder: Embedder, opts: IngestOptions) -> None:
        self.store, self.spec, self.opts = store, embedder.info.input, opts
        self._lock = threading.Lock()
        self._pending: set[str] = set()       # claimed in this run, not yet committed
        self._failed: dict[str, Failed] = {}  # shas that failed to decode in this run
        self.decode_cpu_s = 0.0  # CPU the decode threads spent decoding (the run's counts carry it)

    def __call__(self, item: SourceItem) -> Decoded | Duplicate | Failed:
        data = read_source(item.path, self.opts.max_file_bytes)
        if isinstance(data, Failed):
            return data
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sha in self._failed:
                f0 = self._failed[sha]
                return Failed(item.path, f0.code, f0.message, sha)
            if sha in self._pending:
                return Duplicate(item, sha, None)
            found = self.store.catalog.lookup_shas([sha]).get(sha)
            if found is not None:
                known, deleted = found
                return deleted_failure(item.path, sha, known) if deleted else Duplicate(item, sha, known)
            self._pending.add(sha)
        started = time.thread_time()
        try:
            if is_video(data):
                video = decode_video(data, self.spec, self.opts.video, thumb_size=self.opts.thumb_size)
                return Decoded(item, sha, len(data), video.frames[0].image, md5_of(data), video)
            image = decode(data, self.spec, self.opts.limits, thumb_size=self.opts.thumb_size)
        except DecodeError as exc:
            failed = Failed(item.path, exc.code, exc.message, sha)
            with self._lock:
                self._failed[sha] = failed
                self._pending.discard(sha)
            return failed
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self.decode_cpu_s += spent
        return Decoded(item, sha, len(data), image, md5_of(data))

    def committed(self, shas: Iterable[str]) -> None:
        with self._lock:
            self._pending.difference_update(shas)


def keyframe_name(video_sha256: str, offset_s: float) -> str:
    """The name a video keyframe's thumbnail is stored under: its own, from the video's bytes and its offset."""
    return hashlib.sha256(f"{video_sha256}@{offset_s}".encode()).hexdigest()


def model_lanes(embedder: Embedder, requested: int) -> tuple[int, Embedder]:
    """How many batches the model runs at once, and the embedder to run them with. A backend that can run
    in single-threaded lanes (``for_lanes``: ONNX, timm on a CPU) gets one lane per core by default: decoding
    on the same cores stalls a model whose operators wait for all their threads, while a lane only loses the
    CPU taken from it (2 cores, make-corpus, one lane per core against one batch on both cores: ViT bf16
    16.1 vs 13.3 images/s end to end, open_nsfw 53.2 vs 46.1; ``benchmarks/ingest.py``)."""
    for_lanes = getattr(embedder, "for_lanes", None)
    lanes = requested if requested > 0 else (os.cpu_count() or 1) if for_lanes is not None else 1
    if lanes <= 1 or for_lanes is None:
        return 1, embedder
    return lanes, for_lanes(lanes)


def embed_batch(embedder: Embedder, batch: Batch, most: int = 0) -> EmbeddedBatch:
    """One forward pass over every model input of the batch; a clip's keyframes are folded into its item's
    vector (their mean, L2-normalised) and P(unsafe) (the most unsafe keyframe's) and kept as its frames —
    those the model sees as blank left out (``blank_like``), unless the clip has nothing else. ``most``: the
    model is given at most this many inputs at once (a clip's keyframes can outnumber the batch size)."""
    if not batch.decoded:
        return EmbeddedBatch(batch, np.zeros((0, embedder.info.dim), np.float32), np.zeros(0, np.float32))
    pixels = np.stack([px for d in batch.decoded for px in d.rows])
    if 0 < most < len(pixels):
        parts = [embedder.embed(pixels[i:i + most]) for i in range(0, len(pixels), most)]
        vectors, p = np.concatenate([v for v, _ in parts]), np.concatenate([q for _, q in parts])
    else:
        vectors, p = embedder.embed(pixels)
    if all(d.video is None for d in batch.decoded):
        return EmbeddedBatch(batch, vectors, p)
    items, ps, frames, at = [], [], {}, 0
    for n, d in enumerate(batch.decoded):
        k = len(d.rows)
        v, pk = vectors[at:at + k], p[at:at + k]
        at += k
        if d.video is None:
            items.append(v[0])
            ps.append(pk[0])
            continue
        keep = ~blank_like(embedder, v)
        if not keep.any():
            keep[0] = True
        v, pk = v[keep], pk[keep]
        mean = v.mean(axis=0)
        items.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        ps.append(pk.max())
        frames[n] = (v, pk, np.flatnonzero(keep))
    return EmbeddedBatch(batch, np.stack(items).astype(np.float32), np.asarray(ps, np.float32), frames)


class Writer:
    """Thumbnails → raw vectors (fsync) → one catalog transaction → index."""

    def __init__(self, store: Store, model_id: str, threshold: float, run_id: int,
                 index: IndexSink | None, heads: Sequence[Head] = ()) -> None:
        self.store, self.model_id, self.threshold, self.run_id, self.index = store, model_id, threshold, run_id, index
        self.heads = list(heads)
        self.segment = store.open_vectors().segment(run_id)  # this run's own vector file
        self.counts = IngestCounts()

    def _flag_of(self, d: Decoded, p: float, i: int, scores: dict[str, np.ndarray]) -> FlagRequest | None:
        if d.item.flag is not None:
            return d.item.flag
        if p >= self.threshold:
            return FlagRequest("model", None, "ingest", f"P(unsafe) {p:.3f} >= threshold {self.threshold}")
        # a policy head may flag what the seed model's threshold does not
        h = next((h for h in self.heads if scores[h.label][i] >= h.threshold and not (
            d.item.verdict is not None and d.item.verdict[0] == h.label and not d.item.verdict[1])), None)
        if h is None:
            return None
        return FlagRequest(h.source, h.label, h.source,
                           f"P({h.label}) {float(scores[h.label][i]):.3f} >= threshold {h.threshold:.3f}")

    def _new_item(self, d: Decoded, p: float, i: int, paths: list[tuple[str, str | None]], flags: list[FlagRequest],
                  row: int, frames: tuple[np.ndarray, np.ndarray, np.ndarray] | None, frame_row: int) -> NewImage:
        """An image, or a clip with its keyframes (thumbnails first; the clip's tile is its most unsafe keyframe)."""
        v = d.video
        if v is None or frames is None:
            return NewImage(0, d.sha256, d.size, d.image.format, d.image.width, d.image.height, d.image.frames, p,
                            self.store.write_thumbnail(d.sha256, d.image.thumbnail), tuple(paths), md5=d.md5,
                            pdq=d.image.pdq, flags=tuple(flags), vec_segment=self.segment.number, vec_row=row)
        ps, kept = frames[1], [v.frames[j] for j in frames[2]]
        thumbs = [self.store.write_thumbnail(keyframe_name(d.sha256, f.offset_s), f.image.thumbnail) for f in kept]
        tile = int(np.argmax(ps))
        kfs = tuple(NewKeyframe(f.offset_s, f.scene_cut, float(ps[k]), thumbs[k], frame_row + k)
                    for k, f in enumerate(kept))
        return NewImage(0, d.sha256, d.size, v.info.container, v.info.width, v.info.height, v.info.frames, p,
                        thumbs[tile], tuple(paths), md5=d.md5, flags=tuple(flags), vec_segment=self.segment.number,
                        vec_row=row, kind="video", duration_s=round(v.info.duration_s, 3), vpdq=v.vpdq, keyframes=kfs)

    def __call__(self, eb: EmbeddedBatch) -> None:
        b = eb.batch
        n = len(b.decoded)
        scores = {h.label: h.predict(eb.vectors) for h in self.heads} if n else {}
        at = {d.sha256: i for i, d in enumerate(b.decoded)}  # in-batch position by content
        paths: list[list[tuple[str, str | None]]] = [[(d.item.path, d.item.external_id)] for d in b.decoded]
        image_flags: list[list[FlagRequest]] = [[] for _ in b.decoded]
        said_at: list[tuple[int, tuple[str, bool, str]]] = []  # verdicts of this batch's images, by position
        for i, (d, p) in enumerate(zip(b.decoded, eb.p_unsafe)):
            req = self._flag_of(d, float(p), i, scores)
            if req is not None:
                image_flags[i].append(req)
            if d.item.verdict is not None:
                said_at.append((i, d.item.verdict))
        extra_paths: list[tuple[int, str, str | None]] = []
        flags: list[tuple[int, FlagRequest]] = []
        said: list[tuple[int, tuple[str, bool, str]]] = []
        failed = list(b.failed)
        in_batch = 0
        for dup in b.duplicates:
            if dup.image_id is None and dup.sha256 in at:  # a copy of an image this very batch adds
                i = at[dup.sha256]
                paths[i].append((dup.item.path, dup.item.external_id))
                image_flags[i].extend([dup.item.flag] if dup.item.flag is not None else [])
                said_at.extend([(i, dup.item.verdict)] if dup.item.verdict is not None else [])
                in_batch += 1
                continue
            image_id = dup.image_id or self.store.catalog.known_sha(dup.sha256)
            if image_id is None:  # its first copy failed after this one was read
                failed.append(Failed(dup.item.path, "duplicate_of_failed", "same bytes as a file that failed"))
                continue
            extra_paths.append((image_id, dup.item.path, dup.item.external_id))
            if dup.item.flag is not None:
                flags.append((image_id, dup.item.flag))
            if dup.item.verdict is not None:
                said.append((image_id, dup.item.verdict))
        first_row = self.segment.append(eb.vectors) if n else 0  # fsynced before the catalog commits
        frame_rows: dict[int, int] = {}  # a clip's first keyframe row, by position
        if eb.frames:
            at = self.segment.append(np.concatenate([v for v, _, _ in eb.frames.values()]))
            for i, (v, _, _) in eb.frames.items():
                frame_rows[i] = at
                at += len(v)
        images = [self._new_item(d, float(p), i, paths[i], image_flags[i], first_row + i,
                                 eb.frames.get(i), frame_rows.get(i, 0))
                  for i, (d, p) in enumerate(zip(b.decoded, eb.p_unsafe))]
        res = self.store.catalog.write_images(images, self.model_id, extra_paths, flags,
                                              [(f.path, f.code, f.message) for f in failed], self.run_id)
        said += [(res.ids[i], v) for i, v in said_at]
        verdicts.record(self.store.catalog, [verdicts.Verdict(i, label, positive, who, "manifest", "manifest")
                                             for i, (label, positive, who) in said])
        fresh = np.asarray(res.new, dtype=bool)
        new_ids = np.asarray(res.ids, dtype=np.int64)[fresh] if n else np.zeros(0, np.int64)
        if self.heads and len(new_ids):
            save_scores(self.store, self.heads, new_ids.tolist(), {k: v[fresh] for k, v in scores.items()})
        c = self.counts
        c.new += len(new_ids)
        c.duplicates += len(extra_paths) + in_batch + int(n - len(new_ids))  # the last: another writer was first
        c.flagged += res.flagged
        c.failed += len(failed)
        for f in failed:
            c.reasons[f.code] = c.reasons.get(f.code, 0) + 1
        if self.index is not None:
            if len(new_ids):
                self.index.added(new_ids, eb.vectors[fresh])
            if res.flagged:
                self.index.flags_changed()


# ------------------------------------------------------------------ back-filling hashes

@dataclass
class BackfillCounts:
    hashed: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _hash_original(image_id: int, sha: str, paths: Sequence[str], opts: IngestOptions
                   ) -> tuple[int, str, Pdq | None] | Failed:
    """MD5 and PDQ of a stored image from the first of its paths that still holds the same bytes."""
    found = read_original(paths, sha, opts.max_file_bytes)
    if found.data is None:
        return Failed(found.path or f"image:{image_id}", found.code, found.message)
    try:
        image = decode(found.data, InputSpec(224), opts.limits, thumb_size=0)
    except DecodeError as exc:
        return Failed(found.path, exc.code, exc.message)
    return image_id, md5_of(found.data), image.pdq


def backfill_hashes(store: Store, opts: IngestOptions, *, progress: Progress | None = None) -> BackfillCounts:
    """Hash the stored images that have no hashes yet (stores made before hashes existed), streaming their
    originals from the paths they were seen at, ``opts.decode_workers`` at a time. An original that is gone,
    changed or unreadable is recorded as an ingest error and its image stays unhashed (a later run tries
    again); the rest are written a page at a time."""
    counts = BackfillCounts()
    with store.writer(), ThreadPoolExecutor(max_workers=max(1, opts.decode_workers),
                                            thread_name_prefix="hash") as pool:
        run_id = store.catalog.start_run("hashes", "backfill", "-")
        after = 0
        while page := store.catalog.unhashed(after, 256):
            results = list(pool.map(lambda row: _hash_original(row[0], row[1], row[2], opts), page))
            done = [r for r in results if not isinstance(r, Failed)]
            failed = [r for r in results if isinstance(r, Failed)]
            store.catalog.set_signals(done)
            store.catalog.write_batch([], "", errors=[(f.path, f.code, f.message) for f in failed], run_id=run_id)
            counts.hashed += len(done)
            counts.failed += len(failed)
            for f in failed:
                counts.reasons[f.code] = counts.reasons.get(f.code, 0) + 1
            after = page[-1][0]
            if progress is not None:
                progress.update(len(page), errors=counts.failed)
        store.catalog.finish_run(run_id, IngestCounts(new=counts.hashed, failed=counts.failed, reasons=counts.reasons))
    return counts


# ------------------------------------------------------------------ the job

def ingest(store: Store, embedder: Embedder, sources: Iterable[Source], opts: IngestOptions, *,
           index: IndexSink | None = None, progress: Progress | None = None,
           after_batch: Callable[[], None] | None = None, heads: Sequence[Head] = ()) -> IngestCounts:
    """Ingest ``sources`` into ``store``. Bad files are recorded and skipped; returns the counts."""
    info = embedder.info
    store.bind_model(info.model_id, info.dim, info.preprocessing, info.source)
    with store.writer():  # cuts raw vector rows a crashed writer never committed
        run_id = store.catalog.start_run(info.model_id, info.backend, info.precision)
        reader = Reader(store, embedder, opts)
        writer = Writer(store, info.model_id, opts.flag_threshold, run_id, index, heads)
        inflight: deque[Future] = deque()
        batch = Batch()
        max_inflight = max(2 * opts.batch_size, 4)

        lanes, model = model_lanes(embedder, opts.model_lanes)
        # each lane takes batch_size ÷ lanes images: the model holds batch_size images at once whatever the
        # lanes, and the run's last batch, which one lane runs while the others have nothing left, is short
        per_batch = max(1, opts.batch_size // lanes)
        embedding: deque[Future] = deque()  # batches with the model, oldest first (written in this order)

        def write_oldest() -> None:
            eb = embedding.popleft().result()
            writer(eb)
            reader.committed(d.sha256 for d in eb.batch.decoded)
            if progress is not None:
                progress.update(len(eb.batch.decoded) + len(eb.batch.duplicates) + len(eb.batch.failed),
                                errors=writer.counts.failed)
            if after_batch is not None:
                after_batch()

        def flush() -> None:
            nonlocal batch
            if not (batch.decoded or batch.duplicates or batch.failed):
                return
            done, batch = batch, Batch()
            embedding.append(model_pool.submit(embed_batch, model, done, per_batch))
            while len(embedding) >= lanes or (embedding and embedding[0].done()):
                write_oldest()

        def take(result: Decoded | Duplicate | Failed) -> None:
            if isinstance(result, Decoded):
                batch.decoded.append(result)
            elif isinstance(result, Duplicate):
                batch.duplicates.append(result)
            else:
                batch.failed.append(result)
            if len(batch) >= per_batch or len(batch.duplicates) + len(batch.failed) >= 4 * opts.batch_size:
                flush()

        with ThreadPoolExecutor(max_workers=max(1, opts.decode_workers), thread_name_prefix="decode",
                                initializer=worker_started, initargs=(DECODE, opts.decode_nice)) as pool, \
                ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane", initializer=name_os_thread,
                                   initargs=(MODEL,)) as model_pool:
            items = iter(sources)

            def top_up() -> None:
                # keep max_inflight items queued for the decode threads before the model takes the next batch:
                # submitting only between batches left them idle during each forward pass (a tenth of the
                # ingest thread's time was spent waiting for decodes that could have run meanwhile)
                while len(inflight) < max_inflight:
                    src = next(items, None)
                    if src is None:
                        return
                    if isinstance(src, SourceError):
                        batch.failed.append(Failed(src.path, src.code, src.message))
                        if len(batch.duplicates) + len(batch.failed) >= 4 * opts.batch_size:
                            flush()  # a source of nothing but errors is recorded as it goes, not held
                    else:
                        inflight.append(pool.submit(reader, src))

            try:
                top_up()
                while inflight:
                    take(inflight.popleft().result())
                    top_up()
                flush()
                while embedding:
                    write_oldest()
            finally:
                for fut in inflight:
                    fut.cancel()
        writer.counts.decode_cpu_s = round(reader.decode_cpu_s, 3)
        store.catalog.finish_run(run_id, writer.counts)
        return writer.counts
