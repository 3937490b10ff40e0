"""Thumbnails as a reader sees them: the stored WebP as is for API clients; blurred (until revealed)
and optionally greyscale for a moderator in the viewer. Rendered versions are cached by file and mtime."""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps


# Blur strengths a moderator picks from: the radius as a share of the picture's long side. "light" keeps
# the shapes of icons and clipart (the "strong" default turns a 64 px icon into a blob); "strong" hides
# the detail of photos at every size the viewer shows.
BLUR_STRENGTHS = {"light": 40, "medium": 20, "strong": 14}


def render(path: Path, *, blur: bool, grey: bool, strength: str = "strong") -> bytes:
    """The thumbnail at ``path``, blurred and/or greyscale (the stored bytes when neither)."""
    if not blur and not grey:
        return path.read_bytes()  # a few kB: no file handle to leak
    return _rendered(str(path), blur, grey, strength, path.stat().st_mtime)


@lru_cache(maxsize=4096)
def _rendered(path: str, blur: bool, grey: bool, strength: str, mtime: float) -> bytes:
    with Image.open(path) as src:
        return _filtered(src.convert("RGB"), blur, grey, strength)


def render_bytes(webp: bytes, *, blur: bool, grey: bool, strength: str = "strong") -> bytes:
    """The same for a picture held in memory (a search's query, a larger view)."""
    if not blur and not grey:
        return webp
    with Image.open(io.BytesIO(webp)) as src:
        return _filtered(src.convert("RGB"), blur, grey, strength)


def _filtered(im: Image.Image, blur: bool, grey: bool, strength: str = "strong") -> bytes:
    if blur:
        divisor = BLUR_STRENGTHS.get(strength, BLUR_STRENGTHS["strong"])
        floor = 6 if strength == "strong" else 2
        im = im.filter(ImageFilter.GaussianBlur(radius=max(floor, max(im.size) // divisor)))
    if grey:
        im = ImageOps.grayscale(im)
    buf = io.BytesIO()
    im.save(buf, "WEBP", quality=70, method=1)
    return buf.getvalue()
