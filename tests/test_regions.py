"""Region vectors (indexer.vectors.regions): flagged images searchable by windows of their thumbnail — made by
a real model from real stored thumbnails, searched through the real indexes and search service, kept in step
with flags and deletes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import encode, photo_image


@pytest.fixture
def flagged_store(tmp_path: Path, catalog_url: str, opennsfw):  # type: ignore[no-untyped-def]
    """Twelve textured pictures ingested with open_nsfw (real weights), the first eight flagged, in a matching
    space fitted on them (as a store of thousands has one: in open_nsfw's raw features any two of these
    pictures are ~0.8 alike, and no margin means anything)."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import ingest_into, open_store
    from indexer.ingest.sources import iter_sources
    from indexer.storage.catalog import FlagRequest
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(encode(photo_image(300 + i), "PNG"))
    settings = Settings.load({"home": str(tmp_path / "home"), "model": "opennsfw", "catalog_url": catalog_url,
                              "flag_threshold": 1.1, "space_min_vectors": 10}, environ={})
    store = open_store(settings)
    ingest_into(settings, iter_sources([str(folder)]), store=store, embedder=opennsfw)
    ids = [store.catalog.resolve(hashlib.sha256((folder / f"{i:02d}.png").read_bytes()).hexdigest())
           for i in range(12)]
    store.catalog.set_flag(ids[:8], FlagRequest("import", "test", "test"), flag=True)
    yield settings, store, ids
    store.close()


def test_a_part_of_a_flagged_picture_finds_it_through_its_window(flagged_store, opennsfw):
    from flagmatch.wiring import open_index, search_service
    from indexer.vectors.regions import REGION_MARGIN, WINDOWS, load_rows, update_regions
    from search.serialize import hit_json
    from search.service import SearchParams
    settings, store, ids = flagged_store
    before = search_service(settings, store, open_index(store, settings), opennsfw)
    # the top-left quarter of flagged picture 3, at the size its thumbnail shows it (the window's own scale)
    small = photo_image(303).resize((256, 192))
    part = encode(small.crop((0, 0, 128, 96)), "PNG")
    whole_only = {h.record.id: h.similarity for h in
                  before.search_uploads([("part.jpg", part)], SearchParams(k=8)).results[0].hits}

    assert update_regions(store, opennsfw) == (8, 0)
    rows = load_rows(store.index_dir)
    assert rows is not None and len(rows.ids) == 8 * len(WINDOWS) and set(rows.ids.tolist()) == set(ids[:8])
    assert rows.raw.shape[1] == opennsfw.info.dim and rows.model_id == opennsfw.info.model_id

    svc = search_service(settings, store, open_index(store, settings), opennsfw)
    hit = svc.search_uploads([("part.jpg", part)], SearchParams(k=8)).results[0].hits[0]
    assert hit.record.id == ids[3] and hit.region == WINDOWS[0]
    # its window, less the margin a window pays, beats the whole picture's similarity
    assert hit.similarity > whole_only[ids[3]] and hit.similarity <= 1.0 - REGION_MARGIN + 1e-6
    assert hit_json(hit)["stored_box"] == [0, 0, 320, 240]
    # verified on that window, cut from the stored thumbnail, where the whole thumbnail alone verifies less
    from indexer.media.local import MIN_MATCHES, QueryFeatures
    assert hit.verified and hit.local_matches is not None
    grey = np.asarray(small.crop((0, 0, 128, 96)).convert("L").resize((256, 192)))
    key = store.catalog.get(ids[3]).thumb_key
    assert svc.local is not None
    on_window = QueryFeatures(grey).matches(svc.local.window(key, WINDOWS[0]))
    assert on_window >= MIN_MATCHES and on_window > QueryFeatures(grey).matches(svc.local.get(key))
    # a plain re-upload of a flagged picture still matches it whole (no window beats the whole picture)
    again = encode(photo_image(305), "JPEG", quality=70)
    first = svc.search_uploads([("again.jpg", again)], SearchParams(k=8)).results[0].hits[0]
    assert first.record.id == ids[5] and first.region is None and hit_json(first)["stored_box"] is None

    # a second update has nothing to do; the file is not rewritten
    stamp = (store.index_dir / "regions.npz").stat().st_mtime_ns
    assert update_regions(store, opennsfw) == (0, 0)
    assert (store.index_dir / "regions.npz").stat().st_mtime_ns == stamp


def test_region_rows_follow_flags_and_deletes(flagged_store, opennsfw):
    from indexer.review.actions import delete_images, set_flags
    from indexer.storage.audit import AuditLog
    from indexer.vectors.regions import load_rows, update_regions
    settings, store, ids = flagged_store
    # named images alone (an unflagged one gets none), then the rest of the flagged
    assert update_regions(store, opennsfw, only=[ids[0], ids[10]]) == (1, 0)
    assert set(load_rows(store.index_dir).ids.tolist()) == {ids[0]}  # type: ignore[union-attr]
    assert update_regions(store, opennsfw) == (7, 0)
    audit = AuditLog(store.catalog)
    # unflagged: its rows go at the next update; newly flagged: its rows come
    set_flags(store, None, audit, [ids[1]], flag=False, actor="mod", source="review", reason="not a match")
    set_flags(store, None, audit, [ids[9]], flag=True, actor="mod", source="review", reason="seen before")
    assert update_regions(store, opennsfw) == (1, 1)
    held = set(load_rows(store.index_dir).ids.tolist())  # type: ignore[union-attr]
    assert ids[1] not in held and ids[9] in held
    # deleted: its rows are erased at once (nothing derived from it stays)
    delete_images(store, None, audit, [ids[2]], actor="mod", reason="erasure request")
    assert ids[2] not in set(load_rows(store.index_dir).ids.tolist())  # type: ignore[union-attr]
    # a damaged file is made again by the next update
    (store.index_dir / "regions.npz").write_bytes(b"not an archive")
    assert load_rows(store.index_dir) is None
    added, _ = update_regions(store, opennsfw)
    assert added == len(store.catalog.image_ids(flagged=True))


def test_regions_command(flagged_store):
    from click.testing import CliRunner
    from flagmatch.cli import main
    settings, store, ids = flagged_store
    r = CliRunner().invoke(main, ["regions", "--home", settings.home, "--catalog-url", settings.catalog_url])
    assert r.exit_code == 0, r.output
    assert "8 flagged images added, 0 dropped; 72 windows held" in r.output
