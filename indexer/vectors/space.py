"""The matching space: a transform fitted on the catalog's own raw vectors, applied before indexing
and to every query.

Raw model features spend most of their variance on what the model was trained for (here: how unsafe
an image looks), so two unrelated unsafe images are already close and a re-encoded copy is not much
closer. The fits, measured in ``benchmarks/match.py``:

- **learned whitening** (when the model is at hand: ``reindex``, ``ingest``): pairs of a stored
  image's thumbnail and a synthetic re-upload of it (``indexer.media.augment``) give the covariance of edit
  noise; the space whitens that noise (so directions recompression, crops and captions move along
  count for little) and keeps the ``dim`` directions along which the store's images differ most
  (Radenović et al.'s learned whitening). On opennsfw features it raised mean R@1 over nine re-upload
  edits from 0.83 to 0.87 and every R@10 to ≥ 0.987;
- **hard views** (with the model, ``hard_views``): stored thumbnails through the edits evaders use
  (``indexer.media.augment.hard_view``), each paired with its image's stored vector, join the re-upload pairs
  as edit noise. On the match benchmark's hard edits (through the API, open_nsfw) blur + noise went from R@1
  0.82 to 0.92 and collage cells 0.59 to 0.66, the everyday edits within ±0.01;
- **the copy-detection head** (``fit_head``, opt-in): an SSCD-style residual MLP trained on the hard views
  on top of the whitening; measured against the whitening over the same views it lost R@10 on five of
  fifteen edits, so it is off by default;
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
from dataclasses import dataclass, replace
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
    head: bool = False        # train the copy-detection head on top of learned whitening (needs the model)
    head_images: int = 3000   # stored images the head's augmented views are made from (cached beside the spaces)
    head_hidden: int = 1024   # the head's hidden width
    head_epochs: int = 60     # passes over the views (the epoch with the best held-out recall is kept)
    head_temperature: float = 0.05  # InfoNCE temperature
    head_entropy: float = 0.5       # weight of the differential-entropy (KoLeo) regulariser
    head_negatives: int = 4096      # stored vectors every step contrasts against, beside the batch
    head_views: int = 1             # augmented views made of each of the head's images
    head_min_views: int = 500       # fewer views than this cannot train a head: learned whitening on the pairs alone
    head_lr: float = 3e-4
    head_decay: float = 0.05


@dataclass(frozen=True)
class MatchingSpace:
    version: int              # 0: the identity
    dim_in: int
    mean: np.ndarray | None   # [dim_in]
    proj: np.ndarray | None   # [dim, dim_in], each row already scaled
    power: float = 0.0
    fitted_n: int = 0
    sha256: str = ""          # of the saved file ("" for the identity)
    method: str = "pca"       # pca | learned | head
    head: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (w1 [hidden, dim], b1 [hidden], w2 [dim, hidden])

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
        if self.is_identity:
            return "identity"
        return {"learned": "learned-whiten", "head": "copy-detection-head"}.get(self.method, "pca-whiten")

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Rows of raw vectors → L2-normalised rows in this space (float32, C-contiguous)."""
        x = np.ascontiguousarray(np.atleast_2d(raw), np.float32)
        if self.proj is None or self.mean is None:
            return x
        y = _unit((x - self.mean) @ self.proj.T)
        if self.head is not None:
            w1, b1, w2 = self.head
            y = _unit(y + np.maximum(y @ w1.T + b1, 0.0) @ w2.T)
        return np.ascontiguousarray(y, np.float32)

    def fingerprint(self) -> str:
        """sha256 of what the space computes (its arrays), not of its file (which also names its version):
        two fits of one store with one set of settings give the same fingerprint."""
        h = hashlib.sha256(self.kind.encode())
        for arr in (self.mean, self.proj, *(self.head or ())):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, object]:
        return {"version": self.version, "kind": self.kind, "dim": self.dim, "power": self.power,
                "fitted_n": self.fitted_n}

    def summary(self) -> str:
        if self.is_identity:
            return "identity (raw features)"
        what = {"learned": "learned whitening", "head": "learned whitening + copy-detection head"}.get(
            self.method, f"PCA-whitening (power {self.power})")
        return f"version {self.version}: {what}, {self.dim_in}→{self.dim}-d, fitted on {self.fitted_n} vectors"


def _unit(y: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return y / norms


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
    head = dict(zip(("w1", "b1", "w2"), space.head)) if space.head is not None else {}
    publish_with(path, lambda f: np.savez(f, mean=space.mean, proj=space.proj, power=np.float64(space.power),
                                          fitted_n=np.int64(space.fitted_n), version=np.int64(space.version),
                                          method=np.str_(space.method), **head))
    return replace(space, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


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
            head = (tuple(z[k].astype(np.float32) for k in ("w1", "b1", "w2"))
                    if {"w1", "b1", "w2"} <= set(z.files) else None)
    except Exception as exc:  # numpy raises many kinds for a damaged archive
        raise ValueError(f"{path}: not a readable space file ({type(exc).__name__})") from None
    if mean.shape != (dim_in,) or proj.ndim != 2 or proj.shape[1] != dim_in or not np.isfinite(proj).all():
        raise ValueError(f"{path}: shapes do not fit {dim_in}-d vectors")
    if head is not None:
        w1, b1, w2 = head
        k = proj.shape[0]
        if (w1.ndim != 2 or w1.shape[1] != k or b1.shape != (w1.shape[0],) or w2.shape != (k, w1.shape[0])
                or not all(np.isfinite(a).all() for a in head)):
            raise ValueError(f"{path}: the head's shapes do not fit its {k}-d whitening")
        head = tuple(np.ascontiguousarray(a) for a in head)
    return MatchingSpace(version, dim_in, mean, np.ascontiguousarray(proj), power, fitted_n, sha256, method,
                         head)  # type: ignore[arg-type]


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
    ids = store.catalog.image_ids()
    held = _held(ids)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if (str(z["model_id"]) == model_id and len(z["a"]) >= n
                        and "held" in z.files and str(z["held"]) == held):
                    return z["a"][:n].astype(np.float32), z["b"][:n].astype(np.float32)
        except Exception:  # a damaged cache is rebuilt
            log.warning("%s is unreadable: embedding the pairs again", cache)
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
    publish_with(cache, lambda f: np.savez(f, a=a_out, b=b_out, model_id=np.str_(model_id), held=np.str_(held)),
                 durable=False)
    return a_out, b_out


def _held(ids: list[int]) -> str:
    """What a cache of pairs or views is valid for: the images the store held when they were drawn (a sample
    is drawn from all of them, so a store that has grown since draws another). Without it, a space refitted
    after the store grew reused a sample drawn from the first images alone, and one store gave two spaces
    depending on when its first fit ran (measured: R@1 up to 0.013 apart per edit on the match benchmark)."""
    import hashlib
    return hashlib.sha256(np.asarray(sorted(ids), np.int64).tobytes()).hexdigest()


# ------------------------------------------------------------------ the copy-detection head
AUGMENT_VERSION = 1  # bump when ``indexer.media.augment.hard_view`` changes: cached views are made again


def hard_views(store: "Store", embedder: "Embedder", n: int, seed: int = 1234,
               per_image: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, embeddings) of one hard view (``indexer.media.augment.hard_view``) of each of ``n`` stored
    images' thumbnails — chosen, edited and ordered from ``seed`` alone, so the same store gives the same
    views — cached in ``index/space-views.npz`` for the model and augmentation version that made them."""
    import io
    import random

    from PIL import Image

    from indexer.errors import DecodeError
    from indexer.media.augment import hard_view
    from indexer.media.decode import decode

    cache = store.index_dir / "space-views.npz"
    model_id = f"{embedder.info.model_id}|augment-{AUGMENT_VERSION}|seed-{seed}|views-{per_image}"
    ids = store.catalog.image_ids()
    held = _held(ids)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if (str(z["model_id"]) == model_id and int(z["n"]) == n
                        and "held" in z.files and str(z["held"]) == held):
                    return z["ids"].astype(np.int64), z["views"].astype(np.float32)
        except Exception:  # a damaged cache is rebuilt
            log.warning("%s is unreadable: embedding the views again", cache)
    rng = random.Random(seed)
    rng.shuffle(ids)
    spec = embedder.info.input
    picked: list[int] = []
    pixels: list[np.ndarray] = []
    others: list[Image.Image] = []  # the last few thumbnails seen: collage neighbours and inset backgrounds
    vecs: list[np.ndarray] = []
    for chunk in range(0, len(ids), 256):
        recs = store.catalog.get_many(ids[chunk:chunk + 256])
        for image_id in ids[chunk:chunk + 256]:
            rec = recs.get(image_id)
            if len(picked) >= n * per_image:
                break
            if rec is None or not rec.thumb_key or rec.kind != "image":
                continue
            try:
                data = store.thumb_path(rec.thumb_key).read_bytes()
                im = Image.open(io.BytesIO(data)).convert("RGB")
                made = []
                for _ in range(per_image):
                    buf = io.BytesIO()
                    hard_view(im, rng, others).save(buf, "JPEG", quality=95)
                    made.append(decode(buf.getvalue(), spec, thumb_size=0).pixels)
            except (OSError, DecodeError, ValueError):
                continue
            others = (others + [im])[-16:]
            for px in made:
                picked.append(image_id)
                pixels.append(px)
                if len(pixels) == 32:
                    vecs.append(embedder.embed(np.stack(pixels))[0])
                    pixels = []
        if len(picked) >= n * per_image:
            break
    if pixels:
        vecs.append(embedder.embed(np.stack(pixels))[0])
    out_ids = np.asarray(picked, np.int64)
    views = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros((0, embedder.info.dim), np.float32)
    publish_with(cache, lambda f: np.savez(f, ids=out_ids, views=views, n=np.int64(n),
                                           model_id=np.str_(model_id), held=np.str_(held)), durable=False)
    return out_ids, views


def fit_head(base: MatchingSpace, anchor_ids: np.ndarray, anchors: np.ndarray, views: np.ndarray,
             bank: np.ndarray, cfg: SpaceConfig) -> MatchingSpace:
    """A copy-detection head on top of ``base`` (learned whitening), SSCD-style (Pizzi et al. 2022): a residual
    MLP ``y ← unit(y + W2·relu(W1·y + b1))`` trained with InfoNCE between each stored image's vector
    (``anchors``, the row the index holds) and the vector of a hard edit of it (``views``), contrasted against
    the rest of the batch and ``cfg.head_negatives`` other stored vectors (``bank``, none of the anchors), with
    a differential-entropy (KoLeo) regulariser that keeps the images spread out. W2 starts at zero, so
    training starts from the whitening; an eighth of the images is held out, and the epoch whose held-out
    views find their own image first most often is kept (the whitening itself if none beats it). Seeded and
    single-threaded: the same inputs and settings give the same weights."""
    import torch

    za = torch.from_numpy(base.apply(anchors))
    zv = torch.from_numpy(base.apply(views))
    zb = torch.from_numpy(base.apply(bank))
    n, k = za.shape
    rng = np.random.default_rng(cfg.seed)
    groups = np.unique(anchor_ids)
    held_images = rng.permutation(groups)[: max(1, len(groups) // 8)]
    held_mask = np.isin(anchor_ids, held_images)
    held, train = np.flatnonzero(held_mask), np.flatnonzero(~held_mask)
    same = torch.from_numpy(anchor_ids)
    first = {int(i): j for j, i in reversed(list(enumerate(anchor_ids)))}
    own = np.asarray([first[int(i)] for i in anchor_ids])  # a row of each image's anchor in the gallery
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        w1 = torch.empty(cfg.head_hidden, k)
        torch.nn.init.kaiming_uniform_(w1, a=5 ** 0.5, generator=gen)
        params = [w1.requires_grad_(), torch.zeros(cfg.head_hidden, requires_grad=True),
                  torch.zeros(k, cfg.head_hidden, requires_grad=True)]
        opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=cfg.head_decay)

        def head(y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(y + torch.relu(y @ params[0].T + params[1]) @ params[2].T, dim=1)

        def held_recall() -> float:
            with torch.no_grad():
                gallery = head(torch.cat([za, zb[:20_000]]))
                best = (head(zv[held]) @ gallery.T).argmax(dim=1).numpy()
            return float(np.mean(best == own[held]))  # duplicate anchor rows: argmax takes the first

        base_r = best_r = held_recall()
        best_state, best_epoch = None, 0
        batch = 256
        tau = cfg.head_temperature
        for epoch in range(1, cfg.head_epochs + 1):
            perm = torch.from_numpy(train)[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(perm) - batch // 2, batch):
                idx = perm[i:i + batch]
                a, v = head(za[idx]), head(zv[idx])
                with torch.no_grad():
                    neg = head(zb[torch.randint(len(zb), (min(cfg.head_negatives, len(zb)),), generator=gen)])
                labels = torch.arange(len(idx))
                # two views of one image in a batch are not each other's negatives
                twin = (same[idx][:, None] == same[idx][None, :]) & ~torch.eye(len(idx), dtype=torch.bool)
                av = (a @ v.T / tau).masked_fill(twin, -1e4)
                loss = torch.nn.functional.cross_entropy(torch.cat([av.T, v @ neg.T / tau], dim=1), labels)
                loss = loss + torch.nn.functional.cross_entropy(av, labels)
                both = torch.cat([a, v])
                dist = torch.cdist(both, both) + torch.eye(len(both)) * 4.0
                entropy = -torch.log(dist.min(dim=1).values + 1e-6).mean()
                (loss + cfg.head_entropy * entropy).backward()
                opt.step()
                opt.zero_grad()
            if epoch % 5 == 0 or epoch == cfg.head_epochs:
                r = held_recall()
                if r > best_r:
                    best_r, best_epoch = r, epoch
                    best_state = tuple(p.detach().numpy().copy() for p in params)
        log.info("copy-detection head: held-out R@1 %.3f at epoch %d (the whitening alone: %.3f)",
                 best_r, best_epoch, base_r)
    finally:
        torch.set_num_threads(threads)
    if best_state is None:
        return base
    return replace(base, method="head", head=tuple(np.ascontiguousarray(a, np.float32) for a in best_state))
