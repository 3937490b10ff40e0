"""The one settings object. ``Settings`` is a frozen dataclass; each field is declared once with its
default, its help and its group (``setting(...)``), and everything else is derived from the fields: the
CLI options (each command takes the groups it uses), the ``FLAGMATCH_*`` environment variables and the
README table. Precedence: CLI flag → environment → default."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

# The groups, in the order the CLI help and the README show them.
GROUPS: dict[str, str] = {
    "store": "Store",
    "model": "Model",
    "ingest": "Ingest",
    "decode": "Decoding limits",
    "index": "Vector index",
    "search": "Search",
    "server": "Server",
    "hma": "HMA routes, URL fetching and exchanges",
    "heads": "Learning from verdicts",
    "cluster": "Clustering",
    "ops": "Operations",
}


def setting(default: Any, help: str, group: str) -> Any:
    """A settings field: its default, the help shown by the CLI and the README, and its group."""
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}")
    return field(default=default, metadata={"help": help, "group": group})


def parse_bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def parse_tokens(v: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(v, tuple):
        return v
    return tuple(t.strip() for t in str(v).split(",") if t.strip())


@dataclass(frozen=True)
class Settings:
    # -- store
    home: str = setting("./flagmatch-data", "data directory: catalog, raw vectors, indexes, thumbnails", "store")
    catalog_url: str = setting("", "SQLAlchemy URL of the catalog (default: SQLite file in the home directory)",
                               "store")
    # -- model
    model: str = setting("", "model: a hub id, a local directory (config.json + model.safetensors), a .safetensors "
                         "file (with --arch), an .onnx file, or the preset 'opennsfw' (default: the model the "
                         "store was built with; for a new store Marqo/nsfw-image-detection-384)", "model")
    arch: str = setting("", "timm architecture name, for a bare .safetensors file", "model")
    precision: str = setting("auto", "timm inference precision: auto (bf16 where the CPU has it and it agrees with "
                             "fp32 to cosine >= 0.999), fp32 or bf16", "model")
    torch_threads: int = setting(0, "torch intra-op threads (0: one per core)", "model")
    # -- ingest
    flag_threshold: float = setting(0.8, "images with P(unsafe) at or above this are flagged (source 'model')",
                                    "ingest")
    batch_size: int = setting(32, "images the model holds at once during ingest (split evenly across "
                              "--model-lanes)", "ingest")
    decode_workers: int = setting(2, "threads that decode images while the model runs", "ingest")
    model_lanes: int = setting(0, "batches the model runs at once during ingest, one thread each, batch_size ÷ "
                               "lanes images a batch (0: one per core; 1: one batch on every core)", "ingest")
    ray: str = setting("", "ingest on a Ray cluster: its address, or 'auto' (the cluster started on this host, else "
                       "a local one); empty: on this machine", "ingest")
    ray_actors: int = setting(0, "model actors on the Ray cluster (0: one per --ray-actor-cpus CPUs)", "ingest")
    ray_actor_cpus: int = setting(2, "CPUs (model threads) each Ray model actor takes", "ingest")
    ray_chunk: int = setting(4096, "source items the driver hands to Ray at a time (bounds its memory)", "ingest")
    decode_nice: int = setting(19, "niceness of ingest's decode threads (0-19): above the model's, so decoding runs "
                               "in the model's gaps instead of stalling its parallel operators", "ingest")
    thumb_size: int = setting(256, "long side of stored thumbnails, in pixels", "ingest")
    # -- decoding limits (ingest and uploads alike)
    max_pixels: int = setting(100_000_000, "largest image decoded, in pixels (a JPEG's header may be up to 64× "
                              "larger: it is decoded at 1/8 scale)", "decode")
    max_stream_pixels: int = setting(500_000_000, "largest PNG or WebP streamed through libvips, in pixels: such a "
                                     "file is shrunk as it is read, so max_pixels applies to the shrunk image and "
                                     "this bounds the decoding time", "decode")
    max_decode_bytes: int = setting(1 << 30, "largest estimated memory of one image's decode, in bytes (from the "
                                    "header, before any pixel is allocated)", "decode")
    decode_timeout: float = setting(15.0, "most CPU time one image may take to decode, in seconds (the decoding "
                                    "thread's own CPU: a busy machine does not turn a slow file into a refused one)",
                                    "decode")
    decode_wall_timeout: float = setting(120.0, "longest wall-clock time one image may take to decode, in seconds, "
                                         "however busy the machine", "decode")
    max_file_bytes: int = setting(200 * 1024 * 1024, "largest image file accepted, in bytes", "decode")
    # -- video (ingest and uploads alike; indexer.media.video): refused from the headers before any frame
    video_max_duration: float = setting(3 * 3600.0, "longest video taken, in seconds (from its headers)", "decode")
    video_max_side: int = setting(8192, "widest or tallest video frame taken, in pixels", "decode")
    video_max_frames: int = setting(1_000_000, "most frames a video may state or decode", "decode")
    video_wall_timeout: float = setting(300.0, "longest wall-clock time one video may take to decode, in seconds",
                                        "decode")
    video_every: float = setting(5.0, "a video keeps a keyframe at least this often, in seconds, besides its scene "
                                 "cuts", "decode")
    video_max_keyframes: int = setting(64, "most keyframes kept of one video", "decode")
    video_scene_cut: float = setting(0.12, "how different a frame must be from the last one looked at to start a "
                                     "scene (mean absolute grey difference, 0-1)", "decode")
    query_views: tuple[str, ...] = setting(("trimmed", "content", "cells"), "extra views of an uploaded query "
                                           "searched beside the whole image where they apply: trimmed (uniform "
                                           "borders cut), content (the picture inside a screenshot-like frame), cells "
                                           "(each picture of a collage or grid, or a picture pasted over the upload: an "
                                           "inset), mirror (comma-separated; empty: the whole image only)", "decode")
    query_grid_below: float = setting(0.6, "an upload whose best similarity over its views is below this is searched "
                                      "again by its quadrants and centre (pictures inside pictures without "
                                      "gutters; measured: 9 % of plain uploads pay for it at 0.6, 24 % at 0.75); "
                                      "-1: never", "search")
    verify_hits: bool = setting(True, "check an upload's hits by local features (ORB keypoints + RANSAC) from the "
                                "top until one shows the same picture, and put that one first", "server")
    region_vectors: bool = setting(True, "flagged images are also searched by 9 windows of their thumbnail (a heavy "
                                   "crop or a collage's cell meets the window that holds it), once `flagmatch regions` has "
                                   "made them", "search")
    verify_depth: int = setting(5, "hits an upload's verification checks at most, from the top (the cost of an "
                                "upload that copies nothing grows with it: each check ~1.5 ms)", "server")
    # -- vector index
    exact_threshold: int = setting(50_000, "below this many vectors the index is exact; above, IVF-PQ", "index")
    nlist: int = setting(0, "IVF lists (0: chosen from N)", "index")
    pq_m: int = setting(0, "PQ sub-quantizers (0: chosen from the dimension)", "index")
    opq: str = setting("auto", "OPQ rotation before PQ: auto, on or off", "index")
    nprobe: int = setting(0, "IVF lists visited per query (0: tuned at build to --target-recall)", "search")
    rerank: int = setting(0, "candidates re-ranked exactly from the raw vectors, as a multiple of k (0: tuned "
                          "at build to --target-recall)", "search")
    target_recall: float = setting(0.98, "recall@10 an IVF-PQ index is tuned to at build, measured against "
                                   "exact search on held-out stored vectors", "index")
    tune_ms: float = setting(2.0, "single-query latency the recall tuner warns above, in ms", "index")
    space_dim: int = setting(256, "dimensions of the matching space fitted on the store (learned whitening from "
                             "synthetic re-uploads when the model is at hand, else PCA-whitening; 0: search the "
                             "raw features)", "index")
    space_power: float = setting(0.25, "matching space fitted without the model (PCA-whitening): each principal "
                                 "component is divided by its eigenvalue to this power", "index")
    space_min_vectors: int = setting(2000, "below this many stored vectors the matching space is the identity",
                                     "index")
    space_head: bool = setting(False, "train a copy-detection head (SSCD-style MLP on the model features) on the "
                               "hard views when the matching space is fitted with the model (reindex, ingest); off by "
                               "default: on open_nsfw it lost R@10 on five of fifteen edits against learned whitening "
                               "over the same views (docs/matching.md)", "index")
    space_head_images: int = setting(3000, "stored images put through the edits evaders use (hard views: embedded "
                                     "once and cached) for the learned whitening and the copy-detection head; 0: the "
                                     "re-upload pairs alone", "index")
    space_head_views: int = setting(1, "hard views made of each of those images", "index")
    shard_rows: int = setting(250_000, "vectors per shard when reindex --ray or --on-disk fills an IVF-PQ index in "
                              "shards", "index")
    index_save_seconds: float = setting(30.0, "during ingest, save the indexes at most this often", "index")
    use_gpu: str = setting("auto", "FAISS on the GPU: auto (when faiss-gpu sees one), on or off", "search")
    pdq_threshold: int = setting(31, "PDQ distance (bits of 256) within which a stored image matches a query's "
                                 "hash; each bank has its own threshold", "search")
    pdq_index: str = setting("auto", "PDQ binary index: flat (exhaustive, ~41 bytes a hash in each worker), mih "
                             "(multi-index, ~104 bytes a hash in one file the workers share) or auto (flat below "
                             "--pdq-mih-min)", "index")
    pdq_mih_min: int = setting(1_000_000, "with pdq_index auto, hashes from which the multi-index is used "
                               "(measured: 2x faster than flat at 1M, 3x at 10M; benchmarks/hashes.py)", "index")
    # -- server
    host: str = setting("127.0.0.1", "address `serve` listens on", "server")
    port: int = setting(8080, "port `serve` listens on", "server")
    workers: int = setting(1, "server worker processes (each loads the model once)", "server")
    threads: int = setting(4, "request threads per server worker", "server")
    serve_lanes: int = setting(0, "batches a server worker's model runs at once under concurrent uploads, one "
                               "thread each (0: one per core); a batch alone on the machine still runs on every "
                               "core. 1: every batch on every core", "server")
    api_tokens: tuple[str, ...] = setting((), "comma-separated bearer tokens (name:token or token) for the API "
                                          "and viewer", "server")
    open_reads: bool = setting(False, "allow reads without a token (writes always need one)", "server")
    metrics: bool = setting(True, "count requests, stages and model batches for GET /metrics (off: /metrics is "
                            "404 and nothing is counted)", "server")
    metrics_open: bool = setting(False, "serve /metrics without a token to clients on loopback (a scraper on the "
                                 "same host); otherwise it needs the API token like every read", "server")
    max_upload_bytes: int = setting(32 * 1024 * 1024, "largest request body accepted by the API", "server")
    admission_bytes: int = setting(2 << 30, "per worker: decoding memory in flight across requests, in bytes; "
                                   "beyond it uploads wait, then get 503 with Retry-After", "server")
    admission_wait: float = setting(2.0, "how long an upload waits for decoding memory before a 503, in seconds",
                                    "server")
    request_nice: int = setting(0, "niceness of the request threads and of uploads' decoding (0-19). 19 on a host "
                                "dedicated to the API puts the model first: uploads keep it busy while lookups by "
                                "id wait; 0 (the default) treats them alike and keeps the server responsive when "
                                "other jobs share the host (niceness is machine-wide)", "server")
    hma_open: bool = setting(False, "the HMA routes (/h /m /c) answer without a token, as Open Media Match does "
                             "(for a deployment whose network limits who reaches them); off: reads follow "
                             "open_reads and writes need a token", "hma")
    hma_signal_types: tuple[str, ...] = setting(("pdq", "video_md5", "vpdq"), "the signal types the HMA routes "
                                                "offer (comma-separated): pdq, video_md5, vpdq (vpdq where the video "
                                                "extra's vpdq is installed); Open Media Match's own default is "
                                                "pdq,video_md5", "hma")
    fetch_allow: tuple[str, ...] = setting((), "URL fetching for HMA's url= parameters, off while empty: hosts, "
                                           "*.subdomains, URL prefixes or addresses/networks it may fetch from "
                                           "(internal addresses only when named)", "hma")
    fetch_max_bytes: int = setting(32 * 1024 * 1024, "largest body a URL fetch reads", "hma")
    fetch_timeout: float = setting(15.0, "seconds a URL fetch may take in all, redirects included", "hma")
    exchange_apis: tuple[str, ...] = setting((), "the exchange APIs offered (threatexchange names: sample, "
                                             "local_file, fb_threatexchange, ncmec, stop_ncii, tat); empty: all",
                                             "hma")
    review_labels: tuple[str, ...] = setting(
        ("adult_nudity", "sexual_activity", "violence", "gore", "hate_symbols", "self_harm", "spam", "other"),
        "the policy labels a reviewer picks from (comma-separated)", "server")
    review_reasons: tuple[str, ...] = setting(
        ("matches_policy", "false_positive", "not_actionable", "duplicate_of_reviewed", "other"),
        "the reason codes a cluster decision is given with (comma-separated)", "server")
    blur_strength: str = setting("strong", "how blurred the viewer's thumbnails are by default: light (shapes of "
                                 "icons stay readable), medium or strong; each moderator can change it", "server")
    session_idle: float = setting(120.0, "a viewer session ends after this many minutes without a request", "server")
    session_max: float = setting(12.0, "a viewer session ends this many hours after sign-in, in use or not", "server")
    rate_limit: str = setting("", "per token (or client address) request limit, e.g. '600/minute;20/second' "
                              "(empty: none); over it, 429 with Retry-After", "server")
    secret_key: str = setting("", "key that signs viewer sessions (default: generated, kept in the home directory)",
                              "server")
    # -- heads
    target_precision: float = setting(0.95, "precision a head's threshold is chosen for, on the newest verdicts "
                                      "(held out)", "heads")
    head_test_share: float = setting(0.2, "share of the newest verdicts held out to choose and check a head's "
                                     "threshold", "heads")
    queue_similarity: float = setting(0.85, "when a reviewer flags an image, unflagged images at least this alike "
                                      "(cosine in the matching space) join the review queue", "heads")
    # -- clustering
    cluster_min_size: int = setting(0, "HDBSCAN min_cluster_size (0: chosen from N)", "cluster")
    cluster_dims: int = setting(8, "UMAP dimensions of the clustering space", "cluster")
    cluster_join: float = setting(0.0, "near-duplicates (nearest neighbours with cosine in the matching space at or "
                                  "above this, see cluster_verify) form one cluster before HDBSCAN groups the rest "
                                  "(0: off; off by default: on open_nsfw features it merged and split more families "
                                  "than it joined)", "cluster")
    cluster_verify: bool = setting(True, "a near-duplicate pair of the join must also show one picture by local "
                                   "features (ORB + RANSAC on the thumbnails); off: similarity alone, mutual "
                                   "nearest neighbours only", "cluster")
    cluster_families: bool = setting(True, "copy families: pairs among each flagged image's 10 nearest that local "
                                     "features show as one picture (frames, caption bands and padding discounted, "
                                     "mirrors tried) pull strays into their copies' cluster and form families "
                                     "inside each cluster, shown together in the viewer (~16 ms per flagged image "
                                     "on two cores)", "cluster")
    cluster_family_pdq: int = setting(31, "copy families: two flagged images whose PDQ hashes (both of usable "
                                      "quality) are within this many bits are copies without a local-feature check "
                                      "(what verifies greyscale and recompressed clipart); -1: local features "
                                      "only", "cluster")
    cluster_neighbors: int = setting(15, "UMAP n_neighbors", "cluster")
    cluster_epochs: int = setting(0, "UMAP optimisation epochs of the clustering space (0: UMAP's default, 200 "
                                  "above 10k images; 100 is ~1.3x faster but grouped re-upload families worse)",
                                  "cluster")
    cluster_sample: int = setting(50_000, "above this many flagged images, fit on a sample and predict the rest",
                                  "cluster")
    cluster_backend: str = setting("hdbscan", "HDBSCAN implementation: hdbscan (compiled ahead: no JIT), "
                                   "fast_hdbscan (numba: ~40 s of compiling on a machine's first run, then the "
                                   "fastest) or sklearn", "cluster")
    seed: int = setting(42, "random seed of the clustering job", "cluster")
    # -- operations
    log_format: str = setting("text", "log lines as text, or one JSON object per line (json): every request's "
                              "request id, actor, route, status, duration and stage timings", "ops")
    access_log: bool = setting(True, "`serve` logs one line per request (request id, actor, route, status, "
                               "duration, stages)", "ops")
    metrics_push: str = setting("", "the CLI's long jobs (ingest, cluster, reindex, backup, check, hashes backfill) "
                                "push their figures to this Prometheus Pushgateway URL when they end", "ops")
    metrics_textfile_dir: str = setting("", "…and/or write them as flagmatch_<job>.prom into this folder, for "
                                        "node_exporter's textfile collector", "ops")
    retain_unflagged_thumbs_days: int = setting(0, "retention: thumbnails of images unflagged this many days ago "
                                                "(and not flagged again) are removed; 0 keeps them", "ops")
    retain_audit_days: int = setting(0, "retention: audit rows older than this many days are removed (at least "
                                     "365; 0 keeps them all)", "ops")
    retain_sessions_days: int = setting(30, "retention: viewer sessions ended or idle this many days are forgotten",
                                        "ops")
    health_min_free_gb: float = setting(2.0, "health: free disk under the home below this (GiB) degrades /readyz, "
                                        "/status and `flagmatch status`", "ops")
    health_max_index_lag: float = setting(900.0, "health: an index behind the catalog for longer than this "
                                          "(seconds since the first image it lacks) degrades the status", "ops")
    health_max_replica_lag: float = setting(30.0, "health: a PostgreSQL standby replaying this many seconds "
                                            "behind degrades the status", "ops")

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
        """CLI overrides (None means 'not given') win over FLAGMATCH_* variables, which win over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for s in SETTINGS:
            raw = (overrides or {}).get(s.name)
            if raw is None and s.env in environ:
                raw = environ[s.env]
            if raw is None:
                continue
            try:
                values[s.name] = s.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"setting {s.name} ({s.env}): {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def resolved_catalog_url(self) -> str:
        """``catalog_url`` when set; else the catalog the home directory was created with (a home on a
        database records its URL in ``catalog.url``, so every host and command pointed at the home finds
        it); else the SQLite file in the home directory."""
        if self.catalog_url:
            return self.catalog_url
        from indexer.storage.store import CATALOG_URL_FILE
        recorded = self.home_path / CATALOG_URL_FILE
        try:
            url = recorded.read_text().strip()
        except OSError:
            url = ""
        return url or f"sqlite:///{self.home_path / 'catalog.sqlite'}"




@dataclass(frozen=True)
class Setting:
    """One field of ``Settings`` as the CLI, the environment and the README see it."""

    name: str
    type: type
    default: Any
    help: str
    group: str

    @property
    def env(self) -> str:
        return "FLAGMATCH_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def parse(self) -> Callable[[Any], Any]:
        if self.type is bool:
            return parse_bool
        if self.type is tuple:
            return parse_tokens
        return self.type


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(Settings)
    out = []
    for f in dataclasses.fields(Settings):
        kind = typing.get_origin(hints[f.name]) or hints[f.name]
        out.append(Setting(f.name, kind, f.default, f.metadata["help"], f.metadata["group"]))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _settings()


def settings_table() -> str:
    """The README's settings table, generated from the fields of Settings."""
    rows = ["| setting | env | default | what it does |", "|---|---|---|---|"]
    for group, title in GROUPS.items():
        for s in SETTINGS:
            if s.group != group:
                continue
            default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
            rows.append(f"| `{s.flag}` | `{s.env}` | `{default}` | {title}: {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m flagmatch.settings: the README's settings table
    print(settings_table())
