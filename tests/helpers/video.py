"""Clips made here with PyAV (FFmpeg's own MPEG-4 Part 2 encoder: in every FFmpeg build), and the hostile
videos: real clips whose headers are rewritten to lie (ISO BMFF boxes patched in place), cut or damaged."""
from __future__ import annotations

import io
import struct

import numpy as np

from tests.helpers import drawn_image


def clip(scenes: list[int], seconds_each: float = 2.0, size: tuple[int, int] = (160, 120), fps: int = 10,
         fmt: str = "mp4", codec: str = "mpeg4", pan: bool = True) -> bytes:
    """A slideshow: each scene is ``drawn_image(seed)`` for ``seconds_each``, panned slowly (every frame
    differs a little, as camera footage does)."""
    import av
    w, h = size
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 400_000
        for seed in scenes:
            big = np.asarray(drawn_image(seed, (w + 40, h + 30)).convert("RGB"))
            n = int(seconds_each * fps)
            for i in range(n):
                dx = int(40 * i / max(n - 1, 1)) if pan else 0
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[15:15 + h, dx:dx + w]), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _box(data: bytes, kind: bytes, start: int = 0) -> int:
    """The offset of the first box of ``kind`` (its type field) at or after ``start``."""
    at = data.find(kind, start)
    if at < 4:
        raise ValueError(f"no {kind!r} box")
    return at


def with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """The sample entry ('mp4v') and track header state another frame size."""
    b = bytearray(data)
    entry = _box(data, b"mp4v")
    struct.pack_into(">HH", b, entry + 28, width, height)  # VisualSampleEntry: after 24 bytes of fields
    tkhd = _box(data, b"tkhd")
    version = b[tkhd + 4]
    at = tkhd + 4 + (92 if version == 1 else 80)  # width, height: 16.16 fixed point at the box's end
    struct.pack_into(">II", b, at, width << 16, height << 16)
    return bytes(b)


def with_duration(data: bytes, seconds: float) -> bytes:
    """The movie and media headers ('mvhd', 'mdhd', version 0) state another duration."""
    b = bytearray(data)
    for kind in (b"mvhd", b"mdhd"):
        at = _box(data, kind)
        if b[at + 4] != 0:
            raise ValueError("a version-1 header: 64-bit fields")
        timescale = struct.unpack_from(">I", b, at + 16)[0]
        struct.pack_into(">I", b, at + 20, min(int(seconds * timescale), 0xFFFFFFFF))
    return bytes(b)


def with_box_size(data: bytes, kind: bytes = b"moov", size: int = 0xFFFFFFF0) -> bytes:
    """A box whose size field claims ~4 GB."""
    b = bytearray(data)
    struct.pack_into(">I", b, _box(data, kind) - 4, size)
    return bytes(b)


def damaged(data: bytes, share: float = 0.5, n: int = 4096, seed: int = 0) -> bytes:
    """``n`` random bytes written over the middle of the media data."""
    b = bytearray(data)
    mdat = _box(data, b"mdat")
    start = mdat + 8 + int((len(b) - mdat - 8) * share) - n // 2
    b[start:start + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(b)
