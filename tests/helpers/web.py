"""A reviewed-looking store for the viewer tests: families of near-duplicate images, all flagged,
ingested with the tiny model, indexed and clustered."""
from __future__ import annotations

import re
from pathlib import Path

TOKEN = "reviewer-token"


def build_clustered_home(root: Path, model_dir: Path, embedder, families: int = 4, per_family: int = 15,
                         catalog_url: str = ""):
    from clustering.job import run_clustering
    from indexer.storage.clusters import ClusterStore
    from flagmatch.settings import Settings
    from flagmatch.wiring import cluster_params, ingest_into, open_store
    from indexer.ingest.sources import iter_sources
    from tests.helpers import write_families, write_images

    write_families(root / "in" / "flagged", families, per_family)
    write_images(root / "in2", 12, start=500)
    s = Settings.load({"home": str(root / "home"), "model": str(model_dir), "api_tokens": f"rita:{TOKEN}",
                       "flag_threshold": 0.0, "cluster_min_size": 5, "cluster_neighbors": 10,
                       "catalog_url": catalog_url}, environ={})
    store = open_store(s)
    ingest_into(s, iter_sources([str(root / "in" / "flagged")]), store=store, embedder=embedder)
    # a second batch that is not flagged: what a sweep should find
    ingest_into(s.replace(flag_threshold=1.1), iter_sources([str(root / "in2")]), store=store, embedder=embedder)
    run_clustering(store, ClusterStore(store), cluster_params(s))
    store.close()
    return s


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', html) or re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client, token: str = TOKEN):
    page = client.get("/login")
    return client.post("/login", data={"csrf": csrf_of(page.text), "token": token})
