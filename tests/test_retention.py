"""``flagmatch retention`` on real stores of both engines: thumbnails of long-unflagged images go (the row
says so first, audited), the young ones and the flagged ones stay; audit rows past the period go, never
younger than the floor, and the purge is itself audited; a dry run changes nothing."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import create_engine, text

from flagmatch.cli import main
from indexer.storage.catalog import engine_url
from tests.helpers import clean_env, write_images


def run(*args: str):
    return CliRunner().invoke(main, list(args), env=clean_env(), catch_exceptions=False)


def test_retention_removes_what_its_periods_say_and_audits_it(tmp_path: Path, tiny_model_dir: Path, catalog_url: str):
    home = tmp_path / "home"
    common = ["--home", str(home)] + (["--catalog-url", catalog_url] if catalog_url else [])
    write_images(tmp_path / "in", 6)
    assert run("ingest", str(tmp_path / "in"), "--model", str(tiny_model_dir), *common).exit_code == 0
    assert run("flag", "1", "2", "3", "--reason", "seen", *common).exit_code == 0
    assert run("unflag", "2", "--reason", "false positive", *common).exit_code == 0
    assert run("unflag", "3", "--reason", "false positive", *common).exit_code == 0
    engine = create_engine(engine_url(catalog_url or f"sqlite:///{home / 'catalog.sqlite'}"))
    try:
        _retention(home, common, engine)
    finally:
        engine.dispose()


def _retention(home: Path, common: list[str], engine) -> None:  # type: ignore[no-untyped-def]
    pg = engine.dialect.name == "postgresql"

    def ago(days: int) -> str:
        return f"at - INTERVAL '{days} days'" if pg else f"datetime(at, '-{days} days')"

    with engine.begin() as c:  # image 2 was unflagged 40 days ago; the first audit row is 400 days old
        c.execute(text(f"UPDATE flag_events SET at = {ago(40)} WHERE image_id = 2"))
        first = c.scalar(text("SELECT min(id) FROM audit_log"))
        c.execute(text(f"UPDATE audit_log SET at = {ago(400)} WHERE id = :i"), {"i": first})
        thumbs = dict(c.execute(text("SELECT id, thumb_key FROM images")).all())
    policy = ["--retain-unflagged-thumbs-days", "30", "--retain-audit-days", "365"]

    r = run("retention", "--dry-run", *policy, *common)
    assert r.exit_code == 0 and "would remove: 1 thumbnails of unflagged images, 1 audit rows" in r.output
    assert (home / "thumbs" / thumbs[2]).exists()

    r = run("retention", *policy, "--actor", "ops", *common)
    assert r.exit_code == 0 and "removed: 1 thumbnails of unflagged images, 1 audit rows" in r.output, r.output
    assert not (home / "thumbs" / thumbs[2]).exists()
    assert all((home / "thumbs" / thumbs[i]).exists() for i in (1, 3, 4, 5, 6))  # flagged, recently unflagged, never
    with engine.connect() as c:
        assert c.scalar(text("SELECT thumb_key FROM images WHERE id = 2")) == ""
        assert c.scalar(text("SELECT count(*) FROM audit_log WHERE id = :i"), {"i": first}) == 0
        rows = c.execute(text("SELECT actor, target, detail FROM audit_log WHERE action = 'retention' "
                              "ORDER BY id")).all()
    assert [(a, t) for a, t, _ in rows] == [("ops", "thumbnails"), ("ops", "audit")] and '"ids": [2]' in rows[0][2]
    r = run("check", *common)
    assert r.exit_code == 0, r.output  # a thumbnail removed by retention is not a damage
    r = run("retention", *policy, *common)
    assert "removed: 0 thumbnails of unflagged images, 0 audit rows" in r.output

    r = CliRunner().invoke(main, ["retention", "--retain-audit-days", "30", *common], env=clean_env())
    assert r.exit_code == 1 and "at least 365 days" in r.output
