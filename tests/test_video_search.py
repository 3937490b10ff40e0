"""Searching with and for video, through the JSON API and the CLI, with the real open_nsfw weights: a
re-encoded, trimmed clip finds its original first, with the frame pairs that matched; a still finds the clip
it comes from; a clip finds the flagged picture it shows; flagged and deleted are honoured for videos as
for images."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flagmatch.settings import Settings
from indexer.storage.catalog import FlagRequest
from tests.helpers import clean_env, encode, photo_image, private_copy
from tests.helpers.video import reencode, slideshow

pytest.importorskip("av")
TOKEN = "video-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# the stored clips: each a slideshow of photos (seeds), as uploaded once
CLIPS = {"beach.mp4": [1, 2, 3], "party.mp4": [4, 5, 6, 7], "street.mp4": [8, 9], "other.mp4": [10, 11, 12]}


@pytest.fixture(scope="module")
def video_pristine(tmp_path_factory, opennsfw) -> tuple[Settings, dict[str, int], Path]:
    from flagmatch.wiring import ingest_into, open_index, open_store
    from indexer.ingest.sources import iter_sources

    root = tmp_path_factory.mktemp("video")
    folder = root / "in"
    folder.mkdir()
    for name, seeds in CLIPS.items():
        (folder / name).write_bytes(slideshow([photo_image(s) for s in seeds], seconds_each=3.0))
    for seed in range(20, 32):  # photos of their own, and one that the party clip will be shown to contain
        (folder / f"photo_{seed}.jpg").write_bytes(encode(photo_image(seed), "JPEG", quality=90))
    s = Settings.load({"home": str(root / "home"), "model": "opennsfw", "api_tokens": f"alice:{TOKEN}",
                       "verify_hits": False}, environ={})
    store = open_store(s)
    counts = ingest_into(s, iter_sources([str(folder)]), store=store, embedder=opennsfw)
    assert counts.counts.new == len(CLIPS) + 12 and counts.counts.failed == 0
    recs = store.catalog.get_many(store.catalog.image_ids())
    ids = {Path(r.paths[0]).name: r.id for r in recs.values()}
    store.catalog.set_flag(list(ids.values()), FlagRequest("import", "spam", "setup"), flag=True)
    open_index(store, s).save()
    store.close()
    return s, ids, root


@pytest.fixture
def video_home(video_pristine, tmp_path):
    s, ids, root = video_pristine
    return private_copy(s, tmp_path / "home"), ids, root


@pytest.fixture
def client(video_home, opennsfw):
    from flagmatch.runtime import build_app
    return build_app(video_home[0], embedder=opennsfw).test_client()


def _search(client, data: bytes, name: str, **fields):
    r = client.post("/api/v1/search", data={"image": [(io.BytesIO(data), name)], **fields}, headers=AUTH,
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()
    return r.get_json()["results"][0]


def _trimmed_reupload() -> bytes:
    """The party clip trimmed by its first 2.5 s, smaller, VP9 at a low bit rate, in WebM."""
    original = slideshow([photo_image(s) for s in CLIPS["party.mp4"]], seconds_each=3.0)
    return reencode(original, (128, 96), fmt="webm", codec="libvpx-vp9", bit_rate=120_000, start_s=2.5)


def test_a_trimmed_reencoded_clip_finds_its_original_first_with_frame_pairs(client, video_home):
    _, ids, _ = video_home
    res = _search(client, _trimmed_reupload(), "party-trimmed.webm")
    assert res["query"]["kind"] == "video" and res["query"]["keyframes"] >= 2
    top = res["hits"][0]
    assert top["id"] == ids["party.mp4"] and top["kind"] == "video", [(h["id"], h["similarity"]) for h in res["hits"]]
    assert top["duration_s"] == pytest.approx(12.0, abs=0.5)
    assert top["matched_frames"], "a video hit says which frames matched"
    for f in top["matched_frames"]:
        assert 0 <= f["offset_s"] <= 12.0 and f["query_view"].startswith("@") or f["query_view"] == "clip"
    # the best pair lines up: the query starts 2.5 s into the original (keyframes fall where they fall)
    best = top["matched_frames"][0]
    assert -1.0 <= best["offset_s"] - best["query_offset_s"] <= 6.0
    assert top["similarity"] > res["hits"][1]["similarity"]
    # the query carries the clip's hashes: MD5 and vPDQ
    assert res["hashes"]["vpdq"] and res["hashes"]["pdq"] is None
    # and the stored video is matched by vPDQ too, with HMA's semantics
    assert [(m["id"], m["signal_type"]) for m in res["hashes"]["image_matches"]] == [(ids["party.mp4"], "vpdq")]


def test_a_still_finds_the_clip_it_comes_from_and_a_clip_finds_the_picture_it_shows(client, video_home):
    _, ids, _ = video_home
    still = encode(photo_image(9).resize((400, 300)), "JPEG", quality=80)  # a frame of the street clip, re-saved
    res = _search(client, still, "still.jpg")
    top = res["hits"][0]
    assert top["id"] == ids["street.mp4"], [(h["id"], h["similarity"]) for h in res["hits"]]
    assert top["matched_frames"][0]["query_view"] in ("full", "trimmed") and top["matched_frames"][0]["query_offset_s"] is None
    assert 3.0 - 0.5 <= top["matched_frames"][0]["offset_s"] <= 6.0  # photo 9 is the street clip's second scene
    # a clip that shows a stored photo among pictures never seen finds that photo first
    shown = slideshow([photo_image(90), photo_image(25), photo_image(91)], seconds_each=2.0, size=(240, 180))
    res = _search(client, shown, "shows-25.mp4")
    assert res["hits"][0]["id"] == ids["photo_25.jpg"], [(h["id"], h["similarity"]) for h in res["hits"]]
    assert res["hits"][0]["view"].startswith("@") and res["hits"][0]["matched_frames"] == []
    # a stored video searched by id: its own row and its keyframes, itself left out
    r = client.post("/api/v1/search", json={"id": ids["street.mp4"], "scope": "all"}, headers=AUTH)
    res = r.get_json()["results"][0]
    assert res["query"]["kind"] == "video" and res["query"]["keyframes"] >= 2
    assert ids["street.mp4"] not in [h["id"] for h in res["hits"]] and len(res["hits"]) == 10


def test_flagged_scope_and_deletion_apply_to_videos(client, video_home):
    _, ids, _ = video_home
    from flagmatch.wiring import open_store
    vid = ids["party.mp4"]
    store = open_store(video_home[0])
    frames = store.catalog.keyframes([vid])[vid]
    thumbs = [store.thumb_path(f.thumb_key) for f in frames]
    assert len(frames) >= 4 and all(p.exists() for p in thumbs)
    r = client.post(f"/api/v1/images/{vid}/unflag", json={"reason": "not spam"}, headers=AUTH)
    assert r.status_code == 200, r.get_json()
    q = _trimmed_reupload()
    assert vid not in [h["id"] for h in _search(client, q, "q.webm")["hits"]]
    assert _search(client, q, "q.webm", scope="all")["hits"][0]["id"] == vid
    r = client.delete(f"/api/v1/images/{vid}", json={"reason": "gone"}, headers=AUTH)
    assert r.status_code in (200, 204), r.get_json()
    assert vid not in [h["id"] for h in _search(client, q, "q.webm", scope="all")["hits"]]
    # nothing of the clip is kept but its hashes and the audit trail: keyframe thumbnails, vectors and rows go
    assert not any(p.exists() for p in thumbs) and store.catalog.keyframes([vid]) == {}
    import numpy as np
    rows = store.open_vectors().get_rows(np.array([f.vec_segment for f in frames]), np.array([f.vec_row for f in frames]))
    assert not rows.any()
    store.close()


def test_the_cli_searches_with_a_clip(video_home, tmp_path):
    from flagmatch.cli import main
    s, ids, _ = video_home
    q = tmp_path / "reupload.webm"
    q.write_bytes(_trimmed_reupload())
    env = clean_env({"FLAGMATCH_HOME": s.home, "FLAGMATCH_MODEL": "opennsfw"})
    out = CliRunner().invoke(main, ["search", str(q), "--json"], env=env, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)["results"][0]
    assert res["query"]["kind"] == "video" and res["hits"][0]["id"] == ids["party.mp4"]
    text = CliRunner().invoke(main, ["search", str(q)], env=env, catch_exceptions=False)
    assert text.exit_code == 0 and "(video, " in text.output and "frames: " in text.output, text.output
