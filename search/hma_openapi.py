"""The OpenAPI document of the HMA routes (``/openapi/openapi.json``, titled "Open Media Match API" as OMM's
is), built from the routes as registered: each route's methods and path, the query parameters its
``_takes`` declares (their schemas declared once here, by name: a parameter means the same on every route),
its request body, its success status, and OMM's ``{"message"}`` body for every error. Schemathesis runs its
default checks against it (tests/test_contract.py)."""
from __future__ import annotations

import re
from typing import Any

from flask import Flask, Response, jsonify

from indexer.hashbanks.exchanges import APIS
from indexer.media.hashes import PDQ_MAX_THRESHOLD
from indexer.storage.banks import BANK_NAME, MAX_NOTE_CHARS
from search.hma import BANK_FIELDS, CONTENT_TYPES, HMA_TYPES, META_KEYS
from search.schemas import MAX_ID

_NAME = BANK_NAME.pattern
# a vPDQ: threatexchange's JSON list of "<pdq hex>,<quality 0-100>,<seconds>"
_VPDQ_FRAME = '"[0-9a-f]{64},(100|[1-9]?[0-9]),[0-9]{1,5}(\\.[0-9]{1,3})?"'
_VPDQ = "^\\[" + _VPDQ_FRAME + "(, " + _VPDQ_FRAME + ")*\\]$"
_HEX = "^([0-9a-fA-F]{32}|[0-9a-fA-F]{64}|" + _VPDQ[1:-1] + ")$"   # an MD5 or a PDQ, by length, or a vPDQ
_FLAG = {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"}  # OMM's str_to_bool
_NOTE = {"type": "string", "maxLength": MAX_NOTE_CHARS, "nullable": True}  # null or "": no note
_TYPE_LIST = "^(" + "|".join(HMA_TYPES) + ")(,(" + "|".join(HMA_TYPES) + "))*$"

QUERY: dict[str, dict[str, Any]] = {
    "signal": {"type": "string", "pattern": _HEX},
    "signal_type": {"type": "string", "enum": list(HMA_TYPES)},
    "banks": {"type": "string"},  # names, comma-separated; a name no bank has matches nothing (as OMM)
    "include_distance": _FLAG, "bypass_coinflip": _FLAG, "include_signals": _FLAG, "include_metadata": _FLAG,
    "seed": {"type": "string"},
    "url": {"type": "string", "format": "uri", "pattern": "^https?://"},
    "content_type": {"type": "string", "enum": list(CONTENT_TYPES)},
    "types": {"type": "string", "pattern": _TYPE_LIST},
    "after": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
}
PATH: dict[str, dict[str, Any]] = {
    "bank_name": {"type": "string", "pattern": _NAME},
    "content_id": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
    "api_name": {"type": "string", "enum": sorted(APIS)},
    "name": {"type": "string", "pattern": _NAME},
}
_RATIO = {"type": "number", "minimum": 0, "maximum": 1}
# null is "not given" for every field but a new bank's name (OMM's request models are Optional)
_BANK_FIELDS = {"name": {"type": "string", "pattern": _NAME, "nullable": True},
                "enabled": {"type": "boolean", "nullable": True}, "enabled_ratio": {**_RATIO, "nullable": True},
                "role": {"type": "string", "enum": ["match", "negative", None], "nullable": True},
                "pdq_threshold": {"type": "integer", "minimum": 0, "maximum": PDQ_MAX_THRESHOLD, "nullable": True},
                "source": {"type": "string", "nullable": True}}
_UPLOAD = {"type": "object", "minProperties": 1, "maxProperties": 1,
           "properties": {ct: {"type": "string", "format": "binary"} for ct in CONTENT_TYPES},
           "additionalProperties": False}
_METADATA = {"type": "object", "additionalProperties": False, "properties": {
    "content_id": {"type": "string"}, "content_uri": {"type": "string"}, "json": {"type": "object"}}}
assert set(_METADATA["properties"]) == set(META_KEYS) and set(_BANK_FIELDS) == set(BANK_FIELDS)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON object body: the routes refuse fields they do not declare (``search.hma._json``)."""
    if schema.get("type") == "object" and "properties" in schema:
        schema = {"additionalProperties": False, **schema}
    return {"application/json": {"schema": schema}}


BODIES: dict[str, dict[str, Any]] = {
    "hma_hashing.hash_post": {"multipart/form-data": {"schema": _UPLOAD}},
    "hma_matching.lookup_post": {"multipart/form-data": {"schema": _UPLOAD}},
    "hma_curation.bank_add_content": {"multipart/form-data": {"schema": {
        **_UPLOAD, "maxProperties": 3, "properties": {**_UPLOAD["properties"],
                                                      "metadata": {"type": "string"}, "note": _NOTE}}}},
    "hma_matching.compare": _json({"type": "object", "minProperties": 1, "additionalProperties": False,
                                   "properties": {t: {"type": "array", "minItems": 2, "maxItems": 2, "items": {
                                       "type": "string", "pattern": _VPDQ if t == "vpdq" else
                                       "^[0-9a-fA-F]{%d}$" % (64 if t == "pdq" else 32)}}
                                       for t in HMA_TYPES}}),
    "hma_curation.bank_create": _json({"type": "object", "required": ["name"], "properties": {
        **_BANK_FIELDS, "name": {"type": "string", "pattern": _NAME}}}),
    "hma_curation.bank_update": _json({"type": "object", "properties": _BANK_FIELDS}),
    "hma_curation.bank_add_signal": _json({"type": "object", "minProperties": 1, "additionalProperties": False,
                                           "properties": {"pdq": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                                                          "video_md5": {"type": "string",
                                                                        "pattern": "^[0-9a-fA-F]{32}$"},
                                                          "vpdq": {"type": "string", "pattern": _VPDQ},
                                                          "note": _NOTE}}),
    "hma_curation.bank_update_content": _json({"type": "object", "properties": {
        # an integer, or its digits as a string (OMM takes both)
        "disable_until_ts": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2_000_000_000},
                                       {"type": "string", "pattern": "^[0-9]{1,10}$"}], "nullable": True},
        "note": _NOTE}}),
    "hma_curation.signal_type_update": _json({"type": "object", "required": ["enabled_ratio"],
                                              "properties": {"enabled_ratio": _RATIO}}),
    "hma_curation.exchange_api_set": _json({"type": "object", "properties": {
        "credential_json": {"type": "object", "nullable": True}}}),
    "hma_curation.exchange_create": _json({"type": "object", "required": ["api", "bank"], "properties": {
        "api": {"type": "string", "enum": sorted(APIS)}, "bank": {"type": "string", "pattern": _NAME},
        "api_json": {"type": "object", "nullable": True}}}),
    "hma_curation.exchange_update": _json({"type": "object", "properties": {
        "enabled": {"type": "boolean", "nullable": True}}}),
}
SUCCESS = {"hma_curation.bank_create": "201", "hma_curation.exchange_create": "201",
           "hma_curation.signal_type_update": "204"}
TEXT = {"hma_status", "hma_status_live"}  # OMM answers these in plain text
HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["ok", "degraded", "failing", "loading", "failed"]},
    "checks": {"type": "object", "additionalProperties": {"type": "object", "required": ["ok"],
                                                          "properties": {"ok": {"type": "boolean"}}}},
    "error": {"type": "string", "nullable": True}}}
_ANY = {"application/json": {"schema": {}}}
_MESSAGE = {"description": "OMM's error body", "content": _json({
    "type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}})}
ERRORS = ("400", "401", "403", "404", "405", "413", "415", "429", "503")


def _responses(endpoint: str) -> dict[str, Any]:
    if endpoint in TEXT:
        text: dict[str, Any] = {"text/plain": {"schema": {"type": "string"}}}
        if endpoint == "hma_status":  # with Accept: application/json, every check's figures (search.health)
            text["application/json"] = {"schema": HEALTH}
        return {"200": {"description": "I-AM-ALIVE", "content": text},
                "503": {"description": "INDEX-NOT-LOADED, INDEX-STALE or CATALOG-UNREACHABLE", "content": text}}
    ok = SUCCESS.get(endpoint, "200")
    out: dict[str, Any] = {ok: {"description": "OMM's answer", **({} if ok == "204" else {"content": _ANY})}}
    out.update({code: _MESSAGE for code in ERRORS})
    return out


def hma_openapi(app: Flask) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("hma_"):
            continue
        fn = app.view_functions[rule.endpoint]
        path = re.sub(r"<(?:[^:>]+:)?(\w+)>", r"{\1}", rule.rule)
        choice = re.search(r"<any\(([^)]*)\):(\w+)>", rule.rule)
        params = []
        for a in sorted(rule.arguments):
            schema = ({"type": "string", "enum": [c.strip() for c in choice.group(1).split(",")]}
                      if choice and choice.group(2) == a else PATH[a])
            params.append({"name": a, "in": "path", "required": True, "schema": schema})
        required = set(getattr(fn, "hma_required", ()))
        params += [{"name": q, "in": "query", "required": q in required, "schema": QUERY[q]}
                   for q in getattr(fn, "hma_params", ())]
        doc = (fn.__doc__ or rule.endpoint).strip()
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {"operationId": f"{rule.endpoint}_{method.lower()}",
                                  "summary": doc.split("\n")[0], "description": doc, "parameters": params,
                                  "responses": _responses(rule.endpoint)}
            if rule.endpoint in BODIES:
                op["requestBody"] = {"required": True, "content": BODIES[rule.endpoint]}
            paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.0.3", "info": {"title": "Open Media Match API", "version": "1.1",
                                         "description": "HMA's API as flagmatch serves it (search.hma)"},
            "paths": paths}


def register_openapi(app: Flask) -> None:
    @app.get("/openapi/openapi.json")
    def hma_openapi_json() -> Response:
        """This document (OMM's name for it)."""
        return jsonify(hma_openapi(app))
