"""The search service over a real store, index and tiny model: uploads and stored images in one call,
flagged and all scopes, the liveness check at hydration, sweeps, and its refusals."""
from __future__ import annotations

import pytest

from indexer.review.actions import delete_images, set_flags
from indexer.storage.audit import AuditLog
from indexer.storage.catalog import FlagRequest
from indexer.errors import InvalidInputError, NotFoundError
from search.service import SearchParams
from tests.helpers import drawn_image, encode, write_images


@pytest.fixture
def svc(settings, store, tiny_embedder, tmp_path):
    from flagmatch.wiring import ingest_into, open_index, search_service
    from indexer.ingest.sources import iter_sources
    write_images(tmp_path / "in", 10, fmt="PNG", ext="png")
    ingest_into(settings.replace(flag_threshold=1.1), iter_sources([str(tmp_path / "in")]), store=store,
                embedder=tiny_embedder)
    store.catalog.set_flag([1, 2, 3, 4, 5], FlagRequest("import", "spam", "setup"), flag=True)
    return search_service(settings, store, open_index(store, settings), tiny_embedder)


def test_uploads_find_their_stored_copy_first(svc):
    uploads = [(f"q{i}.png", encode(drawn_image(i), "PNG")) for i in (1, 3, 7)]
    resp = svc.search_uploads(uploads, SearchParams(k=3, scope="all"))
    assert [r.hits[0].record.id for r in resp.results] == [2, 4, 8]  # drawn_image(i) is image i+1
    assert all(r.query.known_id == r.hits[0].record.id for r in resp.results)
    assert all(r.hits[0].similarity > 0.999 and r.hits[0].view == "full" for r in resp.results)
    # the flagged scope only ever returns flagged images
    flagged = svc.search_uploads(uploads, SearchParams(k=10))
    assert all(h.record.flagged for r in flagged.results for h in r.hits)
    assert [len(r.hits) for r in flagged.results] == [5, 5, 5]


def test_uploads_decode_on_a_pool_at_the_request_niceness(svc):
    import os
    import threading

    from search.service import SearchService

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    base = niceness()
    assert svc._decoders.submit(niceness).result() == base  # request_nice 0: as the process
    if base < 19:
        niced = SearchService(svc.store, svc.index, svc.embedder, decode_nice=19)
        assert niced._decoders.submit(niceness).result() == 19
        resp = niced.search_uploads([("q.png", encode(drawn_image(1), "PNG"))], SearchParams(k=1, scope="all"))
        assert resp.results[0].hits[0].record.id == 2


def test_stored_images_leave_themselves_out(svc):
    resp = svc.search_ids([1, 2], SearchParams(k=4))
    assert [h.record.id for h in resp.results[0].hits if h.record.id == 1] == []
    assert all(len(r.hits) == 4 for r in resp.results)
    sims = [h.similarity for h in resp.results[0].hits]
    assert sims == sorted(sims, reverse=True)
    cut = svc.search_ids([1], SearchParams(k=10, min_similarity=sims[1])).results[0].hits
    assert [h.similarity >= sims[1] for h in cut] == [True] * len(cut) and len(cut) == 2


def test_unflagged_and_deleted_images_drop_out_at_once(svc, store):
    audit = AuditLog(store.catalog.engine)
    set_flags(store, svc.index, audit, [2], flag=False, actor="rita", source="review", reason="fine", label=None)
    delete_images(store, svc.index, audit, [3], actor="rita", reason="legal")
    ids = {h.record.id for h in svc.search_ids([1], SearchParams(k=10)).results[0].hits}
    assert ids == {4, 5}
    with pytest.raises(NotFoundError):
        svc.search_ids([3], SearchParams())


def test_sweep_finds_unflagged_images_near_the_seeds(svc):
    hits = svc.sweep([1, 2], min_similarity=-1.0, per_seed=20)
    assert {h.record.id for h in hits} == {6, 7, 8, 9, 10}
    assert all(not h.record.flagged and h.seed in (1, 2) for h in hits)
    with pytest.raises(InvalidInputError):
        svc.sweep([], min_similarity=0.5)


def test_bad_requests_are_refused(svc):
    with pytest.raises(InvalidInputError):
        SearchParams(k=0)
    with pytest.raises(InvalidInputError):
        SearchParams(scope="everything")
    with pytest.raises(InvalidInputError, match="empty"):
        svc.search_uploads([("e.png", b"")], SearchParams())
    with pytest.raises(InvalidInputError):
        svc.search_uploads([], SearchParams())


def test_the_suggested_sweep_threshold_fits_what_the_sweep_found():
    """Never above every candidate (0.96 found nothing while 8 sat in 0.9-1.0), never letting through more
    than a page (0.78 on a mixed cluster gave 187)."""
    from search.service import SWEEP_SUGGESTED_MAX, settle_threshold
    close = [0.95, 0.94, 0.93, 0.93, 0.92, 0.91, 0.905, 0.90]
    far = [0.6 - 0.001 * i for i in range(100)]
    t = settle_threshold(0.96, close + far)
    assert sum(s >= t for s in close + far) == len(close)  # the group that stands apart
    crowd = [0.95 - 0.001 * i for i in range(300)]
    t = settle_threshold(0.78, crowd)
    assert sum(s >= t for s in crowd) <= SWEEP_SUGGESTED_MAX + 1 and t > 0.78
    assert settle_threshold(0.5, [0.9, 0.8, 0.3]) == 0.5  # within reach and few: as suggested
    assert settle_threshold(0.7, []) == 0.7
