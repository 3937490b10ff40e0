from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from indexer.media.decode import BACKGROUND, DecodeLimits, InputSpec, decode, sniff_format
from indexer.errors import DecodeError
from tests.helpers import drawn_image, encode, photo_image

SPEC = InputSpec(size=64, crop_pct=1.0, interpolation="bicubic")
CAP = 50_000_000


def run(data: bytes, **kw):
    return decode(data, SPEC, DecodeLimits(max_pixels=kw.pop("max_pixels", CAP)), thumb_size=kw.pop("thumb_size", 48))


def test_jpeg_png_webp_bmp_tiff_decode_to_model_pixels():
    im = drawn_image(1, (200, 100))
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"):
        d = run(encode(im, fmt))
        assert d.format == fmt
        assert (d.width, d.height) == (200, 100)
        assert d.pixels.shape == (64, 64, 3) and d.pixels.dtype == np.uint8
        assert Image.open(__import__("io").BytesIO(d.thumbnail)).format == "WEBP"


def test_format_is_read_from_bytes_not_name(tmp_path):
    png = encode(drawn_image(2), "PNG")
    assert sniff_format(png) == "PNG"
    assert run(png).format == "PNG"  # whatever the file was called
    with pytest.raises(DecodeError) as e:
        run(b"<html><body>not an image</body></html>")
    assert e.value.code == "unsupported_format"
    # a format Pillow can read but we do not accept (ICO) is refused too
    with pytest.raises(DecodeError) as e:
        run(encode(drawn_image(3, (64, 64)), "ICO"))
    assert e.value.code == "unsupported_format"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (120, 60), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 60, 60))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    d = run(encode(im, "JPEG", exif=exif, quality=95))
    assert (d.width, d.height) == (60, 120)
    top = d.pixels[:8].reshape(-1, 3).mean(0)
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_transparency_is_composited_on_a_fixed_background():
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    d = run(encode(rgba, "PNG"))
    assert tuple(d.pixels[40, 40]) == BACKGROUND
    la = Image.new("LA", (80, 80), (0, 0))
    assert tuple(run(encode(la, "PNG")).pixels[5, 5]) == BACKGROUND
    p = Image.new("P", (80, 80), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.paste(1, (40, 0, 80, 80))
    d = run(encode(p, "PNG", transparency=0))
    assert tuple(d.pixels[32, 4]) == BACKGROUND
    assert d.pixels[32, 60, 1] > 150  # the opaque green half stays green


def test_cmyk_16bit_and_1bit_modes():
    cmyk = drawn_image(4).convert("CMYK")
    assert run(encode(cmyk, "JPEG")).pixels.mean() > 5
    i16 = Image.fromarray((np.linspace(0, 65535, 100 * 100).reshape(100, 100)).astype(np.uint16))
    assert i16.mode.startswith("I;16")
    px = run(encode(i16, "PNG")).pixels
    assert px.min() < 20 and px.max() > 230  # the full 16-bit range maps onto 0…255
    bw = Image.new("1", (100, 100), 0)
    bw.paste(1, (50, 0, 100, 100))
    px = run(encode(bw, "PNG")).pixels
    assert px[32, 5].tolist() == [0, 0, 0] and px[32, 60].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_take_the_first_frame_and_count_frames(fmt):
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    d = run(data)
    assert d.frames == 3
    assert d.pixels[32, 32, 0] > 200 and d.pixels[32, 32, 1] < 60


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    huge = Image.new("1", (12_000, 12_000), 0)  # 144 Mpx, a few kB as PNG
    data = encode(huge, "PNG")
    assert len(data) < 100_000
    for limits in (DecodeLimits(max_pixels=100_000_000, stream_from=0),  # Pillow would hold all of it
                   DecodeLimits(max_stream_pixels=100_000_000)):  # libvips would stream all of it through
        t = time.thread_time()
        with pytest.raises(DecodeError) as e:
            decode(data, SPEC, limits)
        assert e.value.code == "too_large" and time.thread_time() - t < 0.5  # from the header
    with pytest.raises(DecodeError) as e:
        run(encode(drawn_image(6, (400, 300)), "PNG"), max_pixels=10_000)  # held: 200 × 150 once shrunk
    assert e.value.code == "too_large"


# ------------------------------------------------------------------ libvips: streaming and shrink-on-load

BIG_SPEC = InputSpec(size=384, crop_pct=0.9)


def _both(data: bytes, **kw):  # type: ignore[no-untyped-def]
    """The same file decoded by libvips (streamed) and by Pillow (whole)."""
    return (decode(data, BIG_SPEC, DecodeLimits(**kw), thumb_size=256),
            decode(data, BIG_SPEC, DecodeLimits(stream_from=0, **kw), thumb_size=256))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float32).ravel() - 127.5, b.astype(np.float32).ravel() - 127.5
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_large_png_and_webp_stream_through_libvips_with_the_same_pixels_as_pillow(fmt):
    """A 3,600 × 2,700 PNG or WebP is shrunk as libvips reads it (PNG rows streamed, WebP decoded at the
    reduced scale): the plan says so and holds far less, the model input, thumbnail and PDQ agree with
    Pillow's whole-image path, and the EXIF orientation is applied the same way."""
    from indexer.media.decode import plan
    from indexer.media.hashes import pdq_distance
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo_image(21, (3600, 2700)), fmt, exif=exif, **({"quality": 92} if fmt == "WEBP" else {}))
    streamed = plan(data, BIG_SPEC, thumb_size=256)
    whole = plan(data, BIG_SPEC, DecodeLimits(stream_from=0), thumb_size=256)
    assert streamed.streamed == 3 and streamed.decoded == (1200, 900) and whole.streamed == 0
    assert streamed.bytes < whole.bytes / 3
    v, p = _both(data)
    assert (v.width, v.height) == (p.width, p.height) == (2700, 3600)  # rotated for display, both ways
    assert _cosine(v.pixels, p.pixels) > 0.995
    assert np.abs(v.pixels.astype(int) - p.pixels.astype(int)).mean() < 4
    assert v.pdq is not None and p.pdq is not None and pdq_distance(v.pdq.hash, p.pdq.hash) <= 16
    tv, tp = (Image.open(io.BytesIO(x.thumbnail)) for x in (v, p))
    assert tv.size == tp.size and tv.size[0] < tv.size[1]  # portrait, as displayed
    assert _cosine(np.asarray(tv.convert("RGB").resize((64, 64))), np.asarray(tp.convert("RGB").resize((64, 64)))) > 0.99


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "1"])
def test_every_png_mode_streams_like_pillow(mode):
    base = photo_image(22, (2000, 1800))
    if mode == "RGBA":
        im = base.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize(im.size))
    elif mode == "LA":
        im = base.convert("LA")
    elif mode == "P":
        im = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
    else:
        im = base.convert("1")
    v, p = _both(encode(im, "PNG"))
    assert v.decoded_size == (1000, 900) and _cosine(v.pixels, p.pixels) > 0.99, mode


def test_broken_streamed_files_are_coded_errors():
    data = encode(photo_image(23, (3000, 2400)), "PNG", compress_level=1)
    for cut in (data[: len(data) // 2], data[:200_000]):
        with pytest.raises(DecodeError) as e:
            decode(cut, BIG_SPEC)
        assert e.value.code in ("truncated", "corrupt"), e.value
    mid = bytearray(data)
    mid[len(mid) // 2: len(mid) // 2 + 5000] = bytes(5000)  # a corrupt run inside the compressed rows
    with pytest.raises(DecodeError) as e:
        decode(bytes(mid), BIG_SPEC)
    assert e.value.code in ("truncated", "corrupt")
    webp = encode(photo_image(24, (3000, 2400)), "WEBP", quality=80)
    with pytest.raises(DecodeError) as e:
        decode(webp[: len(webp) // 2], BIG_SPEC)
    assert e.value.code in ("truncated", "corrupt")
    with pytest.raises(DecodeError) as e:  # the wall-clock ceiling reaches into libvips
        decode(data, BIG_SPEC, DecodeLimits(wall_s=0.0))
    assert e.value.code == "timeout"


def test_a_230_megapixel_png_decodes_within_a_gibibyte(tmp_path):
    """16,000 × 14,400 RGBA (what real clipart exports reach): refused whole by Pillow's path at the
    100-Mpx cap; streamed, the child process that decodes it peaks under 1 GiB."""
    import pyvips
    path = tmp_path / "huge.png"
    xy = pyvips.Image.xyz(16_000, 14_400)  # gradients and blocks, as clipart is: ~10 MB as PNG
    x, y = xy[0], xy[1]
    ((x / 64) % 256).bandjoin([(y / 64) % 256, ((x / 1000).floor() + (y / 1000).floor()) % 2 * 255,
                               255 - (x / 250) % 64]).cast("uchar").copy(interpretation="srgb").pngsave(str(path))
    with pytest.raises(DecodeError) as e:
        decode(path.read_bytes(), BIG_SPEC, DecodeLimits(stream_from=0))
    assert e.value.code == "too_large"
    code = (
        "import json, sys\n"
        "from indexer.media.decode import InputSpec, decode\n"
        "from tests.helpers import own_peak_rss_kib\n"
        f"d = decode(open({str(path)!r}, 'rb').read(), InputSpec(384, 0.9))\n"
        "print(json.dumps({'size': [d.width, d.height], 'shape': list(d.pixels.shape), 'thumb': len(d.thumbnail),"
        " 'pdq': d.pdq.quality, 'rss': own_peak_rss_kib() * 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["size"] == [16_000, 14_400] and r["shape"] == [384, 384, 3] and r["thumb"] > 0 and r["pdq"] >= 0
    assert r["rss"] < 1 << 30, r["rss"] / 2**20


def test_large_jpeg_is_decoded_at_reduced_size():
    big = drawn_image(7, (2400, 1600))
    d = run(encode(big, "JPEG", quality=85))
    assert (d.width, d.height) == (2400, 1600)  # the image's real size is recorded
    assert d.decoded_size[0] <= 600  # …but only an eighth-to-quarter scale was decoded


def test_truncated_corrupt_and_empty_files_are_one_clear_error():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = encode(drawn_image(8), "JPEG")
    with pytest.raises(DecodeError) as e:
        run(good[: len(good) // 2])
    assert e.value.code == "truncated"
    png = encode(drawn_image(9), "PNG")
    with pytest.raises(DecodeError) as e:
        run(png[: len(png) // 2])
    assert e.value.code in ("truncated", "corrupt")
    with pytest.raises(DecodeError) as e:
        run(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert e.value.code == "corrupt"
    with pytest.raises(DecodeError) as e:
        run(b"")
    assert e.value.code == "empty"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
