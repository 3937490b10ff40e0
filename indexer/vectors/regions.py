"""Region vectors: flagged images searchable by their parts.

A heavy crop of a flagged picture (a quarter of it, scaled back up) or one cell cut out of a flagged collage
does not look like the whole picture to the model: its vector is far from the stored one, and a look-alike
wins. So each flagged image also keeps the vectors of ``WINDOWS`` of its stored thumbnail — 3 × 3 windows of
half its width and height, a quarter apart (the four quadrants, the centre, the middles of the edges) — and a
search asks them beside the whole-image indexes. A part of a flagged picture then meets the window that holds
it; a 2 × 2 collage's cells are its quadrants, so a stored collage is found from one of its pictures.

Measured on the match benchmark's store (300 flagged originals among 3,228 images, open_nsfw, learned
whitening; query vectors of the whole upload, no views): a heavy crop (25–40 % of the area) found its
original first 0.73 → 0.89 of the time with windows cut from the thumbnails (0.91 from the originals: the
thumbnail, always there, is enough). Windows compete with whole images, so a hit through a window counts
``REGION_MARGIN`` less: at 0.1 no other edit lost (0.00–0.03 at no margin). Through the API only the whole
upload's rows ask them (the image, its trimmed and content views): with the upload's own parts asking too
(cells, the grid) at a margin of 0.05, heavy crops gained the same but everyday edits lost up to 0.04 R@10
(a quadrant of an upload meets a quadrant of some other flagged picture).

Derived data, like the indexes: made from the stored thumbnails by a process that has the model
(``update_regions``, the ``flagmatch regions`` command: nine model passes per newly flagged image, so never
inside an ingest or a reindex, which would grow ten-fold for a store of flagged imports), kept raw in ``index/regions.npz``
(float16, written atomically) with each row's image and box, and searched exactly in the current matching
space by every process that opens the store, which reloads the file when it changes. Images flagged since the
last update are searchable whole until the next one. Deleting an image rewrites the file without its rows.
The cost: 9 rows per flagged image — 18 kB raw at 1,024-d (open_nsfw), 9 kB in memory at 256-d of the space."""
from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import faiss
import numpy as np

from indexer.storage.files import publish_with
from indexer.vectors.space import MatchingSpace

if TYPE_CHECKING:
    from indexer.models.embed import Embedder
    from indexer.storage.store import Store

log = logging.getLogger(__name__)
FILE = "regions.npz"
# left, top, right, bottom as fractions of the picture: 3 × 3 windows of half its size, a quarter apart
WINDOWS = tuple((x / 4, y / 4, x / 4 + 0.5, y / 4 + 0.5) for y in range(3) for x in range(3))
REGION_MARGIN = 0.1   # a window's similarity counts this much less than a whole image's
BATCH = 32            # model inputs per forward pass while windows are embedded


@dataclass(frozen=True)
class RegionRows:
    ids: np.ndarray    # int64 [n]: the image each row is a window of
    boxes: np.ndarray  # float32 [n, 4]: the window, fractions of the picture (left, top, right, bottom)
    raw: np.ndarray    # float16 [n, d]: the model's raw vector of the window
    model_id: str

    @classmethod
    def empty(cls, dim: int, model_id: str = "") -> "RegionRows":
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, dim), np.float16), model_id)

    def without(self, drop: Iterable[int]) -> "RegionRows":
        keep = ~np.isin(self.ids, np.fromiter(drop, np.int64))
        return RegionRows(self.ids[keep], self.boxes[keep], self.raw[keep], self.model_id)


def path_of(index_dir: Path) -> Path:
    return index_dir / FILE


def load_rows(index_dir: Path) -> RegionRows | None:
    """The rows in ``index/regions.npz``; None when there is none or it cannot be read (made again by the
    next update: it is derived data)."""
    path = path_of(index_dir)
    try:
        with np.load(path, allow_pickle=False) as z:
            rows = RegionRows(z["ids"].astype(np.int64), z["boxes"].astype(np.float32), z["raw"].astype(np.float16),
                              str(z["model_id"]))
    except FileNotFoundError:
        return None
    except Exception as exc:  # numpy raises many kinds for a damaged archive
        log.warning("%s is unreadable (%s): region vectors are made again by the next update", path,
                    type(exc).__name__)
        return None
    n = len(rows.ids)
    if rows.boxes.shape != (n, 4) or rows.raw.ndim != 2 or len(rows.raw) != n:
        log.warning("%s: its arrays do not fit together; ignored", path)
        return None
    return rows


def save_rows(index_dir: Path, rows: RegionRows) -> None:
    index_dir.mkdir(parents=True, exist_ok=True)
    publish_with(path_of(index_dir), lambda f: np.savez(f, ids=rows.ids, boxes=rows.boxes, raw=rows.raw,
                                                         model_id=np.str_(rows.model_id)))


def window_pixels(thumbnail: bytes, spec: object) -> list[np.ndarray]:
    """Model inputs of ``WINDOWS`` cut from a stored thumbnail."""
    from PIL import Image

    from indexer.media.decode import decode
    im = Image.open(io.BytesIO(thumbnail)).convert("RGB")
    w, h = im.size
    out = []
    for x0, y0, x1, y1 in WINDOWS:
        buf = io.BytesIO()
        im.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))).save(buf, "PNG", compress_level=1)
        out.append(decode(buf.getvalue(), spec, thumb_size=0, pdq=False).pixels)  # type: ignore[arg-type]
    return out


def update_regions(store: "Store", embedder: "Embedder", only: Iterable[int] | None = None) -> tuple[int, int]:
    """Give every live flagged image that has none its window rows (from its stored thumbnail: an image without
    one, or a video, gets none) and drop the rows of images no longer flagged or live; written atomically.
    ``only``: give windows to these images alone (if flagged), still dropping every stale row.
    Returns (images added, images dropped)."""
    from indexer.errors import DecodeError
    model_id = embedder.info.model_id
    rows = load_rows(store.index_dir)
    if rows is None or rows.model_id != model_id or rows.raw.shape[1] != embedder.info.dim:
        rows = RegionRows.empty(embedder.info.dim, model_id)
    flagged = set(store.catalog.image_ids(flagged=True))
    held = set(rows.ids.tolist())
    gone = held - flagged
    todo = sorted((flagged if only is None else flagged & {int(i) for i in only}) - held)
    ids: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    pixels: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    for start in range(0, len(todo), 256):
        recs = store.catalog.get_many(todo[start:start + 256])
        for image_id in todo[start:start + 256]:
            rec = recs.get(image_id)
            if rec is None or not rec.thumb_key or rec.kind != "image":
                continue
            try:
                made = window_pixels(store.thumb_path(rec.thumb_key).read_bytes(), embedder.info.input)
            except (OSError, DecodeError, ValueError) as exc:
                log.warning("image %d: no region vectors (%s)", image_id, exc)
                continue
            for box, px in zip(WINDOWS, made):
                ids.append(image_id)
                boxes.append(box)
                pixels.append(px)
            while len(pixels) >= BATCH:
                vecs.append(embedder.embed(np.stack(pixels[:BATCH]))[0])
                pixels = pixels[BATCH:]
    if pixels:
        vecs.append(embedder.embed(np.stack(pixels))[0])
    if not ids and not gone:
        if not path_of(store.index_dir).exists():
            save_rows(store.index_dir, rows)
        return 0, 0
    kept = rows.without(gone)
    new_raw = np.concatenate(vecs).astype(np.float16) if vecs else np.zeros((0, embedder.info.dim), np.float16)
    save_rows(store.index_dir, RegionRows(np.concatenate([kept.ids, np.asarray(ids, np.int64)]),
                                          np.concatenate([kept.boxes, np.asarray(boxes, np.float32).reshape(-1, 4)]),
                                          np.concatenate([kept.raw, new_raw]), model_id))
    return len(set(ids)), len(gone)


def erase_regions(index_dir: Path, image_ids: Iterable[int]) -> None:
    """Rewrite the region file without ``image_ids``' rows (a delete: nothing derived from them stays)."""
    rows = load_rows(index_dir)
    drop = set(int(i) for i in image_ids)
    if rows is not None and drop & set(rows.ids.tolist()):
        save_rows(index_dir, rows.without(drop))


@dataclass(frozen=True)
class RegionHits:
    """One query row's nearest windows, best first."""
    owners: np.ndarray        # int64 [m]: the image
    boxes: np.ndarray         # float32 [m, 4]: the window, fractions of it
    similarities: np.ndarray  # float32 [m]


class RegionIndex:
    """The region file's rows, exact inner product in the current matching space, reloaded when the file or
    the space changes (``sync``: a stat of the file)."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir
        self._stamp: tuple[int, int, int] | None = None  # file (mtime, size) and the space version held
        self._index: faiss.Index | None = None
        self._owners = np.zeros(0, np.int64)
        self._boxes = np.zeros((0, 4), np.float32)
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def sync(self, space: MatchingSpace) -> bool:
        """Reload when the file or the space changed since the last look; returns whether it did."""
        try:
            st = os.stat(path_of(self.index_dir))
            stamp = (st.st_mtime_ns, st.st_size, space.version)
        except FileNotFoundError:
            stamp = (0, 0, space.version)
        if stamp == self._stamp and (self._index is None or self._index.d == space.dim):
            return False
        rows = load_rows(self.index_dir) if stamp[1] else None
        index = None
        owners, boxes = np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
        if rows is not None and len(rows.ids) and rows.raw.shape[1] == space.dim_in:
            index = faiss.IndexFlatIP(space.dim)
            index.add(space.apply(rows.raw.astype(np.float32)))
            owners, boxes = rows.ids, rows.boxes
        with self._lock:
            self._index, self._owners, self._boxes, self._stamp = index, owners, boxes, stamp
        return True

    def search(self, vectors: np.ndarray, k: int) -> list[RegionHits]:
        """The ``k`` nearest windows of each row of ``vectors`` (already in the matching space)."""
        with self._lock:
            index, owners, boxes = self._index, self._owners, self._boxes
        if index is None or not len(vectors):
            return [RegionHits(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
                    for _ in range(len(vectors))]
        sims, rows = index.search(np.ascontiguousarray(vectors, np.float32), min(k, index.ntotal))
        out = []
        for s, r in zip(sims, rows):
            ok = r >= 0
            out.append(RegionHits(owners[r[ok]], boxes[r[ok]], s[ok]))
        return out
