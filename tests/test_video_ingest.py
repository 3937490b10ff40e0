"""Video in the catalog: a mixed folder of images and clips ingests as one item per file, a clip with its
keyframes (offsets, vectors, thumbnails) and its vPDQ; a bad clip is a coded error that loses nothing else."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from flagmatch.wiring import ingest_options
from indexer.ingest.pipeline import ingest
from indexer.ingest.sources import iter_sources
from tests.helpers import drawn_image, encode, write_images
from tests.helpers.video import clip, damaged, hostile

pytest.importorskip("av")


def _mixed(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    paths = {p.name: p for p in write_images(folder, 3)}
    for name, data in (("slides.mp4", clip([1, 2, 3])), ("other.webm", clip([4, 5], fmt="webm", codec="libvpx-vp9")),
                       ("fake.mp4", b"these bytes say text, not video\n" * 10), ("cut.mp4", damaged(clip([6, 7])))):
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    frames = [drawn_image(s, (160, 120)).convert("P") for s in range(6)]  # an animated GIF is a clip
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=1500, loop=0)
    (folder / "anim.gif").write_bytes(buf.getvalue())
    (folder / "still.gif").write_bytes(encode(drawn_image(7), "GIF"))  # one frame: an image
    for kind in ("frame", "hours", "million", "box", "truncated"):  # each refused by its own code
        (folder / f"hostile-{kind}.mp4").write_bytes(hostile(kind)[0])
    return paths


def test_a_mixed_folder_is_one_item_per_file_with_keyframes_and_vpdq(store, tiny_embedder, settings, tmp_path):
    paths = _mixed(tmp_path / "in")
    counts = ingest(store, tiny_embedder, iter_sources([str(tmp_path / "in")]), ingest_options(settings))
    assert counts.new == 7 and counts.failed == 7, counts
    errors = {Path(p).name: code for p, code, _ in store.catalog.errors()}
    assert errors["fake.mp4"] == "unsupported_format"
    assert errors["cut.mp4"] in ("corrupt", "truncated")
    assert errors["hostile-frame.mp4"] in ("too_large", "corrupt") and errors["hostile-hours.mp4"] == "too_long"
    assert errors["hostile-million.mp4"] == "too_many_frames" and errors["hostile-box.mp4"] in ("corrupt", "truncated")
    assert errors["hostile-truncated.mp4"] in ("corrupt", "truncated")
    ids = store.catalog.image_ids()
    recs = store.catalog.get_many(ids)
    videos = {Path(r.paths[0]).name: r for r in recs.values() if r.kind == "video"}
    images = [r for r in recs.values() if r.kind == "image"]
    assert set(videos) == {"slides.mp4", "other.webm", "anim.gif"} and len(images) == 4
    anim = videos["anim.gif"]
    assert anim.format == "gif" and anim.duration_s == pytest.approx(9.0, abs=0.1)
    assert len(store.catalog.keyframes([anim.id])[anim.id]) >= 4
    slides = videos["slides.mp4"]
    assert slides.format == "mov" and slides.duration_s == pytest.approx(6.0, abs=0.3) and slides.frames >= 55
    frames = store.catalog.keyframes([slides.id])[slides.id]
    assert 2 <= len(frames) <= settings.video_max_keyframes
    assert [f.offset_s for f in frames] == sorted(f.offset_s for f in frames) and frames[0].offset_s == 0.0
    # each keyframe has its own thumbnail and raw vector; the clip's own vector is their mean, normalised
    for f in frames:
        assert (store.thumbs_dir / f.thumb_key).stat().st_size > 0
    vs = store.open_vectors()
    kv = vs.get_rows(np.array([f.vec_segment for f in frames]), np.array([f.vec_row for f in frames]))
    mean = kv.mean(axis=0)
    assert np.allclose(vs.get([slides.id])[0], mean / np.linalg.norm(mean), atol=1e-5)
    assert slides.p_unsafe == pytest.approx(max(f.p_unsafe for f in frames), abs=1e-6)
    assert slides.thumb_key in {f.thumb_key for f in frames}
    # the clip is hashed as HMA hashes video: MD5 of the bytes and threatexchange's vPDQ
    sig = store.catalog.signals([slides.id])[slides.id]
    import hashlib
    from threatexchange.extensions.vpdq.vpdq import VPDQSignal
    assert sig.md5 == hashlib.md5(paths["slides.mp4"].read_bytes()).hexdigest() and sig.pdq is None
    assert VPDQSignal.validate_signal_str(sig.vpdq) and VPDQSignal.compare_hash(
        sig.vpdq, VPDQSignal.hash_from_file(paths["slides.mp4"])).match
    # a second run takes nothing in again
    again = ingest(store, tiny_embedder, iter_sources([str(tmp_path / "in")]), ingest_options(settings))
    assert again.new == 0 and again.duplicates == 7 and again.failed == 7


def test_keyframes_the_model_sees_as_blank_are_left_out(tmp_path, opennsfw):
    """A keyframe the model cannot tell from a plain picture (cosine ≥ 0.98 to its white, black or grey) would
    match every blank image in a store at similarity 1 (benchmarks/video.py met clipart line art that open_nsfw
    embeds exactly as white). The decoder's own flat-frame rule is turned off here (``flat=0``), so a white card
    reaches the model: the stored video keeps its other scenes only, and its vector is their mean."""
    from dataclasses import replace

    from PIL import Image

    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.models.embed import blank_like
    from tests.helpers import photo_image
    from tests.helpers.video import slideshow
    folder = tmp_path / "in"
    folder.mkdir()
    card = Image.new("RGB", (640, 480), "white")
    (folder / "v.mp4").write_bytes(slideshow([photo_image(1), card, photo_image(2)], seconds_each=3.0))
    s = Settings.load({"home": str(tmp_path / "home"), "model": "opennsfw"}, environ={})
    store = open_store(s)
    opts = ingest_options(s)
    counts = ingest(store, opennsfw, iter_sources([str(folder)]), replace(opts, video=replace(opts.video, flat=0.0)))
    assert counts.new == 1
    vid = store.catalog.image_ids()[0]
    frames = store.catalog.keyframes([vid])[vid]
    offsets = [f.offset_s for f in frames]
    assert offsets and all(not 3.0 <= o < 6.0 for o in offsets) and any(o >= 6.0 for o in offsets), offsets
    kv = store.open_vectors().get_rows(np.array([f.vec_segment for f in frames]), np.array([f.vec_row for f in frames]))
    assert not blank_like(opennsfw, kv).any()
    assert blank_like(opennsfw, opennsfw.embed(np.stack([np.full((224, 224, 3), 255, np.uint8)]))[0]).all()
    mean = kv.mean(axis=0)
    assert np.allclose(store.open_vectors().get([vid])[0], mean / np.linalg.norm(mean), atol=1e-5)
    store.close()
