"""Decoding: libvips' streaming and shrink-on-load (PNG, WebP) against Pillow decoding the whole image, per format.

Sets (from ``make-corpus`` photos and clipart, built here once under ``--work``):

- *photos as PNG / WebP / JPEG*: corpus photos upscaled to a 2,600–5,000-px short side (phone-camera and
  screenshot sizes) and saved as each format (PNG level 6, WebP and JPEG quality 90);
- *huge PNG*: the corpus' clipart of 100+ Mpx (16,000-px RGBA) and one 16,000 × 14,400 RGBA PNG (230 Mpx).

For each set, Pillow (``stream_from=0``: today's path) and libvips (the default) each run ``decode`` — model
input (open_nsfw's: 224 / 0.875, bilinear), thumbnail and PDQ, as ingest calls it — in a fresh process: CPU per image
(process time, all threads), peak RSS of the process. Then: the open_nsfw embeddings of the two paths'
model inputs (cosine, min and mean), and each path's PDQ distance to threatexchange's hash of the original
(``PdqSignal.hash_from_file``, full resolution; skipped over Pillow's own size cap). JPEG is measured both ways
too: libvips' shrink-on-load (``jpegload`` at 1/2–1/8, then the same box shrink) is what Pillow's ``draft``
does, and the table says whether it pays.

    python benchmarks/decode.py [--per-set 12]

Run it from the repository root. Results: benchmarks/results/decode.{json,md}."""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import OUT, machine, median, run_child, table, write

SETS = ("photo PNG", "photo WebP", "photo JPEG", "huge PNG")
SPEC = (224, 0.875, "bilinear")  # open_nsfw's input, whose embeddings are compared


def build_sets(corpus: Path, work: Path, per_set: int) -> dict[str, list[Path]]:
    from PIL import Image
    work.mkdir(parents=True, exist_ok=True)
    photos = sorted((corpus / "photos").glob("*.jpg"))[:per_set]
    out: dict[str, list[Path]] = {s: [] for s in SETS}
    for i, p in enumerate(photos):
        side = (2600, 3500, 5000)[i % 3]
        im = None
        for name, ext, kw in (("photo PNG", "png", {"compress_level": 6}), ("photo WebP", "webp", {"quality": 90}),
                              ("photo JPEG", "jpg", {"quality": 90})):
            dest = work / f"{p.stem}-{side}.{ext}"
            if not dest.exists():
                if im is None:
                    src = Image.open(p).convert("RGB")
                    scale = min(side / min(src.size), 16_000 / max(src.size))  # WebP's limit is 16,383 a side
                    im = src.resize((round(src.width * scale), round(src.height * scale)), Image.BICUBIC)
                im.save(dest, ext.upper().replace("JPG", "JPEG"), **kw)
            out[name].append(dest)
    huge = []
    for p in sorted((corpus / "clipart").glob("*.png")):
        with p.open("rb") as f:
            head = f.read(24)
        if int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big") > 100_000_000:
            huge.append(p)
    big = work / "huge-16000x14400.png"
    if not big.exists() or big.stat().st_size > 100 << 20:
        huge_clipart(16_000, 14_400).pngsave(str(big), compression=6)
    out["huge PNG"] = huge[:max(1, per_set // 3)] + [big]
    return out


def huge_clipart(w: int, h: int):  # type: ignore[no-untyped-def]
    """A w × h RGBA picture of gradients and blocks, as clipart exports are (~10 MB as a 230-Mpx PNG)."""
    import pyvips
    xy = pyvips.Image.xyz(w, h)
    x, y = xy[0], xy[1]
    return ((x / 64) % 256).bandjoin([(y / 64) % 256, ((x / 1000).floor() + (y / 1000).floor()) % 2 * 255,
                                      255 - (x / 250) % 64]).cast("uchar").copy(interpretation="srgb")


def child(paths: list[str], stream_from: int, dest: str) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from indexer.media.decode import DecodeLimits, InputSpec, decode
    limits = DecodeLimits(max_pixels=300_000_000, max_bytes=4 << 30, timeout_s=300, wall_s=600,
                          stream_from=stream_from)
    cpu, pixels, pdq = [], [], []
    for p in paths:
        data = Path(p).read_bytes()
        t = time.process_time()
        img = decode(data, InputSpec(*SPEC), limits)
        cpu.append((time.process_time() - t) * 1000)
        pixels.append(img.pixels)
        pdq.append(img.pdq.hash if img.pdq else "")
    np.savez(dest, pixels=np.stack(pixels), pdq=np.array(pdq))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (large) parent
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return {"cpu_ms": cpu, "maxrss_mib": int(hwm.split()[1]) / 1024}


def jpeg_both(paths: list[Path]) -> dict[str, float]:
    """The JPEG shrink stage alone, CPU ms median: Pillow's draft + reduce, libvips' shrink-on-load + shrink."""
    import pyvips
    from PIL import Image
    pyvips.concurrency_set(1)
    need = max(256, round(SPEC[0] / SPEC[1]))  # the thumbnail's side or the model's
    pil, vips = [], []
    for p in paths:
        data = p.read_bytes()
        t = time.process_time()
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (need, need))
        factor = min(im.size) // (2 * need)
        (im.reduce(factor) if factor >= 2 else im).load()
        pil.append((time.process_time() - t) * 1000)
        t = time.process_time()
        head = pyvips.Image.new_from_buffer(data, "")
        full = min(head.width, head.height)
        load = max(s for s in (1, 2, 4, 8) if full // s >= 2 * need)
        img = pyvips.Image.new_from_buffer(data, "", shrink=load, access="sequential")
        factor = min(img.width, img.height) // (2 * need)
        (img.shrink(factor, factor) if factor >= 2 else img).write_to_memory()
        vips.append((time.process_time() - t) * 1000)
    return {"pillow_ms": median(pil), "vips_ms": median(vips)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/fm-match-corpus")
    ap.add_argument("--work", default="/tmp/fm-bench-decode")
    ap.add_argument("--per-set", type=int, default=12)
    ap.add_argument("--child", nargs=3, metavar=("PATHS", "STREAM_FROM", "DEST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child[0]), int(a.child[1]), a.child[2])))
        return
    print(machine(), flush=True)
    sets = build_sets(Path(a.corpus), Path(a.work), a.per_set)
    from threatexchange.signal_type.pdq.signal import PdqSignal
    from indexer.media.hashes import pdq_distance
    from indexer.models.embed import load_model
    model = load_model("opennsfw")
    res: dict[str, Any] = {"machine": machine(), "sets": {}}
    for name, paths in sets.items():
        row: dict[str, Any] = {"images": len(paths)}
        got = {}
        for label, stream_from in (("pillow", 0), ("vips", 2)):
            dest = str(Path(a.work) / f"out-{label}.npz")
            r, _ = run_child([__file__, "--child", json.dumps([str(p) for p in paths]), str(stream_from), dest])
            row[f"{label}_cpu_ms"] = median(r["cpu_ms"])
            row[f"{label}_maxrss_mib"] = r["maxrss_mib"]
            got[label] = np.load(dest)
        e = {k: model.embed(v["pixels"])[0] for k, v in got.items()}
        cos = np.sum(e["pillow"] * e["vips"], axis=1) / (np.linalg.norm(e["pillow"], axis=1)
                                                        * np.linalg.norm(e["vips"], axis=1))
        row.update({"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())})
        dist: dict[str, list[int]] = {"pillow": [], "vips": []}
        for i, p in enumerate(paths):
            try:
                theirs = str(PdqSignal.hash_from_file(p))
            except Exception:  # over Pillow's bomb cap (threatexchange decodes whole images with Pillow)
                continue
            ours = {k: str(got[k]["pdq"][i]) for k in dist}
            if len(theirs) != 64 or not all(ours.values()):  # no hash (threatexchange's or a featureless image)
                continue
            for k in dist:
                dist[k].append(pdq_distance(theirs, ours[k]))
        row.update({f"{k}_pdq_bits": float(np.mean(v)) if v else None for k, v in dist.items()})
        row["pdq_compared"] = len(dist["pillow"])
        if name == "photo JPEG":
            row["jpeg_shrink"] = jpeg_both(paths)
        res["sets"][name] = row
        print(name, row, flush=True)
    md = [f"Machine: {res['machine']}. `decode` (open_nsfw's model input 224 / 0.875, 256-px thumbnail, PDQ), one process per "
          "path and set; CPU: median per image, all threads; RSS: the process's peak (the interpreter and libraries "
          "≈ 70 MiB); cosine: open_nsfw embeddings of the two paths' model inputs; PDQ bits: mean distance to "
          "threatexchange's hash of the full-resolution original.", ""]
    md.append(table(["set", "images", "Pillow CPU (ms)", "libvips CPU (ms)", "Pillow peak RSS (MiB)",
                     "libvips peak RSS (MiB)", "cosine min", "cosine mean", "Pillow PDQ bits", "libvips PDQ bits"],
                    [[k, r["images"], r["pillow_cpu_ms"], r["vips_cpu_ms"], round(r["pillow_maxrss_mib"]),
                      round(r["vips_maxrss_mib"]), round(r["cosine_min"], 5), round(r["cosine_mean"], 5),
                      r["pillow_pdq_bits"] if r["pillow_pdq_bits"] is not None else "—",
                      r["vips_pdq_bits"] if r["vips_pdq_bits"] is not None else "—"]
                     for k, r in res["sets"].items()]))
    j = res["sets"].get("photo JPEG", {}).get("jpeg_shrink")
    if j:
        md += ["", f"JPEG's shrink stage alone (median CPU per image): Pillow's DCT-scaled `draft` + `reduce` "
               f"{j['pillow_ms']:.1f} ms, libvips' shrink-on-load + `shrink` {j['vips_ms']:.1f} ms."]
    write("decode", res, "\n".join(md))


if __name__ == "__main__":
    main()
