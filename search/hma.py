"""Hasher-Matcher-Actioner's API (Open Media Match 1.1.x, facebook/ThreatExchange ``hasher-matcher-actioner``)
over flagmatch's banks, so HMA clients work unchanged: hashing (``/h``), matching (``/m``), bank curation,
exchanges and signal/content types (``/c``), ``/status`` and ``/status/live``, in OMM's request and response
shapes; every error on these routes is OMM's ``{"message": …}`` with a 4xx. OMM's own API tests, ported to
HTTP, are the acceptance suite (``tests/hma_peer``).

Where flagmatch differs, by design and by one setting each:
- tokens: reads follow ``open_reads`` and writes need a token, as everywhere in flagmatch; ``hma_open`` makes
  these routes answer without one, as OMM does;
- URLs (``url=``) are fetched only from what ``fetch_allow`` names (``indexer.media.fetch``); OMM fetches any
  URL unless told otherwise;
- a parameter flagmatch does not take is refused by name (400), never ignored;
- a ``negative`` bank's match suppresses the query's other matches (flagmatch's own notion).

Signal types: ``pdq`` (photos), ``video_md5`` (the MD5 of a file's bytes; flagmatch's ``md5``) and ``vpdq``
(videos: one PDQ per second with its quality and time, threatexchange's ``VPDQSignal``, matched with HMA's own
``VPDQIndex`` and thresholds). A video is hashed by both, decoded under flagmatch's video budgets first
(``indexer.media.video``); ``vpdq`` is offered where Meta's ``vpdq`` library is installed (the video extra)."""
from __future__ import annotations

import functools
import json
import random
import re
from typing import Any, Callable

from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from indexer.errors import DecodeError, FlagmatchError, InvalidInputError, NotFoundError
from indexer.hashbanks import exchanges as xapi
from indexer.hashbanks.banks import Bank, BankEntry, Banks, NewEntry
from indexer.media.fetch import AllowList, FetchPolicy, fetch
from indexer.media.hashes import PDQ_MIN_QUALITY, Pdq, Signals, md5_of, pdq_distance, validate_signal
from indexer.media.video import vpdq_available, vpdq_match
from indexer.review.banks import (add_content, create_bank, create_exchange, delete_bank, delete_exchange,
                                  remove_entry, set_exchange_credentials, set_exchange_enabled, set_signal_type,
                                  update_bank, update_content)
from indexer.storage.banks import BANK_NAME, check_note, check_ratio
from indexer.storage.exchanges import Exchange, ExchangeStore, SignalTypeSwitches
from search.edge import authorize, csrf_required, http_status, need_ready, runtime, server_health
from search.hashmatch import BankMatch, HashMatcher
from search.schemas import MAX_ID  # the largest id SQL's BIGINT holds (route ids are capped the same way)

# HMA's names for flagmatch's signal types, and which a content type hashes
HMA_TYPES = {"pdq": "pdq", "video_md5": "md5", "vpdq": "vpdq"}
OURS_TO_HMA = {v: k for k, v in HMA_TYPES.items()}
CONTENT_TYPES = {"photo": ("pdq",), "video": ("video_md5", "vpdq")}
META_KEYS = ("content_id", "content_uri", "json")
BANK_FIELDS = ("name", "enabled", "enabled_ratio", "role", "pdq_threshold", "source")  # OMM's, then flagmatch's
TRUE, FALSE = ("true", "1"), ("false", "0")


class HmaAbort(Exception):
    """An HMA answer other than 200 with its message (``abort`` as OMM writes it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _message(status: int, message: str) -> Response:
    resp = jsonify({"message": message})
    resp.status_code = status
    return resp


def _guarded(write: bool) -> Callable:
    """Tokens as for /api/v1 (or none with ``hma_open``); every error becomes ``{"message"}``."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            if runtime().settings.hma_open and "Authorization" not in request.headers:
                g.actor = "hma"
            else:
                denied = authorize(write)
                if denied is not None:
                    return _message(denied.status_code, denied.get_json()["error"]["message"])
                if write and csrf_required():
                    return _message(403, "missing or wrong CSRF token")
            denied = need_ready()
            if denied is not None:
                return _message(503, "index not yet ready")
            try:
                for key in ("bank_name", "name"):  # a bank's or an exchange's name in the path: HMA's rule
                    if key in kw and not BANK_NAME.match(kw[key]):
                        raise HmaAbort(400, f"{kw[key]!r} is not a bank or exchange name ([A-Z_][A-Z0-9_]*)")
                return fn(*a, **kw)
            except HmaAbort as exc:
                return _message(exc.status, exc.message)
            except FlagmatchError as exc:
                return _message(http_status(exc), exc.message)
        return wrapper
    return deco


def hma_http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors under /h, /m and /c (an unknown route, a wrong method, a body too large) as HMA's
    ``{"message"}``."""
    resp = _message(exc.code or 500, exc.description or "error")
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return resp


def _hm() -> HashMatcher:
    svc = runtime().service
    if svc is None or svc.hashes is None:
        raise HmaAbort(503, "index not yet ready")
    return svc.hashes


def _only(*known: str) -> None:
    """A parameter flagmatch does not take is refused by name, never ignored (a client limiting what it acts
    on must not get more than it asked for)."""
    _no_others(request.args, known, "parameter(s)")


def _takes(*params: str, required: tuple[str, ...] = ()) -> Callable:
    """The query parameters a route takes (``required`` among them): any other is refused by name
    (``_only``); the OpenAPI document declares them (``search.hma_openapi``)."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            _only(*params)
            return fn(*a, **kw)
        wrapper.hma_params, wrapper.hma_required = params, required  # type: ignore[attr-defined]
        return wrapper
    return deco


def _bool(name: str, default: bool = False) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise HmaAbort(400, "invalid boolean parameter - prefer true/false")


def _offered() -> tuple[str, ...]:
    """The HMA signal types this server offers (setting ``hma_signal_types``; vpdq only with the vpdq library)."""
    wanted = tuple(getattr(runtime().settings, "hma_signal_types", tuple(HMA_TYPES)))
    return tuple(t for t in HMA_TYPES if t in wanted and (t != "vpdq" or vpdq_available()))


def _switches() -> dict[str, float]:
    """The signal type switches, read once per request."""
    if "hma_switches" not in g:
        g.hma_switches = SignalTypeSwitches(runtime().store.catalog).all()
    return g.hma_switches  # type: ignore[no-any-return]


def _signal_type(name: str | None) -> str:
    """flagmatch's type for an HMA signal type name that is on; 400 otherwise (OMM's messages)."""
    if not name or name not in _offered():
        raise HmaAbort(400, f"No such SignalType '{name}'")
    if _switches().get(name, 1.0) <= 0:
        raise HmaAbort(400, f"SignalType '{name}' is not enabled")
    return HMA_TYPES[name]


def _valid(hma_type: str, value: Any) -> str:
    if not isinstance(value, str):
        raise HmaAbort(400, f"Invalid {hma_type} signal: not a string")
    try:
        return validate_signal(HMA_TYPES[hma_type], value)
    except InvalidInputError as exc:
        raise HmaAbort(400, f"invalid signal: {exc.message}") from None


# ------------------------------------------------------------------ media in: uploads and URLs

def _content_type(name: str) -> str:
    if name not in CONTENT_TYPES:
        raise HmaAbort(400, f"no such content_type: '{name}'")
    return name


def _types_for(content_type: str, override: str | None) -> list[str]:
    """The HMA signal types to hash a content type with (``types`` narrows them)."""
    available = [t for t in CONTENT_TYPES[content_type] if _switches().get(t, 1.0) > 0 and t in _offered()]
    if not available:
        raise HmaAbort(400, f"content_type {content_type} has no enabled signal type")
    if override is None:
        return available
    out = []
    for name in (n.strip() for n in override.split(",")):
        if not name:
            continue
        if name not in available:
            raise HmaAbort(400, f"signal type '{name}' doesn't exist or is disabled")
        out.append(name)
    if not out:
        raise HmaAbort(400, "empty signal type selection")
    return out


def _hash(data: bytes, content_type: str, types: list[str], strict: bool = False) -> dict[str, str]:
    """HMA's hash response. A photo's PDQ of quality below 50 is the empty string, as threatexchange's hasher
    returns it; a video's MD5 is of its bytes, its vPDQ of its frames (decoded within the video budgets). Bytes
    that do not decode as video get the empty vPDQ (their MD5 still answers, as OMM hashes any bytes by MD5)
    unless vPDQ was asked for by name (``strict``: the decoding error is the answer)."""
    if not data:
        raise HmaAbort(400, "the file is empty")
    out: dict[str, str] = {}
    for st in types:
        if st == "pdq":
            svc = runtime().service
            assert svc is not None
            pdq = svc.hash_image(data)
            out["pdq"] = pdq.hash if pdq is not None and pdq.quality >= PDQ_MIN_QUALITY else ""
        elif st == "vpdq":
            svc = runtime().service
            assert svc is not None
            try:
                out["vpdq"] = svc.hash_video(data)
            except DecodeError:
                if strict:
                    raise
                out["vpdq"] = ""
        else:
            out["video_md5"] = md5_of(data)
    return out


def _upload(fields: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """(content type, bytes) of the one uploaded file (its field name is the content type, OMM's way); form
    fields other than ``fields`` are refused by name."""
    _no_others(request.form, fields, "form field(s)")
    if not request.files:
        raise HmaAbort(400, "Missing multipart/form-data file upload")
    if len(request.files) > 1 or any(len(request.files.getlist(k)) > 1 for k in request.files):
        raise HmaAbort(400, "Only one file allowed per request")
    field = next(iter(request.files))
    return _content_type(field), request.files[field].read()


def _policy() -> FetchPolicy:
    st = runtime().settings
    return FetchPolicy(AllowList.parse(st.fetch_allow), st.fetch_max_bytes, st.fetch_timeout)


def _from_url(url: str, hint: str | None, types: str | None) -> dict[str, str]:
    got = fetch(url, _policy())
    if hint:
        ct = _content_type(hint)
    elif got.content_type.startswith("image"):
        ct = "photo"
    elif got.content_type.startswith("video"):
        ct = "video"
    else:
        raise HmaAbort(400, f"unsupported url ContentType: '{got.content_type}', if you know the expected type, "
                            "provide it with the content_type query param")
    return _hash(got.data, ct, _types_for(ct, types), strict=types is not None)


def _from_upload(types: str | None = None, fields: tuple[str, ...] = ()) -> dict[str, str]:
    ct, data = _upload(fields)
    return _hash(data, ct, _types_for(ct, types), strict=types is not None)


# ------------------------------------------------------------------ hashing

hashing = Blueprint("hma_hashing", __name__, url_prefix="/h")


@hashing.get("/hash")
@_guarded(write=False)
@_takes("url", "content_type", "types", required=("url",))
def hash_get() -> Response:
    url = request.args.get("url")
    if not url:
        raise HmaAbort(400, "url is required")
    return jsonify(_from_url(url, request.args.get("content_type"), request.args.get("types")))


@hashing.post("/hash")
@_guarded(write=False)
@_takes("types")
def hash_post() -> Response:
    return jsonify(_from_upload(request.args.get("types")))


# ------------------------------------------------------------------ matching

matching = Blueprint("hma_matching", __name__, url_prefix="/m")


def _banks_param() -> set[str] | None:
    raw = request.args.get("banks")
    return {b for b in raw.split(",") if b} if raw else None


def _query(hma_type: str, value: str) -> list[BankMatch]:
    """Every bank match of one signal, disabled banks and contents included (marked not ``live``), negative
    banks' matches suppressing the rest as flagmatch does."""
    st = _signal_type(hma_type)
    v = _valid(hma_type, value)
    sig = Signals(v, None) if st == "md5" else Signals("", None, v) if st == "vpdq" else Signals("", Pdq(v, 100))
    ev = _hm().lookup([sig], k=0, every_bank=True)[0]
    if any(m.live for m in ev.negative_matches):
        return []
    return ev.bank_matches


def _dist(m: BankMatch) -> str:
    """OMM's distance string: PDQ bits, 0 for MD5, threatexchange's "<query %>%[<compared %>%]" for vPDQ."""
    return m.similarity or str(m.distance)


def _by_content(matches: list[BankMatch]) -> list[BankMatch]:
    seen: dict[int, BankMatch] = {}
    for m in matches:
        if m.content_id not in seen or m.distance < seen[m.content_id].distance:
            seen[m.content_id] = m
    return sorted(seen.values(), key=lambda m: (m.distance, m.content_id))


def _lookup(hma_type: str, value: str, *, banks: set[str] | None, bypass: bool) -> dict[str, list[dict[str, Any]]]:
    """OMM's lookup: enabled contents of banks whose ``matching_enabled_ratio`` passes one coin flip per
    request (seeded by ``seed`` when given; ``bypass_coinflip`` passes every bank, disabled ones too)."""
    matches = [m for m in _query(hma_type, value) if m.live or (bypass and m.content_on)]
    coin = 0.0 if bypass else random.Random(request.args.get("seed")).random()
    out: dict[str, list[dict[str, Any]]] = {}
    for m in _by_content(matches):
        if m.enabled_ratio < coin or (banks is not None and m.bank not in banks):
            continue
        out.setdefault(m.bank, []).append({"bank_content_id": m.content_id, "distance": _dist(m)})
    return out


@matching.get("/raw_lookup")
@_guarded(write=False)
@_takes("signal", "signal_type", "include_distance", "banks", required=("signal", "signal_type"))
def raw_lookup() -> Response:
    """Every content matching the signal, enabled or not (OMM: "enable/disable status is NOT checked")."""
    signal, st = request.args.get("signal"), request.args.get("signal_type")
    if signal is None or st is None:
        raise HmaAbort(400, f"{'signal' if signal is None else 'signal_type'} is required")
    banks = _banks_param()
    found = [m for m in _by_content(_query(st, signal)) if banks is None or m.bank in banks]
    if _bool("include_distance"):
        return jsonify({"matches": [{"bank_content_id": m.content_id, "distance": _dist(m)} for m in found]})
    return jsonify({"matches": [m.content_id for m in found]})


@matching.get("/lookup")
@_guarded(write=False)
@_takes("url", "content_type", "types", "signal", "signal_type", "banks", "seed", "bypass_coinflip")
def lookup_get() -> Response:
    banks, bypass = _banks_param(), _bool("bypass_coinflip")
    url = request.args.get("url")
    if url:
        hashes = _from_url(url, request.args.get("content_type"), request.args.get("types"))
        resp = {st: _lookup(st, v, banks=banks, bypass=bypass) for st, v in hashes.items() if v}
        selected = request.args.get("signal_type")
        return jsonify(resp.get(selected, {}) if selected is not None else resp)
    signal, st = request.args.get("signal"), request.args.get("signal_type")
    if not signal or not st:
        raise HmaAbort(400, "Either url or both signal and signal_type are required")
    return jsonify(_lookup(st, signal, banks=banks, bypass=bypass))


@matching.post("/lookup")
@_guarded(write=False)
@_takes("banks", "seed", "bypass_coinflip", "types")
def lookup_post() -> Response:
    banks, bypass = _banks_param(), _bool("bypass_coinflip")
    hashes = _from_upload(request.args.get("types"))
    return jsonify({st: _lookup(st, v, banks=banks, bypass=bypass) if v else {} for st, v in hashes.items()})


def _index_status() -> dict[str, dict[str, Any]]:
    hm = _hm()
    idx = hm.bank_index
    idx.refresh()
    pdq_ts = hm.banks.added_ts(idx.covered) if idx.covered else None
    md5_ts, vpdq_ts = hm.banks.newest_ts("md5"), hm.banks.newest_ts("vpdq")
    status = {"pdq": {"present": True, "built_to": pdq_ts if pdq_ts is not None else -1, "size": idx.ntotal},
            "video_md5": {"present": True, "built_to": md5_ts if md5_ts is not None else -1,
                          "size": hm.banks.count("md5")},
            "vpdq": {"present": True, "built_to": vpdq_ts if vpdq_ts is not None else -1,
                     "size": hm.banks.count("vpdq")}}
    return {st: v for st, v in status.items() if st in _offered()}


def _one_type(status: dict[str, Any]) -> dict[str, Any]:
    st = request.args.get("signal_type")
    if st is None:
        return status
    if st not in status:
        raise HmaAbort(400, f"No such signal type '{st}'")
    return {st: status[st]}


@matching.get("/index/status")
@_guarded(write=False)
@_takes("signal_type")
def index_status() -> Response:
    """OMM's index status: ``built_to`` is the Unix time of the newest banked signal the index holds (-1 for
    none). flagmatch's bank index follows the catalog on every lookup, so it is always present."""
    return jsonify(_one_type(_index_status()))


@matching.post("/compare")
@_guarded(write=False)
@_takes()
def compare() -> Response:
    """Pairs of hashes compared: ``{"pdq": [h1, h2]}`` → ``{"pdq": [matched, {"distance": bits}]}``."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise HmaAbort(400, "Request input was not a dict")
    if not body:
        raise HmaAbort(400, "nothing to compare: name a signal type and two hashes")
    out: dict[str, Any] = {}
    for name, pair in body.items():
        if not isinstance(pair, list):
            raise HmaAbort(400, f"Comparison hashes for {name} was not a list")
        if len(pair) != 2:
            raise HmaAbort(400, "Comparison hash list length must be exactly 2")
        st = _signal_type(name)
        if not all(isinstance(h, str) for h in pair):
            raise HmaAbort(400, f"Invalid {name} hash: a hash is a string")
        try:
            left, right = (validate_signal(st, h) for h in pair)
        except InvalidInputError as exc:
            raise HmaAbort(400, f"Invalid {name} hash: {exc.message}") from None
        if st == "pdq":
            d = pdq_distance(left, right)
            out[name] = [d <= 31, {"distance": d}]
        elif st == "vpdq":  # threatexchange's VPDQSignal.compare_hash, as OMM answers it
            vm = vpdq_match(left, right)
            out[name] = [vm.match, {"query_match_percent": vm.query_match_percent,
                                    "compared_match_percent": vm.compared_match_percent}]
        else:
            out[name] = [left == right, {"distance": 0 if left == right else 1}]
    return jsonify(out)


# ------------------------------------------------------------------ curation: banks

curation = Blueprint("hma_curation", __name__, url_prefix="/c")


def _bank_json(b: Bank) -> dict[str, Any]:
    """OMM's BankConfig, exactly."""
    return {"name": b.name, "matching_enabled_ratio": b.enabled_ratio}


def _json(*known: str) -> dict[str, Any]:
    """The JSON object body; with ``known``, a field other than those is refused by name (as a query
    parameter is)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise HmaAbort(400, "this endpoint expects a json object payload")
    if known:
        _no_others(body, known)
    return body


def _no_others(given: Any, known: tuple[str, ...], what: str = "field(s)") -> None:
    """Query parameters, form fields or JSON fields a route does not take are refused by name, never ignored."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise HmaAbort(400, f"unsupported {what}: {', '.join(map(str, unknown))}")


def _ratio(body: dict[str, Any]) -> float | None:
    """OMM's bank switch: ``enabled_ratio`` (0–1) wins over ``enabled`` (1 or 0); None: not given. Each is
    checked when given, used or not."""
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise HmaAbort(400, "enabled must be true or false")
    if body.get("enabled_ratio") is not None:
        return check_ratio(body["enabled_ratio"])
    return None if enabled is None else (1.0 if enabled else 0.0)


def _text(body: dict[str, Any], key: str) -> str | None:
    """A string field of a JSON body, or None when absent; 400 when it is something else."""
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise HmaAbort(400, f"{key} must be a string")
    return v  # type: ignore[no-any-return]


def _banks() -> Banks:
    return _hm().banks


@curation.get("/banks")
@_guarded(write=False)
@_takes()
def banks_index() -> Response:
    return jsonify([_bank_json(b) for b in _banks().list(counts=False)])


@curation.post("/banks")
@_guarded(write=True)
@_takes()
def bank_create() -> tuple[Response, int]:
    """Create a bank (OMM's ``name``, ``enabled``/``enabled_ratio``; flagmatch's ``role``, ``pdq_threshold``,
    ``source`` besides)."""
    body = _json(*BANK_FIELDS)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise HmaAbort(400, "name is required")
    ratio = _ratio(body)
    try:
        b = create_bank(_banks(), runtime().audit, name, actor=g.actor, enabled_ratio=1.0 if ratio is None else ratio,
                        source=_text(body, "source") or "api", role=_text(body, "role") or "match",
                        pdq_threshold=body.get("pdq_threshold", 31))
    except InvalidInputError as exc:
        if exc.code == "conflict":
            raise HmaAbort(403, "Bank already exists") from None
        raise
    return jsonify(_bank_json(b)), 201


@curation.get("/bank/<bank_name>")
@_guarded(write=False)
@_takes()
def bank_show(bank_name: str) -> Response:
    try:
        return jsonify(_bank_json(_banks().get(bank_name, counts=False)))
    except NotFoundError:
        raise HmaAbort(404, f"bank '{bank_name}' not found") from None


@curation.put("/bank/<bank_name>")
@_guarded(write=True)
@_takes()
def bank_update(bank_name: str) -> Response:
    body = _json(*BANK_FIELDS)
    rename = body.get("name")
    if rename is not None and not isinstance(rename, str):
        raise HmaAbort(400, "name must be a string")
    try:
        _banks().get(bank_name, counts=False)
    except NotFoundError:
        raise HmaAbort(404, "Bank not found") from None
    try:
        b = update_bank(_banks(), runtime().audit, bank_name, actor=g.actor, enabled_ratio=_ratio(body), rename=rename,
                        role=_text(body, "role"), pdq_threshold=body.get("pdq_threshold"),
                        source=_text(body, "source"))
    except InvalidInputError as exc:
        if exc.code == "conflict":
            raise HmaAbort(403, "Bank name already exists") from None
        raise
    return jsonify(_bank_json(b))


@curation.delete("/bank/<bank_name>")
@_guarded(write=True)
@_takes()
def bank_delete(bank_name: str) -> Response:
    try:
        delete_bank(_banks(), runtime().audit, bank_name, actor=g.actor)
    except NotFoundError:
        pass  # as OMM: deleting a bank that is not there is done (nothing changed, nothing recorded)
    return jsonify({"message": "Done"})


# ------------------------------------------------------------------ curation: bank content

def _need_bank(bank_name: str) -> Bank:
    try:
        return _banks().get(bank_name, counts=False)  # type: ignore[no-any-return]
    except NotFoundError:
        raise HmaAbort(404, f"bank '{bank_name}' not found") from None


def _metadata(v: Any) -> dict[str, Any] | None:
    """OMM's BankedContentMetadata: ``content_id`` and ``content_uri`` (strings) and ``json`` (an object)."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise HmaAbort(400, "metadata form field must be valid JSON") from None
    if not isinstance(v, dict):
        raise HmaAbort(400, "metadata should be a json object")
    extra = sorted(set(v) - set(META_KEYS))
    if extra:
        raise HmaAbort(400, f"Invalid metadata: unexpected field(s) {', '.join(extra)}")
    for k in ("content_id", "content_uri"):
        if v.get(k) is not None and not isinstance(v[k], str):
            raise HmaAbort(400, f"Invalid metadata: {k} should be a string")
    if v.get("json") is not None and not isinstance(v["json"], dict):
        raise HmaAbort(400, "Invalid metadata: json should be an object")
    clean = {k: v[k] for k in META_KEYS if v.get(k) is not None}
    return clean or None


def _add(bank: Bank, signals: dict[str, Any], *, metadata: dict[str, Any] | None, note: str | None,
         hashed: bool = False) -> Response:
    """Bank signals as one content; ``hashed``: they are flagmatch's hashes of an upload (an empty vPDQ there
    means bytes that are no video, banked by their MD5 alone; from a client it is a bad signal)."""
    if not signals:
        raise HmaAbort(400, "No signals given")
    entries = []
    ext = str(metadata["content_id"])[:200] if metadata and metadata.get("content_id") else None
    for name, value in signals.items():
        if name not in _offered():
            raise HmaAbort(400, f"No such signal type {name}")
        if name == "pdq" and value == "":
            raise HmaAbort(400, "the image's PDQ quality is below 50: too featureless to bank")
        if hashed and name == "vpdq" and value == "":
            continue
        v = _valid(name, value)
        entries.append(NewEntry(HMA_TYPES[name], v, external_id=ext, note=note, metadata=metadata))
    cid = add_content(_banks(), runtime().audit, bank.name, entries, actor=g.actor)
    return jsonify({"id": cid, "signals": {OURS_TO_HMA[e.signal_type]: e.signal for e in entries}})


@curation.post("/bank/<bank_name>/content")
@_guarded(write=True)
@_takes("url", "content_type", "types")
def bank_add_content(bank_name: str) -> Response:
    """Bank a photo or video, uploaded (multipart, field ``photo`` or ``video``) or by ``url``; ``metadata``
    and ``note`` in the JSON body or as form fields."""
    bank = _need_bank(bank_name)
    body = request.get_json(silent=True) if request.is_json else None
    form: dict[str, Any] = body if isinstance(body, dict) else dict(request.form)
    _no_others(form, ("metadata", "note"))
    metadata, note = _metadata(form.get("metadata")), check_note(form.get("note"))
    url = request.args.get("url")
    if url:
        hashes = _from_url(url, request.args.get("content_type"), request.args.get("types"))
    elif request.files:
        hashes = _from_upload(request.args.get("types"), fields=("metadata", "note"))
    else:
        raise HmaAbort(400, "Neither `url` nor multipart file upload was received")
    return _add(bank, hashes, metadata=metadata, note=note, hashed=True)


@curation.post("/bank/<bank_name>/signal")
@_guarded(write=True)
@_takes()
def bank_add_signal(bank_name: str) -> Response:
    """Bank hashes as one content: ``{"pdq": "…", "video_md5": "…", "note": "…"}``."""
    bank = _need_bank(bank_name)
    body = dict(_json())  # a field that is no signal type: OMM's "No such signal type" (in _add)
    note = check_note(body.pop("note", None))
    return _add(bank, body, metadata=None, note=note)


def _content_json(entries: list[BankEntry], bank: Bank, *, signals: bool, metadata: bool) -> dict[str, Any]:
    """OMM's BankContentResponse (keys it leaves out when empty left out here too)."""
    first = entries[0]
    out: dict[str, Any] = {"id": first.content_id, "disable_until_ts": first.disable_until_ts or 0,
                           "original_media_uri": None, "bank": _bank_json(bank)}
    if signals:
        out["signals"] = {OURS_TO_HMA[e.signal_type]: e.signal for e in entries}
    if metadata and first.metadata:
        out["metadata"] = first.metadata
    if first.note:
        out["note"] = first.note
    return out


def _content(bank_name: str, content_id: int) -> tuple[Bank, list[BankEntry]]:
    bank = _need_bank(bank_name)
    try:
        return bank, _banks().content(bank_name, content_id)
    except NotFoundError:
        raise HmaAbort(404, f"content '{content_id}' not found") from None


@curation.get("/bank/<bank_name>/content/<int:content_id>")
@_guarded(write=False)
@_takes("include_signals", "include_metadata")
def bank_get_content(bank_name: str, content_id: int) -> Response:
    bank, entries = _content(bank_name, content_id)
    return jsonify(_content_json(entries, bank, signals=_bool("include_signals"),
                                 metadata=_bool("include_metadata", True)))


@curation.put("/bank/<bank_name>/content/<int:content_id>")
@_guarded(write=True)
@_takes()
def bank_update_content(bank_name: str, content_id: int) -> Response:
    """Set ``disable_until_ts`` (Unix seconds, at most five years ahead) or ``note`` (``""`` clears it)."""
    bank, _ = _content(bank_name, content_id)
    body = _json("disable_until_ts", "note")
    kw: dict[str, Any] = {}
    if "disable_until_ts" in body:
        ts = body["disable_until_ts"]
        kw["disable_until_ts"] = int(ts) if isinstance(ts, str) and ts.isdigit() else ts  # OMM takes "123" too
    if "note" in body:
        kw["note"] = body["note"]
    entries = update_content(_banks(), runtime().audit, bank_name, content_id, actor=g.actor, **kw)
    out = _content_json(entries, bank, signals=False, metadata=True)
    out["disable_until_ts"] = entries[0].disable_until_ts or 0
    return jsonify(out)


@curation.delete("/bank/<bank_name>/content/<int:content_id>")
@_guarded(write=True)
@_takes()
def bank_delete_content(bank_name: str, content_id: int) -> Response:
    _need_bank(bank_name)
    return jsonify({"deleted": remove_entry(_banks(), runtime().audit, bank_name, content_id, actor=g.actor)})


@curation.get("/bank/<bank_name>/content")
@_guarded(write=False)
@_takes("after", "limit")
def bank_content(bank_name: str) -> Response:
    """A bank's entries, paged by id (``after``, ``limit`` ≤ 1000): flagmatch's own, for reviewing a bank."""
    try:
        after = int(request.args.get("after", 0))
        limit = int(request.args.get("limit", 100))
    except ValueError:
        raise HmaAbort(400, "after and limit are integers") from None
    if not 1 <= limit <= 1000 or not 0 <= after <= MAX_ID:
        raise HmaAbort(400, f"limit is 1–1000 and after 0–{MAX_ID}")
    _need_bank(bank_name)
    page = _banks().page(bank_name, after=after, limit=limit)
    return jsonify({"entries": [e.to_json() for e in page], "next_after": page[-1].id if len(page) == limit else None})


# ------------------------------------------------------------------ curation: signal and content types

@curation.get("/signal_type")
@_guarded(write=False)
@_takes()
def signal_types() -> Response:
    sw = _switches()
    return jsonify([{"name": st, "enabled_ratio": sw.get(st, 1.0)} for st in _offered()])


@curation.put("/signal_type/<any(pdq, video_md5, vpdq):signal_type>")
@_guarded(write=True)
@_takes()
def signal_type_update(signal_type: str) -> Response:
    """Switch a signal type (OMM: ``{"enabled_ratio": r}``, answered 204); a type at 0 is refused by lookups."""
    body = _json("enabled_ratio")
    if "enabled_ratio" not in body:
        raise HmaAbort(400, "enabled_ratio is required")
    ratio = check_ratio(body["enabled_ratio"])
    if signal_type not in _offered():
        raise HmaAbort(400, f"No such SignalType '{signal_type}'")
    set_signal_type(SignalTypeSwitches(runtime().store.catalog), runtime().audit, signal_type, ratio, actor=g.actor)
    return Response(status=204)


@curation.get("/signal_type/index")
@_guarded(write=False)
@_takes("signal_type")
def signal_type_index() -> Response:
    """OMM's index build status per signal type (flagmatch's index is never behind after a lookup's catch-up)."""
    hm = _hm()
    newest = {st: hm.banks.newest_ts(ours) for st, ours in HMA_TYPES.items()}
    out = {}
    for st, s in _index_status().items():
        if st not in _offered():
            continue
        db_size = hm.banks.count(HMA_TYPES[st]) if st != "pdq" else s["size"]
        out[st] = {"db_size": db_size, "index_size": s["size"], "index_out_of_date": False,
                   "newest_db_item": newest[st] if newest[st] is not None else -1,
                   "index_built_to": s["built_to"]}
    return jsonify(_one_type(out))


@curation.get("/content_type")
@_guarded(write=False)
@_takes()
def content_types() -> Response:
    return jsonify([{"name": ct, "enabled": True} for ct, types in CONTENT_TYPES.items()
                    if any(t in _offered() for t in types)])


# ------------------------------------------------------------------ curation: exchanges

def _apis() -> list[str]:
    """The exchange APIs this server offers (setting ``exchange_apis``; empty: every one flagmatch knows)."""
    wanted = tuple(getattr(runtime().settings, "exchange_apis", ()))
    return sorted(a for a in xapi.APIS if not wanted or a in wanted)


def _exchanges() -> ExchangeStore:
    return ExchangeStore(runtime().store.catalog)


@curation.get("/exchanges/apis")
@_guarded(write=False)
@_takes()
def exchange_apis() -> Response:
    return jsonify(_apis())


def _api_status(api: str) -> dict[str, bool]:
    cls = xapi.api_class(api)
    return {"supports_authentification": xapi.supports_auth(cls),
            "has_set_authentification": _exchanges().credential(api) is not None}


@curation.get("/exchanges/api/<api_name>")
@_guarded(write=False)
@_takes()
def exchange_api(api_name: str) -> Response:
    """An exchange API's credential state (never the credentials)."""
    if api_name not in _apis():
        raise HmaAbort(400, f"no such Exchange API '{api_name}'")
    return jsonify(_api_status(api_name))


@curation.post("/exchanges/api/<api_name>")
@_guarded(write=True)
@_takes()
def exchange_api_set(api_name: str) -> Response:
    """Set an exchange API's credentials: ``{"credential_json": {...}}`` (``{}`` unsets them)."""
    if api_name not in _apis():
        raise HmaAbort(400, f"no such Exchange API '{api_name}'")
    body = _json("credential_json")
    cred = body.get("credential_json")
    if cred is not None:
        if not isinstance(cred, dict):
            raise HmaAbort(400, "credential_json must be an object")
        set_exchange_credentials(_exchanges(), runtime().audit, api_name,
                                 xapi.parse_credentials(api_name, cred) if cred else None, actor=g.actor)
    return jsonify(_api_status(api_name))


@curation.get("/exchanges/api/<api_name>/schema")
@_guarded(write=False)
@_takes()
def exchange_api_schema(api_name: str) -> Response:
    if api_name not in _apis():
        raise HmaAbort(404, f"Exchange API '{api_name}' not found")
    return jsonify(xapi.api_schema(api_name))


@curation.post("/exchanges")
@_guarded(write=True)
@_takes()
def exchange_create() -> tuple[Response, int]:
    """Create an exchange (``{"api": "sample", "bank": "NAME", "api_json": {...}}``) and the bank it fills."""
    body = _json("api", "bank", "api_json")
    bank = body.get("bank")
    if not isinstance(bank, str) or not bank:
        raise HmaAbort(400, "bank is required")
    if not re.match(r"^[A-Z0-9_]+$", bank):
        raise HmaAbort(400, "Field `bank` must match /^[A-Z0-9_]+$/")
    api_json = body.get("api_json") or {}
    if not isinstance(api_json, dict):
        raise HmaAbort(400, "Field `api_json` must be object")
    api = body.get("api")
    if api is None:
        raise HmaAbort(400, "Field `api_type` is required")
    if api not in _apis():
        raise HmaAbort(400, f"No such exchange type '{api}'")
    enabled = api_json.get("enabled", True)
    cfg = xapi.parse_config(api, bank, {k: v for k, v in api_json.items() if k not in ("name", "api", "enabled")},
                            enabled=bool(enabled))
    xapi.local_file_allowed(api, cfg, runtime().store.home / "exchanges")
    try:
        create_exchange(_banks(), _exchanges(), runtime().audit, bank, api, xapi.dump_config(cfg),
                        actor=g.actor, enabled=bool(enabled))
    except InvalidInputError as exc:
        if exc.code == "conflict":
            raise HmaAbort(403, f"a bank or exchange named {bank} already exists") from None
        raise
    return jsonify({"message": "Created successfully"}), 201


@curation.get("/exchanges")
@_guarded(write=False)
@_takes()
def exchange_list() -> Response:
    return jsonify([e.name for e in _exchanges().list()])


def _exchange(name: str) -> Exchange:
    try:
        return _exchanges().get(name)
    except NotFoundError:
        raise HmaAbort(404, f"Exchange '{name}' not found") from None


def _exchange_json(ex: Exchange) -> dict[str, Any]:
    """OMM's answer: the API's collaboration config with its name, api and switch."""
    return {**json.loads(ex.config), "name": ex.name, "api": ex.api, "enabled": ex.enabled}


@curation.get("/exchange/<name>")
@_guarded(write=False)
@_takes()
def exchange_show(name: str) -> Response:
    return jsonify(_exchange_json(_exchange(name)))


@curation.get("/exchange/<name>/status")
@_guarded(write=False)
@_takes()
def exchange_status(name: str) -> Response:
    return jsonify(_exchange(name).status_json())


@curation.put("/exchange/<name>")
@_guarded(write=True)
@_takes()
def exchange_update(name: str) -> Response:
    _exchange(name)
    body = _json("enabled")
    if body.get("enabled") is not None:
        if not isinstance(body["enabled"], bool):
            raise HmaAbort(400, "enabled must be true or false")
        set_exchange_enabled(_exchanges(), runtime().audit, name, body["enabled"], actor=g.actor)
    return jsonify(_exchange_json(_exchange(name)))


@curation.delete("/exchange/<name>")
@_guarded(write=True)
@_takes()
def exchange_delete(name: str) -> Response:
    delete_exchange(_banks(), _exchanges(), runtime().audit, name, actor=g.actor)
    return jsonify({"message": "Exchange deleted"})


@curation.post("/exchange/<name>/fetch")
@_guarded(write=True)
@_takes()
def exchange_fetch(name: str) -> Response:
    """Fetch one exchange now (flagmatch's own; OMM fetches on a timer): the report of what changed."""
    _exchange(name)
    report = xapi.fetch(_exchanges(), _banks(), runtime().audit, name, actor=g.actor)
    return jsonify(report.to_json())


for _bp in (hashing, matching, curation):
    _bp.register_error_handler(HTTPException, hma_http_error)


def register_hma(app: Flask) -> None:
    for bp in (hashing, matching, curation):
        app.register_blueprint(bp)

    @app.get("/status")
    def hma_status() -> Response:
        """OMM's readiness check for load balancers (no token needed, as on OMM): 200 ``I-AM-ALIVE`` once the
        model and the indexes are loaded and every critical part answers; 503 ``INDEX-NOT-LOADED`` before,
        ``INDEX-STALE`` when an index is behind the catalog past ``health_max_index_lag`` (OMM's word for it),
        ``CATALOG-UNREACHABLE`` when the catalog does not answer. A client that asks for JSON
        (``Accept: application/json``) gets every check's figures (``search.health``) with the same status."""
        rt = runtime()
        if not (rt.ready.is_set() and rt.index is not None):
            word, body = "INDEX-NOT-LOADED", {"status": "loading" if rt.load_error is None else "failed",
                                              "error": rt.load_error}
        else:
            body = server_health(rt)
            checks = body["checks"]
            word = ("CATALOG-UNREACHABLE" if not checks["catalog"]["ok"] else
                    "INDEX-NOT-LOADED" if body["status"] == "failing" else
                    "INDEX-STALE" if not checks["index_lag"]["ok"] else "I-AM-ALIVE")
        status = 200 if word == "I-AM-ALIVE" else 503
        if request.accept_mimetypes.best == "application/json":
            resp = jsonify(body)
            resp.status_code = status
            return resp
        return Response(word.encode(), status=status, mimetype="text/plain")

    @app.get("/status/live")
    def hma_status_live() -> Response:
        """OMM's liveness check: always 200 while the process answers (an index still loading must not get
        the process restarted)."""
        return Response(b"I-AM-ALIVE", mimetype="text/plain")


__all__ = ["register_hma"]
