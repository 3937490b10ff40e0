"""Request threads' priority against the model's: `flagmatch serve` with `--request-nice` 0, 5 and 19 on the
store `benchmarks/search_api.py` built (run it first), in rounds, one server per setting and round:
uploads at 4 and 16 connections, lookups by id at 4, and both at once (4 + 4) — the mixed load where
request threads compete with the model for the cores.

    python benchmarks/request_priority.py [--nice 0,5,19] [--rounds 2] [--seconds 12]"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, median, table, write

sys.path.insert(0, str(ROOT))
from search_api import wrk, wrk_result  # noqa: E402
from tests.helpers import start_server, stop_server  # noqa: E402


IDS = 100_000  # the search API benchmark's default store size: ids 1..IDS exist


def result(p: subprocess.Popen) -> dict:
    r = wrk_result(p)
    return {"rps": r["rps"], "p50": r["p50"], "p99": r["p99"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nice", default="0,5,19")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=12)
    ap.add_argument("--work", default="/tmp/fm-bench-api")
    a = ap.parse_args()
    work = Path(a.work)
    if not (work / "home").is_dir() or not (work / "bodies").is_dir():
        sys.exit(f"no store in {work}: run benchmarks/search_api.py first")
    env = {"FLAGMATCH_HOME": str(work / "home"), "FLAGMATCH_MODEL": str(work / "vit_tiny_patch16_384-random"),
           "FLAGMATCH_API_TOKENS": "bench:bench", "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "8"}
    runs: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for nice in a.nice.split(","):
            server, base, log = start_server({**env, "FLAGMATCH_REQUEST_NICE": nice}, work / f"nice-{nice}.log",
                                             timeout=600)
            port = int(base.rsplit(":", 1)[1])
            try:
                result(wrk(port, work, "upload", 2, 4, IDS))  # warm-up
                r = {"up4": result(wrk(port, work, "upload", 4, a.seconds, IDS)),
                     "up16": result(wrk(port, work, "upload", 16, a.seconds, IDS)),
                     "id4": result(wrk(port, work, "id", 4, a.seconds, IDS))}
                up, ids = wrk(port, work, "upload", 4, a.seconds, IDS), wrk(port, work, "id", 4, a.seconds, IDS)
                r["mixed_up4"], r["mixed_id4"] = result(up), result(ids)
            finally:
                stop_server(server, log)
            runs.setdefault(nice, []).append(r)
            print(rnd, nice, json.dumps(r), flush=True)
    rows = []
    for nice, rs in runs.items():
        def m(key: str, field: str) -> float:
            return median([r[key][field] for r in rs])
        rows.append([nice, m("up4", "rps"), m("up16", "rps"), m("id4", "rps"), m("id4", "p50"),
                     m("mixed_up4", "rps"), m("mixed_id4", "rps"), m("mixed_id4", "p50")])
    md = (f"Request-thread priority on {machine()}: `flagmatch serve` (1 worker × 8 threads) over the search API "
          f"benchmark's store, wrk {a.seconds} s per measurement, median of {a.rounds} rounds (a server per setting "
          "and round, settings interleaved).\n\n"
          + table(["request niceness", "uploads/s, 4 conns", "uploads/s, 16 conns", "by id/s, 4 conns",
                   "by id p50 ms", "mixed: uploads/s", "mixed: by id/s", "mixed: by id p50 ms"], rows))
    write("request_priority", {"machine": machine(), "runs": runs}, md)


if __name__ == "__main__":
    main()
