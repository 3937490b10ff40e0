"""Synthetic re-uploads for learning the matching space: a stored image's thumbnail through one to three
of the edits re-uploads go through (recompression at a smaller size, crops, greyscale and contrast,
small rotations, caption bands, padding, blur, colour shifts, a screenshot-like frame, mirroring), with
random strengths. The pairs (thumbnail, edited thumbnail) teach the space which directions of the
model's features are edit noise (see ``indexer.vectors.space.fit_learned``)."""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

EDITS = ("jpeg", "crop", "grey", "rotate", "band", "pad", "blur", "colour", "frame", "mirror")


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def edit(im: Image.Image, name: str, r: random.Random) -> Image.Image:
    w, h = im.size
    if name == "jpeg":
        f = r.uniform(0.4, 1.0)
        return _jpeg(im.resize((max(8, int(w * f)), max(8, int(h * f))), Image.BILINEAR), r.randint(15, 60))
    if name == "crop":
        f = r.uniform(0.6, 0.95)
        cw, ch = max(8, int(w * f)), max(8, int(h * f))
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
