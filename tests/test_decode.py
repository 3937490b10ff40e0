from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from indexer.media.decode import BACKGROUND, DecodeLimits, InputSpec, decode, sniff_format
from indexer.errors import DecodeError
from tests.helpers import drawn_image, encode

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
    with pytest.raises(DecodeError) as e:
        run(data, max_pixels=100_000_000)
    assert e.value.code == "too_large"
    with pytest.raises(DecodeError) as e:
        run(encode(drawn_image(6, (400, 300)), "PNG"), max_pixels=100_000)
    assert e.value.code == "too_large"


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
