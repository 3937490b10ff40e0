"""Query views: borders trimmed, the picture inside a screenshot-like frame, the mirror — found on
real decoded images, searched beside the whole image, and named in the hits."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from indexer.media.decode import InputSpec, decode
from indexer.media.views import view_boxes
from tests.helpers import drawn_image, encode

SPEC = InputSpec(size=224, crop_pct=1.0)


def letterboxed(im: Image.Image, colour: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    w, h = im.size
    canvas = Image.new("RGB", (w, h + 2 * h // 3), colour)
    canvas.paste(im, (0, h // 3))
    return canvas


def screenshot(im: Image.Image) -> Image.Image:
    w, h = im.size
    canvas = Image.new("RGB", (w + 300, h + 200), (250, 250, 250))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, w + 300, 40), fill=(40, 60, 150))
    for i in range(6):
        d.text((10, 60 + 30 * i), f"@someone{i} 3m ago", fill=(20, 20, 20))
    canvas.paste(im, (240, 70))
    d.text((240, h + 90), "look at this #repost", fill=(20, 20, 20))
    return canvas


def test_letterbox_is_trimmed_to_the_picture():
    im = drawn_image(3, (320, 240))
    boxes = view_boxes(np.asarray(letterboxed(im)))
    left, top, right, bottom = boxes["trimmed"]
    assert abs(top - 80) <= 4 and abs(bottom - 320) <= 4 and left <= 4 and right >= 316


def test_screenshot_frame_gives_the_content_box():
    im = drawn_image(5, (320, 240))
    left, top, right, bottom = view_boxes(np.asarray(screenshot(im)))["content"]
    # the picture sits at (240, 70)–(560, 310); the box is found on 8-px blocks of a small copy
    assert abs(left - 240) <= 16 and abs(top - 70) <= 16 and abs(right - 560) <= 16 and abs(bottom - 310) <= 16


def test_a_plain_picture_has_no_extra_view():
    assert view_boxes(np.asarray(drawn_image(9, (400, 300)))) == {}


def test_decode_cuts_the_views_asked_for():
    data = encode(letterboxed(drawn_image(4)), "PNG")
    img = decode(data, SPEC, thumb_size=0, views=("trimmed", "content", "mirror"))
    assert "trimmed" in img.views and "mirror" in img.views
    assert img.views["trimmed"].shape == img.pixels.shape == (224, 224, 3)
    assert np.array_equal(img.views["mirror"], img.pixels[:, ::-1])
    # the trimmed view is the picture: close to decoding the picture alone
    alone = decode(encode(drawn_image(4), "PNG"), SPEC, thumb_size=0).pixels.astype(np.float32)
    assert np.abs(img.views["trimmed"].astype(np.float32) - alone).mean() < 6
    assert np.abs(img.pixels.astype(np.float32) - alone).mean() > 20
    assert decode(data, SPEC, thumb_size=0).views == {}


def test_search_names_the_view_that_matched(store, tiny_embedder, tmp_path, settings):
    from flagmatch.wiring import ingest_into, open_index, search_service
    from indexer.storage.catalog import FlagRequest
    from indexer.ingest.sources import iter_sources
    from search.service import SearchParams

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.png").write_bytes(encode(drawn_image(100 + i), "PNG"))
    ingest_into(settings, iter_sources([str(folder)]), store=store, embedder=tiny_embedder)
    store.catalog.set_flag(store.catalog.image_ids(), FlagRequest("import", None, "test"), flag=True)
    svc = search_service(settings, store, open_index(store, settings), tiny_embedder)
    target = store.catalog.resolve(__import__("hashlib").sha256((folder / "3.png").read_bytes()).hexdigest())
    query = encode(letterboxed(drawn_image(103)), "PNG")
    hit = svc.search_uploads([("q.png", query)], SearchParams(k=3)).results[0].hits[0]
    assert hit.record.id == target and hit.view == "trimmed" and hit.similarity > 0.98
    whole_only = search_service(settings.replace(query_views=()), store, svc.index, tiny_embedder)
    plain = whole_only.search_uploads([("q.png", query)], SearchParams(k=12)).results[0].hits
    assert all(h.view == "full" for h in plain)
    assert max(h.similarity for h in plain if h.record.id == target) < hit.similarity
