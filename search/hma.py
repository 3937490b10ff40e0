"""Hasher-Matcher-Actioner's API (Open Media Match, facebook/ThreatExchange) over flagmatch's banks, so
HMA clients work unchanged: hashing (``/h``), matching (``/m``) and bank curation (``/c``), with HMA's
request and response shapes, behind flagmatch's bearer tokens (reads follow ``open_reads``; writes always
need a token). Errors are HMA's ``{"message": …}`` with a 4xx.

Where flagmatch differs, it says so in the message: it never fetches a ``url`` (a server that downloads
what a client names is a way into the network it sits in) — upload the file instead; a bank's
``matching_enabled_ratio`` is 1 or 0 (enabled or not) — a fraction is refused rather than coin-flipped;
a negative bank's match suppresses the query's matches, which HMA has no notion of."""
from __future__ import annotations

import functools
from typing import Any, Callable

from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from indexer.hashbanks.banks import Bank, NewEntry
from indexer.errors import FlagmatchError, InvalidInputError, NotFoundError
from indexer.media.hashes import (PDQ_MIN_QUALITY, SIGNAL_ALIASES, SIGNAL_TYPES, Pdq, Signals, canonical_type, md5_of,
                            validate_signal)
from indexer.review.banks import add_entries, create_bank, delete_bank, remove_entry, update_bank
from search.edge import authorize, http_status, need_ready, runtime
from search.hashmatch import HashEvidence

CONTENT_TYPES = ("photo",)  # the multipart field name HMA clients upload a file under


def _message(status: int, message: str) -> Response:
    resp = jsonify({"message": message})
    resp.status_code = status
    return resp


def _guarded(write: bool) -> Callable:
    """Tokens as for /api/v1; every flagmatch error becomes HMA's ``{"message"}`` with the same status."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            denied = authorize(write) or need_ready()
            if denied is not None:
                return _message(denied.status_code, denied.get_json()["error"]["message"])
            try:
                return fn(*a, **kw)
            except FlagmatchError as exc:
                return _message(http_status(exc), exc.message)
        return wrapper
    return deco


def hma_http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors under /h, /m and /c (an unknown route, a wrong method, a body too large) as HMA's
    ``{"message"}``."""
    return _message(exc.code or 500, exc.description or "error")


# ------------------------------------------------------------------ hashing

hashing = Blueprint("hma_hashing", __name__, url_prefix="/h")


def _signal_types() -> list[str]:
    arg = request.args.get("types")
    if arg is None:
        return ["pdq"]  # what HMA's photo content type hashes by default
    out = []
    for name in (n.strip() for n in arg.split(",")):
        if name:
            out.append(canonical_type(name))
    if not out:
        raise InvalidInputError("empty signal type selection")
    return out


def _upload() -> tuple[bytes, Signals]:
    """The one uploaded file, under a content-type field name (HMA: ``photo``), and its signals."""
    if not request.files:
        raise InvalidInputError("Missing multipart/form-data file upload")
    if len(request.files) > 1 or any(len(request.files.getlist(k)) > 1 for k in request.files):
        raise InvalidInputError("Only one file allowed per request")
    field = next(iter(request.files))
    if field not in CONTENT_TYPES:
        raise InvalidInputError(f"no such content_type: '{field}' (flagmatch hashes {', '.join(CONTENT_TYPES)})")
    data = request.files[field].read()
    if not data:
        raise InvalidInputError("the file is empty")
    svc = runtime().service
    pdq = svc.hash_image(data)
    return data, Signals(md5_of(data), pdq)


def _hashes(sig: Signals, types: list[str]) -> dict[str, str]:
    """HMA's hash response: a low-quality PDQ is the empty string, as threatexchange's hasher returns it."""
    out: dict[str, str] = {}
    for st in types:
        if st == "pdq":
            out["pdq"] = sig.pdq.hash if sig.pdq is not None and sig.pdq.quality >= PDQ_MIN_QUALITY else ""
        else:
            out["md5"] = sig.md5
    return out


@hashing.get("/hash")
@_guarded(write=False)
def hash_get() -> Response:
    if request.args.get("url") is None:
        raise InvalidInputError("url is required")
    raise InvalidInputError("flagmatch does not fetch URLs (a server that downloads what a client names can be "
                            "turned against its own network): POST the file as multipart field 'photo'")


@hashing.post("/hash")
@_guarded(write=False)
def hash_post() -> Response:
    types = _signal_types()
    _, sig = _upload()
    return jsonify(_hashes(sig, types))


# ------------------------------------------------------------------ matching

matching = Blueprint("hma_matching", __name__, url_prefix="/m")


def _lookup(sig: Signals) -> HashEvidence:
    return runtime().service.hash_evidence([sig])[0]


def _signal_param() -> Signals:
    signal, st = request.args.get("signal"), request.args.get("signal_type")
    if not signal or not st:
        raise InvalidInputError(f"{'signal' if not signal else 'signal_type'} is required")
    st = canonical_type(st)
    value = validate_signal(st, signal)
    return Signals(value, None) if st == "md5" else Signals("", Pdq(value, 100))


def _only(*known: str) -> None:
    """A parameter flagmatch does not take is refused by name, never ignored (a client limiting what it acts
    on must not get more than it asked for)."""
    unknown = sorted(set(request.args) - set(known))
    if unknown:
        raise InvalidInputError(f"unsupported parameter(s): {', '.join(unknown)}")


def _wanted_banks() -> set[str] | None:
    """The ``banks`` filter (comma-separated names), or None for every bank."""
    raw = request.args.get("banks")
    if raw is None:
        return None
    names = {b.strip() for b in raw.split(",") if b.strip()}
    if not names:
        raise InvalidInputError("banks must name at least one bank")
    return names


def _matches(ev: HashEvidence, wanted: set[str] | None) -> list[Any]:
    """The bank entries a lookup reports: none when a negative bank suppressed them, only ``wanted`` banks'."""
    return [m for m in ev.bank_matches if wanted is None or m.bank in wanted] if ev.matched else []


def _banks_of(ev: HashEvidence, wanted: set[str] | None = None) -> list[str]:
    return sorted({m.bank for m in _matches(ev, wanted)})


@matching.get("/raw_lookup")
@_guarded(write=False)
def raw_lookup() -> Response:
    _only("signal", "signal_type", "include_distance", "banks")
    ev = _lookup(_signal_param())
    matches = _matches(ev, _wanted_banks())
    if request.args.get("include_distance", "false").lower() in ("1", "true", "yes", "on"):
        return jsonify({"matches": [{"content_id": m.entry_id, "distance": str(m.distance)} for m in matches]})
    return jsonify({"matches": [m.entry_id for m in matches]})


@matching.get("/lookup")
@_guarded(write=False)
def lookup_get() -> Response:
    if request.args.get("url"):
        raise InvalidInputError("flagmatch does not fetch URLs: POST the file as multipart field 'photo'")
    _only("signal", "signal_type", "banks")
    return jsonify(_banks_of(_lookup(_signal_param()), _wanted_banks()))


@matching.post("/lookup")
@_guarded(write=False)
def lookup_post() -> Response:
    _only("banks")
    wanted = _wanted_banks()
    _, sig = _upload()
    matches = _matches(_lookup(sig), wanted)
    ev_pdq = sorted({m.bank for m in matches if m.signal_type == "pdq"})
    out: dict[str, list[str]] = {"pdq": ev_pdq}
    md5 = sorted({m.bank for m in matches if m.signal_type == "md5"})
    if md5:
        out["md5"] = md5
    return jsonify(out)


@matching.get("/index/status")
@_guarded(write=False)
def index_status() -> Response:
    hm = runtime().service.hashes
    assert hm is not None
    idx = hm.bank_index
    idx.refresh()
    cp = runtime().store.catalog.checkpoint(idx.scope)
    st = request.args.get("signal_type")
    status = {"pdq": {"present": True, "built_to": idx.covered, "size": idx.ntotal,
                      "saved": cp is not None},
              "md5": {"present": True, "built_to": hm.banks.head(), "size": hm.banks.count("md5")}}
    if st is not None:
        st = canonical_type(st)
        return jsonify({st: status[st]})
    return jsonify(status)


# ------------------------------------------------------------------ curation

curation = Blueprint("hma_curation", __name__, url_prefix="/c")


def _bank_json(b: Bank) -> dict[str, Any]:
    """HMA's BankConfig, and flagmatch's own fields beside it."""
    return {"name": b.name, "matching_enabled_ratio": 1.0 if b.enabled else 0.0, **b.to_json()}


def _json() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInputError("this endpoint expects a json object payload")
    return body


def _enabled(body: dict[str, Any]) -> bool | None:
    if "enabled_ratio" in body:
        r = body["enabled_ratio"]
        try:
            ratio = float(r)
        except (TypeError, ValueError):
            raise InvalidInputError(f"enabled_ratio must be a number, not {r!r}") from None
        if ratio not in (0.0, 1.0):
            raise InvalidInputError("flagmatch banks are enabled (1.0) or not (0.0); a fractional "
                                    "matching_enabled_ratio is not supported")
        return ratio == 1.0
    if "enabled" in body:
        v = body["enabled"]
        return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
    return None


@curation.get("/banks")
@_guarded(write=False)
def banks_index() -> Response:
    return jsonify([_bank_json(b) for b in runtime().service.hashes.banks.list()])  # type: ignore[union-attr]


@curation.post("/banks")
@_guarded(write=True)
def bank_create() -> tuple[Response, int]:
    body = _json()
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError("name is required")
    banks = runtime().service.hashes.banks  # type: ignore[union-attr]
    try:
        b = create_bank(banks, runtime().audit, name, actor=g.actor, enabled=_enabled(body) is not False,
                        source=str(body.get("source", "api")), role=str(body.get("role", "match")),
                        pdq_threshold=body.get("pdq_threshold", 31))
    except InvalidInputError as exc:
        if exc.code == "conflict":
            return _message(403, "Bank already exists"), 403
        raise
    return jsonify(_bank_json(b)), 201


@curation.get("/bank/<bank_name>")
@_guarded(write=False)
def bank_show(bank_name: str) -> Response:
    return jsonify(_bank_json(runtime().service.hashes.banks.get(bank_name)))  # type: ignore[union-attr]


@curation.put("/bank/<bank_name>")
@_guarded(write=True)
def bank_update(bank_name: str) -> Response:
    body = _json()
    banks = runtime().service.hashes.banks  # type: ignore[union-attr]
    b = update_bank(banks, runtime().audit, bank_name, actor=g.actor, enabled=_enabled(body), rename=body.get("name"),
                    role=body.get("role"), pdq_threshold=body.get("pdq_threshold"), source=body.get("source"))
    return jsonify(_bank_json(b))


@curation.delete("/bank/<bank_name>")
@_guarded(write=True)
def bank_delete(bank_name: str) -> Response:
    try:
        delete_bank(runtime().service.hashes.banks, runtime().audit, bank_name, actor=g.actor)  # type: ignore[union-attr]
    except NotFoundError:
        pass  # as OMM: deleting a bank that is not there is done (nothing changed, nothing recorded)
    return jsonify({"message": "Done"})


def _add(bank_name: str, signals: dict[str, str], *, external_id: str | None = None) -> Response:
    if not signals:
        raise InvalidInputError("No signals given")
    banks = runtime().service.hashes.banks  # type: ignore[union-attr]
    banks.get(bank_name)
    entries = []
    for name, value in signals.items():
        if not isinstance(value, str):
            raise InvalidInputError(f"Invalid {name} signal: not a string")
        st = canonical_type(name)
        if st == "pdq" and value == "":
            raise InvalidInputError("the image's PDQ quality is below 50: too featureless to bank")
        entries.append(NewEntry(st, validate_signal(st, value), external_id=external_id))
    add_entries(banks, runtime().audit, bank_name, entries, actor=g.actor)  # a signal already banked keeps its entry
    ids = [i for e in entries if (i := banks.find(bank_name, e.signal_type, e.signal)) is not None]
    return jsonify({"id": ids[0], "signals": {e.signal_type: e.signal for e in entries}})


@curation.post("/bank/<bank_name>/signal")
@_guarded(write=True)
def bank_add_signal(bank_name: str) -> Response:
    body = _json()
    unknown = sorted(k for k in body if k.lower() not in SIGNAL_ALIASES)
    if unknown:
        raise InvalidInputError(f"No such signal type {unknown[0]}")
    return _add(bank_name, body)


@curation.post("/bank/<bank_name>/content")
@_guarded(write=True)
def bank_add_content(bank_name: str) -> Response:
    if request.args.get("url"):
        raise InvalidInputError("flagmatch does not fetch URLs: POST the file as multipart field 'photo'")
    runtime().service.hashes.banks.get(bank_name)  # type: ignore[union-attr]
    _, sig = _upload()
    meta = request.form.get("metadata")
    ext = None
    if meta:
        import json
        try:
            parsed = json.loads(meta)
        except ValueError:
            raise InvalidInputError("metadata should be a json object") from None
        if not isinstance(parsed, dict):
            raise InvalidInputError("metadata should be a json object")
        ext = str(parsed["content_id"])[:200] if parsed.get("content_id") is not None else None
    return _add(bank_name, _hashes(sig, ["pdq"]), external_id=ext)


@curation.delete("/bank/<bank_name>/content/<int:content_id>")
@_guarded(write=True)
def bank_delete_content(bank_name: str, content_id: int) -> Response:
    n = remove_entry(runtime().service.hashes.banks, runtime().audit, bank_name, content_id,  # type: ignore[union-attr]
                     actor=g.actor)
    return jsonify({"deleted": n})


@curation.get("/bank/<bank_name>/content")
@_guarded(write=False)
def bank_content(bank_name: str) -> Response:
    """A bank's entries, paged by id (``after``, ``limit`` ≤ 1000): flagmatch's own, for reviewing a bank."""
    try:
        after = int(request.args.get("after", 0))
        limit = int(request.args.get("limit", 100))
    except ValueError:
        raise InvalidInputError("after and limit are integers") from None
    if not 1 <= limit <= 1000 or after < 0:
        raise InvalidInputError("limit is 1–1000 and after ≥ 0")
    page = runtime().service.hashes.banks.page(bank_name, after=after, limit=limit)  # type: ignore[union-attr]
    return jsonify({"entries": [e.to_json() for e in page], "next_after": page[-1].id if len(page) == limit else None})


@curation.get("/signal_type")
@_guarded(write=False)
def signal_types() -> Response:
    return jsonify([{"name": st, "enabled_ratio": 1.0} for st in SIGNAL_TYPES])


@curation.get("/content_type")
@_guarded(write=False)
def content_types() -> Response:
    return jsonify([{"name": ct, "enabled": True} for ct in CONTENT_TYPES])


for _bp in (hashing, matching, curation):
    _bp.register_error_handler(HTTPException, hma_http_error)


def register_hma(app: Flask) -> None:
    for bp in (hashing, matching, curation):
        app.register_blueprint(bp)

    @app.get("/status")
    def hma_status() -> Response:
        """OMM's readiness check for load balancers: 200 ``I-AM-ALIVE`` once the model and the indexes are
        loaded, else 503 ``INDEX-NOT-LOADED`` (no token needed, as on OMM)."""
        rt = runtime()
        if rt.ready.is_set() and rt.index is not None:
            return Response(b"I-AM-ALIVE", mimetype="text/plain")
        return Response(b"INDEX-NOT-LOADED", status=503, mimetype="text/plain")

    @app.get("/status/live")
    def hma_status_live() -> Response:
        """OMM's liveness check: always 200 while the process answers (an index still loading must not get
        the process restarted)."""
        return Response(b"I-AM-ALIVE", mimetype="text/plain")


__all__ = ["register_hma", "NotFoundError"]
