"""The JSON search API under /api/v1: search by upload or by stored image, sweeps, an image's facts and
thumbnail, the store's figures and the OpenAPI document. Decisions (flag, delete, cluster review) and the
audit log are ``web.decisions``; errors, auth and bodies are the edge's (``search.edge``)."""
from __future__ import annotations

import re
import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, session

from indexer.errors import InvalidInputError, NotFoundError
from indexer.review.heads import scores_for
from search import thumbnails
from search.auth import session_actor
from search.edge import error, need_ready, needs, parse, register_errors, runtime
from search.openapi import openapi_document
from search.schemas import SearchByStored, SweepBody
from search.serialize import image_json, response_json, signals_json
from search.service import SearchParams

bp = Blueprint("api", __name__, url_prefix="/api/v1")
register_errors(bp)


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


def _stored_ids(q: SearchByStored) -> list[int]:
    """The stored images a JSON search names (the declaration has checked every field given)."""
    ids: list[int] = list(q.ids or []) + ([q.id] if q.id is not None else [])
    if q.sha256 is not None:
        found = runtime().store.catalog.known_sha(q.sha256.lower())
        if found is None:
            raise NotFoundError(f"no image with sha256 {q.sha256}")
        ids.append(found)
    return list(dict.fromkeys(ids))


@bp.post("/search")
@needs(write=False)
def search() -> Response:
    """Nearest flagged (or all) images for uploads, or for stored images by id / sha256."""
    started = time.perf_counter()
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
        q = parse(SearchByStored, request.get_json(silent=True))
        resp = svc.search_ids(_stored_ids(q), SearchParams(k=q.k, scope=q.scope, min_similarity=q.min_similarity))
    else:
        return error(415, "unsupported_media_type", "send multipart/form-data (field 'image') or JSON")
    t0 = time.perf_counter()
    out = jsonify(response_json(resp))
    resp.timings.hydrate += (time.perf_counter() - t0) * 1000
    # the stages, and the whole handler (what is not a stage: parsing, auth, readiness, the response)
    out.headers["Server-Timing"] = f"{resp.timings.header()}, handler;dur={(time.perf_counter() - started) * 1000:.2f}"
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
    rec = runtime().store.catalog.get(image_id)
    return _thumbnail_response(rec.thumb_key, f"image:{image_id}", f"image {image_id}")


def _thumbnail_response(key: str, target: str, what: str) -> Response:
    """A stored thumbnail, blurred and greyed for a signed-in moderator as their session says, unless ``clear=1``
    follows their own reveal of ``target`` in the last 30 minutes."""
    rt = runtime()
    path = rt.store.thumb_path(key)
    if not key or not path.is_file():
        raise NotFoundError(f"{what} has no thumbnail")
    blur = grey = False
    moderator = session_actor()
    if moderator is not None and not rt.tokens.from_header(request.headers.get("Authorization")):
        blur = bool(session.get("blur", True))
        grey = bool(session.get("grey", False))
        if blur and request.args.get("clear") == "1" and rt.audit.revealed_recently(moderator, target):
            blur = False
    strength = str(session.get("blur_strength", rt.settings.blur_strength))
    resp = Response(thumbnails.render(path, blur=blur, grey=grey, strength=strength), mimetype="image/webp")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/images/<int:image_id>/keyframes")
@needs(write=False)
def keyframes(image_id: int) -> Response:
    """A video's keyframes, in clip order: offset, scene cut, P(unsafe), thumbnail (an image has none)."""
    rt = runtime()
    rt.store.catalog.get(image_id)
    frames = rt.store.catalog.keyframes([image_id]).get(image_id, [])
    return jsonify({"image_id": image_id, "keyframes": [
        {"id": f.id, "offset_s": f.offset_s, "scene_cut": f.scene_cut, "p_unsafe": round(f.p_unsafe, 6),
         "thumbnail_url": f"/api/v1/images/{image_id}/keyframes/{f.id}/thumbnail"} for f in frames]})


@bp.get("/images/<int:image_id>/keyframes/<int:keyframe_id>/thumbnail")
@needs(write=False)
def keyframe_thumbnail(image_id: int, keyframe_id: int) -> Response:
    """A video keyframe's WebP, blurred for a moderator exactly as image thumbnails are (``thumbnail``); its
    reveal is its own (audit target ``keyframe:<id>``)."""
    frame = runtime().store.catalog.keyframe(image_id, keyframe_id)
    return _thumbnail_response(frame.thumb_key, f"keyframe:{keyframe_id}", f"keyframe {keyframe_id}")


@bp.post("/sweep")
@needs(write=False)
def sweep() -> Response:
    """Unflagged images anywhere in the corpus near the given flagged images."""
    if (denied := need_ready()) is not None:
        return denied
    if not request.is_json:
        return error(415, "unsupported_media_type", "send a JSON object")
    body = parse(SweepBody, request.get_json(silent=True))
    ids = list(body.ids)
    # without a threshold, as alike to the seeds as they are to each other
    threshold = body.min_similarity if body.min_similarity is not None else \
        runtime().service.suggest_sweep_threshold(ids)
    hits = runtime().service.sweep(ids, min_similarity=threshold, per_seed=body.per_seed, limit=body.limit)
    runtime().audit.record(g.actor, "sweep", "images", seeds=ids, min_similarity=threshold, found=len(hits))
    return jsonify({"seeds": ids, "min_similarity": threshold,
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


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
