"""Synthetic re-uploads for learning the matching space: a stored image's thumbnail through one to three
of the edits re-uploads go through (recompression at a smaller size, crops, greyscale and contrast,
small rotations, caption bands, padding, blur, colour shifts, a screenshot-like frame, mirroring), with
random strengths. The pairs (thumbnail, edited thumbnail) teach the space which directions of the
model's features are edit noise (see ``indexer.vectors.space.fit_learned``).

``hard_view`` makes the views the copy-detection head learns from (``indexer.vectors.space.fit_head``): the
edits evaders use on top of those — heavy crops, blur with sensor noise, text over the picture, perspective,
the picture as one cell of a collage or inset over another picture, several stacked."""
from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EDITS = ("jpeg", "crop", "grey", "rotate", "band", "pad", "blur", "colour", "frame", "mirror")


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _side(n: int, f: float) -> int:
    """A part ``f`` of a side of ``n`` pixels: at least 8 pixels, never more than the side (a picture a few
    pixels thin — a rule, a banner clipart — stays whole across it)."""
    return min(n, max(8, int(n * f)))


def edit(im: Image.Image, name: str, r: random.Random) -> Image.Image:
    w, h = im.size
    if name == "jpeg":
        f = r.uniform(0.4, 1.0)
        return _jpeg(im.resize((max(8, int(w * f)), max(8, int(h * f))), Image.BILINEAR), r.randint(15, 60))
    if name == "crop":
        f = r.uniform(0.6, 0.95)
        cw, ch = _side(w, f), _side(h, f)
        x, y = r.randint(0, w - cw), r.randint(0, h - ch)
        return im.crop((x, y, x + cw, y + ch))
    if name == "grey":
        return ImageEnhance.Contrast(ImageOps.grayscale(im).convert("RGB")).enhance(r.uniform(0.7, 1.8))
    if name == "rotate":
        fill = tuple(r.randint(0, 255) for _ in range(3))
        return im.rotate(r.uniform(-12, 12), resample=Image.BICUBIC, expand=True, fillcolor=fill)
    if name == "band":
        band = max(4, int(h * r.uniform(0.1, 0.3)))
        canvas = Image.new("RGB", (w, h + band), (255, 255, 255) if r.random() < 0.7 else (0, 0, 0))
        top = r.random() < 0.5
        canvas.paste(im, (0, band if top else 0))
        ImageDraw.Draw(canvas).text((5, 2 if top else h + 2), "SOME CAPTION", fill=(128, 0, 0))
        return canvas
    if name == "pad":
        canvas = Image.new("RGB", (int(w * r.uniform(1.0, 1.5)), int(h * r.uniform(1.0, 1.5))), (0, 0, 0))
        canvas.paste(im, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        return canvas
    if name == "blur":
        return im.filter(ImageFilter.GaussianBlur(r.uniform(0.5, 2.0)))
    if name == "colour":
        return ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(r.uniform(0.7, 1.3))).enhance(r.uniform(0.5, 1.5))
    if name == "frame":
        canvas = Image.new("RGB", (int(w * 1.6), int(h * 1.5)), (240, 240, 240))
        d = ImageDraw.Draw(canvas)
        d.rectangle((0, 0, canvas.width, int(h * 0.1)), fill=(50, 80, 160))
        canvas.paste(im, (int(w * 0.45), int(h * 0.25)))
        for k in range(5):
            d.text((4, int(h * 0.15) + 12 * k), "@user", fill=(0, 0, 0))
        return canvas
    if name == "mirror":
        return ImageOps.mirror(im)
    raise ValueError(f"unknown edit {name!r}")


def reupload(im: Image.Image, r: random.Random) -> Image.Image:
    """One to three random edits, in random order."""
    out = im.convert("RGB")
    for name in r.sample(EDITS, r.randint(1, 3)):
        out = edit(out, name, r)
    return out


HARD_EDITS = ("heavy_crop", "noise", "text", "perspective", "cell", "inset", "rotate_crop")
_WORDS = ("LOOK", "AT", "THIS", "NOBODY", "ME", "WHEN", "FRIDAY", "REAL", "OK", "WAIT", "FOR", "IT", "LOL", "NEW")


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "LiberationSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _cover(im: Image.Image, w: int, h: int) -> Image.Image:
    s = max(w / im.width, h / im.height)
    im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BILINEAR)
    x, y = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((x, y, x + w, y + h))


def _perspective(im: Image.Image, r: random.Random) -> Image.Image:
    w, h = im.size
    def j() -> float:
        return r.uniform(0.0, 0.12)
    # output corners → input corners (PIL maps output to input)
    dst = [(w * j(), h * j()), (w - w * j(), h * j()), (w - w * j(), h - h * j()), (w * j(), h - h * j())]
    src = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
    a, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    coeffs = np.linalg.solve(np.asarray(a, np.float64), np.asarray(rhs, np.float64))
    fill = tuple(r.randint(0, 60) for _ in range(3))
    return im.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC, fillcolor=fill)


def hard_edit(im: Image.Image, name: str, r: random.Random, others: list[Image.Image]) -> Image.Image:
    """One of ``HARD_EDITS``; ``others`` are other stored pictures (collage cells, the picture an inset covers)."""
    w, h = im.size
    if name == "heavy_crop":
        area, aspect = r.uniform(0.15, 0.5), r.uniform(0.7, 1.4)
        cw = _side(w, (area * aspect) ** 0.5)
        ch = min(h, max(8, int(h * area * w / cw)))
        x, y = r.randint(0, w - cw), r.randint(0, h - ch)
        return im.crop((x, y, x + cw, y + ch))
    if name == "noise":
        out = im.filter(ImageFilter.GaussianBlur(r.uniform(0.5, 2.5)))
        rng = np.random.default_rng(r.randrange(1 << 30))
        arr = np.asarray(out, np.float32) + rng.normal(0, r.uniform(5, 25), (h, w, 3 if r.random() < 0.7 else 1))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if name == "text":
        out = im.copy()
        d = ImageDraw.Draw(out)
        for _ in range(r.randint(1, 3)):
            size = max(8, int(h * r.uniform(0.06, 0.16)))
            words = " ".join(r.choice(_WORDS) for _ in range(r.randint(1, 4)))
            fill = r.choice([(255, 255, 255), (0, 0, 0), (255, 230, 0), (230, 30, 30)])
            d.text((r.randint(0, max(1, w // 3)), r.randint(0, max(1, h - size))), words, font=_font(size),
                   fill=fill, stroke_width=max(1, size // 14), stroke_fill=(0, 0, 0) if sum(fill) > 300 else (255, 255, 255))
        return out
    if name == "perspective":
        return _perspective(im, r)
    if name == "cell":  # the picture cropped to a collage cell's shape, with a gutter and a strip of a neighbour
        aspect = r.uniform(0.6, 1.6)
        cw = w
        ch = max(8, int(cw / aspect))
        cell = _cover(im, cw, ch)
        g = r.choice([0, 0, 2, 6])
        strip = int(min(cw, ch) * r.uniform(0.0, 0.2))
        canvas = Image.new("RGB", (cw + g + strip, ch), r.choice([(255, 255, 255), (0, 0, 0), (40, 40, 40)]))
        left = r.random() < 0.5
        canvas.paste(cell, (g + strip if left else 0, 0))
        if strip and others:
            canvas.paste(_cover(r.choice(others), strip, ch), (0 if left else cw + g, 0))
        return canvas
    if name == "inset":  # the picture pasted over another one at 40–75 % of its width
        base = _cover(r.choice(others), w, h) if others else Image.new("RGB", (w, h), (128, 128, 128))
        f = r.uniform(0.4, 0.75)
        pw, ph = _side(w, f), _side(h, f)
        base.paste(im.resize((pw, ph), Image.BILINEAR), (r.randint(0, w - pw), r.randint(0, h - ph)))
        return base
    if name == "rotate_crop":
        angle = r.uniform(-15, 15)
        out = im.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0))
        f = r.uniform(0.7, 0.95)
        cw, ch = _side(w, f), _side(h, f)
        x, y = (w - cw) // 2, (h - ch) // 2
        return out.crop((x, y, x + cw, y + ch))
    raise ValueError(f"unknown hard edit {name!r}")


def hard_view(im: Image.Image, r: random.Random, others: list[Image.Image]) -> Image.Image:
    """One to three hard edits (``HARD_EDITS``), sometimes with an everyday one (``EDITS``), then recompressed."""
    out = im.convert("RGB")
    names = r.sample(HARD_EDITS, r.choices((1, 2, 3), (5, 3, 1))[0])
    for name in names:
        out = hard_edit(out, name, r, others)
    if r.random() < 0.5:
        out = edit(out, r.choice(EDITS), r)
    return _jpeg(out, r.randint(30, 90))
