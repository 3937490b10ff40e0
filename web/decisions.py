"""The JSON API's decisions under /api/v1, each a thin wrapper over its ``indexer.review`` function: flag,
unflag and delete an image, decide on a cluster and undo it, and read the audit log they write. Bodies are
checked against their declarations (``search.schemas``); errors and auth are the edge's."""
from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from indexer.errors import InvalidInputError
from indexer.review.actions import delete_images, set_flags
from indexer.review.clusters import Decision, decide_cluster, undo_decision
from indexer.storage.audit import parse_query, to_csv as audit_csv, to_json as audit_json
from search.edge import json_body, needs, parse, register_errors, runtime
from search.schemas import ClusterDecisionBody, DeleteBody, FlagBody
from search.serialize import cluster_json, image_json

bp = Blueprint("decisions", __name__, url_prefix="/api/v1")
register_errors(bp)


def _flag(image_id: int, flag: bool) -> Response:
    rt = runtime()
    body = parse(FlagBody, json_body())
    changed = set_flags(rt.store, rt.index, rt.audit, [image_id], flag=flag, actor=g.actor, source="review",
                        via="api", reason=(body.reason or "").strip() or None, label=(body.label or "").strip() or None,
                        queue_similarity=rt.settings.queue_similarity)
    return jsonify({"changed": bool(changed), "image": image_json(rt.store.catalog.get(image_id), history=True)})


@bp.post("/images/<int:image_id>/flag")
@needs(write=True)
def flag(image_id: int) -> Response:
    """Flag an image (JSON body: reason, label); recorded in its flag history."""
    return _flag(image_id, True)


@bp.post("/images/<int:image_id>/unflag")
@needs(write=True)
def unflag(image_id: int) -> Response:
    """Unflag an image (JSON body: reason); recorded in its flag history."""
    return _flag(image_id, False)


@bp.delete("/images/<int:image_id>")
@needs(write=True)
def delete_image(image_id: int) -> Response:
    """Delete an image: its thumbnail, raw vector and index entries go; its sha256 and the audit trail stay."""
    rt = runtime()
    body = parse(DeleteBody, json_body())
    delete_images(rt.store, rt.index, rt.audit, [image_id], actor=g.actor, reason=body.reason)
    return jsonify({"deleted": [image_id]})


@bp.post("/clusters/<int:cluster_id>/decision")
@needs(write=True)
def cluster_decision(cluster_id: int) -> Response:
    """JSON ``status`` (confirmed | dismissed), ``reason_code``, optional ``name``, ``label``, ``note``."""
    body = parse(ClusterDecisionBody, json_body())
    rt = runtime()
    result = decide_cluster(rt.store, rt.index, rt.audit, rt.clusters, cluster_id, Decision(
        status=body.status, reason_code=body.reason_code, name=body.name, label=body.label or None, note=body.note),
        actor=g.actor, labels=rt.settings.review_labels, reasons=rt.settings.review_reasons)
    return jsonify({"cluster": cluster_json(result.cluster), "unflagged": result.unflagged,
                    "next_unreviewed": result.next_unreviewed})


@bp.post("/clusters/<int:cluster_id>/undo")
@needs(write=True)
def cluster_undo(cluster_id: int) -> Response:
    rt = runtime()
    c = undo_decision(rt.store, rt.index, rt.audit, rt.clusters, cluster_id, actor=g.actor)
    return jsonify({"cluster": cluster_json(c)})


@bp.get("/audit")
@needs(write=False)
def audit() -> Response:
    """The audit log, newest first, filtered and paged (``next_before_id``); ``format=csv`` exports it."""
    q, limit = parse_query(request.args)
    events = runtime().audit.events(limit, query=q)
    if request.args.get("format") == "csv":
        resp = Response(audit_csv(events), mimetype="text/csv")
        resp.headers["Content-Disposition"] = "attachment; filename=flagmatch-audit.csv"
        return resp
    if request.args.get("format") not in (None, "json"):
        raise InvalidInputError("format must be json or csv", code="bad_parameter")
    return jsonify({"events": [audit_json(e) for e in events],
                    "next_before_id": events[-1].id if len(events) == limit else None})
