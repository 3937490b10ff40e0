"""Builds the parts from a Settings object; the CLI and the server factory both go through here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from flagmatch.settings import Settings
from indexer.errors import InvalidInputError
from indexer.ingest.pipeline import IngestOptions, Progress, ingest
from indexer.ingest.sources import Source
from indexer.media.decode import DecodeLimits
from indexer.media.video import VideoLimits
from indexer.models.embed import DEFAULT_MODEL, Embedder, ModelInfo, load_model
from indexer.storage.catalog import IngestCounts
from indexer.storage.store import Store
from indexer.vectors.space import SpaceConfig
from indexer.vectors.space import for_checkpoint as space_for

if TYPE_CHECKING:
    from clustering.job import ClusterParams
    from indexer.vectors.faiss_index import IndexConfig
    from indexer.vectors.vector_index import VectorIndex
    from search.hashmatch import HashMatcher
    from search.service import SearchService


def open_store(settings: Settings) -> Store:
    return Store(settings.home_path, settings.resolved_catalog_url)


def store_catalog_url(settings: Settings) -> str:
    """The catalog URL other processes (Ray workers) use for this store."""
    return settings.resolved_catalog_url


def model_ref(settings: Settings, store: Store | None = None) -> str:
    """The model to load: --model when given; otherwise the one the store was built with; for a new
    store, the default model."""
    if settings.model:
        return settings.model
    meta = store.catalog.model_meta() if store is not None else {}
    if meta.get("model_source"):
        return meta["model_source"]
    if meta.get("model_id", "").startswith("opennsfw@"):
        return "opennsfw"
    return DEFAULT_MODEL


def load_embedder(settings: Settings, store: Store | None = None) -> Embedder:
    """The model for ``settings``, checked against the store's when a store is given."""
    embedder = load_model(model_ref(settings, store), arch=settings.arch, precision=settings.precision,
                          threads=settings.torch_threads)
    if store is not None:
        store.check_model(embedder.info.model_id)
    return embedder


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(max_pixels=settings.max_pixels, max_bytes=settings.max_decode_bytes,
                        timeout_s=settings.decode_timeout, wall_s=settings.decode_wall_timeout,
                        max_stream_pixels=settings.max_stream_pixels)


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(max_bytes=settings.max_file_bytes, max_duration_s=settings.video_max_duration,
                       max_side=settings.video_max_side, max_frames=settings.video_max_frames,
                       wall_s=settings.video_wall_timeout, every_s=settings.video_every,
                       max_keyframes=settings.video_max_keyframes, scene_cut=settings.video_scene_cut)


def ingest_options(settings: Settings) -> IngestOptions:
    return IngestOptions(flag_threshold=settings.flag_threshold, batch_size=settings.batch_size,
                         decode_workers=settings.decode_workers, decode_nice=settings.decode_nice,
                         model_lanes=settings.model_lanes,
                         limits=decode_limits(settings),
                         max_file_bytes=settings.max_file_bytes, thumb_size=settings.thumb_size,
                         video=video_limits(settings))


def index_config(settings: Settings) -> IndexConfig:
    from indexer.vectors.faiss_index import IndexConfig
    return IndexConfig(exact_threshold=settings.exact_threshold, nlist=settings.nlist, pq_m=settings.pq_m,
                       opq=settings.opq, nprobe=settings.nprobe, rerank=settings.rerank,
                       target_recall=settings.target_recall, tune_ms=settings.tune_ms,
                       use_gpu=settings.use_gpu, save_seconds=settings.index_save_seconds,
                       shard_rows=settings.shard_rows)


def space_config(settings: Settings) -> SpaceConfig:
    return SpaceConfig(dim=settings.space_dim, power=settings.space_power, min_vectors=settings.space_min_vectors,
                       head=settings.space_head, head_images=settings.space_head_images,
                       head_views=settings.space_head_views)


def open_index(store: Store, settings: Settings, embedder: Embedder | None = None, *,
               for_rebuild: bool = False) -> VectorIndex:
    """The vector indexes of a store (bound to its model), caught up with the catalog. With the model at
    hand a matching space fitted here is learned from synthetic re-uploads of stored thumbnails, and its
    copy-detection head from hard edits of them.
    ``for_rebuild``: the caller rebuilds next, so opening does not refit or retrain first."""
    from indexer.vectors.space import hard_views, reupload_pairs
    from indexer.vectors.vector_index import VectorIndex
    pairs = views = None
    if embedder is not None:
        model = embedder

        def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
            return reupload_pairs(store, model, n)

        def views(n: int) -> tuple[np.ndarray, np.ndarray]:
            return hard_views(store, model, n, per_image=settings.space_head_views)
    return VectorIndex(store, index_config(settings), space_config(settings), pairs=pairs, views=views,
                       auto_rebuild=not for_rebuild)


def search_service(settings: Settings, store: Store, index: VectorIndex, embedder: Embedder | None) -> SearchService:
    """The search service over built parts, with the settings' decode limits, query views, the
    clustering job's per-image facts, the hash matcher and the active heads."""
    from indexer.media.local import FeatureCache, thumbnail_grey
    from indexer.review.heads import ActiveHeads
    from indexer.storage.clusters import ClusterStore
    from search.admission import Admission
    from search.service import SearchService
    return SearchService(store, index, embedder, limits=decode_limits(settings),
                         admission=Admission(settings.admission_bytes, settings.admission_wait),
                         cluster_lookup=ClusterStore(store).lookup, views=settings.query_views,
                         hashes=hash_matcher(settings, store), heads=ActiveHeads(store),
                         decode_nice=settings.request_nice,
                         local=FeatureCache(thumbnail_grey(store.thumbs_dir)) if settings.verify_hits else None,
                         grid_below=settings.query_grid_below, video_limits=video_limits(settings),
                         verify_depth=settings.verify_depth, regions=settings.region_vectors)


def hash_matcher(settings: Settings, store: Store) -> HashMatcher:
    """The PDQ indexes (banks' and images') and bank lookups, with the settings' threshold and structure."""
    from search.hashmatch import HashMatcher
    if settings.pdq_index not in ("auto", "flat", "mih"):
        raise InvalidInputError(f"pdq_index must be auto, flat or mih, not {settings.pdq_index!r}")
    if not 0 <= settings.pdq_threshold <= 64:
        raise InvalidInputError(f"pdq_threshold must be 0–64 bits, not {settings.pdq_threshold}")
    return HashMatcher(store, image_threshold=settings.pdq_threshold, index_kind=settings.pdq_index,
                       mih_min=settings.pdq_mih_min)


def index_stats(store: Store, settings: Settings) -> dict[str, str]:
    """What the saved indexes cover and the space they search in, from their checkpoints (without
    loading them)."""
    out: dict[str, str] = {}
    for scope in ("flagged", "all"):
        cp = store.catalog.checkpoint(scope)
        if cp is None:
            out[scope] = "not built"
            continue
        p = cp.params
        recall = p.get("recall")
        tuned = f", nprobe {p.get('nprobe')}, re-rank {p.get('rerank')}×" if p.get("kind") == "ivfpq" else ""
        out[scope] = (f"{p.get('kind')} {cp.ntotal} vectors ({p.get('dim')}-d), covers image {cp.image_id} / "
                      f"flag event {cp.flag_event_id}, generation {cp.generation}"
                      + (f", recall@10 {recall:.3f}" if isinstance(recall, float) else "") + tuned)
    cp = store.catalog.checkpoint("all")
    version = int(cp.params.get("space_version", 0)) if cp else 0
    if cp is not None and version:
        try:
            sp = space_for(store.index_dir, cp, int(store.catalog.model_meta().get("dim", 0)))
            out["space"] = sp.summary()
        except ValueError as exc:
            out["space"] = f"version {version}: unreadable ({exc}); the next open refits it"
    elif settings.space_dim > 0:
        out["space"] = (f"identity (raw features): a matching space is fitted once the store holds "
                        f"{settings.space_min_vectors} images")
    else:
        out["space"] = "identity (raw features: space_dim is 0)"
    return out


def cluster_params(settings: Settings) -> ClusterParams:
    from clustering.job import ClusterParams
    if not -1 <= settings.cluster_family_pdq <= 64:
        raise InvalidInputError(f"cluster_family_pdq must be 0–64 bits or -1 (off), not {settings.cluster_family_pdq}")
    return ClusterParams(min_cluster_size=settings.cluster_min_size, dims=settings.cluster_dims,
                         neighbors=settings.cluster_neighbors, sample=settings.cluster_sample,
                         backend=settings.cluster_backend, seed=settings.seed,
                         join=settings.cluster_join, epochs=settings.cluster_epochs, verify=settings.cluster_verify,
                         families=settings.cluster_families, family_pdq=settings.cluster_family_pdq)


@dataclass(frozen=True)
class IngestResult:
    counts: IngestCounts
    model: ModelInfo


def ingest_into(settings: Settings, sources: Iterable[Source], *, store: Store | None = None,
                embedder: Embedder | None = None, progress: Progress | None = None,
                options: IngestOptions | None = None) -> IngestResult:
    """The whole ingest job: open the store, load its model (or ``settings.model`` for a new store),
    bind it, open the indexes, ingest (new images reach the ``all`` index as they are written, flags
    through the catalog) and save the indexes — periodically and at the end. The CLI, the benchmarks
    and the tests all call this."""
    store = store or open_store(settings)
    embedder = embedder or load_embedder(settings, store)
    info = embedder.info
    store.bind_model(info.model_id, info.dim, info.preprocessing, info.source)
    index = open_index(store, settings, embedder)
    after: Callable[[], None] = index.maybe_save
    from indexer.review.heads import ActiveHeads
    opts = options or ingest_options(settings)
    if settings.ray:  # reading, decoding and the model on a Ray cluster; the writes stay here
        from indexer.ingest.ray import RayOptions, ray_ingest
        counts = ray_ingest(store, store_catalog_url(settings), embedder,
                            (model_ref(settings, store), settings.arch, settings.precision), sources, opts,
                            RayOptions(settings.ray, actors=settings.ray_actors, actor_cpus=settings.ray_actor_cpus,
                                       chunk=settings.ray_chunk),
                            index=index, progress=progress, heads=ActiveHeads(store).get())
    else:
        counts = ingest(store, embedder, sources, opts, index=index, progress=progress, after_batch=after,
                        heads=ActiveHeads(store).get())
    index.save()
    hash_matcher(settings, store).image_index.save()
    return IngestResult(counts, info)
