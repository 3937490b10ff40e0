"""Video on the HMA routes of a real `flagmatch serve` over loopback, as an HMA client uses them: hash a clip
(video MD5 and vPDQ), bank it, look up a trimmed re-encode by upload and by its vPDQ, compare two vPDQs — with
threatexchange's VPDQSignal as the peer that must agree — and vPDQ lists in and out in threatexchange's formats."""
from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from tests.helpers import clean_env, encode, photo_image, start_server, stop_server

requests = pytest.importorskip("requests")
pytest.importorskip("vpdq")
from threatexchange.extensions.vpdq.vpdq import VPDQSignal  # noqa: E402

from tests.helpers.video import reencode, slideshow  # noqa: E402

TOKEN = "hma-video-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _original() -> bytes:
    return slideshow([photo_image(s) for s in (400, 401, 402)], seconds_each=3.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tiny_embedder):
    from flagmatch.settings import Settings
    from flagmatch.wiring import ingest_into, open_store
    from indexer.ingest.sources import iter_sources
    root = tmp_path_factory.mktemp("hmavideo")
    (root / "in").mkdir()
    (root / "in" / "p.jpg").write_bytes(encode(photo_image(410), "JPEG"))
    s = Settings.load({"home": str(root / "home"), "model": str(tiny_model_dir)}, environ={})
    store = open_store(s)
    ingest_into(s, iter_sources([str(root / "in")]), store=store, embedder=tiny_embedder)
    store.close()
    env = {"FLAGMATCH_HOME": str(root / "home"), "FLAGMATCH_MODEL": str(tiny_model_dir),
           "FLAGMATCH_API_TOKENS": f"hma:{TOKEN}", "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "2"}
    proc, base, log = start_server(env, root / "server.log")
    yield base, root
    stop_server(proc, log)


def test_an_hma_client_banks_a_clip_and_finds_its_trimmed_reencode(served, tmp_path):
    base, _ = served
    original = _original()
    # /h/hash: a video is hashed by MD5 and vPDQ; threatexchange's VPDQSignal hashes the same file alike
    r = requests.post(f"{base}/h/hash", files={"video": ("v.mp4", original)}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"video_md5", "vpdq"} and got["video_md5"] == hashlib.md5(original).hexdigest()
    (tmp_path / "v.mp4").write_bytes(original)
    theirs = VPDQSignal.hash_from_file(tmp_path / "v.mp4")
    assert VPDQSignal.validate_signal_str(got["vpdq"])
    cmp = VPDQSignal.compare_hash(got["vpdq"], theirs)
    assert cmp.match and cmp.distance.query_match_percent >= 95, cmp
    # bank the clip as HMA content
    assert requests.post(f"{base}/c/banks", json={"name": "VIDEO_LIST"}, headers=AUTH, timeout=30).status_code == 201
    r = requests.post(f"{base}/c/bank/VIDEO_LIST/content", files={"video": ("v.mp4", original)}, headers=AUTH,
                      timeout=60)
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    assert set(r.json()["signals"]) == {"video_md5", "vpdq"}
    # a trimmed, smaller, re-encoded copy: no MD5 match, a vPDQ match with HMA's distance string
    copy = reencode(original, (128, 96), fmt="webm", codec="libvpx-vp9", bit_rate=150_000, start_s=2.0)
    r = requests.post(f"{base}/m/lookup", files={"video": ("copy.webm", copy)}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["video_md5"] == {} and [m["bank_content_id"] for m in body["vpdq"]["VIDEO_LIST"]] == [cid], body
    dist = body["vpdq"]["VIDEO_LIST"][0]["distance"]
    assert dist.endswith("%]") and float(dist.split("%")[0]) >= 80  # "<query %>%[<compared %>%]"
    # the same by signal: the copy's vPDQ from threatexchange's own hasher
    (tmp_path / "copy.webm").write_bytes(copy)
    copy_vpdq = VPDQSignal.hash_from_file(tmp_path / "copy.webm")
    r = requests.get(f"{base}/m/lookup", params={"signal_type": "vpdq", "signal": copy_vpdq}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["VIDEO_LIST"][0]["bank_content_id"] == cid, r.text
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "vpdq", "signal": copy_vpdq}, headers=AUTH,
                     timeout=30)
    assert r.json() == {"matches": [cid]}
    # an unrelated clip matches nothing; the original's exact bytes match by MD5 too
    other = slideshow([photo_image(s) for s in (500, 501)], seconds_each=3.0)
    r = requests.post(f"{base}/m/lookup", files={"video": ("o.mp4", other)}, headers=AUTH, timeout=60)
    assert r.json() == {"video_md5": {}, "vpdq": {}}, r.text
    r = requests.post(f"{base}/m/lookup", files={"video": ("v.mp4", original)}, headers=AUTH, timeout=60)
    assert r.json()["video_md5"]["VIDEO_LIST"][0]["bank_content_id"] == cid
    # /m/compare answers as threatexchange's compare_hash does
    r = requests.post(f"{base}/m/compare", json={"vpdq": [got["vpdq"], copy_vpdq]}, headers=AUTH, timeout=30)
    ours = r.json()["vpdq"]
    ref = VPDQSignal.compare_hash(got["vpdq"], copy_vpdq)
    assert ours[0] == ref.match and ours[1]["query_match_percent"] == pytest.approx(ref.distance.query_match_percent)
    # flagmatch's vPDQ threshold is threatexchange's: 80 % of the query's frames matched
    from threatexchange.extensions.vpdq.vpdq_util import VPDQ_QUERY_MATCH_THRESHOLD_PERCENT
    from search.hashmatch import VPDQ_THRESHOLD
    assert VPDQ_THRESHOLD == 100 - VPDQ_QUERY_MATCH_THRESHOLD_PERCENT
    # the types HMA lists
    assert {"name": "vpdq", "enabled_ratio": 1.0} in requests.get(f"{base}/c/signal_type", headers=AUTH, timeout=30).json()
    assert requests.get(f"{base}/m/index/status", headers=AUTH, timeout=30).json()["vpdq"]["size"] == 1


def test_bytes_that_are_no_video_still_hash_by_md5_and_a_named_vpdq_says_why(served):
    base, _ = served
    jpeg = encode(photo_image(411), "JPEG")
    # OMM's own test: "It's not really a video, but MD5 is simple that we can fake it"
    r = requests.post(f"{base}/m/lookup", files={"video": ("x.jpg", jpeg)}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json() == {"video_md5": {}, "vpdq": {}}, r.text
    r = requests.post(f"{base}/h/hash", files={"video": ("x.jpg", jpeg)}, headers=AUTH, timeout=30)
    assert r.json() == {"video_md5": hashlib.md5(jpeg).hexdigest(), "vpdq": ""}
    r = requests.post(f"{base}/h/hash", params={"types": "vpdq"}, files={"video": ("x.jpg", jpeg)}, headers=AUTH,
                      timeout=30)
    assert r.status_code in (400, 415) and "video" in r.json()["message"], r.text
    r = requests.get(f"{base}/m/lookup", params={"signal_type": "vpdq", "signal": '["nope"]'}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "vpdq" in r.json()["message"], r.text


def test_vpdq_lists_in_and_out_in_threatexchanges_formats(served, tmp_path):
    """A vPDQ list written as threatexchange's local-file exchange writes it imports and matches; flagmatch's
    export of it is read back by threatexchange's own file exchange."""
    from flagmatch.cli import main
    from threatexchange.exchanges.impl.file_api import FileCollaborationConfig, LocalFileSignalExchangeAPI
    base, root = served
    clip = tmp_path / "c.mp4"
    clip.write_bytes(slideshow([photo_image(s) for s in (600, 601)], seconds_each=3.0))
    theirs = VPDQSignal.hash_from_file(clip)
    listing = tmp_path / "list.txt"
    # the line LocalFileSignalExchangeAPI.report_opinion writes (its own call opens the file in mode "wta",
    # which Python refuses), read back by its fetch_iter as the list's one signal
    listing.write_text(f"{VPDQSignal.get_name()} {theirs}\n")
    [(st, sig)] = list(next(LocalFileSignalExchangeAPI(FileCollaborationConfig(str(listing), "F"))
                            .fetch_iter([], None)).updates)
    assert st == "vpdq" and sig == theirs
    env = clean_env({"FLAGMATCH_HOME": str(root / "home")})
    run = CliRunner()
    out = run.invoke(main, ["banks", "create", "TE_VIDEOS"], env=env, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    out = run.invoke(main, ["banks", "import", "--bank", "TE_VIDEOS", str(listing)], env=env, catch_exceptions=False)
    assert out.exit_code == 0 and "1 added" in out.output and "(1 vpdq)" in out.output, out.output
    copy = reencode(clip.read_bytes(), (160, 120), fmt="mp4", codec="mpeg4", bit_rate=200_000)
    r = requests.post(f"{base}/m/lookup", files={"video": ("copy.mp4", copy)}, headers=AUTH, timeout=60)
    assert list(r.json()["vpdq"]) == ["TE_VIDEOS"], r.text
    exported = tmp_path / "out.txt"
    out = run.invoke(main, ["banks", "export", "--bank", "TE_VIDEOS", "-o", str(exported)], env=env,
                     catch_exceptions=False)
    assert out.exit_code == 0, out.output
    fetched = list(LocalFileSignalExchangeAPI(FileCollaborationConfig(str(exported), "F")).fetch_iter([], None))
    [(st, sig)] = list(fetched[0].updates)
    assert st == "vpdq" and VPDQSignal.compare_hash(VPDQSignal.validate_signal_str(sig), theirs).match
