"""Shared bits of the benchmark scripts: machine description, result files, Markdown tables."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, data: dict[str, Any], markdown: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    (OUT / f"{name}.md").write_text(markdown + "\n")
    print(markdown)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], q: float) -> float:
    import numpy as np
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], int]:
    """Run a child Python process that prints one JSON line last (with its own peak RSS)."""
    p = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, env={**os.environ, **(env or {})},
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}): {' '.join(args)}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return result, int(result.get("peak_rss_kib", 0))


def peak_rss_kib() -> int:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
