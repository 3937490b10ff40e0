"""Clustering job: time per phase and peak RSS at 10k / 100k / 1M flagged vectors, and the three
HDBSCAN implementations compared on the same reduced data (time, agreement with the hdbscan package).

    python benchmarks/cluster.py [--sizes 10000,100000,1000000] [--dim 192]

Vectors: a seeded mixture of 300 groups of different sizes (the families of re-uploads a moderation
team sees) plus 5 % scattered images, L2-normalised. Each size runs in its own process (peak RSS is
that process's)."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine, peak_rss_kib, run_child, table, write


def make(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = 300
    centres = rng.normal(size=(g, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.pareto(1.2, g) + 1
    weights /= weights.sum()
    labels = rng.choice(g, n, p=weights)
    scatter = rng.random(n) < 0.05
    labels[scatter] = -1
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        lab = labels[i:i + 100_000]
        v = np.where(lab[:, None] >= 0, centres[np.maximum(lab, 0)], rng.normal(size=(len(lab), dim)) / np.sqrt(dim) * 3)
        v = v + rng.normal(scale=0.5 / np.sqrt(dim), size=v.shape)
        out[i:i + len(lab)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, labels


def worker(n: int, dim: int, work: Path, sample: int) -> dict:
    from sqlalchemy import insert
    from sklearn.metrics import adjusted_rand_score
    import joblib
    from clustering.job import ClusterParams, artifacts_path, fit_hdbscan, run_clustering
    from indexer.storage.clusters import ClusterStore
    from indexer.storage.tables import ImageRow, utcnow
    from indexer.storage.store import Store

    home = work / f"home-{n}"
    shutil.rmtree(home, ignore_errors=True)
    store = Store(home, f"sqlite:///{home / 'catalog.sqlite'}")
    vs = store.bind_model("bench@synthetic", dim, "{}")
    vecs, truth = make(n, dim)
    vs.append(1, vecs)
    del vecs
    now = utcnow()
    with store.catalog.engine.begin() as c:
        for i in range(1, n + 1, 50_000):
            c.execute(insert(ImageRow), [dict(id=k, sha256=hashlib.sha256(str(k).encode()).hexdigest(), size_bytes=1,
                                              format="PNG", width=1, height=1, frames=1, p_unsafe=1.0,
                                              model_id="bench@synthetic", thumb_key="", flagged=True,
                                              flag_source="import", flagged_at=now, deleted=False, created_at=now,
                                              updated_at=now) for k in range(i, min(i + 50_000, n + 1))])
    cstore = ClusterStore(store)
    phases: list[str] = []
    t = time.perf_counter()
    report = run_clustering(store, cstore, ClusterParams(sample=sample),
                            progress=lambda ph, msg: phases.append(f"{time.perf_counter() - t:.0f}s {ph} {msg}"))
    total = time.perf_counter() - t
    ids, labels, _, _ = cstore.map_points(report.run.id)
    ari_truth = float(adjusted_rand_score(truth[np.asarray(ids) - 1], labels))
    # the three HDBSCAN implementations on the same reduced data (the fitted sample)
    art = joblib.load(artifacts_path(store, report.run.id))
    x = art["fit_embedding"]
    p = ClusterParams(sample=sample).resolve(n)
    backends = {}
    for b in ("hdbscan", "fast_hdbscan", "sklearn"):
        pb = ClusterParams(p.min_cluster_size, p.min_samples, p.dims, p.neighbors, p.sample, b, p.seed)
        fit_hdbscan(x[:200], pb)  # JIT warm-up (numba) so the timing is the algorithm's
        t0 = time.perf_counter()
        f = fit_hdbscan(x, pb)
        backends[b] = {"seconds": time.perf_counter() - t0, "labels": f.labels,
                       "clusters": int(len(set(f.labels.tolist()) - {-1})), "noise": float((f.labels < 0).mean())}
    ref = backends["hdbscan"]["labels"]
    for b in backends.values():
        b["ari_vs_hdbscan"] = float(adjusted_rand_score(ref, b.pop("labels")))
    store.close()
    shutil.rmtree(home, ignore_errors=True)
    return {"n": n, "dim": dim, "total_s": total, "timings": report.timings, "clusters": report.clusters,
            "noise": report.noise, "ari_vs_truth": ari_truth, "fit_points": len(x), "backends": backends,
            "phases": phases, "peak_rss_kib": peak_rss_kib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--sample", type=int, default=50_000)
    ap.add_argument("--work", default="/tmp/fm-bench-cluster")
    ap.add_argument("--worker", type=int)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.worker:
        print(json.dumps(worker(a.worker, a.dim, work, a.sample)))
        return
    results, rows, brows = [], [], []
    for n in map(int, a.sizes.split(",")):
        cache = Path(tempfile.mkdtemp(prefix="fm-numba-"))  # cold: numba compiles everything; warm: its cache
        for jit in ("cold", "warm"):
            r, rss = run_child([__file__, "--worker", str(n), "--dim", str(a.dim), "--work", str(work),
                                "--sample", str(a.sample)], env={"NUMBA_CACHE_DIR": str(cache)})
            r["jit"] = jit
            print(json.dumps({k: v for k, v in r.items() if k != "phases"}), flush=True)
            results.append(r)
            t = r["timings"]
            rows.append([f"{n:,}", jit, r["fit_points"], t["load"], t.get("graph", 0), t.get("reduce_fit", 0),
                         t.get("map_fit", 0), t.get("place_search", 0), t.get("place", 0), t["cluster"], t["store"],
                         r["total_s"], f"{rss / 2**20:.2f} GiB",
                         r["clusters"], f"{r['noise'] / n:.0%}", r["ari_vs_truth"]])
            if jit == "warm":
                for b, v in r["backends"].items():
                    brows.append([f"{n:,}", b, v["seconds"], v["clusters"], f"{v['noise']:.0%}", v["ari_vs_hdbscan"]])
        shutil.rmtree(cache, ignore_errors=True)
    md = (f"Clustering job on {machine()}: {a.dim}-d flagged vectors (300 groups of skewed sizes + 5 % scattered), "
          f"default settings (one NN-descent neighbour graph; from it UMAP → 8-d cosine, 200 epochs, and the 2-D map, "
          f"100 epochs, laid out at the same time on two threads; fit on at most {a.sample:,}, the rest placed from their "
          f"nearest fitted neighbours, searched while the graph is built; HDBSCAN backend hdbscan); seconds per phase "
          f"(map fit runs during the clustering space's fit, the neighbour search during the graph: neither adds to the "
          f"total), each size run with a cold numba cache (a new machine) and then warm.\n\n"
          + table(["flagged", "JIT cache", "fit on", "load s", "graph s", "clustering space fit s", "map fit s",
                   "place search s", "place s", "cluster s", "store s", "total s", "peak RSS", "clusters", "unclustered",
                   "ARI vs truth"], rows)
          + "\n\nHDBSCAN implementations on the same reduced data (the fitted sample), after JIT warm-up:\n\n"
          + table(["flagged", "backend", "fit s", "clusters", "noise", "ARI vs hdbscan"], brows))
    write("cluster", {"machine": machine(), "results": results}, md)


if __name__ == "__main__":
    main()
