from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
from PIL import Image

from tests.helpers.web import TOKEN, build_clustered_home, csrf_of, login
from tests.helpers import drawn_image, encode, private_copy


@pytest.fixture(scope="module")
def web_pristine(tmp_path_factory, tiny_model_dir, tiny_embedder, module_catalog_url):
    return build_clustered_home(tmp_path_factory.mktemp("web"), tiny_model_dir, tiny_embedder,
                                catalog_url=module_catalog_url)


@pytest.fixture
def web_settings(web_pristine, tmp_path):
    """The clustered store, copied for this test (no test sees another's flags, names or deletions)."""
    return private_copy(web_pristine, tmp_path / "home")


@pytest.fixture
def app(web_settings, tiny_embedder):
    from flagmatch.runtime import build_app
    return build_app(web_settings, embedder=tiny_embedder)


@pytest.fixture
def client(app):
    c = app.test_client()
    assert login(c).status_code == 302
    return c


def token_of(client, path="/clusters") -> str:
    return csrf_of(client.get(path).text)


def first_cluster(client) -> int:
    return int(re.search(r'data-cluster="(\d+)"', client.get("/clusters").text).group(1))


def test_pages_need_a_login(app):
    c = app.test_client()
    for path in ("/", "/clusters", "/clusters/1", "/map", "/map/data", "/images/1", "/search", "/audit"):
        r = c.get(path)
        assert r.status_code == 302 and "/login" in r.headers["Location"], path
    assert c.get("/api/v1/images/1/thumbnail").status_code == 401  # thumbnails need the session or a token
    r = c.post("/images/unflag", data={"ids": "1", "reason": "typed before the session ended"})
    assert r.status_code == 303 and "/login" in r.headers["Location"]  # nothing done; the form is kept (below)
    assert c.post("/images/unflag", data=b"ids=1", content_type="application/octet-stream").status_code == 401
    assert login(c, "wrong").status_code == 401
    page = c.get("/login")
    assert c.post("/login", data={"token": TOKEN}).status_code == 403  # login form needs its CSRF token too
    assert c.post("/login", data={"csrf": csrf_of(page.text), "token": TOKEN, "next": "//evil.example/"}
                  ).headers["Location"] == "/clusters"


def test_session_cookie_and_security_headers(app):
    c = app.test_client()
    r = login(c)
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = c.get("/clusters")
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
    assert "<script>" not in r.text and " style=" not in r.text  # nothing inline for the CSP to block
    t = c.get("/api/v1/images/1/thumbnail")
    assert t.headers["Cache-Control"] == "no-store" and t.mimetype == "image/webp"


def test_every_post_needs_the_csrf_token(client):
    cid = first_cluster(client)
    for path, data in (("/images/unflag", {"ids": "1", "reason": "x"}), ("/images/flag", {"ids": "70"}),
                       (f"/clusters/{cid}/name", {"name": "x"}), (f"/clusters/{cid}/decision", {"status": "confirmed", "reason_code": "matches_policy"}),
                       ("/images/1/reveal", {}), ("/preferences", {"blur": "off"}), ("/logout", {}),
                       ("/selection", {"ids": "1"})):
        assert client.post(path, data=data).status_code == 403, path
        assert client.post(path, data={**data, "csrf": "forged"}).status_code == 403, path


def test_clusters_page_cards_sort_and_filter(client):
    r = client.get("/clusters")
    assert r.status_code == 200
    assert len(re.findall(r'class="card cluster status-', r.text)) == 4
    assert "Unclustered" in r.text and "new" in r.text
    assert client.get("/clusters?sort=growth").status_code == 200
    assert client.get("/clusters?sort=newest&status=unreviewed").status_code == 200
    assert client.get("/clusters?sort=bogus").status_code == 400
    assert client.get("/clusters?page=2").text.count('class="card cluster status-') == 0  # 4 fit on page 1
    assert client.get("/clusters?page=x").status_code == 400
    assert client.get("/clusters?status=confirmed").text.count('class="card cluster status-') == 0


def test_cluster_page_name_confirm_and_unflag(client, app):
    cid = first_cluster(client)
    page = client.get(f"/clusters/{cid}")
    assert page.status_code == 200 and "Members" in page.text
    ids = re.findall(r'name="ids" value="(\d+)"', page.text)
    assert len(ids) >= 5
    csrf = csrf_of(page.text)
    r = client.post(f"/clusters/{cid}/name", data={"csrf": csrf, "name": "<b>beach</b> set", "label": "nudity"})
    assert r.status_code == 302
    page = client.get(f"/clusters/{cid}")
    assert "&lt;b&gt;beach&lt;/b&gt; set" in page.text and "<b>beach</b>" not in page.text  # escaped
    r = client.post(f"/clusters/{cid}/decision", data={"csrf": csrf, "status": "confirmed", "reason_code": "matches_policy"})
    assert r.status_code == 302 and "confirmed" in client.get(f"/clusters/{cid}").text
    assert client.post(f"/clusters/{cid}/decision", data={"csrf": csrf, "status": "great",
                                                          "reason_code": "matches_policy"}).status_code == 400
    assert client.post(f"/clusters/{cid}/decision", data={"csrf": csrf, "status": "confirmed"}).status_code == 400
    # unflag one member as a false positive: needs a reason, lands in the flag history and the audit log
    victim = ids[-1]
    r = client.post("/images/unflag", data={"csrf": csrf, "ids": victim, "next": f"/clusters/{cid}"})
    assert r.status_code == 400
    r = client.post("/images/unflag", data={"csrf": csrf, "ids": victim, "reason": "a beach ball",
                                            "next": f"/clusters/{cid}"})
    assert r.status_code == 302 and r.headers["Location"] == f"/clusters/{cid}"
    store = app.extensions["flagmatch"].store
    rec = store.catalog.get(int(victim))
    assert not rec.flagged and rec.history[-1].actor == "rita" and rec.history[-1].reason == "a beach ball"
    audit = client.get("/audit").text
    assert "unflag" in audit and "name_cluster" in audit and "cluster_confirmed" in audit
    assert client.post("/images/unflag", data={"csrf": csrf, "ids": "abc", "reason": "x"}).status_code == 400
    assert client.get("/clusters/99999").status_code == 404


def test_sweep_finds_unflagged_neighbours_and_flags_the_picked(client, app):
    cid = first_cluster(client)
    r = client.get(f"/clusters/{cid}/sweep?min_similarity=-1")
    assert r.status_code == 200
    found = re.findall(r'class="card image sweep-hit">.*?name="ids" value="(\d+)"', r.text, re.S)
    assert found
    store = app.extensions["flagmatch"].store
    assert not any(store.catalog.get(int(i)).flagged for i in found)
    assert client.get(f"/clusters/{cid}/sweep?min_similarity=7").status_code == 400
    r = client.post("/images/flag", data={"csrf": csrf_of(r.text), "ids": found[0], "label": "beach",
                                          "reason": "sweep", "next": f"/clusters/{cid}"})
    assert r.status_code == 302
    rec = store.catalog.get(int(found[0]))
    assert rec.flagged and rec.flag_source == "review" and rec.flag_label == "beach"


def test_reveal_is_one_image_at_a_time_and_audited(client):
    blurred = client.get("/api/v1/images/2/thumbnail").data
    assert client.get("/api/v1/images/2/thumbnail?clear=1").data == blurred  # no reveal yet: still blurred
    csrf = token_of(client)
    r = client.post("/images/2/reveal", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json["url"].endswith("/api/v1/images/2/thumbnail?clear=1")
    clear = client.get("/api/v1/images/2/thumbnail?clear=1").data
    assert clear != blurred
    a = np.asarray(Image.open(io.BytesIO(blurred)).convert("L"), np.float32)
    b = np.asarray(Image.open(io.BytesIO(clear)).convert("L"), np.float32)
    assert np.abs(np.diff(b, axis=1)).mean() > 1.5 * np.abs(np.diff(a, axis=1)).mean()  # blur removes detail
    blurred3 = client.get("/api/v1/images/3/thumbnail").data
    assert client.get("/api/v1/images/3/thumbnail?clear=1").data == blurred3  # image 3 was not revealed
    assert "reveal" in client.get("/audit").text
    client.post("/preferences", data={"csrf": csrf, "blur": "off"})
    assert client.get("/api/v1/images/3/thumbnail").data != blurred3  # blur off for the session
    assert "blur_off" in client.get("/audit").text


def test_map_data_is_compact_binary(client, app):
    r = client.get("/map/data")
    n, x0, x1, y0, y1 = struct.unpack("<I4f", r.data[:20])
    assert n == 60 and len(r.data) == 20 + 12 * n and x1 > x0 and y1 > y0
    ids = np.frombuffer(r.data[20 + 4 * n:20 + 8 * n], "<i4")
    assert sorted(ids.tolist()) == list(range(1, 61))
    page = client.get("/map")
    assert 'id="map"' in page.text and "map.js" in page.text


def test_selection_image_and_search_pages(client):
    csrf = token_of(client)
    r = client.post("/selection", data={"csrf": csrf, "ids": "1,2,3"})
    assert r.status_code == 200 and r.text.count('class="card image ') == 3
    r = client.get("/images/5")
    assert r.status_code == 200 and "Nearest flagged" in r.text and "Flag history" in r.text
    assert client.get("/images/999999").status_code == 404
    data = {"csrf": csrf, "image": (io.BytesIO(encode(drawn_image(1000), "JPEG")), "q.jpg"), "k": "5"}
    r = client.post("/search", data=data, content_type="multipart/form-data")
    assert r.status_code == 200 and r.text.count('class="card image hit ') == 5
    r = client.post("/search", data={"csrf": csrf, "image": (io.BytesIO(b"not an image"), "x.txt")},
                    content_type="multipart/form-data")
    assert r.status_code == 400 and "not an image format" in r.text


def test_search_page_marks_the_hit_that_shows_the_same_picture(client, app):
    from tests.helpers import photo_image
    store = app.extensions["flagmatch"].store
    upload = store.thumb_path(store.catalog.get(5).thumb_key).read_bytes()  # image 5, as its thumbnail
    r = client.post("/search", data={"csrf": token_of(client), "image": (io.BytesIO(upload), "q.webp"), "k": "5"},
                    content_type="multipart/form-data")
    hits = r.text.split('class="card image hit ')[1:]
    assert r.status_code == 200 and 'data-id="5"' in hits[0] and 'class="verified"' in hits[0]
    assert sum('class="verified"' in h for h in hits) == 1
    other = encode(photo_image(5), "JPEG")
    r = client.post("/search", data={"csrf": token_of(client), "image": (io.BytesIO(other), "o.jpg"), "k": "5"},
                    content_type="multipart/form-data")
    assert r.status_code == 200 and 'class="verified"' not in r.text


def test_api_accepts_the_viewer_session_with_csrf_for_writes(client):
    csrf = token_of(client)
    assert client.get("/api/v1/images/1").status_code == 200
    assert client.post("/api/v1/images/1/flag", json={"reason": "x"}).status_code == 403
    assert client.post("/api/v1/images/1/flag", json={"reason": "x"}, headers={"X-CSRF-Token": csrf}).status_code == 200


def test_delete_from_the_viewer_keeps_only_the_hash(client, app):
    store = app.extensions["flagmatch"].store
    rec = store.catalog.get(5)
    thumb = store.thumb_path(rec.thumb_key)
    page = client.get("/images/5")
    assert 'id="delete"' in page.text
    assert client.post("/images/5/delete", data={"csrf": csrf_of(page.text), "reason": ""}).status_code == 400
    r = client.post("/images/5/delete", data={"csrf": csrf_of(page.text), "reason": "legal request"})
    assert r.status_code == 302
    gone = store.catalog.get(5)
    assert gone.deleted and gone.paths == () and not thumb.exists() and gone.sha256 == rec.sha256
    assert client.get("/api/v1/images/5/thumbnail").status_code == 404
    assert "delete" in client.get("/audit").text


def _cookie(client) -> str:
    return client.get_cookie("flagmatch_session").value


def test_a_copied_session_cookie_dies_at_sign_out(app):
    c = app.test_client()
    login(c)
    stolen = _cookie(c)
    thief = app.test_client()
    thief.set_cookie("flagmatch_session", stolen)
    assert thief.get("/clusters").status_code == 200  # the cookie is the session while it lives
    c.post("/logout", data={"csrf": csrf_of(c.get("/clusters").text)})
    r = thief.get("/clusters")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert thief.get("/api/v1/images/1/thumbnail").status_code == 401


def test_sessions_end_when_their_token_is_removed(web_settings, tiny_embedder):
    from flagmatch.runtime import build_app
    first = build_app(web_settings, embedder=tiny_embedder)
    c = first.test_client()
    login(c)
    cookie = _cookie(c)
    # the same store and secret, restarted without that token (another one configured instead)
    second = build_app(web_settings.replace(api_tokens=("sam:another-token",)), embedder=tiny_embedder)
    c2 = second.test_client()
    c2.set_cookie("flagmatch_session", cookie)
    r = c2.get("/clusters")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert login(c2, "another-token").status_code == 302 and c2.get("/clusters").status_code == 200


def test_sessions_expire_idle_and_absolute(tmp_path):
    import datetime as dt
    from indexer.storage.catalog import Catalog, utcnow
    from indexer.storage.sessions import SessionStore
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    store = SessionStore(catalog.engine, idle=dt.timedelta(minutes=30), absolute=dt.timedelta(hours=8))
    now = utcnow()
    sid = store.open("rita", "fp1")
    assert store.actor(sid, {"fp1"}, now) == "rita"
    assert store.actor(sid, {"fp1"}, now + dt.timedelta(minutes=20)) == "rita"  # touched: idle restarts
    assert store.actor(sid, {"fp1"}, now + dt.timedelta(minutes=45)) == "rita"
    assert store.actor(sid, {"fp1"}, now + dt.timedelta(minutes=90)) is None    # 45 min idle
    assert store.actor(sid, {"fp1"}, now + dt.timedelta(minutes=91)) is None    # and it stays ended
    busy = store.open("sam", "fp1")
    for minutes in range(0, 8 * 60, 20):
        assert store.actor(busy, {"fp1"}, now + dt.timedelta(minutes=minutes)) == "sam"
    assert store.actor(busy, {"fp1"}, now + dt.timedelta(hours=8, minutes=1)) is None  # absolute age
    assert store.actor("not-a-session", {"fp1"}, now) is None and store.actor(None, {"fp1"}) is None
    catalog.close()


def test_audit_page_filters_and_pages(client):
    page = client.get("/audit?action=login")
    assert page.status_code == 200 and "login" in page.text and 'href="/api/v1/audit?format=csv' in page.text
    assert "no events match" in client.get("/audit?actor=nobody").text
    assert client.get("/audit?since=not-a-time").status_code == 400


def test_decision_bar_dismiss_unflags_members_and_undo_restores(client, app):
    store = app.extensions["flagmatch"].store
    cstore = app.extensions["flagmatch"].clusters
    run = cstore.current_run()
    clusters = sorted(cstore.clusters(run.id), key=lambda c: (-c.size, c.id))
    cid, other = clusters[0].id, clusters[1].id
    members = [m.image_id for m in cstore.members(run.id, cid)]
    page = client.get(f"/clusters/{cid}")
    assert 'id="decision-form"' in page.text and "sexual_activity" in page.text and "false_positive" in page.text
    csrf = csrf_of(page.text)
    r = client.post(f"/clusters/{cid}/decision", data={
        "csrf": csrf, "status": "dismissed", "reason_code": "false_positive", "note": "beach photos",
        "name": "Beach", "label": "other", "next": "1"})
    # dismissed, every member unflagged with the reason, and on to the next unreviewed cluster
    assert r.status_code == 302 and r.headers["Location"] == f"/clusters/{other}"
    recs = store.catalog.get_many(members)
    assert not any(rec.flagged for rec in recs.values())
    assert "false_positive" in store.catalog.get(members[0]).history[-1].reason
    info = cstore.cluster(run.id, cid)
    assert (info.status, info.name, info.label) == ("dismissed", "Beach", "other")
    assert client.post(f"/clusters/{cid}/decision", data={"csrf": csrf, "status": "confirmed",
                                                          "reason_code": "matches_policy", "label": "nudity!"}
                       ).status_code == 400  # labels come from the policy list
    # undo: the previous status and the flags come back; the name and label given to the unnamed cluster stay
    assert client.post(f"/clusters/{cid}/undo", data={"csrf": csrf}).status_code == 302
    info = cstore.cluster(run.id, cid)
    assert (info.status, info.name, info.label) == ("unreviewed", "Beach", "other")
    assert all(rec.flagged for rec in store.catalog.get_many(members).values())
    assert client.post(f"/clusters/{cid}/undo", data={"csrf": csrf}).status_code == 400  # nothing left to undo
    audit = client.get(f"/audit?target=cluster:{cid}").text
    assert "cluster_dismissed" in audit and "cluster_undo" in audit


def test_cluster_decisions_through_the_api_and_the_cli(app, web_settings):
    from click.testing import CliRunner
    from flagmatch.cli import main
    from tests.helpers import clean_env
    api = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cstore = app.extensions["flagmatch"].clusters
    run = cstore.current_run()
    cid = sorted(cstore.clusters(run.id), key=lambda c: (-c.size, c.id))[0].id
    r = api.post(f"/api/v1/clusters/{cid}/decision", json={"status": "confirmed", "reason_code": "matches_policy",
                                                           "label": "adult_nudity"}, headers=auth)
    assert r.status_code == 200 and r.json["cluster"]["status"] == "confirmed" and r.json["unflagged"] == []
    assert r.json["cluster"]["reviewed_by"] == "rita" and r.json["next_unreviewed"] not in (None, cid)
    for body in ({"status": "confirmed"}, {"status": "maybe", "reason_code": "other"},
                 {"status": "confirmed", "reason_code": "other", "label": "made-up"},
                 {"status": "confirmed", "reason_code": "other", "colour": "red"}):
        assert api.post(f"/api/v1/clusters/{cid}/decision", json=body, headers=auth).status_code == 400, body
    assert api.post("/api/v1/clusters/99999/decision", json={"status": "confirmed", "reason_code": "other"},
                    headers=auth).status_code == 404
    assert api.post(f"/api/v1/clusters/{cid}/undo", headers=auth).json["cluster"]["status"] == "unreviewed"
    # the CLI: the same action on the same store
    env = clean_env()
    r = CliRunner().invoke(main, ["decide", str(cid), "--status", "dismissed", "--reason-code", "false_positive",
                                  "--note", "fine", "--home", web_settings.home], env=env)
    assert r.exit_code == 0 and "dismissed" in r.output and "unflagged" in r.output
    r = CliRunner().invoke(main, ["undo", str(cid), "--home", web_settings.home], env=env)
    assert r.exit_code == 0 and "unreviewed" in r.output


def test_tiles_say_what_they_show_and_repeats_record_nothing(client, app):
    cid = first_cluster(client)
    page = client.get(f"/clusters/{cid}")
    assert "P(unsafe)" in page.text and "membership" in page.text and "flagged · " in page.text
    audit = app.extensions["flagmatch"].audit
    before = len(audit.events(1000))
    client.get(f"/clusters/{cid}/sweep?min_similarity=0.5")
    client.get(f"/clusters/{cid}/sweep?min_similarity=0.5")
    assert len(audit.events(1000)) == before  # loading the sweep page is a read
    csrf = csrf_of(page.text)
    ids = re.findall(r'name="ids" value="(\d+)"', page.text)[:1]
    for _ in range(2):  # a double submit
        r = client.post("/images/unflag", data={"csrf": csrf, "ids": ids, "reason": "fp", "next": f"/clusters/{cid}"})
    assert r.status_code == 302
    assert audit.events(1)[0].action == "unflag"
    assert len(audit.events(1000)) == before + 1  # one decision, one row
    assert "not flagged" in client.get(f"/clusters/{cid}").text  # the decision shows on its tile


def test_sweep_suggests_a_threshold_and_shows_the_distribution(client):
    cid = first_cluster(client)
    page = client.get(f"/clusters/{cid}/sweep")
    assert page.status_code == 200 and 'id="suggested"' in page.text and "table class=\"histogram\"" in page.text
    suggested = float(re.search(r'id="suggested">([-0-9.]+)<', page.text).group(1))
    assert -1.0 <= suggested <= 1.0
    assert f'value="{suggested:.2f}"' in page.text  # the sweep ran at the suggested threshold
    counts = [int(n) for n in re.findall(r'class="bar"[^>]* data-n="(\d+)"', page.text)]
    wide = client.get(f"/clusters/{cid}/sweep?min_similarity=-1").text
    assert sum(counts) == len(re.findall(r'class="card image sweep-hit"', wide))  # every candidate is in a bar


def test_bank_matches_show_on_the_search_and_image_pages_and_banks_switch(client, app):
    from indexer.hashbanks.banks import Banks, NewEntry
    from indexer.media.hashes import pdq_of
    from tests.helpers import photo_image
    store = app.extensions["flagmatch"].store
    banks = Banks(store.catalog)
    target = photo_image(77)
    banks.create("NCMEC_TEST", source="test list")
    banks.add("NCMEC_TEST", [NewEntry("pdq", pdq_of(np.asarray(target)).hash, external_id="case-9")])
    sig = store.catalog.signals([5])[5]
    banks.create("BENIGN", role="negative")
    banks.add("BENIGN", [NewEntry("md5", sig.md5)])
    csrf = token_of(client)
    upload = encode(target.resize((480, 360)), "JPEG", quality=50)
    r = client.post("/search", data={"csrf": csrf, "image": (io.BytesIO(upload), "q.jpg"), "k": "3"},
                    content_type="multipart/form-data")
    assert r.status_code == 200 and "Bank match" in r.text and "NCMEC_TEST" in r.text and "case-9" in r.text
    page = client.get("/images/5").text
    assert "Hash evidence" in page and sig.pdq.hash in page and "known benign" in page
    r = client.get("/banks")
    assert r.status_code == 200 and "NCMEC_TEST" in r.text and "test list" in r.text
    r = client.post("/banks/NCMEC_TEST/switch", data={"csrf": csrf, "enabled": "0"})
    assert r.status_code == 302 and not banks.get("NCMEC_TEST").enabled
    assert client.post("/banks/NCMEC_TEST/switch", data={"enabled": "1"}).status_code == 403  # CSRF
    r = client.post("/search", data={"csrf": csrf, "image": (io.BytesIO(upload), "q.jpg"), "k": "3"},
                    content_type="multipart/form-data")
    assert "No bank matched" in r.text
    events = app.extensions["flagmatch"].audit.events(5, "bank:NCMEC_TEST")
    assert [(e.action, e.actor) for e in events][:1] == [("bank_update", "rita")]


def test_a_request_id_makes_a_repeated_or_racing_form_one_action(client, app):
    csrf = token_of(client)
    rt = app.extensions["flagmatch"]
    form = {"csrf": csrf, "ids": "3", "reason": "fp", "request_id": "req-1", "next": "/clusters"}
    r1 = client.post("/images/unflag", data=form)
    r2 = client.post("/images/unflag", data=form)
    assert r1.status_code == 302 and r2.status_code == 302
    assert "already done" in client.get("/clusters").text
    assert len([e for e in rt.audit.events(50, "image:3") if e.action == "unflag"]) == 1
    # a failed action releases its id: the corrected form goes through
    bad = {"csrf": csrf, "ids": "", "reason": "fp", "request_id": "req-2"}
    assert client.post("/images/flag", data=bad, headers={"Referer": "http://localhost/clusters"}).status_code == 303
    assert client.post("/images/flag", data={**bad, "ids": "3"}).status_code == 302
    assert rt.store.catalog.get(3).flagged
    # the API: Idempotency-Key, a repeat is 409 and nothing happens twice
    h = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "api-7"}
    assert client.post("/api/v1/images/4/unflag", json={"reason": "fp"}, headers=h).status_code == 200
    r = client.post("/api/v1/images/4/unflag", json={"reason": "fp"}, headers=h)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "duplicate_request"


def test_a_form_sent_after_the_session_ended_is_kept_through_sign_in(app):
    from tests.helpers.web import login
    c = app.test_client()
    assert login(c).status_code == 302
    page = c.get("/clusters/1")
    csrf = csrf_of(page.text)
    app.extensions["flagmatch"].sessions.end(None, "test")  # nothing: then end it for real
    with c.session_transaction() as s:
        sid = s["sid"]
    app.extensions["flagmatch"].sessions.end(sid, "idle")
    r = c.post("/images/unflag", data={"csrf": csrf, "ids": "1,2", "reason": "typed with care", "next": "/clusters/1"},
               headers={"Referer": "http://localhost/clusters/1?page=1"})
    assert r.status_code == 303 and "/login" in r.headers["Location"] and "next=" in r.headers["Location"]
    assert app.extensions["flagmatch"].store.catalog.get(1).flagged  # nothing was done
    page = c.get("/login")
    r = c.post("/login", data={"csrf": csrf_of(page.text), "token": TOKEN, "next": "/clusters/1?page=1"})
    assert r.status_code == 302 and r.headers["Location"] == "/clusters/1?page=1"
    back = c.get("/clusters/1?page=1").text
    assert 'id="pending-form"' in back and "typed with care" in back and "1,2" in back
    assert 'id="pending-form"' not in c.get("/clusters/1").text  # filled in once


def test_members_sort_select_all_and_form_errors_return_to_the_page(client, app):
    cid = first_cluster(client)
    rt = app.extensions["flagmatch"]
    ids = client.get(f"/clusters/{cid}/ids").get_json()["ids"]
    run = rt.clusters.current_run()
    assert sorted(ids) == sorted(m.image_id for m in rt.clusters.members(run.id, cid))
    page = client.get(f"/clusters/{cid}?sort=p_unsafe").text
    shown = [int(x) for x in re.findall(r'class="card image [^"]*" data-id="(\d+)"', page)]
    p = rt.store.catalog.get_many(shown)
    assert [p[i].p_unsafe for i in shown] == sorted((p[i].p_unsafe for i in shown), reverse=True)
    assert client.get(f"/clusters/{cid}?sort=bogus").status_code == 400
    # a form that fails (nothing selected) goes back to its page with the message
    r = client.post("/images/unflag", data={"csrf": token_of(client), "reason": "x"},
                    headers={"Referer": f"http://localhost/clusters/{cid}"})
    assert r.status_code == 303 and r.headers["Location"] == f"/clusters/{cid}"
    assert "select at least one image" in client.get(f"/clusters/{cid}").text
    # in-place requests get JSON
    r = client.post("/images/unflag", data={"csrf": token_of(client), "ids": str(ids[0]), "reason": "x"},
                    headers={"X-Requested-With": "fetch"})
    assert r.status_code == 200 and r.get_json()["changed"] == [ids[0]] and r.get_json()["flagged"] is False
    r = client.post("/images/unflag", data={"csrf": token_of(client), "reason": "x"}, headers={"X-Requested-With": "fetch"})
    assert r.status_code == 400 and "select at least one" in r.get_json()["error"]["message"]
    assert client.get("/selection").status_code == 200  # where Back and the blur toggle land
    r = client.post("/preferences", data={"csrf": token_of(client), "grey": "on"}, headers={"X-Requested-With": "fetch"})
    assert r.get_json() == {"blur": True, "grey": True, "blur_strength": "strong"}


def test_blur_strength_and_the_larger_audited_view(client, app):
    csrf = token_of(client)
    strong = client.get("/api/v1/images/5/thumbnail").data
    r = client.post("/preferences", data={"csrf": csrf, "blur_strength": "light"}, headers={"X-Requested-With": "fetch"})
    assert r.get_json()["blur_strength"] == "light"
    light = client.get("/api/v1/images/5/thumbnail").data
    assert light != strong
    with Image.open(io.BytesIO(light)) as a, Image.open(io.BytesIO(strong)) as b:
        # a lighter blur keeps more detail: more variation between neighbouring pixels
        da = np.abs(np.diff(np.asarray(a.convert("L"), np.int16), axis=1)).mean()
        db = np.abs(np.diff(np.asarray(b.convert("L"), np.int16), axis=1)).mean()
    assert da > db
    assert client.post("/preferences", data={"csrf": csrf, "blur_strength": "nuclear"}).status_code in (303, 400)
    r = client.get("/images/5/large")
    assert r.status_code == 200 and r.mimetype == "image/webp"
    with Image.open(io.BytesIO(r.data)) as im:
        assert max(im.size) > 256
    events = app.extensions["flagmatch"].audit.events(5, "image:5")
    assert events[0].action == "view_large" and events[0].detail["blurred"] is True
    assert "View larger" in client.get("/images/5").text
