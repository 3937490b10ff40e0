"""Reviewer verdicts: what a person decided about an image for one policy label — positive (it breaks the
policy) or negative (it does not) — with who, when, why and where from. The flag history says what
happened to a flag; verdicts are what the heads learn from.

Every review action writes them through ``record`` (``indexer.review.actions.set_flags`` for the viewer, the
API and the CLI; cluster decisions; the review queue; manifests with a ``verdict`` column). A later
verdict on the same image and label supersedes an earlier one: training reads the latest per pair, and
counts the pairs whose verdicts disagreed. Verdicts on images deleted since are kept (the audit trail)
and never trained on."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Sequence

from sqlalchemy import delete, func, insert, select

from indexer.storage.catalog import Catalog, Transaction
from indexer.storage.tables import MAX_LABEL, HeadScoreRow, ImageRow, QueueCandidateRow, VerdictRow, utcnow
from indexer.errors import InvalidInputError

MIN_PER_CLASS = 20      # fewer verdicts of either kind than this cannot be split, fitted and checked
MIN_TEST_PER_CLASS = 5  # the held-out share must hold a few of each kind, or its precision means nothing
DEFAULT_LABEL = "unsafe"  # the seed model's own notion: a flag with no label is a verdict on it


@dataclass(frozen=True)
class Verdict:
    image_id: int
    label: str
    positive: bool
    actor: str
    reason: str | None = None
    source: str = "cli"


@dataclass(frozen=True)
class LabelSet:
    """The latest verdict per image for one label, over live images, oldest first (for a split by time)."""
    label: str
    image_ids: list[int]
    positive: list[bool]
    at: list[dt.datetime]
    conflicts: int        # images whose verdicts for this label disagreed over time
    on_deleted: int       # verdicts left out because their image was deleted

    @property
    def counts(self) -> tuple[int, int]:
        pos = sum(self.positive)
        return pos, len(self.positive) - pos


def clean_label(label: str | None) -> str:
    text = (label or "").strip() or DEFAULT_LABEL
    if len(text) > MAX_LABEL:
        raise InvalidInputError(f"a label is at most {MAX_LABEL} characters", code="bad_parameter")
    return text


def record(catalog: Catalog, verdicts: Sequence[Verdict], *, tx: Transaction | None = None) -> int:
    """Append verdicts in one transaction (``tx``'s, when given); returns how many."""
    if not verdicts:
        return 0
    now = utcnow()
    rows = [{"image_id": int(v.image_id), "label": clean_label(v.label), "positive": bool(v.positive),
             "actor": v.actor[:200], "reason": v.reason, "source": v.source[:32], "at": now} for v in verdicts]
    with catalog.transaction(tx) as s:
        s.execute(insert(VerdictRow), rows)  # one executemany: a 1,000-member cluster decision stays quick
    return len(verdicts)


def labels(catalog: Catalog) -> dict[str, tuple[int, int]]:
    """Every label with verdicts: (positive, negative) counts of the latest verdict per live image."""
    out: dict[str, tuple[int, int]] = {}
    for label in _label_names(catalog):
        out[label] = latest(catalog, label).counts
    return out


def _label_names(catalog: Catalog) -> list[str]:
    with catalog.session() as s:
        return list(s.scalars(select(VerdictRow.label).distinct().order_by(VerdictRow.label)))


def latest(catalog: Catalog, label: str) -> LabelSet:
    with catalog.session() as s:
        rows = s.execute(select(VerdictRow.image_id, VerdictRow.positive, VerdictRow.at, ImageRow.deleted)
                         .join(ImageRow, ImageRow.id == VerdictRow.image_id)
                         .where(VerdictRow.label == label).order_by(VerdictRow.id)).all()
    last: dict[int, tuple[bool, dt.datetime]] = {}
    seen: dict[int, set[bool]] = {}
    deleted: set[int] = set()
    for image_id, positive, at, is_deleted in rows:
        if is_deleted:
            deleted.add(image_id)
            continue
        last[image_id] = (bool(positive), at)
        seen.setdefault(image_id, set()).add(bool(positive))
    order = sorted(last, key=lambda i: (last[i][1], i))
    return LabelSet(label, order, [last[i][0] for i in order], [last[i][1] for i in order],
                    sum(len(v) > 1 for v in seen.values()), len(deleted))


def for_images(catalog: Catalog, ids: Iterable[int]) -> dict[int, dict[str, bool]]:
    """The latest verdict per label for each of ``ids``: what a head must never overrule."""
    ids = list(dict.fromkeys(int(i) for i in ids))
    out: dict[int, dict[str, bool]] = {}
    with catalog.session() as s:
        for i in range(0, len(ids), 500):
            for image_id, label, positive in s.execute(
                    select(VerdictRow.image_id, VerdictRow.label, VerdictRow.positive)
                    .where(VerdictRow.image_id.in_(ids[i:i + 500])).order_by(VerdictRow.id)):
                out.setdefault(image_id, {})[label] = bool(positive)
    return out


def count(catalog: Catalog) -> int:
    with catalog.session() as s:
        return int(s.scalar(select(func.count()).select_from(VerdictRow)) or 0)


def add_candidates(catalog: Catalog, rows: Sequence[tuple[int, str, int, float]], *,
                   tx: Transaction | None = None) -> int:
    """(image id, label, seed image id, similarity) rows into the queue; an image already waiting for the
    same label is not added twice."""
    if not rows:
        return 0
    with catalog.transaction(tx) as s:
        waiting = set(s.execute(select(QueueCandidateRow.image_id, QueueCandidateRow.label).where(
            QueueCandidateRow.image_id.in_([r[0] for r in rows]))).all())
        new = [r for r in dict.fromkeys(rows) if (r[0], clean_label(r[1])) not in waiting]
        for image_id, label, seed, sim in new:
            s.add(QueueCandidateRow(image_id=image_id, label=clean_label(label), seed_image_id=seed,
                                    similarity=float(sim), added_at=utcnow()))
    return len(new)


def candidates(catalog: Catalog, limit: int = 200) -> list[tuple[int, str, int, float]]:
    """Waiting candidates without a verdict for their label yet, newest first: (image, label, seed, similarity)."""
    with catalog.session() as s:
        rows = s.execute(select(QueueCandidateRow.image_id, QueueCandidateRow.label, QueueCandidateRow.seed_image_id,
                                QueueCandidateRow.similarity)
                         .join(ImageRow, ImageRow.id == QueueCandidateRow.image_id)
                         .where(ImageRow.deleted.is_(False)).order_by(QueueCandidateRow.id.desc())
                         .limit(limit * 3)).all()
    said = for_images(catalog, [r[0] for r in rows])
    return [(int(i), str(lab), int(seed), float(sim)) for i, lab, seed, sim in rows
            if lab not in said.get(int(i), {})][:limit]


# ------------------------------------------------------------------ head scores (indexer.review.heads)

def save_scores(catalog: Catalog, per_head: Sequence[tuple[str, int, Sequence[int], Sequence[float]]]) -> None:
    """(label, head version, image ids, P) per head: each image's last score for the label, in one transaction."""
    with catalog.session() as s, s.begin():
        for label, version, ids, ps in per_head:
            if not len(ids):
                continue
            s.execute(delete(HeadScoreRow).where(HeadScoreRow.label == label, HeadScoreRow.image_id.in_(list(ids))))
            s.execute(insert(HeadScoreRow), [{"image_id": int(i), "label": label, "version": version, "p": float(p)}
                                             for i, p in zip(ids, ps)])


def scores_for(catalog: Catalog, ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """``p_<label>`` of stored images, from the last scoring."""
    out: dict[int, dict[str, float]] = {}
    ids = list(dict.fromkeys(int(i) for i in ids))
    with catalog.session() as s:
        for i in range(0, len(ids), 500):
            for image_id, label, p in s.execute(select(HeadScoreRow.image_id, HeadScoreRow.label, HeadScoreRow.p)
                                                .where(HeadScoreRow.image_id.in_(ids[i:i + 500]))):
                out.setdefault(int(image_id), {})[label] = round(float(p), 6)
    return out


def nearest_threshold(catalog: Catalog, label: str, threshold: float, limit: int) -> list[tuple[int, float]]:
    """Live images' (id, P) for ``label`` whose score is nearest ``threshold``, nearest first."""
    with catalog.session() as s:
        rows = s.execute(select(HeadScoreRow.image_id, HeadScoreRow.p)
                         .join(ImageRow, ImageRow.id == HeadScoreRow.image_id)
                         .where(HeadScoreRow.label == label, ImageRow.deleted.is_(False))
                         .order_by(func.abs(HeadScoreRow.p - threshold), HeadScoreRow.image_id).limit(limit)).all()
    return [(int(i), float(p)) for i, p in rows]


def head_flagged(catalog: Catalog, limit: int = 300) -> list[tuple[int, str | None, str]]:
    """Live images a head flagged, newest first: (id, label, flag source)."""
    with catalog.session() as s:
        rows = s.execute(select(ImageRow.id, ImageRow.flag_label, ImageRow.flag_source)
                         .where(ImageRow.flagged, ImageRow.deleted.is_(False), ImageRow.flag_source.like("head:%"))
                         .order_by(ImageRow.flagged_at.desc()).limit(limit)).all()
    return [(int(i), lab, str(src)) for i, lab, src in rows]
