"""The API contract, checked by a real peer: schemathesis generates requests from flagmatch's own
OpenAPI document (valid and invalid ones) and runs every check against a real gunicorn server. Any
server error, undocumented status or content type, or response off its schema fails the test."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env, start_server, stop_server, write_images

TOKEN = "contract-token"

# Statuses a schema-valid request may still get: the schema cannot say which ids exist (404), nor that
# random bytes in the `image` field are not an image (400 corrupt, 415 unsupported format, 413 too large).
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "413", "415"]
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("contract")
    write_images(root / "in", 12)
    env = child_env(FLAGMATCH_HOME=str(root / "home"), FLAGMATCH_MODEL=str(tiny_model_dir),
               FLAGMATCH_API_TOKENS=f"ci:{TOKEN}", FLAGMATCH_WORKERS="1", FLAGMATCH_THREADS="4",
               FLAGMATCH_PRECISION="fp32", FLAGMATCH_FLAG_THRESHOLD="0.0", FLAGMATCH_MAX_UPLOAD_BYTES="2000000")
    subprocess.run([sys.executable, "-m", "flagmatch.cli", "ingest", str(root / "in")], env=env, check=True,
                   capture_output=True, timeout=300)
    proc, base, log = start_server(env, root / "server.log")
    yield base, root
    stop_server(proc, log)


def _schemathesis(config: str, cwd: Path, schema_url: str, base_url: str, *options: str) -> None:
    """schemathesis's own CLI against a served document, with its default checks unless ``options`` add more;
    any failure fails the test with schemathesis's report."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert st, "schemathesis is a test dependency: pip install -e '.[test]'"
    config_file = cwd / "schemathesis.toml"
    config_file.write_text(config)
    out = subprocess.run(
        [st, "--config-file", str(config_file), "run", schema_url, "--url", base_url, *options, "--seed", "7",
         "--workers", "1", "--generation-database", "none", "--request-timeout", "30", "--no-color",
         "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=900, cwd=cwd)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "passed" in out.stdout.lower()


def test_schemathesis_finds_no_failure(served):
    base, root = served
    _schemathesis(CONFIG, root, f"{base}/api/v1/openapi.json", f"{base}/api/v1", "-H",
                  f"Authorization: Bearer {TOKEN}", "--checks", "all", "--max-examples", "40",
                  "--phases", "examples,coverage,fuzzing")


# Statuses a schema-valid request to the HMA routes may still get: the schema cannot say which banks,
# contents and exchanges exist (404), that uploaded bytes are an image (400 corrupt, 415 unsupported), that a
# hash's length fits its signal type or a content has signals (400), or that a URL's host is on the
# allow-list (403).
HMA_CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "403", "404", "413", "415"]
"""


def test_schemathesis_finds_no_failure_on_the_hma_routes(tmp_path, tiny_model_dir):
    """HMA's document (/openapi/openapi.json) under schemathesis's default checks, on a served flagmatch
    answering HMA's routes without a token as OMM does (setting hma_open)."""
    env = child_env(FLAGMATCH_HOME=str(tmp_path / "home"), FLAGMATCH_MODEL=str(tiny_model_dir),
                    FLAGMATCH_HMA_OPEN="1", FLAGMATCH_FETCH_ALLOW="127.0.0.1", FLAGMATCH_WORKERS="1",
                    FLAGMATCH_THREADS="4")
    proc, base, log = start_server(env, tmp_path / "server.log")
    try:
        _schemathesis(HMA_CONFIG, tmp_path, f"{base}/openapi/openapi.json", base, "--max-examples", "30")
    finally:
        stop_server(proc, log)
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")
