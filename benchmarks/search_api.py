"""Search API under load: a served instance (`flagmatch serve`, gunicorn) on loopback, driven by wrk.

    python benchmarks/search_api.py [--vectors 100000] [--seconds 15] [--workers 1] [--threads 8]

The store: real corpus images (make-corpus) ingested with the default model's architecture
(vit_tiny_patch16_384, random weights: the hub is unreachable here, the compute is the same), padded
with synthetic vectors to --vectors images, 10 % flagged. Search-by-id and search-by-upload (real
JPEGs from the corpus) at 1, 4 and 16 connections. Stage shares come from the server's
Server-Timing header over 100 sequential requests. Needs wrk (apt-get install wrk)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import ROOT, machine, median, table, write

LUA = r"""
local bodies = {}
local ctype = os.getenv("FM_CTYPE")
local n_ids = tonumber(os.getenv("FM_IDS") or "0")
init = function(args)
  local dir = os.getenv("FM_BODIES")
  if dir ~= nil and dir ~= "" then
    for i = 0, 7 do
      local f = io.open(dir .. "/body" .. i, "rb")
      if f then bodies[#bodies + 1] = f:read("*all"); f:close() end
    end
  end
  math.randomseed(os.time() + (id or 0))
end
request = function()
  local headers = {["Authorization"] = "Bearer bench", ["Content-Type"] = ctype}
  if #bodies > 0 then
    return wrk.format("POST", "/api/v1/search", headers, bodies[math.random(#bodies)])
  end
  return wrk.format("POST", "/api/v1/search", headers,
                    string.format('{"id": %d, "k": 10}', math.random(n_ids)))
end
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
               + summary.errors.status + summary.errors.timeout
  io.write(string.format('FMJSON {"requests": %d, "seconds": %f, "p50": %f, "p95": %f, "p99": %f, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, errors))
end
"""


def build_store(work: Path, n_vectors: int, photos: int) -> tuple[dict, list[Path]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ingest import corpus, default_arch_model
    from sqlalchemy import insert
    from flagmatch.settings import Settings
    from flagmatch.wiring import ingest_into, load_embedder, open_index, open_store
    from indexer.storage.catalog import FlagRequest
    from indexer.storage.tables import ImageRow, utcnow
    from indexer.ingest.sources import SourceItem

    files = [f for f in corpus(work, photos, 50) if f.suffix == ".jpg"]
    model = default_arch_model(work)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    env = {"home": str(home), "model": str(model), "api_tokens": "bench:bench"}
    s = Settings.load(env, environ={})
    emb = load_embedder(s)
    store = open_store(s)
    ingest_into(s, (SourceItem(str(f)) for f in files), store=store, embedder=emb)
    real = store.catalog.max_image_id()
    # pad with synthetic vectors near the real ones (same dimension, same normalisation)
    vs = store.open_vectors()
    base = vs.get(np.arange(1, real + 1))
    rng = np.random.default_rng(0)
    start = real + 1
    now = utcnow()
    seg = vs.segment(10**8)  # the synthetic rows' own segment
    for i in range(start, n_vectors + 1, 50_000):
        m = min(50_000, n_vectors + 1 - i)
        v = base[rng.integers(0, real, m)] + rng.normal(scale=0.05, size=(m, base.shape[1])).astype(np.float32)
        first = seg.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        with store.catalog.engine.begin() as conn:
            conn.execute(insert(ImageRow), [dict(
                id=k, sha256=hashlib.sha256(f"synthetic{k}".encode()).hexdigest(), size_bytes=1, format="JPEG",
                width=1, height=1, frames=1, p_unsafe=0.0, model_id=emb.info.model_id, thumb_key="",
                flagged=False, deleted=False, created_at=now, updated_at=now, vec_segment=seg.number,
                vec_row=first + (k - i)) for k in range(i, i + m)])
    flagged = [int(i) for i in rng.choice(np.arange(1, n_vectors + 1), n_vectors // 10, replace=False)]
    for i in range(0, len(flagged), 5000):
        store.catalog.set_flag(flagged[i:i + 5000], FlagRequest("import", None, "bench"), flag=True)
    open_index(store, s).save()
    store.close()
    return {"FLAGMATCH_HOME": str(home), "FLAGMATCH_MODEL": str(model), "FLAGMATCH_API_TOKENS": "bench:bench"}, files


def model_costs(model: str, files: list[Path]) -> dict:
    """In this process, before the server starts: the model's single-image latency, its batched rate (the
    server's embed thread merges concurrent requests into batches of up to 8), and the per-upload CPU of
    the server's decode (model input, query views, PDQ) with the number of images each upload embeds."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import load_embedder
    from indexer.media.decode import decode
    settings = Settings.load({"model": model}, environ={})
    emb = load_embedder(settings)
    px = [decode(f.read_bytes(), emb.info.input).pixels[None] for f in files[:8]]
    emb.embed(px[0])
    lat = []
    for _ in range(5):
        for p in px:
            t = time.perf_counter()
            emb.embed(p)
            lat.append((time.perf_counter() - t) * 1000)
    batch = np.concatenate(px)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(4):
            emb.embed(batch)
        rates.append(4 * len(batch) / (time.perf_counter() - t))
    cpu, views = [], []
    for f in files[:8]:
        data = f.read_bytes()
        t = time.process_time()
        img = decode(data, emb.info.input, thumb_size=0, views=settings.query_views)
        cpu.append((time.process_time() - t) * 1000)
        views.append(1 + len(img.views))
    return {"latency_ms": median(lat), "batched_rate": median(rates), "precision": emb.info.precision,
            "decode_cpu_ms": median(cpu), "images_per_upload": float(np.mean(views))}


def wrk(port: int, work: Path, kind: str, conns: int, seconds: int, ids: int) -> subprocess.Popen:
    """wrk driving search-by-``kind`` (``id`` or ``upload``: the bodies in ``work/bodies``) with the script in
    ``work/search.lua``; ``wrk_result`` waits for it."""
    env = dict(os.environ, FM_IDS=str(ids), FM_CTYPE=multipart(b"")[1] if kind == "upload" else "application/json",
               FM_BODIES=str(work / "bodies") if kind == "upload" else "")
    return subprocess.Popen(["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds}s", "--timeout",
                             "30s", "-s", str(work / "search.lua"), f"http://127.0.0.1:{port}"], env=env,
                            stdout=subprocess.PIPE, text=True)


def wrk_result(p: subprocess.Popen) -> dict:
    """The script's FMJSON line (requests, seconds, p50/p95/p99 ms, errors) with requests/s added."""
    out = p.communicate()[0]
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {out[-2000:]}")
    r = json.loads(next(line for line in out.splitlines() if line.startswith("FMJSON"))[7:])
    r["rps"] = r["requests"] / r["seconds"]
    return r


PARTS = ("fm-model", "fm-decode", "fm-request")  # the kernel thread names flagmatch gives (indexer.models.threads)


def cpu_by_part(before: dict[int, tuple[str, int, float]], after: dict[int, tuple[str, int, float]]
                ) -> dict[str, float]:
    """CPU seconds spent between two ``tests.helpers.thread_stats`` readings, by part (every other thread is
    ``other``)."""
    out = dict.fromkeys((*PARTS, "other"), 0.0)
    for tid, (name, _, cpu) in after.items():
        out[name if name in PARTS else "other"] += cpu - before.get(tid, (name, 0, 0.0))[2]
    return out


def multipart(data: bytes) -> tuple[bytes, str]:
    b = "fmBench0123456789"
    return ((f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n\r\n").encode()
            + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}")


def stage_shares(port: int, bodies: list[tuple[bytes, str]]) -> dict[str, float]:
    """Each stage's share of the request's time seen by a client on one kept-alive connection (100 sequential
    requests): the stages from the Server-Timing header, the rest of the handler (parsing, auth, readiness,
    the response; ``handler`` minus the stages), and what lies outside the handler (HTTP, gunicorn, WSGI)."""
    import http.client
    sums: dict[str, float] = {}
    wall = 0.0
    conn = http.client.HTTPConnection("127.0.0.1", port)
    try:
        for i in range(100):
            body, ctype = bodies[i % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", "/api/v1/search", body=body,
                         headers={"Authorization": "Bearer bench", "Content-Type": ctype})
            r = conn.getresponse()
            r.read()
            wall += (time.perf_counter() - t) * 1000
            for part in r.headers["Server-Timing"].split(","):
                name, dur = part.strip().split(";dur=")
                sums[name] = sums.get(name, 0.0) + float(dur)
    finally:
        conn.close()
    handler = sums.pop("handler")
    out = {k: v / wall for k, v in sums.items()}
    out["rest of handler"] = max(0.0, handler - sum(sums.values())) / wall
    out["http+wsgi"] = max(0.0, 1 - handler / wall)
    return out


def serve_runs(a: argparse.Namespace, work: Path, env: dict, lanes: int, kinds: tuple[str, ...],
               uploads: list[tuple[bytes, str]], data: dict, rows: list) -> dict | None:
    """One server with ``serve_lanes`` = ``lanes``: wrk at 1, 4 and 16 connections for each query kind, with the
    server's CPU per request by part; the stage shares when it serves ids too."""
    from tests.helpers import start_server, stop_server, thread_stats
    server, base, log = start_server({**env, "FLAGMATCH_WORKERS": str(a.workers), "FLAGMATCH_THREADS": str(a.threads),
                                      "FLAGMATCH_SERVE_LANES": str(lanes)}, work / "server.log", timeout=600)
    port = int(base.rsplit(":", 1)[1])
    workers = [int(c) for c in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
    label = "every batch on all cores (1)" if lanes == 1 else f"lanes ({lanes or 'one per core'}; default)"
    try:
        for kind in kinds:
            for conns in (1, 4, 16):
                before = {w: thread_stats(w) for w in workers}
                r = wrk_result(wrk(port, work, kind, conns, a.seconds, a.vectors))
                # the server's CPU per request by part: where the machine went besides the model's own work
                parts = [cpu_by_part(before[w], thread_stats(w)) for w in workers]
                r["cpu_ms_per_request"] = {k: sum(pt[k] for pt in parts) / max(r["requests"], 1) * 1000
                                           for k in parts[0]}
                r.update(kind=kind, connections=conns, serve_lanes=lanes, label=label)
                data["runs"].append(r)
                rows.append([f"by {kind}", label, conns, r["p50"], r["p95"], r["p99"], r["rps"], r["errors"]])
                print(json.dumps(r), flush=True)
        if "id" not in kinds:
            return None
        id_body = (json.dumps({"id": 5, "k": 10}).encode(), "application/json")
        return {"id": stage_shares(port, [id_body]), "upload": stage_shares(port, uploads)}
    finally:
        stop_server(server, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--work", default="/tmp/fm-bench-api")
    ap.add_argument("--serve-lanes", type=int, default=0, help="the server's serve_lanes (0: its default)")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env, files = build_store(work, a.vectors, a.photos)
    costs = model_costs(env["FLAGMATCH_MODEL"], files)
    lat_model, precision = costs["latency_ms"], costs["precision"]
    sys.path.insert(0, str(ROOT))
    bodies_dir = work / "bodies"
    bodies_dir.mkdir(exist_ok=True)
    uploads = [multipart(f.read_bytes()) for f in files[:8]]
    for i, (body, _) in enumerate(uploads):
        (bodies_dir / f"body{i}").write_bytes(body)
    (work / "search.lua").write_text(LUA)
    rows, data = [], {"machine": machine(), "vectors": a.vectors, "model_latency_ms": lat_model,
                      "precision": precision, "costs": costs, "runs": []}
    shares: dict = {}
    # the default server first (every query kind), then uploads again with every batch on every core
    # (serve_lanes 1: what the default does when a batch is alone) to show what the lanes change
    for lanes, kinds in ((a.serve_lanes, ("id", "upload")), (1, ("upload",))):
        shares = serve_runs(a, work, env, lanes, kinds, uploads, data, rows) or shares
    data["stage_shares"] = shares
    default = [r for r in data["runs"] if r["serve_lanes"] == a.serve_lanes]
    up1 = next(r for r in default if r["kind"] == "upload" and r["connections"] == 1)
    # the most uploads a second the model allows (its batched rate over the images each upload embeds), and the
    # ideal with the server's decoding on the same cores: cores ÷ (model CPU + decode CPU) per upload
    cores = os.cpu_count() or 1
    model_bound = costs["batched_rate"] / costs["images_per_upload"]
    ideal = cores / (costs["images_per_upload"] * cores / costs["batched_rate"] + costs["decode_cpu_ms"] / 1000)
    conc = [r for r in default if r["kind"] == "upload" and r["connections"] > 1]
    data.update(model_bound_rps=model_bound, ideal_rps=ideal)
    share_rows = [[k] + [f"{v.get(s, 0):.0%}" for s in ("decode", "embed", "search", "hashes", "verify", "hydrate",
                                                          "rest of handler", "http+wsgi")]
                  for k, v in shares.items()]
    # where each upload's CPU went under load, by thread part; the machine's limit at that CPU per upload is
    # cores ÷ total, and the model alone would need images_per_upload × its batched CPU per image
    model_alone = costs["images_per_upload"] * cores / costs["batched_rate"] * 1000
    cpu_rows = []
    for r in (x for x in data["runs"] if x["kind"] == "upload"):
        c = r["cpu_ms_per_request"]
        total = sum(c.values())
        r["machine_limit_rps"] = cores / (total / 1000)
        cpu_rows.append([r["label"], r["connections"], r["rps"], f"{c['fm-model']:.0f} ({c['fm-model'] / model_alone:.2f}×)",
                         f"{c['fm-decode']:.1f}", f"{c['fm-request']:.1f}", f"{c['other']:.1f}", f"{total:.0f}",
                         f"{r['machine_limit_rps']:.1f}", f"{r['rps'] / r['machine_limit_rps']:.2f}",
                         f"{r['rps'] / model_bound:.2f}"])
    data["model_alone_cpu_ms_per_upload"] = model_alone
    md = (f"Search API on {machine()}: `flagmatch serve` (gunicorn, {a.workers} worker × {a.threads} threads) "
          f"on loopback, wrk for {a.seconds} s per row, {a.vectors:,} images ({a.vectors // 10:,} flagged), "
          f"default model architecture in {precision}; latencies in ms. The model's own single-image "
          f"latency (pre-decoded, same machine): {lat_model:.1f} ms; search-by-upload p50 at 1 connection is "
          f"{up1['p50'] / lat_model:.2f}× that. The model's batched rate (batches of 8, pre-decoded): "
          f"{costs['batched_rate']:.1f} images/s; each upload embeds {costs['images_per_upload']:.2f} images (the "
          f"whole image and the query views that apply) and its decode takes {costs['decode_cpu_ms']:.1f} ms CPU, "
          f"so the model allows {model_bound:.1f} uploads/s and the ideal with decoding on the same cores is "
          f"{ideal:.1f}/s; concurrent uploads reached "
          + ", ".join(f"{r['rps'] / model_bound:.2f} of the model's rate ({r['rps'] / ideal:.2f} of the ideal) at "
                      f"{r['connections']} connections" for r in conc) + " with the default settings. The model runs "
            "concurrent batches in lanes, one thread each (`serve_lanes`, default one per core), and a batch alone "
            "on every core; the rows marked (1) are a second server with every batch on every core.\n\n"
          + table(["query", "model", "connections", "p50 ms", "p95 ms", "p99 ms", "requests/s", "errors"], rows)
          + "\n\nShare of request time per stage (100 sequential requests on one kept-alive connection, from the "
            "Server-Timing header; hydrate = catalog lookups + JSON; rest of handler = parsing, auth, readiness and "
            "the response; HTTP/WSGI = the client's time outside the handler):\n\n"
          + table(["query", "decode", "embed", "search", "hashes", "verify", "hydrate+serialise", "rest of handler",
                   "HTTP/WSGI"], share_rows)
          + f"\n\nThe server's CPU per upload by part during each run above (ms; from each thread's CPU time in /proc, "
            f"threads told apart by the names flagmatch gives them; the model alone, pre-decoded in batches of 8, "
            f"needs {model_alone:.0f} ms CPU per upload). The machine's limit is cores ÷ the total: what the uploads "
            f"could reach with no time lost between stages at that CPU per upload.\n\n"
          + table(["model", "connections", "uploads/s", "model threads (× alone)", "decode", "request threads", "other",
                   "total", "machine's limit uploads/s", "measured ÷ limit", "measured ÷ model's rate"],
                  cpu_rows))
    write("search_api", data, md)


if __name__ == "__main__":
    main()
