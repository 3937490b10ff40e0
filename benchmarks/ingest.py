"""Ingest throughput: model-only (pre-decoded pixels) vs end-to-end `ingest` on the same real images,
for both backends, plus peak RSS at two corpus sizes (it must not grow with the number of images).

It also measures, in the same run, what each stage costs in CPU per image on one thread — reading and
hashing the bytes (sha256, MD5), decoding to the model's input, the thumbnail (resample + WebP), PDQ —
and from those and the model's CPU per image (cores ÷ model-only rate) the ideal end-to-end rate:
cores ÷ (model CPU + everything else's CPU). measured ÷ ideal says how much of the machine the pipeline
itself loses (waiting, oversubscription, batch formation).

    python benchmarks/ingest.py [--photos 300] [--clipart 100] [--work /tmp/fm-bench-ingest]

The corpus comes from ../shared/corpus/make-corpus (photos and clipart from Debian packages). The
default model's weights are on the model hub, unreachable here: its architecture
(vit_tiny_patch16_384, 2 classes) runs with random weights, which costs exactly the same compute."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, median, peak_rss_kib, run_child, table, write


def corpus(work: Path, photos: int, clipart: int) -> list[Path]:
    out = work / f"corpus-{photos}-{clipart}"
    if not (out / "photos").exists():
        subprocess.run([sys.executable, str(ROOT.parent / "shared" / "corpus" / "make-corpus"), str(out),
                        "--photos", str(photos), "--clipart", str(clipart)], check=True)
    return sorted((out / "photos").glob("*")) + sorted((out / "clipart").glob("*"))


def default_arch_model(work: Path) -> Path:
    d = work / "vit_tiny_patch16_384-random"
    if not (d / "model.safetensors").exists():
        sys.path.insert(0, str(ROOT))
        from tests.helpers import save_tiny_timm
        save_tiny_timm(d)
    return d


def worker_model(args: argparse.Namespace) -> dict:
    """Model-only: decode first (not timed), then time embed() over batches of pre-decoded pixels."""
    import numpy as np
    from indexer.media.decode import decode
    from indexer.models.embed import load_model
    from indexer.errors import DecodeError

    emb = load_model(args.model)
    spec = emb.info.input
    pixels = []
    for p in json.loads(Path(args.files).read_text())[: args.model_images]:
        try:
            pixels.append(decode(Path(p).read_bytes(), spec).pixels)
        except DecodeError:
            pass
    px = np.stack(pixels)
    bs = args.batch_size
    emb.embed(px[:bs])  # warm-up
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, len(px), bs):
            emb.embed(px[i:i + bs])
        rates.append(len(px) / (time.perf_counter() - t))
    return {"images_per_s": median(rates), "images": len(px), "precision": emb.info.precision,
            "model_id": emb.info.model_id, "peak_rss_kib": peak_rss_kib()}


def worker_stages(args: argparse.Namespace) -> dict:
    """CPU per image of each non-model stage, on one thread (process time, median of 3 passes)."""
    import hashlib
    import os
    from indexer.media.decode import decode
    from indexer.models.embed import load_model
    from indexer.errors import DecodeError
    from indexer.media.hashes import md5_of

    spec = load_model(args.model).info.input
    datas = [Path(p).read_bytes() for p in json.loads(Path(args.files).read_text())]

    def cpu(fn) -> float:
        times = []
        for _ in range(3):
            t = time.process_time()
            for d in datas:
                try:
                    fn(d)
                except DecodeError:
                    pass
            times.append((time.process_time() - t) / len(datas) * 1000)
        return median(times)

    hashing = cpu(lambda d: (hashlib.sha256(d).hexdigest(), md5_of(d)))
    # the decoder as it was when the throughput work began, loaded from git beside today's, same files
    old = baseline_decoder()
    old_spec = old.InputSpec(spec.size, spec.crop_pct, spec.interpolation) if old else None
    baseline = cpu(lambda d: old.decode(d, old_spec, max_pixels=10**8, thumb_size=256)) if old else None
    model_input = cpu(lambda d: decode(d, spec, thumb_size=0, pdq=False))
    with_thumb = cpu(lambda d: decode(d, spec, thumb_size=256, pdq=False))
    everything = cpu(lambda d: decode(d, spec, thumb_size=256, pdq=True))
    return {"hash_ms": hashing, "decode_ms": model_input, "thumbnail_ms": max(with_thumb - model_input, 0.0),
            "decode_thumbnail_ms": with_thumb, "baseline_decode_thumbnail_ms": baseline,
            "pdq_ms": max(everything - with_thumb, 0.0), "total_ms": hashing + everything,
            "cores": os.cpu_count() or 1}


BASELINE_DECODER = "ac10d06"  # indexer/media/decode.py when the throughput work (decode + thumbnail CPU) began


def baseline_decoder():  # type: ignore[no-untyped-def]
    """``indexer/media/decode.py`` at BASELINE_DECODER as a module, or None outside a git checkout."""
    import importlib.util
    import tempfile
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_DECODER}:indexer/media/decode.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "baseline_decode.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_decode", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["baseline_decode"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def worker_ingest(args: argparse.Namespace) -> dict:
    from flagmatch.settings import Settings
    from flagmatch.wiring import ingest_into, load_embedder
    from indexer.ingest.sources import SourceItem

    s = Settings.load({"home": args.home, "model": args.model, "batch_size": args.batch_size,
                       "index_save_seconds": 1e9, "model_lanes": args.model_lanes}, environ={})
    emb = load_embedder(s)
    files = json.loads(Path(args.files).read_text())[: args.limit]
    with ThreadCpu() as cpu:
        t = time.perf_counter()
        counts = ingest_into(s, (SourceItem(p) for p in files), embedder=emb).counts
        dt = time.perf_counter() - t
    n = max(counts.new + counts.failed, 1)
    return {"images_per_s": (counts.new + counts.failed) / dt, "new": counts.new, "failed": counts.failed,
            "reasons": counts.reasons, "seconds": dt, "precision": emb.info.precision,
            "peak_rss_kib": peak_rss_kib(), "cpu_ms_per_image": {k: v / n * 1000 for k, v in cpu.parts.items()},
            "busy_cores": sum(cpu.parts.values()) / dt}


class ThreadCpu:
    """CPU seconds this process's threads spend while inside the block, by part: ``model`` (the model's threads
    and lanes, ``fm-model``), ``decode`` (``fm-decode``) and ``write`` (every other thread: the main thread's
    catalog, vector and thumbnail writes). Read from /proc every 50 ms, so threads that end inside the block
    (the pools do) still count up to their last reading."""

    def __init__(self) -> None:
        import threading
        sys.path.insert(0, str(ROOT))
        from tests.helpers import thread_stats
        self._stats = thread_stats
        self._stop = threading.Event()
        self._last: dict[int, tuple[str, float]] = {}
        self._base: dict[int, tuple[str, float]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.parts: dict[str, float] = {}

    def _read(self) -> None:
        import os
        for tid, (name, _, cpu) in self._stats(os.getpid()).items():
            if tid != self._thread.native_id:
                self._last[tid] = (name, cpu)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def __enter__(self) -> "ThreadCpu":
        self._read()
        self._base = dict(self._last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        parts = {"model": 0.0, "decode": 0.0, "write": 0.0}
        for tid, (name, cpu) in self._last.items():
            part = "model" if name == "fm-model" else "decode" if name == "fm-decode" else "write"
            parts[part] += cpu - self._base.get(tid, (name, 0.0))[1]
        self.parts = parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--clipart", type=int, default=100)
    ap.add_argument("--work", default="/tmp/fm-bench-ingest")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model-images", type=int, default=256)
    ap.add_argument("--worker", choices=["model", "ingest", "stages"])
    ap.add_argument("--model")
    ap.add_argument("--files")
    ap.add_argument("--home")
    ap.add_argument("--limit", type=int, default=10**9)
    ap.add_argument("--model-lanes", type=int, default=0, help="ingest's model_lanes (0: its default)")
    a = ap.parse_args()
    if a.worker:
        fn = {"model": worker_model, "ingest": worker_ingest, "stages": worker_stages}[a.worker]
        print(json.dumps(fn(a)))
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    files = corpus(work, a.photos, a.clipart)
    # interleave photos and clipart, as a real upload folder would mix them
    ph, cl = [f for f in files if "photo" in f.name], [f for f in files if "clip" in f.name]
    mixed = [str(x) for pair in zip(ph, cl) for x in pair] + [str(x) for x in ph[len(cl):] + cl[len(ph):]]
    listing = work / "files.json"
    listing.write_text(json.dumps(mixed))
    models = {"timm (vit_tiny_patch16_384)": str(default_arch_model(work)), "onnx (opennsfw)": "opennsfw"}
    rows, ideal_rows, decode_rows, cpu_rows = [], [], [], []
    data = {"machine": machine(), "corpus": {"photos": a.photos, "clipart": a.clipart}, "runs": {}}
    half = len(mixed) // 2
    for name, model in models.items():
        common = [__file__, "--model", model, "--files", str(listing), "--batch-size", str(a.batch_size)]
        m, _ = run_child(common + ["--worker", "model", "--model-images", str(a.model_images)])
        st, _ = run_child(common + ["--worker", "stages"])
        results = {}
        for n in (half, len(mixed)):
            home = work / f"home-{abs(hash((name, n)))}"
            subprocess.run(["rm", "-rf", str(home)], check=True)
            r, _ = run_child(common + ["--worker", "ingest", "--home", str(home), "--limit", str(n)])
            results[n] = r
        full = results[len(mixed)]
        # the same full run with the model's batches one at a time on every core (model_lanes 1), for comparison
        home = work / f"home-{abs(hash((name, 'one lane')))}"
        subprocess.run(["rm", "-rf", str(home)], check=True)
        one_lane, _ = run_child(common + ["--worker", "ingest", "--home", str(home), "--model-lanes", "1"])
        ratio = full["images_per_s"] / m["images_per_s"]
        model_ms = st["cores"] / m["images_per_s"] * 1000
        ideal = st["cores"] / ((model_ms + st["total_ms"]) / 1000)
        data["runs"][name] = {"model_only": m, "ingest": results, "ratio": ratio, "stages": st,
                              "model_cpu_ms": model_ms, "ideal_images_per_s": ideal,
                              "measured_over_ideal": full["images_per_s"] / ideal, "one_lane": one_lane}
        ideal_rows.append([name, m["images_per_s"], f"{model_ms:.1f}", f"{st['hash_ms']:.2f}", f"{st['decode_ms']:.2f}",
                           f"{st['thumbnail_ms']:.2f}", f"{st['pdq_ms']:.2f}",
                           f"{ideal:.1f} ({ideal / m['images_per_s']:.2f} of model-only)",
                           full["images_per_s"], f"{full['images_per_s'] / ideal:.2f}", one_lane["images_per_s"],
                           f"{one_lane['images_per_s'] / ideal:.2f}"])
        c = full["cpu_ms_per_image"]
        cpu_rows.append([name, f"{model_ms:.1f}", f"{st['total_ms']:.1f}", f"{c['model']:.1f}", f"{c['decode']:.1f}",
                         f"{c['write']:.1f}", f"{sum(c.values()) / (model_ms + st['total_ms']):.2f}",
                         f"{full['busy_cores']:.2f} of {st['cores']}"])
        if st["baseline_decode_thumbnail_ms"]:
            decode_rows.append([name, f"{st['baseline_decode_thumbnail_ms']:.2f}", f"{st['decode_thumbnail_ms']:.2f}",
                                f"{st['decode_thumbnail_ms'] / st['baseline_decode_thumbnail_ms']:.2f}"])
        rows.append([name, m["precision"], m["images_per_s"], full["images_per_s"], f"{ratio:.0%}",
                     f"{results[half]['peak_rss_kib'] / 1024:.0f} MiB ({half} img)",
                     f"{full['peak_rss_kib'] / 1024:.0f} MiB ({len(mixed)} img)", full["failed"]])
    md = (f"Ingest throughput on {machine()}; corpus: {a.photos} photos (640–4000 px JPEG) + {a.clipart} "
          f"clipart PNGs from make-corpus, batch {a.batch_size}; model-only = median of 3 passes over "
          f"{a.model_images} pre-decoded images.\n\n"
          + table(["backend", "precision", "model-only img/s", "end-to-end img/s", "e2e / model",
                   "peak RSS (half corpus)", "peak RSS (full corpus)", "failed"], rows)
          + "\n\nWhere the time goes (CPU ms per image, one thread, median of 3 passes over the corpus; model CPU = "
          "cores ÷ model-only rate; ideal = cores ÷ (model + read/hash + decode + thumbnail + PDQ CPU); measured = "
          "the default settings, where the model runs batches in lanes, one thread each, one lane per core; one lane = "
          "the same full run with each batch on every core, `--model-lanes 1`):\n\n"
          + table(["backend", "model-only img/s", "model CPU ms", "sha256+MD5 ms", "decode to model input ms",
                   "thumbnail ms", "PDQ ms", "ideal end-to-end img/s", "measured img/s", "measured ÷ ideal",
                   "one lane: img/s", "one lane ÷ ideal"],
                  ideal_rows)
          + f"\n\nDecode + thumbnail CPU per image against the decoder at `{BASELINE_DECODER}` (when this work began; loaded "
          "from git beside today's, same files, one thread, median of 3 passes; PDQ, which that decoder did not compute, "
          "left out of both):\n\n"
          + table(["backend", f"{BASELINE_DECODER} decoder ms", "today ms", "today ÷ then"], decode_rows)
          + "\n\nWhere the distance to the ideal goes: CPU per image by thread during the full default run (read from "
          "/proc: the model's threads and lanes, the decode pool, and every other thread — the main thread's catalog, "
          "vector and thumbnail writes, which the ideal leaves out), against the ideal's CPU per image, and how many "
          "of the cores the run kept busy (measured ÷ ideal = ideal CPU ÷ measured CPU × busy ÷ cores):\n\n"
          + table(["backend", "ideal: model CPU ms", "ideal: other stages ms", "run: model threads ms",
                   "run: decode threads ms", "run: write (main) ms", "run CPU ÷ ideal CPU", "busy cores"], cpu_rows))
    write("ingest", data, md)


if __name__ == "__main__":
    main()
