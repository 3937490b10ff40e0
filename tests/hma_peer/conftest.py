"""OpenMediaMatch's own API tests, ported from Flask's test client to HTTP against a real `flagmatch serve` on
loopback. Source: facebook/ThreatExchange, ``hasher-matcher-actioner/src/OpenMediaMatch/tests/`` at commit
``baefb4ed`` (OMM 1.1.x). Each test gets a fresh store (OMM's fixture drops and recreates its tables), on
SQLite and on PostgreSQL.

The port keeps OMM's assertions. What changes is how state is set up where OMM reaches into its storage
(``fetcher.fetch_all`` becomes ``POST /c/exchange/X/fetch``; ``storage.bank_add_content`` becomes
``POST /c/bank/X/signal``; ``build_all_indices`` is dropped: flagmatch's bank index follows the catalog on
every lookup), and the server's settings where flagmatch differs by design, one setting each:
``hma_open`` (OMM answers without a token), ``fetch_allow`` = the test image server's address (OMM fetches
any URL), ``exchange_apis`` where a test installs a subset of exchange APIs."""
from __future__ import annotations

import functools
import http.server
import json as jsonlib
import shutil
import tempfile
import threading
import typing as t
from pathlib import Path

import pytest
import requests
from PIL import Image
from threatexchange.signal_type.pdq.signal import PdqSignal

from tests.helpers import start_server

OMM_COMMIT = "baefb4ed"
IMAGE_URL_TO_PDQ: dict[str, str] = {}


class Response:
    """The parts of Flask's test response OMM's tests read, over a real HTTP answer."""

    def __init__(self, r: requests.Response) -> None:
        self._r = r
        self.status_code = r.status_code
        self.data = r.content
        self.is_json = (r.headers.get("Content-Type") or "").startswith("application/json")

    @property
    def json(self) -> t.Any:
        return self._r.json() if self.is_json else None

    def get_json(self) -> t.Any:
        return self.json

    def get_data(self, as_text: bool = False) -> t.Any:
        return self._r.text if as_text else self.data


class Client:
    """OMM's ``client`` (a Flask test client) as HTTP calls to ``base``."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()

    def open(self, method: str, path: str, *, json: t.Any = None, data: t.Any = None,
             query_string: dict[str, t.Any] | None = None) -> Response:
        params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in (query_string or {}).items()}
        files = None
        if isinstance(data, dict):  # Flask's data={"field": (path, name, mimetype)} is a file upload
            files = {}
            for field, value in data.items():
                src, name, mime = value
                files[field] = (Path(name).name, Path(src).read_bytes(), mime)
        body = None if json is None else jsonlib.dumps(json)
        headers = {"Content-Type": "application/json"} if json is not None else {}
        r = self.http.request(method, self.base + path, params=params, data=body, files=files, headers=headers,
                              timeout=60)
        return Response(r)

    def get(self, path: str, **kw: t.Any) -> Response:
        return self.open("GET", path, **kw)

    def post(self, path: str, **kw: t.Any) -> Response:
        return self.open("POST", path, **kw)

    def put(self, path: str, **kw: t.Any) -> Response:
        return self.open("PUT", path, **kw)

    def delete(self, path: str, **kw: t.Any) -> Response:
        return self.open("DELETE", path, **kw)


@pytest.fixture(scope="session", autouse=True)
def image_server() -> t.Iterator[str]:
    """OMM's: a local HTTP server with two checkerboards, and their PDQ hashes by URL."""
    tmpdir = Path(tempfile.mkdtemp())
    server = None
    try:
        def make_checkerboard(cell: int) -> Image.Image:
            img = Image.new("RGB", (128, 128))
            pixels = img.load()
            assert pixels is not None
            for x in range(128):
                for y in range(128):
                    pixels[x, y] = (255, 255, 255) if (x // cell + y // cell) % 2 else (0, 0, 0)
            return img

        make_checkerboard(cell=8).save(tmpdir / "image1.jpg", format="JPEG")
        make_checkerboard(cell=16).save(tmpdir / "image2.jpg", format="JPEG")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmpdir))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base_url = f"http://127.0.0.1:{port}"
        for filename in ("image1.jpg", "image2.jpg"):
            IMAGE_URL_TO_PDQ[f"{base_url}/{filename}"] = PdqSignal.hash_from_file(tmpdir / filename)
        yield base_url
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(tmpdir)


def serve(tmp: Path, model_dir: Path, catalog_url: str, **settings: str) -> tuple[t.Any, str, t.Any]:
    env = {"FLAGMATCH_HOME": str(tmp / "home"), "FLAGMATCH_MODEL": str(model_dir),
           "FLAGMATCH_CATALOG_URL": catalog_url, "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "2",
           "FLAGMATCH_HMA_OPEN": "1", "FLAGMATCH_FETCH_ALLOW": "127.0.0.1",
           # OMM's default signal types, which its tests assert (flagmatch offers vpdq too by default)
           "FLAGMATCH_HMA_SIGNAL_TYPES": "pdq,video_md5",
           **{f"FLAGMATCH_{k.upper()}": v for k, v in settings.items()}}
    return start_server(env, tmp / "server.log")


@pytest.fixture
def server_settings() -> dict[str, str]:
    """Settings a test's server starts with beyond the port's (a test overrides this fixture)."""
    return {}


@pytest.fixture
def app(tmp_path: Path, tiny_model_dir: Path, tiny_embedder: t.Any, catalog_url: str,
        server_settings: dict[str, str]) -> t.Iterator[str]:
    """A fresh server (a new store) per test, as OMM's ``app`` fixture resets its tables: the application a
    `flagmatch serve` worker runs (``flagmatch.runtime.build_app``, settings from the same FLAGMATCH_*
    variables), behind a threaded HTTP server on loopback in this process, so a test pays for a new store and
    not for a new Python with torch. ``test_e2e_workflow.py::test_the_port_runs_against_flagmatch_serve`` runs OMM's
    end-to-end workflow against the `flagmatch serve` command itself."""
    from werkzeug.serving import make_server

    from flagmatch.runtime import build_app
    from flagmatch.settings import Settings
    env = {"FLAGMATCH_HOME": str(tmp_path / "home"), "FLAGMATCH_MODEL": str(tiny_model_dir),
           "FLAGMATCH_CATALOG_URL": catalog_url, "FLAGMATCH_HMA_OPEN": "1", "FLAGMATCH_FETCH_ALLOW": "127.0.0.1",
           "FLAGMATCH_HMA_SIGNAL_TYPES": "pdq,video_md5",  # OMM's default signal types, as its tests assert
           # OMM's default signal types, which its tests assert (flagmatch also offers vpdq by default)
           "FLAGMATCH_HMA_SIGNAL_TYPES": "pdq,video_md5",
           **{f"FLAGMATCH_{k.upper()}": v for k, v in server_settings.items()}}
    application = build_app(Settings.load(environ=env), embedder=tiny_embedder)
    rt = application.extensions["flagmatch"]
    assert rt.ready.is_set(), rt.load_error
    server = make_server("127.0.0.1", 0, application, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        rt.store.close()


@pytest.fixture
def client(app: str) -> t.Iterator[Client]:
    c = Client(app)
    yield c
    c.http.close()


def create_bank(client: Client, bank_name: str) -> None:
    post_response = client.post("/c/banks", json={"name": bank_name})
    assert post_response.status_code == 201
    assert post_response.json == {"matching_enabled_ratio": 1.0, "name": bank_name}


def add_hash_to_bank(client: Client, bank_name: str, image_url: str, content_id: int = 1) -> None:
    post_response = client.post("/c/bank/{}/content?url={}&content_type=photo".format(bank_name, image_url))
    assert post_response.status_code == 200
    assert post_response.json == {"id": content_id, "signals": {"pdq": IMAGE_URL_TO_PDQ[image_url]}}
