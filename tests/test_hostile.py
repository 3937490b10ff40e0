"""The hostile class (tests/helpers/hostile.py) through decode, ingest and the API: every file gets a result
or a coded error, fast, with bounded memory."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.media.decode import DecodeLimits, InputSpec, decode, plan, strip_png_metadata
from indexer.errors import DecodeError, OverloadedError
from search.admission import Admission
from tests.helpers import drawn_image, encode, photo_image
from tests.helpers.hostile import HOSTILE, huge_text_png, write_all

SPEC = InputSpec(size=384, crop_pct=1.0, interpolation="bicubic")
ACCEPTED = {"tall_strip.png", "wide_strip.png", "long_banner.png", "many_frames.gif", "huge_text.png",
            "huge_icc.png", "huge_exif.jpg", "progressive_40mp.jpg", "phone_108mp.jpg", "phone_250mp.jpg",
            "deep.tiff"}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile")
    write_all(out)
    return out


def test_every_hostile_file_decodes_or_fails_with_a_code(hostile_dir):
    for p in sorted(hostile_dir.iterdir()):
        t, cpu = time.perf_counter(), time.thread_time()
        try:
            d = decode(p.read_bytes(), SPEC)
            assert p.name in ACCEPTED, p.name
            assert d.pixels.shape == (384, 384, 3)
        except DecodeError as exc:
            assert p.name not in ACCEPTED, f"{p.name}: {exc}"
            assert exc.code == "too_large"
        # fast: the decoder's own CPU (the suite runs beside other work), and a wall-clock ceiling
        assert time.thread_time() - cpu < 5 and time.perf_counter() - t < 30, p.name


def test_frames_are_counted_without_decoding_them(hostile_dir):
    assert decode((hostile_dir / "many_frames.gif").read_bytes(), SPEC).frames == 10_000
    assert decode((hostile_dir / "deep.tiff").read_bytes(), SPEC).frames == 2000


def test_large_jpegs_are_budgeted_by_what_is_decoded(hostile_dir):
    p = plan((hostile_dir / "phone_250mp.jpg").read_bytes(), SPEC)
    assert (p.width, p.height) == (20_000, 12_500) and p.decoded == (2500, 1563)
    assert p.bytes < 64 << 20
    prog = plan((hostile_dir / "progressive_40mp.jpg").read_bytes(), SPEC)
    assert prog.bytes > 2 * 8000 * 5000  # a progressive file keeps every coefficient: counted
    with pytest.raises(DecodeError) as e:
        decode((hostile_dir / "progressive_40mp.jpg").read_bytes(), SPEC, DecodeLimits(max_bytes=64 << 20))
    assert e.value.code == "too_large" and "MiB" in e.value.message


def test_metadata_bombs_cannot_hide_an_image():
    """A zTXt / iCCP bomb added to a picture must not make it unmatchable: the same pixels come out."""
    clean = decode(encode(drawn_image(11, (200, 150)), "PNG"), SPEC).pixels
    assert np.array_equal(decode(huge_text_png(), SPEC).pixels, clean)
    assert len(strip_png_metadata(huge_text_png())) < 200_000


def test_extreme_aspect_ratio_uses_the_centre_square():
    im = Image.new("RGB", (40, 4000), (255, 0, 0))
    im.paste((0, 0, 255), (0, 1990, 40, 2010))  # a blue band across the centre, half the centre square
    d = decode(encode(im, "PNG"), SPEC)
    assert (d.width, d.height) == (40, 4000)
    assert d.pixels[192, 192, 2] > 200 and d.pixels[5, 192, 0] > 200  # the blue band fills the middle


def test_model_pixels_match_resize_then_crop():
    """The model input is resize-then-crop (the model's own transform), whichever way it is computed."""
    for seed, size in ((1, (640, 480)), (2, (300, 900)), (3, (1000, 1000)), (4, (120, 90))):
        im = drawn_image(seed, size)
        w, h = size
        r = 384 / min(w, h)
        nw, nh = max(384, round(w * r)), max(384, round(h * r))
        ref = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - 384) // 2, (nh - 384) // 2
        ref_px = np.asarray(ref.crop((left, top, left + 384, top + 384)), np.float32)
        got = decode(encode(im, "PNG"), SPEC).pixels.astype(np.float32)
        a, b = ref_px.ravel() - 127.5, got.ravel() - 127.5
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.995, (size, cos)


def test_decode_deadline():
    data = encode(drawn_image(5, (800, 600)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode(data, SPEC, DecodeLimits(timeout_s=0.0))
    assert e.value.code == "timeout" and "CPU" in str(e.value)
    with pytest.raises(DecodeError) as e:  # the wall-clock ceiling, for a decode starved of CPU altogether
        decode(data, SPEC, DecodeLimits(wall_s=0.0))
    assert e.value.code == "timeout" and "longer than" in str(e.value)


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_decode_under_cpu_contention_succeeds_where_its_cpu_budget_allows():
    """The budget counts the decoding thread's CPU: with four busy-looping processes per core, a decode takes
    several times its CPU time in wall time and still succeeds under a CPU budget of twice its CPU time —
    a wall-clock budget of the same size would have refused it. (Pillow's path, where the decoding thread is
    the caller's; libvips streams on its own thread, bounded by ``max_stream_pixels`` and the wall ceiling.)"""
    import multiprocessing
    import os
    data = encode(photo_image(11, (5000, 3500)), "PNG")
    t = time.thread_time()
    decode(data, SPEC, DecodeLimits(stream_from=0))
    cpu = time.thread_time() - t
    budget = DecodeLimits(timeout_s=2 * cpu, stream_from=0)
    ctx = multiprocessing.get_context("spawn")
    busy = [ctx.Process(target=_busy, args=(60,), daemon=True) for _ in range(4 * (os.cpu_count() or 1))]
    for b in busy:
        b.start()
    try:
        time.sleep(0.5)
        w, t = time.perf_counter(), time.thread_time()
        d = decode(data, SPEC, budget)
        wall, used = time.perf_counter() - w, time.thread_time() - t
    finally:
        for b in busy:
            b.terminate()
    assert d.pixels.shape == (384, 384, 3)
    assert wall > budget.timeout_s, (wall, used, cpu)  # contended: a wall budget this size would have refused it
    assert used < budget.timeout_s


def test_admission_queues_then_refuses():
    adm = Admission(100, wait_s=0.2)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with adm.reserve(80):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    t0 = time.monotonic()
    with pytest.raises(OverloadedError) as e:
        with adm.reserve(50):
            pass
    assert time.monotonic() - t0 >= 0.2 and e.value.retry_after >= 1
    with adm.reserve(20):  # what fits goes through at once
        assert adm.in_flight == 100
    # a waiting request goes through as soon as the budget frees
    threading.Timer(0.05, release.set).start()
    with adm.reserve(50):
        assert adm.in_flight == 50
    t.join()
    assert adm.in_flight == 0


PROBE = r"""
import json, sys, os
sys.path.insert(0, os.getcwd())

from flagmatch.settings import Settings
from flagmatch import wiring
from indexer.ingest.pipeline import ingest
from indexer.ingest.sources import iter_sources
from tests.helpers import own_peak_rss_kib as hwm, write_images
s = Settings.load({"home": sys.argv[1], "model": sys.argv[2], "batch_size": 4, "precision": "fp32"}, environ={})
store = wiring.open_store(s)
emb = wiring.load_embedder(s, store)
warm = write_images(__import__("pathlib").Path(sys.argv[1]) / "warm", 4)
ingest(store, emb, iter_sources([str(warm[0].parent)]), wiring.ingest_options(s))
base = hwm()
counts = ingest(store, emb, iter_sources([sys.argv[3]]), wiring.ingest_options(s))
peak = hwm()
print(json.dumps({"base_kb": base, "peak_kb": peak, "new": counts.new, "failed": counts.failed,
                  "reasons": counts.reasons}))
"""


def test_ingest_of_the_hostile_class_stays_under_a_memory_bound(hostile_dir, tmp_path, tiny_model_dir):
    """The whole class through a real ingest in a fresh process: peak RSS ≤ warm baseline + 512 MiB."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "home"), str(tiny_model_dir),
                          str(hostile_dir)], capture_output=True, text=True, timeout=600, cwd=Path.cwd())
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["new"] == len(ACCEPTED) and r["failed"] == len(HOSTILE) - len(ACCEPTED)
    assert set(r["reasons"]) == {"too_large"}
    grew_mib = (r["peak_kb"] - r["base_kb"]) / 1024
    assert grew_mib < 512, f"peak RSS grew by {grew_mib:.0f} MiB"
