"""URL fetching behind the allow-list, against real HTTP servers on 127.0.0.1: what is named is fetched; a
host the list does not name, a name that resolves to an internal address the list does not name, a
redirect off the list, a slow drip, an oversized body and schemes other than http(s) are refused with a
code saying why."""
from __future__ import annotations

import http.server
import threading
import time
from typing import Iterator

import pytest

from indexer.errors import FetchError
from indexer.media.fetch import AllowList, FetchPolicy, fetch

BODY = b"\xff\xd8" + b"x" * 5000


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/img.jpg":
            self._send(BODY, "image/jpeg")
        elif self.path == "/page":
            self._send(b"<html></html>", "text/html")
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/chunked-big":  # no Content-Length: the cap counts what arrives
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(b"x" * 20000)

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def policy(*allow: str, max_bytes: int = 10_000, timeout: float = 2.0) -> FetchPolicy:
    return FetchPolicy(AllowList.parse(list(allow)), max_bytes, timeout)


def refused(url: str, pol: FetchPolicy) -> str:
    with pytest.raises(FetchError) as exc:
        fetch(url, pol)
    return exc.value.code


def test_a_named_address_is_fetched(origin):
    got = fetch(f"{origin}/img.jpg", policy("127.0.0.1"))
    assert got.data == BODY and got.content_type == "image/jpeg"
    # a URL prefix names it too, and only under that prefix
    port = origin.rsplit(":", 1)[1]
    assert fetch(f"{origin}/img.jpg", policy(f"http://127.0.0.1:{port}/img")).data == BODY
    assert refused(f"{origin}/page", policy(f"http://127.0.0.1:{port}/img")) == "fetch_refused"  # off the prefix


def test_refusals(origin):
    port = origin.rsplit(":", 1)[1]
    assert refused(f"{origin}/img.jpg", policy()) == "fetch_off"
    assert refused(f"{origin}/img.jpg", policy("example.com")) == "fetch_refused"      # not on the list
    # a name on the list that resolves to an internal address the list does not name (loopback here)
    assert refused(f"http://localhost:{port}/img.jpg", policy("localhost")) == "fetch_refused"
    assert refused("http://10.0.0.7/img.jpg", policy("127.0.0.1")) == "fetch_refused"  # a private address
    assert refused("http://169.254.169.254/latest/meta-data", policy("127.0.0.1")) == "fetch_refused"
    # a redirect off the list
    assert refused(f"{origin}/redirect?to=http://example.com/x.jpg", policy("127.0.0.1")) == "fetch_refused"
    assert refused(f"{origin}/redirect?to=http://10.0.0.7/x.jpg", policy("127.0.0.1")) == "fetch_refused"
    # a redirect on the list is followed
    assert fetch(f"{origin}/redirect?to=/img.jpg", policy("127.0.0.1")).data == BODY
    assert refused(f"{origin}/page", policy("127.0.0.1")) == "fetch_not_media"          # not an image type
    assert refused(f"{origin}/img.jpg", policy("127.0.0.1", max_bytes=1000)) == "fetch_too_large"
    assert refused(f"{origin}/chunked-big", policy("127.0.0.1", max_bytes=10_000)) == "fetch_too_large"
    for url in ("ftp://127.0.0.1/x", "file:///etc/passwd", f"http://user:pw@127.0.0.1:{port}/img.jpg",
                "http://127.0.0.1:abc/x", "javascript:alert(1)"):
        assert refused(url, policy("127.0.0.1")) == "fetch_invalid", url


def test_a_slow_drip_meets_the_deadline(origin):
    t0 = time.monotonic()
    assert refused(f"{origin}/drip", policy("127.0.0.1", timeout=1.0)) == "fetch_timeout"
    assert time.monotonic() - t0 < 3.0
