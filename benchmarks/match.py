"""Matching quality: are re-uploads found, and are they grouped?

A corpus from ``../shared/corpus/make-corpus`` (real photos and clipart) is split into flagged
originals — each showing a picture no other original shows (``distinct_originals``) — and unflagged
distractors, and ingested. Each original is then transformed the ways re-uploads arrive and searched
through the served API (`flagmatch serve`, gunicorn on loopback, ``POST /api/v1/search``); R@1 / R@10 is
whether the original is first / in the top 10 of the flagged hits. Configurations, one server each: the
raw model features with the whole image only (what flagmatch did before the matching space), the
matching space, the matching space with query views, and the default pipeline (matching space, query
views and hits verified by local features). The family benchmark
ingests each original with its copies, all flagged, clusters them with the offline job and compares
the clusters to the families (ARI, share of families kept whole in one cluster, noise share, time).

    python benchmarks/match.py [--originals 300] [--corpus DIR] [--model opennsfw] [--skip-families | --families-only]

Run it from the repository root. Results: benchmarks/results/match[-MODEL].{json,md}."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from common import ROOT, machine, median, table, write

Image.MAX_IMAGE_PIXELS = None  # trusted corpus files

# ------------------------------------------------------------------ the transforms re-uploads go through


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def t_jpeg_half(im: Image.Image, r: random.Random) -> Image.Image:
    w, h = im.size
    return _jpeg(im.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR), 30)


def t_crop(im: Image.Image, r: random.Random) -> Image.Image:
    w, h = im.size
    cw, ch = int(w * 0.8), int(h * 0.8)
    x, y = r.randint(0, w - cw), r.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


def t_mirror(im: Image.Image, r: random.Random) -> Image.Image:
    return ImageOps.mirror(im)


def t_rotate(im: Image.Image, r: random.Random) -> Image.Image:
    return im.rotate(8, resample=Image.BICUBIC, expand=True, fillcolor=(0, 0, 0))


def t_screenshot(im: Image.Image, r: random.Random) -> Image.Image:
    """Pasted into a screenshot-like frame: a top bar, a sidebar with text, the picture, text below."""
    w, h = im.size
    scale = 720 / max(w, h)
    pic = im.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR)
    pw, ph = pic.size
    W, H = pw + 420, ph + 260
    bg = r.choice([(255, 255, 255), (245, 245, 247), (24, 25, 28)])
    fg = (20, 20, 20) if sum(bg) > 300 else (230, 230, 230)
    canvas = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, W, 56), fill=r.choice([(59, 89, 152), (29, 161, 242), (40, 40, 40)]))
    d.text((16, 14), "feed  ·  search  ·  messages", fill=(255, 255, 255), font=_font(22))
    for i in range(9):
        d.text((16, 90 + 36 * i), f"@user{r.randint(10, 999)} · {r.randint(1, 59)}m", fill=fg, font=_font(16))
    x0, y0 = 340, 90
    canvas.paste(pic, (x0, y0))
    d.text((x0, y0 + ph + 16), "look at this 😂  #repost", fill=fg, font=_font(20))
    d.text((x0, y0 + ph + 48), f"{r.randint(2, 900)} likes  {r.randint(1, 90)} comments", fill=fg, font=_font(16))
    return _jpeg(canvas, 85)


def t_caption(im: Image.Image, r: random.Random) -> Image.Image:
    w, h = im.size
    band = max(24, h // 6)
    canvas = Image.new("RGB", (w, h + band), (255, 255, 255))
    canvas.paste(im.convert("RGB"), (0, band))
    ImageDraw.Draw(canvas).text((max(4, w // 20), band // 5), "WHEN YOU SEE IT", fill=(0, 0, 0),
                                font=_font(max(12, band // 2)))
    return canvas


def t_grey_contrast(im: Image.Image, r: random.Random) -> Image.Image:
    return ImageEnhance.Contrast(ImageOps.grayscale(im).convert("RGB")).enhance(1.5)


def t_letterbox(im: Image.Image, r: random.Random) -> Image.Image:
    """Padded to 16:9 with black bars (a video frame), re-encoded."""
    w, h = im.size
    W = max(w, int(h * 16 / 9))
    H = max(h, int(W * 9 / 16))
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    canvas.paste(im.convert("RGB"), ((W - w) // 2, (H - h) // 2))
    return _jpeg(canvas, 80)


def t_watermark(im: Image.Image, r: random.Random) -> Image.Image:
    """A semi-transparent watermark and a sticker, as reposting accounts add."""
    base = im.convert("RGBA")
    w, h = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    d.text((w // 10, h // 2), "@reposter", fill=(255, 255, 255, 140), font=_font(max(12, w // 10)))
    s = max(8, min(w, h) // 6)
    d.ellipse((w - s - 8, 8, w - 8, 8 + s), fill=(255, 210, 0, 230))
    return _jpeg(Image.alpha_composite(base, layer), 75)


# ------------------------------------------------------------------ the harder edits evaders use
# Their parameters are the benchmark's own: the augmentations the store trains its spaces on
# (``indexer.media.augment``) are drawn from other ranges, other fonts and other layouts.

OTHERS: list[Path] = []  # distractor files the collages draw their other cells from (set by ``main``)


def _cover(im: Image.Image, w: int, h: int) -> Image.Image:
    """``im`` scaled to cover ``w`` × ``h`` and centre-cropped to it."""
    s = max(w / im.width, h / im.height)
    im = im.resize((max(w, int(im.width * s + 0.5)), max(h, int(im.height * s + 0.5))), Image.BILINEAR)
    x, y = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((x, y, x + w, y + h))


def t_collage(im: Image.Image, r: random.Random) -> Image.Image:
    """The picture as one cell of a collage of unrelated pictures (2 × 2, 3 × 2, 1 × 3 or 3 × 3, thin or no
    gutters), or — every other query — pasted over an unrelated photo at 35–50 % of its width."""
    others = [load_rgb(p, 800) for p in r.sample(OTHERS, 8)]
    if r.random() < 0.5:
        base = _cover(others[0], 1200, 900)
        f = r.uniform(0.35, 0.5)
        pw = int(base.width * f)
        ph = max(8, int(pw * im.height / im.width))
        if ph > base.height * 0.8:
            ph = int(base.height * 0.8)
            pw = max(8, int(ph * im.width / im.height))
        pic = im.resize((pw, ph), Image.BILINEAR)
        base.paste(pic, (r.randint(0, base.width - pw), r.randint(0, base.height - ph)))
        return _jpeg(base, 80)
    cols, rows = r.choice([(2, 2), (3, 2), (3, 1), (3, 3)])
    gutter = r.choice([0, 4, 10])
    cell = 1200 // cols
    ch = int(cell * r.uniform(0.75, 1.25))
    canvas = Image.new("RGB", (cols * cell + (cols + 1) * gutter, rows * ch + (rows + 1) * gutter),
                       r.choice([(255, 255, 255), (0, 0, 0), (30, 30, 30)]))
    mine = r.randrange(cols * rows)
    for k in range(cols * rows):
        src = im if k == mine else others[k % len(others)]
        cx, cy = k % cols, k // cols
        canvas.paste(_cover(src, cell, ch), (gutter + cx * (cell + gutter), gutter + cy * (ch + gutter)))
    return _jpeg(canvas, 82)


def t_heavy_crop(im: Image.Image, r: random.Random) -> Image.Image:
    """Well under half the area kept (25–40 %), anywhere in the picture, scaled back up and re-encoded."""
    w, h = im.size
    area = r.uniform(0.25, 0.40)
    aspect = r.uniform(0.8, 1.25)
    cw = min(w, int(w * (area * aspect) ** 0.5))
    ch = min(h, int(h * area / max(cw / w, 1e-6)))
    x, y = r.randint(0, w - cw), r.randint(0, h - ch)
    out = im.crop((x, y, x + cw, y + ch))
    s = r.uniform(600, 900) / max(out.size)
    return _jpeg(out.resize((max(8, int(out.width * s)), max(8, int(out.height * s))), Image.BICUBIC), 75)


def t_blur_noise(im: Image.Image, r: random.Random) -> Image.Image:
    """Downscaled to 640 px, a Gaussian blur of 1.5–2.5 px and sensor-like noise (σ 10–18 per channel, a little
    coarser than a pixel), re-encoded."""
    s = 640 / max(im.size)
    out = im.resize((max(8, int(im.width * s)), max(8, int(im.height * s))), Image.BILINEAR)
    out = out.filter(ImageFilter.GaussianBlur(r.uniform(1.5, 2.5)))
    rng = np.random.default_rng(r.randrange(1 << 30))
    noise = rng.normal(0, r.uniform(10, 18), (out.height // 2 + 1, out.width // 2 + 1, 3))
    noise = np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)[:out.height, :out.width]
    arr = np.clip(np.asarray(out, np.float32) + noise, 0, 255).astype(np.uint8)
    return _jpeg(Image.fromarray(arr), 80)


def t_stacked(im: Image.Image, r: random.Random) -> Image.Image:
    """Crop (75–88 %), a small rotation (±3–6°), a caption band, then JPEG at half size."""
    w, h = im.size
    f = r.uniform(0.75, 0.88)
    cw, ch = int(w * f), int(h * f)
    x, y = r.randint(0, w - cw), r.randint(0, h - ch)
    out = im.crop((x, y, x + cw, y + ch))
    out = out.rotate(r.choice([-1, 1]) * r.uniform(3, 6), resample=Image.BICUBIC, expand=True,
                     fillcolor=(255, 255, 255))
    band = max(24, out.height // 7)
    canvas = Image.new("RGB", (out.width, out.height + band), (255, 255, 255))
    canvas.paste(out, (0, band))
    ImageDraw.Draw(canvas).text((10, band // 5), "no way lol", fill=(0, 0, 0), font=_font(max(12, band // 2)))
    return t_jpeg_half(canvas, r)


def t_meme(im: Image.Image, r: random.Random) -> Image.Image:
    """Meme text on the picture itself: two lines in large white capitals with a black outline, top and bottom."""
    out = im.convert("RGB").copy()
    w, h = out.size
    d = ImageDraw.Draw(out)
    size = max(14, h // 9)
    font = _font(size)
    for text, y in (("WHEN THE MOD", h // 30), ("ISN'T LOOKING", h - size - h // 20)):
        tw = d.textlength(text, font=font)
        d.text(((w - tw) / 2, y), text, fill=(255, 255, 255), font=font, stroke_width=max(2, size // 12),
               stroke_fill=(0, 0, 0))
    return _jpeg(out, 80)


def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    """The 8 coefficients PIL's PERSPECTIVE transform takes to map output points ``dst`` to input ``src``."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    rhs = np.asarray([c for p in src for c in p], np.float64)
    return list(np.linalg.solve(np.asarray(a, np.float64), rhs))


def t_perspective(im: Image.Image, r: random.Random) -> Image.Image:
    """A photo of a screen or a print: the picture's corners moved inward by 3–9 % of its size (a mild
    keystone), on a dark surround, a little darker and softer, re-encoded."""
    s = 900 / max(im.size)
    im = im.resize((max(8, int(im.width * s)), max(8, int(im.height * s))), Image.BILINEAR)
    w, h = im.size
    W, H = int(w * 1.15), int(h * 1.15)
    ox, oy = (W - w) / 2, (H - h) / 2
    def j() -> float:
        return r.uniform(0.03, 0.09)
    dst = [(ox + w * j(), oy + h * j()), (ox + w - w * j(), oy + h * j()),
           (ox + w - w * j(), oy + h - h * j()), (ox + w * j(), oy + h - h * j())]
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    out = im.transform((W, H), Image.PERSPECTIVE, _perspective_coeffs(src, dst), Image.BICUBIC,
                       fillcolor=(25, 25, 28))
    out = ImageEnhance.Brightness(out).enhance(r.uniform(0.8, 0.95)).filter(ImageFilter.GaussianBlur(0.8))
    return _jpeg(out, 82)


HARD: dict[str, tuple[str, Callable[[Image.Image, random.Random], Image.Image]]] = {
    "collage": ("one cell of a collage / picture in picture over a photo", t_collage),
    "heavy_crop": ("heavy crop: 25–40 % of the area kept", t_heavy_crop),
    "blur_noise": ("blur + sensor-like noise", t_blur_noise),
    "stacked": ("stacked: crop, rotation 3–6°, caption band, JPEG half size", t_stacked),
    "meme": ("meme text over the picture", t_meme),
    "perspective": ("mild perspective (photo of a screen)", t_perspective),
}

COMMON: dict[str, tuple[str, Callable[[Image.Image, random.Random], Image.Image]]] = {
    "jpeg_half": ("JPEG quality 30 + half size", t_jpeg_half),
    "crop80": ("crop 80 %", t_crop),
    "mirror": ("mirror", t_mirror),
    "rotate8": ("rotate 8°", t_rotate),
    "screenshot": ("pasted into a screenshot-like frame", t_screenshot),
    "caption": ("caption band added", t_caption),
    "grey": ("greyscale + contrast", t_grey_contrast),
    "letterbox": ("letterboxed to 16:9", t_letterbox),
    "watermark": ("watermark + sticker", t_watermark),
}
TRANSFORMS = {**COMMON, **HARD}


def load_rgb(path: Path, max_side: int = 1600) -> Image.Image:
    im = Image.open(path)
    im.draft("RGB", (max_side, max_side))
    im = ImageOps.exif_transpose(im)
    if im.mode in ("P", "PA", "LA", "RGBA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        im = bg
    im = im.convert("RGB")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BILINEAR)
    return im


def plain_uploads(unused: list[Path], out: Path, n: int = 150) -> list[Path]:
    """Corpus files the store does not hold, re-encoded as an upload would arrive: searches that copy nothing."""
    done = []
    for i, src in enumerate(unused[:n]):
        path = out / f"{i:05d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            load_rgb(src).save(path, "JPEG", quality=85)
        done.append(path)
    return done


def make_queries(originals: list[Path], out: Path, seed: int) -> dict[str, list[Path]]:
    """Every original through every transform, written as files (JPEG or PNG as the transform gives)."""
    done: dict[str, list[Path]] = {t: [] for t in TRANSFORMS}
    for i, src in enumerate(originals):
        im = load_rgb(src)
        for name, (_, fn) in TRANSFORMS.items():
            path = out / name / f"{i:05d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fn(im, random.Random(seed * 7919 + i)).save(path, "PNG", compress_level=1)
            done[name].append(path)
    return done


def photo_sources(corpus: Path, seed: int, photos: int) -> dict[str, str]:
    """Which packaged wallpaper each corpus photo was cropped from, by replaying make-corpus's seeded
    choices (the same sources, the same random calls): ``picture_key`` of it says which picture a photo shows."""
    import glob
    sources = sorted(f for d in ("/usr/share/backgrounds", "/usr/share/wallpapers")
                     for f in glob.glob(f"{d}/**/*", recursive=True)
                     if f.lower().endswith((".jpg", ".jpeg", ".png")) and os.path.isfile(f))
    sources = [f for f in sources if os.path.getsize(f) > 100_000]
    r = random.Random(seed)
    sizes: dict[str, tuple[int, int]] = {}
    out = {}
    for i in range(photos):
        src = sources[r.randrange(len(sources))]
        if src not in sizes:
            with Image.open(src) as im:
                sizes[src] = im.size
        w, h = sizes[src]
        r.choice([640, 1024, 1280, 1600, 2048, 3000, 4000])
        cw, ch = int(w * r.uniform(0.3, 1.0)), int(h * r.uniform(0.3, 1.0))
        r.randrange(w - cw + 1), r.randrange(h - ch + 1)
        r.randint(75, 95)
        out[str(corpus / "photos" / f"photo_{i:06d}.jpg")] = src
    return out


def picture_key(wallpaper: str) -> str:
    """One packaged wallpaper picture, whatever the file: KDE ships each picture at many resolutions
    (``wallpapers/NAME/contents/images/WxH.jpg``, a dark variant under ``images_dark``), MATE some as
    ``NAME_WxH.jpg`` beside ``NAME.jpg``."""
    m = re.match(r".*/wallpapers/([^/]+)/contents/(images[^/]*)/", wallpaper)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return re.sub(r"[_-]\d+x\d+$", "", Path(wallpaper).stem)


MAX_PIXELS = 300_000_000  # the benchmark store's decode limit (FLAGMATCH_MAX_PIXELS)
PDQ_SAME = 31  # bits: PDQ's own match threshold — two clipart files this close are one drawing (sizes, tints)


def distinct_originals(files: list[Path], n: int, sources: dict[str, str]) -> list[Path]:
    """The first ``n`` files (in the shuffled order) that each show a picture no earlier pick shows: one
    photo per wallpaper picture (make-corpus crops its photos from a few dozen wallpapers, so two photos
    are often crops of one picture, overlapping or not), and no two files within PDQ's match threshold
    (the same clipart drawing at another size or tint). With two flagged originals of one picture, "the
    original is the first hit" is not a well-posed question: either is a right answer to "seen before?"."""
    sys.path.insert(0, str(ROOT))
    from indexer.media.decode import DecodeLimits, InputSpec, plan
    from indexer.errors import FlagmatchError
    from indexer.media.hashes import pdq_of
    limits = DecodeLimits(max_pixels=MAX_PIXELS)
    picked: list[Path] = []
    pictures: set[str] = set()
    codes: list[np.ndarray] = []
    for path in files:
        picture = picture_key(sources[str(path)]) if str(path) in sources else None
        if picture is not None and picture in pictures:
            continue
        try:  # an original the store refuses (too large to decode) cannot be searched for
            plan(path.read_bytes(), InputSpec(224), limits)
        except FlagmatchError:
            continue
        code = np.unpackbits(np.frombuffer(bytes.fromhex(pdq_of(np.asarray(load_rgb(path, 512))).hash), np.uint8))
        if codes and int(np.min(np.count_nonzero(np.stack(codes) != code, axis=1))) <= PDQ_SAME:
            continue
        picked.append(path)
        codes.append(code)
        if picture is not None:
            pictures.add(picture)
        if len(picked) == n:
            break
    return picked


# ------------------------------------------------------------------ the served API


def flagmatch(*args: str, env: dict[str, str]) -> str:
    p = subprocess.run([sys.executable, "-m", "flagmatch.cli", *args], env={**os.environ, **env},
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"flagmatch {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def search(base: str, token: str, path: Path, k: int = 10,
           stages: dict[str, list[float]] | None = None) -> tuple[list[int], list[str], float]:
    """One upload through the API: the flagged hits' ids and views, and the latency in ms; ``stages``
    collects the response's ``Server-Timing`` split (decode, embed, search, hashes, verify, …)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/api/v1/search?k={k}", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {token}"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())
        timing = r.headers.get("Server-Timing", "")
    ms = (time.perf_counter() - t) * 1000
    if stages is not None:
        for part in timing.split(","):
            m = re.match(r"\s*(\w+);dur=([\d.]+)", part)
            if m:
                stages.setdefault(m.group(1), []).append(float(m.group(2)))
    hits = data["results"][0]["hits"]
    return [h["id"] for h in hits], [h.get("view", "full") for h in hits], ms


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95)) if xs else 0.0


class SameContent:
    """Whether two stored images show the same picture, by local features (``indexer.media.local``: ORB keypoints
    on their 256-px thumbnails, RANSAC-fitted similarity transform, ≥ ``MIN_MATCHES`` agreeing matches). The
    originals show distinct pictures by make-corpus's record and PDQ, yet an artwork can still come in two
    files the record does not know; a first hit that verifies against the original is such a copy."""

    def __init__(self, home: Path) -> None:
        from flagmatch.settings import Settings
        from flagmatch.wiring import open_store
        from indexer.media.local import MIN_MATCHES, FeatureCache, agreeing_matches, thumbnail_grey
        self.min, self.agree = MIN_MATCHES, agreeing_matches
        self.store = open_store(Settings.load({"home": str(home)}, environ={}))
        self.features = FeatureCache(thumbnail_grey(self.store.thumbs_dir), size=1 << 20)
        self.verdicts: dict[tuple[int, int], bool] = {}

    def __call__(self, a: int, b: int) -> bool:
        key = (min(a, b), max(a, b))
        if key not in self.verdicts:
            recs = self.store.catalog.get_many(list(key))
            fa, fb = (self.features.get(recs[i].thumb_key) for i in key)
            self.verdicts[key] = fa is not None and fb is not None and self.agree(fa, fb) >= self.min
        return self.verdicts[key]


ICON_SIDE = 128  # px: an original no longer than this on its long side is an icon (make-corpus's clipart: 60–100 px)


def measure(env: dict[str, str], queries: dict[str, list[Path]], truth: list[int], log: Path,
            alike: Callable[[int, int], bool] | None = None, plain: list[Path] | None = None,
            icons: list[bool] | None = None) -> dict[str, Any]:
    """R@1 / R@10 per edit through one served configuration, each edit's latency (p50, p95) and its split by
    stage; ``plain``: uploads that copy nothing flagged, timed the same way (``"no copy"``). Every query's
    ranked hits are kept (``"ranked"``) so two runs can be compared hit for hit. ``icons``: which originals are
    icons (``ICON_SIDE``): R@1 is also given for icons and for the rest apart (``"r1_icons"``, ``"r1_pictures"``)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import start_server, stop_server
    proc, base, logf = start_server({**env, "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "2"}, log, timeout=600)
    token = env["FLAGMATCH_API_TOKENS"].split(":")[1]
    out: dict[str, Any] = {}
    try:
        search(base, token, (queries[next(iter(queries))] if queries else plain or [])[0])  # warm
        for name, paths in queries.items():
            r1 = r10 = c1 = 0
            times: list[float] = []
            views: dict[str, int] = {}
            stages: dict[str, list[float]] = {}
            ranked: list[list[int]] = []
            for path, want in zip(paths, truth):
                ids, vs, ms = search(base, token, path, stages=stages)
                ranked.append(ids)
                times.append(ms)
                r1 += bool(ids[:1] == [want])
                r10 += want in ids[:10]
                c1 += bool(ids[:1]) and (ids[0] == want or (alike is not None and alike(want, ids[0])))
                if want in ids:
                    v = vs[ids.index(want)]
                    views[v] = views.get(v, 0) + 1
            out[name] = {"r1": r1 / len(paths), "r10": r10 / len(paths), "p50_ms": median(times),
                         "p95_ms": p95(times), "views": views, "ranked": ranked,
                         "stages_ms": {k: median(v) for k, v in stages.items()}}
            if icons is not None:
                first = [bool(ids[:1] == [want]) for ids, want in zip(ranked, truth)]
                for part, keep in (("icons", True), ("pictures", False)):
                    mine = [f for f, ic in zip(first, icons) if ic == keep]
                    out[name][f"r1_{part}"] = sum(mine) / len(mine) if mine else None
                    out[name][f"n_{part}"] = len(mine)
            if alike is not None:
                out[name]["r1_content"] = c1 / len(paths)
            print(f"  {name:<12} R@1 {out[name]['r1']:.3f}  "
                  f"R@10 {out[name]['r10']:.3f}  "
                  f"p50 {out[name]['p50_ms']:.0f} ms  matched via {views}", flush=True)
        if plain:
            times, stages = [], {}
            hits = 0
            for path in plain:
                ids, _, ms = search(base, token, path, stages=stages)
                times.append(ms)
                hits += bool(ids)
            out["no copy"] = {"p50_ms": median(times), "p95_ms": p95(times), "n": len(plain),
                              "with_hits": hits / len(plain), "stages_ms": {k: median(v) for k, v in stages.items()}}
            print(f"  no copy      p50 {out['no copy']['p50_ms']:.0f} ms  p95 {out['no copy']['p95_ms']:.0f} ms  "
                  f"split {out['no copy']['stages_ms']}", flush=True)
    finally:
        stop_server(proc, logf)
    return out


# ------------------------------------------------------------------ families


def families(env: dict[str, str], originals: list[Path], queries: dict[str, list[Path]], work: Path,
             configs: dict[str, dict[str, str]], name: str = "families") -> dict[str, Any]:
    """Each original with its copies, all flagged, clustered; compared with the true families (``name``: the
    manifest's and the stores' name, one per set of edits)."""
    fam_dir = work / "family-files"
    manifest = work / f"{name}.jsonl"
    if not manifest.exists():
        fam_dir.mkdir(parents=True, exist_ok=True)
        with open(manifest, "w") as f:
            for i, src in enumerate(originals):
                f.write(json.dumps({"path": str(src), "external_id": f"fam{i}:orig"}) + "\n")
                for edit, paths in queries.items():
                    f.write(json.dumps({"path": str(paths[i]), "external_id": f"fam{i}:{edit}"}) + "\n")
    out: dict[str, Any] = {}
    ingested: dict[frozenset[tuple[str, str]], Path] = {}  # configurations that differ in clustering only share one ingest
    for label, extra in configs.items():
        home = work / f"home-{name}-{label}"
        shutil.rmtree(home, ignore_errors=True)
        e = {**env, **extra, "FLAGMATCH_HOME": str(home), "FLAGMATCH_FLAG_THRESHOLD": "0.0"}
        same = frozenset((k, v) for k, v in {**env, **extra}.items() if not k.startswith("FLAGMATCH_CLUSTER_"))
        if same in ingested:
            shutil.copytree(ingested[same], home)
        else:
            flagmatch("ingest", str(manifest), env=e)
            ingested[same] = home
        t = time.perf_counter()
        flagmatch("cluster", env=e)
        seconds = time.perf_counter() - t
        out[label] = {**score_families(home, icon_families(originals)), "seconds": seconds}
        print(f"  families [{label}]: ARI {out[label]['ari']:.3f}, whole {out[label]['whole']:.3f} (icons "
              f"{out[label]['whole_icons']:.3f}, pictures {out[label]['whole_pictures']:.3f}), noise "
              f"{out[label]['noise']:.3f}, {out[label]['clusters']} clusters, {seconds:.1f} s", flush=True)
    return out


def icon_families(originals: list[Path]) -> dict[str, bool]:
    """Each family's name (``fam<i>``) and whether its original is an icon (``ICON_SIDE``; the header only)."""
    out = {}
    for i, p in enumerate(originals):
        with Image.open(p) as im:
            out[f"fam{i}"] = max(im.size) <= ICON_SIDE
    return out


def score_families(home: Path, icons: dict[str, bool]) -> dict[str, Any]:
    """The last clustering run of ``home`` against the true families (its images' external ids ``fam<i>:<edit>``):
    ARI (noise as singletons), the share of families whole in one cluster (also for icon families and the rest
    apart), the noise share; the same for the copy families the job formed inside the clusters."""
    sys.path.insert(0, str(ROOT))
    from sklearn.metrics import adjusted_rand_score
    from sqlalchemy import text
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    store = open_store(Settings.load({}, environ={"FLAGMATCH_HOME": str(home)}))
    with store.catalog.engine.connect() as c:
        rows = c.execute(text(
            "select e.external_id, m.cluster_id, m.family from cluster_members m join image_paths e "
            "on e.image_id = m.image_id where m.run_id = (select max(id) from cluster_runs)")).all()
    store.close()
    fam, copies = {}, {}
    for ext, cid, family in rows:
        if ext:
            fam[ext], copies[ext] = cid, family
    keys = sorted(fam)
    truth = [k.split(":")[0] for k in keys]

    def whole(level: dict[str, Any], which: set[str]) -> float:
        groups: dict[str, list[Any]] = {}
        for k in keys:
            if k.split(":")[0] in which:
                groups.setdefault(k.split(":")[0], []).append(level[k])
        return sum(m[0] is not None and all(v == m[0] for v in m) for m in groups.values()) / max(1, len(groups))
    names = set(truth)
    icon_names = {n for n in names if icons.get(n)}
    pred = [f"c{fam[k]}" if fam[k] is not None else f"noise{j}" for j, k in enumerate(keys)]
    out: dict[str, Any] = {
        "images": len(keys), "families": len(names), "ari": adjusted_rand_score(truth, pred),
        "whole": whole(fam, names), "whole_icons": whole(fam, icon_names),
        "whole_pictures": whole(fam, names - icon_names), "icon_families": len(icon_names),
        "noise": sum(v is None for v in fam.values()) / max(1, len(fam)),
        "clusters": len({v for v in fam.values() if v is not None})}
    if any(v is not None for v in copies.values()):  # the level below: the copy families the job formed
        fpred = [f"f{copies[k]}" if copies[k] is not None else f"none{j}" for j, k in enumerate(keys)]
        out.update(copy_ari=adjusted_rand_score(truth, fpred), copy_whole=whole(copies, names),
                   copy_whole_icons=whole(copies, icon_names), copy_whole_pictures=whole(copies, names - icon_names))
    return out


def _drop_ranked(results: dict[str, Any]) -> None:
    """Each query's ranked hits (``measure``) left out of the results file: they serve a repeat's comparison only."""
    for per_edit in results["search"].values():
        for r in per_edit.values():
            if isinstance(r, dict):
                r.pop("ranked", None)


def rescore(path: Path, work: Path, n_originals: int) -> None:
    """``--rescore``: each family configuration of ``path`` whose store is still under ``work`` scored again."""
    data = json.loads(path.read_text())
    hard = "hard" in path.stem
    listed = [Path(json.loads(line)["path"]) for line in (work / "ingest.jsonl").read_text().splitlines()]
    icons = icon_families(listed[:n_originals])
    for label, r in data.get("families", {}).items():
        home = work / f"home-{'families-hard' if hard else 'families'}-{label}"
        if (home / "catalog.sqlite").exists():
            r.update(score_families(home, icons))
            print(f"  families [{label}]: whole {r['whole']:.3f} (icons {r['whole_icons']:.3f}, pictures "
                  f"{r['whole_pictures']:.3f})", flush=True)
    write(path.stem, data, (markdown_hard if hard else markdown)(data))


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=300)
    ap.add_argument("--distractors", type=int, default=3000)
    ap.add_argument("--corpus", default="/tmp/fm-match-corpus")
    ap.add_argument("--work", default="/tmp/fm-bench-match")
    ap.add_argument("--model", default="opennsfw")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-families", action="store_true")
    ap.add_argument("--families-only", action="store_true",
                    help="measure the families again, keeping the search results of the last run's JSON")
    ap.add_argument("--edits", choices=("common", "hard"), default="common",
                    help="common: the nine everyday edits and the families (match.json); hard: the edit classes "
                         "evaders use, learned whitening against the copy-detection head (match-hard.json)")
    ap.add_argument("--only", action="append", default=[],
                    help="measure only these configurations (with --edits hard, or --families-only), keeping the "
                         "others' last results")
    ap.add_argument("--plain-only", action="store_true",
                    help="with --edits hard: time only the uploads that copy nothing, keeping the edits' last results")
    ap.add_argument("--repeat", action="store_true",
                    help="with --edits hard: refit and measure the last configuration again and compare hit for hit")
    ap.add_argument("--edit", action="append", default=[], choices=list(TRANSFORMS),
                    help="with --edits hard: measure only these edits again, keeping the others' last results")
    ap.add_argument("--render", help="redraw the Markdown table from a results JSON, measuring nothing")
    ap.add_argument("--rescore", help="score the families' last clustering runs again (their stores under --work) "
                                      "into this results JSON, keeping the times; clusters nothing")
    a = ap.parse_args()
    if a.render:
        data = json.loads(Path(a.render).read_text())
        write(Path(a.render).stem, data, (markdown_hard if "hard" in Path(a.render).stem else markdown)(data))
        return
    if a.rescore:
        rescore(Path(a.rescore), Path(a.work), a.originals)
        return
    corpus, work = Path(a.corpus), Path(a.work)
    if not corpus.exists():
        subprocess.run([sys.executable, str(ROOT.parent / "shared" / "corpus" / "make-corpus"), str(corpus),
                        "--photos", "1800", "--clipart", "1700", "--seed", str(a.seed)], check=True)
    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    rng = random.Random(a.seed)
    rng.shuffle(files)
    sources = photo_sources(corpus, a.seed, sum(1 for f in files if f.suffix == ".jpg"))
    listing = work / "ingest.jsonl"
    if (work / "home" / "catalog.sqlite").exists() and listing.exists():
        # the store's own listing says which files it holds (originals first): a change to the picking rules
        # since it was made must not change which images count as originals
        listed = [Path(json.loads(line)["path"]) for line in listing.read_text().splitlines()]
        originals, distractors = listed[:a.originals], listed[a.originals:a.originals + a.distractors]
    else:
        originals = distinct_originals(files, a.originals, sources)
        distractors = [f for f in files if f not in set(originals)][: a.distractors]
    chosen = set(originals) | set(distractors)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{machine()}\n{len(originals)} originals, {len(distractors)} distractors, model {a.model}", flush=True)
    # a collage's other cells must not show a flagged picture: make-corpus crops its photos from a few dozen
    # wallpapers, and a crop of a flagged original's wallpaper in a collage is a second flagged picture in the
    # upload (then either is a right first hit). Measured before this rule: 72 of the 104 collages whose first
    # hit was not their original had put first another flagged picture the collage really held.
    flagged_pictures = {picture_key(sources[str(p)]) for p in originals if str(p) in sources}
    unflagged = [p for p in distractors if p.suffix == ".jpg" and str(p) in sources
                 and picture_key(sources[str(p)]) not in flagged_pictures]
    OTHERS[:] = unflagged[:400] if len(unflagged) >= 8 else [p for p in distractors if p.suffix == ".jpg"][:400]
    queries = make_queries(originals, work / "queries", a.seed)
    plain = plain_uploads([f for f in files if f not in chosen], work / "plain")

    token = "bench:bench-token"
    base_env = {"FLAGMATCH_MODEL": a.model, "FLAGMATCH_API_TOKENS": token, "FLAGMATCH_MAX_PIXELS": str(MAX_PIXELS)}
    home = work / "home"
    if not (home / "catalog.sqlite").exists():
        env = {**base_env, "FLAGMATCH_HOME": str(home), "FLAGMATCH_FLAG_THRESHOLD": "1.1"}
        listing = work / "ingest.jsonl"
        with open(listing, "w") as f:
            for p in originals + distractors:
                f.write(json.dumps({"path": str(p)}) + "\n")
        t = time.perf_counter()
        print(flagmatch("ingest", str(listing), env=env), f"{time.perf_counter() - t:.0f} s", flush=True)
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.storage.catalog import FlagRequest
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    truth = [store.catalog.resolve(hashlib.sha256(p.read_bytes()).hexdigest()) for p in originals]
    store.catalog.set_flag(truth, FlagRequest("import", "bench", "benchmark originals"), flag=True)
    store.close()
    if a.edits == "hard" and a.families_only:  # families built from the hard edits, copy families on and off
        path = ROOT / "benchmarks" / "results" / "match-hard.json"
        results = json.loads(path.read_text())
        results["families"] = families(base_env, originals, {n: queries[n] for n in HARD}, work, {
            "no copy families": {"FLAGMATCH_CLUSTER_FAMILIES": "0"},
            "copy families by local features alone": {"FLAGMATCH_CLUSTER_FAMILY_PDQ": "-1"},
            "copy families (default: local features or PDQ)": {}}, name="families-hard")
        results["families_machine"] = machine()
        write("match-hard", results, markdown_hard(results))
        return
    if a.edits == "hard":
        if a.edit:
            queries = {n: queries[n] for n in a.edit}
        icons = []
        for p in originals:  # the header only: the size, not the pixels
            with Image.open(p) as im:
                icons.append(max(im.size) <= ICON_SIDE)
        hard(a, base_env, home, queries, truth, plain, work, SameContent(home), icons)
        return
    queries = {n: queries[n] for n in COMMON}
    configs = {
        "raw features, whole image": {"FLAGMATCH_SPACE_DIM": "0", "FLAGMATCH_QUERY_VIEWS": "",
                                      "FLAGMATCH_VERIFY_HITS": "0"},
        "matching space, whole image": {"FLAGMATCH_QUERY_VIEWS": "", "FLAGMATCH_VERIFY_HITS": "0"},
        "matching space + views": {"FLAGMATCH_VERIFY_HITS": "0"},
        "default: matching space + views + verified hits": {},
    }
    suffix = "" if a.model == "opennsfw" else "-" + Path(a.model).name
    results: dict[str, Any] = {"machine": machine(), "model": a.model, "originals": len(originals),
                               "distractors": len(distractors), "search": {}}
    last = ROOT / "benchmarks" / "results" / f"match{suffix}.json"
    if a.families_only:
        results = {**json.loads(last.read_text()), "families_machine": machine()}
    elif a.skip_families and last.exists():  # the search measured again, the last run's families kept
        results.update({k: v for k, v in json.loads(last.read_text()).items() if k.startswith("families")})
    alike = SameContent(home)
    for label, extra in configs.items() if not a.families_only else ():
        env = {**base_env, **extra, "FLAGMATCH_HOME": str(home)}
        print(f"[{label}] reindex: " + flagmatch("reindex", env=env).strip().replace("\n", "; "), flush=True)
        results["search"][label] = measure(env, queries, truth, work / "serve.log", alike)

    if not a.skip_families:
        off = {"FLAGMATCH_CLUSTER_FAMILIES": "0"}
        family_configs = {
            "raw features": {"FLAGMATCH_SPACE_DIM": "0", "FLAGMATCH_CLUSTER_JOIN": "0", **off},
            "learned whitening, no join (before)": {"FLAGMATCH_CLUSTER_JOIN": "0", "FLAGMATCH_SPACE_HEAD_IMAGES": "0",
                                                    **off},
            "learned whitening + hard views, no copy families": {"FLAGMATCH_CLUSTER_JOIN": "0", **off},
            "+ copy families by local features alone": {"FLAGMATCH_CLUSTER_JOIN": "0",
                                                        "FLAGMATCH_CLUSTER_FAMILY_PDQ": "-1"},
            "default: + copy families (overlays discounted, mirrors tried, PDQ)": {"FLAGMATCH_CLUSTER_JOIN": "0"},
            "matching space + join at 0.85 by similarity alone": {"FLAGMATCH_CLUSTER_JOIN": "0.85",
                                                                  "FLAGMATCH_CLUSTER_VERIFY": "0", **off},
            "matching space + verified join at 0.3": {"FLAGMATCH_CLUSTER_JOIN": "0.3", **off},
            "matching space + verified join at 0.5": {"FLAGMATCH_CLUSTER_JOIN": "0.5", **off},
        }
        chosen = {k: v for k, v in family_configs.items() if not a.only or k in a.only}
        measured = families(base_env, originals, queries, work, chosen)
        results["families"] = {**results.get("families", {}), **measured} if a.only else measured

    _drop_ranked(results)
    write(f"match{suffix}", results, markdown(results))


HARD_CONFIGS = {
    "learned whitening (before)": {"FLAGMATCH_SPACE_HEAD_IMAGES": "0", "FLAGMATCH_REGION_VECTORS": "0"},
    "+ hard views": {"FLAGMATCH_REGION_VECTORS": "0"},
    "+ hard views + copy-detection head": {"FLAGMATCH_SPACE_HEAD": "1", "FLAGMATCH_REGION_VECTORS": "0"},
    "+ hard views + region vectors, verification depth 10": {"FLAGMATCH_VERIFY_DEPTH": "10"},
    "+ hard views + region vectors (default)": {},
}


def space_fingerprint(home: Path) -> str:
    """sha256 of the arrays of the matching space the store's indexes use (not of the file, which names its
    version): two fits of one store with one set of settings should give the same fingerprint."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.vectors.space import current_space
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    try:
        space = current_space(store, store.open_vectors().dim)
        return space.fingerprint()
    finally:
        store.close()


def hard(a: argparse.Namespace, base_env: dict[str, str], home: Path, queries: dict[str, list[Path]],
         truth: list[int], plain: list[Path], work: Path, alike: Callable[[int, int], bool],
         icons: list[bool] | None = None) -> None:
    """The hard edit classes through each configuration (``HARD_CONFIGS``), the uploads that copy nothing
    timed alongside; ``--repeat`` refits the last configuration and compares every ranked hit list."""
    name = "match-hard" + ("" if a.model == "opennsfw" else "-" + Path(a.model).name)
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    results: dict[str, Any] = (json.loads(path.read_text()) if path.exists() and (a.only or a.plain_only or a.edit)
                               else {"search": {}})
    results.update({"machine": machine(), "model": a.model, "originals": len(truth), "plain": len(plain)})
    runs = {lab: extra for lab, extra in HARD_CONFIGS.items() if not a.only or lab in a.only}
    for label, extra in runs.items():
        env = {**base_env, **extra, "FLAGMATCH_HOME": str(home)}
        t = time.perf_counter()
        print(f"[{label}] reindex: " + flagmatch("reindex", env=env).strip().replace("\n", "; "), flush=True)
        fit_s = time.perf_counter() - t
        if extra.get("FLAGMATCH_REGION_VECTORS") != "0":
            t = time.perf_counter()
            print("  " + flagmatch("regions", env=env).strip(), flush=True)
            results["regions_s"] = time.perf_counter() - t
        if a.plain_only:
            results["search"].setdefault(label, {})["no copy"] = measure(env, {}, truth, work / "serve.log", None,
                                                                         plain)["no copy"]
            continue
        if a.edit:  # these edits measured again, the rest (and the latency) kept from the last run
            results["search"].setdefault(label, {}).update(measure(env, queries, truth, work / "serve.log", alike,
                                                                   icons=icons))
            continue
        results["search"][label] = measure(env, queries, truth, work / "serve.log", alike, plain, icons=icons)
        results["search"][label]["reindex_s"] = fit_s
        results["search"][label]["space"] = space_fingerprint(home)
    if a.repeat:
        label, extra = list(HARD_CONFIGS.items())[-1]
        env = {**base_env, **extra, "FLAGMATCH_HOME": str(home)}
        for cached in ("space-views.npz", "space-pairs.npz", "regions.npz"):  # everything made again
            (home / "index" / cached).unlink(missing_ok=True)
        flagmatch("reindex", env=env)
        if extra.get("FLAGMATCH_REGION_VECTORS") != "0":
            flagmatch("regions", env=env)
        again = measure(env, queries, truth, work / "serve.log", alike)
        first = results["search"][label]
        same = sum(x == y for n in queries for x, y in zip(first[n]["ranked"], again[n]["ranked"]))
        total = sum(len(queries[n]) for n in queries)
        rep = {"same_ranked": same, "queries": total, "same_space": space_fingerprint(home) == first["space"]}
        results.setdefault("repeats", {})[label] = rep
        print(f"repeat of [{label}]: {same}/{total} ranked hit lists identical, same space: {rep['same_space']}",
              flush=True)
    _drop_ranked(results)
    write(name, results, markdown_hard(results))


def _split(r: dict[str, Any], key: str) -> str:
    return f"{r[key + '_icons']:.3f} / {r[key + '_pictures']:.3f}" if key + "_icons" in r else ""


def _icons_note(rows: dict[str, Any]) -> str:
    n = next((r["icon_families"] for r in rows.values() if "icon_families" in r), None)
    return ("" if n is None else
            f"Whole by the original's size: the {n} families whose original is an icon (no longer than {ICON_SIDE} "
            f"px) and the other {next(r['families'] for r in rows.values() if 'icon_families' in r) - n}; a row "
            f"without the split was measured before it was kept.")


def markdown_hard(results: dict[str, Any]) -> str:
    """The tables of ``--edits hard``."""
    labels = list(results["search"])
    md = [f"Hard edits on {results['machine']}; model `{results['model']}`; the match benchmark's store "
          f"({results['originals']} flagged originals among the distractors), each original searched through "
          f"`POST /api/v1/search` after one edit: the nine everyday edits, then in bold the edits evaders use (the "
          f"benchmark's own parameters, not the training augmentations'). R@1 / R@10 as in the table above.", ""]
    rows = []
    for name, (title, _) in TRANSFORMS.items():
        row: list[Any] = [("**" + title + "**") if name in HARD else title]
        for lab in labels:
            r = results["search"][lab].get(name)
            row.append(f"{r['r1']:.3f} / {r['r10']:.3f}" if r else "")
        rows.append(row)
    md.append(table(["edit"] + labels, rows))
    if results.get("note"):
        md += ["", results["note"]]
    split = [lab for lab in labels if any(isinstance(r, dict) and r.get("r1_icons") is not None
                                          for r in results["search"][lab].values())]
    if split:
        lab = split[-1]
        n_icons = next(r["n_icons"] for r in results["search"][lab].values() if isinstance(r, dict) and "n_icons" in r)
        md += ["", f"R@1 of `{lab}` by the original's size: icons ({n_icons} originals no longer than {ICON_SIDE} px, "
                   f"make-corpus's 60–100 px clipart: a half-size or cropped copy of one is 30–50 px) and the other "
                   f"{results['originals'] - n_icons} pictures:", ""]
        md.append(table(["edit", "all", "icons", "pictures"],
                        [[("**" + title + "**") if name in HARD else title, f"{r['r1']:.3f}",
                          f"{r['r1_icons']:.3f}", f"{r['r1_pictures']:.3f}"]
                         for name, (title, _) in TRANSFORMS.items()
                         if (r := results["search"][lab].get(name)) and r.get("r1_icons") is not None]))
    md += ["", f"Latency of an upload that copies nothing ({results['plain']} corpus files the store does not hold, "
               f"as JPEGs), p50 / p95 in ms and the median split by stage (`Server-Timing`)"
               + (f"; {results['latency_note']}" if results.get("latency_note") else "") + ":", ""]
    stages = sorted({k for lab in labels for k in results["search"][lab].get("no copy", {}).get("stages_ms", {})})
    md.append(table(["configuration", "p50 / p95"] + stages + ["reindex (s)"],
                    [[lab, (f"{nc['p50_ms']:.0f} / {nc['p95_ms']:.0f}" if (nc := results['search'][lab].get('no copy'))
                            else "")]
                     + [f"{results['search'][lab].get('no copy', {}).get('stages_ms', {}).get(k, 0):.1f}"
                        for k in stages] + [f"{results['search'][lab].get('reindex_s', 0):.0f}"]
                     for lab in labels]))
    if "families" in results:
        md += ["", f"Families built from these edits: each original with its {len(HARD)} hard-edited copies, all "
                   f"flagged, clustered by `flagmatch cluster` ({results.get('families_machine', '')}):", ""]
        md.append(table(["pipeline", "ARI", "families kept whole", "whole: icons / pictures", "noise share",
                         "time (s)", "copy families: ARI", "copy families: whole"],
                        [[lab, f"{r['ari']:.3f}", f"{r['whole']:.3f}", _split(r, "whole"), f"{r['noise']:.3f}",
                          f"{r['seconds']:.1f}", f"{r['copy_ari']:.3f}" if "copy_ari" in r else "",
                          f"{r['copy_whole']:.3f}" if "copy_whole" in r else ""]
                         for lab, r in results["families"].items()]))
        md += ["", _icons_note(results["families"])]
    for label, r in results.get("repeats", {}).items():
        md += ["", f"Determinism: `{label}` refitted and measured again{' (' + r['note'] + ')' if r.get('note') else ''}: "
               f"{r['same_ranked']} of {r['queries']} ranked hit lists identical; the space's arrays "
               f"{'identical' if r['same_space'] else 'DIFFERENT'}."]
    return "\n".join(md)


def markdown(results: dict[str, Any]) -> str:
    """The README table of one run's results (``--render FILE.json`` redraws it without measuring)."""
    n_orig, n_fam = results["originals"], len(COMMON) + 1
    md = [f"Matching quality on {results['machine']}; model `{results['model']}`; {n_orig} flagged originals among "
          f"{results['distractors']} distractors (photos and clipart from `make-corpus`), each original searched "
          f"through `POST /api/v1/search` after one edit. R@1: the original is the first flagged hit; R@10: in the "
          f"top 10 (the originals show distinct pictures: one photo per wallpaper, no two within PDQ distance "
          f"{PDQ_SAME}); same-content "
          f"R@1: the first hit is the original or another flagged image whose thumbnail matches the original's by "
          f"local features (ORB + RANSAC, ≥ 12 agreeing matches: the corpus holds some "
          f"artworks in several files). p50: the request's latency on loopback, median over the edits.", ""]
    labels = list(results["search"])
    rows = []
    for name, (title, _) in COMMON.items():
        row: list[Any] = [title]
        for lab in labels:
            r = results["search"][lab][name]
            row += [f"{r['r1']:.3f}", f"{r['r10']:.3f}"]
        last = results["search"][labels[-1]][name]
        row.append(f"{last['r1_content']:.3f}" if "r1_content" in last else "")
        rows.append(row)
    lat: list[Any] = ["p50 latency (ms)"]
    for lab in labels:
        lat += [f"{median([results['search'][lab][n]['p50_ms'] for n in COMMON]):.0f}", ""]
    rows.append(lat + [""])
    heads = (["edit"] + [f"{h} ({lab})" for lab in labels for h in ("R@1", "R@10")]
             + [f"same-content R@1 ({labels[-1]})"])
    md.append(table(heads, rows))
    if results.get("latency_note"):
        md += ["", results["latency_note"]]
    if "families" in results:
        md += ["", f"Families: each original with its {len(COMMON)} copies, all flagged "
               f"({n_orig * n_fam} images), clustered by `flagmatch cluster`."
               + (f" {results['families_note']}" if results.get("families_note") else ""), ""]
        md.append(table(["pipeline", "ARI", "families kept whole", "whole: icons / pictures", "noise share",
                         "clusters", "time (s)", "copy families: ARI", "copy families: whole"],
                        [[lab, f"{r['ari']:.3f}", f"{r['whole']:.3f}", _split(r, "whole"), f"{r['noise']:.3f}",
                          r["clusters"], f"{r['seconds']:.1f}", f"{r['copy_ari']:.3f}" if "copy_ari" in r else "",
                          f"{r['copy_whole']:.3f}" if "copy_whole" in r else ""]
                         for lab, r in results["families"].items()]))
        md += ["", _icons_note(results["families"])]
    return "\n".join(md)


if __name__ == "__main__":
    main()
