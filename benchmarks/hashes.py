"""Hashes: what PDQ costs at ingest, how fast bank lookups are at 1M and 10M banked hashes, what a hash
costs in memory, and where PDQ and the embedding each find re-uploads.

1. **Cost at ingest.** On a sample of the match benchmark's corpus (real photos and clipart from
   ``make-corpus``), single-threaded: decode + thumbnail without PDQ, the PDQ part alone (the same decode
   with PDQ, minus without), and the model per image (``opennsfw``, batches of 32). PDQ's share of the
   end-to-end CPU per image is PDQ ÷ (decode + PDQ + model).
2b. **Lookups on a real catalog, beside threatexchange.** ``PdqIndex.search`` with its check of a real SQLite
   catalog of 2k to 10M bank entries before every lookup (as served), flat and multi-index hashing, beside
   threatexchange's ``PDQIndex`` on the same hashes and queries: latency, memory per hash, lookups/s on all
   cores; and the reads each lookup made before this work (up to 1M: without the catch-up's index, slow).
2. **Lookups.** ``indexer.hashbanks.hash_index.PdqIndex`` (the class the server uses, with its per-query catch-up
   read of the catalog) filled with N random banked hashes, flat and multi-index hashing; queries are
   banked hashes with 8–30 of 256 bits flipped (must be found) and random hashes (must find nothing),
   radius 31. p50 / p99 over single-hash lookups; memory per hash from the process's RSS growth and the
   saved file's size.
3. **PDQ vs embedding.** The match benchmark's originals, distractors and edited queries
   (``benchmarks/match.py``, same seed): PDQ R@1 (the nearest corpus hash is the original's) and the share
   matched within 31 bits, beside the embedding's R@1 / R@10 from ``results/match.json``.

    python benchmarks/hashes.py [--sizes 1000000,10000000] [--sample 200]

Run it from the repository root. Results: benchmarks/results/hashes.{json,md}."""
from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import OUT, ROOT, machine, median, percentile, run_child, table, write


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def cpu_ms(fn, *args, **kw) -> tuple[float, Any]:  # type: ignore[no-untyped-def]
    t = time.thread_time()
    out = fn(*args, **kw)
    return (time.thread_time() - t) * 1000, out


# ------------------------------------------------------------------ 1. cost at ingest

def ingest_cost(files: list[Path]) -> dict[str, Any]:
    from indexer.media.decode import DecodeLimits, decode
    from indexer.models.embed import load_model
    emb = load_model("opennsfw")
    limits = DecodeLimits(max_pixels=300_000_000, max_bytes=4 << 30, timeout_s=120)
    plain, with_pdq, pixels = [], [], []
    for p in files:
        data = p.read_bytes()
        a, _ = cpu_ms(decode, data, emb.info.input, limits, thumb_size=256, pdq=False)
        b, img = cpu_ms(decode, data, emb.info.input, limits, thumb_size=256, pdq=True)
        plain.append(a)
        with_pdq.append(b)
        pixels.append(img.pixels)
    t = time.process_time()
    for i in range(0, len(pixels), 32):
        emb.embed(np.stack(pixels[i:i + 32]))
    model = (time.process_time() - t) * 1000 / len(pixels)
    pdq = [max(0.0, b - a) for a, b in zip(plain, with_pdq)]
    decode_ms, pdq_ms = float(np.mean(plain)), float(np.mean(pdq))
    return {"images": len(files), "decode_thumb_ms": decode_ms, "pdq_ms": pdq_ms, "pdq_ms_median": median(pdq),
            "model_cpu_ms": model, "pdq_share": pdq_ms / (decode_ms + pdq_ms + model)}


# ------------------------------------------------------------------ 2. lookups

def lookups(n: int, kind: str, queries: int = 1000, seed: int = 0) -> dict[str, Any]:
    from indexer.storage.catalog import Catalog
    from indexer.hashbanks.hash_index import PdqIndex
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        catalog = Catalog(f"sqlite:///{d}/c.sqlite")
        idx = PdqIndex(Path(d) / "p.faissb", catalog, "pdq:bench", lambda after, limit: [], kind=kind)
        r0 = rss_mib()
        t = time.perf_counter()
        codes_kept = None
        for start in range(0, n, 1_000_000):
            m = min(1_000_000, n - start)
            codes = rng.integers(0, 256, (m, 32), dtype=np.uint8)
            if codes_kept is None:
                codes_kept = codes[: queries].copy()
            idx.index.add_with_ids(codes, np.arange(start + 1, start + m + 1, dtype=np.int64))
            del codes
        idx.save()  # the multi-index folds what was added into its mapped file, as a server opens it
        build_s = time.perf_counter() - t
        mem = rss_mib() - r0
        assert codes_kept is not None
        near = np.unpackbits(codes_kept, axis=1)
        flips = rng.integers(8, 31, len(near))
        for row, f in zip(near, flips):
            row[rng.choice(256, int(f), replace=False)] ^= 1
        near_hex = [bytes(r).hex() for r in np.packbits(near, axis=1)]
        far_hex = [bytes(r).hex() for r in rng.integers(0, 256, (queries, 32), dtype=np.uint8)]
        idx.search(near_hex[:5], 31)  # warm
        lat, found, false = [], 0, 0
        for i, h in enumerate(near_hex):
            t = time.perf_counter()
            hits = idx.search([h], 31)[0]
            lat.append((time.perf_counter() - t) * 1000)
            found += any(x.id == i + 1 for x in hits)
        for h in far_hex:
            t = time.perf_counter()
            false += len(idx.search([h], 31)[0])
            lat.append((time.perf_counter() - t) * 1000)
        file_bytes = (Path(d) / "p.faissb").stat().st_size
        catalog.close()
    return {"n": n, "kind": kind, "build_s": build_s, "p50_ms": median(lat),
            "p99_ms": percentile(lat, 99), "recall": found / len(near_hex), "false_hits": false,
            "rss_bytes_per_hash": mem * 2**20 / n, "file_bytes_per_hash": file_bytes / n}


# ------------------------------------------------------------------ 2b. lookups on a real catalog, beside threatexchange

def catalog_lookups(n: int, queries: int = 500, seed: int = 1, before: bool = True) -> dict[str, Any]:
    """The served path's bank lookup — ``PdqIndex.search`` with its catch-up check of a real SQLite catalog
    holding ``n`` bank entries, flat and multi-index — beside threatexchange's ``PDQIndex``
    (``PdqSignal.get_index_cls()``, the index Open Media Match builds) on the same hashes and queries. Each
    structure is measured in a forked process of its own, as a server worker holds it (flagmatch's opened from
    its saved file): single-thread latency, the worker's private memory per hash (anonymous RSS growth) and
    what it maps from a file the workers share, and lookups/s on all cores (one forked process per core, as
    the server runs a worker per core); with ``before``, the same flat lookups with the catch-up's index
    dropped and the change check bypassed (the read every lookup made before migration 0006)."""
    import os
    import faiss
    from sqlalchemy import text
    from threatexchange.signal_type.pdq.signal import PdqSignal
    from indexer.hashbanks.banks import Banks, NewEntry
    from indexer.hashbanks.hash_index import PdqIndex
    from indexer.storage.catalog import Catalog
    faiss.omp_set_num_threads(1)  # single-thread lookups; and OpenMP's pool must not exist when workers fork
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    hexes = [bytes(r).hex() for r in codes]
    near = np.unpackbits(codes[:queries], axis=1)
    for row, f in zip(near, rng.integers(8, 31, queries)):
        row[rng.choice(256, int(f), replace=False)] ^= 1
    qs = [bytes(r).hex() for r in np.packbits(near, axis=1)]
    out: dict[str, Any] = {"n": n}

    def timed(fn) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
        lat, found = [], 0
        for i, q in enumerate(qs):
            t0 = time.perf_counter()
            found += fn(i, q)
            lat.append((time.perf_counter() - t0) * 1000)
        return lat, found

    def parallel(fn, k: int) -> list[str]:  # type: ignore[no-untyped-def]
        """``fn() -> str`` in ``k`` forked processes at once; their outputs."""
        pipes = []
        for _ in range(k):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                os.write(w, fn().encode())
                os._exit(0)
            os.close(w)
            pipes.append((pid, r))
        res = []
        for pid, r in pipes:
            with os.fdopen(r) as f:
                res.append(f.read())
            os.waitpid(pid, 0)
        return res

    def all_cores(fn, seconds: float = 3.0) -> float:  # type: ignore[no-untyped-def]
        """Lookups/s summed over one forked process per core, each looping over the queries."""
        def loop() -> str:
            done, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                fn(done % queries, qs[done % queries])
                done += 1
            return str(done / seconds)
        return sum(float(x) for x in parallel(loop, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/c.sqlite"
        catalog = Catalog(url)
        banks = Banks(catalog)
        banks.create("BIG")
        t = time.perf_counter()
        for start in range(0, n, 1_000_000):
            banks.add("BIG", (NewEntry("pdq", h) for h in hexes[start:start + 1_000_000]))
        out["fill_s"] = time.perf_counter() - t
        catalog.close()

        def measure(kind: str) -> str:  # in a process of its own
            res: dict[str, Any] = {}
            if kind == "te":
                a0, f0 = memory_mib()
                t = time.perf_counter()
                tx = PdqSignal.get_index_cls().build((h, i + 1) for i, h in enumerate(hexes))  # OMM's PDQ index

                def look(i: int, q: str) -> bool:
                    return any(m.metadata == i + 1 for m in tx.query(q))
            else:
                cat = Catalog(url)
                t = time.perf_counter()
                PdqIndex(Path(d) / f"{kind}.faissb", cat, f"pdq:{kind}", Banks(cat).pdq_rows_after,
                         kind=kind).save()
                res["build_s"] = time.perf_counter() - t
                a0, f0 = memory_mib()
                t = time.perf_counter()  # a server worker opens the saved index
                idx = PdqIndex(Path(d) / f"{kind}.faissb", cat, f"pdq:{kind}", Banks(cat).pdq_rows_after, kind=kind)

                def look(i: int, q: str) -> bool:
                    return any(h.id == i + 1 for h in idx.search([q], 31)[0])
            res["open_s"] = time.perf_counter() - t
            lat, found = timed(look)
            a1, f1 = memory_mib()
            res.update({"p50_ms": median(lat), "p99_ms": percentile(lat, 99), "recall": found / queries,
                        "bytes_per_hash": (a1 - a0) * 2**20 / n, "shared_bytes_per_hash": (f1 - f0) * 2**20 / n,
                        "all_cores_per_s": all_cores(look)})
            return json.dumps(res)

        for kind in ("flat", "mih", "te"):
            r = json.loads(parallel(lambda: measure(kind), 1)[0])
            out.update({f"{kind}_{k}": v for k, v in r.items()})
            print(kind, r, flush=True)
        catalog = Catalog(url)
        banks = Banks(catalog)
        flat = PdqIndex(Path(d) / "flat.faissb", catalog, "pdq:flat", banks.pdq_rows_after, kind="flat")
        catch, _ = timed(lambda i, q: len(banks.pdq_rows_after(flat.covered)) + 0)
        check, _ = timed(lambda i, q: catalog.change_token() is None)
        out.update({"catch_up_p50_ms": median(catch), "change_check_p50_ms": median(check)})
        if before:
            with catalog.engine.begin() as c:  # a catalog as new ones were: no index for it, no statistics
                c.execute(text("DROP INDEX ix_bank_entries_type_id"))
            lat, _ = timed(lambda i, q: (len(banks.pdq_rows_after(flat.covered)),
                                         catalog.checkpoint(flat.scope), flat.search([q], 31))[0] + 0)
            out.update({"before_p50_ms": median(lat), "before_p99_ms": percentile(lat, 99)})
        catalog.close()
    return out


def memory_mib() -> tuple[float, float]:
    """This process's resident memory: (anonymous, mapped from files), MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024


# ------------------------------------------------------------------ 3. PDQ vs embedding

def pdq_vs_embedding(corpus: Path, work: Path, originals_n: int, distractors_n: int, seed: int) -> dict[str, Any]:
    import match
    from indexer.media.decode import DecodeLimits, InputSpec, decode
    from indexer.media.hashes import pdq_codes
    limits = DecodeLimits(max_pixels=300_000_000, max_bytes=4 << 30, timeout_s=120)
    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    rng = random.Random(seed)
    rng.shuffle(files)
    originals = files[:originals_n]
    corpus_files = files[: originals_n + distractors_n]
    queries = match.make_queries(originals, work / "queries", seed)

    def pdq(path: Path) -> tuple[str, int]:
        img = decode(path.read_bytes(), InputSpec(224), limits, thumb_size=0)
        assert img.pdq is not None
        return img.pdq.hash, img.pdq.quality

    t = time.perf_counter()
    stored = [pdq(p) for p in corpus_files]
    print(f"hashed {len(stored)} corpus images in {time.perf_counter() - t:.0f} s", flush=True)
    bits = np.unpackbits(pdq_codes(h for h, _ in stored), axis=1).astype(np.int16)
    usable = np.array([q >= 50 for _, q in stored])
    emb = json.loads((OUT / "match.json").read_text()) if (OUT / "match.json").exists() else None
    out: dict[str, Any] = {"originals": len(originals), "corpus": len(corpus_files),
                           "low_quality_share": float(1 - usable.mean()), "edits": {}}
    for name, (title, _) in match.COMMON.items():
        r1 = within = false = 0
        for i, qpath in enumerate(queries[name]):
            h, q = pdq(qpath)
            if q < 50 or not usable[i]:
                continue
            qb = np.unpackbits(pdq_codes([h]), axis=1).astype(np.int16)
            d = np.where(usable, (bits != qb).sum(axis=1), 999)
            r1 += int(np.argmin(d) == i)
            within += int(d[i] <= 31)
            false += int((np.delete(d, i) <= 31).any())
        n = len(queries[name])
        row = {"title": title, "pdq_r1": r1 / n, "pdq_within_31": within / n, "pdq_false_match": false / n}
        if emb is not None:
            default = emb["search"].get("default: matching space + views", {}).get(name)
            if default:
                row["embedding_r1"], row["embedding_r10"] = default["r1"], default["r10"]
        out["edits"][name] = row
        print(name, row, flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    md = [f"Hashes on {res['machine']}.", ""]
    if res.get("carried"):
        md += [f"({', '.join(res['carried']['parts'])}: from an earlier run on {res['carried']['machine']}.)", ""]
    c = res.get("ingest")
    if c:
        md += [f"PDQ at ingest ({c['images']} corpus images, single thread, CPU time per image): decode + thumbnail "
               f"{c['decode_thumb_ms']:.1f} ms, PDQ {c['pdq_ms']:.1f} ms (median {c['pdq_ms_median']:.1f}), model "
               f"(opennsfw) {c['model_cpu_ms']:.1f} ms: PDQ is **{100 * c['pdq_share']:.1f} %** of the end-to-end "
               "CPU per image.", ""]
    if res.get("lookups"):
        md += ["Bank lookups (`PdqIndex.search`, one hash, radius 31; random banked hashes; 1,000 near and 1,000 "
               "random queries):", ""]
        md.append(table(["banked hashes", "structure", "p50 (ms)", "p99 (ms)", "recall ≤ 31 bits", "false hits",
                         "RSS / hash (B)", "file / hash (B)", "build (s)"],
                        [[f"{r['n']:,}", r["kind"], r["p50_ms"], r["p99_ms"], r["recall"], r["false_hits"],
                          round(r["rss_bytes_per_hash"]), round(r["file_bytes_per_hash"]), r["build_s"]]
                         for r in res["lookups"]]))
        md.append("")
    if res.get("catalog"):
        md += ["Bank lookups on the served path: `PdqIndex.search` with its catch-up check of a real SQLite catalog of "
               "N bank entries (flat and multi-index), beside threatexchange's `PDQIndex` "
               "(`PdqSignal.get_index_cls()`, what Open Media Match builds) on the same hashes and 500 near queries "
               "(8–30 bits flipped), radius 31. Each structure in a forked process of its own, flagmatch's opened "
               "from its saved file as a server worker opens it. p50/p99: single thread; B/hash: the worker's private "
               "memory (anonymous RSS growth) + what it maps from a file all workers share (page cache, once per "
               "machine); /s: lookups per second on all cores (a forked process per core); recall: the banked "
               "original found, every structure; *check*: the change check that replaces the catch-up's reads while "
               "nothing was committed; *before*: each lookup with the reads it made before this work (checkpoint "
               "and catch-up query, without the index of migration 0006).", ""]
        rows = []
        for r in res["catalog"]:
            if "te_bytes_per_hash" not in r or "flat_shared_bytes_per_hash" not in r:  # an older layout
                continue

            def mem(k: str) -> str:
                shared = r.get(f"{k}_shared_bytes_per_hash", 0)
                return f"{round(r[f'{k}_bytes_per_hash'])}" + (f" + {round(shared)} shared" if shared > 8 else "")
            rows.append([f"{r['n']:,}", r["flat_p50_ms"], r["flat_p99_ms"], mem("flat"),
                         round(r["flat_all_cores_per_s"]), r["mih_p50_ms"], r["mih_p99_ms"], mem("mih"),
                         round(r["mih_all_cores_per_s"]), r["te_p50_ms"], r["te_p99_ms"], mem("te"),
                         round(r["te_all_cores_per_s"]), min(r["flat_recall"], r["mih_recall"], r["te_recall"]),
                         r["change_check_p50_ms"], r.get("before_p50_ms", "—")])
        md.append(table(["bank entries", "flat p50 (ms)", "flat p99", "flat B/hash", "flat /s", "multi-index p50 (ms)",
                         "MI p99", "MI B/hash", "MI /s", "threatexchange p50 (ms)", "TE p99", "TE B/hash", "TE /s",
                         "recall", "check p50 (ms)", "before p50 (ms)"], rows))
        md.append("")
    v = res.get("versus")
    if v:
        md += [f"PDQ vs the embedding on the match benchmark's edits ({v['originals']} originals among {v['corpus']} "
               f"corpus images; {100 * v['low_quality_share']:.1f} % of corpus hashes are below quality 50 and never "
               "match). PDQ R@1: the nearest corpus hash is the original's; within 31: the original is a PDQ match; "
               "false match: some other corpus image is within 31 bits. Embedding: the default pipeline "
               "(`results/match.json`).", ""]
        md.append(table(["edit", "PDQ R@1", "PDQ within 31", "PDQ false match", "embedding R@1", "embedding R@10"],
                        [[r["title"], r["pdq_r1"], r["pdq_within_31"], r["pdq_false_match"],
                          r.get("embedding_r1", "—"), r.get("embedding_r10", "—")] for r in v["edits"].values()]))
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--kinds", default="flat,mih")
    ap.add_argument("--sample", type=int, default=200, help="corpus images for the ingest cost")
    ap.add_argument("--corpus", default="/tmp/fm-match-corpus")
    ap.add_argument("--work", default="/tmp/fm-bench-match")
    ap.add_argument("--originals", type=int, default=300)
    ap.add_argument("--distractors", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--catalog-sizes", default="2000,200000,1000000,10000000",
                    help="bank entries in the real-catalog lookups beside threatexchange")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: ingest, lookups, catalog, versus")
    ap.add_argument("--child-catalog", type=int, metavar="N", help=argparse.SUPPRESS)
    ap.add_argument("--child-lookup", nargs=2, metavar=("N", "KIND"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_lookup:  # one lookup configuration in a fresh process, so its RSS growth is the index's
        print(json.dumps(lookups(int(a.child_lookup[0]), a.child_lookup[1])))
        return
    if a.child_catalog:
        print(json.dumps(catalog_lookups(a.child_catalog, before=a.child_catalog <= 1_000_000)))
        return
    skip = set(filter(None, a.skip.split(",")))
    corpus = Path(a.corpus)
    if not corpus.exists() and not {"ingest", "versus"} <= skip:
        import subprocess
        import sys
        subprocess.run([sys.executable, str(ROOT.parent / "shared" / "corpus" / "make-corpus"), str(corpus),
                        "--photos", "1800", "--clipart", "1700", "--seed", str(a.seed)], check=True)
    print(machine(), flush=True)
    res: dict[str, Any] = {"machine": machine()}
    prev_path = OUT / "hashes.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    carried = [p for p in ("ingest", "lookups", "catalog", "versus") if p in skip and p in prev]
    for p in carried:  # a part not run this time keeps its earlier figures, said to be from then
        res[p] = prev[p]
    if carried:
        res["carried"] = {"parts": carried, "machine": prev.get("carried", {}).get("machine", prev.get("machine"))}
    if "note" in prev:
        res["note"] = prev["note"]
    if "ingest" not in skip:
        files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
        random.Random(a.seed + 1).shuffle(files)
        res["ingest"] = ingest_cost(files[: a.sample])
        print(res["ingest"], flush=True)
    if "lookups" not in skip:
        res["lookups"] = []
        for n in (int(s) for s in a.sizes.split(",")):
            for kind in a.kinds.split(","):
                r, _ = run_child([__file__, "--child-lookup", str(n), kind])
                print(r, flush=True)
                res["lookups"].append(r)
    if "catalog" not in skip:
        res["catalog"] = []
        for n in (int(x) for x in a.catalog_sizes.split(",")):
            r, _ = run_child([__file__, "--child-catalog", str(n)])
            print(r, flush=True)
            res["catalog"].append(r)
    if "versus" not in skip:
        res["versus"] = pdq_vs_embedding(corpus, Path(a.work), a.originals, a.distractors, a.seed)
    write("hashes", res, markdown(res))


if __name__ == "__main__":
    main()
