"""OMM's ``tests/test_api.py`` (facebook/ThreatExchange @ baefb4ed) over HTTP against `flagmatch serve`.

Left out, with why: the parts of ``test_status_response`` and ``test_status_live_always_alive`` that fake
OMM's in-memory index cache into "not loaded" and "stale" (flagmatch's bank index follows the catalog on
every lookup: it is loaded before the server answers ready and is never stale); ``test_lookup_without_role``
(OMM's ROLE_HASHER switch; flagmatch's roles are its tokens, tested in tests/test_hma.py)."""
from __future__ import annotations

import tempfile

import pytest
import requests
from PIL import Image
from io import BytesIO
from threatexchange.exchanges.impl.fb_threatexchange_api import (FBThreatExchangeCredentials,
                                                                 FBThreatExchangeSignalExchangeAPI)
from threatexchange.exchanges.impl.static_sample import StaticSampleSignalExchangeAPI
from threatexchange.utils import dataclass_json

from tests.hma_peer.conftest import Client


def test_status_response(client: Client):
    response = client.get("/status")
    assert response.status_code == 200
    assert response.data == b"I-AM-ALIVE"


def test_status_live_always_alive(client: Client):
    response = client.get("/status/live")
    assert response.status_code == 200
    assert response.data == b"I-AM-ALIVE"


def test_openapi_documentation_available(client: Client):
    response = client.get("/openapi/openapi.json")
    assert response.status_code == 200
    assert response.is_json
    payload = response.get_json()
    assert payload is not None
    assert payload.get("info", {}).get("title") == "Open Media Match API"


def test_lookup_success(client: Client, image_server: str):
    # test GET
    image_url = f"{image_server}/image1.jpg"
    get_resp = client.get(f"/m/lookup?url={image_url}")
    assert get_resp.status_code == 200

    # test POST with temp file
    response = requests.get(image_url)
    image = Image.open(BytesIO(response.content))
    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        image.save(f, format="JPEG")
        f.flush()
        file_tuple = (f.name, f.name, "image/jpeg")
        resp = client.post("/m/lookup", data={"photo": file_tuple})
        assert resp.status_code == 200

        # It's not really a video, but MD5 is simple that we can fake it
        resp = client.post("/m/lookup", data={"video": file_tuple})
        assert resp.status_code == 200


@pytest.fixture
def server_settings() -> dict[str, str]:
    # OMM's tests install these two exchange APIs (storage.exchange_types monkeypatched); flagmatch's setting
    return {"exchange_apis": "sample,fb_threatexchange"}


def test_exchange_api_set_auth(client: Client):
    sample_name = StaticSampleSignalExchangeAPI.get_name()
    tx_name = FBThreatExchangeSignalExchangeAPI.get_name()
    resp = client.get("/c/exchanges/apis")
    assert resp.status_code == 200
    assert set(resp.json) == {sample_name, tx_name}

    resp = client.get(f"/c/exchanges/api/{sample_name}")
    assert resp.status_code == 200
    assert resp.json == {"supports_authentification": False, "has_set_authentification": False}

    resp = client.get(f"/c/exchanges/api/{tx_name}")
    assert resp.status_code == 200
    assert resp.json == {"supports_authentification": True, "has_set_authentification": False}

    creds = FBThreatExchangeCredentials("12345789|000000000000")
    resp = client.post(f"/c/exchanges/api/{tx_name}",
                       json={"credential_json": dataclass_json.dataclass_dump_dict(creds)})
    assert resp.status_code == 200
    assert resp.json == {"supports_authentification": True, "has_set_authentification": True}

    resp = client.get(f"/c/exchanges/api/{tx_name}")
    assert resp.status_code == 200
    assert resp.json == {"supports_authentification": True, "has_set_authentification": True}

    # Unset
    resp = client.post(f"/c/exchanges/api/{tx_name}", json={"credential_json": {}})
    assert resp.status_code == 200
    assert resp.json == {"supports_authentification": True, "has_set_authentification": False}


def test_exchange_api_schema(client: Client):
    """Schema endpoint returns config and optional credential field descriptors."""
    sample_name = StaticSampleSignalExchangeAPI.get_name()
    tx_name = FBThreatExchangeSignalExchangeAPI.get_name()

    resp = client.get(f"/c/exchanges/api/{sample_name}/schema")
    assert resp.status_code == 200
    data = resp.get_json()
    assert data is not None and isinstance(data, dict)
    assert "config_schema" in data
    assert "fields" in data["config_schema"]
    assert data["credentials_schema"] is None

    resp = client.get(f"/c/exchanges/api/{tx_name}/schema")
    assert resp.status_code == 200
    data = resp.get_json()
    assert data is not None and isinstance(data, dict)
    assert "config_schema" in data
    config_fields = {f["name"]: f for f in data["config_schema"]["fields"]}
    assert "privacy_group" in config_fields
    assert config_fields["privacy_group"]["type"] == "number"
    assert config_fields["privacy_group"]["required"] is True
    cred_schema = data["credentials_schema"]
    assert cred_schema is not None
    cred_fields = {f["name"]: f for f in cred_schema["fields"]}
    assert "api_token" in cred_fields
    assert cred_fields["api_token"]["type"] == "string"


def test_compare_hashes(client: Client):
    specimen1 = "facd8bcb2a49bcebdec1985298d5fe84bcd006c187c598c720c3c087b3fdb318"
    specimen2 = "facd8bcb2a49bcebdec1985228d5ae84bcd006c187c598c720c2b087b3fdb318"
    # Happy path
    resp = client.post("/m/compare", json={"pdq": [specimen1, specimen2]})
    assert resp.json == {"pdq": [True, {"distance": 9}]}

    # Malformed input
    bad_inputs = [
        ["banana"],
        {"pdq": "banana"},
        {"pdq": []},
        {"pdq": ["banana", "banana"]},
        {"pdq": [specimen1, specimen2, specimen1]},
    ]
    for bad_input in bad_inputs:
        resp = client.post("/m/compare", json=bad_input)
        assert resp.status_code == 400


def test_exchange_delete(client: Client):
    delete_response = client.delete("/c/exchange/TEST_EXCHANGE")
    # deleting an exchange that doesn't exist returns 200
    assert delete_response.status_code == 200

    post_response = client.post("/c/exchanges", json={"api": "sample", "bank": "FOO_EXCHANGE", "api_json": {}})
    assert post_response.status_code == 201

    delete_response = client.delete("/c/exchange/FOO_EXCHANGE")
    assert delete_response.status_code == 200
    assert delete_response.get_json()["message"] == "Exchange deleted"


def test_exchange_get_fetch_status(client: Client):
    # Unknown exchange returns 404
    resp = client.get("/c/exchange/NONEXISTENT_EXCHANGE/status")
    assert resp.status_code == 404

    post_resp = client.post("/c/exchanges", json={"api": "sample", "bank": "BAR_EXCHANGE", "api_json": {}})
    assert post_resp.status_code == 201

    resp = client.get("/c/exchange/BAR_EXCHANGE/status")
    assert resp.status_code == 200
    assert resp.is_json
    data = resp.get_json()
    assert data is not None
    assert "checkpoint_ts" in data
    assert "running_fetch_start_ts" in data
    assert "last_fetch_complete_ts" in data
    assert "last_fetch_succeeded" in data
    assert "up_to_date" in data
    assert "fetched_items" in data
