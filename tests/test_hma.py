"""The HMA-compatible routes on a real `flagmatch serve` over loopback, called the way HMA's clients call
Open Media Match (facebook/ThreatExchange, hasher-matcher-actioner): hash an upload, bank a signal or a
file, look up a hash or an upload, switch a bank off — and flagmatch's own search showing the same match."""
from __future__ import annotations

import pytest

from tests.helpers import encode, photo_image, start_server, stop_server

requests = pytest.importorskip("requests")
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes  # noqa: E402

from indexer.media.hashes import pdq_distance  # noqa: E402
from tests.helpers.peers import PEER_TOLERANCE, transformed  # noqa: E402

TOKEN = "hma-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_embedder):
    from flagmatch.settings import Settings
    from flagmatch.wiring import ingest_into, open_store
    from indexer.ingest.sources import iter_sources
    root = tmp_path_factory.mktemp("hma")
    (root / "in").mkdir()
    for i in range(6):
        (root / "in" / f"p{i}.jpg").write_bytes(encode(photo_image(300 + i), "JPEG", quality=90))
    s = Settings.load({"home": str(root / "home"), "model": str(tiny_model_dir)}, environ={})
    store = open_store(s)
    ingest_into(s, iter_sources([str(root / "in")]), store=store, embedder=tiny_embedder)
    store.close()
    env = {"FLAGMATCH_HOME": str(root / "home"), "FLAGMATCH_MODEL": str(tiny_model_dir),
           "FLAGMATCH_API_TOKENS": f"hma:{TOKEN}", "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "2"}
    proc, base, log = start_server(env, root / "server.log")
    yield base
    stop_server(proc, log)


def test_an_hma_client_banks_hashes_and_matches_uploads(server):
    base = server
    original = photo_image(900)
    banked_bytes = encode(original, "PNG")
    copy = transformed(original)

    r = requests.post(f"{base}/c/banks", json={"name": "PARTNER_LIST"}, headers=AUTH, timeout=30)
    assert r.status_code == 201 and r.json()["name"] == "PARTNER_LIST"
    assert r.json()["matching_enabled_ratio"] == 1.0
    assert requests.post(f"{base}/c/banks", json={"name": "PARTNER_LIST"}, headers=AUTH, timeout=30).status_code == 403

    # /h/hash: HMA's hash of an upload, which threatexchange agrees with
    r = requests.post(f"{base}/h/hash", files={"photo": ("x.png", banked_bytes)}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    pdq = r.json()["pdq"]
    assert pdq_distance(pdq, pdq_from_bytes(banked_bytes)[0]) <= PEER_TOLERANCE

    # bank the signal, then look up the re-upload's hash and the re-upload itself
    r = requests.post(f"{base}/c/bank/PARTNER_LIST/signal", json={"pdq": pdq}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    content_id = r.json()["id"]
    assert r.json()["signals"] == {"pdq": pdq}
    copy_hash = pdq_from_bytes(copy)[0]
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "pdq", "signal": copy_hash,
                                                     "include_distance": "true"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    [match] = r.json()["matches"]
    assert match["bank_content_id"] == content_id and 0 < int(match["distance"]) <= 31
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "pdq", "signal": copy_hash}, headers=AUTH,
                     timeout=30)
    assert r.json() == {"matches": [content_id]}
    r = requests.get(f"{base}/m/lookup", params={"signal_type": "pdq", "signal": copy_hash}, headers=AUTH, timeout=30)
    assert list(r.json()) == ["PARTNER_LIST"] and r.json()["PARTNER_LIST"][0]["bank_content_id"] == content_id
    r = requests.post(f"{base}/m/lookup", files={"photo": ("copy.jpg", copy)}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and list(r.json()) == ["pdq"] and list(r.json()["pdq"]) == ["PARTNER_LIST"]

    # a client that limits the banks it acts on gets matches from those banks only; a parameter flagmatch
    # does not take is refused by name, never ignored
    assert requests.post(f"{base}/c/banks", json={"name": "OTHER_LIST"}, headers=AUTH, timeout=30).status_code == 201
    other_id = requests.post(f"{base}/c/bank/OTHER_LIST/signal", json={"pdq": pdq}, headers=AUTH,
                             timeout=30).json()["id"]
    q = {"signal_type": "pdq", "signal": copy_hash}
    assert requests.get(f"{base}/m/raw_lookup", params={**q, "banks": "OTHER_LIST"}, headers=AUTH,
                        timeout=30).json() == {"matches": [other_id]}
    assert requests.get(f"{base}/m/raw_lookup", params={**q, "banks": "PARTNER_LIST,NOPE"}, headers=AUTH,
                        timeout=30).json() == {"matches": [content_id]}
    assert list(requests.get(f"{base}/m/lookup", params={**q, "banks": "OTHER_LIST"}, headers=AUTH,
                             timeout=30).json()) == ["OTHER_LIST"]
    assert sorted(requests.get(f"{base}/m/lookup", params=q, headers=AUTH, timeout=30).json()) == \
        ["OTHER_LIST", "PARTNER_LIST"]
    r = requests.post(f"{base}/m/lookup", params={"banks": "PARTNER_LIST"}, files={"photo": ("copy.jpg", copy)},
                      headers=AUTH, timeout=30)
    assert list(r.json()["pdq"]) == ["PARTNER_LIST"]
    r = requests.get(f"{base}/m/raw_lookup", params={**q, "bank": "OTHER_LIST"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "bank" in r.json()["message"]
    assert requests.delete(f"{base}/c/bank/OTHER_LIST", headers=AUTH, timeout=30).json() == {"message": "Done"}

    # flagmatch's own search shows the bank match beside the embedding neighbours
    r = requests.post(f"{base}/api/v1/search", files={"image": ("copy.jpg", copy)}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    hashes = r.json()["results"][0]["hashes"]
    assert hashes["bank_matched"] and hashes["bank_matches"][0]["bank"] == "PARTNER_LIST"
    assert hashes["bank_matches"][0]["content_id"] == content_id and hashes["pdq_usable"]

    # switched off: no match from the next request on
    r = requests.put(f"{base}/c/bank/PARTNER_LIST", json={"enabled": False}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["matching_enabled_ratio"] == 0.0
    r = requests.post(f"{base}/m/lookup", files={"photo": ("copy.jpg", copy)}, headers=AUTH, timeout=30)
    assert r.json() == {"pdq": {}}
    # ... but OMM's raw lookup does not check the switch, and bypass_coinflip passes a disabled bank
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "pdq", "signal": copy_hash}, headers=AUTH,
                     timeout=30)
    assert r.json() == {"matches": [content_id]}
    r = requests.post(f"{base}/m/lookup", params={"bypass_coinflip": "true"}, files={"photo": ("copy.jpg", copy)},
                      headers=AUTH, timeout=30)
    assert list(r.json()["pdq"]) == ["PARTNER_LIST"]
    # a fractional ratio: one coin flip per request, the same answer for the same seed
    requests.put(f"{base}/c/bank/PARTNER_LIST", json={"enabled_ratio": 0.5}, headers=AUTH, timeout=30)
    seen = [bool(requests.get(f"{base}/m/lookup", params={**q, "banks": "PARTNER_LIST", "seed": str(i)},
                              headers=AUTH, timeout=30).json()) for i in range(40)]
    assert 5 < sum(seen) < 35
    assert seen[:10] == [bool(requests.get(f"{base}/m/lookup", params={**q, "banks": "PARTNER_LIST", "seed": str(i)},
                                           headers=AUTH, timeout=30).json()) for i in range(10)]
    requests.put(f"{base}/c/bank/PARTNER_LIST", json={"enabled_ratio": 1.0}, headers=AUTH, timeout=30)

    # bank a file, list the banks, remove an entry
    other = encode(photo_image(901), "JPEG", quality=90)
    r = requests.post(f"{base}/c/bank/PARTNER_LIST/content", files={"photo": ("o.jpg", other)}, headers=AUTH,
                      timeout=30)
    assert r.status_code == 200 and r.json()["signals"]["pdq"] == requests.post(
        f"{base}/h/hash", files={"photo": ("o.jpg", other)}, headers=AUTH, timeout=30).json()["pdq"]
    banks = requests.get(f"{base}/c/banks", headers=AUTH, timeout=30).json()
    assert banks == [{"name": "PARTNER_LIST", "matching_enabled_ratio": 1.0}]
    page = requests.get(f"{base}/c/bank/PARTNER_LIST/content", headers=AUTH, timeout=30).json()["entries"]
    assert len(page) == 2
    assert requests.delete(f"{base}/c/bank/PARTNER_LIST/content/{content_id}", headers=AUTH,
                           timeout=30).json() == {"deleted": 1}
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "pdq", "signal": copy_hash}, headers=AUTH,
                     timeout=30)
    assert r.json() == {"matches": []}
    assert requests.delete(f"{base}/c/bank/PARTNER_LIST", headers=AUTH, timeout=30).json() == {"message": "Done"}
    # every bank change through these routes is in the audit log, by the token's name
    events = requests.get(f"{base}/api/v1/audit", params={"target": "bank:PARTNER_LIST"}, headers=AUTH,
                          timeout=30).json()["events"]
    actions = [e["action"] for e in events]
    assert actions[:1] == ["bank_delete"] and {"bank_create", "bank_add", "bank_remove"} <= set(actions)
    assert any(e["action"] == "bank_remove" and e["detail"]["ids"] == [content_id] for e in events)
    assert any(e["action"] == "bank_update" and e["detail"].get("enabled_ratio") == 0.5 for e in events)
    assert {e["actor"] for e in events} == {"hma"}


def test_omms_health_checks(server):
    """OMM's /status (ready) and /status/live (alive), as its own tests assert them, without a token."""
    base = server
    r = requests.get(f"{base}/status", timeout=30)
    assert r.status_code == 200 and r.content == b"I-AM-ALIVE"
    r = requests.get(f"{base}/status/live", timeout=30)
    assert r.status_code == 200 and r.content == b"I-AM-ALIVE"


def test_hma_errors_are_messages_with_4xx(server):
    base = server
    r = requests.get(f"{base}/c/banks", timeout=30)
    assert r.status_code == 401 and "token" in r.json()["message"]
    r = requests.get(f"{base}/c/bank/NOPE", headers=AUTH, timeout=30)
    assert r.status_code == 404 and "NOPE" in r.json()["message"]
    # URL fetching is off until fetch_allow names something; the cloud metadata address is never fetched
    r = requests.get(f"{base}/h/hash", params={"url": "http://169.254.169.254/latest"}, headers=AUTH, timeout=30)
    assert r.status_code == 403 and "fetch_allow" in r.json()["message"]
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "pdq", "signal": "xyz"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "hexadecimal" in r.json()["message"]
    r = requests.get(f"{base}/m/raw_lookup", params={"signal_type": "tmk", "signal": "ab"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "No such SignalType" in r.json()["message"]
    # bytes that are no video are still hashed by their MD5 (HMA's video_md5); their vPDQ is empty
    r = requests.post(f"{base}/h/hash", files={"video": ("v.mp4", b"\x00" * 10)}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json() == {"video_md5": "a63c90cc3684ad8b0a2176a6a8fe9005", "vpdq": ""}
    r = requests.post(f"{base}/h/hash", files={"audio": ("a.mp3", b"\x00" * 10)}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "content_type" in r.json()["message"]
    r = requests.post(f"{base}/h/hash", files={"photo": ("x.jpg", b"not an image")}, headers=AUTH, timeout=30)
    assert r.status_code in (400, 415) and r.json()["message"]
    r = requests.post(f"{base}/c/banks", json={"name": "lower case"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "upper-case" in r.json()["message"]
    r = requests.post(f"{base}/c/banks", json={"name": "01_TEST_BANK"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "digit" in r.json()["message"]  # OMM's rule: [A-Z_][A-Z0-9_]*
    # as OMM: deleting a bank that is not there is done
    r = requests.delete(f"{base}/c/bank/NEVER_THERE", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json() == {"message": "Done"}
    # an unknown route or a wrong method under /h, /m, /c answers HMA's {"message"}
    r = requests.get(f"{base}/m/no_such_route", headers=AUTH, timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"message"}
    r = requests.post(f"{base}/c/signal_type", headers=AUTH, timeout=30)
    assert r.status_code == 405 and set(r.json()) == {"message"} and "GET" in r.headers["Allow"]
    # a body field a route does not take is refused by name too
    r = requests.post(f"{base}/c/banks", json={"name": "EXTRA", "threshold": 12}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "threshold" in r.json()["message"]
    r = requests.post(f"{base}/c/banks", json={"name": "HALF", "enabled_ratio": 1.5}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "enabled_ratio" in r.json()["message"]
    r = requests.get(f"{base}/c/signal_type", headers=AUTH, timeout=30)
    assert {t["name"] for t in r.json()} == {"pdq", "video_md5", "vpdq"}
    # writes need a token even where reads are open; a cookie session's write needs its CSRF token
    r = requests.post(f"{base}/c/banks", json={"name": "NO_TOKEN"}, timeout=30)
    assert r.status_code == 401
