"""Ingest and sharded index builds on a Ray cluster, for corpora one machine cannot embed.

Ray Data runs the pipeline: the source items of one chunk → ``map_batches(prepare)`` as tasks on any node
(read the bytes, sha256 and MD5, look the content up in the catalog, decode what is new: model pixels,
thumbnail, PDQ) → ``map_batches(Embed)`` on an actor pool, one model per actor → the driver, which writes
each batch exactly as a local ingest does (``indexer.ingest.pipeline.Writer``: the run's vector segment, thumbnails,
one catalog transaction, the index). Content already in the catalog never reaches a model; a worker that
dies has its tasks retried and its actors restarted by Ray; a driver that dies leaves committed batches
committed, so running the same command again resumes where it stopped.

The driver holds one chunk of source items at a time (``chunk`` paths, not images) and Ray's streaming
executor bounds what is in flight between the stages, so the driver's memory does not grow with the
corpus. Workers need the same flagmatch installed and the files (and the catalog) reachable at the same
paths: shared storage on a real cluster, the local disk on a one-host cluster."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from indexer.storage.catalog import Catalog, IngestCounts
from indexer.media.decode import DecodedImage, DecodeLimits, InputSpec, decode
from indexer.models.embed import Embedder
from indexer.errors import DecodeError, FlagmatchError
from indexer.media.hashes import Pdq, md5_of
from indexer.media.video import is_video
from indexer.review.heads import Head
from indexer.ingest.pipeline import (Batch, Decoded, Duplicate, EmbeddedBatch, Failed, IndexSink, IngestOptions,
                            Progress, Writer, deleted_failure, read_source)
from indexer.vectors.sharded import ShardPlan, ShardResult, ShardRunner, build_shard
from indexer.ingest.sources import Source, SourceError, SourceItem
from indexer.vectors.space import MatchingSpace
from indexer.storage.store import Store
from indexer.storage.vectors import VectorStore


# Logical CPUs a decode task asks for, and what a model actor leaves free on its node: an actor with t
# threads asks for t − DECODE_CPUS, so every node that can hold an actor can also run a decode task beside
# it. Sized exactly (t CPUs an actor, 1 a task), a cluster that lost a node could be left with actors on
# every CPU and decode tasks that never get placed — the run would wait forever (seen with a 2 + 1 CPU
# cluster losing its 1-CPU node). Different requests also keep Ray from fusing decoding into the actors'
# processes, where each actor would decode and embed in turn, its model idle while it decodes.
DECODE_CPUS = 0.25


@dataclass(frozen=True)
class RayOptions:
    address: str              # a cluster's address, or "auto": the running local cluster, else a new one
    actors: int = 0           # model actors (0: one per `actor_cpus` CPUs, leaving CPUs for decoding)
    actor_cpus: int = 2       # CPUs (and model threads) per model actor
    chunk: int = 4096         # source items the driver hands to Ray at a time


def connect(address: str) -> None:
    """Join the cluster at ``address`` (``auto``: the one started on this host with ``ray start``, or a
    new local one when there is none). A cluster that cannot be reached is a clear error."""
    import logging

    import ray
    if ray.is_initialized():
        return
    logging.getLogger("ray").setLevel(logging.WARNING)  # the progress bar and summary are ours
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False, "include_dashboard": False}
    try:
        if address == "auto":
            try:
                ray.init(address="auto", **kwargs)
            except ConnectionError:
                ray.init(**kwargs)  # no cluster running here: a local one for this process
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:
        raise FlagmatchError(f"cannot join the Ray cluster at {address!r}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}", code="ray_unavailable") from None


# ------------------------------------------------------------------ the stages (run on the workers)

_CATALOGS: dict[str, Catalog] = {}


def _catalog(url: str) -> Catalog:
    if url not in _CATALOGS:  # one engine per worker process
        _CATALOGS[url] = Catalog(url)
    return _CATALOGS[url]


def prepare(batch: dict[str, np.ndarray], *, catalog_url: str, spec: InputSpec, limits: DecodeLimits,
            thumb_size: int, max_file_bytes: int) -> dict[str, np.ndarray]:
    """Read, hash, look up and decode one batch of paths. Every row comes back with its ``kind``: ``new``
    (decoded: pixels, thumbnail, PDQ …), ``known`` (its id in ``known_id``), ``deleted`` or ``failed``."""
    n = len(batch["path"])
    out: dict[str, list[Any]] = {k: [] for k in ("i", "kind", "sha256", "size", "md5", "known_id", "code",
                                                 "message", "format", "width", "height", "frames", "thumbnail",
                                                 "pdq", "pdq_quality", "decoded_w", "decoded_h")}
    pixels = np.zeros((n, spec.size, spec.size, 3), np.uint8)
    datas: list[bytes | None] = []
    for k in range(n):
        read = read_source(str(batch["path"][k]), max_file_bytes)
        data = None if isinstance(read, Failed) else read
        code, msg = (read.code, read.message) if isinstance(read, Failed) else ("", "")
        datas.append(data)
        out["i"].append(int(batch["i"][k]))
        out["sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else "")
        out["size"].append(len(data) if data is not None else 0)
        out["code"].append(code)
        out["message"].append(msg)
    shas = [s for s in out["sha256"] if s]
    known = _catalog(catalog_url).lookup_shas(shas) if shas else {}
    first_here: dict[str, int] = {}
    for k in range(n):
        sha, data = out["sha256"][k], datas[k]
        fields = {"md5": "", "known_id": 0, "format": "", "width": 0, "height": 0, "frames": 0, "thumbnail": b"",
                  "pdq": "", "pdq_quality": -1, "decoded_w": 0, "decoded_h": 0}
        if data is None:
            kind = "failed"
        elif sha in known:
            image_id, deleted = known[sha]
            kind = "deleted" if deleted else "known"
            fields["known_id"] = image_id
        elif sha in first_here:  # the same bytes twice in one batch: the model sees them once
            kind = "copy"
            fields["known_id"] = first_here[sha]
        else:
            try:
                if is_video(data):  # a clip is many model rows and keyframe rows: ingested on one machine
                    raise DecodeError("videos are ingested without --ray (flagmatch ingest on one machine takes "
                                      "them; Ray ingest takes images)", code="unsupported_format")
                im = decode(data, spec, limits, thumb_size=thumb_size)
            except DecodeError as exc:
                kind = "failed"
                out["code"][k], out["message"][k] = exc.code, exc.message
            else:
                kind = "new"
                first_here[sha] = out["i"][k]
                pixels[k] = im.pixels
                fields.update(md5=md5_of(data), format=im.format, width=im.width, height=im.height,
                              frames=im.frames, thumbnail=im.thumbnail, decoded_w=im.decoded_size[0],
                              decoded_h=im.decoded_size[1])
                if im.pdq is not None:
                    fields.update(pdq=im.pdq.hash, pdq_quality=im.pdq.quality)
        out["kind"].append(kind)
        for key, value in fields.items():
            out[key].append(value)
    result = {k: np.asarray(v, dtype=object if k in ("thumbnail",) else None) for k, v in out.items()}
    result["pixels"] = pixels
    return result


class Embed:
    """One model per actor: embeds the batch's ``new`` rows, drops every row's pixels."""

    def __init__(self, model: str, arch: str, precision: str, threads: int) -> None:
        from indexer.models.embed import load_model
        self.embedder = load_model(model, arch=arch, precision=precision, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = np.asarray(batch["kind"]) == "new"
        dim = self.embedder.info.dim
        vectors = np.zeros((len(new), dim), np.float32)
        p = np.zeros(len(new), np.float32)
        if new.any():
            v, pn = self.embedder.embed(np.asarray(batch["pixels"])[new])
            vectors[new], p[new] = v, pn
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"], out["p_unsafe"] = vectors, p
        return out


# ------------------------------------------------------------------ the driver

def ray_ingest(store: Store, catalog_url: str, embedder: Embedder, model: tuple[str, str, str],
               sources: Iterable[Source], opts: IngestOptions, ray_opts: RayOptions, *,
               index: IndexSink | None = None, progress: Progress | None = None,
               heads: Sequence[Head] = ()) -> IngestCounts:
    """``indexer.ingest.pipeline.ingest`` with reading, decoding and the model on a Ray cluster. ``embedder`` is
    the driver's copy (it binds the store; the actors load ``model`` = (reference, arch, precision))."""
    import ray
    import ray.data
    connect(ray_opts.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    import logging
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    info = embedder.info
    store.bind_model(info.model_id, info.dim, info.preprocessing, info.source)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    threads = max(1, min(ray_opts.actor_cpus, cpus))
    # one model per GPU where the cluster has GPUs (the actor's torch finds its GPU); else per actor_cpus CPUs
    actors = ray_opts.actors or (gpus if gpus else max(1, cpus // threads))
    with store.writer():
        run_id = store.catalog.start_run(info.model_id, info.backend,
                                         f"{info.precision} ray×{actors}{' GPU' if gpus else ''}")
        writer = Writer(store, info.model_id, opts.flag_threshold, run_id, index, heads)
        items = iter(sources)
        while chunk := list(islice(items, ray_opts.chunk)):
            _ingest_chunk(chunk, writer, catalog_url, info.input, model, opts, actors, threads, progress, gpus > 0)
        store.catalog.finish_run(run_id, writer.counts)
        return writer.counts


def _ingest_chunk(chunk: list[Source], writer: Writer, catalog_url: str, spec: InputSpec,
                  model: tuple[str, str, str], opts: IngestOptions, actors: int, threads: int,
                  progress: Progress | None, on_gpus: bool = False) -> None:
    import ray.data

    early = Batch()
    rows = []
    for i, src in enumerate(chunk):
        if isinstance(src, SourceError):
            early.failed.append(Failed(src.path, src.code, src.message))
        else:
            rows.append({"i": i, "path": src.path})
    if rows:
        ds = (ray.data.from_items(rows)
              .map_batches(prepare, batch_size=16, batch_format="numpy", num_cpus=DECODE_CPUS,
                           fn_kwargs={"catalog_url": catalog_url, "spec": spec, "limits": opts.limits,
                                      "thumb_size": opts.thumb_size, "max_file_bytes": opts.max_file_bytes})
              .map_batches(Embed, batch_size=opts.batch_size, batch_format="numpy",
                           compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                           num_cpus=1 if on_gpus else max(0.5, threads - DECODE_CPUS), num_gpus=1 if on_gpus else 0,
                           max_restarts=-1, max_task_retries=-1,
                           fn_constructor_args=(*model, threads)))
        batches: Iterable[dict[str, np.ndarray]] = ds.iter_batches(batch_size=opts.batch_size, batch_format="numpy")
    else:
        batches = []
    copies = Batch()  # the same bytes again in this chunk: written after every first copy is committed
    pending = early
    for out in batches:
        b, vecs, ps = pending, [], []
        pending = Batch()
        for k in range(len(out["i"])):
            item = chunk[int(out["i"][k])]
            assert isinstance(item, SourceItem)
            kind, sha = str(out["kind"][k]), str(out["sha256"][k])
            if kind == "failed":
                b.failed.append(Failed(item.path, str(out["code"][k]), str(out["message"][k]), sha or None))
            elif kind == "deleted":
                b.failed.append(deleted_failure(item.path, sha, int(out["known_id"][k])))
            elif kind == "known":
                b.duplicates.append(Duplicate(item, sha, int(out["known_id"][k])))
            elif kind == "copy":
                copies.duplicates.append(Duplicate(item, sha, None))
            else:
                pdq = Pdq(str(out["pdq"][k]), int(out["pdq_quality"][k])) if out["pdq"][k] else None
                image = DecodedImage(str(out["format"][k]), int(out["width"][k]), int(out["height"][k]),
                                     int(out["frames"][k]), np.zeros((0, 0, 3), np.uint8), bytes(out["thumbnail"][k]),
                                     (int(out["decoded_w"][k]), int(out["decoded_h"][k])), pdq=pdq)
                b.decoded.append(Decoded(item, sha, int(out["size"][k]), image, str(out["md5"][k])))
                vecs.append(out["vector"][k])
                ps.append(out["p_unsafe"][k])
        vectors = np.asarray(vecs, np.float32).reshape(len(vecs), -1) if vecs else \
            np.zeros((0, int(out["vector"].shape[1])), np.float32)
        _write(writer, EmbeddedBatch(b, vectors, np.asarray(ps, np.float32)), progress)
    pending.failed += copies.failed
    pending.duplicates += copies.duplicates  # their first copies are committed now (or failed: recorded so)
    if pending.failed or pending.duplicates:
        _write(writer, EmbeddedBatch(pending, np.zeros((0, 1), np.float32), np.zeros(0, np.float32)), progress)


def _write(writer: Writer, eb: EmbeddedBatch, progress: Progress | None) -> None:
    writer(eb)
    if progress is not None:
        b = eb.batch
        progress.update(len(b.decoded) + len(b.duplicates) + len(b.failed), errors=writer.counts.failed)


# ------------------------------------------------------------------ sharded index builds

_VECTORS: dict[tuple[str, int], VectorStore] = {}


def _shard_task(trained: bytes, space: MatchingSpace, queries: np.ndarray, query_ids: np.ndarray, ids: np.ndarray,
                path: str, home: str, catalog_url: str, dim: int) -> ShardResult:
    """One shard on a worker: the store's raw vectors read where they are (shared storage, like the catalog)."""
    import faiss
    faiss.omp_set_num_threads(1)  # the task holds one CPU; FAISS would otherwise start a thread per core
    key = (home, dim)
    if key not in _VECTORS:
        _VECTORS[key] = VectorStore(Path(home) / "vectors", dim, _catalog(catalog_url).vector_locations)
    return build_shard(trained, space, queries, query_ids, ids, Path(path), _VECTORS[key])


def shard_runner(address: str, store: Store, catalog_url: str) -> ShardRunner:
    """Shards built as Ray tasks, one CPU each, at least one shard per CPU of the cluster; a task lost with its
    node is retried (a shard file is written whole or rewritten by the retry). The trained index, the space
    and the queries go to the object store once."""
    import ray
    connect(address)
    dim = store.open_vectors().dim
    task = ray.remote(num_cpus=1, max_retries=4)(_shard_task)

    def run(plan: ShardPlan) -> list[ShardResult]:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        shared = [ray.put(x) for x in (plan.trained, plan.space, plan.queries, plan.query_ids)]
        refs = [task.remote(*shared, part, str(plan.folder / f"shard-{k:05d}.faiss"), str(store.home), catalog_url, dim)
                for k, part in enumerate(plan.parts(at_least=cpus))]
        return list(ray.get(refs))
    return run
