"""Copy families, the level below a cluster: pairs of stored images that local features show as one picture —
with what many uploads share (a screenshot frame, a caption band, rotation corners) discounted, and mirrors
tried — pull strays into their copies' cluster and form families inside each cluster, stored with the run."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from clustering.job import (ClusterParams, copy_families, copy_pair_check, copy_pairs, follow_copies, pair_check,
                            run_clustering)
from flagmatch.wiring import ingest_into
from indexer.ingest.sources import iter_sources
from indexer.storage.clusters import ClusterStore
from tests.helpers import captioned, encode, photo_image


def _framed(im: Image.Image) -> Image.Image:
    """One app's screenshot frame: the same bars, avatars and text around every picture pasted into it."""
    canvas = Image.new("RGB", (im.width + 300, im.height + 200), (250, 250, 250))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, canvas.width, 40), fill=(40, 60, 150))
    for i in range(6):
        d.ellipse((12, 58 + 30 * i, 34, 80 + 30 * i), fill=(200, 90, 40))
        d.text((44, 60 + 30 * i), f"@someone{i} 3m ago", fill=(20, 20, 20))
    d.rectangle((0, canvas.height - 50, canvas.width, canvas.height), fill=(40, 60, 150))
    canvas.paste(im, (240, 70))
    return canvas


EDITS = {"original": lambda im: im, "mirror": ImageOps.mirror, "frame": _framed,
         "caption": lambda im: captioned(im, "when the weekend finally arrives #mood", 0.25),
         "rotate": lambda im: im.rotate(8, resample=Image.BILINEAR, expand=True)}


def _ingest_families(tmp_path, settings, store, embedder, pictures: int = 4) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``pictures`` photos, each as every edit in ``EDITS``: image ids, each one's picture, each one's edit."""
    folder = tmp_path / "in"
    folder.mkdir()
    truth: dict[str, tuple[int, str]] = {}
    for f in range(pictures):
        im = photo_image(60 + f, (640, 480))
        for name, edit in EDITS.items():
            path = folder / f"p{f}-{name}.png"
            path.write_bytes(encode(edit(im), "PNG"))
            truth[hashlib.sha256(path.read_bytes()).hexdigest()] = (f, name)
    ingest_into(settings.replace(flag_threshold=0.0), iter_sources([str(folder)]), store=store, embedder=embedder)
    ids = np.asarray(store.catalog.image_ids(), np.int64)
    recs = store.catalog.get_many(ids.tolist())
    return ids, np.array([truth[recs[int(i)].sha256][0] for i in ids]), [truth[recs[int(i)].sha256][1] for i in ids]


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)  # local features: the catalog plays no part
def test_copies_verify_through_mirrors_and_a_shared_frame_or_caption_joins_no_two_pictures(
        store, tiny_embedder, tmp_path, settings):
    ids, picture, edit = _ingest_families(tmp_path, settings, store, tiny_embedder)
    n = len(ids)
    x = np.eye(n, dtype=np.float32)  # every pair a candidate: the verification alone decides
    a, b = copy_pairs(x, copy_pair_check(store, ids), k=n - 1)
    assert len(a) and (picture[a] == picture[b]).all(), [(edit[i], edit[j]) for i, j in zip(a, b)
                                                         if picture[i] != picture[j]]
    pairs = {(min(i, j), max(i, j)) for i, j in zip(a.tolist(), b.tolist())}
    for f in range(4):  # each picture's mirror verifies with its original; all its files are one family
        rows = np.flatnonzero(picture == f)
        orig, mirror = (int(rows[[edit[r] == e for r in rows].index(True)]) for e in ("original", "mirror"))
        assert (min(orig, mirror), max(orig, mirror)) in pairs
        fam = copy_families(np.zeros(n, np.int64), a, b)
        assert len(set(fam[rows].tolist())) == 1 and fam[rows[0]] >= 0
    # what the discount is for: compared whole, two different pictures in the same frame or under the same
    # caption verify (the overlay's corners agree)
    rows = np.arange(n)
    framed = np.array([r for r in rows if edit[r] in ("frame", "caption")])
    ia, ib = np.triu_indices(len(framed), 1)
    whole = pair_check(store, ids)(framed[ia], framed[ib])
    assert (whole & (picture[framed[ia]] != picture[framed[ib]])).any()


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)  # hashes and local features only
def test_flat_pictures_recompressed_in_grey_are_copies_by_their_pdq(store, tiny_embedder, tmp_path, settings):
    """Drawn pictures give ORB too few corners once greyed and recompressed at half size; their PDQ hashes stay
    within 31 bits (HMA's threshold), so copy families count them as copies — and still no two pictures."""
    import io
    from tests.helpers import drawn_image, ingest_flagged

    def grey_half(im: Image.Image) -> Image.Image:
        small = ImageOps.grayscale(im.resize((im.width // 2, im.height // 2))).convert("RGB")
        return Image.open(io.BytesIO(encode(small, "JPEG", quality=30))).convert("RGB")
    pictures = {f"p{k}": drawn_image(seed) for k, seed in enumerate((102, 103, 110, 111))}
    copies = {f"c{k}": grey_half(pictures[f"p{k}"]) for k in range(2)}
    ids = ingest_flagged(settings, store, tiny_embedder, tmp_path / "in", {**pictures, **copies})
    names = list(ids)
    rows = np.array([ids[n] for n in names], np.int64)
    a, b = np.triu_indices(len(names), 1)
    same = np.array([names[i][1:] == names[j][1:] for i, j in zip(a, b)])
    by_hash = copy_pair_check(store, rows, 31)(a, b)
    by_features = copy_pair_check(store, rows, -1)(a, b)
    assert by_hash[same].all() and not by_features[same].any()  # the copies: only their hashes tell
    assert not by_hash[~same].any()


def test_an_image_follows_its_verified_copies_and_families_stay_inside_clusters():
    labels = np.array([0, 0, 0, 1, 1, 1, -1, 2])
    # 3 has three copies in cluster 0 and none in its own: it follows them; 0, 1 and 2 have as many copies in
    # their own cluster as in 3's and stay; 6 (noise) has one copy in cluster 1; 7's only copy is in cluster 1;
    # 5 has one copy in its own cluster and one in 7's: it stays
    a = np.array([3, 3, 3, 0, 1, 6, 4, 7])
    b = np.array([0, 1, 2, 1, 2, 4, 5, 5])
    got = follow_copies(labels, a, b)
    assert got.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    fam = copy_families(got, a, b)
    assert fam[0] == fam[1] == fam[2] == fam[3] >= 0 and fam[4] == fam[5] == fam[6] == fam[7] >= 0
    assert fam[0] != fam[4]
    # a copy pair across two clusters joins no families; noise has none
    fam = copy_families(np.array([0, 0, 1, 1, -1, -1]), np.array([0, 1, 2, 4]), np.array([1, 2, 3, 5]))
    assert fam[0] == fam[1] >= 0 and fam[2] == fam[3] >= 0 and fam[0] != fam[2] and (fam[4:] == -1).all()
    assert (follow_copies(labels, a[:0], b[:0]) == labels).all()  # no pairs: nothing moves
    assert (copy_families(labels, a[:0], b[:0]) == -1).all()


def test_the_job_stores_families_and_the_same_store_gives_the_same_ones(store, tiny_embedder, tmp_path, settings):
    ids, picture, edit = _ingest_families(tmp_path, settings, store, tiny_embedder, pictures=5)
    cstore = ClusterStore(store)
    params = ClusterParams(min_cluster_size=3, neighbors=8, seed=7)
    runs = [run_clustering(store, cstore, params) for _ in range(2)]
    assert "families" in runs[0].timings
    got = []
    for r in runs:
        members = {m.image_id: m for cl in cstore.clusters(r.run.id) for m in cstore.members(r.run.id, cl.id)}
        members.update({m.image_id: m for m in cstore.members(r.run.id, None)})
        got.append([(members[int(i)].cluster_id, members[int(i)].family) for i in ids])
        family = np.array([-1 if members[int(i)].family is None else members[int(i)].family for i in ids])
        cluster = [members[int(i)].cluster_id for i in ids]
        assert (family >= 0).sum() >= len(ids) // 2
        for f in set(family[family >= 0].tolist()):  # a family is copies of one picture, inside one cluster
            rows = np.flatnonzero(family == f)
            assert len(set(picture[rows].tolist())) == 1 and len({cluster[r] for r in rows}) == 1
        for cl in cstore.clusters(r.run.id):
            sizes = cstore.family_sizes(r.run.id, cl.id)
            assert sum(sizes.values()) == sum(1 for i in range(len(ids)) if cluster[i] == cl.id and family[i] >= 0)
    assert got[0] == got[1]
    # the viewer's cluster page, copies together: each family's tiles in one run, the count in the header
    from itertools import groupby
    from flagmatch.runtime import build_app
    from tests.helpers.web import TOKEN, login
    client = build_app(settings.replace(api_tokens=(f"rita:{TOKEN}",)), embedder=tiny_embedder).test_client()
    assert login(client).status_code == 302
    run = runs[1].run.id
    cl = max(cstore.clusters(run), key=lambda c: sum(cstore.family_sizes(run, c.id).values()))
    sizes = cstore.family_sizes(run, cl.id)
    page = client.get(f"/clusters/{cl.id}?sort=copies")
    assert page.status_code == 200
    tags = [int(t) for t in re.findall(r'data-family="(\d+)"', page.text)]
    assert sorted(set(tags)) == sorted(sizes) and len([k for k, _ in groupby(tags)]) == len(sizes)
    assert f"{len(sizes)} {'family' if len(sizes) == 1 else 'families'} of copies ({sum(sizes.values())} images)" in page.text
    assert client.get(f"/clusters/{cl.id}?sort=nonsense").status_code == 400
    # off: no families are stored
    r = run_clustering(store, cstore, ClusterParams(min_cluster_size=3, neighbors=8, seed=7, families=False))
    assert "families" not in r.timings
    assert all(m.family is None for cl in cstore.clusters(r.run.id) for m in cstore.members(r.run.id, cl.id))


def test_newly_flagged_copies_join_their_family_between_runs(store, tiny_embedder, tmp_path, settings, monkeypatch):
    """``flagmatch cluster --assign-new``: a copy flagged after the run goes where its verified copies are and
    joins their family (or starts one with them), as the job would have put it; the API's cluster facts say so."""
    from clustering import job
    from clustering.job import assign_new
    monkeypatch.setattr(job, "NEW_COPIES_CHUNK", 8)  # the members' vectors read in several chunks
    from indexer.storage.catalog import FlagRequest
    ids, picture, edit = _ingest_families(tmp_path, settings, store, tiny_embedder, pictures=7)
    late = np.array([k for k, e in enumerate(edit) if e in ("mirror", "caption")])
    store.catalog.set_flag([int(ids[k]) for k in late], FlagRequest("manual", None, "bob"), flag=False)
    cstore = ClusterStore(store)
    run = run_clustering(store, cstore, ClusterParams(min_cluster_size=3, neighbors=8, seed=7)).run.id
    before = cstore.placements(run)
    assert not any(int(ids[k]) in before for k in late)
    store.catalog.set_flag([int(ids[k]) for k in late], FlagRequest("manual", None, "bob"), flag=True)
    assert assign_new(store, cstore) == len(late)
    after = cstore.placements(run)
    row = {int(i): k for k, i in enumerate(ids)}
    for image_id, (cluster, fam) in before.items():  # members keep their cluster, and any family they had
        assert after[image_id][0] == cluster and (fam is None or after[image_id][1] == fam)
    families: dict[int, list[int]] = {}
    for image_id, (cluster, fam) in after.items():
        if fam is not None:
            families.setdefault(fam, []).append(image_id)
    joined = [int(ids[k]) for k in late if after[int(ids[k])][1] is not None]
    assert len(joined) >= len(late) // 2, (len(joined), len(late))
    for fam, members in families.items():  # still copies of one picture, inside one cluster
        assert len({picture[row[i]] for i in members}) == 1 and len({after[i][0] for i in members}) == 1, fam
    for image_id in joined:  # each joined a family of its own picture that holds an image of the run
        assert any(i in before for i in families[after[image_id][1]])
    # the cluster facts a search hit and GET /api/v1/images/<id> carry: the family and its size
    from flagmatch.runtime import build_app
    from tests.helpers.web import TOKEN
    client = build_app(settings.replace(api_tokens=(f"rita:{TOKEN}",)), embedder=tiny_embedder).test_client()
    got = client.get(f"/api/v1/images/{joined[0]}", headers={"Authorization": f"Bearer {TOKEN}"}).get_json()
    fam = after[joined[0]][1]
    assert got["cluster"]["family"] == fam and got["cluster"]["family_size"] == len(families[fam]) >= 2
    assert got["cluster"]["provisional"] is True and got["cluster"]["id"] == after[joined[0]][0]
    alone = [int(i) for i in ids if after[int(i)][1] is None]
    for image_id in alone[:1]:
        got = client.get(f"/api/v1/images/{image_id}", headers={"Authorization": f"Bearer {TOKEN}"}).get_json()
        assert got["cluster"]["family"] is None and got["cluster"]["family_size"] is None
