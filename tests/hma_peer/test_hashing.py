"""OMM's ``tests/test_hashing.py`` (facebook/ThreatExchange @ baefb4ed), against `flagmatch serve` where it
can be. OMM's tests call its ``is_valid_url`` and mock ``requests.get``; here the refusals are asked over HTTP
(``GET /h/hash?url=…`` answers 400 for each of OMM's invalid URLs), the allow-list's host rule is checked on
flagmatch's own ``AllowList`` with OMM's host lists, and the size cap on a real local server that announces a
body over the cap. By design: OMM fetches any host while ``ALLOWED_HOSTNAMES`` is empty; flagmatch fetches
nothing until ``fetch_allow`` names something (403)."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from indexer.media.fetch import AllowList
from tests.hma_peer.conftest import Client
from tests.helpers import child_env

INVALID = ["ftp://example.com", "file:///etc/passwd", "javascript:alert(1)",
           "data:text/html,<script>alert(1)</script>", "ws://example.com", "wss://example.com",
           "example.com", "//example.com", "http://", "https://", "", "not a url", "http:///example.com",
           "http://example.com:abc"]


def test_invalid_urls_are_refused(client: Client):
    for url in INVALID:
        resp = client.get("/h/hash", query_string={"url": url})
        assert resp.status_code == 400, (url, resp.json)
        assert resp.json["message"]


def test_allowed_hostnames():
    allowed = AllowList.parse(["example.com", "cdn.example.com", "media.example.com"])
    for hostname in ("example.com", "cdn.example.com", "media.example.com"):
        assert allowed.names_url(f"https://{hostname}/path", hostname)
    for url, host in [("https://evil.com", "evil.com"), ("https://malicious-site.com", "malicious-site.com"),
                      ("https://example.com.evil.com", "example.com.evil.com"),  # subdomain attack
                      ("https://evil.com/example.com", "evil.com")]:                # path attack
        assert not allowed.names_url(url, host), url
    # OMM also takes subdomains of an allowed host: flagmatch's "*." entry says so explicitly
    assert AllowList.parse(["*.example.com"]).names_url("https://sub.example.com/x", "sub.example.com")


@pytest.fixture
def server_settings() -> dict[str, str]:
    return {"fetch_max_bytes": "1000"}


class _Big(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        n = 999 if self.path.startswith("/small") else 1001
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        self.wfile.write(b"\xff" * n)

    def log_message(self, *a: object) -> None:
        pass


def test_content_length_validation(client: Client):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        response = client.get(f"/h/hash?url=http://127.0.0.1:{server.server_address[1]}/image.jpg")
        assert response.status_code == 413
        assert "Content too large" in response.get_data(as_text=True)
        # under the cap: not refused for its size (it is not an image: the decoder refuses it)
        response = client.get(f"/h/hash?url=http://127.0.0.1:{server.server_address[1]}/small.jpg")
        assert response.status_code != 413
        assert response.status_code in (400, 415)
    finally:
        server.shutdown()
        server.server_close()


def test_fetching_is_off_without_an_allow_list(tmp_path, tiny_model_dir, catalog_url):
    from tests.hma_peer.conftest import serve
    from tests.helpers import stop_server
    proc, base, log = serve(tmp_path, tiny_model_dir, catalog_url, fetch_allow="")
    try:
        resp = Client(base).get("/h/hash?url=https://example.com/image.jpg")
        assert resp.status_code == 403
        assert "fetch_allow" in resp.json["message"]
    finally:
        stop_server(proc, log)


def test_content_length_validation_misconfiguration(tmp_path):
    """OMM answers 500 "Service misconfigured" per request; flagmatch refuses to start, naming the setting."""
    env = child_env(FLAGMATCH_HOME=str(tmp_path / "home"), FLAGMATCH_FETCH_MAX_BYTES="not-an-integer")
    out = subprocess.run([sys.executable, "-m", "flagmatch.cli", "serve"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=os.getcwd())
    assert out.returncode != 0
    assert "fetch_max_bytes" in out.stderr + out.stdout
