"""Cluster review decisions: one action per decision, the same for the viewer, the API and the CLI.

A decision names the cluster, labels it from the team's policy list, confirms or dismisses it, and
says why (a reason code from the team's list and a note). Dismissing a cluster says its images are
not unsafe: every current member that is flagged is unflagged, with the decision's reason, so they
stop matching at once. A decision, what it implies (unflags, verdicts, the cluster's identity) and its
audit rows commit in one transaction. Every decision is one audit row holding what it changed (the previous name,
label and status, the ids it unflagged), which is what ``undo_decision`` restores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from indexer.storage.clusters import ClusterInfo, ClusterStore
from indexer.storage import verdicts
from indexer.review.actions import IndexFeed, set_flags_in
from indexer.storage.audit import AuditLog, AuditQuery
from indexer.errors import InvalidInputError, NotFoundError
from indexer.storage.store import Store
from indexer.storage.tables import MAX_LABEL, MAX_REASON

DECISIONS = ("confirmed", "dismissed")


@dataclass(frozen=True)
class Decision:
    status: str                  # confirmed | dismissed
    reason_code: str             # one of the team's reason codes
    name: str | None = None      # None: keep the current name
    label: str | None = None     # None: keep the current label; else one of the policy labels
    note: str | None = None


@dataclass(frozen=True)
class DecisionResult:
    cluster: ClusterInfo
    unflagged: list[int]
    next_unreviewed: int | None


def decide_cluster(store: Store, index: IndexFeed | None, audit: AuditLog, cstore: ClusterStore, cluster_id: int,
                   decision: Decision, *, actor: str, labels: Sequence[str], reasons: Sequence[str]) -> DecisionResult:
    """Record ``decision`` on a cluster of the current run (see the module docstring)."""
    run = cstore.current_run()
    if run is None:
        raise NotFoundError("no clustering run yet")
    if decision.status not in DECISIONS:
        raise InvalidInputError(f"decision must be one of {', '.join(DECISIONS)}", code="bad_parameter")
    if decision.reason_code not in reasons:
        raise InvalidInputError(f"reason_code must be one of {', '.join(reasons)}", code="reason_required")
    if decision.label is not None and decision.label not in labels:
        raise InvalidInputError(f"label must be one of {', '.join(labels)}", code="bad_parameter")
    if decision.name is not None and len(decision.name) > MAX_LABEL:
        raise InvalidInputError(f"name is at most {MAX_LABEL} characters", code="bad_parameter")
    note = (decision.note or "").strip()[:MAX_REASON] or None
    before = cstore.cluster(run.id, cluster_id)
    members = [m.image_id for m in cstore.members(run.id, cluster_id)]
    flagged = [i for i, r in store.catalog.get_many(members).items() if r.flagged and not r.deleted]
    unflagged: list[int] = []
    with store.catalog.transaction() as tx:  # the decision, what it implies and its audit row: all or nothing
        if decision.status == "dismissed" and flagged:
            reason = f"cluster {cluster_id} dismissed: {decision.reason_code}" + (f" — {note}" if note else "")
            unflagged = set_flags_in(tx, store, index, audit, flagged, flag=False, actor=actor, source="review",
                                     via="cluster", reason=reason, label=decision.label).changed
        elif decision.status == "confirmed":  # every flagged member is a positive example of the cluster's label
            verdicts.record(store.catalog, [verdicts.Verdict(i, decision.label or verdicts.DEFAULT_LABEL, True, actor,
                                                             f"cluster {cluster_id} confirmed: {decision.reason_code}",
                                                             "cluster") for i in flagged], tx=tx)
        cstore.update_identity(cluster_id, actor=actor, name=decision.name, label=decision.label,
                               status=decision.status, tx=tx)
        audit.record(actor, f"cluster_{decision.status}", f"cluster:{cluster_id}", tx=tx,
                     reason_code=decision.reason_code, note=note, name=decision.name, label=decision.label,
                     unflagged=unflagged, previous={"status": before.status, "name": before.name, "label": before.label})
    if index is not None and unflagged:
        index.catch_up()
    return DecisionResult(cstore.cluster(run.id, cluster_id), unflagged, next_unreviewed(cstore, cluster_id))


def undo_decision(store: Store, index: IndexFeed | None, audit: AuditLog, cstore: ClusterStore, cluster_id: int, *,
                  actor: str) -> ClusterInfo:
    """Undo the latest decision on a cluster: its previous status comes back, the images it unflagged are
    flagged again (source ``review``, reason ``undo``), and a name or label the decision replaced comes back.
    A name or label the decision gave an unnamed cluster stays: it says what the images are, which undoing the
    verdict does not change (a reviewer who pressed Confirm for Dismiss keeps the name they typed). Audited as
    ``cluster_undo``."""
    run = cstore.current_run()
    if run is None:
        raise NotFoundError("no clustering run yet")
    target = f"cluster:{cluster_id}"
    last = next((e for e in audit.events(200, query=AuditQuery(target=target))
                 if e.action in ("cluster_confirmed", "cluster_dismissed", "cluster_undo")), None)
    if last is None or last.action == "cluster_undo":
        raise InvalidInputError(f"cluster {cluster_id} has no decision to undo", code="nothing_to_undo")
    previous = last.detail.get("previous") or {}
    refl = [int(i) for i in last.detail.get("unflagged") or []]
    live = [i for i, r in store.catalog.get_many(refl).items() if not r.deleted and not r.flagged]
    with store.catalog.transaction() as tx:
        if live:
            set_flags_in(tx, store, index, audit, live, flag=True, actor=actor, source="review", via="cluster",
                         reason=f"undo of cluster {cluster_id} decision #{last.id}")
        now = cstore.cluster(run.id, cluster_id)
        cstore.update_identity(cluster_id, actor=actor, name=previous.get("name") or now.name or "",
                               label=previous.get("label") or now.label or "",
                               status=previous.get("status") or "unreviewed", tx=tx)
        audit.record(actor, "cluster_undo", target, tx=tx, undone=last.id, reflagged=live)
    if index is not None and live:
        index.catch_up()
    return cstore.cluster(run.id, cluster_id)


def name_cluster(store: Store, cstore: ClusterStore, audit: AuditLog, cluster_id: int, *, actor: str, name: str,
                 label: str) -> None:
    """Name and label a cluster (an empty string clears either); audited as ``name_cluster`` in the same
    transaction."""
    if len(name) > MAX_LABEL or len(label) > MAX_LABEL:
        raise InvalidInputError(f"name and label are at most {MAX_LABEL} characters", code="bad_parameter")
    with store.catalog.transaction() as tx:
        cstore.update_identity(cluster_id, actor=actor, name=name, label=label, tx=tx)
        audit.record(actor, "name_cluster", f"cluster:{cluster_id}", tx=tx, name=name, label=label)


def next_unreviewed(cstore: ClusterStore, after: int | None = None) -> int | None:
    """The next unreviewed cluster of the current run after ``after`` (largest first, wrapping round)."""
    run = cstore.current_run()
    if run is None:
        return None
    order = [c.id for c in sorted(cstore.clusters(run.id), key=lambda c: (-c.size, c.id)) if c.status == "unreviewed"]
    if not order:
        return None
    if after in order:
        i = order.index(after)
        rest = order[i + 1:] + order[:i]
        return rest[0] if rest else None
    return order[0]
