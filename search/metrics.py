"""Prometheus metrics on the serving port (``GET /metrics``), with ``prometheus-client`` — the library
Prometheus users expect, whose text exposition its own parser (and Prometheus) reads.

What is counted, per app (each app has a registry of its own, so several apps in one process never share
a series):
- ``flagmatch_http_requests_total{route, method, status}`` and ``flagmatch_http_request_seconds{route,
  method}`` (a histogram) for every request; ``route`` is the URL rule (``/api/v1/images/<int:image_id>``),
  never the raw path, so ids and probes cannot explode the series. 429s (rate limit) and 503s (admission,
  loading) are statuses like any other.
- ``flagmatch_search_stage_seconds{stage}``: the stages a search reported in its ``Server-Timing`` header
  (decode, embed, search, hashes, hydrate, verify, handler) — the same figures a client sees.
- At scrape time, from the running objects: ``flagmatch_ready``, ``flagmatch_index_vectors{scope}``,
  ``flagmatch_index_keyframes``,
  ``flagmatch_index_generation{scope}``, ``flagmatch_pdq_index_hashes{index}`` (for the PDQ indexes this
  worker has opened), ``flagmatch_admission_reserved_bytes``, the model's queue
  (``flagmatch_model_waiting_requests``, ``flagmatch_model_busy_batches``), live viewer sessions, and each
  index scope's lag behind the catalog (``flagmatch_index_lag_images``, ``flagmatch_index_lag_seconds``).
- ``flagmatch_model_batch_images``: the size of each batch the model ran (a histogram).

Access: behind the API token like the rest of the API, unless ``metrics_open`` lets clients on loopback
(a scraper on the same host) in without one. Under a server of several workers (``flagmatch.serve`` sets
``PROMETHEUS_MULTIPROC_DIR``), counters and histograms are prometheus-client's multiprocess values,
summed over the workers at each scrape; the gauges above describe the worker that answered."""
from __future__ import annotations

import os
import time
from typing import Any, Iterator

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from indexer.models.embed import SerialEmbedder
from search import health
from search.edge import Runtime, authorize, route_name, server_timing

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOOPBACK = ("127.0.0.1", "::1")


class _State(Collector):
    """Gauges read from the runtime when Prometheus scrapes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rt = self.runtime
        yield GaugeMetricFamily("flagmatch_ready", "1 once the model and indexes are loaded", value=rt.ready.is_set())
        vectors = GaugeMetricFamily("flagmatch_index_vectors", "vectors in each index scope", labels=["scope"])
        generation = GaugeMetricFamily("flagmatch_index_generation", "published generation each scope answers from",
                                       labels=["scope"])
        stats = rt.index.stats() if rt.index is not None else {}
        for scope, st in stats.items():
            vectors.add_metric([scope], st["vectors"])
            generation.add_metric([scope], st["generation"])
        yield vectors
        yield generation
        yield GaugeMetricFamily("flagmatch_index_keyframes", "video keyframes in the frame index (every live video's)",
                                value=rt.index.frames.ntotal if rt.index is not None else 0)
        pdq = GaugeMetricFamily("flagmatch_pdq_index_hashes", "hashes in the PDQ indexes this worker has open",
                                labels=["index"])
        matcher = rt.service.hashes if rt.service is not None else None
        for name in ("bank_index", "image_index"):
            if matcher is not None and name in vars(matcher):  # opened already: reading never opens one
                pdq.add_metric([name.removesuffix("_index")], vars(matcher)[name].ntotal)
        yield pdq
        admission = rt.service.admission if rt.service is not None else None
        yield GaugeMetricFamily("flagmatch_admission_reserved_bytes", "decode memory reserved by uploads now",
                                value=admission.in_flight if admission is not None else 0)
        model = rt.embedder if isinstance(rt.embedder, SerialEmbedder) else None
        yield GaugeMetricFamily("flagmatch_model_waiting_requests", "requests queued for the model now",
                                value=model.waiting if model is not None else 0)
        yield GaugeMetricFamily("flagmatch_model_busy_batches", "model batches running now",
                                value=model.busy if model is not None else 0)
        yield GaugeMetricFamily("flagmatch_viewer_sessions", "viewer sessions live now", value=rt.sessions.live())
        lag_images = GaugeMetricFamily("flagmatch_index_lag_images", "catalog images an index scope does not cover yet",
                                       labels=["scope"])
        lag_seconds = GaugeMetricFamily("flagmatch_index_lag_seconds", "how long an index scope has been behind the "
                                        "catalog (since the first image it lacks was written)", labels=["scope"])
        if stats:
            lag = health.index_lag(rt.store, {sc: st["covers_image_id"] for sc, st in stats.items()})
            for scope, (images, seconds) in lag.items():
                lag_images.add_metric([scope], images)
                lag_seconds.add_metric([scope], seconds)
        yield lag_images
        yield lag_seconds


def _scrape_registry(runtime: Runtime, own: CollectorRegistry | None) -> CollectorRegistry:
    """This app's registry; in multiprocess mode, every worker's files summed, with this worker's gauges."""
    if own is not None:
        return own
    from prometheus_client import multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_State(runtime))
    return registry


def install_metrics(app: Flask, runtime: Runtime) -> None:
    # multiprocess: the values live in the shared folder's files, read back by a collector at each scrape
    own = None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else CollectorRegistry(auto_describe=True)
    requests = Counter("flagmatch_http_requests", "HTTP requests answered", ["route", "method", "status"],
                       registry=own)
    latency = Histogram("flagmatch_http_request_seconds", "time from the request's arrival in the app to its answer",
                        ["route", "method"], registry=own, buckets=STAGE_BUCKETS)
    stages = Histogram("flagmatch_search_stage_seconds", "a search's stages, as its Server-Timing header reports them",
                       ["stage"], registry=own, buckets=STAGE_BUCKETS)
    batches = Histogram("flagmatch_model_batch_images", "images in each batch the model ran", registry=own,
                        buckets=(1, 2, 4, 8, 16, 32, 64))
    if own is not None:
        own.register(_State(runtime))

    @app.before_request
    def _started() -> None:
        g.metrics_started = time.perf_counter()

    children: dict[tuple[str, ...], Any] = {}  # labelled series by their labels: .labels() costs more than a look-up

    def child(metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        found = children.get(key)
        if found is None:
            found = children[key] = metric.labels(*labels)
        return found

    @app.after_request
    def _count(resp: Response) -> Response:
        model = runtime.embedder
        if isinstance(model, SerialEmbedder) and model.observe_batch is None:  # loaded since the last request
            model.observe_batch = batches.observe
        route = route_name()
        method = request.method
        child(requests, route, method, str(resp.status_code)).inc()
        if "metrics_started" in g:
            child(latency, route, method).observe(time.perf_counter() - g.metrics_started)
        for name, seconds in server_timing(resp).items():
            child(stages, name).observe(seconds)
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        if not (runtime.settings.metrics_open and request.remote_addr in LOOPBACK):
            denied = authorize(write=False)
            if denied is not None:
                return denied
        return Response(generate_latest(_scrape_registry(runtime, own)), mimetype=CONTENT_TYPE_LATEST)
