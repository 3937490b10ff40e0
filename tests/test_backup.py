"""``flagmatch backup`` while an ingest runs and reviewers flag and unflag, then ``flagmatch restore`` into a
new home, on both catalog engines: the restored store holds every decision and audit row up to the
snapshot, is whole by ``flagmatch check``, and answers searches as the original does; an incremental
backup links what did not change."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from flagmatch.cli import main
from flagmatch.settings import Settings
from indexer.storage.catalog import engine_url
from tests.helpers import child_env, clean_env, write_images


def run(*args: str):
    return CliRunner().invoke(main, list(args), env=clean_env(), catch_exceptions=False)


def rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(sql))]
    finally:
        engine.dispose()


def search(home: Path, catalog: str, model: Path, files: list[Path]) -> list[list[tuple[int, float]]]:
    args = ["search", *map(str, files), "--scope", "all", "-k", "5", "--json", "--home", str(home), "--model", str(model)]
    r = run(*args, *(["--catalog-url", catalog] if catalog else []))
    assert r.exit_code == 0, r.output
    return [[(h["id"], round(h["similarity"], 4)) for h in q["hits"]] for q in json.loads(r.output)["results"]]


def test_backup_under_load_restores_every_committed_decision(tmp_path, tiny_model_dir, catalog_url):
    from tests.helpers import pg
    home = tmp_path / "home"
    store_args = ["--home", str(home)] + (["--catalog-url", catalog_url] if catalog_url else [])
    first = write_images(tmp_path / "in1", 20)
    write_images(tmp_path / "in2", 60, start=100)
    assert run("ingest", str(tmp_path / "in1"), "--model", str(tiny_model_dir), *store_args).exit_code == 0
    assert run("reindex", *store_args).exit_code == 0
    url = catalog_url or f"sqlite:///{home / 'catalog.sqlite'}"

    # the load: an ingest in another process, and a burst of flag changes here
    env = child_env(FLAGMATCH_HOME=str(home), FLAGMATCH_MODEL=str(tiny_model_dir), FLAGMATCH_BATCH_SIZE="4",
                    **({"FLAGMATCH_CATALOG_URL": catalog_url} if catalog_url else {}))
    ingest = subprocess.Popen([sys.executable, "-m", "flagmatch.cli", "ingest", str(tmp_path / "in2")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop = threading.Event()

    def reviewers() -> None:
        from flagmatch import wiring
        from indexer.review.actions import set_flags
        from indexer.storage.audit import AuditLog
        settings = Settings.load({"home": str(home), "catalog_url": catalog_url or None}, environ={})
        store = wiring.open_store(settings)
        audit = AuditLog(store.catalog.engine)
        k = 0
        while not stop.is_set():
            image = 1 + k % 20
            set_flags(store, None, audit, [image], flag=(k // 20) % 2 == 0, actor=f"rev{k % 3}", source="review",
                      reason="burst")
            k += 1
        store.close()

    burst = threading.Thread(target=reviewers)
    burst.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not rows(url, "SELECT id FROM images WHERE id > 20 LIMIT 1"):
            time.sleep(0.05)  # the ingest has committed its first batch: the snapshot lands mid-run
        r = run("backup", str(tmp_path / "backups"), *store_args)
        assert r.exit_code == 0, r.output
    finally:
        stop.set()
        burst.join()
        out = ingest.communicate(timeout=300)[0].decode()
    assert ingest.returncode == 0, out
    backup = sorted((tmp_path / "backups").iterdir())[-1]
    snap = json.loads((backup / "manifest.json").read_text())["snapshot"]
    total = rows(url, "SELECT count(*) FROM images")[0][0]
    assert 20 < snap["image_head"] < total == 80, "the snapshot fell inside the running ingest"
    assert snap["audit_head"] < rows(url, "SELECT max(id) FROM audit_log")[0][0], "flag changes went on after it"

    new_catalog = pg.create_database() if catalog_url else ""
    restored = tmp_path / "restored"
    r = run("restore", str(backup), "--home", str(restored), *(["--catalog-url", new_catalog] if new_catalog else []))
    assert r.exit_code == 0 and "whole" in r.output.splitlines()[-1] and "NOT" not in r.output, r.output
    new_url = new_catalog or f"sqlite:///{restored / 'catalog.sqlite'}"

    # every committed decision and audit row up to the snapshot, and nothing after it
    for table, head in (("audit_log", snap["audit_head"]), ("flag_events", snap["flag_event_head"])):
        sql = f"SELECT * FROM {table} WHERE id <= {head} ORDER BY id"
        assert rows(new_url, sql) == rows(url, sql) and len(rows(url, sql)) == head
        assert rows(new_url, f"SELECT count(*) FROM {table}")[0][0] == head
    images = rows(new_url, "SELECT id, sha256, flagged FROM images ORDER BY id")
    assert [i for i, _, _ in images] == list(range(1, snap["image_head"] + 1))
    last_event = dict(rows(new_url, "SELECT image_id, action FROM flag_events WHERE id IN "
                                    "(SELECT max(id) FROM flag_events GROUP BY image_id)"))
    assert all(bool(flagged) == (last_event[i] == "flag") for i, _, flagged in images if i in last_event)
    assert rows(new_url, "SELECT id, sha256 FROM images ORDER BY id") == rows(
        url, f"SELECT id, sha256 FROM images WHERE id <= {snap['image_head']} ORDER BY id")
    # the restored store searches: each picture of the first batch finds itself first
    for hits, k in zip(search(restored, new_catalog, tiny_model_dir, first[:4]), range(4)):
        assert hits[0][0] == k + 1 and hits[0][1] > 0.99

    # quiet now: a second backup links what the first holds unchanged and restores to the same answers
    r = run("backup", str(tmp_path / "backups"), *store_args)
    assert r.exit_code == 0 and "linked from the previous backup" in r.output
    second = sorted((tmp_path / "backups").iterdir())[-1]
    files = json.loads((second / "manifest.json").read_text())["files"]
    thumbs = [p for p in files if p.startswith("thumbs/")]
    assert len(thumbs) == 80
    linked = [p for p in thumbs if (second / "files" / p).stat().st_nlink > 1]
    assert len(linked) >= snap["image_head"] - 1, "the first backup's thumbnails were linked, not copied"
    again = tmp_path / "again"
    other_catalog = pg.create_database() if catalog_url else ""
    assert run("restore", str(second), "--home", str(again),
               *(["--catalog-url", other_catalog] if other_catalog else [])).exit_code == 0
    queries = first[:3] + sorted((tmp_path / "in2").iterdir())[:3]
    assert search(again, other_catalog, tiny_model_dir, queries) == search(home, catalog_url, tiny_model_dir, queries)


def test_restore_refuses_a_damaged_or_incomplete_backup_and_a_used_home(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    write_images(tmp_path / "in", 4)
    assert run("ingest", str(tmp_path / "in"), "--home", str(home), "--model", str(tiny_model_dir)).exit_code == 0
    assert run("backup", str(tmp_path / "b"), "--home", str(home)).exit_code == 0
    backup = next((tmp_path / "b").iterdir())
    r = run("restore", str(tmp_path / "b"), "--home", str(tmp_path / "x"))
    assert r.exit_code == 1 and "not a complete backup" in r.output
    r = run("restore", str(backup), "--home", str(home))
    assert r.exit_code == 1 and "not empty" in r.output
    thumb = next(p for p in (backup / "files" / "thumbs").rglob("*.webp"))
    thumb.unlink()
    thumb.write_bytes(b"changed")
    r = run("restore", str(backup), "--home", str(tmp_path / "y"))
    assert r.exit_code == 1 and "differs from its manifest" in r.output and not (tmp_path / "y").exists()
