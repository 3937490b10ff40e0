"""Sharded index builds: `flagmatch reindex` in memory on one host, against the same index filled in shards
and merged into memory-mapped lists (`--on-disk`, shards one after another here) and on a Ray cluster of
this machine (`--ray`, one node of 2 CPUs and two nodes of 1 + 1) — build time, the builder's peak RSS,
and a new serving process's memory, latency and recall over the result.

    python benchmarks/sharded_index.py [--n 1000000] [--dim 192] [--queries 500]

Vectors: the seeded Gaussian mixture of `benchmarks/index.py`, written straight into a store (catalog rows
and raw vectors). Every build is the `all` scope in the store's current matching space (PCA-whitening fitted
by a first, untimed build), so the results compare. Recall@10 is against exact search in that space."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, median, table, write

sys.path.insert(0, str(ROOT / "benchmarks"))
from index import build_store, make_vectors  # noqa: E402
from ray_ingest import Cluster  # noqa: E402

CLI = [sys.executable, "-m", "flagmatch.cli"]

SERVE = r"""
import json, sys, time
import numpy as np, faiss
from flagmatch.settings import Settings
from flagmatch.wiring import index_config, open_store
from indexer.vectors.space import SpaceConfig
from indexer.vectors.vector_index import VectorIndex
settings = Settings.load({"home": sys.argv[1]})
store = open_store(settings)
t = time.perf_counter()
index = VectorIndex(store, index_config(settings), SpaceConfig(), auto_rebuild=False)
open_s = time.perf_counter() - t
d = np.load(sys.argv[2])
faiss.omp_set_num_threads(1)
p50s = []
for _ in range(2):  # the first pass faults in the pages it touches; the second finds them resident
    lat, hit = [], 0
    for row, want in zip(d["q"], d["truth"]):
        t = time.perf_counter()
        h = index.search(row[None], 10, "all")[0]
        lat.append((time.perf_counter() - t) * 1000)
        hit += len(set(h.ids.tolist()) & set(want.tolist()))
    p50s.append(float(np.median(lat)))
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kib = lambda k: int(status[k].split()[0])
print(json.dumps({"open_s": open_s, "p50_ms": p50s[1], "first_p50_ms": p50s[0], "recall": hit / (10 * len(lat)),
                  "rss_mib": kib("VmRSS") / 1024, "anon_mib": kib("RssAnon") / 1024, "file_mib": kib("RssFile") / 1024,
                  "stats": index.stats()["all"]}, default=str))
"""


def run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, the process's peak RSS in MiB, stdout). The peak is the child's own VmHWM, polled: the
    kernel's ru_maxrss of a child carries over the forking parent's peak, which here holds the whole corpus."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0.0]

    def poll() -> None:
        while p.poll() is None:
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.1)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = p.stdout.read() if p.stdout else ""
    if p.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {out[-2000:]}")
    watcher.join()
    return time.perf_counter() - t, peak[0], out


def serve(home: Path, qfile: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", SERVE, str(home), str(qfile)], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.splitlines()[-1])


def exact_truth(home: Path, q: np.ndarray, n: int) -> np.ndarray:
    """Exact top 10 of the queries in the store's matching space, over every stored vector."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import index_config, open_store
    from indexer.vectors.vector_index import VectorIndex
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    try:
        index = VectorIndex(store, index_config(Settings.load({}, environ={})), auto_rebuild=False)
        space, vs = index.space, index.vectors
        sq = space.apply(q)
        best = np.full((len(q), 10), -np.inf, np.float32)
        ids = np.zeros((len(q), 10), np.int64)
        for part, raw in vs.iter_rows(np.arange(1, n + 1), chunk=200_000):
            sims = sq @ space.apply(raw).T
            cand = np.concatenate([best, sims], 1)
            cid = np.concatenate([ids, np.broadcast_to(part, sims.shape)], 1)
            top = np.argsort(-cand, 1)[:, :10]
            best, ids = np.take_along_axis(cand, top, 1), np.take_along_axis(cid, top, 1)
        return ids
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=1, help="builds per mode (the median is reported)")
    ap.add_argument("--work", default="/tmp/fm-bench-sharded")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    home = work / f"home-{args.n}-{args.dim}"
    vecs = make_vectors(args.n, args.dim, seed=args.dim + args.n)
    rng = np.random.default_rng(1)
    q = vecs[rng.choice(args.n, args.queries, replace=False)]
    q = q + rng.normal(scale=0.3 / np.sqrt(args.dim), size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    build_store(home, vecs).close()
    del vecs
    env = {**os.environ, "FLAGMATCH_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("FLAGMATCH_CATALOG_URL", None)
    run(CLI + ["reindex", "--scope", "all"], env)  # fits the space and a first index (built twice: untimed)
    qfile = work / "queries.npz"
    np.savez(qfile, q=q, truth=exact_truth(home, q, args.n))

    modes: list[tuple[str, list[str], list[int] | None]] = [
        ("in memory (one host)", [], None),
        ("sharded, memory-mapped (shards here)", ["--on-disk"], None),
        ("sharded on Ray, 1 node (2 CPUs)", ["--ray"], [2]),
        ("sharded on Ray, 2 nodes (1 + 1 CPUs)", ["--ray"], [1, 1]),
    ]
    rows, data = [], {"machine": machine(), "n": args.n, "dim": args.dim, "queries": args.queries, "modes": {}}
    for name, flags, cpus in modes:
        cluster = Cluster(cpus, env) if cpus else None
        try:
            extra = [cluster.address] if cluster else []
            menv = cluster.env if cluster else env
            times, peaks = [], []
            for _ in range(args.repeat):
                wall, peak_mib, out = run(CLI + ["reindex", "--scope", "all", *flags, *extra], menv)
                times.append(wall)
                peaks.append(peak_mib)
        finally:
            if cluster:
                cluster.stop()
        time.sleep(5)  # the stopped cluster's processes exit before the serving process is timed
        served = serve(home, qfile, env)
        st = served["stats"]
        lists = st["on_disk"]["bytes"] / 2**20 if st["on_disk"] else None
        r = {"build_s": median(times), "builds_s": times, "builder_peak_rss_mib": max(peaks), **served,
             "lists_mib": lists, "last_output": out.strip().splitlines()[:2]}
        data["modes"][name] = r
        rows.append([name, r["build_s"], f"{r['builder_peak_rss_mib']:.0f}", f"{served['rss_mib']:.0f}",
                     f"{served['anon_mib']:.0f} / {served['file_mib']:.0f}",
                     f"{lists:.0f}" if lists is not None else "in RAM", served["open_s"],
                     f"{served['first_p50_ms']:.2f} / {served['p50_ms']:.2f}",
                     f"{served['recall']:.3f}"])
        print(name, json.dumps(r, default=str)[:400], flush=True)
    base = data["modes"]["in memory (one host)"]["build_s"]
    md = (f"Sharded index builds on {machine()}: {args.n:,} × {args.dim}-d vectors (the `all` scope, IVF-PQ in the "
          f"store's {data['modes']['in memory (one host)']['stats']['space']['dim']}-d matching space), "
          f"`flagmatch reindex --scope all` wall time (median of {args.repeat}; opening the store and training on "
          "the driver included); then a new serving process opens the published index and answers "
          f"{args.queries} single queries (1 FAISS thread, catalog guard included).\n\n"
          + table(["build", "build s", "builder peak RSS MiB", "server RSS MiB", "server anon / file-backed MiB",
                   "lists on disk MiB", "server open s", "query p50 ms (first / second pass)", "recall@10"], rows)
          + "\n\nBuilder peak RSS is the `reindex` process's own (VmHWM; on Ray the driver's — the shard tasks "
            "run in Ray's worker processes). Server RSS splits into anonymous memory (the index structures in "
            "RAM) and file-backed pages (memory-mapped raw vectors and lists: the kernel's page cache, dropped "
            "under memory pressure and read again on demand).\n\nBuild time against the in-memory build: "
          + ", ".join(f"{k} {v['build_s'] / base:.2f}×" for k, v in data["modes"].items()) + ".")
    write("sharded_index", data, md)


if __name__ == "__main__":
    main()
