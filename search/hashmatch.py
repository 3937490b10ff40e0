"""Hash evidence for a query: which bank entries its PDQ and MD5 match (each bank with its own threshold,
enabled switch and role), and which stored images share its hash. The search service, the HMA routes and
the CLI all ask this one object.

Rules, in the order they apply:
- a query's PDQ of quality below 50 matches nothing (PDQ's authors' advice), and neither do banked or
  stored hashes below it (kept, never indexed);
- a bank entry matches when its bank is enabled and the distance is within the bank's threshold (PDQ) or
  the bytes' MD5 is equal;
- any match in a ``negative`` bank suppresses the query's matches: they are reported as suppressed, and
  ``matched`` is false."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any, Callable, Sequence

from indexer.hashbanks.banks import Bank, BankEntry, Banks
from indexer.storage.catalog import ImageRecord
from indexer.hashbanks.hash_index import MIH_MIN, PdqIndex
from indexer.media.hashes import PDQ_DEFAULT_THRESHOLD, Signals, pdq_distance
from indexer.storage.store import Store


@dataclass(frozen=True)
class BankMatch:
    bank: str
    role: str
    entry_id: int
    signal_type: str
    signal: str
    distance: int       # bits for PDQ, 0 for MD5, for vPDQ the share of the query's frames unmatched (percent)
    threshold: int
    external_id: str | None
    tags: tuple[str, ...]
    content_id: int = 0           # HMA's bank_content_id (the content the entry's signal belongs to)
    enabled_ratio: float = 1.0    # the bank's, for HMA's coin flip
    live: bool = True             # bank enabled and the content not disabled now
    content_on: bool = True       # the content not disabled now (HMA's disable_until_ts)
    similarity: str = ""          # vPDQ: threatexchange's "<query %>%[<compared %>%]" (HMA's distance string)

    def to_json(self) -> dict[str, object]:
        return {"bank": self.bank, "role": self.role, "entry_id": self.entry_id, "content_id": self.content_id,
                "signal_type": self.signal_type,
                "signal": self.signal, "distance": self.distance, "threshold": self.threshold,
                "external_id": self.external_id, "tags": list(self.tags), "similarity": self.similarity or None}


@dataclass(frozen=True)
class ImageHashMatch:
    record: ImageRecord
    signal_type: str
    distance: int


@dataclass(frozen=True)
class HashEvidence:
    signals: Signals
    bank_matches: list[BankMatch] = field(default_factory=list)   # in enabled ``match`` banks
    negative_matches: list[BankMatch] = field(default_factory=list)
    image_matches: list[ImageHashMatch] = field(default_factory=list)

    @property
    def matched(self) -> bool:
        """Did any bank match (and no negative bank say the content is known to be benign)?"""
        return bool(self.bank_matches) and not self.negative_matches

    @property
    def pdq_usable(self) -> bool:
        return self.signals.pdq is not None and self.signals.pdq.usable


# vPDQ, with HMA's semantics (threatexchange's VPDQIndex and its thresholds): a frame matches within PDQ distance
# 31 among frames of quality >= 50, and a video matches when at least 80 % of the query's frames match
# (threatexchange's VPDQ_QUERY_MATCH_THRESHOLD_PERCENT: 80; a test holds the two equal)
VPDQ_THRESHOLD = 20


@dataclass(frozen=True)
class VpdqHit:
    id: int                       # a bank entry's id, or a stored video's
    query_match_percent: float    # of the query's frames, the share that matched one of the other's
    compared_match_percent: float  # and of the other's

    @property
    def distance(self) -> int:
        return int(round(100 - self.query_match_percent))

    @property
    def similarity(self) -> str:  # threatexchange's VPDQSimilarityInfo.pretty_str, as HMA answers it
        return f"{self.query_match_percent:.0f}%[{self.compared_match_percent:.0f}%]"


class VpdqIndex:
    """threatexchange's ``VPDQIndex`` (the one HMA matches vPDQ with) over (id, vPDQ) rows, built in memory and
    built again when the rows' state (count, highest id) changes — vPDQ lists are short next to PDQ ones."""

    def __init__(self, rows: Callable[[], list[tuple[int, str]]], state: Callable[[], tuple[int, int]]) -> None:
        self._rows, self._state = rows, state
        self._lock = threading.Lock()
        self._built: tuple[int, int] | None = None
        self._index: Any = None  # a VPDQIndex (imported with the video extra's vpdq, where a vPDQ is matched)

    def query(self, vpdq: str) -> list[VpdqHit]:
        from threatexchange.extensions.vpdq.vpdq_index import VPDQIndex
        from threatexchange.extensions.vpdq.vpdq_util import VPDQ_QUALITY_THRESHOLD, prepare_vpdq_feature
        state = self._state()
        with self._lock:
            if state != self._built:
                rows = [(sig, i) for i, sig in self._rows() if prepare_vpdq_feature(sig, VPDQ_QUALITY_THRESHOLD)]
                self._index = VPDQIndex.build(rows) if rows else None
                self._built = state
            index = self._index
        if index is None:
            return []
        return [VpdqHit(int(m.metadata), float(m.similarity_info.query_match_percent),
                        float(m.similarity_info.compared_match_percent)) for m in index.query(vpdq)]


class HashMatcher:
    def __init__(self, store: Store, *, image_threshold: int = PDQ_DEFAULT_THRESHOLD, index_kind: str = "auto",
                 mih_min: int = MIH_MIN) -> None:
        self.store = store
        self.banks = Banks(store.catalog)
        self.image_threshold = image_threshold
        self.index_kind, self.mih_min = index_kind, mih_min

    @cached_property
    def bank_index(self) -> PdqIndex:  # opened on first use: an ingest only touches the images' index
        return PdqIndex(self.store.index_dir / "pdq-banks.faissb", self.store.catalog, "pdq:banks",
                        self.banks.pdq_rows_after, kind=self.index_kind, mih_min=self.mih_min)

    @cached_property
    def vpdq_banks(self) -> VpdqIndex:
        return VpdqIndex(self.banks.vpdq_entries, self.banks.vpdq_state)

    @cached_property
    def vpdq_images(self) -> VpdqIndex:
        return VpdqIndex(self.store.catalog.vpdq_rows, self.store.catalog.vpdq_state)

    @cached_property
    def image_index(self) -> PdqIndex:
        return PdqIndex(self.store.index_dir / "pdq-images.faissb", self.store.catalog, "pdq:images",
                        self.store.catalog.pdq_rows_after, kind=self.index_kind, mih_min=self.mih_min)

    def save(self) -> None:
        self.bank_index.save()
        self.image_index.save()

    def rebuild(self) -> None:
        self.bank_index.rebuild()
        self.image_index.rebuild()
        self.save()

    def lookup(self, queries: Sequence[Signals], *, scope: str = "flagged", k: int = 10,
               exclude: Sequence[int | None] = (), every_bank: bool = False) -> list[HashEvidence]:
        """Bank matches and up to ``k`` stored images (flagged ones for scope ``flagged``) per query.
        ``every_bank`` also reports matches in disabled banks and of disabled contents, marked not ``live``
        (HMA's raw lookup reports them; its lookup applies the switch itself)."""
        # read again after any commit, so a switch applies at once; shared between request threads, so read-only
        banks = self.store.catalog.unless_changed(
            "banks", lambda: MappingProxyType({b.name: b for b in self.banks.list(counts=False)}))
        pdqs = [q.pdq.hash if q.pdq is not None and q.pdq.usable else None for q in queries]
        live = [b for b in banks.values() if b.enabled or every_bank]
        now = time.time()
        radius = max((b.pdq_threshold for b in live), default=-1)
        bank_hits = self.bank_index.search([p for p in pdqs if p], radius) if radius >= 0 else []
        image_hits = self.image_index.search([p for p in pdqs if p], self.image_threshold) if k > 0 else []
        md5_entries = {q.md5: self.banks.md5_entries(q.md5) for q in queries if q.md5}
        it_b, it_i = iter(bank_hits), iter(image_hits)
        per_query = [(next(it_b, []) if p else [], next(it_i, []) if p else []) for p in pdqs]
        vpdq_hits = [self.vpdq_banks.query(q.vpdq) if q.vpdq else [] for q in queries]
        entries = self.banks.entries({h.id for hits, _ in per_query for h in hits} |
                                     {h.id for hits in vpdq_hits for h in hits})
        out: list[HashEvidence] = []
        for n, (q, (bh, ih)) in enumerate(zip(queries, per_query)):
            matches: list[BankMatch] = []
            for h in bh:
                e = entries.get(h.id)
                b = banks.get(e.bank) if e is not None else None
                if e is None or b is None or e.signal_type != "pdq":
                    continue
                on = b.enabled and not e.disabled(now)
                if not on and not every_bank:
                    continue
                # the distance to the entry as the catalog holds it now: the binary index follows the catalog by
                # id, and an id freed by a delete (SQLite reuses the highest) may name another hash by now
                distance = pdq_distance(pdqs[n] or "", e.signal)
                if distance <= b.pdq_threshold:
                    matches.append(_match(b, e, "pdq", distance, b.pdq_threshold, on, not e.disabled(now)))
            for e in md5_entries.get(q.md5, []):
                b = banks.get(e.bank)
                if b is not None and (every_bank or (b.enabled and not e.disabled(now))):
                    matches.append(_match(b, e, "md5", 0, 0, b.enabled and not e.disabled(now), not e.disabled(now)))
            for vh in vpdq_hits[n]:
                e = entries.get(vh.id)
                b = banks.get(e.bank) if e is not None else None
                if e is None or b is None or e.signal_type != "vpdq":
                    continue
                on = b.enabled and not e.disabled(now)
                if on or every_bank:
                    matches.append(replace(_match(b, e, "vpdq", vh.distance, VPDQ_THRESHOLD, on, not e.disabled(now)),
                                           similarity=vh.similarity))
            images = self._images(q, ih, scope, k, exclude[n] if n < len(exclude) else None)
            out.append(HashEvidence(q, [m for m in matches if m.role == "match"],
                                    [m for m in matches if m.role == "negative"], images))
        return out

    def _images(self, q: Signals, hits: Sequence, scope: str, k: int,  # type: ignore[type-arg]
                exclude: int | None) -> list[ImageHashMatch]:
        found: dict[int, tuple[str, int]] = {h.id: ("pdq", h.distance) for h in hits}
        if q.vpdq:
            found.update((h.id, ("vpdq", h.distance)) for h in self.vpdq_images.query(q.vpdq))
        if q.md5:
            for i in self.store.catalog.images_with_md5(q.md5):
                found[i] = ("md5", 0)
        found.pop(exclude or 0, None)
        recs = self.store.catalog.get_many(found)
        keep = [ImageHashMatch(recs[i], st, d) for i, (st, d) in found.items()
                if i in recs and not recs[i].deleted and (recs[i].flagged or scope != "flagged")]
        keep.sort(key=lambda m: (m.distance, m.record.id))
        return keep[:k]

    def stats(self) -> dict[str, object]:
        return {"banks": len(self.banks.list(counts=False)),
                "pdq_banked": self.bank_index.ntotal, "pdq_images": self.image_index.ntotal,
                "structure": {"banks": "mih" if self.bank_index.is_mih else "flat",
                              "images": "mih" if self.image_index.is_mih else "flat"}}


def _match(b: Bank, e: BankEntry, st: str, distance: int, threshold: int, live: bool, content_on: bool
           ) -> BankMatch:
    return BankMatch(b.name, b.role, e.id, st, e.signal, distance, threshold, e.external_id, e.tags, e.content_id,
                     b.enabled_ratio, live, content_on)
