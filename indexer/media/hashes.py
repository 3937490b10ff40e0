"""The signals trust & safety teams exchange: PDQ, Meta's perceptual photo hash (through the maintained
``pdqhash`` binding, the one HMA and the ``threatexchange`` package use), and MD5 of the file's bytes.

PDQ is computed from the pixels the decoder already holds (the model's resampled input region where it is
512–2,047 px long, else the decoded image box-reduced so the long side is under 1,024):
PDQ itself reduces every image to 64 × 64 with box filters, so the reduction changes a hash by a few bits
(measured 2–4 of 256 on 1,600 × 1,200 photos against ``threatexchange``'s own full-resolution hash) while
the hash costs ~5 ms instead of ~30 ms. Like ``threatexchange`` (and so every HMA peer), the hash is of
the stored pixels, before EXIF orientation."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from indexer.errors import InvalidInputError

SIGNAL_TYPES = ("pdq", "md5", "vpdq")
# Names other tools give the same signals: threatexchange's signal type names and ThreatExchange's
# indicator types. MD5 is MD5 whatever the media, so HMA's ``video_md5`` lists match files byte for byte.
SIGNAL_ALIASES = {"pdq": "pdq", "hash_pdq": "pdq", "photo_pdq": "pdq",
                  "md5": "md5", "video_md5": "md5", "photo_md5": "md5", "hash_md5": "md5", "hash_video_md5": "md5",
                  "vpdq": "vpdq", "video_vpdq": "vpdq", "hash_vpdq": "vpdq"}
VPDQ_MAX_FRAMES = 100_000  # frame hashes one vPDQ may hold (one a second: 27 hours)
PDQ_BITS = 256
PDQ_HEX = PDQ_BITS // 4
MD5_HEX = 32
# PDQ's authors: hashes of quality below 50 come from flat or featureless images and match unrelated
# pictures; they are kept (a list may carry them) but never matched.
PDQ_MIN_QUALITY = 50
# PDQ's published "confident match" distance (threatexchange's PDQ_CONFIDENT_MATCH_THRESHOLD).
PDQ_DEFAULT_THRESHOLD = 31
# Past a quarter of the bits, two unrelated photos start to fall within the distance: refuse it.
PDQ_MAX_THRESHOLD = 64
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Pdq:
    hash: str     # 64 lower-case hex digits
    quality: int  # 0–100

    @property
    def usable(self) -> bool:
        return self.quality >= PDQ_MIN_QUALITY


@dataclass(frozen=True)
class Signals:
    """What an image is known by outside flagmatch."""
    md5: str
    pdq: Pdq | None  # None: the image could not be decoded, or was never hashed
    vpdq: str | None = None  # a video's vPDQ (threatexchange's signal string); None for an image


def pdq_of(rgb: np.ndarray) -> Pdq:
    """PDQ of an RGB uint8 array [h, w, 3]."""
    import pdqhash  # C++ extension: imported where it is used, so the catalog and API load without it

    bits, quality = pdqhash.compute(np.ascontiguousarray(rgb, dtype=np.uint8))
    return Pdq(np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex(), int(quality))


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def canonical_type(name: str) -> str:
    """flagmatch's name for a signal type given in any of the spellings lists use; InvalidInputError if unknown."""
    st = SIGNAL_ALIASES.get(name.strip().lower())
    if st is None:
        raise InvalidInputError(f"unsupported signal type {name!r}: flagmatch matches {', '.join(SIGNAL_TYPES)}",
                                code="bad_signal_type")
    return st


def guess_type(value: str) -> str | None:
    """The signal type a bare hex string's length implies (64 digits: PDQ, 32: MD5)."""
    n = len(value.strip())
    return "pdq" if n == PDQ_HEX else "md5" if n == MD5_HEX else None


def validate_signal(signal_type: str, value: str) -> str:
    """The canonical (lower-case hex) form of ``value`` as a ``signal_type``; InvalidInputError saying why not.
    A vPDQ is threatexchange's signal string (a JSON list of ``"<pdq hex>,<quality>,<seconds>"``), checked by
    threatexchange and written back in its own canonical form."""
    st = canonical_type(signal_type)
    if st == "vpdq":
        return validate_vpdq(value)
    v = value.strip().lower()
    want = PDQ_HEX if st == "pdq" else MD5_HEX
    if not _HEX.match(v):
        raise InvalidInputError(f"a {st} hash is hexadecimal; {_short(value)!r} is not", code="bad_signal")
    if len(v) != want:
        raise InvalidInputError(f"a {st} hash has {want} hex digits, not {len(v)}", code="bad_signal")
    return v


def validate_vpdq(value: str) -> str:
    from threatexchange.extensions.vpdq.vpdq_util import json_to_vpdq, vpdq_to_json
    if len(value) > VPDQ_MAX_FRAMES * 80:
        raise InvalidInputError(f"a vpdq hash holds at most {VPDQ_MAX_FRAMES:,} frames", code="bad_signal")
    try:
        features = json_to_vpdq(value.strip())
    except (ValueError, TypeError, AttributeError) as exc:  # json's errors are ValueErrors; a non-list, TypeError
        raise InvalidInputError(f"not a vpdq hash (threatexchange's JSON list of frame hashes): {_short(str(exc))}",
                                code="bad_signal") from None
    if not features:
        raise InvalidInputError("a vpdq hash has at least one frame", code="bad_signal")
    if len(features) > VPDQ_MAX_FRAMES:
        raise InvalidInputError(f"a vpdq hash holds at most {VPDQ_MAX_FRAMES:,} frames", code="bad_signal")
    for f in features:
        f.pdq_hex = f.pdq_hex.lower()
    return vpdq_to_json(features)


def signal_key(signal_type: str, signal: str) -> str:
    """What identifies a signal in a bank's unique index: the signal itself, or for a vPDQ (kilobytes long) its
    sha256."""
    return hashlib.sha256(signal.encode()).hexdigest() if signal_type == "vpdq" else signal


def pdq_codes(hexes: Iterable[str]) -> np.ndarray:
    """uint8 [n, 32]: PDQ hashes as the binary codes FAISS indexes."""
    raw = b"".join(bytes.fromhex(h) for h in hexes)
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, PDQ_BITS // 8).copy()


def pdq_distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def pdq_distances(query: str, hexes: Sequence[str]) -> np.ndarray:
    if not hexes:
        return np.zeros(0, np.int32)
    q = np.unpackbits(pdq_codes([query]), axis=1)
    return (np.unpackbits(pdq_codes(hexes), axis=1) != q).sum(axis=1).astype(np.int32)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "…"
