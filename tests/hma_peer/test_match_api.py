"""OMM's ``tests/test_match_api.py`` (facebook/ThreatExchange @ baefb4ed) over HTTP against `flagmatch serve`.
OMM's fixtures reach into its storage; here the same state is made through the API: the static sample
exchange is created (``POST /c/exchanges``) and fetched (``POST /c/exchange/SAMPLE/fetch``, what OMM's
``fetcher.fetch_all`` does on its timer), and the three banks get their content by ``POST /c/bank/X/signal``.
``storage.get_signal_type_configs()`` is ``GET /c/signal_type``."""
from __future__ import annotations

import pytest
from threatexchange.signal_type.md5 import VideoMD5Signal
from threatexchange.signal_type.pdq.signal import PdqSignal

from tests.hma_peer.conftest import Client

SIGNAL_TYPES = {PdqSignal.get_name(): PdqSignal, VideoMD5Signal.get_name(): VideoMD5Signal}


def _signal_type_configs(client: Client) -> dict[str, dict]:
    resp = client.get("/c/signal_type")
    assert resp.status_code == 200
    return {c["name"]: c for c in resp.json}


@pytest.fixture()
def client_with_sample_data(client: Client) -> Client:
    resp = client.post("/c/exchanges", json={"api": "sample", "bank": "SAMPLE", "api_json": {}})
    assert resp.status_code == 201, resp.json
    resp = client.post("/c/exchange/SAMPLE/fetch")
    assert resp.status_code == 200 and resp.json["ok"], resp.json
    assert client.get("/status").status_code == 200
    return client


def test_raw_lookups(client_with_sample_data: Client):
    client = client_with_sample_data
    configs = _signal_type_configs(client)
    assert set(configs) == {PdqSignal.get_name(), VideoMD5Signal.get_name()}
    for sig_name, signal_cfg in configs.items():
        assert signal_cfg["enabled_ratio"] > 0

        sig_str = SIGNAL_TYPES[sig_name].get_examples()[0]
        query_str = {"signal": sig_str, "signal_type": sig_name}

        resp = client.get("/m/raw_lookup", query_string=query_str)
        assert resp.status_code == 200
        match_count = len(resp.json["matches"])
        assert match_count >= 1

        query_str["include_distance"] = True  # type: ignore[assignment]
        resp = client.get("/m/raw_lookup", query_string=query_str)
        assert resp.status_code == 200
        with_dist_matches = resp.json["matches"]
        assert len(with_dist_matches) == match_count

        for match in with_dist_matches:
            assert "bank_content_id" in match
            assert "distance" in match


def test_lookups(client_with_sample_data: Client):
    client = client_with_sample_data
    configs = _signal_type_configs(client)
    assert set(configs) == {PdqSignal.get_name(), VideoMD5Signal.get_name()}
    for sig_name, signal_cfg in configs.items():
        assert signal_cfg["enabled_ratio"] > 0
        sig_str = SIGNAL_TYPES[sig_name].get_examples()[0]
        query_str = {"signal": sig_str, "signal_type": sig_name}

        resp = client.get("/m/lookup", query_string=query_str)
        assert resp.status_code == 200
        resp_json = resp.json
        assert len(resp_json) == 1
        assert "SAMPLE" in resp_json
        with_dist_matches = resp_json["SAMPLE"]
        assert len(with_dist_matches) > 0

        for match in with_dist_matches:
            assert "bank_content_id" in match
            assert "distance" in match


@pytest.fixture()
def client_with_multi_bank_data(client: Client) -> Client:
    pdq_signal = PdqSignal.get_examples()[0]
    for bank in ("BANK_A", "BANK_B", "BANK_C"):
        assert client.post("/c/banks", json={"name": bank, "enabled_ratio": 1.0}).status_code == 201
        assert client.post(f"/c/bank/{bank}/signal", json={"pdq": pdq_signal}).status_code == 200
    assert client.get("/status").status_code == 200
    return client


def test_raw_lookup_with_bank_filter(client_with_multi_bank_data: Client):
    client = client_with_multi_bank_data
    sig_str = PdqSignal.get_examples()[0]
    query_str = {"signal": sig_str, "signal_type": PdqSignal.get_name()}

    resp = client.get("/m/raw_lookup", query_string=query_str)
    assert resp.status_code == 200
    assert len(resp.json["matches"]) == 3

    query_str["banks"] = "BANK_A"
    resp = client.get("/m/raw_lookup", query_string=query_str)
    assert resp.status_code == 200
    assert len(resp.json["matches"]) == 1

    query_str["banks"] = "BANK_A,BANK_B"
    resp = client.get("/m/raw_lookup", query_string=query_str)
    assert resp.status_code == 200
    assert len(resp.json["matches"]) == 2

    query_str["banks"] = "NON_EXISTENT_BANK"
    resp = client.get("/m/raw_lookup", query_string=query_str)
    assert resp.status_code == 200
    assert len(resp.json["matches"]) == 0


def test_raw_lookup_with_distance_and_bank_filter(client_with_multi_bank_data: Client):
    client = client_with_multi_bank_data
    sig_str = PdqSignal.get_examples()[0]
    query_str = {"signal": sig_str, "signal_type": PdqSignal.get_name(), "include_distance": True,
                 "banks": "BANK_A,BANK_B"}
    resp = client.get("/m/raw_lookup", query_string=query_str)
    assert resp.status_code == 200
    matches = resp.json["matches"]
    assert len(matches) == 2
    for match in matches:
        assert "bank_content_id" in match
        assert "distance" in match


def test_lookup_with_bank_filter(client_with_multi_bank_data: Client):
    client = client_with_multi_bank_data
    sig_str = PdqSignal.get_examples()[0]
    query_str = {"signal": sig_str, "signal_type": PdqSignal.get_name()}

    resp = client.get("/m/lookup", query_string=query_str)
    assert resp.status_code == 200
    resp_json = resp.json
    assert len(resp_json) == 3
    assert "BANK_A" in resp_json and "BANK_B" in resp_json and "BANK_C" in resp_json

    query_str["banks"] = "BANK_A"
    resp = client.get("/m/lookup", query_string=query_str)
    assert resp.status_code == 200
    resp_json = resp.json
    assert len(resp_json) == 1
    assert "BANK_A" in resp_json
    assert len(resp_json["BANK_A"]) > 0

    query_str["banks"] = "BANK_A,BANK_C"
    resp = client.get("/m/lookup", query_string=query_str)
    assert resp.status_code == 200
    resp_json = resp.json
    assert len(resp_json) == 2
    assert "BANK_A" in resp_json and "BANK_C" in resp_json and "BANK_B" not in resp_json

    query_str["banks"] = "NON_EXISTENT_BANK"
    resp = client.get("/m/lookup", query_string=query_str)
    assert resp.status_code == 200
    assert len(resp.json) == 0
