from __future__ import annotations

import json

from click.testing import CliRunner

from flagmatch.cli import main
from flagmatch.settings import SETTINGS, Settings, settings_table
from tests.helpers import write_images


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), input=input, env=env or {}, catch_exceptions=False)
    return result


def test_settings_precedence_cli_over_env_over_default():
    s = Settings.load({"batch_size": None}, environ={"FLAGMATCH_BATCH_SIZE": "7"})
    assert s.batch_size == 7
    s = Settings.load({"batch_size": 3}, environ={"FLAGMATCH_BATCH_SIZE": "7"})
    assert s.batch_size == 3
    assert Settings.load({}, environ={}).batch_size == 32
    assert Settings.load({}, environ={"FLAGMATCH_API_TOKENS": "a, b:c"}).api_tokens == ("a", "b:c")
    table = settings_table()
    assert all(s.env in table for s in SETTINGS)


def test_bad_setting_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["stats", "--home", str(tmp_path)], env={"FLAGMATCH_BATCH_SIZE": "many"})
    assert r.exit_code == 2 and "FLAGMATCH_BATCH_SIZE" in r.output


def test_ingest_stats_flag_unflag_errors(tmp_path, tiny_model_dir):
    files = write_images(tmp_path / "in", 5)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    home = str(tmp_path / "home")
    common = ["--home", home, "--model", str(tiny_model_dir)]
    r = invoke("ingest", str(tmp_path / "in"), *common)
    assert r.exit_code == 0, r.output
    assert "new 5  duplicates 0" in r.output and "failed 1" in r.output and "corrupt" in r.output
    # stdin list of paths
    r = invoke("ingest", "-", *common, input="\n".join(map(str, files[:2])) + "\n")
    assert "new 0  duplicates 2" in r.output
    r = invoke("stats", "--home", home, "--json")
    st = json.loads(r.output)
    assert st["images"] == 5 and st["dim"] == 192
    assert st["last_run"]["precision"] in ("fp32", "bf16") and st["last_run"]["backend"] == "timm"
    r = invoke("flag", "2", "3", "--home", home, "--reason", "reported", "--label", "spam", "--actor", "alice")
    assert r.exit_code == 0 and "flagged 2 of 2" in r.output
    r = invoke("unflag", "3", "--home", home, "--reason", "fp")
    assert "unflagged 1 of 1" in r.output
    r = invoke("stats", "--home", home)
    assert "flagged      1" in r.output and "precision" in r.output
    r = CliRunner().invoke(main, ["flag", "nope", "--home", home])
    assert r.exit_code == 1 and "no image" in r.output
    r = invoke("reindex", "--home", home)
    assert r.exit_code == 0 and "generation 2" in r.output
    r = invoke("errors", "--home", home)
    assert "corrupt" in r.output and "bad.png" in r.output


def test_model_mismatch_is_a_clear_cli_error(tmp_path, tiny_model_dir):
    write_images(tmp_path / "in", 2)
    home = str(tmp_path / "home")
    assert invoke("ingest", str(tmp_path / "in"), "--home", home, "--model", str(tiny_model_dir)).exit_code == 0
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "in"), "--home", home, "--model", "opennsfw"])
    assert r.exit_code == 1 and "model_mismatch" in r.output


def test_export_onnx_then_ingest_with_it_into_the_same_store(tmp_path, tiny_model_dir):
    out = tmp_path / "tiny.onnx"
    r = invoke("export-onnx", str(out), "--model", str(tiny_model_dir))
    assert r.exit_code == 0 and out.is_file()
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b", 2, start=10)
    home = str(tmp_path / "home")
    assert invoke("ingest", str(tmp_path / "a"), "--home", home, "--model", str(tiny_model_dir)).exit_code == 0
    r = invoke("ingest", str(tmp_path / "b"), "--home", home, "--model", str(out))
    assert r.exit_code == 0 and "new 2" in r.output and "(onnx, fp32)" in r.output
