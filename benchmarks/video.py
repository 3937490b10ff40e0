"""Video: re-uploaded clips found through the API by their keyframes' embeddings, by vPDQ and by both; the
ingest rate of clips beside the model-only rate, where the CPU goes (decoding, vPDQ, the model); the memory of
the largest clip; and which one vector per video groups re-uploads better (its keyframes' mean, or its most
unsafe keyframe), as the clustering job sees videos.

The clips are made here with PyAV from ``make-corpus`` pictures: each original is a slideshow of four distinct
clipart drawings, 3 s each at 320 × 240, 12 fps, panning and zooming slowly (MPEG-4 Part 2 in MP4). The store
holds the originals, as many distractor clips made the same way from photos and other drawings, and 2,100
still pictures (none of them an original's scene, by PDQ), all flagged — enough for the store to fit its matching space at ingest, as a real store
has; the model is open_nsfw (real weights). Each original is re-uploaded with each edit:

- *re-encode*: VP9 in WebM at 120 kbit/s and 256 × 192;
- *trim*: the first 4 s and the last 2 s cut off;
- *frame rate*: 12 → 6 fps, H.264-free MPEG-4 again at another bit rate;
- *letterbox*: the 4:3 clip pillarboxed into a 16:9 frame (480 × 270) with black bars;
- *zoom*: the centre 80 % of every frame, scaled back up;
- *picture in picture*: the clip at 45 % of the width over a corner of a photo that is not in the store;
- *inserted segment*: 4 s of pictures that are not in the store inserted between its second and third scene.

Each query is a ``POST /api/v1/search`` of the clip to a served flagmatch (scope flagged, k = 10). R@1 / R@10
per edit: *embeddings* is the hits' order; *vPDQ* the stored videos the query's vPDQ matches (threatexchange's
VPDQIndex, HMA's thresholds; in the answer's hash evidence, closest first); *both* puts vPDQ matches first and
then the embedding hits.

    python benchmarks/video.py [--originals 30] [--corpus /tmp/fm-match-corpus]

Results: benchmarks/results/video.{json,md}."""
from __future__ import annotations

import argparse
import io
import json
import random
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from common import ROOT, machine, median, table, write

sys.path.insert(0, str(ROOT / "benchmarks"))
import match  # noqa: E402  (the corpus helpers: pictures loaded as make-corpus wrote them)

W, H, FPS, SCENE_S = 320, 240, 12, 3.0
EDITS = {"reencode": "re-encode: VP9/WebM 120 kbit/s, 256 × 192", "trim": "trim: first 4 s and last 2 s cut",
         "fps": "frame rate 12 → 6 fps, other bit rate", "letterbox": "letterbox: pillarboxed into 16:9",
         "zoom": "zoom: centre 80 % scaled up", "pip": "picture in picture: 45 % over a photo",
         "inserted": "inserted segment: 4 s of other pictures mid-clip"}


# ---------------------------------------------------------------- clips

def encode(frames: Callable[[], Any], size: tuple[int, int], fps: int, fmt: str = "mp4", codec: str = "mpeg4",
           bit_rate: int = 600_000) -> bytes:
    """Frames (an iterator of RGB arrays of ``size``) encoded with PyAV."""
    import av
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = size[0], size[1], "yuv420p", bit_rate
        for rgb in frames():
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return out.getvalue()


def scene_frames(pic: Image.Image, seconds: float, fps: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """One scene: the picture filling the frame, panning or zooming slowly (every frame differs a little)."""
    r = random.Random(seed)
    base = ImageOps.fit(pic, (int(size[0] * 1.15), int(size[1] * 1.15)))
    n = int(seconds * fps)
    zoom = r.random() < 0.5
    out = []
    for i in range(n):
        t = i / max(n - 1, 1)
        if zoom:
            z = 1.0 - 0.12 * t
            bw, bh = base.width * z, base.height * z
            box = ((base.width - bw) / 2, (base.height - bh) / 2, (base.width + bw) / 2, (base.height + bh) / 2)
        else:
            dx = (base.width - size[0]) * t
            box = (dx, (base.height - size[1]) / 2, dx + size[0], (base.height + size[1]) / 2)
        out.append(np.asarray(base.resize(size, Image.BILINEAR, box=box)))
    return out


def slideshow(pics: list[Image.Image], seed: int) -> list[np.ndarray]:
    return [f for n, p in enumerate(pics) for f in scene_frames(p, SCENE_S, FPS, (W, H), seed * 10 + n)]


def decode_frames(data: bytes) -> tuple[list[np.ndarray], float]:
    import av
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or FPS)
        return [f.to_ndarray(format="rgb24") for f in c.decode(s)], fps


def edited(kind: str, data: bytes, r: random.Random, others: list[Image.Image]) -> bytes:
    frames, fps = decode_frames(data)
    f = int(round(fps))
    if kind == "reencode":
        small = [np.asarray(Image.fromarray(x).resize((256, 192), Image.BILINEAR)) for x in frames]
        return encode(lambda: small, (256, 192), f, "webm", "libvpx-vp9", 120_000)
    if kind == "trim":
        return encode(lambda: frames[4 * f: len(frames) - 2 * f], (W, H), f)
    if kind == "fps":
        return encode(lambda: frames[::2], (W, H), f // 2, bit_rate=300_000)
    if kind == "letterbox":
        def boxed():  # type: ignore[no-untyped-def]
            for x in frames:
                canvas = np.zeros((270, 480, 3), np.uint8)
                canvas[:, 60:420] = np.asarray(Image.fromarray(x).resize((360, 270), Image.BILINEAR))
                yield canvas
        return encode(boxed, (480, 270), f)
    if kind == "zoom":
        return encode(lambda: (np.asarray(Image.fromarray(x).resize((W, H), Image.BILINEAR,
                                                                        box=(W * .1, H * .1, W * .9, H * .9)))
                               for x in frames), (W, H), f)
    if kind == "pip":
        bg = np.asarray(ImageOps.fit(others[0], (W, H)))
        corner = r.choice([(0, 0), (W - 144, 0), (0, H - 108), (W - 144, H - 108)])

        def pip():  # type: ignore[no-untyped-def]
            for x in frames:
                canvas = bg.copy()
                canvas[corner[1]:corner[1] + 108, corner[0]:corner[0] + 144] = np.asarray(
                    Image.fromarray(x).resize((144, 108), Image.BILINEAR))
                yield canvas
        return encode(pip, (W, H), f)
    if kind == "inserted":
        cut = int(2 * SCENE_S * f)
        extra = [x for n, p in enumerate(others[:2]) for x in scene_frames(p, 2.0, f, (W, H), 99 + n)]
        return encode(lambda: frames[:cut] + extra + frames[cut:], (W, H), f)
    raise ValueError(kind)


# ---------------------------------------------------------------- the API

def search(base: str, token: str, name: str, data: bytes, k: int = 10) -> tuple[list[int], list[tuple[int, int]], float]:
    """(hit ids, [(stored video id, vPDQ distance)] closest first, milliseconds)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/api/v1/search?k={k}", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {token}"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        res = json.loads(resp.read())["results"][0]
    ms = (time.perf_counter() - t) * 1000
    ev = res.get("hashes") or {}
    vp = sorted(((m["id"], m["distance"]) for m in ev.get("image_matches", []) if m["signal_type"] == "vpdq"),
                key=lambda x: x[1])
    return [h["id"] for h in res["hits"]], vp, ms


# ---------------------------------------------------------------- measures

CHILD = """
import json, sys, time

from tests.helpers import own_peak_rss_kib as hwm
from indexer.media.decode import InputSpec
from indexer.media.video import VideoLimits, keyframes, vpdq_of_bytes
import av, vpdq  # noqa: F401  (imported before the baseline is read)
data = open(sys.argv[1], "rb").read()
baseline = hwm()
t = time.process_time(); info, frames = keyframes(data, VideoLimits()); kf = time.process_time() - t
after_keyframes = hwm()
t = time.process_time(); v = vpdq_of_bytes(data); vp = time.process_time() - t
print(json.dumps({"width": info.width, "height": info.height, "seconds": info.duration_s, "frames": info.frames,
                  "keyframes": len(frames), "keyframes_cpu_s": kf, "vpdq_cpu_s": vp,
                  "rss_baseline_mib": baseline / 1024, "rss_after_keyframes_mib": after_keyframes / 1024,
                  "rss_peak_mib": hwm() / 1024}))
"""


def largest_clip(work: Path, pics: list[Image.Image]) -> dict[str, Any]:
    """A 1280 × 720, 60 s, 25 fps clip decoded for its keyframes and vPDQ-hashed in a child process."""
    path = work / "large-720p-60s.mp4"
    if not path.exists():
        size = (1280, 720)
        path.write_bytes(encode(lambda: (f for n, p in enumerate(pics[:12])
                                         for f in scene_frames(p, 5.0, 25, size, 500 + n)), size, 25,
                                bit_rate=4_000_000))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["bytes"] = path.stat().st_size
    return got


def representations(home: Path, queries: dict[str, list[tuple[Path, int]]], emb: Any) -> dict[str, Any]:
    """For each edited clip: the rank of its original among the stored videos by (a) the keyframes' mean and
    (b) the most unsafe keyframe, each compared like for like (cosine of the raw vectors)."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.media.video import VideoLimits, decode_video
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    recs = store.catalog.get_many(store.catalog.image_ids())
    vids = sorted(i for i, r in recs.items() if r.kind == "video")
    frames = store.catalog.keyframes(vids)
    vs = store.open_vectors()
    mean = vs.get(vids)
    best = np.stack([vs.get_rows(np.array([max(frames[i], key=lambda f: f.p_unsafe).vec_segment]),
                                 np.array([max(frames[i], key=lambda f: f.p_unsafe).vec_row]))[0] for i in vids])
    best /= np.linalg.norm(best, axis=1, keepdims=True)
    at = {v: n for n, v in enumerate(vids)}
    out: dict[str, Any] = {}
    for edit, items in queries.items():
        r1 = {"mean": 0, "best": 0}
        for path, want in items:
            clip = decode_video(path.read_bytes(), emb.info.input, VideoLimits(), want_vpdq=False)
            v, p = emb.embed(np.stack([f.image.pixels for f in clip.frames]))
            m = v.mean(axis=0)
            m /= np.linalg.norm(m)
            b = v[int(np.argmax(p))]
            r1["mean"] += int(np.argmax(mean @ m) == at[want])
            r1["best"] += int(np.argmax(best @ b) == at[want])
        out[edit] = {k: n / len(items) for k, n in r1.items()}
    store.close()
    return out


def pick_pictures(files: list[Path], n: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(the originals' 4·n scenes, 4·n pictures never stored — backgrounds and inserted scenes —, the rest).
    Both come from clipart, each drawing distinct (no two within PDQ's match threshold: make-corpus holds the
    same drawing at several sizes and tints); the rest — the distractor clips' scenes and the stills — are
    the photos and every other drawing not within that threshold of one of them. (make-corpus crops its photos
    from a few dozen wallpapers, so a photo scene would have its own picture among the stills.)"""
    from indexer.media.hashes import pdq_of
    clipart = [f for f in files if "clipart" in f.parts]
    picked = match.distinct_originals(clipart, 8 * n, {})
    codes = np.stack([np.unpackbits(np.frombuffer(bytes.fromhex(pdq_of(np.asarray(match.load_rgb(p, 512))).hash),
                                                  np.uint8)) for p in picked])
    chosen = set(picked)
    rest = []
    for f in files:
        if f in chosen:
            continue
        if "clipart" in f.parts:
            code = np.unpackbits(np.frombuffer(bytes.fromhex(pdq_of(np.asarray(match.load_rgb(f, 512))).hash), np.uint8))
            if int(np.min(np.count_nonzero(codes != code, axis=1))) <= match.PDQ_SAME:
                continue
        rest.append(f)
    return picked[:4 * n], picked[4 * n:], rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/fm-match-corpus")
    ap.add_argument("--work", default="/tmp/fm-bench-video")
    ap.add_argument("--originals", type=int, default=30)
    ap.add_argument("--stills", type=int, default=2100, help="still pictures in the store besides the clips (over "
                    "2,000 stored vectors the store fits its matching space, as a real store has)")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    from flagmatch.wiring import load_embedder
    from flagmatch.settings import Settings
    from tests.helpers import start_server, stop_server
    corpus, work = Path(a.corpus), Path(a.work)
    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not files:
        sys.exit(f"no pictures under {corpus}: build them with ../shared/corpus/make-corpus {corpus}")
    r = random.Random(a.seed)
    r.shuffle(files)
    n = a.originals
    print(machine(), flush=True)
    originals, outside, pool = pick_pictures(files, n)
    groups = [originals[i * 4:(i + 1) * 4] for i in range(n)] + [pool[i * 4:(i + 1) * 4] for i in range(n)]
    stills = pool[4 * n: 4 * n + a.stills]
    shutil.rmtree(work / "home", ignore_errors=True)
    for sub in ("in", "stills"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        for old in (work / sub).iterdir():
            old.unlink()
    t = time.perf_counter()
    for i, g in enumerate(groups):
        (work / "in" / f"clip_{i:03d}.mp4").write_bytes(encode(
            lambda g=g, i=i: slideshow([match.load_rgb(p, 800) for p in g], i), (W, H), FPS))
    for p in stills:
        shutil.copy(p, work / "stills" / p.name)
    print(f"made {len(groups)} clips in {time.perf_counter() - t:.0f} s", flush=True)

    # ingest: the stills first (the store fits its matching space then), then the clips, timed on their own;
    # then the model alone on the same keyframes
    env = {"FLAGMATCH_HOME": str(work / "home"), "FLAGMATCH_MODEL": "opennsfw", "FLAGMATCH_FLAG_THRESHOLD": "0",
           "FLAGMATCH_API_TOKENS": "bench:bench-token"}
    match.flagmatch("ingest", str(work / "stills"), env=env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    ingest_out = match.flagmatch("ingest", str(work / "in"), env=env)
    wall = time.perf_counter() - t
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu.ru_utime - before.ru_utime) + (cpu.ru_stime - before.ru_stime)
    from flagmatch.wiring import open_store
    store = open_store(Settings.load({"home": str(work / "home")}, environ={}))
    recs = store.catalog.get_many(store.catalog.image_ids())
    vids = [i for i, rr in recs.items() if rr.kind == "video"]
    kf_total = sum(len(v) for v in store.catalog.keyframes(vids).values())
    runs = store.catalog.engine.connect().exec_driver_sql("SELECT counts FROM ingest_runs ORDER BY id DESC LIMIT 1")
    decode_cpu = float(json.loads(runs.scalar() or "{}").get("decode_cpu_s", 0.0))
    by_name = {Path(rr.paths[0]).name: i for i, rr in recs.items() if rr.paths}
    store.close()
    emb = load_embedder(Settings.load({"model": "opennsfw"}, environ={}))
    from indexer.media.video import VideoLimits, decode_video, keyframes, vpdq_of_bytes
    sample = sorted((work / "in").glob("clip_*.mp4"))[:10]
    px, t_kf, t_vp = [], 0.0, 0.0
    for p in sample:
        data = p.read_bytes()
        t0 = time.process_time()
        keyframes(data, VideoLimits())
        t_kf += time.process_time() - t0
        t0 = time.process_time()
        vpdq_of_bytes(data)
        t_vp += time.process_time() - t0
        px += [f.image.pixels for f in decode_video(data, emb.info.input, VideoLimits(), want_vpdq=False).frames]
    emb.embed(np.stack(px[:8]))  # warm
    t0 = time.perf_counter()
    for i in range(0, len(px), 32):
        emb.embed(np.stack(px[i:i + 32]))
    model_rate = len(px) / (time.perf_counter() - t0)
    ingest = {"videos": len(vids), "stills": len(stills), "keyframes": kf_total,
              "wall_s": wall, "cpu_s": cpu_s, "decode_cpu_s": decode_cpu,
              "videos_per_s": len(vids) / wall, "keyframes_per_s": kf_total / wall,
              "model_only_inputs_per_s": model_rate,
              "per_clip_cpu_s": {"keyframes": t_kf / len(sample), "vpdq": t_vp / len(sample)},
              "output": ingest_out.strip().splitlines()[-3:]}
    print(json.dumps(ingest, indent=1), flush=True)

    # the queries
    queries: dict[str, list[tuple[Path, int]]] = {k: [] for k in EDITS}
    qdir = work / "queries"
    shutil.rmtree(qdir, ignore_errors=True)
    qdir.mkdir()
    for i in range(n):
        src = work / "in" / f"clip_{i:03d}.mp4"
        others = [match.load_rgb(p, 800) for p in outside[4 * i: 4 * i + 4]]
        for kind in EDITS:
            path = qdir / f"{kind}_{i:03d}{'.webm' if kind == 'reencode' else '.mp4'}"
            path.write_bytes(edited(kind, src.read_bytes(), random.Random(a.seed * 100 + i), others))
            queries[kind].append((path, by_name[src.name]))
    proc, base, log = start_server({**env, "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "2"}, work / "serve.log",
                                   timeout=600)
    results: dict[str, Any] = {}
    try:
        search(base, "bench-token", "warm.mp4", queries["trim"][0][0].read_bytes())
        for kind, items in queries.items():
            emb_r = {"r1": 0, "r10": 0}
            vp_r = {"r1": 0, "r10": 0}
            both = {"r1": 0, "r10": 0}
            times = []
            for path, want in items:
                ids, vp, ms = search(base, "bench-token", path.name, path.read_bytes())
                times.append(ms)
                vids_vp = [i for i, _ in vp]
                fused = vids_vp + [i for i in ids if i not in vids_vp]
                for acc, ranked in ((emb_r, ids), (vp_r, vids_vp), (both, fused)):
                    acc["r1"] += ranked[:1] == [want]
                    acc["r10"] += want in ranked[:10]
            results[kind] = {"embeddings": {k: v / len(items) for k, v in emb_r.items()},
                             "vpdq": {k: v / len(items) for k, v in vp_r.items()},
                             "both": {k: v / len(items) for k, v in both.items()}, "p50_ms": median(times)}
            print(kind, json.dumps(results[kind]), flush=True)
    finally:
        stop_server(proc, log)
    reps = representations(work / "home", queries, emb)
    print("one vector per video:", json.dumps(reps), flush=True)
    large = largest_clip(work, [match.load_rgb(p, 1600) for p in outside[:12]])
    print("largest clip:", json.dumps(large), flush=True)

    res = {"machine": machine(), "originals": n, "store": {"videos": len(vids), "stills": len(stills)},
           "ingest": ingest, "search": results, "one_vector": reps, "largest_clip": large}
    rows = [[EDITS[k]] + [f"{v[m]['r1']:.2f} / {v[m]['r10']:.2f}" for m in ("embeddings", "vpdq", "both")]
            + [f"{v['p50_ms']:.0f}"] for k, v in results.items()]
    mean_all = {m: float(np.mean([v[m]["r1"] for v in results.values()])) for m in ("embeddings", "vpdq", "both")}
    rows.append(["**mean R@1**"] + [f"**{mean_all[m]:.2f}**" for m in ("embeddings", "vpdq", "both")] + [""])
    ing = ingest
    md = (f"Video on {res['machine']}: {n} flagged clips (4 clipart scenes of 3 s, 320 × 240, 12 fps) among {n} "
          f"distractor clips and {len(stills)} stills (photos and clipart, fitted matching space), open_nsfw; each clip re-uploaded with every edit and searched through "
          "`POST /api/v1/search` (R@1 / R@10).\n\n"
          + table(["edit", "embeddings", "vPDQ", "both", "p50 ms"], rows)
          + "\n\nIngest of the clips (`flagmatch ingest` of their folder, into the store holding the stills; the "
          "process's start and the model's load included): "
          f"{ing['videos']} clips in {ing['wall_s']:.1f} s — {ing['videos_per_s']:.2f} clips/s, "
          f"{ing['keyframes']} keyframes, {ing['keyframes_per_s']:.1f} keyframes/s end to end against "
          f"{ing['model_only_inputs_per_s']:.1f}/s for the model alone on the same keyframes. CPU: {ing['cpu_s']:.0f} s in all, "
          f"{ing['decode_cpu_s']:.0f} s of it in the decode threads (keyframes, thumbnails, vPDQ); per clip "
          f"{ing['per_clip_cpu_s']['keyframes'] * 1000:.0f} ms for the keyframes and "
          f"{ing['per_clip_cpu_s']['vpdq'] * 1000:.0f} ms for vPDQ (which decodes every frame again).\n\n"
          "One vector per video (what clustering sees), R@1 of the original among the stored videos by cosine: "
          + ", ".join(f"{EDITS[k].split(':')[0]} mean {v['mean']:.2f} / most unsafe keyframe {v['best']:.2f}"
                      for k, v in reps.items())
          + f".\n\nLargest clip: {large['width']} × {large['height']}, {large['seconds']:.0f} s, "
          f"{large['frames']} frames ({large['bytes'] / 2**20:.1f} MiB): keyframes in {large['keyframes_cpu_s']:.1f} "
          f"CPU s ({large['keyframes']} kept), vPDQ in {large['vpdq_cpu_s']:.1f} CPU s; peak RSS grew by "
          f"{large['rss_after_keyframes_mib'] - large['rss_baseline_mib']:.0f} MiB choosing the keyframes and "
          f"{large['rss_peak_mib'] - large['rss_baseline_mib']:.0f} MiB with vPDQ too, over "
          f"{large['rss_baseline_mib']:.0f} MiB for the imports and the file's bytes.")
    write("video", res, md)


if __name__ == "__main__":
    main()
