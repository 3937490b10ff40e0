"""Queries out: "which flagged images look like this one?" for an uploaded image, a stored image
(by id or sha256), or a batch. The service is a plain object built from its parts; the JSON API and
the CLI are thin wrappers over it."""
from __future__ import annotations

import functools
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from indexer.storage.catalog import ImageRecord
from indexer.media.decode import DEFAULT_LIMITS, DecodedImage, DecodeLimits, InputSpec, decode, plan
from indexer.media.video import DecodedVideo, VideoLimits, decode_video, is_video, keyframes, probe, vpdq_of_bytes
from indexer.models.embed import Embedder, blank_like, coming
from indexer.errors import InvalidInputError, ModelLoadError, NotFoundError
from indexer.storage.store import Store
from indexer.models.threads import DECODE, worker_started
from indexer.vectors.vector_index import SCOPES, VectorIndex
from indexer.media.hashes import Pdq, Signals, md5_of
from indexer.review.heads import ActiveHeads, Head, scores_for
from indexer.media.local import MIN_MATCHES, SIDE, FeatureCache, QueryFeatures
from indexer.vectors.regions import REGION_MARGIN
from search.admission import Admission
from search.hashmatch import HashEvidence, HashMatcher

MAX_K = 1000
# Hits checked by local features at most, from the top. Match benchmark (2,700 edited uploads): the first
# verified hit is among the model's top 5 whenever it is among the top 10 (mean R@1 0.958 at depth 5 and at
# 10; 0.953 at 3, 0.939 unverified). An upload that copies nothing flagged — most uploads — is checked down
# to this depth, so 5 halves its cost (each check ~1.5 ms, ~6 ms more while a hit's thumbnail is first described).
VERIFY_DEPTH = 5
# keyframes a query row asks the frame index for, per hit wanted: a video near the query has several
FRAME_FANOUT = 4
FRAME_PAIRS = 5  # frame pairs reported per video hit
VIEWS = ("trimmed", "content", "cells", "mirror")
REGION_VIEWS = ("full", "trimmed", "content")  # the query rows that search the flagged images' windows
# the mirror doubles the model's work on every upload: opt in; cells cost only composites (indexer.media.views)
DEFAULT_VIEWS = ("trimmed", "content", "cells")
Box = tuple[int, int, int, int]
ClusterLookup = Callable[[Sequence[int]], dict[int, dict[str, Any]]]
T = TypeVar("T")


@dataclass(frozen=True)
class SearchParams:
    k: int = 10
    scope: str = "flagged"
    min_similarity: float = -1.0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise InvalidInputError(f"k must be between 1 and {MAX_K}, not {self.k}", code="bad_parameter")
        if self.scope not in SCOPES:
            raise InvalidInputError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}",
                                    code="bad_parameter")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise InvalidInputError("min_similarity must be between -1 and 1", code="bad_parameter")


@dataclass
class Timings:
    """Milliseconds per stage, summed over a request (reported as a Server-Timing header)."""
    decode: float = 0.0
    embed: float = 0.0
    search: float = 0.0
    hashes: float = 0.0
    hydrate: float = 0.0
    verify: float = 0.0

    def header(self) -> str:
        return ", ".join(f"{k};dur={v:.2f}" for k, v in self.__dict__.items())


@dataclass(frozen=True)
class Query:
    """What was asked: an upload (name, sha256) or a stored image (id)."""
    label: str
    sha256: str | None
    p_unsafe: float | None
    known_id: int | None
    p_labels: dict[str, float] = field(default_factory=dict)  # the active heads' P(label)
    kind: str = "image"   # or "video": an uploaded clip, searched by its keyframes and their mean
    keyframes: int = 0    # a clip's keyframes searched


@dataclass(frozen=True)
class FramePair:
    """A query frame and a stored video's keyframe that matched: where each is in its clip."""
    query_view: str          # the query's row: "full" (an image query), "@<seconds>" (a clip's keyframe), …
    query_offset: float | None  # seconds into the query clip (None: the query is an image)
    offset: float            # seconds into the stored video
    similarity: float


@dataclass(frozen=True)
class Hit:
    record: ImageRecord
    similarity: float
    cluster: dict[str, Any] | None
    view: str = "full"   # the query view that matched best (full, trimmed, content, mirror, cellN, gridN)
    box: Box | None = None  # that view's box in the upload (left, top, right, bottom; pixels as displayed)
    p_labels: dict[str, float] = field(default_factory=dict)  # the heads' scores from the last scoring
    # agreeing local-feature matches with the upload (indexer.media.local); None: not checked (a query by id, a hit
    # below the first verified one, or verification off)
    local_matches: int | None = None
    frames: tuple[FramePair, ...] = ()  # a stored video's best frame pairs with the query, best first
    # the stored image's window (indexer.vectors.regions) its best similarity came through: left, top, right,
    # bottom as fractions of the picture; None: the whole image
    region: tuple[float, float, float, float] | None = None
    # the upload's PDQ is within the match threshold of this image's (or its MD5 is the same): one picture
    hash_match: bool = False

    @property
    def verified(self) -> bool | None:
        if self.hash_match:
            return True
        return None if self.local_matches is None else self.local_matches >= MIN_MATCHES


@dataclass(frozen=True)
class QueryResult:
    query: Query
    hits: list[Hit]
    evidence: HashEvidence | None = None  # bank and stored-image hash matches (None: no hash matcher)


@dataclass(frozen=True)
class SweepHit:
    """An unflagged image near one of the sweep's seeds."""
    record: ImageRecord
    similarity: float
    seed: int


MAX_SWEEP_SEEDS = 200


@dataclass
class SearchResponse:
    results: list[QueryResult]
    model_id: str
    scope: str
    checkpoint: dict[str, int]
    timings: Timings = field(default_factory=Timings)


class SearchService:
    def __init__(self, store: Store, index: VectorIndex, embedder: Embedder | None, *,
                 limits: DecodeLimits = DEFAULT_LIMITS, admission: Admission | None = None,
                 cluster_lookup: ClusterLookup | None = None, views: Sequence[str] = DEFAULT_VIEWS,
                 hashes: HashMatcher | None = None, heads: ActiveHeads | None = None, decode_nice: int = 0,
                 local: FeatureCache | None = None, grid_below: float = -1.0,
                 video_limits: VideoLimits = VideoLimits(), verify_depth: int = VERIFY_DEPTH,
                 regions: bool = True) -> None:
        self.store, self.index, self.embedder, self.hashes = store, index, embedder, hashes
        self.local = local  # stored images' local features: an upload's hits are verified when set
        self.verify_depth = max(1, verify_depth)
        self.regions = regions  # search the flagged images' windows too (indexer.vectors.regions)
        # an upload whose views' best similarity is below this is searched again by the parts of a grid
        self.grid_below = grid_below
        # uploads decode on a small pool — at most one decode per core at once — at the request niceness
        # (``decode_nice`` here; see indexer.media.decode.lower_priority for why a lower priority helps the model)
        self._decoders = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="upload-decode",
                                            initializer=worker_started, initargs=(DECODE, decode_nice))
        self.active_heads = heads
        unknown = set(views) - set(VIEWS)
        if unknown:
            raise InvalidInputError(f"unknown query view(s) {', '.join(sorted(unknown))}; known: {', '.join(VIEWS)}")
        self.views = tuple(views)
        self.limits = limits
        self.video_limits = video_limits
        self.admission = admission
        self.cluster_lookup = cluster_lookup
        self.model_id = store.catalog.model_meta().get("model_id", "")
        if embedder is not None:
            store.check_model(embedder.info.model_id)

    @property
    def heads(self) -> list[Head]:
        return self.active_heads.get() if self.active_heads is not None else []

    # -- queries
    def search_uploads(self, uploads: Sequence[tuple[str, bytes]], params: SearchParams) -> SearchResponse:
        """Each upload (name, bytes) is decoded, embedded (one batch) and searched."""
        if self.embedder is None:
            raise ModelLoadError("this server has no model loaded: search by id or sha256 instead")
        if not uploads:
            raise InvalidInputError("no image in the request", code="missing_image")
        t = Timings()
        t0 = time.perf_counter()
        pixels, owner, names, queries, signals, local = [], [], [], [], [], []
        clips: dict[int, DecodedVideo] = {}
        boxes: list[dict[str, Box]] = []
        greys: list[dict[str, np.ndarray]] = []  # the grid's parts' grey copies, to verify a hit through one
        spec = self.embedder.info.input
        # while this request decodes, the model knows it is on its way (indexer.models.embed.SerialEmbedder)
        with coming(self.embedder):
            for n, (name, data) in enumerate(uploads):
                if not data:
                    raise InvalidInputError(f"{name or 'upload'}: the file is empty", code="empty_image")
                sha = hashlib.sha256(data).hexdigest()
                if is_video(data):  # a clip: each keyframe (and its trimmed view) is a row; their mean is added below
                    clip = self._decode_video(data, spec)
                    clips[n] = clip
                    local.append(None)
                    boxes.append({})
                    greys.append({})
                    for f in clip.frames:
                        tag = f"@{f.offset_s:g}"
                        for view, px in ((tag, f.image.pixels), *((f"{tag}/{v}", x) for v, x in f.image.views.items())):
                            pixels.append(px)
                            owner.append(n)
                            names.append(view)
                    queries.append((name, sha, self.store.catalog.known_sha(sha)))
                    signals.append(Signals(md5_of(data), None, clip.vpdq))
                    continue
                img, feats = self._decode_query(data, spec)
                local.append(feats)
                boxes.append(dict(img.view_boxes))
                greys.append(dict(img.view_greys))  # an inset's grey copy, to verify a hit through it on
                for view, px in (("full", img.pixels), *img.views.items()):
                    pixels.append(px)
                    owner.append(n)
                    names.append(view)
                queries.append((name, sha, self.store.catalog.known_sha(sha)))
                signals.append(Signals(md5_of(data), img.pdq))
            t1 = time.perf_counter()
            vectors, p = self.embedder.embed(np.stack(pixels))
        t2 = time.perf_counter()
        t.decode, t.embed = (t1 - t0) * 1000, (t2 - t1) * 1000

        if clips:  # keyframes the model sees as blank out; a clip's own row: its keyframes' mean (as its stored
            # vector is made), with their worst P(unsafe)
            vectors, p, owner, names = self._drop_blank(vectors, p, owner, names, clips)
            vectors, p = self._clip_rows(vectors, p, owner, names, clips)
        # P(unsafe) and the heads' scores are the whole image's, or the whole clip's
        full = [next(i for i, (o, v) in enumerate(zip(owner, names)) if o == n and v in ("full", "clip"))
                for n in range(len(queries))]
        heads = self.heads
        by_head = {h.label: h.predict(vectors[full]) for h in heads}
        qs = [Query(name, sha, float(p[i]), known, {lab: round(float(v[n]), 6) for lab, v in by_head.items()},
                    kind="video" if n in clips else "image",
                    keyframes=sum(1 for o, v in zip(owner, names) if o == n and v.startswith("@") and "/" not in v))
              for n, ((name, sha, known), i) in enumerate(zip(queries, full))]
        return self._search(qs, vectors, params, t, exclude=[set() for _ in qs], owner=owner, views=names,
                            signals=signals, local=local, boxes=boxes, greys=greys,
                            fallback=functools.partial(self._grid_parts, uploads, t, boxes, greys,
                                                       [f is not None for f in local])
                            if self.grid_below > -1 else None)

    def _drop_blank(self, vectors: np.ndarray, p: np.ndarray, owner: list[int], names: list[str],
                    clips: dict[int, DecodedVideo]) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
        """A clip's keyframes the model sees as blank (``blank_like``: fades, cards) dropped with their views,
        as ingest drops them from a stored video — unless the clip has nothing else."""
        assert self.embedder is not None
        blank = blank_like(self.embedder, vectors)
        drop: set[tuple[int, str]] = set()
        for n in clips:
            mine = [i for i, (o, v) in enumerate(zip(owner, names)) if o == n and "/" not in v]
            gone = {names[i] for i in mine if blank[i]}
            if len(gone) < len(mine):
                drop.update((n, tag) for tag in gone)
        keep = [i for i, (o, v) in enumerate(zip(owner, names)) if (o, v.split("/")[0]) not in drop]
        if len(keep) == len(owner):
            return vectors, p, owner, names
        return vectors[keep], p[keep], [owner[i] for i in keep], [names[i] for i in keep]

    @staticmethod
    def _clip_rows(vectors: np.ndarray, p: np.ndarray, owner: list[int], names: list[str],
                   clips: dict[int, DecodedVideo]) -> tuple[np.ndarray, np.ndarray]:
        """Each clip's ``clip`` row appended (owner and names extended in place): the mean of its keyframes'
        vectors, normalised, and the highest of their P(unsafe) — what a stored video's own row holds."""
        extra_v, extra_p = [], []
        for n in clips:
            rows = [i for i, (o, v) in enumerate(zip(owner, names)) if o == n and "/" not in v]
            mean = vectors[rows].mean(axis=0)
            extra_v.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
            extra_p.append(float(p[rows].max()))
        for n in clips:
            owner.append(n)
            names.append("clip")
        return (np.concatenate([vectors, np.stack(extra_v).astype(np.float32)]),
                np.concatenate([p, np.asarray(extra_p, np.float32)]))

    def _decode_video(self, data: bytes, spec: InputSpec, views: tuple[str, ...] = ("trimmed",),
                      vpdq: bool = True) -> DecodedVideo:
        """An uploaded clip's keyframes (with ``views``: the trimmed box of a letterboxed re-upload; the grid
        for a second pass) and, when hashes are matched, its vPDQ — on the decode pool, within the admission
        budget (``_video_cost``)."""
        def work() -> DecodedVideo:
            return decode_video(data, spec, self.video_limits, views=views, want_vpdq=vpdq and self.hashes is not None)
        return self._on_decoders(work, lambda: self._video_cost(data, spec))

    def _grid_parts(self, uploads: Sequence[tuple[str, bytes]], t: Timings, boxes: list[dict[str, Box]],
                    greys: list[dict[str, np.ndarray]], verified: list[bool],
                    needy: list[int]) -> tuple[np.ndarray, list[int], list[str]]:
        """The grid's parts of the uploads that found nothing confident (``needy``), decoded again and embedded
        in one batch: their vectors, the upload each belongs to, and their names; their boxes (and, where the
        upload's hits are verified, their grey copies) are added to the uploads' own."""
        assert self.embedder is not None
        g0 = time.perf_counter()
        px, owner, views = [], [], []
        for q in needy:
            if is_video(uploads[q][1]):  # a clip: each keyframe's grid (a picture-in-picture in a corner)
                clip = self._decode_video(uploads[q][1], self.embedder.info.input, views=("grid",), vpdq=False)
                for f in clip.frames:
                    for view, pv in f.image.views.items():
                        px.append(pv)
                        owner.append(q)
                        views.append(f"@{f.offset_s:g}/{view}")
                continue
            img = self._decode_query(uploads[q][1], self.embedder.info.input, views=("grid",), local=False,
                                     grey=verified[q])[0]
            boxes[q].update(img.view_boxes)
            greys[q].update(img.view_greys)
            for view, pv in img.views.items():
                px.append(pv)
                owner.append(q)
                views.append(view)
        g1 = time.perf_counter()
        vectors = self.embedder.embed(np.stack(px))[0] if px else np.empty((0, 0), np.float32)
        if px and any(v.startswith("@") for v in views):  # a clip's blank parts (a white corner) carry no evidence
            keep = np.flatnonzero(~blank_like(self.embedder, vectors) | ~np.array([v.startswith("@") for v in views]))
            vectors, owner, views = vectors[keep], [owner[i] for i in keep], [views[i] for i in keep]
        t.decode += (g1 - g0) * 1000
        t.embed += (time.perf_counter() - g1) * 1000
        return vectors, owner, views

    def _decode(self, data: bytes, spec: InputSpec, *, views: Sequence[str] | None = None) -> DecodedImage:
        """Decode one upload within the worker's admission budget (reserved from its header first)."""
        return self._decode_query(data, spec, views=views, local=False)[0]

    def _decode_query(self, data: bytes, spec: InputSpec, *, views: Sequence[str] | None = None,
                      local: bool = True, grey: bool = False) -> tuple[DecodedImage, QueryFeatures | None]:
        """An upload decoded (and its local features described, when hits are verified) on the decode pool,
        within the worker's admission budget (reserved from its header first). ``views``: the server's when
        None; ``grey``: each view's grey copy to verify on, without describing the whole upload again."""
        v = self.views if views is None else tuple(views)
        side = SIDE if (local or grey) and self.local is not None else 0

        def work() -> tuple[DecodedImage, QueryFeatures | None]:
            img = decode(data, spec, self.limits, thumb_size=0, views=v, grey_side=side, view_greys=grey)
            return img, (QueryFeatures(img.grey) if local and img.grey is not None else None)

        # the header's promise, checked against the budget
        return self._on_decoders(work, lambda: plan(data, spec, self.limits, thumb_size=side).bytes)

    def _on_decoders(self, work: Callable[[], T], cost: Callable[[], int]) -> T:
        """``work`` on the decode pool, within the worker's admission budget: ``cost()`` (the bytes the file's
        headers promise decoding will take) is reserved first, when there is a budget."""
        if self.admission is None:
            return self._decoders.submit(work).result()
        with self.admission.reserve(cost()):
            return self._decoders.submit(work).result()

    def _video_cost(self, data: bytes, spec: InputSpec | None = None) -> int:
        """What decoding a clip holds at most, from its headers: the largest frame FFmpeg holds times its few
        reference frames, and (with ``spec``: keyframes made ready for the model) the keyframes kept."""
        lim = self.video_limits
        info = probe(data, lim)
        kept = 0 if spec is None else \
            lim.max_keyframes * (2 * spec.size * spec.size * 3 + lim.keyframe_side * lim.keyframe_side * 3)
        return info.width * info.height * 4 * 8 + kept

    def hash_image(self, data: bytes) -> Pdq | None:
        """PDQ of an upload (decoded safely as for a search; no model needed)."""
        spec = self.embedder.info.input if self.embedder is not None else InputSpec(224)
        return self._decode(data, spec, views=()).pdq

    def hash_video(self, data: bytes) -> str:
        """vPDQ of an uploaded clip (threatexchange's signal string), decoded within the video budgets first;
        no model needed. A DecodeError names what is wrong with the clip."""
        def work() -> str:
            keyframes(data, self.video_limits)  # the budgets, checked by decoding what vpdq will decode
            return vpdq_of_bytes(data)
        return self._on_decoders(work, lambda: self._video_cost(data))

    def hash_evidence(self, signals: Sequence[Signals], *, scope: str = "flagged", k: int = 10,
                      every_bank: bool = False) -> list[HashEvidence]:
        if self.hashes is None:
            raise ModelLoadError("this server has no hash matcher")
        return self.hashes.lookup(signals, scope=scope, k=k, every_bank=every_bank)

    def search_ids(self, image_ids: Iterable[int], params: SearchParams) -> SearchResponse:
        """Nearest neighbours of stored images (the image itself is left out of its own hits)."""
        ids = [int(i) for i in image_ids]
        recs = self.store.catalog.get_many(ids)
        missing = [i for i in ids if i not in recs or recs[i].deleted]
        if missing:
            raise NotFoundError(f"no image with id {missing[0]}")
        vs = self.store.open_vectors()
        vectors = vs.get(ids)
        owner, views = list(range(len(ids))), ["full"] * len(ids)
        frames = self.store.catalog.keyframes([i for i in ids if recs[i].kind == "video"])
        if frames:  # a stored video is searched by its own row and each of its keyframes, as an uploaded clip is
            views = ["clip" if recs[i].kind == "video" else "full" for i in ids]
            for n, i in enumerate(ids):
                for f in frames.get(i, []):
                    owner.append(n)
                    views.append(f"@{f.offset_s:g}")
            kf = [f for i in ids for f in frames.get(i, [])]
            vectors = np.concatenate([vectors, vs.get_rows(np.array([f.vec_segment for f in kf]),
                                                           np.array([f.vec_row for f in kf]))])
        scored = scores_for(self.store, ids) if self.heads else {}
        qs = [Query(f"id:{i}", recs[i].sha256, recs[i].p_unsafe, i, scored.get(i, {}), kind=recs[i].kind,
                    keyframes=len(frames.get(i, []))) for i in ids]
        stored = self.store.catalog.signals(ids)
        return self._search(qs, vectors, params, Timings(), exclude=[{i} for i in ids], owner=owner, views=views,
                            signals=[stored.get(i, Signals("", None)) for i in ids])

    def sweep(self, seeds: Sequence[int], *, min_similarity: float = 0.8, per_seed: int = 30,
              limit: int = 200) -> list[SweepHit]:
        """Unflagged images anywhere in the corpus near any of ``seeds`` (flagged images, or a cluster's
        most central members): each found once, with its best similarity and the seed it is near, best first."""
        ids = self._seed_ids(seeds)
        if not -1.0 <= min_similarity <= 1.0:
            raise InvalidInputError("min_similarity must be between -1 and 1", code="bad_parameter")
        if not 1 <= per_seed <= MAX_K or not 1 <= limit <= 10_000:
            raise InvalidInputError(f"per_seed must be 1–{MAX_K} and limit 1–10000", code="bad_parameter")
        best: dict[int, tuple[float, int]] = {}
        hits = self.index.search(self.store.open_vectors().get(ids), per_seed, "all", exclude=set(ids), live=False)
        for seed, h in zip(ids, hits):
            for i, s in zip(h.ids.tolist(), h.similarities.tolist()):
                if s >= min_similarity and (i not in best or s > best[i][0]):
                    best[i] = (float(s), seed)
        found = self.store.catalog.get_many(best)
        out = [SweepHit(found[i], s, seed) for i, (s, seed) in best.items()
               if i in found and not found[i].flagged and not found[i].deleted]
        out.sort(key=lambda h: -h.similarity)
        return out[:limit]

    def _seed_ids(self, seeds: Sequence[int]) -> list[int]:
        """Sweep seeds, each once: 1–MAX_SWEEP_SEEDS stored, live images."""
        ids = list(dict.fromkeys(int(i) for i in seeds))
        if not 1 <= len(ids) <= MAX_SWEEP_SEEDS:
            raise InvalidInputError(f"give 1–{MAX_SWEEP_SEEDS} seed images", code="bad_parameter")
        recs = self.store.catalog.get_many(ids)
        missing = [i for i in ids if i not in recs or recs[i].deleted]
        if missing:
            raise NotFoundError(f"no image with id {missing[0]}")
        return ids

    def suggest_sweep_threshold(self, seeds: Sequence[int]) -> float:
        """A starting threshold for sweeping around ``seeds`` (a cluster's central members): the 10th
        percentile of each seed's similarity to its nearest fellow seed, in the matching space — an
        image at least that close to a seed is as alike to the cluster as its own members are."""
        ids = self._seed_ids(seeds)
        if len(ids) < 2:
            return 0.8  # one seed says nothing about how alike its kind is
        v = self.index.space.apply(self.store.open_vectors().get(ids))
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return round(float(np.clip(np.percentile(sims.max(axis=1), 10), -1.0, 1.0)), 2)

    def sweep_threshold(self, seeds: Sequence[int], found: Sequence[float]) -> float:
        """The threshold a sweep page suggests: ``suggest_sweep_threshold`` held to what the sweep found
        (``found``: its candidates' similarities) — never above every candidate (it would show nothing while
        some sit just below), never so low that more than ``SWEEP_SUGGESTED_MAX`` pass."""
        return settle_threshold(self.suggest_sweep_threshold(seeds), found)

    def _search(self, queries: list[Query], vectors: np.ndarray, params: SearchParams, t: Timings,
                exclude: list[set[int]], owner: list[int] | None = None,
                views: list[str] | None = None, signals: list[Signals] | None = None,
                local: list[QueryFeatures | None] | None = None, boxes: list[dict[str, Box]] | None = None,
                greys: list[dict[str, np.ndarray]] | None = None,
                fallback: Callable[[list[int]], tuple[np.ndarray, list[int], list[str]]] | None = None,
                ) -> SearchResponse:
        """One index search for every row (a query's views are rows of their own; ``exclude``: ids each query
        leaves out), one catalog read for every hit; a query keeps, per image, the best similarity over its views and the view it came from.
        ``fallback`` gives more rows (the grid's parts) for the queries whose best similarity is below
        ``grid_below``, searched in a second index call. An upload's hits (``local``: its features) are then
        verified from the top (``_verify``)."""
        t0 = time.perf_counter()
        owner = owner if owner is not None else list(range(len(queries)))
        views = views or ["full"] * len(owner)
        rows = self.index.search(vectors, params.k, params.scope, exclude=[exclude[q] for q in owner], live=False)
        # stored videos' keyframes near each row: a video is found by the frame that shows what the query shows
        framed = list(zip(owner, views, self.index.search_frames(vectors, params.k * FRAME_FANOUT, params.scope)))
        if fallback is not None:
            top = [-1.0] * len(queries)
            for q, h in zip(owner, rows):
                if len(h.similarities):
                    top[q] = max(top[q], float(h.similarities.max()))
            needy = [q for q, sim in enumerate(top) if sim < self.grid_below]
            if needy:
                tf = time.perf_counter()
                more, more_owner, more_views = fallback(needy)
                t0 += time.perf_counter() - tf  # the fallback's decode and embed are timed as such
                if more_owner:  # (a strip too thin for a grid has no parts)
                    rows = rows + self.index.search(more, params.k, params.scope, live=False,
                                                    exclude=[exclude[q] for q in more_owner])
                    framed += zip(more_owner, more_views,
                                  self.index.search_frames(more, params.k * FRAME_FANOUT, params.scope))
                    owner, views = owner + more_owner, views + more_views
        # flagged images' windows near the whole upload's rows (the whole image, its trimmed and content views):
        # a part of a flagged picture meets the window that holds it. Not the upload's own parts (cells, the
        # grid's rows that follow): part against part matched look-alikes and cost R@10 on everyday edits
        whole = [j for j, v in enumerate(views[:len(vectors)]) if v in REGION_VIEWS] if self.regions else []
        regioned = list(zip([owner[j] for j in whole], self.index.search_regions(vectors[whole], params.k))) \
            if whole else []
        t1 = time.perf_counter()
        ids = ({int(i) for h in rows for i in h.ids} | {int(i) for _, _, fh in framed for i in fh.owners}
               | {int(i) for _, rh in regioned for i in rh.owners})
        recs = self.store.catalog.get_many(ids)
        want_flagged = params.scope == "flagged"
        live = {i for i, r in recs.items() if not r.deleted and (r.flagged or not want_flagged)}
        best: list[dict[int, tuple[float, str]]] = [{} for _ in queries]
        for q, view, h in zip(owner, views, rows):
            for i, sim in zip(h.ids.tolist(), h.similarities.tolist()):
                if i in live and sim >= params.min_similarity and (i not in best[q] or sim > best[q][i][0]):
                    best[q][i] = (float(sim), view)
        pairs: list[dict[int, list[FramePair]]] = [{} for _ in queries]
        for q, view, fh in framed:
            for i, off, sim in zip(fh.owners.tolist(), fh.offsets.tolist(), fh.similarities.tolist()):
                if i not in live or i in exclude[q] or sim < params.min_similarity:
                    continue
                if i not in best[q] or sim > best[q][i][0]:
                    best[q][i] = (float(sim), view)
                pairs[q].setdefault(i, []).append(FramePair(view, _offset_of(view), round(float(off), 3), float(sim)))
        windows: list[dict[int, tuple[float, float, float, float]]] = [{} for _ in queries]
        for (q, rh), view in zip(regioned, [views[j] for j in whole]):
            for i, box, sim in zip(rh.owners.tolist(), rh.boxes.tolist(), rh.similarities.tolist()):
                sim -= REGION_MARGIN  # a window competes with whole images: it must beat them by this much
                if i not in live or i in exclude[q] or sim < params.min_similarity:
                    continue
                if i not in best[q] or sim > best[q][i][0]:
                    best[q][i] = (float(sim), view)
                    windows[q][i] = tuple(box)  # type: ignore[assignment]
        top = [sorted(b.items(), key=lambda kv: -kv[1][0])[: params.k] for b in best]
        th = time.perf_counter()
        evidence: list[HashEvidence | None] = [None] * len(queries)
        if self.hashes is not None and signals is not None:
            evidence = list(self.hashes.lookup(signals, scope=params.scope, k=params.k,
                                               exclude=[q.known_id for q in queries]))
        # the upload's own bytes, where the store holds them (the hash lookup leaves that image out of its list)
        hashed = [_hash_matched(ev) | ({q.known_id} if ev is not None and q.known_id is not None else set())
                  for q, ev in zip(queries, evidence)]
        hashes_ms = (time.perf_counter() - th) * 1000
        tv = time.perf_counter()
        checked: list[dict[int, int]] = [{} for _ in queries]
        for q in range(len(queries)):
            feats = local[q] if local is not None and self.local is not None else None
            if hashed[q] and any(i in hashed[q] for i, _ in top[q]):
                top[q] = _hash_first(top[q], hashed[q])  # the picture by its hash: no local check needed
            elif feats is not None:
                top[q], checked[q] = self._verify(feats, top[q], recs, greys[q] if greys else {}, windows[q])
        verify_ms = (time.perf_counter() - tv) * 1000
        t.verify += verify_ms
        kept = sorted({i for row in top for i, _ in row})
        clusters = self.cluster_lookup(kept) if self.cluster_lookup and kept else {}
        scored = scores_for(self.store, kept) if self.heads and kept else {}
        where = boxes or [{} for _ in queries]
        results = [QueryResult(q, [Hit(recs[i], sim, clusters.get(i), view, where[n].get(view), scored.get(i, {}),
                                       seen.get(i), _best_pairs(pairs[n].get(i, ())), windows[n].get(i),
                                       i in hashed[n])
                                   for i, (sim, view) in row], ev)
                   for n, (q, row, ev, seen) in enumerate(zip(queries, top, evidence, checked))]
        t.search += (t1 - t0) * 1000
        t.hashes += hashes_ms
        t.hydrate += (time.perf_counter() - t1) * 1000 - verify_ms - hashes_ms
        st = self.index.stats()[params.scope]
        cp = {"image_id": st["covers_image_id"], "flag_event_id": st["covers_flag_event"],
              "generation": st["generation"]}
        return SearchResponse(results, self.model_id, params.scope, cp, t)

    def _verify(self, feats: QueryFeatures, row: list[tuple[int, tuple[float, str]]],
                recs: dict[int, ImageRecord], greys: dict[str, np.ndarray] | None = None,
                windows: dict[int, tuple[float, float, float, float]] | None = None,
                ) -> tuple[list[tuple[int, tuple[float, str]]], dict[int, int]]:
        """Check the hits by local features from the top until one verifies (at most ``verify_depth``);
        that one moves first, the rest keep the model's order. The top hit that verifies is kept as it is
        (most uploads: one check); a look-alike the model ranked above the copy gives way to it. Returns the
        row and each checked hit's agreeing matches. Measured on the match benchmark's queries (top 10 of the
        model, 9 edits × 300): promoting the *most* matches among the top 10 instead of the first verified
        hit gained nothing on average (mean R@1 0.958 both) and lost mirrored copies (0.99 → 0.95).
        A hit found through a part of the grid or an inset is checked on that part's own pixels (``greys``),
        where the picture fills more of the frame, as it fills the stored thumbnail. (Measured on benchmarks/composites.py,
        150 uploads an edit: butted pictures 0.63 → 0.69 R@1, picture-in-picture 0.59 → 0.66; checking a
        collage's cells the same way lost 3 × 3 grids 0.36 → 0.29 — clipart drawn alike verifies on small cells
        — so cells are checked on the whole upload.) A hit found through a window of a flagged picture
        (``windows``) that does not verify whole is checked on the window too (match benchmark, heavy crops:
        R@1 0.843 → 0.877, collages and stacked edits unchanged, no cost for uploads that copy nothing; checking
        every top hit's best window, not only hits found through one, added 0.003 and lost collages 0.006)."""
        assert self.local is not None
        checked: dict[int, int] = {}
        by_view: dict[str, QueryFeatures] = {}
        for j, (image_id, (_, view)) in enumerate(row[:self.verify_depth]):
            key = recs[image_id].thumb_key
            stored = self.local.get(key) if key else None
            mine = feats
            if greys and view in greys and view.startswith(("grid", "inset")):
                if view not in by_view:  # described once, for the first hit through it
                    by_view[view] = QueryFeatures(greys[view])
                mine = by_view[view]
            # the mirror only for the model's first hit: a mirrored copy is nearly always first already
            # (the model barely tells an image from its mirror), and a query whose first hit does not verify
            # would otherwise pay two matchings for every hit below it
            checked[image_id] = mine.matches(stored, mirror=j == 0) if stored is not None else 0
            box = windows.get(image_id) if windows else None
            if box is not None and key and checked[image_id] < MIN_MATCHES:
                # found through a window of the flagged picture: checked on that window too, cut from the
                # thumbnail and described at its scale, as a heavy crop fills the upload
                part = self.local.window(key, box)
                if part is not None:
                    checked[image_id] = max(checked[image_id], mine.matches(part, mirror=j == 0))
            if checked[image_id] >= MIN_MATCHES:
                return [row[j], *row[:j], *row[j + 1:]], checked
        return row, checked


def _hash_matched(ev: HashEvidence | None) -> set[int]:
    """The stored images an upload's hashes say it shows: its PDQ within the image threshold (both hashes of
    usable quality: ``HashMatcher.lookup``), or the same MD5."""
    return {m.record.id for m in ev.image_matches if m.signal_type in ("pdq", "md5")} if ev is not None else set()


def _hash_first(row: list[tuple[int, tuple[float, str]]], same: set[int]) -> list[tuple[int, tuple[float, str]]]:
    """The model's hits with those the upload's hashes match moved first (in the model's order). PDQ at the
    threshold HMA uses (31) says "one picture" for whole-picture edits — recompression, resizing, greyscale —
    where local features can fail (flat clipart gives ORB few corners). Measured through the API on the match
    benchmark (open_nsfw, 300 flagged originals, 83 % of them clipart): greyscale + contrast R@1 0.937 → 0.967,
    JPEG q30 at half size 0.847 → 0.863, crop 80 % and mirror unchanged; across seven edits no upload's PDQ
    matched another flagged picture among its hits."""
    return [h for h in row if h[0] in same] + [h for h in row if h[0] not in same]


def _offset_of(view: str) -> float | None:
    """The query clip's offset a row's view names ("@12.5", "@12.5/trimmed"); None for an image's views."""
    return float(view[1:].split("/")[0]) if view.startswith("@") else None


def _best_pairs(found: Iterable[FramePair], most: int = FRAME_PAIRS) -> tuple[FramePair, ...]:
    """The best pair per stored keyframe, best first, at most ``most``."""
    seen: dict[float, FramePair] = {}
    for fp in sorted(found, key=lambda fp: -fp.similarity):
        seen.setdefault(fp.offset, fp)
    return tuple(list(seen.values())[:most])


SWEEP_SUGGESTED_MAX = 50  # candidates a suggested sweep threshold lets through at most: a page a reviewer reads


def settle_threshold(suggested: float, found: Sequence[float], most: int = SWEEP_SUGGESTED_MAX) -> float:
    """``suggested`` moved to fit the candidates ``found``: where it admits none, down to the widest gap
    among the best ``most`` (the group that stands apart from the rest); where it admits more than ``most``,
    up to the ``most``-th best. Rounded down to 0.01 so the candidate it was set at passes."""
    sims = sorted((float(s) for s in found), reverse=True)
    if not sims:
        return suggested
    top = sims[:most]
    out = suggested
    if suggested > top[0]:
        if len(top) == 1:
            out = top[0]
        else:
            gaps = [top[i] - top[i + 1] for i in range(len(top) - 1)]
            out = top[int(np.argmax(gaps))]
    elif len(sims) > most and suggested < sims[most - 1]:
        out = sims[most - 1]
    return float(np.floor(out * 100) / 100)
