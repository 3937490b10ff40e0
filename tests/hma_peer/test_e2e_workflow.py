"""OMM's ``tests/test_e2e_workflow.py`` (facebook/ThreatExchange @ baefb4ed) over HTTP against `flagmatch
serve` (OMM's explicit index build dropped: flagmatch's bank index follows the catalog on every lookup)."""
from __future__ import annotations

from threatexchange.signal_type.pdq.signal import PdqSignal

import pytest

from tests.hma_peer.conftest import Client, create_bank, serve
from tests.helpers import stop_server


@pytest.fixture
def served(tmp_path, tiny_model_dir, catalog_url):
    """The `flagmatch serve` command itself (gunicorn, a worker process), not the in-process server."""
    proc, base, log = serve(tmp_path, tiny_model_dir, catalog_url)
    c = Client(base)
    yield c
    c.http.close()
    stop_server(proc, log)


def test_the_port_runs_against_flagmatch_serve(served: Client):
    assert served.get("/status").data == b"I-AM-ALIVE"
    test_add_hashes_and_find_match(served)


def test_add_hashes_and_find_match(client: Client):
    bank_name = "TEST_BANK"
    create_bank(client, bank_name)

    hashes = PdqSignal.get_examples()
    for pdq in hashes:
        resp = client.post(f"/c/bank/{bank_name}/signal", json={"pdq": pdq})
        assert resp.status_code == 200

    resp = client.get("/m/index/status?signal_type=pdq")
    assert resp.status_code == 200
    all_build_info = resp.json
    assert "pdq" in all_build_info
    build_info = all_build_info["pdq"]
    assert build_info["present"] is True
    assert build_info["size"] == len(hashes)

    resp = client.get(f"/m/lookup?signal_type=pdq&signal={hashes[-1]}")
    assert resp.status_code == 200
    assert resp.json == {"TEST_BANK": [{"bank_content_id": 16, "distance": "0"}]}

    resp = client.get("/m/lookup?signal_type=pdq&signal={}".format("5" * 64))
    assert resp.status_code == 200
    assert resp.json == {}
