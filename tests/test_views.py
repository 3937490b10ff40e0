"""Query views: borders trimmed, the picture inside a screenshot-like frame, the mirror — found on
real decoded images, searched beside the whole image, and named in the hits."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from indexer.media.decode import InputSpec, decode
from indexer.media.views import view_boxes
from tests.helpers import drawn_image, encode, ingest_flagged

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
    from flagmatch.wiring import open_index, search_service
    from search.service import SearchParams

    ids = ingest_flagged(settings, store, tiny_embedder, tmp_path / "in", {str(i): drawn_image(100 + i) for i in range(12)})
    svc = search_service(settings, store, open_index(store, settings), tiny_embedder)
    target = ids["3"]
    query = encode(letterboxed(drawn_image(103)), "PNG")
    hit = svc.search_uploads([("q.png", query)], SearchParams(k=3)).results[0].hits[0]
    assert hit.record.id == target and hit.view == "trimmed" and hit.similarity > 0.98
    whole_only = search_service(settings.replace(query_views=()), store, svc.index, tiny_embedder)
    plain = whole_only.search_uploads([("q.png", query)], SearchParams(k=12)).results[0].hits
    assert all(h.view == "full" for h in plain)
    assert max(h.similarity for h in plain if h.record.id == target) < hit.similarity


# ------------------------------------------------------------------ pictures inside pictures

def collage(pictures: list[Image.Image], cols: int, gutter: int, colour=(255, 255, 255), side: int = 300) -> Image.Image:
    """The pictures in a grid of ``cols`` columns, each resized to side × side·3/4, ``gutter`` px apart."""
    rows = -(-len(pictures) // cols)
    cw, ch = side, side * 3 // 4
    canvas = Image.new("RGB", (cols * cw + (cols + 1) * gutter, rows * ch + (rows + 1) * gutter), colour)
    for n, im in enumerate(pictures):
        r, c = divmod(n, cols)
        canvas.paste(im.convert("RGB").resize((cw, ch)), (gutter + c * (cw + gutter), gutter + r * (ch + gutter)))
    return canvas


def _iou(a, b) -> float:  # type: ignore[no-untyped-def]
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


def test_a_collage_splits_into_its_cells_along_gutters_and_edges():
    from tests.helpers import photo_image
    pics = [photo_image(40 + i, (400, 300)) for i in range(4)]
    grid = np.asarray(collage(pics, 2, 12))  # 2 × 2 with white gutters: cells at 12 + k·312, 12 + k·237
    cells = {k: v for k, v in view_boxes(grid, cells=True).items() if k.startswith("cell")}
    assert len(cells) == 4
    want = [(12 + c * 312, 12 + r * 237, 312 + c * 312, 237 + r * 237) for r in range(2) for c in range(2)]
    assert all(max(_iou(w, got) for got in cells.values()) > 0.85 for w in want), cells
    strip = np.asarray(collage(pics[:3], 3, 8, colour=(0, 0, 0)))  # a row of three, black gutters
    cells = [v for k, v in view_boxes(strip, cells=True).items() if k.startswith("cell")]
    assert len(cells) == 3 and all(max(_iou((8 + c * 308, 8, 308 + c * 308, 233), got) for got in cells) > 0.85
                                   for c in range(3))
    # pictures butted together have no gutter: not cells, nor insets (the grid covers them, see below)
    assert not any(k.startswith(("cell", "inset")) for k in view_boxes(np.asarray(collage(pics[:3], 3, 0)),
                                                                       cells=True))


def test_single_pictures_are_not_cut_into_cells():
    from tests.helpers import photo_image
    for im in [photo_image(s, (640, 480)) for s in range(10)] + [drawn_image(s, (400, 300)) for s in range(40)] \
            + [letterboxed(drawn_image(7))]:
        assert not any(k.startswith(("cell", "inset")) for k in view_boxes(np.asarray(im), cells=True))



def _inset(background: Image.Image, picture: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    canvas = background.copy()
    canvas.paste(picture.resize((box[2] - box[0], box[3] - box[1])), box[:2])
    return Image.open(io.BytesIO(encode(canvas, "JPEG", quality=80))).convert("RGB")


def test_a_picture_pasted_over_another_is_a_view_of_its_own():
    """No gutter around it, only its four straight sides: the inset is found wherever it sits (not on the
    grid's quadrants), at the size it was pasted; one flat-filled shape or a plain photo is not an inset."""
    from indexer.media.views import inset_boxes
    from tests.helpers import photo_image
    for k, box in enumerate([(60, 480, 540, 840), (700, 90, 1150, 430), (380, 260, 860, 620)]):
        query = _inset(photo_image(200 + k, (1200, 900)), photo_image(300 + k, (640, 480)), box)
        views = view_boxes(np.asarray(query), cells=True)
        assert "inset1" in views and _iou(views["inset1"], box) > 0.9, (box, views)
        assert not any(name.startswith("cell") for name in views)  # no gutters: no cells
    flat = photo_image(210, (1200, 900))
    ImageDraw.Draw(flat).rectangle((300, 200, 800, 600), fill=(30, 60, 200))  # a drawn rectangle: flat inside
    assert not any(name.startswith(("cell", "inset")) for name in view_boxes(np.asarray(flat), cells=True))
    assert inset_boxes(np.zeros((20, 300), np.float32)) == []  # too thin to hold one


def _flagged_photos(store, tiny_embedder, settings, folder, seeds: range) -> list:  # type: ignore[no-untyped-def]
    """``photo_image(seed)`` for each seed ingested from ``folder`` and flagged; their catalog ids, in order."""
    from tests.helpers import photo_image
    ids = ingest_flagged(settings, store, tiny_embedder, folder,
                         {str(i): photo_image(seed, (400, 300)) for i, seed in enumerate(seeds)})
    return [ids[str(i)] for i in range(len(seeds))]


def test_search_finds_the_picture_in_a_collage_and_says_where(store, tiny_embedder, tmp_path, settings):
    from flagmatch.wiring import open_index, search_service
    from search.service import SearchParams
    from tests.helpers import photo_image
    target = _flagged_photos(store, tiny_embedder, settings, tmp_path / "in", range(60, 72))[5]
    svc = search_service(settings, store, open_index(store, settings), tiny_embedder)
    others = [photo_image(90 + i, (400, 300)) for i in range(3)]  # never stored
    query = encode(collage(others + [photo_image(65, (400, 300))], 2, 10), "JPEG", quality=90)
    hit = svc.search_uploads([("q.jpg", query)], SearchParams(k=3)).results[0].hits[0]
    assert hit.record.id == target and hit.view.startswith("cell") and hit.box is not None
    assert _iou(hit.box, (320, 245, 620, 470)) > 0.85, hit.box  # the bottom-right cell, in the upload's pixels
    whole_only = search_service(settings.replace(query_views=(), query_grid_below=-1.0), store, svc.index,
                                tiny_embedder)
    plain = whole_only.search_uploads([("q.jpg", query)], SearchParams(k=12)).results[0].hits
    assert max((h.similarity for h in plain if h.record.id == target), default=-1) < hit.similarity



def test_search_finds_a_picture_pasted_over_another_through_its_inset(store, tiny_embedder, tmp_path, settings):
    from flagmatch.wiring import open_index, search_service
    from search.service import SearchParams
    from tests.helpers import photo_image
    target = _flagged_photos(store, tiny_embedder, settings, tmp_path / "in", range(80, 90))[3]
    box = (650, 300, 1130, 660)  # off every quadrant and the centre half: no grid part holds it
    query = encode(_inset(photo_image(95, (1200, 900)), photo_image(83, (400, 300)), box), "JPEG", quality=90)
    svc = search_service(settings.replace(query_grid_below=-1.0), store, open_index(store, settings), tiny_embedder)
    hit = svc.search_uploads([("q.jpg", query)], SearchParams(k=3)).results[0].hits[0]
    assert hit.record.id == target and hit.view == "inset1" and _iou(hit.box, box) > 0.9, (hit.view, hit.box)
    # verified on the inset's own pixels, where the picture fills the frame as it fills the stored thumbnail:
    # more agreeing matches than the whole upload gives
    from indexer.media.local import MIN_MATCHES, QueryFeatures, describe, thumbnail_grey
    whole = decode(query, SPEC, thumb_size=0, grey_side=256).grey
    stored = describe(thumbnail_grey(store.thumbs_dir)(store.catalog.get_many([target])[target].thumb_key))
    assert hit.verified and hit.local_matches >= MIN_MATCHES
    assert hit.local_matches > QueryFeatures(whole).matches(stored), hit.local_matches
    whole_only = search_service(settings.replace(query_views=(), query_grid_below=-1.0), store, svc.index,
                                tiny_embedder)
    plain = whole_only.search_uploads([("q.jpg", query)], SearchParams(k=12)).results[0].hits
    assert max((h.similarity for h in plain if h.record.id == target), default=-1) < hit.similarity


def test_the_grid_searches_a_picture_inside_a_picture_only_when_nothing_was_confident(
        store, tiny_embedder, tmp_path, settings):
    """Picture-in-picture over a textured background has no seam to cut along: the quadrants find it, and
    only for an upload whose own views found nothing above ``query_grid_below``."""
    from flagmatch.wiring import open_index, search_service
    from search.service import SearchParams
    from tests.helpers import photo_image
    folder = tmp_path / "in"
    target = _flagged_photos(store, tiny_embedder, settings, folder, range(70, 78))[2]
    canvas = photo_image(99, (800, 600))
    canvas.paste(photo_image(72, (400, 300)), (400, 300))  # the bottom-right quadrant
    query = encode(canvas, "JPEG", quality=92)
    index = open_index(store, settings)
    on = search_service(settings.replace(query_grid_below=0.999), store, index, tiny_embedder)
    hit = on.search_uploads([("q.jpg", query)], SearchParams(k=3)).results[0].hits[0]
    assert hit.record.id == target and hit.view == "grid4" and _iou(hit.box, (400, 300, 800, 600)) > 0.95
    off = search_service(settings.replace(query_grid_below=-1.0), store, index, tiny_embedder)
    hits = off.search_uploads([("q.jpg", query)], SearchParams(k=8)).results[0].hits
    assert not any(h.view.startswith("grid") for h in hits)
    # an exact copy is confident: no second pass
    exact = on.search_uploads([("t.png", (folder / "2.png").read_bytes())], SearchParams(k=8)).results[0].hits
    assert exact[0].record.id == target and not any(h.view.startswith("grid") for h in exact)


def test_view_boxes_are_given_as_the_upload_is_displayed():
    """An upload stored sideways with EXIF orientation 6: its cells' boxes are those of the picture a person
    sees, in the original's pixels."""
    from tests.helpers import photo_image
    shown = collage([photo_image(80 + i, (400, 300)) for i in range(4)], 2, 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = the stored pixels turned 90° clockwise
    stored = encode(shown.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)
    img = decode(stored, SPEC, thumb_size=0, views=("cells",))
    assert (img.width, img.height) == shown.size
    want = {k: v for k, v in view_boxes(np.asarray(shown), cells=True).items() if k.startswith("cell")}
    assert len(img.view_boxes) == len(want) == 4
    assert all(max(_iou(w, got) for got in img.view_boxes.values()) > 0.9 for w in want.values()), img.view_boxes
