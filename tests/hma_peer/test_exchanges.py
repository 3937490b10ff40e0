"""Exchanges end to end with threatexchange's own exchanges: the static sample over HTTP, and a local-file
exchange created and fetched by `flagmatch exchanges`, its updates and deletes applied on the next fetch and
matched through HMA's lookup on a real server."""
from __future__ import annotations

import subprocess
import sys

from threatexchange.signal_type.pdq.signal import PdqSignal

from tests.hma_peer.conftest import Client
from tests.helpers import child_env


def test_a_local_file_exchange_round_trip(client: Client, app: str, tmp_path):
    home = tmp_path / "home"
    (home / "exchanges").mkdir(exist_ok=True)
    lst = home / "exchanges" / "partner.txt"
    a, b, c = PdqSignal.get_examples()[:3]
    lst.write_text(f"pdq {a}\npdq {b}\nvideo_md5 {'ab' * 16}\ntmk 00ff\n")

    # over HTTP: a file outside the store's exchanges/ directory is refused
    r = client.post("/c/exchanges", json={"api": "local_file", "bank": "PARTNER",
                                          "api_json": {"filename": "/etc/passwd"}})
    assert r.status_code == 400 and "exchanges" in r.json["message"]
    r = client.post("/c/exchanges", json={"api": "local_file", "bank": "PARTNER",
                                          "api_json": {"filename": str(lst)}})
    assert r.status_code == 201, r.json

    env = child_env(FLAGMATCH_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "flagmatch.cli", "exchanges", "fetch", "PARTNER"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PARTNER: +3" in out.stdout
    status = client.get("/c/exchange/PARTNER/status").json
    assert status["last_fetch_succeeded"] is True and status["fetched_items"] == 4
    assert set(client.get("/m/lookup", query_string={"signal_type": "pdq", "signal": b}).json) == {"PARTNER"}

    # the list changes: b is gone, c is new; the next fetch follows it
    lst.write_text(f"pdq {a}\npdq {c}\n")
    r = client.post("/c/exchange/PARTNER/fetch")
    assert r.status_code == 200 and r.json["ok"]
    assert client.get("/m/lookup", query_string={"signal_type": "pdq", "signal": c}).json.keys() == {"PARTNER"}
    # threatexchange's local file API re-reads the whole file and never says what left it: b stays banked
    # until the exchange is deleted (its bank goes with it)
    assert client.delete("/c/exchange/PARTNER").status_code == 200
    assert client.get("/m/lookup", query_string={"signal_type": "pdq", "signal": a}).json == {}
    assert client.get("/c/bank/PARTNER").status_code == 404
