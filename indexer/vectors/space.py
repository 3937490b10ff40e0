"""The matching space: a transform fitted on the catalog's own raw vectors, applied before indexing
and to every query.

Raw model features spend most of their variance on what the model was trained for (here: how unsafe
an image looks), so two unrelated unsafe images are already close and a re-encoded copy is not much
closer. Two fits, measured in ``benchmarks/match.py``:

- **learned whitening** (when the model is at hand: ``reindex``, ``ingest``): pairs of a stored
  image's thumbnail and a synthetic re-upload of it (``indexer.media.augment``) give the covariance of edit
  noise; the space whitens that noise (so directions recompression, crops and captions move along
  count for little) and keeps the ``dim`` directions along which the store's images differ most
  (Radenović et al.'s learned whitening). On opennsfw features it raised mean R@1 over nine re-upload
  edits from 0.83 to 0.87 and every R@10 to ≥ 0.987;
- **PCA-whitening** (without a model: fitted from the stored vectors alone): centre, keep the top
  ``dim`` principal components and divide each by its eigenvalue to the power ``power``; a smaller
  gain (mean R@1 0.83 → 0.84 at power 0.25; full whitening, power 0.5, was no better than raw).

A space is versioned (``index/space-<version>.npz``, written atomically) and each index checkpoint
records the version and checksum it was built with; the raw vectors never change, so a space can
always be refitted. Below ``min_vectors`` the space is the identity (nothing to learn from yet)."""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.storage.files import publish_with

if TYPE_CHECKING:
    from indexer.storage.catalog import Checkpoint
    from indexer.models.embed import Embedder
    from indexer.storage.store import Store

log = logging.getLogger(__name__)
_FILE = re.compile(r"space-(\d+)\.npz")


@dataclass(frozen=True)
class SpaceConfig:
    dim: int = 256            # dimensions kept (capped at the model's dimension)
    power: float = 0.25       # PCA fit: each component divided by eigenvalue**power (0: PCA only, 0.5: whitening)
    pairs: int = 1500         # learned fit: synthetic re-upload pairs embedded (cached beside the spaces)
    shrink: float = 0.1       # learned fit: edit-noise covariance shrunk toward isotropic by this share
    min_vectors: int = 2000   # below this many stored vectors the space is the identity
    sample: int = 200_000     # vectors the fit reads at most
    seed: int = 1234


@dataclass(frozen=True)
class MatchingSpace:
    version: int              # 0: the identity
    dim_in: int
    mean: np.ndarray | None   # [dim_in]
    proj: np.ndarray | None   # [dim, dim_in], each row already scaled
    power: float = 0.0
    fitted_n: int = 0
    sha256: str = ""          # of the saved file ("" for the identity)
    method: str = "pca"       # pca | learned

    @classmethod
    def identity(cls, dim: int) -> "MatchingSpace":
        return cls(0, dim, None, None)

    @property
    def is_identity(self) -> bool:
        return self.proj is None

    @property
    def dim(self) -> int:
        return self.dim_in if self.proj is None else int(self.proj.shape[0])

    @property
    def kind(self) -> str:
        return "identity" if self.is_identity else ("learned-whiten" if self.method == "learned" else "pca-whiten")

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Rows of raw vectors → L2-normalised rows in this space (float32, C-contiguous)."""
        x = np.ascontiguousarray(np.atleast_2d(raw), np.float32)
        if self.proj is None or self.mean is None:
            return x
        y = (x - self.mean) @ self.proj.T
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        return np.ascontiguousarray(y / norms, np.float32)

    def describe(self) -> dict[str, object]:
        return {"version": self.version, "kind": self.kind, "dim": self.dim, "power": self.power,
                "fitted_n": self.fitted_n}

    def summary(self) -> str:
        if self.is_identity:
            return "identity (raw features)"
        what = "learned whitening" if self.method == "learned" else f"PCA-whitening (power {self.power})"
        return f"version {self.version}: {what}, {self.dim_in}→{self.dim}-d, fitted on {self.fitted_n} vectors"


def fit(sample: np.ndarray, cfg: SpaceConfig, version: int) -> MatchingSpace:
    """PCA-whitening of ``sample`` (raw vectors, one per row)."""
    x = np.asarray(sample, np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    cov = (xc.T @ xc) / max(n - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    keep = order[: min(cfg.dim, d, n - 1)]
    lam = np.maximum(vals[keep], 0.0)
    # a floor on the eigenvalues: components with (almost) no variance are noise, and dividing by
    # their tiny eigenvalue would blow that noise up to the size of the real signal
    lam = np.maximum(lam, 1e-3 * float(lam[0]) if len(lam) else 1.0)
    proj = (vecs[:, keep] / lam ** cfg.power).T
    return MatchingSpace(version, d, mean.astype(np.float32), np.ascontiguousarray(proj, np.float32),
                         cfg.power, int(n))


def fit_learned(sample: np.ndarray, a: np.ndarray, b: np.ndarray, cfg: SpaceConfig, version: int) -> MatchingSpace:
    """Learned whitening: whiten the covariance of ``a - b`` (pairs of an image and its re-upload, shrunk
    toward isotropic), then keep the top ``dim`` principal directions of ``sample`` in that space."""
    x = np.asarray(sample, np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    cs = diff.T @ diff / max(len(diff), 1)
    cs += cfg.shrink * np.trace(cs) / d * np.eye(d)
    w, v = np.linalg.eigh(cs)
    p1 = (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T          # cs^(-1/2)
    xw = (x - mean) @ p1.T
    w2, v2 = np.linalg.eigh(xw.T @ xw / max(n - 1, 1))
    keep = np.argsort(w2)[::-1][: min(cfg.dim, d)]
    proj = v2[:, keep].T @ p1
    return MatchingSpace(version, d, mean.astype(np.float32), np.ascontiguousarray(proj, np.float32), 0.5, int(n),
                         method="learned")


def path_for(directory: Path, version: int) -> Path:
    return directory / f"space-{version:06d}.npz"


def versions(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.glob("space-*.npz") if (m := _FILE.fullmatch(p.name)))


def save(directory: Path, space: MatchingSpace) -> MatchingSpace:
    """Write ``space`` atomically (temp file, fsync, rename, fsync the folder); returns it with its checksum."""
    if space.is_identity:
        return space
    assert space.mean is not None and space.proj is not None
    directory.mkdir(parents=True, exist_ok=True)
    path = path_for(directory, space.version)
    publish_with(path, lambda f: np.savez(f, mean=space.mean, proj=space.proj, power=np.float64(space.power),
                                          fitted_n=np.int64(space.fitted_n), version=np.int64(space.version),
                                          method=np.str_(space.method)))
    return MatchingSpace(space.version, space.dim_in, space.mean, space.proj, space.power, space.fitted_n,
                         hashlib.sha256(path.read_bytes()).hexdigest(), space.method)


def load(directory: Path, version: int, sha256: str, dim_in: int) -> MatchingSpace:
    """The saved space ``version``; raises ValueError when it is missing, altered or does not fit."""
    if version == 0:
        return MatchingSpace.identity(dim_in)
    path = path_for(directory, version)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: its checksum does not match the index checkpoint (altered or truncated)")
    try:
        import io
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            mean, proj = z["mean"].astype(np.float32), z["proj"].astype(np.float32)
            power, fitted_n = float(z["power"]), int(z["fitted_n"])
            method = str(z["method"]) if "method" in z.files else "pca"
    except Exception as exc:  # numpy raises many kinds for a damaged archive
        raise ValueError(f"{path}: not a readable space file ({type(exc).__name__})") from None
    if mean.shape != (dim_in,) or proj.ndim != 2 or proj.shape[1] != dim_in or not np.isfinite(proj).all():
        raise ValueError(f"{path}: shapes do not fit {dim_in}-d vectors")
    return MatchingSpace(version, dim_in, mean, np.ascontiguousarray(proj), power, fitted_n, sha256, method)


def prune(directory: Path, keep: set[int]) -> None:
    """Remove space files no checkpoint uses any more (keeping ``keep``)."""
    for v in versions(directory):
        if v not in keep and v < max(keep | {0}):
            try:
                path_for(directory, v).unlink()
            except OSError:
                pass


def for_checkpoint(directory: Path, cp: "Checkpoint", dim_in: int) -> MatchingSpace:
    """The space an index checkpoint names (version and checksum); raises ValueError as ``load``."""
    return load(directory, int(cp.params.get("space_version", 0)), str(cp.params.get("space_sha256", "")), dim_in)


def current_space(store: "Store", dim: int) -> MatchingSpace:
    """The matching space the store's ``all`` index was built with (the identity before any, or when
    its file cannot be read: the index itself refits it on its next open)."""
    cp = store.catalog.checkpoint("all")
    if cp is None:
        return MatchingSpace.identity(dim)
    try:
        return for_checkpoint(store.index_dir, cp, dim)
    except ValueError as exc:
        log.warning("matching space: %s; using the raw features", exc)
        return MatchingSpace.identity(dim)


def reupload_pairs(store: "Store", embedder: "Embedder", n: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``n`` stored images' thumbnails and of a synthetic re-upload of each (random
    edits, ``indexer.media.augment``), cached in ``index/space-pairs.npz`` for the model that made them."""
    import io
    import random

    from PIL import Image

    from indexer.media.augment import reupload
    from indexer.media.decode import decode
    from indexer.errors import DecodeError

    cache = store.index_dir / "space-pairs.npz"
    model_id = embedder.info.model_id
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["model_id"]) == model_id and len(z["a"]) >= n:
                    return z["a"][:n].astype(np.float32), z["b"][:n].astype(np.float32)
        except Exception:  # a damaged cache is rebuilt
            log.warning("%s is unreadable: embedding the pairs again", cache)
    ids = store.catalog.image_ids()
    rng = random.Random(seed)
    rng.shuffle(ids)
    spec = embedder.info.input
    a_px: list[np.ndarray] = []
    b_px: list[np.ndarray] = []
    for chunk in range(0, len(ids), 256):
        recs = store.catalog.get_many(ids[chunk:chunk + 256])
        for rec in recs.values():
            if len(a_px) >= n:
                break
            if not rec.thumb_key:
                continue
            try:
                data = store.thumb_path(rec.thumb_key).read_bytes()
                a = decode(data, spec, thumb_size=0).pixels
                buf = io.BytesIO()
                reupload(Image.open(io.BytesIO(data)).convert("RGB"), rng).save(buf, "PNG", compress_level=1)
                b = decode(buf.getvalue(), spec, thumb_size=0).pixels
            except (OSError, DecodeError):
                continue
            a_px.append(a)
            b_px.append(b)
        if len(a_px) >= n:
            break
    ea, eb = [], []
    for i in range(0, len(a_px), 32):
        ea.append(embedder.embed(np.stack(a_px[i:i + 32]))[0])
        eb.append(embedder.embed(np.stack(b_px[i:i + 32]))[0])
    a_out = np.concatenate(ea) if ea else np.zeros((0, embedder.info.dim), np.float32)
    b_out = np.concatenate(eb) if eb else np.zeros((0, embedder.info.dim), np.float32)
    publish_with(cache, lambda f: np.savez(f, a=a_out, b=b_out, model_id=np.str_(model_id)), durable=False)
    return a_out, b_out
