"""The offline clustering job: flagged vectors → UMAP (cosine) to a clustering space and to 2-D for
the map → HDBSCAN → clusters matched to the previous run's → stored as a new current run.

A plain function with its inputs passed in; the CLI and the viewer wrap it. Above ``sample`` images
UMAP and HDBSCAN are fitted on a seeded sample and the rest are placed from their nearest fitted
neighbours (``NeighbourPlacer``) and by HDBSCAN's prediction, so memory and time stay bounded. Seeds are
fixed: the same data gives the same clusters."""
from __future__ import annotations

import datetime as dt
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import joblib
import numpy as np

from clustering.identity import match_clusters
from indexer.storage.clusters import ClusterStore, Member, NewCluster, RunInfo
from indexer.errors import ClusteringError
from indexer.media.hashes import PDQ_DEFAULT_THRESHOLD
from indexer.storage.files import publish_with
from indexer.vectors.space import MatchingSpace, current_space
from indexer.storage.store import Store

BACKENDS = ("fast_hdbscan", "hdbscan", "sklearn")
# Near-duplicate join (off by default): cosine in the matching space between nearest neighbours, and
# with ``verify`` the same picture by local features (indexer.media.local). Measured on opennsfw features
# (benchmarks/match.py, 300 families of an original of a distinct picture and its nine re-upload edits,
# one run): without a join ARI 0.80, 70 % of families whole; joining mutual neighbours at 0.85 by similarity
# alone ARI 0.38, 3 % whole (families split into partial sub-families); joining verified neighbours at
# 0.3 / 0.5 ARI 0.20 / 0.26, 35 % / 34 % whole, +38 s. Verification fails between *copies* that share an
# overlay: two pictures pasted into the same screenshot frame, under the same sticker or caption band
# agree on the overlay's corners (905 of 2,790 candidate pairs of different families verified, against 73 %
# of same-family pairs), and one such edge merges two families. Both joins stay available
# (--cluster-join, --cluster-verify) for stores where copies carry no shared overlay.
JOIN_SIMILARITY = 0.0
JOIN_NEIGHBOURS = 8
# Copy families (on by default): the level below a cluster. Each image's FAMILY_NEIGHBOURS nearest in the matching
# space are candidates; a pair is a copy when local features show one picture with overlays discounted
# (``indexer.media.local.describe_content``: padding, frames and caption bands do not count) and mirrors tried.
# An image whose verified copies lie more in another cluster than in its own (noise included) follows them
# (FAMILY_ROUNDS rounds at most); then each cluster's verified copies form its families (connected components
# inside the cluster, so one stray pair cannot merge two clusters). Measured on the match benchmark's families
# (300 pictures × 10 files, open_nsfw, benchmarks/match.py --families-only): families whole 0.693 → 0.740, ARI
# 0.793 → 0.803, +49 s for 3,000 images on two cores; offline, candidates from the 4 or 8 nearest gained less
# (whole 0.727), from the 15 nearest no more than from 10. Forming families as clusters of their own instead (the
# join above, or merging clusters joined by 2–4 verified pairs) lost ARI (0.55–0.70) for no more families whole.
FAMILY_NEIGHBOURS = 10
FAMILY_ROUNDS = 5
NEW_COPIES_CHUNK = 50_000  # run members' vectors read at once while newly flagged images find their nearest
VERIFY_CACHE = 20_000  # thumbnails' features held while pairs are verified (≤ ~40 kB each: ≤ ~0.8 GB)
# UMAP optimisation epochs of the clustering space (0: UMAP's default, 200 above 10k points). 100 was
# measured ~1.3x faster with the same ARI on benchmarks/cluster.py's synthetic data, but on the match
# benchmark's real families (300 originals × 10 edits, open_nsfw) it dropped ARI from 0.59 to 0.49: the
# clustering space keeps UMAP's default.
EPOCHS = 0
# The 2-D map only draws: 100 epochs there cost nothing in clusters and save ~8 s at 50k points.
MAP_EPOCHS = 100
EXEMPLARS = 6
Progress = Callable[[str, str], None]  # (phase, message)


@dataclass(frozen=True)
class ClusterParams:
    min_cluster_size: int = 0   # 0: from N
    min_samples: int = 0        # 0: from min_cluster_size
    dims: int = 8
    neighbors: int = 15
    sample: int = 50_000
    # hdbscan: compiled ahead of time. fast_hdbscan fits the 50k sample in 3.0 s against 5.2 s once numba has
    # compiled it, but compiling takes ~40 s on a machine's first run (benchmarks/cluster.py, cold cache).
    backend: str = "hdbscan"
    seed: int = 42
    join: float = JOIN_SIMILARITY  # near-duplicates (similarity ≥ this, in the matching space) form one cluster; 0: off
    epochs: int = EPOCHS           # UMAP optimisation epochs of the clustering space (0: UMAP's own, 200 here)
    verify: bool = False           # a near-duplicate pair must also show one picture by local features (indexer.media.local)
    families: bool = True          # verified copies: strays follow them, and they form families inside clusters
    family_pdq: int = PDQ_DEFAULT_THRESHOLD  # copies also by PDQ within this many bits (-1: local features only)

    def resolve(self, n: int) -> "ClusterParams":
        if self.backend not in BACKENDS:
            raise ClusteringError(f"cluster backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        mcs = self.min_cluster_size or int(max(5, min(100, round(n / 1000))))
        return replace(self, min_cluster_size=mcs, min_samples=self.min_samples or min(mcs, 10))

    def minimum_images(self) -> int:
        return max(20, self.neighbors + 1, 2 * (self.min_cluster_size or 5))


@dataclass(frozen=True)
class RunReport:
    run: RunInfo
    clusters: int
    noise: int
    summary: dict[str, int]
    timings: dict[str, float]


# ------------------------------------------------------------------ HDBSCAN backends

@dataclass
class Fitted:
    labels: np.ndarray          # int, -1 noise
    probabilities: np.ndarray
    outlier_scores: np.ndarray
    persistence: dict[int, float] | None
    model: Any                  # what predict() needs


def fit_hdbscan(x: np.ndarray, p: ClusterParams) -> Fitted:
    if p.backend == "hdbscan":
        import hdbscan
        cl = hdbscan.HDBSCAN(min_cluster_size=p.min_cluster_size, min_samples=p.min_samples,
                             prediction_data=True, core_dist_n_jobs=os.cpu_count() or 1).fit(x)
        pers = {i: float(v) for i, v in enumerate(cl.cluster_persistence_)}
        return Fitted(cl.labels_.astype(np.int64), cl.probabilities_.astype(np.float32),
                      np.nan_to_num(cl.outlier_scores_, nan=1.0).astype(np.float32), pers, cl)
    if p.backend == "fast_hdbscan":
        import fast_hdbscan
        cl = fast_hdbscan.HDBSCAN(min_cluster_size=p.min_cluster_size, min_samples=p.min_samples,
                                  reproducible=True).fit(x)
    else:
        from sklearn.cluster import HDBSCAN
        cl = HDBSCAN(min_cluster_size=p.min_cluster_size, min_samples=p.min_samples, copy=True).fit(x)
    labels = cl.labels_.astype(np.int64)
    probs = cl.probabilities_.astype(np.float32)
    # These backends give no GLOSH scores: the outlier score is 1 - membership probability.
    return Fitted(labels, probs, (1.0 - probs).astype(np.float32), None, None)


def predict(fitted: Fitted, fit_x: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place new points into the fitted clusters: HDBSCAN's approximate_predict where the backend has
    it, else a vote of the 10 nearest fitted points in the clustering space."""
    if fitted.model is not None:
        import hdbscan
        labels, strengths = hdbscan.approximate_predict(fitted.model, x)
        scores = hdbscan.approximate_predict_scores(fitted.model, x)
        return labels.astype(np.int64), strengths.astype(np.float32), np.nan_to_num(scores, nan=1.0).astype(np.float32)
    from sklearn.neighbors import NearestNeighbors
    k = min(10, len(fit_x))
    nn = NearestNeighbors(n_neighbors=k).fit(fit_x)
    _, idx = nn.kneighbors(x)
    neigh = fitted.labels[idx]
    labels = np.empty(len(x), np.int64)
    probs = np.empty(len(x), np.float32)
    for i, row in enumerate(neigh):
        vals, counts = np.unique(row, return_counts=True)
        best = vals[np.argmax(counts)]
        labels[i] = best
        agree = row == best
        probs[i] = 0.0 if best < 0 else float(agree.mean() * fitted.probabilities[idx[i][agree]].mean())
    return labels, probs, (1.0 - probs).astype(np.float32)


# ------------------------------------------------------------------ near-duplicate families

PairCheck = Callable[[np.ndarray, np.ndarray], np.ndarray]  # rows a, rows b -> same picture?


def nearest(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows by inner product, itself included (exact search up to 50,000 rows, IVF-Flat
    visiting 1/8 of its lists beyond; -1 where fewer were found)."""
    import faiss
    n, d = x.shape
    xs = np.ascontiguousarray(x, np.float32)
    if n <= 50_000:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(xs[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)])
        index.nprobe = max(1, nlist // 8)
    index.add(xs)
    return index.search(xs, min(k + 1, n))


def near_duplicate_families(x: np.ndarray, threshold: float, k: int = JOIN_NEIGHBOURS,
                            verify: PairCheck | None = None) -> np.ndarray:
    """Family id per row (-1: no near-duplicate): the connected components of the graph whose edges are
    mutual ``k``-nearest-neighbour pairs with cosine ≥ ``threshold`` (exact search up to 50,000 rows,
    IVF-Flat visiting 1/8 of its lists beyond). With ``verify``, every ``k``-nearest pair at or above the
    threshold is a candidate (mutual or not) and an edge only when ``verify`` says the two show one picture."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    n = len(x)
    if n < 2:
        return np.full(n, -1, np.int64)
    sims, nbr = nearest(x, k)
    rows = np.repeat(np.arange(n), nbr.shape[1])
    keep = (sims.ravel() >= threshold) & (nbr.ravel() >= 0) & (nbr.ravel() != rows)
    directed = coo_matrix((np.ones(int(keep.sum()), np.int8), (rows[keep], nbr.ravel()[keep])), shape=(n, n)).tocsr()
    if verify is not None:
        pairs = coo_matrix(directed + directed.T)
        upper = pairs.row < pairs.col  # each pair once
        a, b = pairs.row[upper], pairs.col[upper]
        same = verify(a, b)
        graph = coo_matrix((np.ones(int(same.sum()), np.int8), (a[same], b[same])), shape=(n, n)).tocsr()
    else:
        graph = directed.multiply(directed.T)  # mutual: each is among the other's nearest
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    out = np.full(n, -1, np.int64)
    multi = sizes[comp] >= 2
    _, out[multi] = np.unique(comp[multi], return_inverse=True)
    return out


def pair_check(store: Store, ids: np.ndarray) -> PairCheck:
    """Same picture by local features (``indexer.media.local``), for pairs of rows of ``ids``, from the stored
    thumbnails (an image without one verifies nothing)."""
    from indexer.media.local import FeatureCache, thumbnail_grey, verify_pairs
    recs = store.catalog.get_many(ids.tolist())
    keys = [recs[int(i)].thumb_key if int(i) in recs else None for i in ids]
    features = FeatureCache(thumbnail_grey(store.thumbs_dir), size=VERIFY_CACHE)
    return lambda a, b: verify_pairs(features, keys, a, b)


def copy_pair_check(store: Store, ids: np.ndarray, pdq: int = -1) -> PairCheck:
    """Same picture between two stored images: their PDQ hashes within ``pdq`` bits (both of usable quality;
    -1: not asked), else local features with overlays discounted and mirrors tried
    (``indexer.media.local.describe_content``), from the stored thumbnails."""
    from indexer.media.hashes import pdq_codes
    from indexer.media.local import FeatureCache, describe_content, mirrored, thumbnail_grey, verify_pairs
    recs = store.catalog.get_many(ids.tolist())
    keys = [recs[int(i)].thumb_key if int(i) in recs else None for i in ids]
    load = thumbnail_grey(store.thumbs_dir)
    plain = FeatureCache(load, size=VERIFY_CACHE, describe=describe_content)
    flipped = FeatureCache(mirrored(load), size=VERIFY_CACHE // 4, describe=describe_content)
    if pdq < 0:
        return lambda a, b: verify_pairs(plain, keys, a, b, mirror=flipped)
    sig = store.catalog.signals(ids.tolist())
    usable = np.array([int(i) in sig and sig[int(i)].pdq is not None and sig[int(i)].pdq.usable for i in ids], bool)
    bits = np.unpackbits(pdq_codes(sig[int(i)].pdq.hash if ok else "0" * 64  # type: ignore[union-attr]
                                   for i, ok in zip(ids, usable)), axis=1)

    def check(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = usable[a] & usable[b]
        if out.any():
            out[out] = (bits[a[out]] != bits[b[out]]).sum(axis=1) <= pdq
        rest = np.flatnonzero(~out)
        out[rest] = verify_pairs(plain, keys, a[rest], b[rest], mirror=flipped)
        return out
    return check


def copy_pairs(x: np.ndarray, check: PairCheck, k: int = FAMILY_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """The verified copy pairs (rows a < b) among each row's ``k`` nearest in the matching space."""
    n = len(x)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, nbr = nearest(x, k)
    a = np.repeat(np.arange(n), nbr.shape[1])
    b = nbr.ravel().astype(np.int64)
    keep = (b >= 0) & (a != b)
    a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    if not len(pairs):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    same = check(pairs[:, 0], pairs[:, 1])
    return pairs[same, 0], pairs[same, 1]


def follow_copies(labels: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int = FAMILY_ROUNDS,
                  fixed: np.ndarray | None = None) -> np.ndarray:
    """Labels after each image has followed its verified copies: an image moves to the cluster holding most of
    its copies when that is more than its own cluster holds (a noise image to any cluster holding one). Ties go
    to the lower label; repeated until nothing moves (at most ``rounds`` times), all images at once each round.
    Rows where ``fixed`` is true keep their label (they still vote)."""
    labels = labels.copy()
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])
    for _ in range(rounds):
        to = labels[dst]
        ok = to >= 0
        if not ok.any():
            break
        votes, counts = np.unique(np.stack([src[ok], to[ok]], 1), axis=0, return_counts=True)
        # per image: its own cluster's votes, and the best cluster (most votes, then the lowest label)
        order = np.lexsort((votes[:, 1], -counts, votes[:, 0]))
        votes, counts = votes[order], counts[order]
        first = np.r_[True, votes[1:, 0] != votes[:-1, 0]]
        best_img, best_lab, best_n = votes[first, 0], votes[first, 1], counts[first]
        own = np.zeros(len(labels), np.int64)
        mine = votes[:, 1] == labels[votes[:, 0]]
        own[votes[mine, 0]] = counts[mine]
        move = (best_lab != labels[best_img]) & (best_n > own[best_img])
        if fixed is not None:
            move &= ~fixed[best_img]
        if not move.any():
            break
        labels[best_img[move]] = best_lab[move]
    return labels


def copy_families(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Family id per row (-1: none): connected components of the verified copy pairs whose two images share a
    cluster, numbered from 0 in order of their first row; noise has no family."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    n = len(labels)
    inside = (labels[a] >= 0) & (labels[a] == labels[b])
    graph = coo_matrix((np.ones(int(inside.sum()), np.int8), (a[inside], b[inside])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    multi = np.bincount(comp, minlength=n)[comp] >= 2
    out = np.full(n, -1, np.int64)
    _, first, inv = np.unique(comp[multi], return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)  # renumbered by first row: stable for one input
    rank[np.argsort(first)] = np.arange(len(first))
    out[multi] = rank[inv.ravel()]
    return out


# ------------------------------------------------------------------ placing what was not fitted

class NeighbourPlacer:
    """Places images into a fitted clustering space and map without UMAP's ``transform``: each lands at the
    membership-weighted mean of its ``k`` nearest fitted images (cosine, FAISS), with UMAP's own weights
    exp(−(d − ρ)/σ) — what ``transform`` starts from before its optimisation epochs. Measured at 100k
    (benchmarks/cluster.py): ``transform`` spent 71 s (clustering space) + 13 s (map) placing 50k images; this
    takes seconds with the same ARI, since HDBSCAN's prediction only needs the point near its neighbours.

    Finding the neighbours needs only the vectors, so the job does it while the neighbour graph is built
    (``neighbours``) and takes the positions once the embeddings exist (``position``)."""

    def __init__(self, fit_x: np.ndarray, k: int = 15) -> None:
        import faiss
        self.k = min(k, len(fit_x))
        x = _unit(fit_x)
        d = x.shape[1]
        if len(x) > 20_000:  # an inverted file: exact enough for a placement, a fraction of the work
            nlist = int(4 * np.sqrt(len(x)))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(x)
            self.index.nprobe = 16
        else:
            self.index = faiss.IndexFlatIP(d)
        self.index.add(x)

    def neighbours(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fitted neighbours of each row of ``x`` (row numbers in the fitted sample) and their weights."""
        sims, idx = self.index.search(_unit(x), self.k)
        idx = np.where(idx < 0, idx[:, :1], idx)
        dist = 1.0 - sims
        rho = dist[:, :1]
        sigma = np.maximum((dist - rho).mean(axis=1, keepdims=True), 1e-6)
        w = np.exp(-(dist - rho) / sigma)
        w /= w.sum(axis=1, keepdims=True)
        return idx, w.astype(np.float32)

    @staticmethod
    def position(fit_pos: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Where the neighbours put each image in a fitted embedding (``fit_pos``: its fitted rows)."""
        return np.einsum("nk,nkd->nd", w, fit_pos[idx]).astype(np.float32)


def vote(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray, w: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster of each placed image: the weighted majority of its fitted neighbours' clusters (noise
    included, so an image among noise stays noise); membership = the winning weight × the neighbours'
    mean membership in it; outlier score = 1 − the winning weight. At 1M images this replaced hdbscan's
    ``approximate_predict`` of 950k points (~190 s) with array arithmetic."""
    nl = labels[idx]
    out_l = np.full(len(idx), -1, np.int64)
    best = np.zeros(len(idx), np.float32)
    for lab in np.unique(nl):
        share = (w * (nl == lab)).sum(axis=1)
        better = share > best
        out_l[better], best[better] = lab, share[better]
    member = (w * (nl == out_l[:, None]) * probs[idx]).sum(axis=1) / np.maximum(best, 1e-9)
    out_p = np.where(out_l >= 0, best * member, 0.0).astype(np.float32)
    return out_l, out_p, (1.0 - best).astype(np.float32)


def _rest_neighbours(x: np.ndarray, fit_x: np.ndarray, rest_idx: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """Fitted neighbours and weights of the images left out of the fit (rows of ``x``; other rows stay 0),
    and the seconds it took."""
    t = time.perf_counter()
    k = min(k, len(fit_x))
    nbr = np.zeros((len(x), k), np.int64)
    nbr_w = np.zeros((len(x), k), np.float32)
    if not len(rest_idx):
        return nbr, nbr_w, 0.0
    placer = NeighbourPlacer(fit_x, k=k)
    for i in range(0, len(rest_idx), 50_000):
        chunk = rest_idx[i:i + 50_000]
        nbr[chunk], nbr_w[chunk] = placer.neighbours(x[chunk])
    return nbr, nbr_w, time.perf_counter() - t


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------ the job

def _umap(n_components: int, neighbors: int, min_dist: float, seed: Any, n: int, epochs: int,
          knn: tuple[np.ndarray, np.ndarray] | None) -> Any:
    from clustering import jit
    jit.enable()
    import umap
    # a copy of the graph each: UMAP marks disconnected edges in the arrays it is given
    graph = (knn[0].copy(), knn[1].copy(), None) if knn is not None else (None, None, None)
    return umap.UMAP(n_components=n_components, n_neighbors=min(neighbors, n - 1), metric="cosine",
                     min_dist=min_dist, random_state=seed, low_memory=True, init="spectral" if n > 50 else "random",
                     n_epochs=epochs or None, precomputed_knn=graph)


# Below this many points UMAP computes an exact graph from all pairwise distances itself (its own rule):
# there is no NN-descent to share and each embedding computes its graph (milliseconds at that size).
SMALL_DATA = 4096


def neighbour_graph(x: np.ndarray, neighbors: int, random_state: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The cosine ``neighbors``-nearest-neighbour graph both embeddings are laid out from: UMAP's own
    NN-descent (pynndescent), computed once, drawing from ``random_state`` (a ``numpy.random.RandomState``)
    exactly as UMAP's fit would; None below ``SMALL_DATA`` points. An exact graph from FAISS was measured
    too: 6 s instead of 30 s for the 50k fit, but ARI 0.909 against 0.955 (NN-descent's graph, recall 0.84,
    keeps the groups together better), so quality wins."""
    if len(x) < SMALL_DATA:
        return None
    from clustering import jit
    jit.enable()
    from clustering import nndescent
    nndescent.install()
    from umap.umap_ import nearest_neighbors
    idx, dist, _ = nearest_neighbors(x, min(neighbors, len(x) - 1), "cosine", {}, False, random_state,
                                     low_memory=True, use_pynndescent=True, n_jobs=1)
    return idx, dist


def layouts(x: np.ndarray, knn: tuple[np.ndarray, np.ndarray] | None, p: ClusterParams, random_state: Any
            ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The clustering space (``p.dims``-d) and the 2-D map, laid out at the same time from one graph.

    The clustering space goes on drawing from the ``random_state`` the graph was drawn from, so it is the
    embedding UMAP's own fit gives for the seed (the clusters do not move with this split); the map starts
    from the seed.

    Each UMAP optimisation runs on one core (seeded, so reproducible) and numba releases the GIL in its
    compiled epochs (``clustering.jit``), so the map is laid out on the second core while the clustering
    space takes the first: the map's time disappears into the clustering space's on a 2-core machine."""
    def timed(reducer: Any) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        return reducer.fit_transform(x).astype(np.float32), time.perf_counter() - t

    reducer = _umap(p.dims, p.neighbors, 0.0, random_state, len(x), p.epochs, knn)
    mapper = _umap(2, p.neighbors, 0.1, p.seed, len(x), MAP_EPOCHS, knn)
    with ThreadPoolExecutor(1, thread_name_prefix="umap-map") as pool:
        drawn = pool.submit(timed, mapper)
        emb, emb_s = timed(reducer)
        xy, xy_s = drawn.result()
    return emb, xy, (emb_s, xy_s)


def artifacts_path(store: Store, run_id: int) -> Path:
    return store.home / "clusters" / f"run_{run_id}.joblib"


def run_clustering(store: Store, cstore: ClusterStore, params: ClusterParams, *, since: dt.datetime | None = None,
                   progress: Progress | None = None) -> RunReport:
    """Cluster the flagged images (flagged at or after ``since`` when given) into a new run."""
    say = progress or (lambda phase, msg: None)
    meta = store.catalog.model_meta()
    if "model_id" not in meta:
        raise ClusteringError("the store is empty: ingest and flag images first")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    say("load", "reading flagged ids")
    ids = np.asarray(store.catalog.image_ids(flagged=True, flagged_since=since), np.int64)
    n = len(ids)
    if n < params.minimum_images():
        scope = f" flagged since {since:%Y-%m-%d %H:%M}" if since else " flagged"
        raise ClusteringError(f"only {n}{scope} images: clustering needs at least {params.minimum_images()} "
                              f"(flag more images, or lower --cluster-min-size / --cluster-neighbors)",
                              code="too_few_images")
    p = params.resolve(n)
    vectors = store.open_vectors()
    space = current_space(store, vectors.dim)
    x = np.empty((n, space.dim), np.float32)
    pos = 0
    for part, vecs in vectors.iter_rows(ids):  # streamed from the memory-mapped raw store
        x[pos:pos + len(part)] = space.apply(vecs)
        pos += len(part)
    timings["load"] = time.perf_counter() - t
    say("load", f"{n:,} flagged vectors ({vectors.dim}-d, {space.kind} space {space.dim}-d) in {timings['load']:.1f} s")
    if space.is_identity:
        p = replace(p, join=0.0)

    run_id = cstore.start_run(meta["model_id"], asdict(p), "recent" if since else "full", since)
    try:
        report = _cluster(store, cstore, run_id, ids, x, p, timings, say, space.version)
    except BaseException as exc:
        cstore.fail_run(run_id, f"{type(exc).__name__}: {exc}")
        raise
    return report


def _cluster(store: Store, cstore: ClusterStore, run_id: int, ids: np.ndarray, x: np.ndarray, p: ClusterParams,
             timings: dict[str, float], say: Progress, space_version: int = 0) -> RunReport:
    n = len(ids)
    rng = np.random.default_rng(p.seed)
    sampled = n > p.sample
    fit_idx = np.sort(rng.choice(n, p.sample, replace=False)) if sampled else np.arange(n)
    rest_idx = np.setdiff1d(np.arange(n), fit_idx) if sampled else np.zeros(0, np.int64)

    t = time.perf_counter()
    say("reduce", f"UMAP {x.shape[1]}-d → {p.dims}-d (cosine) and the 2-D map on {len(fit_idx):,} images"
        + (f", then placing {len(rest_idx):,} more" if sampled else ""))
    x_fit = x[fit_idx]
    with warnings.catch_warnings(), ThreadPoolExecutor(1, thread_name_prefix="place") as pool:
        warnings.simplefilter("ignore")  # umap warns that random_state disables parallelism: that is the point
        # the rest's fitted neighbours on the second core while NN-descent (one core, mostly compiling) runs
        found = pool.submit(_rest_neighbours, x, x_fit, rest_idx, p.neighbors)
        random_state = np.random.RandomState(p.seed)
        knn = neighbour_graph(x_fit, p.neighbors, random_state)
        timings["graph"] = time.perf_counter() - t
        emb = np.empty((n, p.dims), np.float32)
        xy = np.empty((n, 2), np.float32)
        emb[fit_idx], xy[fit_idx], layout_s = layouts(x_fit, knn, p, random_state)
        timings["reduce_fit"], timings["map_fit"] = layout_s
        t1 = time.perf_counter()
        nbr, nbr_w, timings["place_search"] = found.result()
        emb[rest_idx] = NeighbourPlacer.position(emb[fit_idx], nbr[rest_idx], nbr_w[rest_idx])
        xy[rest_idx] = NeighbourPlacer.position(xy[fit_idx], nbr[rest_idx], nbr_w[rest_idx])
        timings["place"] = time.perf_counter() - t1
        if sampled:
            say("reduce", f"placed {len(rest_idx):,} images from their fitted neighbours")
    timings["reduce"] = time.perf_counter() - t

    t = time.perf_counter()
    check = pair_check(store, ids) if p.verify else None
    near = near_duplicate_families(x, p.join, verify=check) if p.join > 0 else np.full(n, -1, np.int64)
    joined = near >= 0
    timings["join"] = time.perf_counter() - t
    if p.join > 0:
        say("join", f"{int(joined.sum()):,} images in {len(np.unique(near[joined])):,} near-duplicate families "
            f"(similarity ≥ {p.join}{', verified by local features' if p.verify else ''}) "
            f"in {timings['join']:.1f} s")

    t = time.perf_counter()
    say("cluster", f"HDBSCAN ({p.backend}, min_cluster_size {p.min_cluster_size}, min_samples {p.min_samples}) "
        f"on the {int((~joined).sum()):,} images outside families")
    labels = np.full(n, -1, np.int64)
    probs = np.zeros(n, np.float32)
    outl = np.ones(n, np.float32)
    # HDBSCAN groups what is alike but not copied; each family is one cluster of its own already
    hfit = fit_idx[~joined[fit_idx]]
    hrest = rest_idx[~joined[rest_idx]]
    if len(hfit) >= max(p.min_cluster_size * 2, 4):
        fitted = fit_hdbscan(emb[hfit], p)
        labels[hfit], probs[hfit], outl[hfit] = fitted.labels, fitted.probabilities, fitted.outlier_scores
        if len(hrest):  # by their fitted neighbours (rows of fit_idx), as they were placed
            labels[hrest], probs[hrest], outl[hrest] = vote(labels[fit_idx], probs[fit_idx], nbr[hrest], nbr_w[hrest])
    else:
        fitted = Fitted(np.full(len(hfit), -1, np.int64), np.zeros(len(hfit), np.float32),
                        np.ones(len(hfit), np.float32), None, None)
    first_family = int(labels.max()) + 1 if (labels >= 0).any() else 0
    labels[joined] = first_family + near[joined]
    probs[joined], outl[joined] = 1.0, 0.0
    timings["cluster"] = time.perf_counter() - t

    family = np.full(n, -1, np.int64)
    if p.families:
        t = time.perf_counter()
        say("families", f"verifying copies among each image's {FAMILY_NEIGHBOURS} nearest by local features")
        fa, fb = copy_pairs(x, copy_pair_check(store, ids, p.family_pdq))
        followed = follow_copies(labels, fa, fb)
        moved = followed != labels
        labels = followed
        probs[moved], outl[moved] = 1.0, 0.0  # placed by verified copies, not by density
        family = copy_families(labels, fa, fb)
        timings["families"] = time.perf_counter() - t
        say("families", f"{len(fa):,} verified copy pairs; {int(moved.sum()):,} images followed their copies into "
            f"another cluster; {len(np.unique(family[family >= 0])):,} families of copies "
            f"({int((family >= 0).sum()):,} images) in {timings['families']:.1f} s")

    t = time.perf_counter()
    say("store", "matching clusters to the previous run and storing")
    local = sorted(int(v) for v in np.unique(labels) if v >= 0)
    remap = {old: i for i, old in enumerate(local)}
    member_sets = [set(ids[labels == lab].tolist()) for lab in local]
    prev_run = cstore.current_run()
    prev: dict[int, set[int]] = {}
    if prev_run is not None:
        for img, cid in cstore.previous_members(prev_run.id).items():
            prev.setdefault(cid, set()).add(img)
    matching = match_clusters(member_sets, prev)
    clusters = []
    for lab, m in zip(local, matching.matches):
        mask = labels == lab
        members = np.flatnonzero(mask)
        centre = emb[members].mean(0)
        dist = np.linalg.norm(emb[members] - centre, axis=1)
        order = np.lexsort((dist, -probs[members]))
        clusters.append(NewCluster(
            identity=m.identity, label=lab, size=int(mask.sum()), prev_size=m.prev_size, change=m.change,
            persistence=None if fitted.persistence is None else fitted.persistence.get(lab),
            mean_probability=float(probs[members].mean()), exemplars=[int(ids[j]) for j in members[order[:EXEMPLARS]]],
            x=float(xy[members, 0].mean()), y=float(xy[members, 1].mean())))
    members_out = [Member(int(ids[i]), None if labels[i] < 0 else remap[int(labels[i])], float(probs[i]),
                          float(outl[i]), float(xy[i, 0]), float(xy[i, 1]), False,
                          None if family[i] < 0 else int(family[i])) for i in range(n)]
    noise = int((labels < 0).sum())
    summary = matching.summary()
    art = artifacts_path(store, run_id)
    art.parent.mkdir(parents=True, exist_ok=True)
    artifacts = {"placer_x": x[fit_idx], "placer_emb": emb[fit_idx], "placer_xy": xy[fit_idx],
                 "fitted": fitted, "fit_embedding": emb[hfit], "params": asdict(p), "space_version": space_version,
                 "family_vectors": x[joined], "family_labels": labels[joined], "family_ids": ids[joined]}
    publish_with(art, lambda f: joblib.dump(artifacts, f))
    timings["store"] = time.perf_counter() - t
    cstore.finish_run(run_id, clusters, members_out, n_noise=noise, summary=summary, timings=timings)
    say("store", f"run {run_id}: {len(clusters)} clusters, {noise:,} unclustered")
    return RunReport(cstore.run(run_id), len(clusters), noise, summary, timings)


def assign_new(store: Store, cstore: ClusterStore, progress: Progress | None = None) -> int:
    """Place images flagged since the current run into its clusters (marked provisional), without
    re-running the job. Returns how many were placed."""
    run = cstore.current_run()
    if run is None:
        return 0
    known = set(cstore.previous_members(run.id)) | {m.image_id for m in cstore.members(run.id, None)}
    flagged = np.asarray(store.catalog.image_ids(flagged=True), np.int64)
    new = np.array([i for i in flagged.tolist() if i not in known], np.int64)
    if not len(new):
        return 0
    path = artifacts_path(store, run.id)
    if not path.exists():
        raise ClusteringError(f"run {run.id} has no saved models ({path}): run `flagmatch cluster` again")
    art = joblib.load(path)
    vectors = store.open_vectors()
    space = current_space(store, vectors.dim)
    if space.version != art.get("space_version", 0):
        raise ClusteringError(f"run {run.id} was clustered in matching space {art.get('space_version', 0)}, the "
                              f"indexes now use space {space.version}: run `flagmatch cluster` again")
    x = space.apply(vectors.get(new))
    if "placer_x" not in art:
        raise ClusteringError(f"run {run.id} was made by an older flagmatch: run `flagmatch cluster` again")
    idx, w = NeighbourPlacer(art["placer_x"], k=int(art["params"].get("neighbors", 15))).neighbours(x)
    emb, xy = NeighbourPlacer.position(art["placer_emb"], idx, w), NeighbourPlacer.position(art["placer_xy"], idx, w)
    labels, probs, outl = predict(art["fitted"], art["fit_embedding"], emb)
    # a re-upload of a family's image joins that family, whatever HDBSCAN would say
    fam_x, fam_labels = art.get("family_vectors"), art.get("family_labels")
    join = float(art["params"].get("join", 0.0))
    if join > 0 and fam_x is not None and len(fam_x):
        best = x @ fam_x.T
        j = best.argmax(axis=1)
        near = best[np.arange(len(x)), j] >= join
        if art["params"].get("verify") and near.any():  # and shows the family member's picture
            rows = np.flatnonzero(near)
            near[rows] = pair_check(store, np.concatenate([new[rows], art["family_ids"][j[rows]]]))(
                np.arange(len(rows)), np.arange(len(rows), 2 * len(rows)))
        labels[near], probs[near], outl[near] = fam_labels[j[near]], 1.0, 0.0
    by_label = cstore.label_identities(run.id)
    cluster = np.array([by_label.get(int(lab), -1) if lab >= 0 else -1 for lab in labels], np.int64)
    family = np.full(len(new), -1, np.int64)
    joined: dict[int, int] = {}
    if art["params"].get("families"):
        cluster, family, joined = _new_copies(store, cstore, run.id, new, x, cluster, space,
                                              int(art["params"].get("family_pdq", -1)))
        copied = family >= 0
        probs[copied], outl[copied] = 1.0, 0.0
    members = [Member(int(i), int(cid) if cid >= 0 else None, float(pr), float(o), float(a), float(b), True,
                      int(f) if f >= 0 else None)
               for i, cid, pr, o, (a, b), f in zip(new, cluster, probs, outl, xy, family)]
    cstore.add_provisional(run.id, members, joined)
    if progress:
        progress("assign", f"placed {len(members)} newly flagged image(s) into run {run.id} (provisional), "
                 f"{int((family >= 0).sum())} of them copies in a family")
    return len(members)


def _new_copies(store: Store, cstore: ClusterStore, run_id: int, new: np.ndarray, x: np.ndarray,
                cluster: np.ndarray, space: MatchingSpace, pdq: int = -1
                ) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """The copy families for newly flagged images, as the job forms them: each new image is checked against its
    ``FAMILY_NEIGHBOURS`` nearest among the run's members and the other new images (local features, overlays
    discounted, mirrors tried, PDQ within ``pdq`` bits as the run used); it follows its verified copies' cluster (the run's members keep theirs) and joins
    the family its copies hold (the lowest, where they hold several), or starts one with them. Returns each new
    image's cluster id (-1: none) and family (-1: none), and the run's members given a family (image → family)."""
    import faiss
    placed = cstore.placements(run_id)
    flagged = set(store.catalog.image_ids(flagged=True))
    fresh = set(new.tolist())
    old = np.array(sorted(i for i in placed if i in flagged and i not in fresh), np.int64)
    m = len(old)
    ids = np.concatenate([old, new])
    # exact nearest over the members a chunk at a time (the run's vectors are never all in memory at once)
    xq, k = _unit(x), min(FAMILY_NEIGHBOURS + 1, len(ids))
    sims = np.full((len(new), 0), -np.inf, np.float32)
    nbr = np.zeros((len(new), 0), np.int64)
    vectors = store.open_vectors()
    for start in range(0, len(ids), NEW_COPIES_CHUNK):
        rows = np.arange(start, min(len(ids), start + NEW_COPIES_CHUNK))
        part = np.concatenate([space.apply(vectors.get(old[rows[rows < m]])), x[rows[rows >= m] - m]])
        index = faiss.IndexFlatIP(xq.shape[1])
        index.add(_unit(part))
        s, j = index.search(xq, min(k, len(rows)))
        sims, nbr = np.concatenate([sims, s], 1), np.concatenate([nbr, np.where(j >= 0, rows[j], -1)], 1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims, nbr = np.take_along_axis(sims, order, 1), np.take_along_axis(nbr, order, 1)
    a = np.repeat(np.arange(m, len(ids)), nbr.shape[1])
    b = nbr.ravel().astype(np.int64)
    keep = (b >= 0) & (a != b)
    pairs = np.unique(np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])], 1), axis=0)
    labels = np.concatenate([np.array([-1 if placed[int(i)][0] is None else placed[int(i)][0] for i in old],
                                      np.int64), cluster])
    if not len(pairs):
        return cluster, np.full(len(new), -1, np.int64), {}
    same = copy_pair_check(store, ids, pdq)(pairs[:, 0], pairs[:, 1])
    fa, fb = pairs[same, 0], pairs[same, 1]
    labels = follow_copies(labels, fa, fb, fixed=np.arange(len(ids)) < m)
    comp = copy_families(labels, fa, fb)
    existing = np.array([-1 if placed[int(i)][1] is None else placed[int(i)][1] for i in old] + [-1] * len(new),
                        np.int64)
    next_family = max([f for _, f in placed.values() if f is not None], default=-1) + 1
    family = np.full(len(ids), -1, np.int64)
    for c in np.unique(comp[m:][comp[m:] >= 0]):
        rows = np.flatnonzero(comp == c)
        held = existing[rows][existing[rows] >= 0]
        if len(held):
            f = int(held.min())
        else:
            f, next_family = next_family, next_family + 1
        family[rows[existing[rows] < 0]] = f
    joined = {int(old[r]): int(family[r]) for r in np.flatnonzero(family[:m] >= 0)}
    return labels[m:], family[m:], joined
