from __future__ import annotations

import hashlib
import logging
import threading

import numpy as np
import pytest

from indexer.storage.catalog import FlagRequest, NewImage
from indexer.vectors.space import SpaceConfig
from indexer.vectors.vector_index import IndexConfig, IndexParams, VectorIndex, choose_params
from tests.helpers import gaussian_mixture
from tests.helpers.vectors import overlap, populate

DIM = 64


def exact_topk(base: np.ndarray, base_ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = q @ base.T
    return base_ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def recall(hits, truth: np.ndarray) -> float:
    return float(np.mean([len(set(h.ids.tolist()) & set(t.tolist())) / len(t) for h, t in zip(hits, truth)]))


CFG = IndexConfig(exact_threshold=3000, nprobe=16, rerank=10)


@pytest.fixture(scope="module")
def mixture():
    return gaussian_mixture(12_000, DIM, 40, seed=3, spread=0.5)


def test_params_are_chosen_from_n_and_dimension():
    assert choose_params(1000, 192, IndexConfig()).kind == "flat"
    p = choose_params(1_000_000, 192, IndexConfig())
    assert (p.kind, p.nlist, p.pq_m, p.opq_dim) == ("ivfpq", 4096, 48, 0)
    p = choose_params(1_000_000, 1024, IndexConfig())
    assert p.opq_dim == 512 and 512 % p.pq_m == 0 and p.pq_m <= 64
    assert choose_params(100_000, 192, IndexConfig(nlist=256, pq_m=24, opq="on")).factory == "OPQ24_192,IVF256,PQ24x8"


def test_ivfpq_with_rerank_reaches_recall_of_exact(store, mixture):
    vecs, _ = mixture
    rng = np.random.default_rng(0)
    flagged = rng.random(len(vecs)) < 0.01
    ids = populate(store, vecs, flagged)
    index = VectorIndex(store, CFG)
    st = index.stats()
    assert st["all"]["kind"] == "ivfpq" and st["flagged"]["kind"] == "flat"
    q = vecs[rng.choice(len(vecs), 200, replace=False)] + rng.normal(0, 0.02, (200, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    hits = index.search(q, 10, "all")
    assert all(len(h.ids) == 10 and (h.ids > 0).all() for h in hits)
    # recall against exact search in the same (matching) space; the tuner measured it at build too
    assert not index.space.is_identity and st["all"]["recall_at_10"] >= 0.95
    sv, sq = index.space.apply(vecs), index.space.apply(q)
    assert recall(hits, exact_topk(sv, ids, sq, 10)) >= 0.95
    # the flagged scope, 1 % of the corpus, keeps that recall (it is its own index, not a filter)
    fl = index.search(q, 10, "flagged")
    assert recall(fl, exact_topk(sv[flagged], ids[flagged], sq, 10)) >= 0.95
    assert all(set(h.ids.tolist()) <= set(ids[flagged].tolist()) for h in fl)
    # similarities are exact cosines in the matching space after re-ranking, best first
    h = hits[0]
    assert np.allclose(h.similarities, sv[h.ids - 1] @ sq[0], atol=1e-4)
    assert (np.diff(h.similarities) <= 1e-6).all()


def test_flagged_scope_as_ivfpq_too(store, mixture):
    vecs, _ = mixture
    flagged = np.random.default_rng(1).random(len(vecs)) < 0.9
    ids = populate(store, vecs, flagged)
    index = VectorIndex(store, CFG)
    assert index.stats()["flagged"]["kind"] == "ivfpq"
    q = vecs[:100]
    sv = index.space.apply(vecs)
    assert recall(index.search(q, 10, "flagged"), exact_topk(sv[flagged], ids[flagged], sv[:100], 10)) >= 0.95


def test_flag_unflag_and_delete_are_visible_at_once(store, mixture):
    vecs = mixture[0][:500]
    populate(store, vecs)
    index = VectorIndex(store, CFG)
    assert index.search(vecs[:1], 5, "flagged")[0].ids.size == 0
    store.catalog.set_flag([7, 8], FlagRequest("manual", "x", "alice"), flag=True)
    index.catch_up()
    assert index.search(vecs[6:7], 1, "flagged")[0].ids.tolist() == [7]
    store.catalog.set_flag([7], FlagRequest("manual", None, "bob"), flag=False)
    # even before any catch-up, the catalog guard keeps an unflagged image out
    assert 7 not in index.search(vecs[6:7], 5, "flagged")[0].ids.tolist()
    index.catch_up()
    assert index.search(vecs[6:7], 5, "flagged")[0].ids.tolist() == [8]
    store.catalog.mark_deleted([8], "carol", "takedown")
    assert index.search(vecs[7:8], 5, "flagged")[0].ids.size == 0
    assert 8 not in index.search(vecs[7:8], 5, "all")[0].ids.tolist()


def test_k_larger_than_the_index_never_pads(store, mixture):
    populate(store, mixture[0][:3])
    index = VectorIndex(store, CFG)
    h = index.search(mixture[0][:1], 10, "all")[0]
    assert sorted(h.ids.tolist()) == [1, 2, 3] and -1 not in h.ids


def test_incremental_add_and_automatic_retrain(store, mixture):
    vecs = mixture[0]
    populate(store, vecs[:8000])
    index = VectorIndex(store, CFG)
    assert index.stats()["all"]["kind"] == "flat"
    index.save()
    populate(store, vecs[8000:11000], start=8001)
    index.catch_up()  # crosses the exact threshold: retrains as IVF-PQ
    st = index.stats()["all"]
    assert st["kind"] == "ivfpq" and st["vectors"] == 11000 and st["generation"] == 2
    index.save()
    # a fresh reader loads the saved file and catches up what came after the checkpoint
    populate(store, vecs[11000:11100], start=11001)
    reader = VectorIndex(store, CFG)
    assert reader.stats()["all"]["vectors"] == 11100 and reader.stats()["all"]["kind"] == "ivfpq"
    assert reader.search(vecs[11050:11051], 1, "all")[0].ids.tolist() == [11051]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_damaged_index_file_is_rebuilt_with_a_warning(store, mixture, damage, caplog):
    vecs = mixture[0][:4000]
    populate(store, vecs, np.arange(4000) % 10 == 0)
    index = VectorIndex(store, CFG)
    index.save()
    path = index.path("all")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "corrupt":
        path.write_bytes(data[:1000] + bytes(b ^ 0xFF for b in data[1000:1100]) + data[1100:])
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="indexer.vectors.vector_index"):
        again = VectorIndex(store, CFG)
    assert "rebuilding" in caplog.text
    assert again.stats()["all"]["vectors"] == 4000
    assert again.search(vecs[123:124], 1, "all")[0].ids.tolist() == [124]
    again.save()
    assert VectorIndex(store, CFG).stats()["all"]["generation"] == again.stats()["all"]["generation"]


def test_searches_during_rebuild_get_the_old_or_the_new_answer(store, mixture):
    vecs = mixture[0][:6000]
    populate(store, vecs)
    index = VectorIndex(store, IndexConfig(exact_threshold=10**9, nprobe=1, rerank=1))
    q = vecs[:40] + 0.01
    old = [tuple(h.ids.tolist()) for h in index.search(q, 10, "all")]
    ivf = IndexParams("ivfpq", DIM, nlist=64, pq_m=8)
    errors: list[BaseException] = []
    seen: list[list[tuple]] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append([tuple(h.ids.tolist()) for h in index.search(q, 10, "all")])
        except BaseException as exc:  # noqa: BLE001 - any error fails the test
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    index.rebuild("all", params=ivf)
    new = [tuple(h.ids.tolist()) for h in index.search(q, 10, "all")]
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) > 4 and old != new
    assert all(answer in (old, new) for answer in seen)


def test_another_process_rebuild_is_picked_up(store, mixture):
    vecs = mixture[0][:5000]
    populate(store, vecs)
    reader = VectorIndex(store, IndexConfig(exact_threshold=10**9, refresh_seconds=0))
    reader.save()
    writer = VectorIndex(store, IndexConfig(exact_threshold=10**9))
    writer.rebuild("all", params=IndexParams("ivfpq", DIM, nlist=32, pq_m=16))
    writer.save()
    assert reader.stats()["all"]["kind"] == "flat"
    reader.catch_up()
    assert reader.stats()["all"]["kind"] == "ivfpq"
    assert reader.stats()["all"]["generation"] == writer.stats()["all"]["generation"]


def test_params_can_be_overridden(store, mixture):
    populate(store, mixture[0][:3000])
    index = VectorIndex(store, CFG)
    index.rebuild("all", params=IndexParams("ivfpq", DIM, nlist=32, pq_m=16))
    st = index.stats()["all"]
    assert st["factory"] == "IVF32,PQ16x8"


def test_matching_space_is_fitted_versioned_and_refitted_when_broken(store, mixture, caplog):
    vecs = mixture[0][:3000]
    populate(store, vecs[:1500])
    cfg = IndexConfig(exact_threshold=10**9)
    index = VectorIndex(store, cfg, SpaceConfig(dim=32, min_vectors=2000))
    assert index.space.is_identity and index.stats()["all"]["space"]["kind"] == "identity"
    index.save()
    # past min_vectors the next catch-up fits a space and rebuilds both scopes in it
    populate(store, vecs[1500:], start=1501)
    index.catch_up()
    assert index.space.version == 1 and index.space.dim == 32
    assert index.stats()["all"]["space"] == index.stats()["flagged"]["space"] == index.space.describe()
    index.save()
    cp = store.catalog.checkpoint("all")
    assert cp.params["space_version"] == 1 and cp.params["dim"] == 32 and cp.params["space_sha256"]
    # queries pass through the same transform: a stored vector finds itself first
    assert index.search(vecs[2500:2501], 1, "all")[0].ids.tolist() == [2501]
    # a damaged space file: warned about, refitted under a new version, the indexes rebuilt with it
    path = store.index_dir / "space-000001.npz"
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="indexer.vectors.vector_index"):
        again = VectorIndex(store, cfg, SpaceConfig(dim=32, min_vectors=2000))
    assert "refitting" in caplog.text
    assert again.space.version == 2
    assert again.search(vecs[2500:2501], 1, "all")[0].ids.tolist() == [2501]
    again.save()
    assert store.catalog.checkpoint("all").params["space_version"] == 2
    assert not path.exists()  # the old version is pruned once no checkpoint uses it


def test_ivfpq_build_is_tuned_to_the_target_recall(store, mixture):
    vecs, _ = mixture
    populate(store, vecs)
    index = VectorIndex(store, IndexConfig(exact_threshold=3000, target_recall=0.97), SpaceConfig(dim=0))
    cp_params = index.stats()["all"]
    assert cp_params["kind"] == "ivfpq" and cp_params["recall_at_10"] >= 0.97
    index.save()
    params = store.catalog.checkpoint("all").params
    assert params["recall"] >= 0.97 and params["nprobe"] >= 8 and params["rerank"] >= 2


def test_learned_space_from_reupload_pairs(settings, store, tiny_embedder, tmp_path):
    """Pairs of real thumbnails and synthetic re-uploads, embedded by a real (tiny) model, cached; the
    learned space brings each re-upload nearer its image than the raw features do."""
    from flagmatch.wiring import ingest_into
    from indexer.vectors import space as spaces
    from indexer.ingest.sources import iter_sources
    from tests.helpers import write_images
    write_images(tmp_path / "in", 48, fmt="PNG", ext="png")
    ingest_into(settings, iter_sources([str(tmp_path / "in")]), store=store, embedder=tiny_embedder)
    a, b = spaces.reupload_pairs(store, tiny_embedder, 40)
    assert a.shape == b.shape == (40, tiny_embedder.info.dim)
    again = spaces.reupload_pairs(store, tiny_embedder, 40)  # from the cache, not embedded again
    assert (store.index_dir / "space-pairs.npz").exists() and np.array_equal(a, again[0])
    sample = store.open_vectors().get(np.asarray(store.catalog.image_ids()))
    learned = spaces.save(store.index_dir, spaces.fit_learned(sample, a, b, SpaceConfig(dim=24, shrink=0.1), 7))
    loaded = spaces.load(store.index_dir, 7, learned.sha256, tiny_embedder.info.dim)
    assert loaded.kind == "learned-whiten" and np.allclose(loaded.apply(a), learned.apply(a))

    def top1(fa: np.ndarray, fb: np.ndarray) -> float:
        return float(((fb @ fa.T).argmax(axis=1) == np.arange(len(fa))).mean())
    assert top1(learned.apply(a), learned.apply(b)) >= top1(a, b)


def test_thin_pictures_go_through_every_edit_and_a_store_holding_them_fits_its_space(settings, store, tiny_embedder,
                                                                                     tmp_path):
    """A banner or a rule a few pixels thin (real clipart has them) has a thumbnail 1–3 pixels across: every
    re-upload and hard edit takes it (it crashed the space's fit at the end of an ingest), and the store's pairs
    and hard views are made with it among them."""
    import random
    from PIL import Image
    from flagmatch.wiring import ingest_into
    from indexer.ingest.sources import iter_sources
    from indexer.media import augment
    from indexer.vectors import space as spaces
    from tests.helpers import photo_image, write_images
    others = [photo_image(1, (64, 48))]
    for size in ((256, 1), (1, 256), (256, 3), (5, 7), (300, 12)):
        im = Image.new("RGB", size, (200, 30, 30))
        for seed in range(60):
            r = random.Random(seed)
            for out in (augment.reupload(im, r), augment.hard_view(im, r, others)):
                assert out.width >= 1 and out.height >= 1
            for name in augment.EDITS:
                assert augment.edit(im, name, random.Random(seed)).width >= 1
            for name in augment.HARD_EDITS:
                assert augment.hard_edit(im, name, random.Random(seed), others).width >= 1
    folder = tmp_path / "in"
    write_images(folder, 24, fmt="PNG", ext="png")
    Image.new("RGB", (1200, 4), (10, 10, 10)).save(folder / "rule.png")
    Image.new("RGB", (6, 900), (250, 250, 0)).save(folder / "banner.png")
    ingest_into(settings, iter_sources([str(folder)]), store=store, embedder=tiny_embedder)
    assert len(store.catalog.image_ids()) == 26
    a, b = spaces.reupload_pairs(store, tiny_embedder, 26)
    assert a.shape == b.shape == (26, tiny_embedder.info.dim) and np.isfinite(b).all()
    ids, views = spaces.hard_views(store, tiny_embedder, 26, per_image=2)
    assert len(ids) == len(views) and np.isfinite(views).all()


def test_sharded_build_is_served_memory_mapped_and_answers_like_a_local_build(settings, store, mixture, caplog):
    """reindex --on-disk: shards filled one after another and merged with faiss.contrib.ondisk into lists
    that are memory-mapped read-only; later adds, unflags and deletes layer on top and survive a reopen."""
    import dataclasses
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.vectors.sharded import local_runner
    vecs, _ = mixture
    rng = np.random.default_rng(5)
    flagged = rng.random(len(vecs)) < 0.9  # ≥ 10k: both scopes are IVF-PQ
    ids = populate(store, vecs, flagged)
    cfg = dataclasses.replace(CFG, shard_rows=5000)
    index = VectorIndex(store, cfg)
    q = vecs[rng.choice(len(vecs), 200, replace=False)] + rng.normal(0, 0.02, (200, DIM)).astype(np.float32)
    local = {sc: index.search(q, 10, sc) for sc in ("all", "flagged")}
    index.rebuild(refit=False, shards=local_runner(index.vectors))  # the same space: comparable answers
    st = index.stats()
    for sc in ("all", "flagged"):
        assert st[sc]["on_disk"] is not None and st[sc]["kind"] == "ivfpq" and st[sc]["recall_at_10"] >= 0.95, st[sc]
        assert (store.index_dir / st[sc]["on_disk"]["lists"]).stat().st_size == st[sc]["on_disk"]["bytes"] > 0
        assert overlap(index.search(q, 10, sc), local[sc]) >= 0.97
    assert st["all"]["vectors"] == len(ids) and st["flagged"]["vectors"] == int(flagged.sum())
    assert not list(store.index_dir.glob(".shards-*")), "shard files are removed after the merge"
    index.save()

    # what comes after the build: new images, an unflag and a delete of images in the mapped lists
    new_vecs = vecs[:50] + rng.normal(0, 0.01, (50, DIM)).astype(np.float32)
    new_ids = populate(store, new_vecs, np.ones(50, bool), start=len(ids) + 1)
    base_flagged = [int(i) for i in ids[flagged][:5]]
    store.catalog.set_flag(base_flagged, FlagRequest("manual", None, "bob"), flag=False)
    store.catalog.mark_deleted([int(ids[1])], "carol", "takedown")
    index.catch_up()
    index.remove([int(ids[1])])  # as delete_images does

    def check(ix: VectorIndex) -> None:
        got = ix.search(new_vecs[:20], 1, "flagged", live=False)
        assert [int(h.ids[0]) for h in got] == new_ids[:20].tolist()
        for i in base_flagged:
            assert i not in ix.search(vecs[i - 1:i], 20, "flagged", live=False)[0].ids.tolist()
        assert int(ids[1]) not in ix.search(vecs[1:2], 20, "all", live=False)[0].ids.tolist()
        s = ix.stats()
        assert s["flagged"]["vectors"] == int(flagged.sum()) + 50 - 5
        assert s["all"]["vectors"] == len(ids) + 50 - 1
        assert s["all"]["on_disk"]["added_since"] == 50 and s["flagged"]["on_disk"]["hidden_since"] == 5

    check(index)
    index.save()
    check(VectorIndex(store, cfg))  # another process: the mapped lists, the layer on top, the hidden ids

    # re-flag one of the unflagged: it is found again (from the layer, the mapped copy stays hidden)
    store.catalog.set_flag(base_flagged[:1], FlagRequest("manual", "x", "alice"), flag=True)
    index.catch_up()
    i = base_flagged[0]
    assert index.search(vecs[i - 1:i], 1, "flagged", live=False)[0].ids[:1].tolist() == [i]

    # rebuilt twice more: each generation maps lists of its own; those two generations behind are deleted
    first = index.stats()["all"]["on_disk"]["lists"]
    for _ in range(2):
        index.rebuild("all", refit=False, shards=local_runner(index.vectors))
        index.save()
    names = sorted(f.name for f in store.index_dir.glob("all-g*.ivfdata"))
    assert first not in names and len(names) == 2 and index.stats()["all"]["on_disk"]["lists"] in names, names

    # the store moved to another folder: the lists are found where the index now is
    moved = store.home.parent / "moved-home"
    import shutil
    shutil.copytree(store.home, moved)
    other = open_store(Settings.load({**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)},
                                      "home": str(moved)}, environ={})) if not settings.catalog_url else None
    if other is not None:
        try:
            lists = VectorIndex(other, cfg).stats()["all"]["on_disk"]["lists"]
            assert lists.startswith("all-g")
        finally:
            other.close()

    # lists truncated on disk: rebuilt from the raw vectors with a warning, never served damaged
    index.save()
    cur = index.stats()["all"]["on_disk"]["lists"]
    with open(store.index_dir / cur, "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING):
        again = VectorIndex(store, cfg)
    assert any("truncated or replaced" in r.getMessage() for r in caplog.records)
    assert again.stats()["all"]["vectors"] == len(ids) + 50 - 1


def _abs_views(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and views of them no linear map brings back: each view is the image's absolute value, noisy."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim)).astype(np.float32)
    return a, (np.abs(a) + 0.2 * rng.normal(size=(n, dim))).astype(np.float32)


HEAD_CFG = SpaceConfig(dim=32, min_vectors=2000, head=True, head_hidden=256, head_lr=3e-3, head_epochs=40, head_negatives=512,
                       head_min_views=500)


def test_copy_detection_head_learns_what_whitening_cannot_and_is_deterministic(tmp_path):
    """fit_head on views no linear map can bring back to their images: on images it never saw, the head finds
    the view's image first far more often than the learned whitening it starts from; the same inputs give the
    same weights; the space round-trips through its file, and a file whose head does not fit is refused."""
    from indexer.vectors import space as spaces
    anchors, views = _abs_views(1200, 32, seed=0)
    bank = np.random.default_rng(1).normal(size=(3000, 32)).astype(np.float32)
    sample = np.concatenate([anchors, bank])
    base = spaces.fit_learned(sample, anchors, views, HEAD_CFG, 1)
    head = spaces.fit_head(base, np.arange(1200), anchors, views, bank, HEAD_CFG)
    assert head.method == "head" and head.kind == "copy-detection-head" and head.head is not None

    fresh, fresh_views = _abs_views(600, 32, seed=2)  # other images and views, never trained on
    gallery = np.concatenate([fresh, bank])

    def r1(space: spaces.MatchingSpace) -> float:
        return float(((space.apply(fresh_views) @ space.apply(gallery).T).argmax(axis=1) == np.arange(600)).mean())
    assert r1(head) >= r1(base) + 0.05, (r1(base), r1(head))

    again = spaces.fit_head(base, np.arange(1200), anchors, views, bank, HEAD_CFG)
    assert again.fingerprint() == head.fingerprint()

    saved = spaces.save(tmp_path, head)
    loaded = spaces.load(tmp_path, 1, saved.sha256, 32)
    assert loaded.kind == "copy-detection-head" and loaded.fingerprint() == head.fingerprint()
    assert np.array_equal(loaded.apply(fresh_views), head.apply(fresh_views))
    assert "copy-detection head" in loaded.summary()
    w1, b1, w2 = head.head
    import dataclasses
    bad = spaces.save(tmp_path, dataclasses.replace(head, version=2, head=(w1, b1, w2[:5])))
    with pytest.raises(ValueError, match="head's shapes"):
        spaces.load(tmp_path, 2, bad.sha256, 32)


def test_index_fits_its_space_with_the_head_publishes_it_and_reopens_it(store, caplog):
    """A store with the model at hand: the space is learned whitening over re-upload pairs and hard views,
    with the copy-detection head on top; the indexes are built in it, the checkpoint names it, and a
    reopen loads it from its file (the same arrays, no refit); with the head off the same data gives
    learned whitening alone."""
    anchors, views = _abs_views(1200, 32, seed=0)
    bank = np.random.default_rng(1).normal(size=(1500, 32)).astype(np.float32)
    ids = populate(store, np.concatenate([anchors, bank]))
    asked: list[int] = []

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
        return anchors[:300], views[:300]

    def hard(n: int) -> tuple[np.ndarray, np.ndarray]:
        asked.append(n)
        return ids[:1200], views

    cfg = IndexConfig(exact_threshold=10**9)
    with caplog.at_level(logging.INFO, logger="indexer.vectors.space"):
        index = VectorIndex(store, cfg, dataclasses_replace(HEAD_CFG, head_images=1200), pairs=pairs, views=hard)
    assert asked == [1200] and index.space.kind == "copy-detection-head"
    assert "held-out R@1" in caplog.text
    index.save()
    cp = store.catalog.checkpoint("all")
    assert cp.params["space_version"] == index.space.version and cp.params["dim"] == 32
    # an image's view finds it first through the index (the head applied to queries as to the stored rows)
    def found(ix: VectorIndex) -> float:
        return float(np.mean([h.ids[0] == i for h, i in zip(ix.search(views[:200], 1, "all"), ids[:200])]))
    with_head = found(index)
    again = VectorIndex(store, cfg, HEAD_CFG, pairs=pairs, views=hard)
    assert again.space.fingerprint() == index.space.fingerprint() and asked == [1200]

    off = VectorIndex(store, cfg, dataclasses_replace(HEAD_CFG, head=False), pairs=pairs, views=hard,
                      auto_rebuild=False)
    off.rebuild()
    assert off.space.kind == "learned-whiten" and off.space.head is None
    assert with_head >= found(off) + 0.1, (with_head, found(off))


def dataclasses_replace(obj, **kw):  # type: ignore[no-untyped-def]
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_hard_views_are_seeded_cached_and_made_from_stored_thumbnails(settings, store, tiny_embedder, tmp_path):
    """Hard views of real stored thumbnails, embedded by a real (tiny) model: ``per_image`` views of each
    image in a seeded order, cached beside the spaces, the same again when made afresh, others for
    another seed."""
    from flagmatch.wiring import ingest_into
    from indexer.ingest.sources import iter_sources
    from indexer.vectors import space as spaces
    from tests.helpers import write_images
    write_images(tmp_path / "in", 24, fmt="PNG", ext="png")
    ingest_into(settings, iter_sources([str(tmp_path / "in")]), store=store, embedder=tiny_embedder)
    ids, views = spaces.hard_views(store, tiny_embedder, 20, per_image=2)
    assert views.shape == (40, tiny_embedder.info.dim) and np.isfinite(views).all()
    assert ids[0::2].tolist() == ids[1::2].tolist() and len(set(ids.tolist())) == 20
    assert set(ids.tolist()) <= set(store.catalog.image_ids())
    assert not np.allclose(views[0], views[1])  # two different edits of one image
    cache = store.index_dir / "space-views.npz"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    cached = spaces.hard_views(store, tiny_embedder, 20, per_image=2)
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(cached[1], views)
    cache.unlink()
    fresh = spaces.hard_views(store, tiny_embedder, 20, per_image=2)
    assert np.array_equal(fresh[0], ids) and np.allclose(fresh[1], views, atol=1e-5)
    other = spaces.hard_views(store, tiny_embedder, 20, seed=99, per_image=2)
    assert not np.array_equal(other[0], ids)
    # the store grows: both caches are drawn again from every image it holds, exactly as a first draw would be
    # (one store gives one space, whenever its first fit ran)
    spaces.hard_views(store, tiny_embedder, 20, per_image=2)
    pairs = spaces.reupload_pairs(store, tiny_embedder, 20)
    write_images(tmp_path / "more", 24, start=100, fmt="PNG", ext="png")
    ingest_into(settings, iter_sources([str(tmp_path / "more")]), store=store, embedder=tiny_embedder)
    grown_views = spaces.hard_views(store, tiny_embedder, 20, per_image=2)
    grown_pairs = spaces.reupload_pairs(store, tiny_embedder, 20)
    assert not np.array_equal(grown_views[0], ids) and grown_pairs[0].shape == pairs[0].shape
    for cached_file in ("space-views.npz", "space-pairs.npz"):
        (store.index_dir / cached_file).unlink()
    first_views = spaces.hard_views(store, tiny_embedder, 20, per_image=2)
    first_pairs = spaces.reupload_pairs(store, tiny_embedder, 20)
    assert np.array_equal(first_views[0], grown_views[0]) and np.allclose(first_views[1], grown_views[1], atol=1e-5)
    assert np.allclose(first_pairs[0], grown_pairs[0], atol=1e-5) and np.allclose(first_pairs[1], grown_pairs[1],
                                                                                  atol=1e-5)
