"""What metrics and JSON logs cost a served search: the same store served with them off (`--metrics false
--access-log false`, text logs) and on (the defaults, `--log-format json`: one JSON line per request, the
request counters, latency and stage histograms), alternating in rounds so drift hits both alike; wrk
drives search-by-id and search-by-upload at 4 connections.

    python benchmarks/ops_overhead.py [--rounds 3] [--seconds 10]

Uses the search API benchmark's store (`benchmarks/search_api.py` builds it in --work). Run it from the
repository root. Results: benchmarks/results/ops_overhead.{json,md}."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from common import ROOT, machine, median, table, write

from search_api import LUA, multipart, wrk, wrk_result  # noqa: E402

CONFIGS = {"off": {"FLAGMATCH_METRICS": "false", "FLAGMATCH_ACCESS_LOG": "false", "FLAGMATCH_LOG_FORMAT": "text"},
           "on": {"FLAGMATCH_METRICS": "true", "FLAGMATCH_ACCESS_LOG": "true", "FLAGMATCH_LOG_FORMAT": "json"}}


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hook_cost(env: dict[str, str], ids: int, n: int = 3000) -> dict:
    """Time the metrics' and the access line's hooks themselves (wrapped where Flask calls them) over ``n``
    searches by id through the app in this process, with JSON logs going to a file."""
    import logging
    import time

    import faiss

    from flagmatch import logs
    from flagmatch.runtime import build_app
    from flagmatch.settings import Settings
    faiss.omp_set_num_threads(1)  # as a server worker runs it: idle OpenMP threads would spin beside the hooks
    s = Settings.load({"home": env["FLAGMATCH_HOME"], "model": env["FLAGMATCH_MODEL"], "api_tokens": "bench:bench",
                       "log_format": "json"}, environ={})
    logs.configure("json")
    handler = next(h for h in logging.getLogger().handlers if h.get_name() == "flagmatch")
    sink = open(Path(env["FLAGMATCH_HOME"]).parent / "ops-hooks.log", "w")
    logging.getLogger().removeHandler(handler)
    to_file = logging.StreamHandler(sink)
    to_file.setFormatter(logs.formatter("json"))
    logging.getLogger().addHandler(to_file)
    app = build_app(s)
    spent = {"metrics": 0.0, "access": 0.0}

    def timed(fn, part):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            t = time.perf_counter()  # one thread at work (FAISS on one thread): its wall time is its CPU
            try:
                return fn(*args)
            finally:
                spent[part] += time.perf_counter() - t
        return wrapper
    for funcs in (app.before_request_funcs, app.after_request_funcs):
        for key, fs in funcs.items():
            funcs[key] = [timed(f, "metrics") if f.__module__ == "search.metrics" else
                          timed(f, "access") if f.__name__ == "_access_line" else f for f in fs]
    client = app.test_client()
    auth = {"Authorization": "Bearer bench"}
    for i in range(300):
        client.post("/api/v1/search", json={"id": 1 + i % ids, "k": 10}, headers=auth)
    spent.update(metrics=0.0, access=0.0)
    t = time.perf_counter()
    for i in range(n):
        client.post("/api/v1/search", json={"id": 1 + i % ids, "k": 10}, headers=auth)
    wall = time.perf_counter() - t
    logging.getLogger().removeHandler(to_file)
    sink.close()
    return {"requests": n, "metrics_us": spent["metrics"] / n * 1e6, "access_us": spent["access"] / n * 1e6,
            "request_ms": wall / n * 1000, "share": (spent["metrics"] + spent["access"]) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--work", default="/tmp/fm-bench-api")
    ap.add_argument("--hooks-only", action="store_true", help="measure the hooks again; keep the served runs of the "
                                                                "last results file")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    work = Path(a.work)
    home = work / "home"
    model = next(work.glob("vit_tiny_patch16_384-*"), None)
    if not (home / "catalog.sqlite").exists() or model is None:
        sys.exit(f"no search API store in {work}: run benchmarks/search_api.py first")
    from indexer.storage.store import Store
    store = Store(home, f"sqlite:///{home / 'catalog.sqlite'}")
    ids = store.catalog.max_image_id()
    store.close()
    bodies = sorted((work / "bodies").glob("body*"))
    if not bodies:
        sys.exit(f"no upload bodies in {work / 'bodies'}: run benchmarks/search_api.py first")
    (work / "search.lua").write_text(LUA)
    env = {"FLAGMATCH_HOME": str(home), "FLAGMATCH_MODEL": str(model), "FLAGMATCH_API_TOKENS": "bench:bench",
           "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "8"}
    from tests.helpers import start_server, stop_server
    runs: list[dict] = []
    if a.hooks_only:
        last = json.loads((ROOT / "benchmarks" / "results" / "ops_overhead.json").read_text())
        runs, a.rounds, a.seconds, a.connections = last["runs"], last["rounds"], last["seconds"], last["connections"]
    for rnd in range(0 if a.hooks_only else a.rounds):
        for name in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            extra = CONFIGS[name]
            log_path = work / f"ops-{name}.log"
            server, base, log = start_server({**env, **extra}, log_path, timeout=600)
            port = int(base.rsplit(":", 1)[1])
            worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
            try:
                wrk_result(wrk(port, work, "id", a.connections, 3, ids))  # warm up
                for kind in ("id", "upload"):
                    cpu = _cpu_seconds(worker)
                    r = wrk_result(wrk(port, work, kind, a.connections, a.seconds, ids))
                    r["cpu_ms_per_request"] = (_cpu_seconds(worker) - cpu) / max(r["requests"], 1) * 1000
                    r.update(config=name, kind=kind, round=rnd)
                    runs.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                stop_server(server, log)
            if name == "on":
                lines = log_path.read_text().splitlines()
                access = sum(1 for line in lines if '"flagmatch.access"' in line)
                runs[-1]["access_lines"] = access
    rows, summary = [], {}
    for kind in ("id", "upload"):
        got = {c: [r for r in runs if r["config"] == c and r["kind"] == kind] for c in CONFIGS}
        p50 = {c: median([r["p50"] for r in got[c]]) for c in CONFIGS}
        rps = {c: median([r["rps"] for r in got[c]]) for c in CONFIGS}
        pairs = list(zip(got["off"], got["on"]))  # same round
        errors = sum(r["errors"] for c in CONFIGS for r in got[c])
        cpu = {c: median([r["cpu_ms_per_request"] for r in got[c]]) for c in CONFIGS}
        summary[kind] = {"p50": p50, "rps": rps, "p50_cost": median([on["p50"] / off["p50"] for off, on in pairs]) - 1,
                         "rps_cost": 1 - median([on["rps"] / off["rps"] for off, on in pairs]), "errors": errors,
                         "cpu_ms": cpu}
        rows.append([f"by {kind}", p50["off"], p50["on"], f"{summary[kind]['p50_cost']:+.1%}", rps["off"], rps["on"],
                     f"{summary[kind]['rps_cost']:+.1%}", cpu["off"], errors])
    hooks = hook_cost(env, ids)
    hooks_us = hooks["metrics_us"] + hooks["access_us"]
    data = {"machine": machine(), "rounds": a.rounds, "seconds": a.seconds, "connections": a.connections,
            "runs": runs, "summary": summary, "hooks": hooks}
    md = (f"Cost of metrics and JSON request logs on {machine()}: `flagmatch serve` (1 worker × 8 threads) on the "
          f"search API benchmark's store ({ids:,} images), wrk at {a.connections} connections for {a.seconds} s per "
          f"row, off (`--metrics false --access-log false`, text logs) and on (metrics, one JSON log line per "
          f"request) alternating over {a.rounds} rounds; medians of the rounds (p50 in ms; cost: on against off, "
          f"positive is slower).\n\n"
          + table(["query", "p50 off", "p50 on", "p50 cost", "requests/s off", "requests/s on", "throughput cost",
                   "server CPU ms per request (off)", "errors"], rows)
          + f"\n\nThe hooks' own time, in one process (the same app, {hooks['requests']:,} searches by id, JSON "
            f"access lines written to a file): metrics {hooks['metrics_us']:.0f} µs, access line "
            f"{hooks['access_us']:.0f} µs per request — {hooks['share']:.1%} of the {hooks['request_ms']:.2f} ms a search "
            f"by id took there (FAISS on one thread, as in a server worker); against the served worker's CPU per "
            f"request (off) that is {hooks_us / 1000 / summary['id']['cpu_ms']['off']:.1%} of a search by id and "
            f"{hooks_us / 1000 / summary['upload']['cpu_ms']['off']:.2%} of one by upload — the throughput the hooks take "
            f"from a server whose cores are saturated.")
    write("ops_overhead", data, md)


if __name__ == "__main__":
    main()
