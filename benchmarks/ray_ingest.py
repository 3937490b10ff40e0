"""Ingest on Ray against a local ingest on the same machine: the same 400 real images (make-corpus), the
default model's architecture, as `flagmatch ingest` (local) and `flagmatch ingest --ray` on a one-node and
a two-node Ray cluster of this host (the same cores in every case, so the difference is Ray's overhead).
Also the driver's peak RSS for 10k and 100k source items (hard links to the corpus: every item is read and
hashed on the workers and found in the catalog, so the driver streams them all without model work).

    python benchmarks/ray_ingest.py [--work /tmp/fm-bench-ray]"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, median, table, write

sys.path.insert(0, str(ROOT / "benchmarks"))
from ingest import corpus, default_arch_model  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS KiB of the process, stdout)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({status}): {out[-2000:]}")
    return time.perf_counter() - t, int(usage.ru_maxrss), out


class Cluster:
    def __init__(self, cpus: list[int], env: dict) -> None:
        self.temp = tempfile.mkdtemp(prefix="fmrb", dir="/tmp")
        token = Path(self.temp) / "auth_token"
        token.write_text(os.urandom(32).hex())
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", str(cpus[0]), "--temp-dir",
                        self.temp, "--include-dashboard", "false", *common], env=self.env, check=True,
                       capture_output=True)
        for c in cpus[1:]:
            subprocess.run([RAY, "start", "--address", self.address, "--num-cpus", str(c), *common],
                           env=self.env, check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True)
        shutil.rmtree(self.temp, ignore_errors=True)


def links(files: list[Path], n: int, folder: Path) -> Path:
    if folder.exists() and len(list(folder.iterdir())) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k in range(n):
        os.link(files[k % len(files)], folder / f"l{k:06d}{files[k % len(files)].suffix}")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/fm-bench-ray")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    files = corpus(Path("/tmp/fm-bench-ingest"), 300, 100)
    folder = files[0].parent.parent
    model = default_arch_model(Path("/tmp/fm-bench-ingest"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLAGMATCH_")}
    base.update(FLAGMATCH_MODEL=str(model), FLAGMATCH_INDEX_SAVE_SECONDS="1e9", FLAGMATCH_RAY_ACTOR_CPUS="1")
    cli = [sys.executable, "-m", "flagmatch.cli", "ingest", str(folder)]
    data: dict = {"machine": machine(), "images": len(files), "runs": {}}
    configs = [("local", None), ("Ray, 1 node (2 CPUs)", [2]), ("Ray, 2 nodes (1 + 1 CPU)", [1, 1])]
    for name, cpus in configs:
        cluster = Cluster(cpus, base) if cpus else None
        try:
            walls = []
            for r in range(a.repeats):
                home = work / f"home-{len(walls)}"
                shutil.rmtree(home, ignore_errors=True)
                env = {**(cluster.env if cluster else base), "FLAGMATCH_HOME": str(home)}
                cmd = cli + (["--ray", cluster.address] if cluster else [])
                wall, rss, out = run(cmd, env)
                walls.append(wall)
            data["runs"][name] = {"walls": walls, "images_per_s": len(files) / median(walls), "driver_rss_kib": rss}
            if cluster and len(cpus) == 2:  # driver memory against the number of source items
                for n in (10_000, 100_000):
                    env = {**cluster.env, "FLAGMATCH_HOME": str(work / "home-0")}
                    wall, rss, out = run([sys.executable, "-m", "flagmatch.cli", "ingest",
                                          str(links(files, n, work / f"links-{n}")), "--ray", cluster.address], env)
                    data["runs"][name][f"driver_rss_kib_{n}"] = rss
                    data["runs"][name][f"seconds_{n}"] = wall
        finally:
            if cluster:
                cluster.stop()
    local = data["runs"]["local"]["images_per_s"]
    rows = [[name, f"{r['images_per_s']:.2f}", f"{1 - r['images_per_s'] / local:+.0%}" if name != "local" else "",
             f"{r['driver_rss_kib'] / 1024:.0f} MiB"] for name, r in data["runs"].items()]
    two = data["runs"][configs[2][0]]
    md = (f"Ray ingest on {machine()}: {len(files)} make-corpus images (photos + clipart), the default model's "
          f"architecture (vit_tiny_patch16_384, random weights, same compute), one model thread per actor; "
          f"wall time of the whole command (start-up included), median of {a.repeats}; overhead = 1 − Ray rate ÷ "
          f"local rate on the same cores.\n\n"
          + table(["run", "images/s", "overhead vs local", "driver peak RSS"], rows)
          + f"\n\nDriver peak RSS as the number of source items grows (hard links to the corpus, all found in the "
            f"catalog on the workers: streamed without model work), two-node cluster: 10k items "
            f"{two['driver_rss_kib_10000'] / 1024:.0f} MiB ({two['seconds_10000']:.0f} s), 100k items "
            f"{two['driver_rss_kib_100000'] / 1024:.0f} MiB ({two['seconds_100000']:.0f} s).")
    write("ray_ingest", data, md)


if __name__ == "__main__":
    main()
