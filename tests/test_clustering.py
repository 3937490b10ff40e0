from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import adjusted_rand_score

from clustering.identity import match_clusters
from clustering.job import ClusterParams, assign_new, run_clustering
from indexer.storage.clusters import ClusterStore
from indexer.storage.catalog import FlagRequest
from indexer.errors import ClusteringError
from tests.helpers import child_env, clean_env
from tests.helpers.vectors import populate

DIM = 192


def mixture(n_per: int, groups: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated groups (centres from a fixed seed, so group g is the same in every call)."""
    centres = np.random.default_rng(12345).normal(size=(16, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(groups, n_per)
    v = centres[labels] + rng.normal(scale=0.5 / np.sqrt(DIM), size=(len(labels), DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), labels


PARAMS = ClusterParams(min_cluster_size=10, neighbors=15, seed=7)


@pytest.fixture
def cstore(store):
    return ClusterStore(store)


def labels_of(cstore, run_id: int, n: int) -> np.ndarray:
    ids, cl, _, _ = cstore.map_points(run_id)
    out = np.full(n, -1)
    out[np.asarray(ids) - 1] = cl
    return out


def test_clusters_recover_known_groups_and_rerun_is_identical(store, cstore):
    v, truth = mixture(120, [0, 1, 2, 3, 4])
    populate(store, v, np.ones(len(v), bool))
    r1 = run_clustering(store, cstore, PARAMS)
    got = labels_of(cstore, r1.run.id, len(v))
    assert adjusted_rand_score(truth, got) >= 0.9
    assert r1.clusters == 5 and r1.summary["new"] == 5
    cl = cstore.clusters(r1.run.id)
    assert all(len(c.exemplars) == 6 and c.mean_probability > 0.5 for c in cl)
    ex = cl[0].exemplars
    assert all(got[i - 1] == cl[0].id for i in ex)  # exemplars are members of their cluster
    # every member has 2-D coordinates and a probability; noise is kept, not dropped
    ids, _, xs, ys = cstore.map_points(r1.run.id)
    assert len(ids) == len(v) and np.isfinite(xs).all() and np.isfinite(ys).all()
    r2 = run_clustering(store, cstore, PARAMS)
    assert np.array_equal(labels_of(cstore, r2.run.id, len(v)), got)  # same ids, same members
    assert r2.summary == {"new": 0, "grown": 0, "shrunk": 0, "stable": 5, "merged": 0, "split": 0, "vanished": 0}
    assert cstore.current_run().id == r2.run.id


def test_a_new_group_is_new_and_the_others_keep_ids_and_names(store, cstore):
    v, truth = mixture(100, [0, 1, 2, 3])
    populate(store, v, np.ones(len(v), bool))
    r1 = run_clustering(store, cstore, PARAMS)
    first = labels_of(cstore, r1.run.id, len(v))
    group_to_cluster = {g: int(np.bincount(first[truth == g][first[truth == g] >= 0]).argmax()) for g in range(4)}
    cstore.update_identity(group_to_cluster[2], actor="alice", name="beach set", status="confirmed")
    extra, _ = mixture(100, [9], seed=2)
    populate(store, extra, np.ones(len(extra), bool), start=len(v) + 1)
    r2 = run_clustering(store, cstore, PARAMS)
    assert r2.summary["new"] == 1 and r2.summary["stable"] + r2.summary["grown"] == 4
    second = labels_of(cstore, r2.run.id, len(v) + len(extra))
    for g, cid in group_to_cluster.items():
        assert np.bincount(second[: len(v)][truth == g][second[: len(v)][truth == g] >= 0]).argmax() == cid
    named = cstore.cluster(r2.run.id, group_to_cluster[2])
    assert (named.name, named.status, named.reviewed_by) == ("beach set", "confirmed", "alice")
    new_cluster = [c for c in cstore.clusters(r2.run.id) if c.change == "new"][0]
    assert set(second[len(v):]) == {new_cluster.id}


def test_incremental_assignment_places_new_members_provisionally(store, cstore):
    v, truth = mixture(100, [0, 1, 2, 3, 4, 5])
    flagged = np.ones(len(v), bool)
    late = np.flatnonzero(truth == 3)[:10]
    flagged[late] = False
    populate(store, v, flagged)
    r = run_clustering(store, cstore, PARAMS.__class__(min_cluster_size=10, neighbors=15, seed=7, backend="hdbscan"))
    lab = labels_of(cstore, r.run.id, len(v))
    group3 = np.bincount(lab[(truth == 3) & flagged]).argmax()
    store.catalog.set_flag([int(i) + 1 for i in late], FlagRequest("manual", None, "bob"), flag=True)
    assert assign_new(store, cstore) == 10
    placed = {m.image_id: m for m in cstore.members(r.run.id, int(group3))}
    assert all(int(i) + 1 in placed and placed[int(i) + 1].provisional for i in late)
    assert assign_new(store, cstore) == 0  # nothing new the second time
    look = cstore.lookup([int(late[0]) + 1])
    assert look[int(late[0]) + 1]["provisional"] is True and look[int(late[0]) + 1]["id"] == group3


def test_identity_matching_names_merges_splits_and_vanishing():
    prev = {1: set(range(0, 100)), 2: set(range(100, 200)), 3: set(range(200, 300)), 4: set(range(300, 400))}
    new = [set(range(0, 200)),                      # 1 and 2 merged
           set(range(200, 250)), set(range(250, 300)),  # 3 split
           set(range(500, 560))]                     # new; 4 vanished
    m = match_clusters(new, prev)
    assert [x.change for x in m.matches] == ["merged", "split", "split", "new"]
    assert m.matches[0].identity in (1, 2) and m.matches[1].identity == 3 and m.matches[2].identity is None
    assert m.vanished == [4]
    assert m.summary()["merged"] == 1 and m.summary()["vanished"] == 1
    grown = match_clusters([set(range(0, 100)) | set(range(200, 220)), set(range(100, 170))],
                           {1: set(range(0, 100)), 2: set(range(100, 200))})
    assert [x.change for x in grown.matches] == ["grown", "shrunk"]


def test_too_few_flagged_images_is_a_clear_error(store, cstore, settings):
    v, _ = mixture(3, [0, 1])
    populate(store, v, np.ones(len(v), bool))
    with pytest.raises(ClusteringError, match="only 6 flagged images: clustering needs at least"):
        run_clustering(store, cstore, PARAMS)
    from flagmatch.cli import main
    r = CliRunner().invoke(main, ["cluster", "--home", settings.home], env=clean_env())
    assert r.exit_code == 1 and "too_few_images" in r.output
    r = CliRunner().invoke(main, ["cluster", "--home", settings.home, "--since", "soon"], env=clean_env())
    assert r.exit_code == 2 and "7d" in r.output


def test_a_killed_run_leaves_the_previous_run_current(store, cstore, settings):
    v, _ = mixture(150, [0, 1, 2, 3])
    populate(store, v, np.ones(len(v), bool))
    first = run_clustering(store, cstore, PARAMS)
    env = child_env(FLAGMATCH_HOME=settings.home, FLAGMATCH_CLUSTER_MIN_SIZE="10")
    p = subprocess.Popen([sys.executable, "-m", "flagmatch.cli", "cluster"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once it has started its run
        if any(r.status == "running" for r in cstore.runs()):
            break
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    runs = cstore.runs()
    assert runs[0].status == "running" and runs[0].id > first.run.id
    assert cstore.current_run().id == first.run.id
    assert len(cstore.clusters(first.run.id)) == 4
    # the CLI lists the current (previous) run
    from flagmatch.cli import main
    r = CliRunner().invoke(main, ["clusters", "--home", settings.home], env=clean_env())
    assert r.exit_code == 0 and f"run {first.run.id} (done" in r.output


def test_since_clusters_only_recent_flags(store, cstore, settings):
    import datetime as dt
    v, _ = mixture(100, [0, 1, 2])
    populate(store, v, np.ones(len(v), bool))
    from flagmatch.cli import main
    r = CliRunner().invoke(main, ["cluster", "--home", settings.home, "--cluster-min-size", "10"], env=clean_env())
    assert r.exit_code == 0, r.output
    assert "3 clusters" in r.output and "new 3" in r.output
    cutoff = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(days=1)
    with pytest.raises(ClusteringError, match="flagged since"):
        run_clustering(store, cstore, PARAMS, since=cutoff)
    r = CliRunner().invoke(main, ["cluster", "--home", settings.home, "--since", "7d", "--cluster-min-size", "10"], env=clean_env())
    assert r.exit_code == 0 and "flagged since" in r.output
    assert cstore.current_run().scope == "full"  # a recent-only run never replaces the full one


def test_near_duplicate_families_are_components_above_the_threshold():
    from clustering.job import near_duplicate_families
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    # 10 families of 4 copies (tiny noise), 30 unrelated singletons
    copies = np.repeat(base[:10], 4, axis=0) + rng.normal(scale=0.02, size=(40, 64)).astype(np.float32)
    x = np.concatenate([copies, base[10:]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fam = near_duplicate_families(x, 0.9)
    assert (fam[40:] == -1).all()
    for f in range(10):
        assert len(set(fam[4 * f: 4 * f + 4].tolist())) == 1 and fam[4 * f] >= 0
    assert len(set(fam[:40].tolist())) == 10


def test_families_stay_whole_in_the_matching_space(store, cstore):
    """Tight families (re-uploads) inside broad groups: HDBSCAN alone splits or merges them; with the
    matching space and the near-duplicate join each family is one cluster."""
    from indexer.vectors.space import SpaceConfig
    from indexer.vectors.vector_index import IndexConfig, VectorIndex
    v, groups = mixture(500, [0, 1, 2, 3, 4])  # 2,500 images in 5 broad groups
    rng = np.random.default_rng(5)
    fam_of = np.full(len(v), -1)
    for f, start in enumerate(range(0, 2500, 125)):  # 20 families of 6 copies
        members = np.arange(start, start + 6)
        v[members] = v[start] + rng.normal(scale=0.01 / np.sqrt(DIM), size=(6, DIM)).astype(np.float32)
        fam_of[members] = f
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    populate(store, v, np.ones(len(v), bool))
    VectorIndex(store, IndexConfig(exact_threshold=10**9), SpaceConfig(dim=64, min_vectors=2000)).save()
    report = run_clustering(store, cstore, ClusterParams(min_cluster_size=10, neighbors=15, seed=7, join=0.9))
    got = labels_of(cstore, report.run.id, len(v))
    for f in range(20):
        members = got[fam_of == f]
        assert members[0] >= 0 and (members == members[0]).all(), f"family {f} split: {members}"
        # and nothing else joined it
        assert (got == members[0]).sum() == 6


@pytest.mark.filterwarnings("ignore")  # umap, pynndescent and numba warn; the job ignores them the same way
@pytest.mark.parametrize("n", [1500, 5000])  # below 4,096 the graph is exact, above it NN-descent
def test_the_shared_graph_and_concurrent_layouts_give_umaps_own_embedding(n):
    """One neighbour graph for both embeddings, laid out on two threads at once, changes nothing: the
    clustering space is what UMAP's own fit gives for the seed, and the map what a UMAP fit from that
    graph gives."""
    from clustering import jit
    from clustering.job import _umap, layouts, neighbour_graph
    jit.enable()
    import umap
    x, _ = mixture(n // 5, [0, 1, 2, 3, 4], seed=3)
    p = ClusterParams(neighbors=15, seed=7, epochs=60)
    state = np.random.RandomState(p.seed)
    knn = neighbour_graph(x, p.neighbors, state)
    emb, xy, _ = layouts(x, knn, p, state)
    own = umap.UMAP(n_components=p.dims, n_neighbors=p.neighbors, metric="cosine", min_dist=0.0, random_state=p.seed,
                    low_memory=True, init="spectral", n_epochs=p.epochs).fit_transform(x)
    np.testing.assert_allclose(emb, own, rtol=0, atol=1e-4)
    again = _umap(2, p.neighbors, 0.1, p.seed, n, 100, neighbour_graph(x, p.neighbors, np.random.RandomState(p.seed)))
    assert (knn is None) == (n < 4096)
    np.testing.assert_allclose(xy, again.fit_transform(x), rtol=0, atol=1e-4)


def test_numba_compiles_only_what_the_job_calls_and_releases_the_gil():
    """pynndescent's eagerly typed distances and trees (unused by the cosine job) are left to compile on
    first call; the heap and random helpers the job calls stay eager; its parallel loops compile as plain
    loops (the job runs it on one thread); compiled functions release the GIL (the two layouts run on two
    cores)."""
    code = ("from clustering import jit; jit.enable()\n"
            "import umap, pynndescent.rp_trees as rp, pynndescent.utils as ut, pynndescent.distances as d\n"
            "import pynndescent.kernels as k\n"
            "from umap import layouts\n"
            "print(len(rp.angular_random_projection_split.signatures), len(d.euclidean.signatures),"
            " len(ut.tau_rand_int.signatures) > 0,"
            " layouts._nb_optimize_layout_euclidean_single_epoch.targetoptions.get('nogil'),"
            " k.generate_graph_update_array_batched.targetoptions.get('parallel', False))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         check=True).stdout.split()
    assert out == ["0", "0", "True", "True", "False"], out


@pytest.mark.filterwarnings("ignore")
def test_the_cached_nn_descent_gives_the_librarys_graph(monkeypatch):
    """clustering.nndescent (cacheable) against pynndescent's own nn_descent, on the same data and seed."""
    from clustering import jit
    jit.enable()
    import pynndescent
    from pynndescent import pynndescent_ as lib
    from clustering import nndescent
    x, _ = mixture(1200, [0, 1, 2, 3, 4], seed=4)  # 6,000 points

    def graph() -> tuple[np.ndarray, np.ndarray]:
        return pynndescent.NNDescent(x, metric="cosine", n_neighbors=15, random_state=11, low_memory=True,
                                     n_jobs=1).neighbor_graph

    monkeypatch.setattr(lib, "nn_descent", nndescent._library_nn_descent)
    want = graph()
    calls = []
    monkeypatch.setattr(lib, "nn_descent", lambda *a, **kw: calls.append(1) or nndescent.nn_descent(*a, **kw))
    got = graph()
    assert calls and (got[0] == want[0]).all() and np.allclose(got[1], want[1], rtol=0, atol=1e-6)
    assert nndescent._nn_descent_dot.signatures  # the cached path ran, not the library fallback


def test_flagged_videos_join_the_job_and_re_uploads_of_one_clip_group_together(tmp_path, opennsfw):
    """Videos are points of the clustering job through their own vector (their keyframes' mean): twelve
    re-encodes of each of two clips — other sizes, bit rates, codecs, trims — group by the clip they copy."""
    pytest.importorskip("av")
    from flagmatch.settings import Settings
    from flagmatch.wiring import ingest_into, open_store
    from indexer.ingest.sources import iter_sources
    from tests.helpers import photo_image
    from tests.helpers.video import reencode, slideshow
    folder = tmp_path / "in"
    folder.mkdir()
    truth = {}
    for g, seeds in enumerate(([11, 12, 13], [14, 15, 16])):
        base = slideshow([photo_image(s) for s in seeds], seconds_each=2.0)
        for k in range(12):
            fmt, codec = (("webm", "libvpx-vp9"), ("mp4", "mpeg4"))[k % 2]
            size = ((160, 120), (192, 144), (128, 96))[k % 3]
            name = f"g{g}_{k:02d}.{fmt}"
            (folder / name).write_bytes(reencode(base, size, fmt=fmt, codec=codec, bit_rate=120_000 + 20_000 * k,
                                                 start_s=0.2 * (k % 4)))
            truth[name] = g
    s = Settings.load({"home": str(tmp_path / "home"), "model": "opennsfw", "flag_threshold": 0.0}, environ={})
    store = open_store(s)
    assert ingest_into(s, iter_sources([str(folder)]), store=store, embedder=opennsfw).counts.new == 24
    cs = ClusterStore(store)
    r = run_clustering(store, cs, ClusterParams(min_cluster_size=5, neighbors=8, seed=7))
    ids, cl, _, _ = cs.map_points(r.run.id)
    recs = store.catalog.get_many(ids)
    assert all(recs[i].kind == "video" for i in ids) and len(ids) == 24
    got = list(cl)
    want = [truth[recs[i].paths[0].split("/")[-1]] for i in ids]
    assert r.clusters == 2 and adjusted_rand_score(want, got) == 1.0, (got, want)
    store.close()
