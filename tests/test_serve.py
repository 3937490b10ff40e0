"""A real `flagmatch serve` (gunicorn) on a loopback port, answering real HTTP requests."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import child_env, drawn_image, encode, start_server, stop_server, thread_stats, write_images

TOKEN = "serve-token"


def multipart(data: bytes, name: str = "q.jpg") -> tuple[bytes, str]:
    boundary = "fmBoundary7MA4YWxk"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
            token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if ctype:
        headers["Content-Type"] = ctype
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw and r.getheader("Content-Type", "").startswith("application/json") else {})
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve")
    files = write_images(root / "in", 24)
    env = child_env(FLAGMATCH_HOME=str(root / "home"), FLAGMATCH_MODEL=str(tiny_model_dir),
               FLAGMATCH_API_TOKENS=f"ops:{TOKEN}", FLAGMATCH_WORKERS="2",
               FLAGMATCH_THREADS="4", FLAGMATCH_MAX_UPLOAD_BYTES="1000000", FLAGMATCH_PRECISION="fp32",
               FLAGMATCH_FLAG_THRESHOLD="0.0", FLAGMATCH_LOG_FORMAT="json")
    cli = [sys.executable, "-m", "flagmatch.cli"]
    subprocess.run(cli + ["ingest", str(root / "in")], env=env, check=True, capture_output=True, timeout=300)
    proc, base, log = start_server(env, root / "server.log")
    port = int(base.rsplit(":", 1)[1])
    env["FLAGMATCH_PORT"] = str(port)
    yield port, files, env, cli
    stop_server(proc, log)


@pytest.fixture(scope="module")
def served_log(served, tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "serve0" / "server.log"


def _families(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                                       headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def _scrape(port: int) -> dict[tuple[str, str, str], float]:
    return {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
            for s in _families(port)["flagmatch_http_requests"].samples if s.name == "flagmatch_http_requests_total"}


def test_two_workers_metrics_sum_and_json_logs_hold_no_secret(served, served_log):
    """Under concurrent load on two workers, /metrics (whichever worker answers) counts exactly the requests
    sent, summed over both; every line the server wrote is one JSON object; a request's id is the same in its
    error answer, its audit row and its log line; no token, session cookie or image byte is in any line."""
    import requests
    port, files, _, _ = served
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    marker = "PIXELS-NEVER-LOGGED-7f3a"
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", marker)
    upload = encode(drawn_image(901), "PNG", pnginfo=info)
    before = _scrape(port)

    def one(k: int) -> int:
        if k % 4 == 0:
            return requests.post(f"{base}/api/v1/search", headers=auth, files={"image": ("q.png", upload)},
                                 timeout=60).status_code
        if k % 4 == 1:
            return requests.get(f"{base}/api/v1/stats", headers={"Authorization": "Bearer wrong-token"},
                                timeout=60).status_code
        return requests.get(f"{base}/api/v1/images/{1 + k % 5}", headers=auth, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes.count(200) == 36 and codes.count(401) == 12
    pids = set()
    for _ in range(6):  # several scrapes: each is answered by either worker, and each sees the sum
        after = _scrape(port)
        sent = {("/api/v1/search", "POST", "200"): 12, ("/api/v1/stats", "GET", "401"): 12,
                ("/api/v1/images/<int:image_id>", "GET", "200"): 24}
        for key, n in sent.items():
            assert after.get(key, 0) - before.get(key, 0) == n, (key, after.get(key), before.get(key))

    # one id through the error answer, the audit row and the log line
    for action, rid in (("unflag", "req-unflag-41"), ("flag", "req-flag-42")):  # the store as it was after
        r = requests.post(f"{base}/api/v1/images/2/{action}", headers={**auth, "X-Request-Id": rid},
                          json={"reason": "test"}, timeout=60)
        assert r.status_code == 200 and r.headers["X-Request-Id"] == rid
        events = requests.get(f"{base}/api/v1/audit", headers=auth, params={"target": "image:2", "action": action},
                              timeout=60).json()["events"]
        assert events and events[0]["detail"]["request_id"] == rid
    missing = requests.get(f"{base}/api/v1/images/999999", headers={**auth, "X-Request-Id": "req-gone-7"},
                           timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["request_id"] == "req-gone-7"

    # a viewer session: its cookie must not be logged either
    viewer = requests.Session()
    page = viewer.get(f"{base}/login", timeout=60).text
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert viewer.post(f"{base}/login", data={"csrf": csrf, "token": TOKEN}, timeout=60).status_code == 200
    cookie = viewer.cookies.get("flagmatch_session")
    assert cookie and viewer.get(f"{base}/clusters", timeout=60).status_code == 200
    families = _families(port)
    assert families["flagmatch_viewer_sessions"].samples[0].value == 1
    batches = {s.name: s.value for s in families["flagmatch_model_batch_images"].samples}
    assert batches["flagmatch_model_batch_images_sum"] >= 12, "every upload's images went through the model"

    time.sleep(0.5)
    lines = served_log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this fails
    access = [r for r in records if r["logger"] == "flagmatch.access"]
    pids = {r["pid"] for r in access}
    assert len(pids) == 2, "both workers answered and logged"
    flag_line = [r for r in access if r["request_id"] == "req-flag-42"]
    assert len(flag_line) == 1 and flag_line[0]["route"] == "/api/v1/images/<int:image_id>/flag"
    assert flag_line[0]["actor"] == "ops" and flag_line[0]["status"] == 200 and flag_line[0]["duration_ms"] > 0
    assert [(r["status"], r["path"]) for r in access if r["request_id"] == "req-gone-7"] == [(404, "/api/v1/images/999999")]
    searches = [r for r in access if r["route"] == "/api/v1/search" and r["method"] == "POST"]
    assert searches and all({"decode", "embed", "search"} <= set(r["stages_ms"]) for r in searches)
    text = served_log.read_text()
    for secret in (TOKEN, "wrong-token", cookie, marker, csrf):
        assert secret not in text


def test_served_instance_answers_real_requests(served):
    port, files, _, _ = served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
        assert r.status == 200
    status, body = request(port, "POST", "/api/v1/search", json.dumps({"id": 3, "k": 4}).encode(), "application/json")
    assert status == 200 and len(body["results"][0]["hits"]) == 4
    status, body = request(port, "POST", "/api/v1/search", *multipart(files[5].read_bytes()))
    assert status == 200 and body["results"][0]["hits"][0]["id"] == 6
    status, body = request(port, "GET", "/api/v1/stats", token="nope")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = request(port, "POST", "/api/v1/search", *multipart(b"GIF89a broken"))
    assert status == 400 and body["error"]["code"] in ("corrupt", "truncated")



def test_request_threads_run_below_the_model(served, tmp_path):
    """With --request-nice 19, request and upload-decode threads run at 19; a worker's main thread and the
    model's threads keep the process's priority, so a busy request thread never preempts the model. Each
    part's threads are named in the kernel."""
    _, files, env, _ = served
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base >= 19:
        pytest.skip("this test process already runs at niceness 19: nothing to tell apart")
    env = {k: v for k, v in env.items() if k != "FLAGMATCH_PORT"}  # a server of its own, on a free port
    proc, url, log = start_server({**env, "FLAGMATCH_REQUEST_NICE": "19", "FLAGMATCH_WORKERS": "1"},
                                  tmp_path / "server.log")
    try:
        port = int(url.rsplit(":", 1)[1])
        for k in range(4):
            assert request(port, "POST", "/api/v1/search", *multipart(files[k].read_bytes()))[0] == 200
            assert request(port, "POST", "/api/v1/search", json.dumps({"id": 3}).encode(), "application/json")[0] == 200
        workers = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 1
        seen = {tid: (name, nice) for tid, (name, nice, _) in thread_stats(workers[0]).items()}
        assert seen[workers[0]][1] == base, "the worker's main thread keeps the process's priority"
        by_name: dict[str, list[int]] = {}
        for name, nice in seen.values():
            by_name.setdefault(name, []).append(nice)
        # each part's threads carry its kernel name (top -H, perf, the search API benchmark's CPU split)
        assert by_name.get("fm-request") and set(by_name["fm-request"]) == {19}, by_name
        assert by_name.get("fm-decode") and set(by_name["fm-decode"]) == {19}, by_name
        # the model's thread and the OpenMP workers it started (they inherit its name) keep the priority
        assert len(by_name.get("fm-model", [])) >= 2 and set(by_name["fm-model"]) == {base}, by_name
    finally:
        stop_server(proc, log)


def test_chunked_upload_over_the_limit_is_413(served):
    port = served[0]
    body, ctype = multipart(b"\xff\xd8\xff" + os.urandom(1_500_000))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        conn.request("POST", "/api/v1/search", body=chunks, encode_chunked=True,
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype,
                              "Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        data = json.loads(r.read())
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server dropped the connection instead of answering 413")
    finally:
        conn.close()
    assert r.status == 413 and data["error"]["code"] == "body_too_large"


def test_index_republished_during_a_burst_has_zero_errors(served):
    port, files, env, cli = served
    before = request(port, "POST", "/api/v1/search", json.dumps({"id": 1}).encode(), "application/json")[1]
    gen_before = before["index_checkpoint"]["generation"]
    jpeg = encode(drawn_image(4242), "JPEG")

    def one(i: int) -> int:
        if i % 3 == 0:
            return request(port, "POST", "/api/v1/search", *multipart(jpeg))[0]
        return request(port, "POST", "/api/v1/search", json.dumps({"id": 1 + i % 24, "scope": "all"}).encode(),
                       "application/json")[0]

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(240)]
        for _ in range(2):  # another process rebuilds and publishes the index twice mid-burst
            subprocess.run(cli + ["reindex"], env=env, check=True, capture_output=True, timeout=120)
        statuses = [f.result() for f in futures]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # both workers pick the new generation up without a restart
        gens = {request(port, "POST", "/api/v1/search", json.dumps({"id": 2}).encode(),
                        "application/json")[1]["index_checkpoint"]["generation"] for _ in range(6)}
        if gens == {gen_before + 2}:
            break
        time.sleep(0.5)
    assert gens == {gen_before + 2}


def test_cli_search_table_and_json(served):
    _, files, env, cli = served
    r = subprocess.run(cli + ["search", str(files[7]), "-k", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "already known as #8" in lines[0] and "3 flagged neighbour(s)" in lines[0]
    assert lines[2].split()[1] == "8"  # first hit: the same image
    r = subprocess.run(cli + ["search", "--id", "8", "--scope", "all", "--json", "-k", "2"], env=env,
                       capture_output=True, text=True, timeout=120)
    body = json.loads(r.stdout)
    assert body["scope"] == "all" and len(body["results"][0]["hits"]) == 2
    assert body["results"][0]["hits"][0]["thumbnail_url"].startswith("/api/v1/images/")
    r = subprocess.run(cli + ["search", str(Path(files[0]).with_name("missing.jpg"))], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "missing.jpg" in r.stderr
