"""The JSON shapes of records and search answers, one function each, shared by the JSON API, the viewer's
JSON routes and the CLI's ``--json``."""
from __future__ import annotations

import datetime as dt
from typing import Any

from indexer.media.hashes import Signals
from indexer.storage.catalog import ImageRecord
from indexer.storage.clusters import ClusterInfo
from search.hashmatch import HashEvidence
from search.service import Hit, SearchResponse


def _time(t: dt.datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=dt.timezone.utc).isoformat(timespec="seconds")


def image_json(r: ImageRecord, *, history: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "sha256": r.sha256, "format": r.format, "width": r.width, "height": r.height,
        "frames": r.frames, "size_bytes": r.size_bytes, "p_unsafe": round(r.p_unsafe, 6), "flagged": r.flagged,
        "flag": {"source": r.flag_source, "label": r.flag_label, "at": _time(r.flagged_at)} if r.flagged else None,
        "thumbnail_url": f"/api/v1/images/{r.id}/thumbnail",
        "paths": list(r.paths), "external_ids": list(r.external_ids), "created_at": _time(r.created_at),
        "kind": r.kind, "duration_s": r.duration_s,
    }
    if history:
        out["history"] = [{"action": e.action, "source": e.source, "label": e.label, "actor": e.actor,
                           "reason": e.reason, "at": _time(e.at)} for e in r.history]
    return out


def hit_json(h: Hit) -> dict[str, Any]:
    d = image_json(h.record)
    d["similarity"] = round(h.similarity, 6)
    d["view"] = h.view
    d["view_box"] = list(h.box) if h.box is not None else None
    # the stored picture's window the match came through (indexer.vectors.regions), in its pixels as displayed
    d["stored_box"] = ([round(h.region[0] * h.record.width), round(h.region[1] * h.record.height),
                        round(h.region[2] * h.record.width), round(h.region[3] * h.record.height)]
                       if h.region is not None else None)
    d["local_matches"] = h.local_matches
    d["verified"] = h.verified
    d["verified_by"] = "hash" if h.hash_match else "local_features" if h.verified else None
    d["cluster"] = h.cluster
    d["p_labels"] = h.p_labels
    d["matched_frames"] = [{"query_view": f.query_view, "query_offset_s": f.query_offset, "offset_s": f.offset,
                    "similarity": round(f.similarity, 6)} for f in h.frames]
    return d


def signals_json(sig: Signals | None) -> dict[str, Any]:
    pdq = sig.pdq if sig is not None else None
    return {"md5": (sig.md5 or None) if sig is not None else None, "pdq": pdq.hash if pdq else None,
            "pdq_quality": pdq.quality if pdq else None, "pdq_usable": bool(pdq and pdq.usable),
            "vpdq": sig.vpdq if sig is not None else None}


def evidence_json(ev: HashEvidence | None) -> dict[str, Any] | None:
    """The hash evidence of one query: its own hashes, the banks it matched (or the negative bank that
    suppressed them) and the stored images sharing its hash."""
    if ev is None:
        return None
    return {**signals_json(ev.signals), "bank_matched": ev.matched,
            "bank_matches": [m.to_json() for m in ev.bank_matches],
            "negative_matches": [m.to_json() for m in ev.negative_matches],
            "image_matches": [{**image_json(m.record), "signal_type": m.signal_type, "distance": m.distance}
                              for m in ev.image_matches]}


def response_json(resp: SearchResponse) -> dict[str, Any]:
    return {
        "model_id": resp.model_id, "scope": resp.scope, "index_checkpoint": resp.checkpoint,
        "results": [{"query": {"name": r.query.label, "sha256": r.query.sha256,
                               "p_unsafe": None if r.query.p_unsafe is None else round(r.query.p_unsafe, 6),
                               "known": r.query.known_id is not None, "known_id": r.query.known_id,
                               "p_labels": r.query.p_labels, "kind": r.query.kind,
                               "keyframes": r.query.keyframes},
                     "hits": [hit_json(h) for h in r.hits],
                     "hashes": evidence_json(r.evidence)} for r in resp.results],
    }


def cluster_json(c: ClusterInfo) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "label": c.label, "status": c.status, "size": c.size,
            "reviewed_by": c.reviewed_by}
