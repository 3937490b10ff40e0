"""``flagmatch check [--repair]`` on real stores damaged the ways disks and people damage them, on both
catalog engines: every damage is found, what the raw data allows is repaired (and found whole on a second
look), and what it does not allow is reported, never hidden."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from flagmatch.cli import main
from indexer.storage.catalog import engine_url
from tests.helpers import clean_env, write_images


def run(*args: str):
    return CliRunner().invoke(main, list(args), env=clean_env(), catch_exceptions=False)


@pytest.fixture
def built(tmp_path: Path, tiny_model_dir: Path, catalog_url: str):
    """12 ingested images, 3 of them flagged (audit rows), indexes and PDQ indexes published."""
    home = tmp_path / "home"
    common = ["--home", str(home)] + (["--catalog-url", catalog_url] if catalog_url else [])
    write_images(tmp_path / "in", 12)
    assert run("ingest", str(tmp_path / "in"), "--model", str(tiny_model_dir), *common).exit_code == 0
    for i in (2, 5, 7):
        assert run("flag", str(i), "--reason", "seen", "--actor", "alice", *common).exit_code == 0
    assert run("reindex", *common).exit_code == 0
    url = catalog_url or f"sqlite:///{home / 'catalog.sqlite'}"
    engine = create_engine(engine_url(url))
    yield home, common, engine
    engine.dispose()


def _check(common: list[str], *extra: str) -> tuple[int, dict]:
    r = run("check", "--json", *extra, *common)
    return r.exit_code, json.loads(r.output[r.output.index("{"):])


def _thumb(engine, image_id: int) -> str:  # type: ignore[no-untyped-def]
    with engine.connect() as c:
        return c.scalar(text("SELECT thumb_key FROM images WHERE id = :i"), {"i": image_id})


def test_a_whole_store_checks_whole_and_reports_healthy(built):
    _, common, _ = built
    code, report = _check(common)
    assert code == 0 and report["ok"] and report["findings"] == []
    assert report["checked"]["images"] == 12 and report["checked"]["thumbnails"] == 12
    # `flagmatch status` reads the same health as /status, from the home
    r = run("status", "--json", *common)
    body = json.loads(r.output)
    assert r.exit_code == 0 and body["status"] == "ok" and body["checks"]["index"]["scopes"]["all"]["covers_image_id"] == 12
    r = run("status", "--json", "--health-min-free-gb", "1e9", *common)
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "degraded"


def test_every_damage_is_found_and_the_rebuildable_ones_repaired(built):
    home, common, engine = built
    # an index file corrupted in place, a thumbnail deleted and another overwritten, one image's hashes lost
    with open(home / "index" / "flagged.faiss", "r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad\xbe\xef")
    (home / "thumbs" / _thumb(engine, 3)).unlink()
    (home / "thumbs" / _thumb(engine, 4)).write_bytes(b"RIFF\x00\x00not a webp")
    with engine.begin() as c:
        c.execute(text("DELETE FROM image_signals WHERE image_id = 6"))
    # what nothing can rebuild: a raw vector erased, an audit row altered (and, on SQLite, one removed)
    segment = next((home / "vectors").glob("seg-*.f32"))
    row_bytes = segment.stat().st_size // 12
    with open(segment, "r+b") as f:
        f.seek(8 * row_bytes)  # image 9 was the ninth row its run wrote
        f.write(b"\0" * row_bytes)
    with engine.begin() as c:
        first, second = [r[0] for r in c.execute(text("SELECT id FROM audit_log ORDER BY id LIMIT 2"))]
        c.execute(text("UPDATE audit_log SET at = at - INTERVAL '1 day' WHERE id = :i" if engine.dialect.name == "postgresql"
                       else "UPDATE audit_log SET at = datetime(at, '-1 day') WHERE id = :i"), {"i": second + 1})
        if engine.dialect.name == "sqlite":
            c.execute(text("DELETE FROM audit_log WHERE id = :i"), {"i": second})

    code, report = _check(common)
    found = {(f["part"], f["code"], f["scope"]): f for f in report["findings"]}
    assert code == 1 and not report["ok"]
    assert found[("index", "index_checksum", "flagged")]["repairable"]
    assert found[("thumbnails", "thumb_missing", "")]["examples"] == [3]
    assert found[("thumbnails", "thumb_corrupt", "")]["examples"] == [4]
    assert found[("hashes", "unhashed", "")]["examples"] == [6]
    assert found[("vectors", "vector_erased", "")]["examples"] == [9] and not found[("vectors", "vector_erased", "")]["repairable"]
    assert found[("audit", "audit_order", "")]["examples"] == [second + 1]
    if engine.dialect.name == "sqlite":
        assert found[("audit", "audit_gap", "")]["examples"] == [second]
    assert set(found) <= {("index", "index_checksum", "flagged"), ("thumbnails", "thumb_missing", ""),
                          ("thumbnails", "thumb_corrupt", ""), ("hashes", "unhashed", ""), ("vectors", "vector_erased", ""),
                          ("audit", "audit_order", ""), ("audit", "audit_gap", "")}

    code, report = _check(common, "--repair")
    repaired = {f["code"]: f["repaired"] == f["count"] for f in report["findings"]}
    assert repaired["index_checksum"] and repaired["thumb_missing"] and repaired["thumb_corrupt"] and repaired["unhashed"]
    assert not repaired["vector_erased"] and not repaired["audit_order"] and code == 1

    code, report = _check(common)  # a fresh look: only what cannot be rebuilt is left
    assert {f["code"] for f in report["findings"]} == {"vector_erased", "audit_order"} | (
        {"audit_gap"} if engine.dialect.name == "sqlite" else set())
    from PIL import Image
    with Image.open(home / "thumbs" / _thumb(engine, 4)) as im:
        assert im.size[0] > 0  # made again from the original


def test_a_cut_segment_is_reported_and_repair_does_not_rebuild_over_it(built):
    home, common, _ = built
    segment = next((home / "vectors").glob("seg-*.f32"))
    size = segment.stat().st_size
    row_bytes = size // 12
    with open(segment, "r+b") as f:
        f.truncate(size - 2 * row_bytes)  # the last two images' rows are gone
    with open(home / "index" / "all.faiss", "r+b") as f:
        f.seek(64)
        f.write(b"\xde\xad\xbe\xef")
    code, report = _check(common, "--repair")
    found = {f["code"]: f for f in report["findings"]}
    assert found["vector_missing"]["examples"] == [11, 12] and found["vector_missing"]["repaired"] == 0
    assert "index_checksum" in found and found["index_checksum"]["repaired"] == 0
    assert "raw vectors" in found["index_checksum"]["message"]
    assert code == 1
    assert np.fromfile(segment, np.float32).size * 4 == size - 2 * row_bytes  # nothing was written over it


def test_a_videos_keyframes_are_checked_and_their_thumbnails_remade(tmp_path: Path, tiny_model_dir: Path,
                                                                     catalog_url: str):
    """A video's keyframe thumbnails removed: found under keyframes, remade from the original (the same offsets,
    so the same names); its keyframes' raw rows erased: found, reported, never hidden."""
    pytest.importorskip("av")
    from tests.helpers.video import clip
    home = tmp_path / "home"
    common = ["--home", str(home)] + (["--catalog-url", catalog_url] if catalog_url else [])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "v.mp4").write_bytes(clip([1, 2, 3], seconds_each=2.0))
    assert run("ingest", str(tmp_path / "in"), "--model", str(tiny_model_dir), *common).exit_code == 0
    code, report = _check(common)
    assert code == 0 and report["findings"] == [], report
    url = catalog_url or f"sqlite:///{home / 'catalog.sqlite'}"
    engine = create_engine(engine_url(url))
    with engine.connect() as c:
        keys = [k for (k,) in c.execute(text("SELECT thumb_key FROM keyframes ORDER BY id"))]
        seg, row = c.execute(text("SELECT vec_segment, vec_row FROM keyframes ORDER BY id")).first()
    engine.dispose()
    assert len(keys) >= 2
    for k in keys:
        (home / "thumbs" / k).unlink()
    code, report = _check(common)
    found = {f["code"]: f for f in report["findings"]}
    assert code == 1 and found["keyframe_thumb_missing"]["examples"] == [1]
    code, report = _check(common, "--repair")
    assert all((home / "thumbs" / k).is_file() for k in keys), report
    assert _check(common)[1]["findings"] == []
    # a keyframe's raw row erased (zeros): reported, not repairable
    with open(home / "vectors" / f"seg-{seg:09d}.f32", "r+b") as f:
        dim = json.loads((home / "vectors" / "meta.json").read_text())["dim"]
        f.seek(row * dim * 4)
        f.write(b"\0" * dim * 4)
    found = {f["code"]: f for f in _check(common)[1]["findings"]}
    assert found["keyframe_vector_missing"]["examples"] == [1] and not found["keyframe_vector_missing"]["repairable"]
