"""The JSON API, a Flask blueprint under /api/v1. Every error is ``{"error": {"code", "message"}}``
with a 4xx (a bad request is never a 500)."""
from __future__ import annotations

import datetime as dt
import functools
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, session
from werkzeug.exceptions import HTTPException

from indexer.review.clusters import Decision, decide_cluster, undo_decision
from indexer.review.actions import MAX_LABEL, MAX_REASON, delete_images, set_flags
from indexer.storage.audit import parse_query, to_csv as audit_csv, to_json as audit_json
from indexer.storage.catalog import ImageRecord
from indexer.errors import (ClusteringError, DecodeError, FlagmatchError, InvalidInputError, ModelLoadError,
                            ModelMismatchError, NotFoundError, OverloadedError)
from search import thumbnails
from search.auth import csrf_ok, session_actor
from search.openapi import openapi_document
from indexer.media.hashes import Signals
from indexer.review.heads import scores_for
from search.hashmatch import HashEvidence
from search.service import Hit, SearchParams, SearchResponse

if TYPE_CHECKING:
    from flagmatch.runtime import Runtime

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@dataclass(frozen=True)
class FlagBody:
    reason: str | None
    label: str | None

    @classmethod
    def parse(cls, data: Any) -> "FlagBody":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidInputError("the body must be a JSON object", code="bad_body")
        out = {}
        for key, limit in (("reason", MAX_REASON), ("label", MAX_LABEL)):
            v = data.get(key)
            if v is not None and (not isinstance(v, str) or len(v) > limit):
                raise InvalidInputError(f"{key} must be a string of at most {limit} characters", code="bad_parameter")
            out[key] = v.strip() if isinstance(v, str) and v.strip() else None
        unknown = set(data) - {"reason", "label"}
        if unknown:
            raise InvalidInputError(f"unknown field(s): {', '.join(sorted(unknown))}", code="bad_parameter")
        return cls(**out)


def runtime() -> Runtime:
    return current_app.extensions["flagmatch"]  # type: ignore[no-any-return]


def error(status: int, code: str, message: str, *, retry_after: int | None = None) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    request_id = g.get("request_id")
    if request_id:
        body["request_id"] = request_id
    resp = jsonify({"error": body})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="flagmatch"'
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def http_status(exc: FlagmatchError) -> int:
    """The one place a domain error becomes an HTTP status (the viewer uses it too)."""
    if exc.code == "unsupported_media_type":
        return 415
    if isinstance(exc, DecodeError):
        return {"too_large": 413, "unsupported_format": 415}.get(exc.code, 400)
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (ModelMismatchError, ClusteringError)):
        return 409
    if isinstance(exc, (ModelLoadError, OverloadedError)) or exc.code == "empty_store":
        return 503
    return 400


@bp.errorhandler(FlagmatchError)
def _domain_error(exc: FlagmatchError) -> Response:
    return error(http_status(exc), exc.code, exc.message,
                 retry_after=exc.retry_after if isinstance(exc, OverloadedError) else None)


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
              429: "rate_limited", 500: "internal", 503: "unavailable"}


def http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors (unknown route, wrong method, body too large, rate limit) as JSON."""
    status = exc.code or 500
    resp = error(status, HTTP_CODES.get(status, "http_error"), exc.description or HTTP_CODES.get(status, "error"))
    if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    if status == 429:
        retry = getattr(exc, "retry_after", None)
        resp.headers["Retry-After"] = str(int(retry) if retry else 1)
    return resp


# ------------------------------------------------------------------ auth

def authorize(write: bool) -> Response | None:
    """Reads may be open (setting open_reads); writes always need a token."""
    rt = runtime()
    token = rt.tokens.from_header(request.headers.get("Authorization"))
    actor = rt.tokens.actor(token) or session_actor()
    if actor is None and request.headers.get("Authorization") is not None:
        return error(401, "unauthorized", "the bearer token is not valid")
    if actor is None and (write or not rt.settings.open_reads):
        return error(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)")
    g.actor = actor or "anonymous"
    return None


def needs(write: bool) -> Callable:
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            denied = authorize(write)
            if denied is not None:
                return denied
            if write and rt_csrf_required():
                return error(403, "csrf", "missing or wrong CSRF token")
            return fn(*a, **kw)
        return wrapper
    return deco


def rt_csrf_required() -> bool:
    """Requests authenticated by the viewer's session cookie must carry its CSRF token."""
    rt = runtime()
    if rt.tokens.from_header(request.headers.get("Authorization")):
        return False
    return session_actor() is not None and not csrf_ok(request.headers.get("X-CSRF-Token"))


def need_ready() -> Response | None:
    if not runtime().ready.is_set():
        return error(503, "not_ready", "the model and index are still loading", retry_after=5)
    return None


# ------------------------------------------------------------------ serialisation

def _time(t: dt.datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=dt.timezone.utc).isoformat(timespec="seconds")


def image_json(r: ImageRecord, *, history: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "sha256": r.sha256, "format": r.format, "width": r.width, "height": r.height,
        "frames": r.frames, "size_bytes": r.size_bytes, "p_unsafe": round(r.p_unsafe, 6), "flagged": r.flagged,
        "flag": {"source": r.flag_source, "label": r.flag_label, "at": _time(r.flagged_at)} if r.flagged else None,
        "thumbnail_url": f"/api/v1/images/{r.id}/thumbnail",
        "paths": list(r.paths), "external_ids": list(r.external_ids), "created_at": _time(r.created_at),
    }
    if history:
        out["history"] = [{"action": e.action, "source": e.source, "label": e.label, "actor": e.actor,
                           "reason": e.reason, "at": _time(e.at)} for e in r.history]
    return out


def hit_json(h: Hit) -> dict[str, Any]:
    d = image_json(h.record)
    d["similarity"] = round(h.similarity, 6)
    d["view"] = h.view
    d["local_matches"] = h.local_matches
    d["verified"] = h.verified
    d["cluster"] = h.cluster
    d["p_labels"] = h.p_labels
    return d


def signals_json(sig: Signals | None) -> dict[str, Any]:
    pdq = sig.pdq if sig is not None else None
    return {"md5": (sig.md5 or None) if sig is not None else None, "pdq": pdq.hash if pdq else None,
            "pdq_quality": pdq.quality if pdq else None, "pdq_usable": bool(pdq and pdq.usable)}


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
                               "p_labels": r.query.p_labels},
                     "hits": [hit_json(h) for h in r.hits],
                     "hashes": evidence_json(r.evidence)} for r in resp.results],
    }


# ------------------------------------------------------------------ routes

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_INT = re.compile(r"[+-]?\d{1,19}")
_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _params(source: dict[str, Any]) -> SearchParams:
    """Search parameters from JSON (typed values) or a form/query string (text), strictly: 5.5 is not a k."""
    def num(name: str, kind: type, default: Any) -> Any:
        v = source.get(name, default)
        if isinstance(v, str):
            if not (_INT if kind is int else _FLOAT).fullmatch(v.strip()):
                raise InvalidInputError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {v!r}",
                                        code="bad_parameter")
            return kind(v.strip())
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise InvalidInputError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {v!r}",
                                    code="bad_parameter")
        return kind(v)
    scope = source.get("scope", "flagged")
    if not isinstance(scope, str):
        raise InvalidInputError("scope must be a string", code="bad_parameter")
    return SearchParams(k=num("k", int, 10), scope=scope, min_similarity=num("min_similarity", float, -1.0))


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**63


def _stored_ids(body: dict[str, Any]) -> list[int]:
    """The stored images a JSON search names: every field given is checked, whichever is used."""
    if not any(k in body for k in ("id", "ids", "sha256")):
        raise InvalidInputError("give 'id', 'ids' or 'sha256' (or upload an image as multipart)",
                                code="missing_query")
    if "id" in body and not _is_id(body["id"]):
        raise InvalidInputError("id must be a positive 64-bit integer", code="bad_parameter")
    if "ids" in body:
        raw = body["ids"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= 100 or not all(_is_id(i) for i in raw):
            raise InvalidInputError("ids must be a list of 1–100 positive 64-bit integers", code="bad_parameter")
    sha = body.get("sha256")
    if "sha256" in body and (not isinstance(sha, str) or not _SHA256.fullmatch(sha)):
        raise InvalidInputError("sha256 must be 64 hex characters", code="bad_parameter")
    ids: list[int] = list(body.get("ids", [])) + ([body["id"]] if "id" in body else [])
    if isinstance(sha, str):
        found = runtime().store.catalog.known_sha(sha.lower())
        if found is None:
            raise NotFoundError(f"no image with sha256 {sha}")
        ids.append(found)
    return list(dict.fromkeys(ids))


@bp.post("/search")
@needs(write=False)
def search() -> Response:
    """Nearest flagged (or all) images for uploads, or for stored images by id / sha256."""
    if (denied := need_ready()) is not None:
        return denied
    svc = runtime().service
    if request.mimetype == "multipart/form-data":
        files = request.files.getlist("image")
        if not files:
            raise InvalidInputError("send the image as the multipart field 'image'", code="missing_image")
        params = _params({**request.args.to_dict(), **request.form.to_dict()})
        uploads = [(f.filename or "upload", f.read()) for f in files]
        resp = svc.search_uploads(uploads, params)
    elif request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InvalidInputError("the body must be a JSON object", code="bad_body")
        params = _params({**request.args.to_dict(), **body})
        ids = _stored_ids(body)
        resp = svc.search_ids(ids, params)
    else:
        return error(415, "unsupported_media_type", "send multipart/form-data (field 'image') or JSON")
    t0 = time.perf_counter()
    out = jsonify(response_json(resp))
    resp.timings.hydrate += (time.perf_counter() - t0) * 1000
    out.headers["Server-Timing"] = resp.timings.header()
    return out


@bp.get("/images/<int:image_id>")
@needs(write=False)
def image(image_id: int) -> Response:
    rec = runtime().store.catalog.get(image_id)
    d = image_json(rec, history=True)
    d["cluster"] = runtime().clusters.lookup([image_id]).get(image_id)
    d["hashes"] = signals_json(runtime().store.catalog.signals([image_id]).get(image_id))
    d["p_labels"] = scores_for(runtime().store, [image_id]).get(image_id, {})
    return jsonify(d)


@bp.get("/images/<int:image_id>/thumbnail")
@needs(write=False)
def thumbnail(image_id: int) -> Response:
    """The stored WebP for API clients; for the viewer's moderator, blurred unless blur is off for the
    session or ``clear=1`` follows a reveal they made in the last 30 minutes (audited), and greyscale
    when they chose it."""
    rt = runtime()
    rec = rt.store.catalog.get(image_id)
    path = rt.store.thumb_path(rec.thumb_key)
    if not rec.thumb_key or not path.is_file():
        raise NotFoundError(f"image {image_id} has no thumbnail")
    blur = grey = False
    moderator = session_actor()
    if moderator is not None and not rt.tokens.from_header(request.headers.get("Authorization")):
        blur = bool(session.get("blur", True))
        grey = bool(session.get("grey", False))
        if blur and request.args.get("clear") == "1" and rt.audit.revealed_recently(moderator, f"image:{image_id}"):
            blur = False
    strength = str(session.get("blur_strength", rt.settings.blur_strength))
    resp = Response(thumbnails.render(path, blur=blur, grey=grey, strength=strength), mimetype="image/webp")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _json_body() -> dict[str, Any]:
    """The optional JSON object body of a write (absent: {})."""
    if not request.data:
        return {}
    if not request.is_json:
        raise _UnsupportedBody("the body, when there is one, must be application/json")
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InvalidInputError("the body must be a JSON object", code="bad_body")
    return data


class _UnsupportedBody(InvalidInputError):
    code = "unsupported_media_type"


def _flag(image_id: int, flag: bool) -> Response:
    rt = runtime()
    body = FlagBody.parse(_json_body())
    changed = set_flags(rt.store, rt.index, rt.audit, [image_id], flag=flag, actor=g.actor, source="review",
                        via="api", reason=body.reason, label=body.label,
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
    body = _json_body()
    unknown = set(body) - {"reason"}
    if unknown:
        raise InvalidInputError(f"unknown field(s): {', '.join(sorted(unknown))}", code="bad_parameter")
    delete_images(rt.store, rt.index, rt.audit, [image_id], actor=g.actor, reason=body.get("reason"))
    return jsonify({"deleted": [image_id]})


@bp.post("/sweep")
@needs(write=False)
def sweep() -> Response:
    """Unflagged images anywhere in the corpus near the given flagged images."""
    if (denied := need_ready()) is not None:
        return denied
    if not request.is_json:
        return error(415, "unsupported_media_type", "send a JSON object")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInputError("the body must be a JSON object", code="bad_body")
    unknown = set(body) - {"ids", "min_similarity", "per_seed", "limit"}
    if unknown:
        raise InvalidInputError(f"unknown field(s): {', '.join(sorted(unknown))}", code="bad_parameter")
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or not all(_is_id(i) for i in ids):
        raise InvalidInputError("ids must be a non-empty list of positive 64-bit integers", code="bad_parameter")
    if "min_similarity" in body:
        threshold = body["min_similarity"]
    else:  # as alike to the seeds as they are to each other
        threshold = runtime().service.suggest_sweep_threshold(ids)
    num = _params({"k": body.get("per_seed", 30), "min_similarity": threshold})
    limit = body.get("limit", 200)
    if not _is_id(limit):
        raise InvalidInputError("limit must be a positive integer", code="bad_parameter")
    hits = runtime().service.sweep(ids, min_similarity=num.min_similarity, per_seed=num.k, limit=limit)
    runtime().audit.record(g.actor, "sweep", "images", seeds=ids, min_similarity=num.min_similarity, found=len(hits))
    return jsonify({"seeds": ids, "min_similarity": num.min_similarity,
                    "hits": [{**image_json(h.record), "similarity": round(h.similarity, 6), "seed": h.seed}
                             for h in hits]})


@bp.get("/stats")
@needs(write=False)
def stats() -> Response:
    rt = runtime()
    st = rt.store.catalog.stats()
    st["index"] = rt.index.stats() if rt.index is not None else None
    st["model"] = None if rt.embedder is None else {
        "model_id": rt.embedder.info.model_id, "backend": rt.embedder.info.backend,
        "precision": rt.embedder.info.precision}
    return jsonify(st)


@bp.post("/clusters/<int:cluster_id>/decision")
@needs(write=True)
def cluster_decision(cluster_id: int) -> Response:
    """JSON ``status`` (confirmed | dismissed), ``reason_code``, optional ``name``, ``label``, ``note``."""
    body = _json_body()
    unknown = set(body) - {"status", "reason_code", "name", "label", "note"}
    if unknown:
        raise InvalidInputError(f"unknown field(s): {', '.join(sorted(unknown))}", code="bad_parameter")
    for key in ("status", "reason_code", "name", "label", "note"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InvalidInputError(f"{key} must be a string", code="bad_parameter")
    rt = runtime()
    result = decide_cluster(rt.store, rt.index, rt.audit, rt.clusters, cluster_id, Decision(
        status=body.get("status") or "", reason_code=body.get("reason_code") or "", name=body.get("name"),
        label=body.get("label") or None, note=body.get("note")), actor=g.actor,
        labels=rt.settings.review_labels, reasons=rt.settings.review_reasons)
    c = result.cluster
    return jsonify({"cluster": {"id": c.id, "name": c.name, "label": c.label, "status": c.status, "size": c.size,
                                "reviewed_by": c.reviewed_by},
                    "unflagged": result.unflagged, "next_unreviewed": result.next_unreviewed})


@bp.post("/clusters/<int:cluster_id>/undo")
@needs(write=True)
def cluster_undo(cluster_id: int) -> Response:
    rt = runtime()
    c = undo_decision(rt.store, rt.index, rt.audit, rt.clusters, cluster_id, actor=g.actor)
    return jsonify({"cluster": {"id": c.id, "name": c.name, "label": c.label, "status": c.status, "size": c.size,
                                "reviewed_by": c.reviewed_by}})


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


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


def register_health(app: Flask) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        rt: Runtime = app.extensions["flagmatch"]
        if rt.ready.is_set() and rt.index is not None:
            # which index generation (and matching space) this replica answers from: after a reindex
            # every replica moves to the published generation within the index refresh interval
            rt.index.maybe_refresh()
            gens = rt.index.generations()
            return jsonify({"status": "ready", "generation": gens["scopes"], "space": gens["space"]})
        if rt.ready.is_set():
            return jsonify({"status": "ready"})
        resp = jsonify({"status": "loading" if rt.load_error is None else "failed", "error": rt.load_error})
        resp.status_code = 503
        return resp
