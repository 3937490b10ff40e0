"""The catalog on SQLite against PostgreSQL: ingest commit rate and search hydrate latency as the catalog
grows to 1M images, and the combined commit rate of two writers at once (PostgreSQL only: SQLite has one
writer).

    python benchmarks/catalog.py [--images 1000000] [--postgres postgresql+psycopg://root@/postgres?host=/var/run/postgresql]

What is timed is what ingest and search do to the catalog, on synthetic rows (no model, no decoding):
- commit: ``Catalog.write_images`` of 32-image batches as ingest writes them (ids given out by the catalog,
  a path each, MD5 and PDQ, a vector location; one in ten flagged in the same transaction);
- hydrate: ``Catalog.get_many`` of 10 random stored ids (a search's hits), at 1k, 10k, 100k and 1M stored
  images — median and p99 over 500 reads.
The PostgreSQL server is the local Debian one (``.ci/run`` starts it); a database is created for the run
and dropped after."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from common import ROOT, machine, median, percentile, run_child, table, write

BATCH = 32
MARKS = (1_000, 10_000, 100_000, 1_000_000)


def images(start: int, n: int, segment: int):  # type: ignore[no-untyped-def]
    from indexer.storage.catalog import FlagRequest, NewImage
    from indexer.media.hashes import Pdq
    out = []
    for k in range(start, start + n):
        h = hashlib.sha256(f"{segment}:{k}".encode()).hexdigest()
        out.append(NewImage(0, h, 100_000, "JPEG", 640, 480, 1, (k % 100) / 100, f"{h[:2]}/{h[2:4]}/{h}.webp",
                            ((f"/data/in/{segment}/{k}.jpg", None),), md5=h[:32], pdq=Pdq(h, 90),
                            flags=(FlagRequest("model", None, "ingest"),) if k % 10 == 0 else (),
                            vec_segment=segment, vec_row=k - 1))
    return out


def hydrate_latency(cat, top: int, rng) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(500):
        ids = rng.integers(1, top + 1, 10).tolist()
        t = time.perf_counter()
        cat.get_many(ids)
        times.append((time.perf_counter() - t) * 1000)
    return median(times), percentile(times, 99)


def catalog_bytes(cat, url: str) -> int:  # type: ignore[no-untyped-def]
    """The catalog's size on disk: the SQLite file (+ WAL), or the PostgreSQL database."""
    from sqlalchemy import text
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    with cat.engine.connect() as c:
        return int(c.execute(text("SELECT pg_database_size(current_database())")).scalar())


def worker_fill(args: argparse.Namespace) -> dict:
    """Fill a fresh catalog to ``--images`` and measure as it grows."""
    import numpy as np
    from indexer.storage.catalog import Catalog
    cat = Catalog(args.url)
    cat.bind_model("synthetic@bench", 8, "{}")
    rng = np.random.default_rng(0)
    marks = [m for m in MARKS if m <= args.images] or [args.images]
    done, rows, t_all = 0, [], time.perf_counter()
    for mark in marks:
        t = time.perf_counter()
        n0 = done
        while done < mark:
            n = min(BATCH, mark - done)
            cat.write_images(images(done + 1, n, args.segment), "synthetic@bench")
            done += n
        rate = (done - n0) / (time.perf_counter() - t)
        p50, p99 = hydrate_latency(cat, done, rng)
        rows.append({"images": done, "commit_per_s": rate, "hydrate_p50_ms": p50, "hydrate_p99_ms": p99,
                     "bytes": catalog_bytes(cat, args.url)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cat.close()
    return {"marks": rows, "seconds": time.perf_counter() - t_all}


def worker_write(args: argparse.Namespace) -> dict:
    """Write ``--images`` more images as one writer among several (segment = the writer's number)."""
    from indexer.storage.catalog import Catalog
    cat = Catalog(args.url)
    t = time.perf_counter()
    for k in range(0, args.images, BATCH):
        cat.write_images(images(k + 1, min(BATCH, args.images - k), args.segment), "synthetic@bench")
    dt = time.perf_counter() - t
    cat.close()
    return {"images": args.images, "seconds": dt, "started": t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--postgres", default=os.environ.get("FLAGMATCH_TEST_POSTGRES",
                                                         "postgresql+psycopg://root@/postgres?host=/var/run/postgresql"))
    ap.add_argument("--work", default="/tmp/fm-bench-catalog")
    ap.add_argument("--worker", choices=["fill", "write"])
    ap.add_argument("--url")
    ap.add_argument("--segment", type=int, default=1)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps((worker_fill if a.worker == "fill" else worker_write)(a)))
        return

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    admin = create_engine(a.postgres, isolation_level="AUTOCOMMIT")
    name = f"fm_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    pg_url = make_url(a.postgres).set(database=name).render_as_string(hide_password=False)
    sqlite_path = work / "catalog.sqlite"
    for p in work.glob("catalog.sqlite*"):
        p.unlink()
    data = {"machine": machine(), "images": a.images, "engines": {}}
    try:
        for engine, url in (("SQLite", f"sqlite:///{sqlite_path}"), ("PostgreSQL", pg_url)):
            r, _ = run_child([__file__, "--worker", "fill", "--url", url, "--images", str(a.images)])
            data["engines"][engine] = r
        # two writers at once on PostgreSQL (a fresh database, so the id lock is all they share)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            c.execute(text(f'CREATE DATABASE "{name}"'))
        from indexer.storage.catalog import Catalog
        Catalog(pg_url).bind_model("synthetic@bench", 8, "{}")
        import subprocess
        n = min(a.images, 100_000) // 2
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "write", "--url", pg_url, "--images",
                                   str(n), "--segment", str(w + 1)], stdout=subprocess.PIPE, text=True)
                 for w in range(2)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        wall = time.perf_counter() - t
        data["two_writers"] = {"images": 2 * n, "wall_seconds": wall, "per_writer": outs,
                               "combined_per_s": 2 * n / max(o["seconds"] for o in outs)}
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    rows = []
    for engine, r in data["engines"].items():
        for m in r["marks"]:
            rows.append([engine, f"{m['images']:,}", f"{m['commit_per_s']:,.0f}", f"{m['hydrate_p50_ms']:.2f}",
                         f"{m['hydrate_p99_ms']:.2f}", f"{m['bytes'] / m['images']:,.0f}"])
    tw = data["two_writers"]
    md = (f"Catalog on {machine()}: SQLite (WAL, synchronous=FULL) against PostgreSQL 15 (local, Unix socket, "
          f"default settings); synthetic rows as ingest writes them (32-image transactions: path, MD5, PDQ, vector "
          f"location, 1 in 10 flagged). Commit rate over the rows added since the previous line; hydrate = "
          f"`get_many` of 10 random ids (a search's hits), 500 reads.\n\n"
          + table(["catalog", "images stored", "commit images/s", "hydrate p50 ms", "hydrate p99 ms",
                   "bytes / image on disk"], rows)
          + f"\n\nTwo writers at once on PostgreSQL ({tw['images']:,} images, {tw['images'] // 2:,} each, one id lock "
          f"between them): {tw['combined_per_s']:,.0f} images/s combined "
          f"(one writer alone: {data['engines']['PostgreSQL']['marks'][0]['commit_per_s']:,.0f} at the start).")
    write("catalog", data, md)


if __name__ == "__main__":
    main()
