"""Local-feature verification: does a stored image show the query's picture?

The model's vector says two images look alike; it cannot tell a re-upload of a flagged picture from a
different picture of the same kind (two warning signs, two forest photos), and an edit (a crop, a frame
around it, heavy recompression) can move the copy's vector below a look-alike's. Local features can:
ORB keypoints (OpenCV: FAST corners, rotated BRIEF descriptors) matched between the two images and
fitted with one similarity transform under RANSAC. A copy — cropped, scaled, rotated a few degrees,
recompressed, greyed, captioned, pasted into a frame — keeps many matches that agree on one transform;
a look-alike keeps a handful scattered at random.

Both sides are described at the stored thumbnail's scale (long side ``SIDE``): a candidate from its
stored thumbnail (always there, no original needed), a query from the same-sized greyscale copy of the
upload. Each threshold says why:"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from indexer.media.views import content_box, trim_box

SIDE = 256            # the stored thumbnail's long side (settings.thumb_size's default): both sides at one scale
N_FEATURES = 1000     # ORB keeps the 1,000 strongest corners: a 256-px picture rarely has more worth keeping
FAST_THRESHOLD = 10   # lower than OpenCV's 20: soft clipart edges and greyed photos still give corners
PATCH = 15            # descriptor patch (and border) of 15 px, not 31: at 256 px a 31-px border leaves ~half the picture undescribed
RATIO = 0.8           # Lowe's ratio test: a match must be clearly better than the second best
RANSAC_PX = 3.0       # reprojection tolerance in thumbnail pixels (JPEG at half size moves corners ~1–2 px)
MIN_MATCHES = 12      # agreeing matches for "same picture". Match benchmark (the model's top 10 flagged hits of
                      # 2,700 edited uploads): the original reaches 8 / 12 / 16 / 20 in 86 / 83 / 78 / 75 %, the
                      # other hits in 5.4 / 2.6 / 1.6 / 1.2 % (mostly clipart drawn alike: circles, card faces)
MIN_SPREAD = 20       # px: the agreeing matches must span this much of the candidate both ways (not one logo)
SCALES = (0.1, 4.0)   # a copy is at most 10× smaller (a picture in a screenshot) or 4× larger than its original
# Between two *stored* images (copy families, ``describe_content``), what two different pictures can share is
# discounted: an overlay common to many uploads — the same screenshot frame, caption band, letterbox bars,
# the corners a rotation leaves — verifies two different pictures pasted into it. Corners on padding (flat
# regions of ≥ ``PAD_AREA`` of the picture touching its edge, grown by ``PAD_GROW`` px: bars, frames, the
# triangles of a rotation; at most ``PAD_AREA_MAX`` of it, so a drawing's own flat background is not padding)
# and corners outside the picture's content box (``indexer.media.views``: a frame's UI, a caption band) are
# dropped. Measured on the match benchmark's families (300 pictures × 10 files, 28,291 candidate pairs, each
# image's 15 nearest, mirrors tried): verified pairs of different pictures 2,304 → 1,118, of one picture
# 9,948 → 9,064. Variants measured without mirrors (2,106 / 8,653 undiscounted): the content box alone 1,139 /
# 8,049 (rotation corners stay); padding without the area cap 758 / 7,382 (a drawing on a flat background loses
# most of its corners); an 8-px inset inside the content box cost one picture's pairs more than it saved.
PAD_FLAT = 2.0        # grey-level std over 5×5 px below which a pixel is flat
PAD_AREA = 0.01       # share of the picture a flat region touching the edge must cover to be padding
PAD_AREA_MAX = 0.25   # and at most this share (more: the picture's own background)
PAD_GROW = 4          # px around padding whose corners are the padding's edge, not the picture's


@dataclass(frozen=True)
class Features:
    points: np.ndarray            # float32 [n, 2], thumbnail pixels
    descriptors: np.ndarray | None  # uint8 [n, 32]; None when the picture has no corners (a flat image)

    def __len__(self) -> int:
        return 0 if self.descriptors is None else len(self.descriptors)


# OpenCV's own thread pool off: callers parallelise (the server's decode pool, ``verify_pairs``' threads), and
# a pool of its own would spread each verification over every core beside the model's threads — the
# contention that costs the model a fifth of its speed (indexer.models.embed's lanes). One describe + match of a
# 256-px picture: ~7 ms on OpenCV's two threads, ~9 ms CPU on one.
cv2.setNumThreads(1)
_local = threading.local()  # OpenCV's detectors and matchers are not shared between threads


def _orb() -> cv2.ORB:
    if not hasattr(_local, "orb"):
        _local.orb = cv2.ORB_create(nfeatures=N_FEATURES, fastThreshold=FAST_THRESHOLD, edgeThreshold=PATCH,
                                    patchSize=PATCH)
        _local.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    return _local.orb


NONE = Features(np.zeros((0, 2), np.float32), None)


def describe(grey: np.ndarray) -> Features:
    """ORB keypoints and descriptors of a greyscale uint8 picture. A picture smaller than ``SIDE`` is first
    upscaled to it (bicubic): at 50 px an icon has no corners at ORB's scales, and since both sides of a
    comparison are upscaled alike, a small copy and its small original still meet at one scale. None for a
    picture too thin to hold a descriptor patch at every pyramid level (OpenCV would refuse to resize it)."""
    if grey.ndim == 2 and 0 < max(grey.shape) < SIDE:  # a small picture (an icon, a re-upload at 50 px)
        f = SIDE / max(grey.shape)
        grey = cv2.resize(np.ascontiguousarray(grey, dtype=np.uint8), (max(1, round(grey.shape[1] * f)),
                          max(1, round(grey.shape[0] * f))), interpolation=cv2.INTER_CUBIC)
    if grey.ndim != 2 or min(grey.shape) < 4 * PATCH:
        return NONE
    try:
        kp, desc = _orb().detectAndCompute(np.ascontiguousarray(grey, dtype=np.uint8), None)
    except cv2.error:
        return NONE
    return Features(np.float32([k.pt for k in kp]).reshape(-1, 2), desc)


def agreeing_matches(query: Features, candidate: Features) -> int:
    """How many of the query's features match the candidate's under one similarity transform (0 when
    fewer than 4 match, the transform is implausible, or the agreeing matches bunch in one spot)."""
    if len(query) < 4 or len(candidate) < 4:
        return 0
    _orb()
    pairs = [m for m in _local.matcher.knnMatch(query.descriptors, candidate.descriptors, k=2)
             if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    good, seen = [], set()
    for m, _ in sorted(pairs, key=lambda mm: mm[0].distance):  # one-to-one: each candidate feature once
        if m.trainIdx not in seen:
            seen.add(m.trainIdx)
            good.append(m)
    if len(good) < 4:
        return 0
    src = query.points[[g.queryIdx for g in good]]
    dst = candidate.points[[g.trainIdx for g in good]]
    transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
    if transform is None or not SCALES[0] <= float(np.sqrt(abs(np.linalg.det(transform[:, :2])))) <= SCALES[1]:
        return 0
    kept = dst[mask.ravel().astype(bool)]
    if len(kept) < 4 or np.ptp(kept[:, 0]) < MIN_SPREAD or np.ptp(kept[:, 1]) < MIN_SPREAD:
        return 0
    return int(len(kept))


def content_mask(grey: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which of ``points`` (in ``grey``'s pixels) lie on the picture rather than on padding or outside its
    content box (see ``PAD_FLAT``)."""
    h, w = grey.shape
    g = grey.astype(np.float32)
    mean = cv2.blur(g, (5, 5))
    std = np.sqrt(np.maximum(cv2.blur(g * g, (5, 5)) - mean * mean, 0.0))
    n, labels, stats, _ = cv2.connectedComponentsWithStats((std < PAD_FLAT).astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    padding = [int(c) for c in edge if c and PAD_AREA * h * w <= stats[c, cv2.CC_STAT_AREA] <= PAD_AREA_MAX * h * w]
    xi = np.clip(points[:, 0].astype(np.int64), 0, w - 1)
    yi = np.clip(points[:, 1].astype(np.int64), 0, h - 1)
    keep = np.ones(len(points), bool)
    if padding:
        pad = cv2.dilate(np.isin(labels, padding).astype(np.uint8), np.ones((2 * PAD_GROW + 1,) * 2, np.uint8))
        keep &= pad[yi, xi] == 0
    # uniform bars first (an app's header and footer would otherwise be taken for the background), then the
    # largest region that is not the background inside them (the picture, without the frame's text and icons)
    x0, y0, x1, y1 = trim_box(g) or (0, 0, w, h)
    inner = content_box(g[y0:y1, x0:x1], flat_background=True)
    if inner is not None:
        x0, y0, x1, y1 = x0 + inner[0], y0 + inner[1], x0 + inner[2], y0 + inner[3]
    keep &= (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)
    return keep


def describe_content(grey: np.ndarray) -> Features:
    """``describe``, keeping only the corners on the picture itself (``content_mask``): the features two
    stored images are compared by when copy families are formed."""
    feats = describe(grey)
    if feats.descriptors is None:
        return feats
    scale = SIDE / max(grey.shape) if max(grey.shape) < SIDE else 1.0  # describe upscaled a small picture
    keep = content_mask(grey, feats.points / scale)
    return Features(feats.points[keep], feats.descriptors[keep]) if keep.any() else NONE


def mirrored(load_grey: Callable[[str], np.ndarray | None]) -> Callable[[str], np.ndarray | None]:
    """A thumbnail loader giving each picture flipped left to right (ORB's descriptors are not mirror-invariant)."""
    def load(key: str) -> np.ndarray | None:
        grey = load_grey(key)
        return None if grey is None else np.ascontiguousarray(grey[:, ::-1])
    return load


class QueryFeatures:
    """An upload's features, and its mirror's only when a candidate does not verify without them (a
    mirrored re-upload: ORB's descriptors are not mirror-invariant)."""

    def __init__(self, grey: np.ndarray) -> None:
        self.grey = grey
        self.plain = describe(grey)
        self._mirror: Features | None = None

    def matches(self, candidate: Features, *, mirror: bool = True) -> int:
        """Agreeing matches with ``candidate``; with ``mirror``, the upload's mirror is tried too when the
        upload itself does not verify."""
        n = agreeing_matches(self.plain, candidate)
        if n >= MIN_MATCHES or not mirror:
            return n
        if self._mirror is None:
            self._mirror = describe(np.ascontiguousarray(self.grey[:, ::-1]))
        return max(n, agreeing_matches(self._mirror, candidate))


def thumbnail_grey(thumbs_dir: Path) -> Callable[[str], np.ndarray | None]:
    """A loader of stored thumbnails (by key under ``thumbs_dir``) as greyscale arrays; None when the file
    is missing or unreadable (the hit then stays unverified)."""
    def load(key: str) -> np.ndarray | None:
        try:
            with Image.open(thumbs_dir / key) as im:
                return np.asarray(im.convert("L"))
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    return load


class FeatureCache:
    """Stored images' features, described from their thumbnails on first use and kept (least recently
    used out) — a flagged image that matches once tends to match again (a re-upload campaign). Keyed by
    the thumbnail (content-addressed), so a cached entry can never describe another picture. 4,096
    entries hold ~45 MB (1,000 features: 32 bytes of descriptor and 8 of position each, at most)."""

    def __init__(self, load_grey: Callable[[str], np.ndarray | None], size: int = 4096,
                 describe: Callable[[np.ndarray], Features] = describe) -> None:
        self._load, self._size, self._describe = load_grey, size, describe
        self._kept: OrderedDict[str, Features | None] = OrderedDict()
        self._lock = threading.Lock()

    def window(self, thumb_key: str, box: Sequence[float]) -> Features | None:
        """The features of a window of the stored picture (``box``: fractions, left, top, right, bottom), cut
        from its thumbnail and described at the thumbnail's scale (``describe`` upscales the cut): a heavy
        crop of a flagged picture is compared with the part it shows, at the size it fills. Kept like ``get``."""
        def cut(grey: np.ndarray) -> np.ndarray:
            h, w = grey.shape
            x0, y0 = int(round(box[0] * w)), int(round(box[1] * h))
            x1, y1 = max(x0 + 1, int(round(box[2] * w))), max(y0 + 1, int(round(box[3] * h)))
            return np.ascontiguousarray(grey[y0:y1, x0:x1])
        return self._kept_or_made(f"{thumb_key}#{','.join(f'{v:.4f}' for v in box)}", thumb_key, cut)

    def get(self, thumb_key: str) -> Features | None:
        return self._kept_or_made(thumb_key, thumb_key, lambda grey: grey)

    def _kept_or_made(self, name: str, thumb_key: str,
                      part: Callable[[np.ndarray], np.ndarray]) -> Features | None:
        with self._lock:
            if name in self._kept:
                self._kept.move_to_end(name)
                return self._kept[name]
        grey = self._load(thumb_key)
        feats = self._describe(part(grey)) if grey is not None else None
        with self._lock:
            self._kept[name] = feats
            while len(self._kept) > self._size:
                self._kept.popitem(last=False)
        return feats


def verify_pairs(features: FeatureCache, keys: Sequence[str | None], a: np.ndarray, b: np.ndarray,
                 workers: int = 0, mirror: FeatureCache | None = None) -> np.ndarray:
    """For each pair of rows (``a[i]``, ``b[i]``) — images known by their thumbnail ``keys`` — whether they
    show the same picture; with ``mirror`` (the same pictures flipped), a pair that does not verify as it
    is is tried with the first one mirrored. Pairs run grouped by their first row (its features stay hot
    in the cache) on ``workers`` threads (0: one per core; OpenCV works outside the GIL)."""
    def check(i: int) -> bool:
        ka, kb = keys[int(a[i])], keys[int(b[i])]
        fa = features.get(ka) if ka else None
        fb = features.get(kb) if kb else None
        if fa is None or fb is None:
            return False
        if agreeing_matches(fa, fb) >= MIN_MATCHES:
            return True
        fm = mirror.get(ka) if mirror is not None and ka else None
        return fm is not None and agreeing_matches(fm, fb) >= MIN_MATCHES

    order = np.lexsort((b, a))
    out = np.zeros(len(a), bool)
    if not len(a):
        return out
    with ThreadPoolExecutor(workers or os.cpu_count() or 1, thread_name_prefix="verify") as pool:
        out[order] = list(pool.map(check, order.tolist(), chunksize=64))
    return out
