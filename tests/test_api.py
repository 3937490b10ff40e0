from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from flagmatch.settings import Settings
from indexer.storage.catalog import FlagRequest
from tests.helpers import private_copy, drawn_image, encode, write_images

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_pristine(tmp_path_factory, tiny_model_dir, tiny_embedder, module_catalog_url) -> tuple[Settings, list[Path]]:
    from flagmatch.wiring import ingest_into, open_index, open_store
    from indexer.ingest.sources import iter_sources

    root = tmp_path_factory.mktemp("api")
    files = write_images(root / "in", 16)
    s = Settings.load({"home": str(root / "home"), "model": str(tiny_model_dir), "api_tokens": f"alice:{TOKEN}",
                       "max_upload_bytes": 2_000_000, "max_pixels": 4_000_000,
                       "catalog_url": module_catalog_url}, environ={})
    store = open_store(s)
    ingest_into(s, iter_sources([str(root / "in")]), store=store, embedder=tiny_embedder)
    store.catalog.set_flag([1, 2, 3, 4, 5, 6], FlagRequest("import", "spam", "setup"), flag=True)
    open_index(store, s).save()
    store.close()
    return s, files


@pytest.fixture
def api_home(api_pristine, tmp_path) -> tuple[Settings, list[Path]]:
    """The API store, copied for this test: what one test flags or deletes, the next does not see."""
    return private_copy(api_pristine[0], tmp_path / "home"), api_pristine[1]


@pytest.fixture
def app(api_home, tiny_embedder):
    from flagmatch.runtime import build_app
    return build_app(api_home[0], embedder=tiny_embedder)


@pytest.fixture
def client(app):
    return app.test_client()


def upload(client, *datas: bytes, headers=AUTH, **fields):
    data = {"image": [(io.BytesIO(d), f"q{i}.jpg") for i, d in enumerate(datas)], **fields}
    return client.post("/api/v1/search", data=data, headers=headers, content_type="multipart/form-data")


def test_health_and_readiness(client, api_home, tiny_embedder):
    from flagmatch.runtime import build_app
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    cold = build_app(api_home[0], embedder=tiny_embedder, load="none").test_client()
    assert cold.get("/healthz").status_code == 200
    r = cold.get("/readyz")
    assert r.status_code == 503 and r.json["status"] == "loading"
    r = cold.post("/api/v1/search", json={"id": 1}, headers=AUTH)
    assert r.status_code == 503 and r.json["error"]["code"] == "not_ready"
    # OMM's checks: not ready while loading, alive all along
    assert (cold.get("/status").status_code, cold.get("/status").data) == (503, b"INDEX-NOT-LOADED")
    assert (cold.get("/status/live").status_code, cold.get("/status/live").data) == (200, b"I-AM-ALIVE")
    assert client.get("/status").data == b"I-AM-ALIVE"


def test_every_part_reports_its_health_against_its_threshold(client, api_home, tiny_embedder, tmp_path):
    """/readyz and /status (JSON when asked for) report catalog, model, index and its lag, space, disk and
    replica; a threshold crossed degrades (low disk) or makes OMM's /status answer INDEX-STALE (an index
    behind the catalog), until a search catches the index up."""
    from flagmatch.runtime import build_app
    from flagmatch.wiring import ingest_into, open_store
    from indexer.ingest.sources import iter_sources
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json["status"] == "ready"
    checks = r.json["checks"]
    assert all(c["ok"] for c in checks.values()) and set(checks) == {"catalog", "model", "index", "index_lag", "space",
                                                                     "disk", "replica"}
    assert checks["catalog"]["images"] == 16 and checks["model"]["model_id"].startswith("tiny-nsfw@")
    assert checks["index"]["scopes"]["all"]["covers_image_id"] == 16 and checks["disk"]["free_gb"] > 0
    low = build_app(api_home[0].replace(health_min_free_gb=1e9), embedder=tiny_embedder).test_client()
    r = low.get("/readyz")
    assert r.status_code == 200 and r.json["status"] == "degraded" and not r.json["checks"]["disk"]["ok"]
    assert low.get("/status").data == b"I-AM-ALIVE"  # low disk still serves
    r = low.get("/status", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json["status"] == "degraded"

    strict = build_app(api_home[0].replace(health_max_index_lag=0.0), embedder=tiny_embedder).test_client()
    assert strict.get("/status").data == b"I-AM-ALIVE"
    write_images(tmp_path / "more", 1, start=500)
    store = open_store(api_home[0])
    ingest_into(api_home[0], iter_sources([str(tmp_path / "more")]), store=store, embedder=tiny_embedder)
    store.close()
    r = strict.get("/status")
    assert (r.status_code, r.data) == (503, b"INDEX-STALE")
    r = strict.get("/status", headers={"Accept": "application/json"})
    assert r.status_code == 503 and r.json["checks"]["index_lag"]["scopes"]["all"]["images"] == 1
    deadline = time.monotonic() + 30  # the server catches its indexes up in the background (index_refresh)
    while strict.get("/status").data != b"I-AM-ALIVE" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert strict.get("/status").data == b"I-AM-ALIVE"


def test_search_by_upload_returns_flagged_neighbours(client, api_home):
    files = api_home[1]
    r = upload(client, files[2].read_bytes())
    assert r.status_code == 200, r.json
    body = r.json
    assert body["scope"] == "flagged" and body["model_id"].startswith("tiny-nsfw@")
    assert set(body["index_checkpoint"]) == {"image_id", "flag_event_id", "generation"}
    (res,) = body["results"]
    assert res["query"]["known"] is True and res["query"]["known_id"] == 3
    assert 0 <= res["query"]["p_unsafe"] <= 1
    hits = res["hits"]
    assert hits[0]["id"] == 3 and hits[0]["similarity"] > 0.999  # the same bytes come first
    assert {h["id"] for h in hits} <= {1, 2, 3, 4, 5, 6}
    h = hits[0]
    assert h["flag"]["source"] == "import" and h["flag"]["label"] == "spam" and h["flag"]["at"]
    assert h["thumbnail_url"] == "/api/v1/images/3/thumbnail" and h["paths"] == [str(files[2])]
    assert "cluster" in h
    assert "decode;dur=" in r.headers["Server-Timing"]
    # a new image (not in the catalog), several at once
    r = upload(client, encode(drawn_image(999), "PNG"), files[10].read_bytes(), k="3")
    assert r.status_code == 200
    a, b = r.json["results"]
    assert a["query"]["known"] is False and len(a["hits"]) == 3
    assert b["query"]["known_id"] == 11 and 11 not in [x["id"] for x in b["hits"]]  # 11 is not flagged


def test_search_by_id_sha_scope_and_min_similarity(client, api_home):
    r = client.post("/api/v1/search", json={"id": 9, "scope": "all", "k": 5}, headers=AUTH)
    assert r.status_code == 200
    hits = r.json["results"][0]["hits"]
    assert len(hits) == 5 and 9 not in [h["id"] for h in hits]  # not its own neighbour
    assert any(not h["flagged"] for h in hits)
    sha = hashlib.sha256(api_home[1][0].read_bytes()).hexdigest()
    r = client.post("/api/v1/search", json={"sha256": sha}, headers=AUTH)
    assert r.status_code == 200 and r.json["results"][0]["query"]["known_id"] == 1
    r = client.post("/api/v1/search", json={"ids": [1, 2], "min_similarity": 0.9999}, headers=AUTH)
    assert r.status_code == 200 and all(h["similarity"] >= 0.9999 for q in r.json["results"] for h in q["hits"])


@pytest.mark.parametrize("kwargs,status,code", [
    (dict(json={"id": 10**9}), 404, "not_found"),
    (dict(json={"id": "1"}), 400, "bad_parameter"),
    (dict(json={"id": 1, "k": 0}), 400, "bad_parameter"),
    (dict(json={"id": 1, "k": "ten"}), 400, "bad_parameter"),
    (dict(json={"id": 1, "scope": "everything"}), 400, "bad_parameter"),
    (dict(json={"id": 1, "min_similarity": 5}), 400, "bad_parameter"),
    (dict(json={"sha256": "abc"}), 400, "bad_parameter"),
    (dict(json={"sha256": "0" * 64}), 404, "not_found"),
    (dict(json={}), 400, "missing_query"),
    (dict(json=[1, 2]), 400, "bad_body"),
    (dict(data="{not json", content_type="application/json"), 400, "bad_body"),
    (dict(data="hello", content_type="text/plain"), 415, "unsupported_media_type"),
])
def test_bad_search_requests_are_4xx(client, kwargs, status, code):
    r = client.post("/api/v1/search", headers=AUTH, **kwargs)
    assert r.status_code == status and r.json["error"]["code"] == code, r.json
    assert r.json["error"]["message"]


def test_bad_uploads_are_4xx(client):
    r = client.post("/api/v1/search", data={"k": "3"}, headers=AUTH, content_type="multipart/form-data")
    assert r.status_code == 400 and r.json["error"]["code"] == "missing_image"
    r = upload(client, b"")
    assert r.status_code == 400 and r.json["error"]["code"] == "empty_image"
    r = upload(client, b"%PDF-1.4 not an image at all")
    assert r.status_code == 415 and r.json["error"]["code"] == "unsupported_format"
    big = encode(Image.new("1", (3000, 3000)), "GIF")  # 9 Mpx over a 4 Mpx cap, few bytes, decoded whole
    r = upload(client, big)
    assert r.status_code == 413 and r.json["error"]["code"] == "too_large"
    jpeg = encode(drawn_image(5), "JPEG")
    r = upload(client, jpeg[: len(jpeg) // 2])
    assert r.status_code == 400 and r.json["error"]["code"] == "truncated"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n"
            + b"\xff\xd8\xff" + b"\0" * 2_100_000 + b"\r\n--XyZ--\r\n")
    r = client.post("/api/v1/search", data=body, headers=AUTH, content_type="multipart/form-data; boundary=XyZ")
    assert r.status_code == 413 and r.json["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer t\u00f6ken"}, {"Authorization": "Bearer "}])
def test_auth_refusals_are_401(client, headers):
    for method, url in (("get", "/api/v1/images/1"), ("get", "/api/v1/stats"), ("post", "/api/v1/images/1/flag")):
        r = getattr(client, method)(url, headers=headers)
        assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_open_reads_still_need_a_token_for_writes(api_home, tiny_embedder):
    from flagmatch.runtime import build_app
    c = build_app(api_home[0].replace(open_reads=True), embedder=tiny_embedder).test_client()
    assert c.get("/api/v1/images/1").status_code == 200
    assert c.post("/api/v1/search", json={"id": 1}).status_code == 200
    assert c.post("/api/v1/images/1/unflag", json={"reason": "x"}).status_code == 401


def test_flag_unflag_are_recorded_and_visible_at_once(client):
    r = client.post("/api/v1/search", json={"id": 12, "k": 20}, headers=AUTH)
    assert 13 not in [h["id"] for h in r.json["results"][0]["hits"]]
    r = client.post("/api/v1/images/13/flag", json={"reason": "reported twice", "label": "nudity"}, headers=AUTH)
    assert r.status_code == 200 and r.json["changed"] is True
    hist = r.json["image"]["history"]
    assert hist[-1] == {**hist[-1], "action": "flag", "actor": "alice", "reason": "reported twice", "label": "nudity"}
    r = client.post("/api/v1/search", json={"id": 12, "k": 20}, headers=AUTH)
    assert 13 in [h["id"] for h in r.json["results"][0]["hits"]]
    r = client.post("/api/v1/images/13/unflag", json={"reason": "false positive"}, headers=AUTH)
    assert r.json["image"]["flagged"] is False and len(r.json["image"]["history"]) == len(hist) + 1
    r = client.post("/api/v1/search", json={"id": 12, "k": 20}, headers=AUTH)
    assert 13 not in [h["id"] for h in r.json["results"][0]["hits"]]
    for body in ({"reason": 5}, {"colour": "red"}, ["x"]):
        r = client.post("/api/v1/images/13/flag", json=body, headers=AUTH)
        assert r.status_code == 400, body
    assert client.post("/api/v1/images/999999/flag", json={}, headers=AUTH).status_code == 404


def test_image_thumbnail_and_stats(client):
    r = client.get("/api/v1/images/2", headers=AUTH)
    assert r.status_code == 200 and r.json["id"] == 2 and r.json["history"][0]["actor"] == "setup"
    assert client.get("/api/v1/images/0", headers=AUTH).status_code == 404
    assert client.get("/api/v1/images/abc", headers=AUTH).status_code == 404
    r = client.get("/api/v1/images/2/thumbnail", headers=AUTH)
    assert r.status_code == 200 and r.mimetype == "image/webp"
    assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert Image.open(io.BytesIO(r.data)).format == "WEBP"
    # a token client gets the stored thumbnail as it is (the viewer's blur is for moderators' sessions)
    rt = client.application.extensions["flagmatch"]
    assert r.data == rt.store.thumb_path(rt.store.catalog.get(2).thumb_key).read_bytes()
    r = client.get("/api/v1/stats", headers=AUTH)
    assert r.json["images"] == 16 and r.json["index"]["all"]["vectors"] == 16
    assert r.json["model"]["precision"] in ("fp32", "bf16")
    assert client.delete("/api/v1/stats", headers=AUTH).status_code == 405


def test_openapi_is_valid_and_lists_every_route(client, app):
    from openapi_spec_validator import validate
    doc = client.get("/api/v1/openapi.json").json
    validate(doc)
    documented = {(path, m.upper()) for path, ops in doc["paths"].items() for m in ops}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            path = re.sub(r"<int:(\w+)>", r"{\1}", rule.rule[len("/api/v1"):])
            for m in rule.methods - {"HEAD", "OPTIONS"}:
                assert (path, m) in documented, (path, m)


# ------------------------------------------------------------------ the contract at the edges

def test_every_api_error_is_json(client):
    r = client.get("/api/v1/nope", headers=AUTH)
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    r = client.delete("/api/v1/search", headers=AUTH)
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed" and "POST" in r.headers["Allow"]
    big = 926127556924935587249915713103593472
    for path in (f"/api/v1/images/{big}", f"/api/v1/images/{2**63}/thumbnail"):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 404 and r.is_json, path
    r = client.post(f"/api/v1/images/{big}/flag", headers=AUTH, json={})
    assert r.status_code == 404 and r.is_json
    r = client.post("/api/v1/images/1/flag", headers=AUTH, data=b"x", content_type="text/plain")
    assert r.status_code == 415 and r.is_json
    r = client.post("/api/v1/images/1/flag", headers=AUTH, json={"label": 3})
    assert r.status_code == 400 and r.json["error"]["code"] == "bad_parameter"
    r = client.post("/api/v1/search", headers=AUTH, json={"id": 1, "k": 5.5})
    assert r.status_code == 400
    r = client.post("/api/v1/search", headers=AUTH, json={"id": 1, "sha256": {}})
    assert r.status_code == 400
    assert client.get("/nope").status_code == 404 and not client.get("/nope").is_json  # the viewer's own pages


def test_request_ids_and_crashes_answer_json_without_a_stack(api_home, tiny_embedder):
    from flagmatch.runtime import build_app
    app = build_app(api_home[0], embedder=tiny_embedder)

    @app.get("/api/v1/_crash")
    def _crash():  # a route that fails the way a bug would
        raise RuntimeError("secret internals")

    c = app.test_client()
    r = c.get("/api/v1/_crash", headers={**AUTH, "X-Request-Id": "req-42"})
    assert r.status_code == 500 and r.json["error"] == {
        "code": "internal", "message": r.json["error"]["message"], "request_id": "req-42"}
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.headers["X-Request-Id"] == "req-42"
    r = c.get("/api/v1/stats", headers={**AUTH, "X-Request-Id": "bad id with spaces"})
    assert len(r.headers["X-Request-Id"]) == 32  # not echoed: a fresh one


def test_hostile_uploads_get_a_result_or_a_coded_error(client, tmp_path):
    from tests.helpers.hostile import HOSTILE
    for name in ("tall_strip.png", "wide_strip.png", "long_banner.png", "huge_icc.png", "huge_exif.jpg", "deep.tiff"):
        r = upload(client, HOSTILE[name]())
        assert r.status_code == 200, (name, r.json)
    r = upload(client, HOSTILE["pixel_flood.png"]())  # 900 Mpx, over the test store's 4 Mpx cap
    assert r.status_code == 413 and r.json["error"]["code"] == "too_large"


def test_admission_budget_answers_503_with_retry_after(api_home, tiny_embedder):
    from flagmatch.runtime import build_app
    s = api_home[0].replace(admission_bytes=1 << 20, admission_wait=0.1)
    app = build_app(s, embedder=tiny_embedder)
    adm = app.extensions["flagmatch"].service.admission
    with adm.reserve(1 << 20):  # another request is decoding a large image
        r = upload(app.test_client(), encode(drawn_image(3), "PNG"))
    assert r.status_code == 503 and r.json["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    assert upload(app.test_client(), encode(drawn_image(3), "PNG")).status_code == 200


def test_rate_limit_answers_429_json_per_token(api_home, tiny_embedder):
    from flagmatch.runtime import build_app
    s = api_home[0].replace(rate_limit="3/minute", api_tokens=(f"alice:{TOKEN}", "bob:other-token"))
    c = build_app(s, embedder=tiny_embedder).test_client()
    codes = [c.get("/api/v1/stats", headers=AUTH).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = c.get("/api/v1/stats", headers=AUTH)
    assert r.json["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert c.get("/api/v1/stats", headers={"Authorization": "Bearer other-token"}).status_code == 200
    assert c.get("/healthz").status_code == 200


def test_sweep_and_delete_through_the_api(api_home, tiny_embedder, tmp_path):
    import shutil
    from flagmatch.runtime import build_app
    s = api_home[0]
    home = tmp_path / "copy"
    shutil.copytree(s.home_path, home)  # this test deletes: work on a copy of the shared store
    c = build_app(s.replace(home=str(home)), embedder=tiny_embedder).test_client()
    r = c.post("/api/v1/sweep", headers=AUTH, json={"ids": [1, 2], "min_similarity": -1})
    assert r.status_code == 200, r.json
    found = {h["id"] for h in r.json["hits"]}
    assert found and not found & {1, 2, 3, 4, 5, 6}  # only unflagged images come back
    assert all(h["seed"] in (1, 2) for h in r.json["hits"])
    assert c.post("/api/v1/sweep", headers=AUTH, json={"ids": []}).status_code == 400
    # without a threshold, the one the seeds suggest (as alike as they are to each other)
    rt = c.application.extensions["flagmatch"]
    r = c.post("/api/v1/sweep", headers=AUTH, json={"ids": [1, 2, 3]})
    assert r.status_code == 200 and r.json["min_similarity"] == rt.service.suggest_sweep_threshold([1, 2, 3])
    assert all(h["similarity"] >= r.json["min_similarity"] for h in r.json["hits"])
    assert c.post("/api/v1/sweep", headers=AUTH, json={"ids": [1, 999999]}).status_code == 404
    r = c.post("/api/v1/images/1/unflag", headers=AUTH, json={})
    assert r.status_code == 400 and r.json["error"]["code"] == "reason_required"
    victim = sorted(found)[0]
    r = c.delete(f"/api/v1/images/{victim}", headers=AUTH, json={})
    assert r.status_code == 400 and r.json["error"]["code"] == "reason_required"
    r = c.delete(f"/api/v1/images/{victim}", headers=AUTH, json={"reason": "court order"})
    assert r.status_code == 200 and r.json == {"deleted": [victim]}
    assert c.get(f"/api/v1/images/{victim}/thumbnail", headers=AUTH).status_code == 404
    r = c.post("/api/v1/sweep", headers=AUTH, json={"ids": [1, 2], "min_similarity": -1})
    assert victim not in {h["id"] for h in r.json["hits"]}
    r = c.post("/api/v1/search", headers=AUTH, json={"id": 1, "scope": "all", "k": 50})
    assert victim not in {h["id"] for h in r.json["results"][0]["hits"]}


def test_audit_log_filtered_paged_and_exported(client):
    for i in (1, 2, 3):
        assert client.post(f"/api/v1/images/{i}/unflag", json={"reason": f"fp {i}"}, headers=AUTH).status_code == 200
    r = client.get("/api/v1/audit?action=unflag&limit=2", headers=AUTH)
    assert r.status_code == 200 and [e["target"] for e in r.json["events"]] == ["image:3", "image:2"]
    assert r.json["events"][0]["actor"] == "alice" and r.json["events"][0]["detail"]["reason"] == "fp 3"
    older = client.get(f"/api/v1/audit?action=unflag&limit=2&before_id={r.json['next_before_id']}", headers=AUTH)
    assert [e["target"] for e in older.json["events"]] == ["image:1"] and older.json["next_before_id"] is None
    csv_resp = client.get("/api/v1/audit?target=image:*&format=csv", headers=AUTH)
    assert csv_resp.mimetype == "text/csv" and csv_resp.text.count("\n") == 4
    for bad in ("since=yesterday", "until=", "limit=0", "limit=", "before_id=%C2%B2", "format=xml", "format=",
                "colour=red"):
        resp = client.get(f"/api/v1/audit?{bad}", headers=AUTH)
        assert resp.status_code == 400 and resp.json["error"]["code"] == "bad_parameter", bad
    assert client.get("/api/v1/audit").status_code == 401


def test_metrics_are_prometheus_text_counted_by_route_and_token_protected(api_home, tiny_embedder):
    """``GET /metrics`` read by prometheus-client's own parser of the text format: requests by route (the URL
    rule, never the raw path), method and status; a search's stages; the index's vectors and generation;
    behind the API token, or open to loopback with ``metrics_open``."""
    from prometheus_client.parser import text_string_to_metric_families
    from flagmatch.runtime import build_app
    client = build_app(api_home[0], embedder=tiny_embedder).test_client()
    assert upload(client, encode(drawn_image(1), "PNG")).status_code == 200
    assert client.get("/api/v1/images/1", headers=AUTH).status_code == 200
    assert client.get("/api/v1/images/987654", headers=AUTH).status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    seen = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
            for s in families["flagmatch_http_requests"].samples if s.name.endswith("_total")}
    assert seen[("/api/v1/search", "POST", "200")] == 1
    assert seen[("/api/v1/images/<int:image_id>", "GET", "200")] == 1
    assert seen[("/api/v1/images/<int:image_id>", "GET", "404")] == 1
    assert seen[("unmatched", "GET", "404")] == 1 and seen[("/metrics", "GET", "401")] == 1
    stages = {s.labels["stage"]: s.value for s in families["flagmatch_search_stage_seconds"].samples
              if s.name.endswith("_count")}
    assert stages["decode"] == stages["embed"] == stages["handler"] == 1
    vectors = {s.labels["scope"]: s.value for s in families["flagmatch_index_vectors"].samples}
    assert vectors["all"] == len(api_home[1]) and families["flagmatch_ready"].samples[0].value == 1
    lag = {s.labels["scope"]: s.value for s in families["flagmatch_index_lag_images"].samples}
    assert lag == {"all": 0, "flagged": 0} and families["flagmatch_viewer_sessions"].samples[0].value == 0
    opened = build_app(api_home[0].replace(metrics_open=True), embedder=tiny_embedder).test_client()
    assert opened.get("/metrics").status_code == 200  # the test client is on loopback
    assert opened.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 401
