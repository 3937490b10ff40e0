"""Hit verification by local features: a copy through the edits re-uploads go through verifies against the
stored thumbnail of its original, another picture does not; the search service moves a verified hit
first and says which hits it checked."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from indexer.media.decode import InputSpec, decode
from indexer.media.local import MIN_MATCHES, SIDE, FeatureCache, QueryFeatures, describe, thumbnail_grey
from tests.helpers import captioned, drawn_image, encode, ingest_flagged, photo_image

SPEC = InputSpec(size=224, crop_pct=1.0)


def _jpeg_half(im: Image.Image) -> Image.Image:
    small = im.resize((im.width // 2, im.height // 2), Image.BILINEAR)
    return Image.open(io.BytesIO(encode(small, "JPEG", quality=30))).convert("RGB")


def _framed(im: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (im.width + 300, im.height + 200), (250, 250, 250))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, canvas.width, 40), fill=(40, 60, 150))
    for i in range(6):
        d.text((10, 60 + 30 * i), f"@someone{i} 3m ago", fill=(20, 20, 20))
    canvas.paste(im, (240, 70))
    return canvas


EDITS = {
    "crop 80 %": lambda im: im.crop((im.width // 10, im.height // 10, im.width * 9 // 10, im.height * 9 // 10)),
    "rotate 8°": lambda im: im.rotate(8, resample=Image.BILINEAR, expand=True),
    "JPEG 30 + half size": _jpeg_half,
    "screenshot frame": _framed,
    "caption band": captioned,
    "greyscale + contrast": lambda im: ImageOps.autocontrast(ImageOps.grayscale(im), cutoff=2).convert("RGB"),
    "mirror": ImageOps.mirror,
}


def _stored(im: Image.Image):
    """What a candidate is described from: the thumbnail ingest stores for the picture."""
    thumb = decode(encode(im, "PNG"), SPEC, thumb_size=SIDE).thumbnail
    return describe(np.asarray(Image.open(io.BytesIO(thumb)).convert("L")))


def _query(im: Image.Image) -> QueryFeatures:
    grey = decode(encode(im, "PNG"), SPEC, thumb_size=0, grey_side=SIDE).grey
    assert grey is not None and max(grey.shape) == SIDE
    return QueryFeatures(grey)


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_copy_verifies_and_other_pictures_do_not(edit):
    originals = [photo_image(s, (800, 600)) for s in range(4)]
    stored = [_stored(im) for im in originals]
    for n, im in enumerate(originals):
        q = _query(EDITS[edit](im))
        own = q.matches(stored[n])
        others = [q.matches(s) for m, s in enumerate(stored) if m != n]
        assert own >= MIN_MATCHES, (edit, n, own)
        assert max(others) < MIN_MATCHES, (edit, n, others)


def test_flat_and_tiny_pictures_verify_nothing_and_do_not_fail():
    flat = QueryFeatures(np.full((200, 300), 128, np.uint8))
    assert len(flat.plain) == 0
    assert flat.matches(_stored(photo_image(1))) == 0
    tiny = QueryFeatures(np.asarray(photo_image(2, (12, 9)).convert("L")))
    assert tiny.matches(_stored(photo_image(2))) < MIN_MATCHES


def test_feature_cache_describes_each_thumbnail_once_and_survives_a_missing_file(tmp_path):
    (tmp_path / "a.webp").write_bytes(encode(photo_image(3), "WEBP"))
    (tmp_path / "bad.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPnot really")
    loads: list[str] = []
    load = thumbnail_grey(tmp_path)
    cache = FeatureCache(lambda key: loads.append(key) or load(key), size=2)
    first = cache.get("a.webp")
    assert first is not None and len(first) > 100
    assert cache.get("a.webp") is first and loads == ["a.webp"]
    assert cache.get("missing.webp") is None and cache.get("bad.webp") is None
    cache.get("a.webp")  # evicted by the two misses (size 2): described again
    assert loads == ["a.webp", "missing.webp", "bad.webp", "a.webp"]


def test_search_moves_the_verified_copy_first_and_reports_the_checks(store, tiny_embedder, tmp_path, settings):
    from flagmatch.wiring import open_index, search_service
    from search.service import SearchParams

    ids = ingest_flagged(settings, store, tiny_embedder, tmp_path / "in",
                         {**{str(i): photo_image(20 + i) for i in range(6)},
                          # look-alikes without corners worth matching
                          **{f"d{i}": drawn_image(200 + i) for i in range(6)}})
    svc = search_service(settings, store, open_index(store, settings), tiny_embedder)
    target = ids["2"]
    query = encode(_framed(EDITS["crop 80 %"](photo_image(22))), "JPEG", quality=60)

    res = svc.search_uploads([("q.jpg", query)], SearchParams(k=12))
    hits = res.results[0].hits
    assert hits[0].record.id == target and hits[0].verified and hits[0].local_matches >= MIN_MATCHES
    checked = [h for h in hits if h.local_matches is not None]
    # checked from the model's top down to the copy, the rest left unchecked; none of the others verified
    assert all(not h.verified for h in checked[1:]) and len(checked) <= 5
    assert res.timings.verify > 0

    # the model's order with look-alikes above the copy: verification puts the copy first
    others = [(h.record.id, (h.similarity, h.view)) for h in hits[1:]]
    top = [*others[:3], (target, (hits[0].similarity, hits[0].view)), *others[3:]]
    recs = store.catalog.get_many([i for i, _ in top])
    feats = svc._decode_query(query, tiny_embedder.info.input)[1]
    row, seen = svc._verify(feats, top, recs)
    assert row[0][0] == target and [i for i, _ in row[1:]] == [i for i, _ in top if i != target]
    assert seen[target] >= MIN_MATCHES and all(seen[i] < MIN_MATCHES for i in seen if i != target)
    assert list(seen) == [i for i, _ in top[:4]]  # checked down to the copy, no further
    # no deeper than VERIFY_DEPTH: a copy at rank 6 is left where the model put it
    deep = [*others[:5], (target, (hits[0].similarity, hits[0].view)), *others[5:]]
    row, seen = svc._verify(feats, deep, recs)
    assert row == deep and len(seen) == 5 and target not in seen
    # verify_depth 10 reaches it: it moves first, checked after the five above it
    deeper = search_service(settings.replace(verify_depth=10), store, svc.index, tiny_embedder)
    row, seen = deeper._verify(feats, deep, recs)
    assert row[0][0] == target and list(seen) == [i for i, _ in deep[:6]]
    # nothing verifies when the copy is not among the hits: the model's order stays
    assert svc._verify(feats, others, recs)[0] == others

    off = search_service(settings.replace(verify_hits=False), store, svc.index, tiny_embedder)
    assert all(h.local_matches is None and h.verified is None
               for h in off.search_uploads([("q.jpg", query)], SearchParams(k=12)).results[0].hits)
    # a query by id is not verified (no upload to compare): its hits say so
    assert all(h.local_matches is None for h in svc.search_ids([target], SearchParams(k=5)).results[0].hits)


def test_a_hit_the_uploads_pdq_matches_goes_first_as_verified(store, tiny_embedder, tmp_path, settings):
    """Greyscale and recompression at half size keep the picture's PDQ (within the threshold HMA uses) where
    the model's order and local features can both miss: a hit the upload's hash matches goes first, verified,
    and the hash evidence names it; an edit that changes the PDQ (a crop into a frame) is left to the model."""
    from PIL import ImageOps
    from flagmatch.wiring import open_index, search_service
    from search.serialize import hit_json
    from search.service import SearchParams

    ids = ingest_flagged(settings, store, tiny_embedder, tmp_path / "in", {str(i): photo_image(40 + i) for i in range(8)})
    index = open_index(store, settings)
    plain = search_service(settings.replace(verify_hits=False), store, index, tiny_embedder)
    model_first = 0
    for i in range(8):
        im = photo_image(40 + i)
        grey = ImageOps.grayscale(im.resize((im.width // 2, im.height // 2))).convert("RGB")
        query = encode(grey, "JPEG", quality=30)
        target = ids[str(i)]
        res = plain.search_uploads([("q.jpg", query)], SearchParams(k=8)).results[0]
        assert target in {m.record.id for m in res.evidence.image_matches}
        hit = res.hits[0]
        assert hit.record.id == target and hit.verified is True and hit.hash_match and hit.local_matches is None
        assert hit_json(hit)["verified_by"] == "hash"
        assert all(h.verified is None for h in res.hits[1:])  # nothing else was checked
        # what the model alone put first (the row before the hashes moved anything)
        model_first += max(res.hits, key=lambda h: h.similarity).record.id == target
    assert model_first < 8, "the model ranks every copy first: the hashes moved nothing here"
    # an upload whose very bytes are stored: that image first (its MD5), the picture its PDQ matches after it
    im = photo_image(41)
    grey = Image.open(io.BytesIO(encode(ImageOps.grayscale(im.resize((320, 240))).convert("RGB"), "JPEG",
                                        quality=30))).convert("RGB")
    again = ingest_flagged(settings, store, tiny_embedder, tmp_path / "more", {"g": grey})["g"]
    index = open_index(store, settings)
    plain = search_service(settings.replace(verify_hits=False), store, index, tiny_embedder)
    res = plain.search_uploads([("q.png", (tmp_path / "more" / "g.png").read_bytes())], SearchParams(k=8)).results[0]
    assert res.query.known_id == again and [h.record.id for h in res.hits[:2]] == [again, ids["1"]]
    assert res.hits[0].verified and res.hits[1].verified and hit_json(res.hits[1])["verified_by"] == "hash"
    framed = encode(_framed(EDITS["crop 80 %"](photo_image(42))), "JPEG", quality=60)
    res = plain.search_uploads([("q.jpg", framed)], SearchParams(k=8)).results[0]
    assert not res.evidence.image_matches and all(h.verified is None and not h.hash_match for h in res.hits)


def test_verified_join_groups_each_original_with_its_copies_and_nothing_else(store, tiny_embedder, tmp_path,
                                                                              settings):
    """The clustering job's near-duplicate join with verification: every pair is a candidate here
    (threshold -1, all neighbours), and only copies of one picture are joined."""
    from clustering.job import near_duplicate_families, pair_check
    from flagmatch.wiring import ingest_into
    from indexer.ingest.sources import iter_sources

    folder = tmp_path / "in"
    folder.mkdir()
    family: dict[str, int] = {}
    for f in range(4):
        im = photo_image(40 + f, (720, 540))
        for name in ("original", "crop 80 %", "JPEG 30 + half size", "caption band", "rotate 8°"):
            path = folder / f"f{f}-{len(family)}.png"
            path.write_bytes(encode(im if name == "original" else EDITS[name](im), "PNG"))
            family[hashlib.sha256(path.read_bytes()).hexdigest()] = f
    for i in range(5):
        (folder / f"other{i}.png").write_bytes(encode(photo_image(90 + i, (720, 540)), "PNG"))
    ingest_into(settings, iter_sources([str(folder)]), store=store, embedder=tiny_embedder)
    ids = np.asarray(store.catalog.image_ids(), np.int64)
    recs = store.catalog.get_many(ids.tolist())
    truth = np.array([family.get(recs[int(i)].sha256, -1) for i in ids])
    x = store.open_vectors().get(ids)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)

    got = near_duplicate_families(x, -1.0, k=len(ids) - 1, verify=pair_check(store, ids))
    assert (got[truth < 0] == -1).all()
    for f in range(4):
        members = got[truth == f]
        assert members[0] >= 0 and (members == members[0]).all(), (f, got, truth)
    assert len(set(got[truth >= 0].tolist())) == 4
    # similarity alone at the same threshold joins everything into one family
    assert len(set(near_duplicate_families(x, -1.0, k=len(ids) - 1).tolist())) == 1


def test_cluster_params_resolve_keeps_every_setting():
    from clustering.job import ClusterParams
    p = ClusterParams(join=0.3, epochs=60, verify=True, seed=3).resolve(20_000)
    assert (p.join, p.epochs, p.verify, p.seed, p.min_cluster_size, p.min_samples) == (0.3, 60, True, 3, 20, 10)
