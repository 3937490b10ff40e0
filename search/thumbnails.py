"""Thumbnails as a reader sees them: the stored WebP as is for API clients; blurred (until revealed)
and optionally greyscale for a moderator in the viewer. Rendered versions are cached by file and mtime."""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps


def render(path: Path, *, blur: bool, grey: bool) -> bytes:
    """The thumbnail at ``path``, blurred and/or greyscale (the stored bytes when neither)."""
    if not blur and not grey:
        return path.read_bytes()  # a few kB: no file handle to leak
    return _rendered(str(path), blur, grey, path.stat().st_mtime)


@lru_cache(maxsize=4096)
def _rendered(path: str, blur: bool, grey: bool, mtime: float) -> bytes:
    with Image.open(path) as src:
        return _filtered(src.convert("RGB"), blur, grey)


def render_bytes(webp: bytes, *, blur: bool, grey: bool) -> bytes:
    """The same for a thumbnail held in memory (a search's query, never stored)."""
    if not blur and not grey:
        return webp
    with Image.open(io.BytesIO(webp)) as src:
        return _filtered(src.convert("RGB"), blur, grey)


def _filtered(im: Image.Image, blur: bool, grey: bool) -> bytes:
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=max(6, max(im.size) // 14)))
    if grey:
        im = ImageOps.grayscale(im)
    buf = io.BytesIO()
    im.save(buf, "WEBP", quality=70, method=1)
    return buf.getvalue()
