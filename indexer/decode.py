"""Safe image decoding: format allow-list from the bytes, pixel cap from the header before any pixel
is decoded, EXIF orientation, every mode flattened to RGB, first frame of animations, JPEG draft
decoding when the file is far larger than what we need. Every failure is one ``DecodeError``."""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.errors import DecodeError

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
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its pixels: resize the short side to size/crop_pct, centre-crop size×size."""

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class DecodedImage:
    format: str
    width: int          # after EXIF orientation
    height: int
    frames: int
    pixels: np.ndarray  # uint8 [size, size, 3] RGB, ready for the model's normalisation
    thumbnail: bytes    # WebP
    decoded_size: tuple[int, int] = (0, 0)  # what was really decoded (smaller when JPEG draft applied)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's first bytes, or None when it is not one we accept."""
    for magic, offset, fmt in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(data: bytes, spec: InputSpec, *, max_pixels: int, thumb_size: int = 256) -> DecodedImage:
    """Decode ``data`` into model input pixels and a thumbnail, or raise DecodeError."""
    if not data:
        raise DecodeError("empty file", code="empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not an image format we accept (JPEG, PNG, GIF, WebP, BMP, TIFF)",
                          code="unsupported_format")
    with warnings.catch_warnings():
        # Pillow's own bomb check would warn (or raise) on its global limit; ours is per call.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"image too large: {exc}", code="too_large") from None
        except UnidentifiedImageError:
            raise DecodeError(f"cannot read the {fmt} header", code="corrupt") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise DecodeError(f"cannot read the {fmt} header: {exc}", code="corrupt") from None
        try:
            return _decode_opened(im, fmt, spec, max_pixels, thumb_size)
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"image too large: {exc}", code="too_large") from None
        except OSError as exc:
            msg = str(exc)
            code = "truncated" if "truncated" in msg or "broken data stream" in msg else "corrupt"
            raise DecodeError(f"cannot decode {fmt}: {msg}", code=code) from None
        except (ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
            raise DecodeError(f"cannot decode {fmt}: {exc}", code="corrupt") from None
        except MemoryError:
            raise DecodeError("not enough memory to decode this image", code="too_large") from None
        finally:
            im.close()


def _decode_opened(im: Image.Image, fmt: str, spec: InputSpec, max_pixels: int,
                   thumb_size: int) -> DecodedImage:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise DecodeError("image has no pixels", code="corrupt")
    if w * h > max_pixels:
        raise DecodeError(f"image is {w}×{h} = {w * h:,} pixels, over the cap of {max_pixels:,}",
                          code="too_large")
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        im.seek(0)
    need = max(int(round(spec.size / spec.crop_pct)), thumb_size)  # short side the model/thumbnail need
    if fmt == "JPEG":
        # decode at 1/2, 1/4 or 1/8 scale (DCT scaling): still at least `need` on the short side
        im.draft("RGB", (need, need))
    im.load()
    decoded_size = im.size
    exif_size = _oriented_size(im, w, h)
    im = ImageOps.exif_transpose(_shrink(im, need))
    resized = _resize_short_side(to_rgb(im), spec)
    pixels = _center_crop(resized, spec.size)
    thumbnail = b""
    if thumb_size > 0:  # queries (thumb_size 0) need no thumbnail
        thumb = resized.copy()
        thumb.thumbnail((thumb_size, thumb_size), Image.BICUBIC, reducing_gap=2.0)
        buf = io.BytesIO()
        thumb.save(buf, "WEBP", quality=80, method=2)
        thumbnail = buf.getvalue()
    return DecodedImage(format=fmt, width=exif_size[0], height=exif_size[1], frames=frames,
                        pixels=pixels, thumbnail=thumbnail, decoded_size=decoded_size)


def _shrink(im: Image.Image, need: int) -> Image.Image:
    """Box-reduce by an integer factor while the short side stays >= 2·need: the expensive
    full-resolution work (mode conversion, compositing, resampling) then runs on far fewer pixels."""
    factor = min(im.size) // (2 * need)
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


def _oriented_size(im: Image.Image, w: int, h: int) -> tuple[int, int]:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth failing the image for
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_rgb(im: Image.Image) -> Image.Image:
    """Flatten any Pillow mode to 8-bit RGB; transparency is composited on a fixed background."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        bg.alpha_composite(rgba)
        return bg.convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def _resize_short_side(rgb: Image.Image, spec: InputSpec) -> Image.Image:
    w, h = rgb.size
    r = (spec.size / spec.crop_pct) / min(w, h)
    nw, nh = max(spec.size, int(round(w * r))), max(spec.size, int(round(h * r)))
    if (nw, nh) == (w, h):
        return rgb
    return rgb.resize((nw, nh), _RESAMPLE[spec.interpolation], reducing_gap=3.0)


def _center_crop(resized: Image.Image, size: int) -> np.ndarray:
    nw, nh = resized.size
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
