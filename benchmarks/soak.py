"""Soak: minutes of mixed load on a real `flagmatch serve` (gunicorn, loopback), driven by locust — searches
by id and by upload, flag/unflag, one `reindex` publish half-way, 5 % hostile uploads. Reports requests,
errors by status, p50/p99 per kind, and each worker's RSS at start and end (and whether any restarted).
Targets: zero 5xx, RSS growth under 10 %, no worker restart.

    pip install -e '.[bench]'
    python benchmarks/soak.py [--minutes 10] [--users 8] [--images 400]"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, table, write


def worker_rss(server_pid: int) -> dict[int, float]:
    import psutil
    return {c.pid: c.memory_info().rss / 2**20 for c in psutil.Process(server_pid).children()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--work", default="/tmp/flagmatch-soak")
    args = ap.parse_args()

    from tests.helpers import start_server, stop_server, write_images
    from tests.helpers.hostile import write_all

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    images = write_images(work / "in", args.images)
    hostile = write_all(work / "hostile")
    for p in hostile:  # what an upload limit of 32 MB lets through; larger ones are refused (413) by the server
        if p.stat().st_size > 16 << 20:
            p.unlink()
    env = dict(os.environ, FLAGMATCH_HOME=str(work / "home"), FLAGMATCH_MODEL="opennsfw",
               FLAGMATCH_API_TOKENS="bench:bench", FLAGMATCH_WORKERS="2", FLAGMATCH_THREADS="4",
               FLAGMATCH_FLAG_THRESHOLD="0.0")
    cli = [sys.executable, "-m", "flagmatch.cli"]
    subprocess.run(cli + ["ingest", str(work / "in")], env=env, check=True, capture_output=True)
    proc, base, log = start_server(env, work / "server.log")
    try:
        time.sleep(2)
        rss_start = worker_rss(proc.pid)
        status_file = work / "status.json"
        run_s = int(args.minutes * 60)
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "soak_locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(args.users), "--run-time", f"{run_s}s", "--host", base,
             "--csv", str(work / "soak"), "--only-summary", "--loglevel", "WARNING"],
            env={**env, "SOAK_IMAGES": str(work / "in"), "SOAK_HOSTILE": str(work / "hostile"),
                 "SOAK_MAX_ID": str(args.images), "SOAK_STATUS_FILE": str(status_file)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        warm_s = min(60.0, run_s / 6)  # allocator pools and the model's buffers settle in the first minute
        time.sleep(warm_s)
        rss_warm = worker_rss(proc.pid)
        time.sleep(max(0.0, run_s / 2 - warm_s))
        t = time.perf_counter()
        subprocess.run(cli + ["reindex"], env=env, check=True, capture_output=True)
        reindex_s = time.perf_counter() - t
        _, err = locust.communicate(timeout=run_s + 120)
        rss_end = worker_rss(proc.pid)
    finally:
        stop_server(proc, log)
    statuses = json.loads(status_file.read_text())
    rows = []
    with open(work / "soak_stats.csv") as f:
        for r in csv.DictReader(f):
            rows.append([r["Name"], int(r["Request Count"]), int(r["Failure Count"]), float(r["50%"]),
                         float(r["99%"])])
    by_status: dict[str, int] = {}
    for key, n in statuses.items():
        code = key.rsplit(" ", 1)[1]
        by_status[code] = by_status.get(code, 0) + n
    server_errors = sum(n for code, n in by_status.items() if code.startswith("5") and code != "503")
    restarted = set(rss_start) != set(rss_end)

    growth = {pid: (rss_end.get(pid, 0) - mb) / mb for pid, mb in rss_warm.items()}
    md = [f"Machine: {machine()}. {args.minutes:g} min, {args.users} locust users, 2 workers × 4 threads, "
          f"model opennsfw, {args.images} images; one `reindex` published half-way ({reindex_s:.1f} s).", "",
          table(["request", "count", "failures", "p50 ms", "p99 ms"], rows), "",
          "Responses by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())) +
          f". Server errors (5xx other than 503 overloaded): **{server_errors}**.", "",
          table(["worker", "RSS at start MiB", f"after {warm_s:.0f} s warm-up MiB", "at end MiB",
                 "growth after warm-up"],
                [[pid, mb, rss_warm.get(pid, float("nan")), rss_end.get(pid, float("nan")),
                  f"{growth.get(pid, float('nan')) * 100:+.1f} %"] for pid, mb in rss_start.items()]),
          "", f"Worker restarts: {'yes' if restarted else 'none'}."]
    write("soak", {"machine": machine(), "minutes": args.minutes, "users": args.users, "rows": rows,
                   "statuses": statuses, "by_status": by_status, "server_errors": server_errors,
                   "rss_start_mib": rss_start, "rss_warm_mib": rss_warm, "rss_end_mib": rss_end, "restarted": restarted,
                   "reindex_s": reindex_s, "locust_stderr_tail": err[-2000:]}, "\n".join(md))


if __name__ == "__main__":
    main()
