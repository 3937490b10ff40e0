"""The hostile class, drawn in code: files that are small on disk but would make a naive decoder
allocate gigabytes or spend minutes. Each returns bytes; ``HOSTILE`` names them all.

    python -m tests.helpers.hostile OUT_DIR        # write them as files (for ingest and the soak benchmark)"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tests.helpers import drawn_image, encode


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def strip_png(w: int, h: int) -> bytes:
    """A valid RGB PNG of w × h (a few hundred bytes for extreme shapes)."""
    return encode(Image.new("RGB", (w, h), (40, 90, 160)), "PNG")


def tall_strip() -> bytes:
    return strip_png(1, 20_000)


def wide_strip() -> bytes:
    return strip_png(20_000, 1)


def long_banner() -> bytes:
    """3 × 1,000,000 px (3 Mpx, under the pixel cap): resizing the short side to 384 would need 128 Gpx."""
    return strip_png(1_000_000, 3)


def many_frames_gif() -> bytes:
    """10,000 frames, each different: counting frames must not decode them."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L").convert("P")
              for _ in range(10_000)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)


def huge_text_png() -> bytes:
    """A normal picture with 8 MB of tEXt chunks and a zTXt chunk that inflates far past Pillow's limit."""
    base = encode(drawn_image(11, (200, 150)), "PNG")
    text = b"".join(_png_chunk(b"tEXt", b"Comment\x00" + b"A" * (1 << 20)) for _ in range(8))
    bomb = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"B" * (256 << 20), 9))
    return base[:33] + text + bomb + base[33:]


def huge_icc_png() -> bytes:
    """An iCCP chunk whose profile inflates to 256 MB."""
    base = encode(drawn_image(12, (200, 150)), "PNG")
    icc = _png_chunk(b"iCCP", b"evil\x00\x00" + zlib.compress(b"\x00" * (256 << 20), 9))
    return base[:33] + icc + base[33:]


def huge_exif_jpeg() -> bytes:
    """A JPEG carrying a maximal EXIF block (64 kB of tags) with an orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 60_000  # ImageDescription
    return encode(drawn_image(13, (300, 200)), "JPEG", exif=exif.tobytes())


def progressive_photo() -> bytes:
    """A 40 Mpx progressive JPEG: libjpeg keeps every coefficient of the full image (~240 MB)."""
    im = Image.new("RGB", (8000, 5000), (120, 60, 30))
    return encode(im, "JPEG", quality=70, progressive=True)


def phone_photo() -> bytes:
    """108 Mpx (12,000 × 9,000) baseline JPEG, what phone cameras produce: accepted via DCT scaling."""
    im = Image.new("RGB", (12_000, 9_000), (200, 180, 160))
    return encode(im, "JPEG", quality=80)


def phone_photo_250mp() -> bytes:
    """250 Mpx (20,000 × 12,500) greyscale JPEG: over Pillow's own bomb limit, under ours after draft."""
    return encode(Image.new("L", (20_000, 12_500), 90), "JPEG", quality=75)


def pixel_flood_png() -> bytes:
    """A 1-bit PNG of 30,000 × 30,000 (900 Mpx) in a few hundred kB."""
    return encode(Image.new("1", (30_000, 30_000), 0), "PNG")


def deep_tiff() -> bytes:
    """A TIFF of 2,000 pages."""
    frames = [Image.new("L", (8, 8), i % 256) for i in range(2000)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


HOSTILE: dict[str, Callable[[], bytes]] = {
    "tall_strip.png": tall_strip, "wide_strip.png": wide_strip, "long_banner.png": long_banner,
    "many_frames.gif": many_frames_gif, "huge_text.png": huge_text_png, "huge_icc.png": huge_icc_png,
    "huge_exif.jpg": huge_exif_jpeg, "progressive_40mp.jpg": progressive_photo, "phone_108mp.jpg": phone_photo,
    "phone_250mp.jpg": phone_photo_250mp,
    "pixel_flood.png": pixel_flood_png, "deep.tiff": deep_tiff,
}


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in HOSTILE.items():
        p = out / name
        p.write_bytes(make())
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1])):
        print(f"{p.stat().st_size:>12,}  {p}")
