"""The CLI's long jobs report to Prometheus when they end: into node_exporter's textfile folder and to a real
Pushgateway (Debian's prometheus-pushgateway on a loopback port), read back with prometheus-client's parser."""
from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from flagmatch.cli import main
from tests.helpers import clean_env, free_port, write_images


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ("command", "code", "scope")))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def pushgateway(tmp_path):
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.fail("prometheus-pushgateway is not installed (.ci/run installs Debian's)")
    port = free_port()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_jobs_report_to_a_textfile_folder_and_a_pushgateway(tmp_path, tiny_model_dir, pushgateway):
    write_images(tmp_path / "in", 6)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (tmp_path / "prom").mkdir()
    home = ["--home", str(tmp_path / "home"), "--metrics-textfile-dir", str(tmp_path / "prom"),
            "--metrics-push", pushgateway]
    before = time.time()
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "in"), "--model", str(tiny_model_dir), *home],
                           env=clean_env(), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["check", *home], env=clean_env(), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (tmp_path / "home" / "index" / "all.faiss").write_bytes(b"damaged")
    r = CliRunner().invoke(main, ["check", *home], env=clean_env(), catch_exceptions=False)
    assert r.exit_code == 1

    text = (tmp_path / "prom" / "flagmatch_ingest.prom").read_text()
    with urllib.request.urlopen(pushgateway + "/metrics", timeout=10) as resp:
        pushed = resp.read().decode()
    for got in (samples(text), samples(pushed)):
        ingest = (("command", "ingest"),)
        assert got[("flagmatch_job_images_new", ingest)] == 6 and got[("flagmatch_job_images_failed", ingest)] == 1
        assert got[("flagmatch_job_failures", (("code", "corrupt"), ("command", "ingest")))] == 1
        assert got[("flagmatch_job_images_per_second", ingest)] > 0 and got[("flagmatch_job_decode_cpu_seconds", ingest)] > 0
        assert got[("flagmatch_job_last_success_timestamp_seconds", ingest)] >= before
    got = samples(pushed)
    check = (("command", "check"),)
    # the second check found the store damaged: it ran (and says so), but did not succeed
    assert got[("flagmatch_job_whole", check)] == 0
    assert got[("flagmatch_job_findings", (("code", "index_checksum"), ("command", "check")))] == 1
    assert ("flagmatch_job_last_success_timestamp_seconds", check) not in got
    assert got[("flagmatch_job_last_run_timestamp_seconds", check)] >= before
