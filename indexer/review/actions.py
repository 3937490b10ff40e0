"""The decisions a person takes on images, one function each. The CLI, the JSON API and the viewer are
thin wrappers over these, so the rules are the same everywhere: every change is in the flag history and
the audit log with its actor (the token's name, the session's, or the OS user), unflagging and deleting
need a reason, each decision commits in one transaction with everything it implies and its audit row, and
the vector index hears of the change after the commit, before the function returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from indexer.storage import verdicts
from indexer.storage.audit import AuditLog, AuditQuery
from indexer.storage.catalog import FlagRequest, ImageRecord, Transaction
from indexer.errors import InvalidInputError, NotFoundError
from indexer.storage.store import Store
from indexer.storage.tables import MAX_LABEL, MAX_REASON
from indexer.vectors.regions import erase_regions



class IndexFeed(Protocol):
    """What these actions need from the vector index (``VectorIndex`` has it)."""
    def catch_up(self) -> bool: ...
    def remove(self, ids: np.ndarray | list[int]) -> None: ...


def _clean(text: str | None, limit: int, what: str) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > limit:
        raise InvalidInputError(f"{what} must be a string of at most {limit} characters", code="bad_parameter")
    return text.strip() or None


def _live(store: Store, ids: Sequence[int]) -> dict[int, ImageRecord]:
    """The records of ``ids`` (each once, in the order asked), all live, or a refusal naming the first that is not."""
    if not ids:
        raise InvalidInputError("select at least one image", code="bad_parameter")
    unique = list(dict.fromkeys(int(i) for i in ids))
    recs = store.catalog.get_many(unique)
    missing = [i for i in unique if i not in recs or recs[i].deleted]
    if missing:
        raise NotFoundError(f"no image with id {missing[0]}")
    return {i: recs[i] for i in unique}


PERSON_SOURCES = ("review", "manual")  # a person's decision: each is also a verdict (indexer.storage.verdicts)


QUEUE_SIMILARITY = 0.85  # the queue_similarity setting's default


@dataclass(frozen=True)
class FlagChange:
    changed: list[int]          # the ids whose flag changed
    audit_id: int | None        # the audit row of the change (None: nothing changed, nothing recorded)


def set_flags(store: Store, index: IndexFeed | None, audit: AuditLog, ids: Sequence[int], *, flag: bool,
              actor: str, source: str, reason: str | None = None, label: str | None = None,
              via: str = "cli", queue_similarity: float = QUEUE_SIMILARITY) -> list[int]:
    """Flag or unflag ``ids`` (all must exist: nothing changes otherwise). Returns the ids whose state
    changed. Unflagging needs a reason: it is the decision a later reviewer will ask about. A person's
    flag or unflag is also a verdict on every id asked about — positive or negative for ``label``, else
    the label the image was flagged with, else the default — even when the flag was already so (a
    reviewer confirming what the model flagged is the example heads learn most from). ``via`` says where
    it was taken (viewer, api, cli, cluster, queue).

    The flag change, its verdicts, the review-queue candidates it implies and its audit row commit in one
    transaction; the vector index hears of it after the commit (and, if the process dies first, catches up
    from the catalog's flag events when it next opens)."""
    return change_flags(store, index, audit, ids, flag=flag, actor=actor, source=source, reason=reason, label=label,
                        via=via, queue_similarity=queue_similarity).changed


def change_flags(store: Store, index: IndexFeed | None, audit: AuditLog, ids: Sequence[int], *, flag: bool,
                 actor: str, source: str, reason: str | None = None, label: str | None = None,
                 via: str = "cli", queue_similarity: float = QUEUE_SIMILARITY) -> FlagChange:
    """``set_flags``, also saying which audit row records the change (what ``undo_flags`` takes)."""
    with store.catalog.transaction() as tx:
        change = set_flags_in(tx, store, index, audit, ids, flag=flag, actor=actor, source=source, reason=reason,
                              label=label, via=via, queue_similarity=queue_similarity)
    if index is not None:
        index.catch_up()
    return change


def set_flags_in(tx: Transaction, store: Store, index: IndexFeed | None, audit: AuditLog, ids: Sequence[int], *,
                 flag: bool, actor: str, source: str, reason: str | None = None, label: str | None = None,
                 via: str = "cli", queue_similarity: float = QUEUE_SIMILARITY) -> FlagChange:
    """``set_flags`` inside a transaction the caller holds (a cluster decision's): the rules are the same,
    nothing commits until the caller's transaction does, and the caller tells the index afterwards."""
    reason, label = _clean(reason, MAX_REASON, "reason"), _clean(label, MAX_LABEL, "label")
    if not flag and not reason:
        raise InvalidInputError("say why these images are not unsafe (reason)", code="reason_required")
    before = _live(store, ids)
    unique = list(before)
    changed = store.catalog.set_flag(unique, FlagRequest(source, label, actor, reason), flag=flag, tx=tx)
    if source in PERSON_SOURCES:
        verdicts.record(store.catalog, [verdicts.Verdict(i, label or before[i].flag_label or verdicts.DEFAULT_LABEL,
                                                          flag, actor, reason, via) for i in unique], tx=tx)
        if flag and changed:
            queue_neighbours(store, index, changed, label or verdicts.DEFAULT_LABEL, queue_similarity, tx=tx)
    audit_id = None
    if changed:  # a repeated request (a double submit, a retry) changes nothing and records nothing
        audit_id = audit.record(actor, "flag" if flag else "unflag", _target(unique), tx=tx, ids=changed,
                                asked=unique, reason=reason, label=label, source=source,
                                labels={str(i): before[i].flag_label for i in changed if i in before and not flag})
    return FlagChange(changed, audit_id)


def undo_flags(store: Store, index: IndexFeed | None, audit: AuditLog, audit_id: int, *, actor: str,
               via: str = "viewer") -> FlagChange:
    """Undo one flag or unflag (the audit row ``audit_id`` records it): the images it unflagged are flagged
    again with the label each had, the images it flagged are unflagged — where nothing changed them since —,
    as a person's decision with reason "undo of #N", audited as ``undo_flags`` in the same transaction. An
    action is undone once."""
    ev = audit.event(audit_id)
    if ev is None or ev.action not in ("flag", "unflag"):
        raise NotFoundError(f"no flag change #{audit_id} to undo")
    done = audit.events(1, query=AuditQuery(action="undo_flags", target=f"undo:{audit_id}"))
    if done:
        raise InvalidInputError(f"flag change #{audit_id} was already undone (#{done[0].id})", code="nothing_to_undo")
    ids = [int(i) for i in ev.detail.get("ids") or []]
    recs = store.catalog.get_many(ids)
    reflag = ev.action == "unflag"
    todo = [i for i in ids if i in recs and not recs[i].deleted and recs[i].flagged != reflag]
    labels = {int(k): v for k, v in (ev.detail.get("labels") or {}).items()}
    reason = f"undo of #{audit_id}"
    changed: list[int] = []
    with store.catalog.transaction() as tx:
        if reflag:
            by_label: dict[str | None, list[int]] = {}
            for i in todo:
                by_label.setdefault(labels.get(i), []).append(i)
            for label, group in by_label.items():
                changed += set_flags_in(tx, store, index, audit, group, flag=True, actor=actor, source="review",
                                        reason=reason, label=label, via=via).changed
        elif todo:
            changed = set_flags_in(tx, store, index, audit, todo, flag=False, actor=actor, source="review",
                                   reason=reason, via=via).changed
        record_id = audit.record(actor, "undo_flags", f"undo:{audit_id}", tx=tx, undone=audit_id, ids=changed)
    if index is not None:
        index.catch_up()
    return FlagChange(changed, record_id)


def queue_neighbours(store: Store, index: object, ids: Sequence[int], label: str, min_similarity: float,
                     k: int = 10, *, tx: Transaction | None = None) -> int:
    """Retroactive matching: the unflagged images at least ``min_similarity`` alike to images a reviewer
    just flagged join the review queue (for that label). Returns how many joined."""
    search = getattr(index, "search", None)
    if search is None or not ids:
        return 0
    vectors = store.open_vectors().get(list(ids))
    hits = search(vectors, k, "all", exclude=set(ids), live=False)
    near = {int(i): (seed, float(sim)) for seed, h in zip(ids, hits)
            for i, sim in zip(h.ids.tolist(), h.similarities.tolist()) if sim >= min_similarity}
    recs = store.catalog.get_many(near)
    rows = [(i, label, seed, sim) for i, (seed, sim) in near.items()
            if i in recs and not recs[i].flagged and not recs[i].deleted]
    return verdicts.add_candidates(store.catalog, rows, tx=tx)


def record_verdict(store: Store, audit: AuditLog, image_id: int, label: str, *, positive: bool, actor: str,
                   reason: str | None, via: str) -> None:
    """A verdict that changes no flag (an unflagged image judged not ``label``, from the review queue),
    with its audit row, in one transaction."""
    reason = _clean(reason, MAX_REASON, "reason")
    _live(store, [image_id])
    with store.catalog.transaction() as tx:
        verdicts.record(store.catalog, [verdicts.Verdict(image_id, label, positive, actor, reason, via)], tx=tx)
        audit.record(actor, "verdict", f"image:{image_id}", tx=tx, label=label, positive=positive, reason=reason)


def delete_images(store: Store, index: IndexFeed | None, audit: AuditLog, ids: Sequence[int], *, actor: str,
                  reason: str | None) -> list[int]:
    """Remove what flagmatch holds of ``ids`` but their sha256 and the audit trail: the catalog row is
    marked deleted (paths, external ids and flag cleared, so the same bytes are still known and never
    re-ingested) in one transaction with its audit row, then the thumbnail, the raw vector and the index
    entries go (a video's keyframes too: thumbnails, vectors, then their rows). The catalog goes first: if the process dies half-way, the image is already invisible
    everywhere, and running the same delete again finishes the rest."""
    reason = _clean(reason, MAX_REASON, "reason")
    if not reason:
        raise InvalidInputError("say why these images are deleted (reason)", code="reason_required")
    if not ids:
        raise InvalidInputError("select at least one image", code="bad_parameter")
    unique = list(dict.fromkeys(int(i) for i in ids))
    recs = store.catalog.get_many(unique)
    missing = [i for i in unique if i not in recs]
    if missing:
        raise NotFoundError(f"no image with id {missing[0]}")
    frames = [f for fs in store.catalog.keyframes(unique).values() for f in fs]  # a video's, rows of their own
    with store.catalog.transaction() as tx:
        store.catalog.mark_deleted(unique, actor, reason, tx=tx)
        audit.record(actor, "delete", _target(unique), tx=tx, ids=unique, reason=reason,
                     sha256=[recs[i].sha256 for i in unique])
    for key in [r.thumb_key for r in recs.values()] + [f.thumb_key for f in frames]:
        if key:
            store.thumb_path(key).unlink(missing_ok=True)
    if store.catalog.model_meta():
        store.open_vectors().erase(unique)
        if frames:
            store.open_vectors().erase_rows(np.array([f.vec_segment for f in frames]),
                                            np.array([f.vec_row for f in frames]))
    erase_regions(store.index_dir, unique)  # the windows of a flagged image (indexer.vectors.regions)
    if frames:  # last: a delete that died before this finds the keyframes again and finishes
        store.catalog.forget_keyframes(unique)
    if index is not None:
        index.remove(unique)
    return unique


def _target(ids: Sequence[int]) -> str:
    """The audit target: ``image:<id>`` for one image (filterable), ``images`` for a batch (ids in detail)."""
    return f"image:{ids[0]}" if len(ids) == 1 else "images"
