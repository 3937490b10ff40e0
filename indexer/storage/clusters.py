"""The clustering job's records (tables in ``indexer.storage.tables``): runs, stable
cluster identities (name, label, review status), the clusters of each run and every member's
membership, outlier score and 2-D map coordinates. A run becomes current only when it finishes,
so a failed or killed run leaves the previous one current."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from indexer.errors import InvalidInputError, NotFoundError
from indexer.storage.catalog import Transaction
from indexer.storage.store import Store
from indexer.storage.tables import IdentityRow, MemberRow, RunClusterRow, RunRow, utcnow

REVIEW_STATUSES = ("unreviewed", "confirmed", "dismissed")


@dataclass(frozen=True)
class RunInfo:
    id: int
    status: str
    scope: str
    since: dt.datetime | None
    model_id: str
    params: dict[str, Any]
    n_images: int
    n_clusters: int
    n_noise: int
    summary: dict[str, Any]
    timings: dict[str, float]
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class ClusterInfo:
    id: int
    name: str | None
    label: str | None
    status: str
    size: int
    prev_size: int | None
    change: str
    persistence: float | None
    mean_probability: float
    exemplars: list[int]
    x: float
    y: float
    reviewed_by: str | None = None


@dataclass(frozen=True)
class Member:
    image_id: int
    cluster_id: int | None
    probability: float
    outlier_score: float
    x: float
    y: float
    provisional: bool
    family: int | None = None  # verified copies of one picture inside the cluster share it (clustering.job)


@dataclass
class NewCluster:
    """What the job computed for one cluster of a run, before it is stored."""
    identity: int | None
    label: int
    size: int
    prev_size: int | None
    change: str
    persistence: float | None
    mean_probability: float
    exemplars: list[int]
    x: float
    y: float
    members: list[int] = field(default_factory=list)


def _run(r: RunRow) -> RunInfo:
    return RunInfo(r.id, r.status, r.scope, r.since, r.model_id, json.loads(r.params), r.n_images, r.n_clusters,
                   r.n_noise, json.loads(r.summary), json.loads(r.timings), r.started_at, r.finished_at)


class ClusterStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.catalog.engine

    # -- runs
    def start_run(self, model_id: str, params: dict[str, Any], scope: str, since: dt.datetime | None) -> int:
        with self.engine.begin() as c:
            return int(c.execute(insert(RunRow).values(model_id=model_id, params=json.dumps(params), scope=scope,
                                                       since=since, status="running", started_at=utcnow())
                                 ).inserted_primary_key[0])

    def fail_run(self, run_id: int, error: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(RunRow).where(RunRow.id == run_id).values(status="failed", error=error[:2000],
                                                                       finished_at=utcnow()))

    def current_run(self, scope: str = "full") -> RunInfo | None:
        with self.engine.connect() as c:
            row = c.execute(select(RunRow).where(RunRow.status == "done", RunRow.scope == scope)
                            .order_by(RunRow.id.desc()).limit(1)).first()
        return None if row is None else _run(RunRow(**row._mapping))

    def run(self, run_id: int) -> RunInfo:
        with self.engine.connect() as c:
            row = c.execute(select(RunRow).where(RunRow.id == run_id)).first()
        if row is None:
            raise NotFoundError(f"no clustering run {run_id}")
        return _run(RunRow(**row._mapping))

    def runs(self, limit: int = 20) -> list[RunInfo]:
        with self.engine.connect() as c:
            rows = c.execute(select(RunRow).order_by(RunRow.id.desc()).limit(limit)).all()
        return [_run(RunRow(**r._mapping)) for r in rows]

    def previous_members(self, run_id: int) -> dict[int, int]:
        """image id → cluster id of a run's clustered (non-noise) members."""
        with self.engine.connect() as c:
            rows = c.execute(select(MemberRow.image_id, MemberRow.cluster_id)
                             .where(MemberRow.run_id == run_id, MemberRow.cluster_id.is_not(None))).all()
        return {int(i): int(k) for i, k in rows}

    def finish_run(self, run_id: int, clusters: Sequence[NewCluster], members: Sequence[Member], *,
                   n_noise: int, summary: dict[str, Any], timings: dict[str, float]) -> None:
        """Store a run's clusters and memberships and make it current, all in one transaction.
        ``members[i].cluster_id`` is an index into ``clusters`` (or None for noise)."""
        with self.engine.begin() as c:
            for cl in clusters:
                if cl.identity is None:
                    cl.identity = int(c.execute(insert(IdentityRow).values(first_run_id=run_id, status="unreviewed")
                                                ).inserted_primary_key[0])
            if clusters:
                c.execute(insert(RunClusterRow), [dict(
                    run_id=run_id, cluster_id=cl.identity, label=cl.label, size=cl.size, prev_size=cl.prev_size, change=cl.change,
                    persistence=cl.persistence, mean_probability=cl.mean_probability,
                    exemplars=json.dumps(cl.exemplars), x=cl.x, y=cl.y) for cl in clusters])
            ident = [cl.identity for cl in clusters]
            rows = [dict(run_id=run_id, image_id=m.image_id,
                         cluster_id=None if m.cluster_id is None else ident[m.cluster_id], probability=m.probability,
                         outlier_score=m.outlier_score, x=m.x, y=m.y, provisional=m.provisional,
                         family=m.family) for m in members]
            for i in range(0, len(rows), 20_000):
                c.execute(insert(MemberRow), rows[i:i + 20_000])
            c.execute(update(RunRow).where(RunRow.id == run_id).values(
                status="done", finished_at=utcnow(), n_images=len(members), n_clusters=len(clusters),
                n_noise=n_noise, summary=json.dumps(summary), timings=json.dumps(timings)))

    def label_identities(self, run_id: int) -> dict[int, int]:
        with self.engine.connect() as c:
            return {int(lab): int(cid) for lab, cid in c.execute(
                select(RunClusterRow.label, RunClusterRow.cluster_id).where(RunClusterRow.run_id == run_id)).all()}

    def add_provisional(self, run_id: int, members: Sequence[Member], families: dict[int, int] | None = None) -> None:
        """Newly flagged images placed into a run (``members[i].cluster_id``: a cluster id), and in one
        transaction the families given to members already in it (image id → family: a copy now joins them)."""
        with self.engine.begin() as c:
            ids = [m.image_id for m in members]
            if ids:
                c.execute(delete(MemberRow).where(MemberRow.run_id == run_id, MemberRow.image_id.in_(ids),
                                                  MemberRow.provisional.is_(True)))
                c.execute(insert(MemberRow), [dict(run_id=run_id, image_id=m.image_id, cluster_id=m.cluster_id,
                                                   probability=m.probability, outlier_score=m.outlier_score,
                                                   x=m.x, y=m.y, provisional=True, family=m.family) for m in members])
            for image_id, fam in (families or {}).items():
                c.execute(update(MemberRow).where(MemberRow.run_id == run_id, MemberRow.image_id == image_id)
                          .values(family=fam))

    def placements(self, run_id: int) -> dict[int, tuple[int | None, int | None]]:
        """image id → (cluster id or None for noise, copy family or None) of every member of a run."""
        with self.engine.connect() as c:
            rows = c.execute(select(MemberRow.image_id, MemberRow.cluster_id, MemberRow.family)
                             .where(MemberRow.run_id == run_id)).all()
        return {int(i): (None if k is None else int(k), None if f is None else int(f)) for i, k, f in rows}

    # -- reading a run
    def clusters(self, run_id: int, only: int | None = None) -> list[ClusterInfo]:
        """A run's clusters, largest first (``only``: that one cluster's, read alone)."""
        q = select(RunClusterRow, IdentityRow).join(IdentityRow, IdentityRow.id == RunClusterRow.cluster_id).where(
            RunClusterRow.run_id == run_id)
        counts = select(MemberRow.cluster_id, func.count()).where(MemberRow.run_id == run_id,
                                                                  MemberRow.cluster_id.is_not(None))
        if only is not None:
            q = q.where(RunClusterRow.cluster_id == only)
            counts = counts.where(MemberRow.cluster_id == only)
        with Session(self.engine) as c:
            rows = c.execute(q).all()
            live = dict(c.execute(counts.group_by(MemberRow.cluster_id)).all())
        out = []
        for rc, ident in rows:
            out.append(ClusterInfo(rc.cluster_id, ident.name, ident.label, ident.status,
                                   int(live.get(rc.cluster_id, rc.size)), rc.prev_size, rc.change, rc.persistence,
                                   rc.mean_probability, json.loads(rc.exemplars), rc.x, rc.y, ident.reviewed_by))
        return sorted(out, key=lambda k: -k.size)

    def cluster(self, run_id: int, cluster_id: int) -> ClusterInfo:
        for cl in self.clusters(run_id, only=cluster_id):
            return cl
        raise NotFoundError(f"no cluster {cluster_id} in run {run_id}")

    def family_sizes(self, run_id: int, cluster_id: int) -> dict[int, int]:
        """family → how many of the cluster's members are copies in it (families of two or more)."""
        with self.engine.connect() as c:
            return {int(f): int(k) for f, k in c.execute(
                select(MemberRow.family, func.count()).where(MemberRow.run_id == run_id, MemberRow.cluster_id == cluster_id,
                                                              MemberRow.family.is_not(None))
                .group_by(MemberRow.family)).all()}

    def members(self, run_id: int, cluster_id: int | None, *, offset: int = 0, limit: int | None = None,
                outliers: bool | None = None, outlier_cut: float = 0.8) -> list[Member]:
        q = select(MemberRow).where(MemberRow.run_id == run_id)
        q = q.where(MemberRow.cluster_id.is_(None) if cluster_id is None else MemberRow.cluster_id == cluster_id)
        if outliers is True:
            q = q.where(MemberRow.outlier_score >= outlier_cut)
        elif outliers is False:
            q = q.where(MemberRow.outlier_score < outlier_cut)
        q = q.order_by(MemberRow.probability.desc(), MemberRow.outlier_score, MemberRow.image_id).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [Member(r.image_id, r.cluster_id, r.probability, r.outlier_score, r.x, r.y, r.provisional,
                           r.family) for r in c.execute(q).all()]

    def count_members(self, run_id: int, cluster_id: int | None) -> int:
        q = select(func.count()).select_from(MemberRow).where(MemberRow.run_id == run_id)
        q = q.where(MemberRow.cluster_id.is_(None) if cluster_id is None else MemberRow.cluster_id == cluster_id)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar() or 0)

    def map_points(self, run_id: int) -> tuple[list[int], list[int], list[float], list[float]]:
        """(image ids, cluster ids with -1 for noise, xs, ys) of every member of a run."""
        with self.engine.connect() as c:
            rows = c.execute(select(MemberRow.image_id, MemberRow.cluster_id, MemberRow.x, MemberRow.y)
                             .where(MemberRow.run_id == run_id).order_by(MemberRow.image_id)).all()
        return ([r[0] for r in rows], [-1 if r[1] is None else r[1] for r in rows],
                [r[2] for r in rows], [r[3] for r in rows])

    def lookup(self, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Current-run cluster facts for images (for search hits)."""
        if not image_ids:
            return {}
        run = self.store.catalog.unless_changed("clusters.current_run", self.current_run)
        if run is None:
            return {}
        with self.engine.connect() as c:
            rows = c.execute(select(MemberRow.image_id, MemberRow.cluster_id, MemberRow.probability,
                                    MemberRow.provisional, IdentityRow.name, IdentityRow.label, IdentityRow.status,
                                    MemberRow.family)
                             .join(IdentityRow, IdentityRow.id == MemberRow.cluster_id, isouter=True)
                             .where(MemberRow.run_id == run.id, MemberRow.image_id.in_(list(image_ids)))).all()
            fams = sorted({int(r[7]) for r in rows if r[7] is not None and r[1] is not None})
            sizes = {(int(k), int(f)): int(n) for k, f, n in c.execute(
                select(MemberRow.cluster_id, MemberRow.family, func.count())
                .where(MemberRow.run_id == run.id, MemberRow.family.in_(fams))
                .group_by(MemberRow.cluster_id, MemberRow.family)).all()} if fams else {}
        out: dict[int, dict[str, Any]] = {}
        for r in rows:
            fam = int(r[7]) if r[7] is not None and r[1] is not None else None
            out[int(r[0])] = {"id": r[1], "run_id": run.id, "probability": round(float(r[2]), 4),
                              "provisional": bool(r[3]), "name": r[4], "label": r[5],
                              "status": r[6] if r[1] is not None else "unclustered",
                              "family": fam, "family_size": sizes.get((int(r[1]), fam)) if fam is not None else None}
        return out

    # -- people's decisions about a cluster
    def update_identity(self, cluster_id: int, *, actor: str, name: str | None = None, label: str | None = None,
                        status: str | None = None, tx: Transaction | None = None) -> None:
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name.strip()[:200] or None
        if label is not None:
            values["label"] = label.strip()[:200] or None
        if status is not None:
            if status not in REVIEW_STATUSES:
                raise InvalidInputError(f"status must be one of {', '.join(REVIEW_STATUSES)}", code="bad_parameter")
            values.update(status=status, reviewed_by=actor, reviewed_at=utcnow())
        with self.store.catalog.transaction(tx) as c:
            if c.execute(select(IdentityRow.id).where(IdentityRow.id == cluster_id)).first() is None:
                raise NotFoundError(f"no cluster {cluster_id}")
            if values:
                c.execute(update(IdentityRow).where(IdentityRow.id == cluster_id).values(**values))
