"""Clips made here with PyAV (FFmpeg's own MPEG-4 Part 2 encoder: in every FFmpeg build), and the hostile
videos: real clips whose headers are rewritten to lie (ISO BMFF boxes patched in place), cut or damaged."""
from __future__ import annotations

import io
import struct
from typing import Iterator

import numpy as np

from tests.helpers import drawn_image, encode


def encode_frames(frames: Iterator[np.ndarray], size: tuple[int, int], fps: int, fmt: str = "mp4",
                  codec: str = "mpeg4", bit_rate: int = 400_000) -> bytes:
    """RGB frames (uint8 arrays of ``size``) encoded with PyAV."""
    import av
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.bit_rate = bit_rate
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def clip(scenes: list[int], seconds_each: float = 2.0, size: tuple[int, int] = (160, 120), fps: int = 10,
         fmt: str = "mp4", codec: str = "mpeg4", pan: bool = True) -> bytes:
    """A slideshow: each scene is ``drawn_image(seed)`` for ``seconds_each``, panned slowly (every frame
    differs a little, as camera footage does)."""
    w, h = size
    n = int(seconds_each * fps)

    def frames() -> Iterator[np.ndarray]:
        for seed in scenes:
            big = np.asarray(drawn_image(seed, (w + 40, h + 30)).convert("RGB"))
            for i in range(n):
                dx = int(40 * i / max(n - 1, 1)) if pan else 0
                yield big[15:15 + h, dx:dx + w]
    return encode_frames(frames(), size, fps, fmt, codec)


def slideshow(pictures: list, seconds_each: float = 2.0, size: tuple[int, int] = (192, 144), fps: int = 10,
              fmt: str = "mp4", codec: str = "mpeg4") -> bytes:
    """A clip showing each picture (a PIL image) for ``seconds_each``, scaled to the frame, zooming in slowly."""
    from PIL import Image
    n = int(seconds_each * fps)

    def frames() -> Iterator[np.ndarray]:
        for pic in pictures:
            pw, ph = pic.size
            for i in range(n):
                z = 0.06 * i / max(n - 1, 1)  # up to 6 % in
                box = (pw * z / 2, ph * z / 2, pw * (1 - z / 2), ph * (1 - z / 2))
                yield np.asarray(pic.convert("RGB").resize(size, Image.BILINEAR, box=box))
    return encode_frames(frames(), size, fps, fmt, codec, 600_000)


def _box(data: bytes, kind: bytes, start: int = 0) -> int:
    """The offset of the first box of ``kind`` (its type field) at or after ``start``."""
    at = data.find(kind, start)
    if at < 4:
        raise ValueError(f"no {kind!r} box")
    return at


def with_frame_size(width: int, height: int) -> bytes:
    """A WebM (VP9) clip whose track header and whose first frame's header both state ``width`` × ``height``
    (FFmpeg believes the bitstream: a 30000×30000 keyframe would need a 1.3 GB picture)."""
    data = clip([5, 6], seconds_each=0.5, size=(640, 480), fmt="webm", codec="libvpx-vp9")
    b = bytearray(data)
    for element, value in ((b"\xb0\x82", 640), (b"\xba\x82", 480)):  # PixelWidth, PixelHeight: 2-byte values
        at = data.find(element + value.to_bytes(2, "big"))
        b[at + 2:at + 4] = (width if element == b"\xb0\x82" else height).to_bytes(2, "big")
    sync = data.find(b"\x49\x83\x42")  # VP9 keyframe: sync code, 4 bits of colour config, then width-1, height-1
    bits = int.from_bytes(data[sync + 3:sync + 9], "big")
    bits = (bits & ~(((1 << 32) - 1) << 12)) | ((width - 1) << 28) | ((height - 1) << 12)
    b[sync + 3:sync + 9] = bits.to_bytes(6, "big")
    return bytes(b)


def reencode(data: bytes, size: tuple[int, int], fmt: str = "webm", codec: str = "libvpx-vp9",
             bit_rate: int = 150_000, start_s: float = 0.0) -> bytes:
    """The clip decoded and encoded again: another size, codec and bit rate; ``start_s`` trims its start."""
    import av
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(out, mode="w", format=fmt) as dst:
        vin = src.streams.video[0]
        stream = dst.add_stream(codec, rate=vin.average_rate)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = size[0], size[1], "yuv420p", bit_rate
        for frame in src.decode(vin):
            if frame.time is not None and frame.time < start_s:
                continue
            image = frame.to_image().resize(size)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out.getvalue()


def with_duration(data: bytes, seconds: float) -> bytes:
    """A Matroska/WebM clip whose segment header (Info/Duration, an EBML float in milliseconds) states
    another duration."""
    at = data.find(b"\x44\x89")
    size = data[at + 2] & 0x7F
    b = bytearray(data)
    b[at + 3:at + 3 + size] = struct.pack(">d" if size == 8 else ">f", seconds * 1000.0)
    return bytes(b)


def with_box_size(data: bytes, kind: bytes = b"mdat", size: int = 0xFFFFFFF0) -> bytes:
    """A box whose size field claims ~4 GB (the media data's, by default: the index after it is lost)."""
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


def hostile(kind: str) -> tuple[bytes, dict]:
    """One of the hostile videos, and the VideoLimits fields its refusal needs (besides the defaults)."""
    base = clip([5, 6], seconds_each=2.0)
    if kind == "frame":
        return with_frame_size(30000, 30000), {}
    if kind == "hours":
        return with_duration(clip([5], seconds_each=1.0, fmt="webm", codec="libvpx-vp9"), 10 * 3600), {}
    if kind == "million":
        return with_duration(clip([5], seconds_each=0.05, fps=1000, fmt="webm", codec="libvpx-vp9"), 1200), {}
    if kind == "counted":  # states 1 s at 10 frames a second, holds 40 frames
        return with_duration(clip([5, 6], seconds_each=2.0, fmt="webm", codec="libvpx-vp9"), 1.0), {"max_frames": 20}
    if kind == "truncated":
        return base[: len(base) * 6 // 10], {}
    if kind == "damaged":
        return damaged(base, 0.5, 6000), {}
    if kind == "png":
        return encode(drawn_image(2), "PNG"), {}
    if kind == "box":
        return with_box_size(base), {}
    raise ValueError(kind)
