"""Video decoding (``indexer.media.video``) on clips made here with PyAV: the facts from the headers,
keyframes at the scene cuts and at least every few seconds, vPDQ through threatexchange's signal type (the
peer: a re-encode matches, another clip does not), and the hostile videos — each a coded error within
bounded memory and time, measured in a process of its own."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import DecodeError
from indexer.media.video import VideoLimits, keyframes, probe, sniff, vpdq_json, vpdq_match
from tests.helpers import drawn_image, encode
from tests.helpers.video import clip, encode_frames, hostile, reencode

SCENES = [3, 17, 29]


@pytest.fixture(scope="module")
def slideshow() -> bytes:
    return clip(SCENES, seconds_each=2.0)


def test_facts_come_from_the_headers(slideshow):
    info = probe(slideshow)
    assert (info.container, info.codec, info.width, info.height) == ("mov", "mpeg4", 160, 120)
    assert abs(info.duration_s - 6.0) < 0.25 and abs(info.frames - 60) <= 2 and info.fps == 10


def test_keyframes_are_the_scene_cuts_and_a_periodic_sample(slideshow):
    _, frames = keyframes(slideshow)
    cuts = [k.offset_s for k in frames if k.scene_cut]
    assert len(cuts) == 3 and all(abs(c - want) < 0.3 for c, want in zip(cuts, (0.0, 2.0, 4.0))), cuts
    # each cut shows its scene's picture (the pan starts at the left edge)
    for k, seed in zip((k for k in frames if k.scene_cut), SCENES):
        want = np.asarray(drawn_image(seed, (200, 150)).convert("RGB"), np.float32)[15:135, 0:160]
        got = np.asarray(k.image.convert("RGB"), np.float32)
        assert np.abs(got - want).mean() < 20
    _, dense = keyframes(slideshow, VideoLimits(every_s=0.5))
    assert len(dense) > len(frames) and max(np.diff([k.offset_s for k in dense])) <= 0.5 + 1 / 4  # a look every 1/4 s
    _, capped = keyframes(slideshow, VideoLimits(every_s=0.5, max_keyframes=4))
    assert len(capped) == 4


def test_frames_of_one_colour_are_never_keyframes_unless_the_clip_has_nothing_else():
    """A white card and a black fade between scenes would match every blank picture a store holds at
    similarity 1: they are never keyframes; a clip that is one colour throughout keeps its first frame."""
    from PIL import Image

    def encoded(pictures: list) -> bytes:  # 2 s of each, held still
        return encode_frames((np.asarray(pic) for pic in pictures for _ in range(20)), (160, 120), 10)
    white, black = Image.new("RGB", (160, 120), "white"), Image.new("RGB", (160, 120), "black")
    a, b = drawn_image(1, (160, 120)), drawn_image(2, (160, 120))
    _, frames = keyframes(encoded([a, white, b, black, black, black]))
    got = [k.offset_s for k in frames]
    assert len(frames) == 2 and got[0] == 0.0 and abs(got[1] - 4.0) < 0.3, got  # a, then b: no card, no fade
    _, frames = keyframes(encoded([black, black]))
    assert [k.offset_s for k in frames] == [0.0]


def test_a_reencoded_clip_has_the_same_cuts(slideshow):
    other = clip(SCENES, seconds_each=2.0, size=(320, 240), fps=25, fmt="webm", codec="libvpx-vp9")
    info, frames = keyframes(other)
    assert (info.container, info.codec) == ("matroska", "vp9")
    assert [round(k.offset_s) for k in frames if k.scene_cut] == [0, 2, 4]


def test_vpdq_matches_a_reencode_and_not_another_clip(slideshow, tmp_path):
    """vPDQ as threatexchange's VPDQSignal computes and compares it (HMA's semantics: frame distance and
    quality thresholds, query and compared match percentages)."""
    from threatexchange.extensions.vpdq.vpdq import VPDQSignal
    paths = {}
    for name, data in {"a": slideshow, "reencoded": reencode(slideshow, (240, 180)),
                       "trimmed": reencode(slideshow, (160, 120), fmt="mp4", codec="mpeg4", start_s=1.0),
                       "other": clip([101, 102, 103])}.items():
        paths[name] = tmp_path / f"{name}.mp4"
        paths[name].write_bytes(data)
    ours = vpdq_json(paths["a"])
    assert ours == VPDQSignal.hash_from_file(paths["a"])  # the peer's own hashing, the peer's own format
    assert len(json.loads(ours)) >= 5
    assert vpdq_match(ours, VPDQSignal.hash_from_file(paths["reencoded"])).match
    trimmed = vpdq_match(VPDQSignal.hash_from_file(paths["trimmed"]), ours)
    assert trimmed.match and trimmed.query_match_percent > 80  # every frame of the trim is in the original
    assert not vpdq_match(ours, VPDQSignal.hash_from_file(paths["other"])).match


def test_the_bytes_decide_never_the_name():
    assert sniff(encode(drawn_image(1), "PNG")) is None
    with pytest.raises(DecodeError) as e:
        probe(encode(drawn_image(1), "PNG"))
    assert e.value.code == "unsupported_format"
    with pytest.raises(DecodeError) as e:
        probe(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)  # says MP4, holds nothing
    assert e.value.code == "corrupt"


HOSTILE = {
    "frame size 30000x30000 in the headers": ("frame", None),
    "a 10-hour duration": ("hours", "too_long"),
    "a million frames stated (1000 fps for 20 min)": ("million", "too_many_frames"),
    "more frames than the cap, counted while decoding": ("counted", "too_many_frames"),
    "truncated": ("truncated", None),
    "a corrupt stream in the middle": ("damaged", "corrupt"),
    "named .mp4, bytes of a PNG": ("png", "unsupported_format"),
    "an MP4 box claiming 4 GB": ("box", "corrupt"),
}


CHILD = """
import json, sys, time

from tests.helpers import own_peak_rss_kib as hwm
from indexer.errors import DecodeError
from indexer.media.video import VideoLimits, keyframes
data = open(sys.argv[1], "rb").read()
limits = VideoLimits(**json.loads(sys.argv[2]))
before = hwm()
t = time.perf_counter()
try:
    info, frames = keyframes(data, limits)
    code = None
except DecodeError as exc:
    code = exc.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - t,
                  "rss_mib": hwm() / 1024,
                  "rss_before_mib": before / 1024}))
"""


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_videos_are_coded_errors_in_bounded_memory_and_time(name, tmp_path):
    kind, want = HOSTILE[name]
    data, limits = hostile(kind)
    path = tmp_path / "upload.mp4"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(limits)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if want is None:  # coded either way, as FFmpeg sees it: a cut file has no index or fewer frames than stated;
        # a frame size FFmpeg's decoder refuses to allocate leaves the stream without one
        assert got["code"] in ("corrupt", "truncated", "too_large"), got
    else:
        assert got["code"] == want, got
    assert got["seconds"] < 10, got
    assert got["rss_mib"] - got["rss_before_mib"] < 200, got
