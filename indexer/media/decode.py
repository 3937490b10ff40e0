"""Safe image decoding: format allow-list from the bytes, a memory budget computed from the header
before any pixel is decoded, a deadline, EXIF orientation, every mode flattened to RGB, the first frame
of animations, JPEG DCT-scaled decoding when the file is far larger than what we need. Every failure is
one ``DecodeError``.

Memory is bounded by construction, whatever the geometry: the decoded buffer is checked against the
budget before it exists (after JPEG ``draft``, which is what libjpeg really allocates), every later
intermediate is a crop or a reduction of it, and the model input — the model's own transform: the short side
resized to size ÷ crop_pct, the centre cut — is resampled from the centre box alone wherever the resized
whole would be large, so a 1 × 20,000 strip costs a 1 × 1 box, not a 384 × 7,680,000 intermediate.
Resampling runs on ``indexer.media.resample`` (Pillow's filters; vectorised where torch is loaded).

PNG and WebP far larger than the outputs need are decoded by libvips instead, shrunk as they are read, so a
230-Mpx PNG costs its shrunk copy and a window of rows, not 920 MB (see ``_streamed``)."""
from __future__ import annotations

import io
import math
import os
import threading
import struct
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from indexer.errors import DecodeError
from indexer.media.hashes import Pdq, pdq_of
from indexer.media.resample import PIL_FILTERS, resize, vectorised
from indexer.media.views import view_boxes

# Formats we accept, told apart by their magic bytes (never by file name).
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, always the same
# Thumbnail encoder settings, chosen by measured cost on make-corpus (400 images, 256 px thumbnails): libwebp's
# method 0 at quality 75 encodes in 0.81 ms against 1.39 ms for method 2 at quality 80, and the files are
# about as large (4.2 KiB against 4.0 KiB) — method 2's slower search buys nothing a reviewer can see at 256 px.
THUMB_QUALITY, THUMB_METHOD = 75, 0
# Where Pillow makes the thumbnail (a process without torch, see indexer.media.resample), it box-reduces by an integer
# factor until the last bicubic step shrinks at most 1.1×: 2.3 against 3.2 ms a thumbnail on make-corpus with
# Pillow's usual gap of 2, and at 256 px the two look alike.
THUMB_REDUCING_GAP = 1.1
# Below this many pixels the decoded (reduced) RGB image is copied once into an array that the model input,
# the thumbnail, PDQ and the views all read; above it (a strip no box reduction applies to) each takes only
# its own crop or reduction, so the peak stays within the plan's one working copy.
_SHARED_ARRAY_PIXELS = 4_000_000
# The model's input is cut from the whole region resized (its own evaluation transform) unless that
# intermediate would be more than this many times the input's pixels (a 16:1 strip): then from the centre box.
_MAX_MODEL_INTERMEDIATE = 16
PDQ_SIDE = 256  # PDQ's input is box-reduced while its long side stays >= 2 × this


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its pixels: resize the short side to size/crop_pct, centre-crop size×size."""

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost. ``max_pixels`` applies to what is really decoded (a JPEG's header may
    be 64× larger: libjpeg decodes it at 1/8 scale); ``max_bytes`` to the estimated peak of every buffer
    the decode allocates (see ``plan``); ``timeout_s`` to the CPU time the decoding thread spends (its own
    CPU, so a machine busy with other work does not turn a slow legitimate file into a refused one);
    ``wall_s`` to the wall-clock time, a generous ceiling for a decode starved of CPU altogether."""

    max_pixels: int = 100_000_000
    max_bytes: int = 1 << 30
    timeout_s: float = 15.0
    wall_s: float = 120.0
    max_frames: int = 100_000  # frames counted (an animation's frame count is reported, not decoded)
    max_stream_pixels: int = 500_000_000  # pixels a streamed decode (``_streamed``) may pass through: its time
    stream_from: int = 2  # libvips streams PNG/WebP shrunk by at least this factor (``_streamed``); 0: never


@dataclass(frozen=True)
class DecodePlan:
    """What decoding an image will cost, read from its header before any pixel is allocated."""

    format: str
    width: int            # as stored (before EXIF orientation)
    height: int
    decoded: tuple[int, int]  # the buffer the decoder fills (smaller than the header after JPEG draft)
    mode: str
    bytes: int            # estimated peak of the decode, all intermediates included
    streamed: int = 0     # > 1: libvips streams the file, box-shrinking by this factor on the way (see ``_streamed``)


@dataclass(frozen=True)
class DecodedImage:
    format: str
    width: int          # after EXIF orientation
    height: int
    frames: int
    pixels: np.ndarray  # uint8 [size, size, 3] RGB, ready for the model's normalisation
    thumbnail: bytes    # WebP
    decoded_size: tuple[int, int] = (0, 0)  # what was really decoded (smaller when JPEG draft applied)
    views: dict[str, np.ndarray] = field(default_factory=dict)  # extra query views' model pixels, by name
    pdq: Pdq | None = None  # the PDQ hash of the stored pixels (see indexer.media.hashes)
    grey: np.ndarray | None = None  # uint8 greyscale copy at the thumbnail's geometry (``grey_side``; indexer.media.local)
    view_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # each view's box, displayed
    view_greys: dict[str, np.ndarray] = field(default_factory=dict)  # with ``view_greys``: each boxed view's grey copy


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's first bytes, or None when it is not one we accept."""
    for magic, offset, fmt in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


# Bytes per pixel of Pillow's own buffers (RGB is stored 4 bytes a pixel).
_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
DEFAULT_LIMITS = DecodeLimits()


class _Deadline(io.BytesIO):
    """The file the decoder reads from: Pillow feeds its decoders in blocks of at most 64 kB, in the
    calling thread, so checking this thread's CPU clock (and the wall clock) at each read bounds what one
    image can take without a thread or a signal."""

    def __init__(self, data: bytes, limits: DecodeLimits) -> None:
        super().__init__(data)
        self.limits = limits
        self.cpu_deadline = time.thread_time() + limits.timeout_s
        self.wall_deadline = time.monotonic() + limits.wall_s

    def check(self) -> None:
        if time.thread_time() > self.cpu_deadline:
            raise DecodeError(f"decoding used more than {self.limits.timeout_s:g} s of CPU", code="timeout")
        if time.monotonic() > self.wall_deadline:
            raise DecodeError(f"decoding took longer than {self.limits.wall_s:g} s", code="timeout")

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read(size)


def needed_side(spec: InputSpec, thumb_size: int) -> int:
    """The short side the model (and the thumbnail) need from the source."""
    return max(int(round(spec.size / spec.crop_pct)), thumb_size)


def plan(data: bytes, spec: InputSpec, limits: DecodeLimits = DEFAULT_LIMITS, *, thumb_size: int = 0) -> DecodePlan:
    """Read the header only and say what decoding will cost, or raise DecodeError (``too_large`` when over
    ``limits``). The server reserves ``plan(...).bytes`` before it decodes an upload."""
    with _opened(data, limits) as (im, fmt, _fp, _data):
        return _plan(im, fmt, limits, needed_side(spec, thumb_size))


def decode(data: bytes, spec: InputSpec, limits: DecodeLimits = DEFAULT_LIMITS, *,
           thumb_size: int = 256, views: Sequence[str] = (), pdq: bool = True, grey_side: int = 0,
           view_greys: bool = False) -> DecodedImage:
    """Decode ``data`` into model input pixels and a thumbnail, or raise DecodeError. ``views``: extra
    query views to cut (``trimmed``, ``content``, ``mirror``; see ``indexer.media.views``) where they apply;
    ``grey_side``: also a greyscale copy made as a thumbnail of that long side is (for local features)."""
    with _opened(data, limits) as (im, fmt, fp, data):
        p = _plan(im, fmt, limits, needed_side(spec, max(thumb_size, grey_side)))
        return _decode_planned(im, p, data, fp, spec, limits, thumb_size, tuple(views), pdq, grey_side, view_greys)


@contextmanager
def _opened(data: bytes, limits: DecodeLimits) -> Iterator[tuple[Image.Image, str, _Deadline, bytes]]:
    """Sniff, drop unread PNG metadata, open under the deadline; every failure inside is a DecodeError."""
    fmt = _sniff_or_raise(data)
    if fmt == "PNG":
        data = strip_png_metadata(data)
    with _translated(fmt):
        fp = _Deadline(data, limits)
        im = _open(fp, fmt)
        try:
            yield im, fmt, fp, data
        finally:
            im.close()


_PNG_DROP = (b"tEXt", b"zTXt", b"iTXt", b"iCCP")


def strip_png_metadata(data: bytes) -> bytes:
    """The PNG without its text and ICC chunks, which we never use: Pillow inflates them while reading the
    header and refuses the whole file when one is a zlib bomb — which would let anyone dodge matching by
    adding one. A file that is not a chunk stream is returned as it is (the decoder then says why)."""
    pos, end, keep, dropped = 8, len(data), [data[:8]], False
    while pos + 12 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        nxt = pos + 12 + length
        if nxt > end:
            break
        if kind in _PNG_DROP:
            dropped = True
        else:
            keep.append(data[pos:nxt])
        pos = nxt
        if kind == b"IEND":
            break
    if not dropped:
        return data
    keep.append(data[pos:])
    return b"".join(keep)


def _sniff_or_raise(data: bytes) -> str:
    if not data:
        raise DecodeError("empty file", code="empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not an image format we accept (JPEG, PNG, GIF, WebP, BMP, TIFF)",
                          code="unsupported_format")
    return fmt


def _open(fp: _Deadline, fmt: str) -> Image.Image:
    """Open with the plugin of the sniffed format. Pillow's global bomb check (``Image.open``) is not
    used: our per-call budget (``_plan``) replaces it, and it counts what is really decoded, so a 250 Mpx
    JPEG decoded at 1/8 scale is accepted and a 1 × 20,000 strip is cheap."""
    Image.init()
    factory, accept = Image.OPEN[fmt]
    head = fp.getvalue()[:16]
    if accept is not None and not accept(head):
        raise DecodeError(f"cannot read the {fmt} header", code="corrupt")
    try:
        return factory(fp, "")
    except UnidentifiedImageError:
        raise DecodeError(f"cannot read the {fmt} header", code="corrupt") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError(f"cannot read the {fmt} header: {exc}", code="corrupt") from None


@contextmanager
def _translated(fmt: str) -> Iterator[None]:
    """Every failure inside Pillow becomes one coded DecodeError."""
    with warnings.catch_warnings():
        # Pillow's own bomb check would warn (or raise) on its global limit; ours is per call.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"image too large: {exc}", code="too_large") from None
        except OSError as exc:
            msg = str(exc)
            code = "truncated" if "truncated" in msg or "broken data stream" in msg else "corrupt"
            raise DecodeError(f"cannot decode {fmt}: {msg}", code=code) from None
        except (ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, struct.error,
                ZeroDivisionError) as exc:
            raise DecodeError(f"cannot decode {fmt}: {exc}", code="corrupt") from None
        except MemoryError:
            raise DecodeError("not enough memory to decode this image", code="too_large") from None


def _plan(im: Image.Image, fmt: str, limits: DecodeLimits, need: int) -> DecodePlan:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise DecodeError("image has no pixels", code="corrupt")
    coefficients = 0
    if fmt == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale (DCT scaling), still at least `need` on the short side
        im.draft("RGB", (need, need))
        if im.info.get("progressive") or im.info.get("progression"):
            # progressive files keep every DCT coefficient of the full-size image: 2 bytes a sample
            layers = getattr(im, "layer", None) or [("", 1, 1, 0)] * len(im.getbands())
            hmax = max(int(lay[1]) for lay in layers) or 1
            vmax = max(int(lay[2]) for lay in layers) or 1
            coefficients = sum(2 * w * h * int(lay[1]) * int(lay[2]) // (hmax * vmax) for lay in layers)
    dw, dh = im.size
    factor = _stream_factor(im, fmt, need, limits.stream_from)
    if factor:
        return _streamed_plan(im, fmt, limits, factor)
    if dw * dh > limits.max_pixels:
        what = f"{w}×{h}" + (f" (decoded at {dw}×{dh})" if (dw, dh) != (w, h) else "")
        raise DecodeError(f"image is {what} = {dw * dh:,} decoded pixels, over the cap of {limits.max_pixels:,}",
                          code="too_large")
    # the decoded buffer, plus one 4-byte-a-pixel working copy (a mode conversion before reducing)
    est = dw * dh * (_BPP.get(im.mode, 4) + 4) + coefficients
    if est > limits.max_bytes:
        raise DecodeError(f"decoding this {w}×{h} {fmt} needs about {est / 2**20:,.0f} MiB, over the budget of "
                          f"{limits.max_bytes / 2**20:,.0f} MiB", code="too_large")
    return DecodePlan(format=fmt, width=w, height=h, decoded=(dw, dh), mode=im.mode, bytes=est)


# ------------------------------------------------------------------ libvips: streaming and shrink-on-load
# PNG and WebP with at least twice the pixels the outputs need along each side are decoded by libvips (``pyvips`` with the
# ``pyvips-binary`` wheel's own libvips), box-shrunk by an integer factor as they are read: PNG rows stream
# through the shrink (a window of rows in memory, never the whole image; interlaced PNGs cannot stream and stay
# with Pillow), WebP decodes at the reduced scale (libwebp's scaled decoding). What is held is the shrunk image,
# so the pixel cap applies to it, and ``max_stream_pixels`` bounds the work (time) of what streams through.
# JPEG stays with Pillow: libjpeg's DCT scaling is the shrink-on-load libvips would do, and libvips was no
# faster at it (``benchmarks/decode.py``); GIF, BMP and TIFF too (small in practice; TIFF's pages and modes).
_STREAMABLE = ("PNG", "WEBP")
_STREAM_ROWS = 64  # source rows the memory estimate allows for libvips' line buffers beside the shrink window


def _vips():  # type: ignore[no-untyped-def]
    """pyvips, configured for decoding (one thread per decode: ingest runs decodes in parallel; no cache)."""
    import logging
    import pyvips
    if not getattr(_vips, "ready", False):
        logging.getLogger("pyvips").setLevel(logging.ERROR)  # its warnings become our coded errors
        pyvips.cache_set_max(0)
        pyvips.concurrency_set(1)
        _vips.ready = True  # type: ignore[attr-defined]
    return pyvips


def _stream_factor(im: Image.Image, fmt: str, need: int, least: int) -> int:
    """The box-shrink factor libvips streams this file with, or 0 when Pillow decodes it."""
    if least <= 0 or fmt not in _STREAMABLE or (fmt == "PNG" and im.info.get("interlace")):
        return 0
    factor = min(im.size) // (2 * need)
    return factor if factor >= max(2, least) else 0


def _streamed_plan(im: Image.Image, fmt: str, limits: DecodeLimits, factor: int) -> DecodePlan:
    w, h = im.size
    if w * h > limits.max_stream_pixels:
        raise DecodeError(f"image is {w}×{h} = {w * h:,} pixels, over the cap of {limits.max_stream_pixels:,} a "
                          "streamed decode may read", code="too_large")
    dw, dh = -(-w // factor), -(-h // factor)  # partial boxes at the edges are kept, as Pillow's reduce keeps them
    if dw * dh > limits.max_pixels:
        raise DecodeError(f"image is {w}×{h}, {dw * dh:,} pixels once shrunk, over the cap of "
                          f"{limits.max_pixels:,}", code="too_large")
    # the shrunk image (libvips' copy, ours, one 4-byte working copy) and the rows in flight (16-bit, 4 bands)
    est = dw * dh * 12 + w * 8 * (factor + _STREAM_ROWS)
    if est > limits.max_bytes:
        raise DecodeError(f"decoding this {w}×{h} {fmt} needs about {est / 2**20:,.0f} MiB, over the budget of "
                          f"{limits.max_bytes / 2**20:,.0f} MiB", code="too_large")
    return DecodePlan(format=fmt, width=w, height=h, decoded=(dw, dh), mode=im.mode, bytes=est, streamed=factor)


def _streamed(data: bytes, p: DecodePlan, fp: _Deadline) -> tuple[Image.Image, int]:
    """Decode with libvips, box-shrunk by ``p.streamed``: a Pillow image (RGB(A) or L(A), 8-bit) and the EXIF
    orientation. The work runs on libvips' own worker thread, out of this thread's CPU clock: its budget is
    ``max_stream_pixels`` (the work is linear in it: 168 Mpx stream in 0.7 s of CPU here) and the wall-clock
    ceiling, checked as libvips reports progress. Every libvips failure is a coded DecodeError."""
    pyvips = _vips()
    factor = p.streamed
    try:
        if p.format == "WEBP":  # libwebp decodes at the reduced scale itself
            img = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="truncated",
                                               scale=1 / factor)
        else:  # fail_on: a truncated or damaged file is an error, never a picture padded with black
            img = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="truncated") \
                .shrink(factor, factor, ceil=True)
        orientation = int(img.get("orientation")) if img.get_typeof("orientation") else 1
        if img.format != "uchar":  # 16-bit samples: their high byte
            img = img.cast("uchar", shift=True) if img.format == "ushort" else img.colourspace("srgb")
        if img.bands not in (1, 2, 3, 4):
            raise DecodeError(f"cannot decode {p.format} of {img.bands} channels", code="corrupt")

        def progress(image, _progress) -> None:  # type: ignore[no-untyped-def]
            if time.monotonic() > fp.wall_deadline:
                image.set_kill(True)
        img.set_progress(True)
        img.signal_connect("eval", progress)
        buf = img.write_to_memory()
    except pyvips.Error as exc:
        if time.monotonic() > fp.wall_deadline:
            raise DecodeError(f"decoding took longer than {fp.limits.wall_s:g} s", code="timeout") from None
        msg = " ".join(str(exc.detail or exc.message).split())[:300]  # libvips' own words, not the wrapper's
        code = "truncated" if any(w in msg for w in ("truncated", "premature", "not enough data", "end of file",
                                                       "EOF")) else "corrupt"
        raise DecodeError(f"cannot decode {p.format}: {msg}", code=code) from None
    arr = np.frombuffer(buf, np.uint8).reshape(img.height, img.width, img.bands)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[img.bands]
    return (Image.fromarray(arr[:, :, 0] if img.bands == 1 else arr, mode),
            orientation if orientation in _TRANSPOSE else 1)


def _decode_planned(im: Image.Image, p: DecodePlan, data: bytes, fp: _Deadline, spec: InputSpec,
                    limits: DecodeLimits, thumb_size: int, views: tuple[str, ...] = (),
                    want_pdq: bool = True, grey_side: int = 0, want_view_greys: bool = False) -> DecodedImage:
    frames = _count_frames(im, p.format, data, fp, limits.max_frames)
    if frames > 1:
        im.seek(0)
    if p.streamed:  # (Pillow's PNG reads EXIF by decoding the whole image: libvips reads it from the stream)
        src, orientation = _streamed(data, p, fp)
    else:
        orientation = _orientation(im)
        im.load()
        fp.check()
        src = _shrink(im, needed_side(spec, max(thumb_size, grey_side)))
    # one RGB array for every later step (crops are views of it) — unless large (a strip no box reduction
    # applies to): then each step converts only its own crop or reduction, within the plan's one working copy
    rgb = None
    if src.width * src.height <= _SHARED_ARRAY_PIXELS:
        src = to_rgb(src)
        rgb = np.asarray(src)
    pixels, resampled = _model_pixels(src, rgb, spec)
    # PDQ reduces to 64 × 64 itself: a long side under 1,024 moves the hash by a few bits (indexer.media.hashes).
    # The model's resampled region, when 512 to 2,047 long, is an antialiased reduction closer to the full
    # picture than an integer box reduction: on make-corpus (timm's input, 123 of 200 images) the hashes were
    # 5.2 bits from threatexchange's full-resolution ones on average (p95 14) against 7.0 (p95 18), and no slower
    # (3.4–3.6 against 3.8–4.1 ms, PDQ's cost growing with the pixels it is given).
    if want_pdq:
        near = resampled is not None and 2 * PDQ_SIDE <= max(resampled.shape[:2]) < 8 * PDQ_SIDE
        pdq = pdq_of(resampled if near else _reduced(src, rgb, PDQ_SIDE))
    else:
        pdq = None
    extra: dict[str, np.ndarray] = {}
    boxes: dict[str, tuple[int, int, int, int]] = {}
    greys: dict[str, np.ndarray] = {}
    if {"trimmed", "content", "cells", "grid"} & set(views):
        whole = rgb if rgb is not None else np.asarray(to_rgb(src))
        for name, box in view_boxes(whole, cells="cells" in views, grid="grid" in views).items():
            if name in views or name.startswith(("cell", "inset", "grid")):  # those come only when asked for
                extra[name] = _model_pixels(src, whole, spec, box)[0]
                boxes[name] = _displayed_box(box, src.size, (p.width, p.height), orientation)
                # to verify a hit through this view on it (search.service): an inset's always, it is found
                # in the first pass
                if grey_side > 0 and (want_view_greys or name.startswith("inset")):
                    greys[name] = _grey(whole[box[1]:box[3], box[0]:box[2]], grey_side, orientation)
    small: dict[int, np.ndarray] = {}  # the thumbnail's geometry, by long side (the grey copy shares it)
    thumbnail = b""
    if thumb_size > 0:  # queries (thumb_size 0) need no thumbnail
        small[thumb_size] = _thumbnail(src, rgb, thumb_size, resampled)
        thumb = Image.fromarray(small[thumb_size])
        if orientation in _TRANSPOSE:
            thumb = thumb.transpose(_TRANSPOSE[orientation])
        buf = io.BytesIO()
        thumb.save(buf, "WEBP", quality=THUMB_QUALITY, method=THUMB_METHOD)
        thumbnail = buf.getvalue()
    grey = None
    if grey_side > 0:
        g = Image.fromarray(small[grey_side] if grey_side in small
                            else _thumbnail(src, rgb, grey_side, resampled)).convert("L")
        grey = np.asarray(g.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else g)
    if orientation in _TRANSPOSE:  # a centred square crop commutes with every EXIF orientation
        pixels = np.ascontiguousarray(np.asarray(Image.fromarray(pixels).transpose(_TRANSPOSE[orientation])))
        extra = {k: np.ascontiguousarray(np.asarray(Image.fromarray(v).transpose(_TRANSPOSE[orientation])))
                 for k, v in extra.items()}
    if "mirror" in views:  # after orientation: the mirror of what a person sees
        extra["mirror"] = np.ascontiguousarray(pixels[:, ::-1])
    width, height = (p.height, p.width) if orientation in (5, 6, 7, 8) else (p.width, p.height)
    return DecodedImage(format=p.format, width=width, height=height, frames=frames, pixels=pixels,
                        thumbnail=thumbnail, decoded_size=p.decoded, views=extra, pdq=pdq, grey=grey,
                        view_boxes=boxes, view_greys=greys)


def decode_frame(frame: Image.Image, spec: InputSpec, *, thumb_size: int = 0,
                 views: tuple[str, ...] = ()) -> DecodedImage:
    """A video frame already decoded (and shrunk) by ``indexer.media.video`` made ready as an image is: the model's
    pixels, a WebP thumbnail, and the query views that apply (a letterboxed clip's ``trimmed`` frame; with
    ``grid``, its quadrants and centre, where a picture-in-picture sits)."""
    src = to_rgb(frame)
    rgb = np.asarray(src)
    pixels, resampled = _model_pixels(src, rgb, spec)
    extra: dict[str, np.ndarray] = {}
    boxes: dict[str, tuple[int, int, int, int]] = {}
    if {"trimmed", "content", "grid"} & set(views):
        for name, box in view_boxes(rgb, cells=False, grid="grid" in views).items():
            if name in views or (name.startswith("grid") and "grid" in views):
                extra[name] = _model_pixels(src, rgb, spec, box)[0]
                boxes[name] = box
    thumbnail = b""
    if thumb_size > 0:
        buf = io.BytesIO()
        Image.fromarray(_thumbnail(src, rgb, thumb_size, resampled)).save(buf, "WEBP", quality=THUMB_QUALITY,
                                                                          method=THUMB_METHOD)
        thumbnail = buf.getvalue()
    return DecodedImage(format="frame", width=src.width, height=src.height, frames=1, pixels=pixels,
                        thumbnail=thumbnail, decoded_size=src.size, views=extra, view_boxes=boxes)


def _grey(rgb: np.ndarray, side: int, orientation: int) -> np.ndarray:
    """A greyscale copy of ``rgb`` with its long side ``side`` (or less), as displayed."""
    h, w = rgb.shape[:2]
    if max(w, h) > side:
        scale = side / max(w, h)
        rgb = resize(np.ascontiguousarray(rgb), (max(1, round(w * scale)), max(1, round(h * scale))), "bicubic",
                     reducing_gap=THUMB_REDUCING_GAP)
    g = Image.fromarray(np.ascontiguousarray(rgb)).convert("L")
    return np.asarray(g.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else g)


def _displayed_box(box: tuple[int, int, int, int], at: tuple[int, int], stored: tuple[int, int],
                   orientation: int) -> tuple[int, int, int, int]:
    """A box on the decoded image (``at``: its size) in the original's pixels as displayed (EXIF orientation)."""
    sx, sy = stored[0] / at[0], stored[1] / at[1]
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    w, h = stored
    corners = {1: lambda x, y: (x, y), 2: lambda x, y: (w - x, y), 3: lambda x, y: (w - x, h - y),
               4: lambda x, y: (x, h - y), 5: lambda x, y: (y, x), 6: lambda x, y: (h - y, x),
               7: lambda x, y: (h - y, w - x), 8: lambda x, y: (y, w - x)}[orientation]
    (ax, ay), (bx, by) = corners(x0, y0), corners(x1, y1)
    return (round(min(ax, bx)), round(min(ay, by)), round(max(ax, bx)), round(max(ay, by)))


def _count_frames(im: Image.Image, fmt: str, data: bytes, fp: _Deadline, cap: int) -> int:
    """How many frames, without decoding them (Pillow's GIF ``n_frames`` decodes every frame)."""
    if fmt == "GIF":
        return gif_frames(data, cap)
    if fmt == "TIFF":
        n = 1
        try:
            while n < cap:
                fp.check()
                im.seek(n)
                n += 1
        except EOFError:
            pass
        except (OSError, ValueError, struct.error, KeyError, TypeError):
            pass  # a broken later page does not make the first one unreadable
        im.seek(0)
        return n
    return min(int(getattr(im, "n_frames", 1) or 1), cap)


def gif_frames(data: bytes, cap: int) -> int:
    """Count a GIF's image descriptors by walking its block structure (header, colour tables, blocks)."""
    end = len(data)
    if end < 13:
        return 1
    flags = data[10]
    pos = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    n = 0
    while pos < end and n < cap:
        tag = data[pos]
        if tag == 0x2C:  # image descriptor: 9 bytes, optional local colour table, LZW code size
            if pos + 10 > end:
                break
            n += 1
            f = data[pos + 9]
            pos += 10 + ((3 << ((f & 7) + 1)) if f & 0x80 else 0) + 1
        elif tag == 0x21:  # extension: introducer, label
            pos += 2
        else:  # 0x3B trailer, or garbage after the last frame
            break
        while pos < end:  # data sub-blocks, ended by a zero-length one
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return max(n, 1)


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if value in _TRANSPOSE else 1
    except Exception:  # a broken EXIF block is not worth failing the image for
        return 1


def _shrink(im: Image.Image, need: int, *, long_side: bool = False) -> Image.Image:
    """Box-reduce by an integer factor while the short (or long) side stays >= 2·need: the expensive
    full-resolution work (mode conversion, compositing, resampling) then runs on far fewer pixels."""
    factor = (max(im.size) if long_side else min(im.size)) // (2 * need)
    if factor < 2:
        return im
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr"):
        return im
    try:
        return im.reduce(factor)
    except ValueError:  # a mode this Pillow cannot reduce: resample later at full size
        return im


def _reduced(src: Image.Image, rgb: np.ndarray | None, side: int) -> np.ndarray:
    """``src`` in RGB (``rgb``: its array, when made), box-reduced while its long side stays >= 2·side."""
    if rgb is not None and max(src.size) // (2 * side) < 2:
        return rgb
    return np.asarray(to_rgb(_shrink(src, side, long_side=True)))


def _thumbnail(src: Image.Image, rgb: np.ndarray | None, size: int,
               resampled: np.ndarray | None = None) -> np.ndarray:
    """RGB, its long side ``size`` (or less when the source is smaller): bicubic, antialiased
    (``indexer.media.resample``), from ``resampled`` (the model's input region, already reduced near the size) when
    it is still at least ``size`` long, else from the box-reduced source."""
    usable = resampled is not None and max(resampled.shape[:2]) >= size
    im = resampled if usable else _reduced(src, rgb, size)
    h, w = im.shape[:2]
    if max(w, h) <= size:
        return im
    scale = size / max(w, h)
    return resize(im, (max(1, round(w * scale)), max(1, round(h * scale))), "bicubic",
                  reducing_gap=THUMB_REDUCING_GAP)


def _model_pixels(src: Image.Image, rgb: np.ndarray | None, spec: InputSpec,
                  region: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``region`` of ``src`` (``rgb``: its RGB array, when made) as the model's own evaluation
    transform makes it (timm's ``Resize`` of the short side to size/crop_pct, then ``CenterCrop``). With
    torch's kernels (``indexer.media.resample``) the whole region is resampled and the centre cut out; that
    resampled region is also returned when it is a reduction (the thumbnail is made from it). Otherwise — and
    for a region so long that the whole would be a huge intermediate (a 1 × 20,000 strip: 384 × 7,680,000) —
    Pillow resamples only the crop, through the fractional box that gives the same pixels."""
    x0, y0, x1, y1 = region or (0, 0, src.width, src.height)
    w, h = x1 - x0, y1 - y0
    scale = spec.size / spec.crop_pct / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    if not vectorised() or nw * nh > _MAX_MODEL_INTERMEDIATE * spec.size * spec.size:
        sx, sy = w / nw, h / nh  # source pixels per resampled pixel, as the whole resize would have them
        box = (x0 + left * sx, y0 + top * sy, x0 + (left + spec.size) * sx, y0 + (top + spec.size) * sy)
        # the box and the filter's support around it, in RGB; then the box inside that
        margin = math.ceil(2 * max(sx, sy)) + 2
        l0, t0 = max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin)
        r0, b0 = min(src.width, math.ceil(box[2]) + margin), min(src.height, math.ceil(box[3]) + margin)
        part = to_rgb(src.crop((l0, t0, r0, b0)) if (l0, t0, r0, b0) != (0, 0, src.width, src.height) else src)
        inner = (box[0] - l0, box[1] - t0, box[2] - l0, box[3] - t0)
        out = part.resize((spec.size, spec.size), PIL_FILTERS[spec.interpolation], box=inner)
        return np.asarray(out, dtype=np.uint8), None
    whole = rgb[y0:y1, x0:x1] if rgb is not None else np.asarray(to_rgb(src.crop((x0, y0, x1, y1))))
    resized = resize(whole, (nw, nh), spec.interpolation)
    pixels = np.ascontiguousarray(resized[top:top + spec.size, left:left + spec.size])
    return pixels, (resized if nw < w and nh < h else None)


def to_rgb(im: Image.Image) -> Image.Image:
    """Flatten any Pillow mode to 8-bit RGB; transparency is composited on a fixed background."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        # pasting through the alpha channel onto an opaque background is compositing over it, in one pass
        # (the same pixels as ``alpha_composite`` and two conversions; 1.0 against 1.3 ms on make-corpus clipart)
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, BACKGROUND)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if mode == "RGB":
        return im
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def lower_priority(nice: int) -> None:
    """Lower the calling (decode) thread's scheduling priority. The model's parallel operators wait for their
    slowest thread, so a decode thread that preempts one of the model's threads stalls the whole operator;
    at a lower priority the scheduler runs decoding in the model's gaps instead. Measured on 2 cores
    (open_nsfw, make-corpus): 51–53 → 55–56 images/s end to end; the ViT's rate unchanged within noise."""
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError):  # not permitted or not Linux: run at the normal priority
            pass
