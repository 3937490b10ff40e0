"""Builds the parts from a Settings object; the CLI and the server factory both go through here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from flagmatch.settings import DEFAULT_MODEL, Settings
from indexer.catalog import IngestCounts
from indexer.decode import DecodeLimits
from indexer.embed import Embedder, ModelInfo, load_model
from indexer.ingest import IngestOptions, Progress, ingest
from indexer.sources import Source
from indexer.store import Store

if TYPE_CHECKING:
    from clustering.job import ClusterParams
    from indexer.vector_index import IndexConfig, VectorIndex


def open_store(settings: Settings) -> Store:
    return Store(settings.home_path, settings.resolved_catalog_url)


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
                        timeout_s=settings.decode_timeout)


def ingest_options(settings: Settings) -> IngestOptions:
    return IngestOptions(flag_threshold=settings.flag_threshold, batch_size=settings.batch_size,
                         decode_workers=settings.decode_workers, limits=decode_limits(settings),
                         max_file_bytes=settings.max_file_bytes, thumb_size=settings.thumb_size)


def index_config(settings: Settings) -> IndexConfig:
    from indexer.vector_index import IndexConfig
    return IndexConfig(exact_threshold=settings.exact_threshold, nlist=settings.nlist, pq_m=settings.pq_m,
                       opq=settings.opq, nprobe=settings.nprobe, rerank=settings.rerank,
                       use_gpu=settings.use_gpu, save_seconds=settings.index_save_seconds)


def open_index(store: Store, settings: Settings) -> VectorIndex:
    """The vector indexes of a store (bound to its model), caught up with the catalog."""
    from indexer.vector_index import VectorIndex
    return VectorIndex(store, index_config(settings))


def index_stats(store: Store) -> dict:
    """What the saved indexes cover, from their checkpoints (without loading them)."""
    out = {}
    for scope in ("flagged", "all"):
        cp = store.catalog.checkpoint(scope)
        out[scope] = "not built" if cp is None else (
            f"{cp.params.get('kind')} {cp.ntotal} vectors, covers image {cp.image_id} / flag event "
            f"{cp.flag_event_id}, generation {cp.generation}")
    return out


def cluster_params(settings: Settings) -> ClusterParams:
    from clustering.job import ClusterParams
    return ClusterParams(min_cluster_size=settings.cluster_min_size, dims=settings.cluster_dims,
                         neighbors=settings.cluster_neighbors, sample=settings.cluster_sample,
                         backend=settings.cluster_backend, seed=settings.seed)


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
    index = open_index(store, settings)
    after: Callable[[], None] = index.maybe_save
    counts = ingest(store, embedder, sources, options or ingest_options(settings), index=index,
                    progress=progress, after_batch=after)
    index.save()
    return IngestResult(counts, info)
