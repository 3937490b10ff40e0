from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from flagmatch.cli import main
from flagmatch.settings import SETTINGS, Settings, settings_table
from tests.helpers import clean_env, write_images


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(main, list(args), input=input, env=clean_env(env), catch_exceptions=False)


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
    r = CliRunner().invoke(main, ["stats", "--home", str(tmp_path)], env=clean_env({"FLAGMATCH_BATCH_SIZE": "many"}))
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
    r = CliRunner().invoke(main, ["flag", "nope", "--home", home], env=clean_env())
    assert r.exit_code == 1 and "no image" in r.output
    r = invoke("reindex", "--home", home)
    assert r.exit_code == 0 and "generation 2" in r.output
    r = invoke("errors", "--home", home)
    assert "corrupt" in r.output and "bad.png" in r.output


def test_model_mismatch_is_a_clear_cli_error(tmp_path, tiny_model_dir):
    write_images(tmp_path / "in", 2)
    home = str(tmp_path / "home")
    assert invoke("ingest", str(tmp_path / "in"), "--home", home, "--model", str(tiny_model_dir)).exit_code == 0
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "in"), "--home", home, "--model", "opennsfw"],
                           env=clean_env())
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


def test_commands_read_the_model_the_store_was_built_with(tmp_path, tiny_model_dir):
    files = write_images(tmp_path / "in", 3)
    home = str(tmp_path / "home")
    assert invoke("ingest", str(tmp_path / "in"), "--home", home, "--model", str(tiny_model_dir)).exit_code == 0
    r = invoke("search", str(files[0]), "--home", home, "--scope", "all", "--json")  # no --model
    assert r.exit_code == 0, r.output
    assert r.output.lstrip().startswith("{") and '"known_id": 1' in r.output
    assert not (Path(home) / ".secret_key").exists()  # --json builds no web app


def test_each_command_shows_only_its_settings_grouped():
    ingest_help = invoke("ingest", "--help").output
    assert "Model settings" in ingest_help and "Decoding limits settings" in ingest_help
    assert "--api-tokens" not in ingest_help and "--cluster-dims" not in ingest_help
    stats_help = invoke("stats", "--help").output
    assert "--home" in stats_help and "--model " not in stats_help and "--nprobe" not in stats_help
    serve_help = invoke("serve", "--help").output
    assert "Server settings" in serve_help and "--rate-limit" in serve_help


def test_delete_and_sweep_commands(tmp_path, tiny_model_dir):
    from indexer.storage.audit import AuditLog
    from indexer.storage.store import Store
    files = write_images(tmp_path / "in", 6)
    home = str(tmp_path / "home")
    assert invoke("ingest", str(tmp_path / "in"), "--home", home, "--model", str(tiny_model_dir),
                  "--flag-threshold", "1.1").exit_code == 0
    assert invoke("flag", "1", "--home", home, "--reason", "seed").exit_code == 0
    r = invoke("sweep", "1", "--home", home, "--min-similarity", "-1", "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)
    assert {h["id"] for h in hits} == {2, 3, 4, 5, 6} and all(h["seed"] == 1 for h in hits)
    assert "suggested from the seeds" in invoke("sweep", "1", "--home", home).output
    r = invoke("unflag", "1", "--home", home)
    assert r.exit_code == 1 and "reason_required" in r.output
    r = invoke("delete", "2", "--home", home, "--reason", "legal hold released: must not retain")
    assert r.exit_code == 0 and "deleted 1: 2" in r.output
    hits = json.loads(invoke("sweep", "1", "--home", home, "--min-similarity", "-1", "--json").output)
    assert 2 not in {h["id"] for h in hits}
    # ingesting the same bytes again does not bring the content back
    r = invoke("ingest", str(files[1]), "--home", home)
    assert r.exit_code == 0 and "new 0" in r.output and "failed: deleted" in r.output
    store = Store(Path(home), f"sqlite:///{home}/catalog.sqlite")
    rec = store.catalog.get(2)
    assert rec.deleted and not rec.thumb_key and rec.sha256
    assert not store.open_vectors().get([2]).any()  # the raw vector is zeroed
    actions = [e.action for e in AuditLog(store.catalog.engine).events()]
    assert {"flag", "sweep", "delete"} <= set(actions)
    store.close()


def test_audit_command_filters_and_exports(tmp_path):
    from indexer.storage.audit import AuditLog
    from indexer.storage.catalog import Catalog
    home = tmp_path / "home"
    home.mkdir()
    catalog = Catalog(f"sqlite:///{home / 'catalog.sqlite'}")
    log = AuditLog(catalog.engine)
    for i in range(5):
        log.record("rita" if i % 2 else "sam", "unflag", f"image:{i}", reason=f"fp {i}")
    catalog.close()
    r = invoke("audit", "--home", str(home), "--actor", "sam", "--format", "json", "--limit", "2")
    data = json.loads(r.output)
    assert [e["target"] for e in data["events"]] == ["image:4", "image:2"] and data["next_before_id"]
    r = invoke("audit", "--home", str(home), "--actor", "sam", "--before-id", str(data["next_before_id"]))
    assert "image:0" in r.output and "image:4" not in r.output
    r = invoke("audit", "--home", str(home), "--target", "image:*", "--format", "csv")
    assert r.output.splitlines()[0] == "id,at,actor,action,target,detail" and len(r.output.splitlines()) == 6
    assert invoke("audit", "--home", str(home), "--since", "soon").exit_code != 0


def test_the_readme_quick_start_runs_on_sample_images(tmp_path):
    """The README's quick start as a newcomer types it: sample images, ingest with open_nsfw's packaged
    weights, search with a re-upload (its flagged original comes first), cluster."""
    demo = tmp_path / "demo"
    env = {"FLAGMATCH_HOME": str(demo / "home")}
    r = invoke("sample-images", str(demo), "--pictures", "12", env=env)
    assert r.exit_code == 0, r.output
    assert len(list((demo / "uploads").glob("*.jpg"))) == 12
    r = invoke("ingest", str(demo / "flagged.csv"), "--model", "opennsfw", env=env)
    assert r.exit_code == 0 and "new 36" in r.output and "flagged 36" in r.output, r.output
    found = 0
    for i in range(12):
        r = invoke("search", str(demo / "uploads" / f"{i:03d}-3.jpg"), "-k", "1", "--json", env=env)
        assert r.exit_code == 0, r.output
        [hit] = json.loads(r.output)["results"][0]["hits"]
        found += Path(hit["paths"][0]).name.startswith(f"{i:03d}")
    assert found >= 11  # a re-upload finds a flagged copy of its own picture first
    r = invoke("cluster", env=env)
    assert r.exit_code == 0, r.output
    assert "clusters" in invoke("clusters", env=env).output
