"""The OpenAPI 3.1 description of the JSON API (a test checks every route is in it). Request bodies are the
declarations the routes validate with (``search.schemas``); paths, parameters and answers are described here."""
from __future__ import annotations

from typing import Any

from search.schemas import MAX_ID, json_schemas

_ERR = {"$ref": "#/components/responses/Error"}
_RETRY = {"$ref": "#/components/responses/RetryLater"}
# Every operation can answer these: no or a bad token, over the rate limit, an internal error (JSON with a
# request id, never a stack), and a wrong method on its path.
_ALWAYS = (401, 405, 429, 500)


def _resp(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {"200": ok}
    for code in sorted({*errors, *_ALWAYS}):
        out[str(code)] = _RETRY if code in (429, 503) else _ERR
    return out


def _body(name: str, *, required: bool = True) -> dict[str, Any]:
    """A JSON request body: its schema is the declaration the route validates with (``search.schemas``)."""
    return {"required": required, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def openapi_document() -> dict[str, Any]:
    image_id = {"name": "image_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}
    cluster_id = {"name": "cluster_id", "in": "path", "required": True,
                  "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}
    json_ok = lambda ref: {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}  # noqa: E731
    params_props = {
        "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
        "scope": {"type": "string", "enum": ["flagged", "all"], "default": "flagged"},
        "min_similarity": {"type": "number", "minimum": -1, "maximum": 1, "default": -1},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "flagmatch", "version": "1",
                 "description": "Find flagged images similar to a query image; flag and unflag images."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": {
            "/search": {"post": {
                "summary": "Nearest flagged (or all) images for uploads or stored images",
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                  "description": "one or more image or video files (field repeated); a video "
                                                 "(MP4/MOV, WebM/MKV, AVI) is searched by its keyframes and "
                                                 "their mean, and its hits carry the frame pairs that matched"},
                        **params_props}}},
                    "application/json": {"schema": {"$ref": "#/components/schemas/SearchByStored"}}}},
                "responses": _resp(json_ok("#/components/schemas/SearchResponse"), 400, 404, 413, 415, 503)}},
            "/images/{image_id}": {"get": {
                "summary": "One image: facts, flag, flag history, paths, cluster",
                "parameters": [image_id],
                "responses": _resp(json_ok("#/components/schemas/ImageWithHistory"), 404)},
                "delete": {
                    "summary": "Delete an image: thumbnail, raw vector and index entries go; sha256 and audit stay",
                    "parameters": [image_id],
                    "requestBody": _body("DeleteBody"),
                    "responses": _resp({"description": "Deleted", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"deleted": {"type": "array",
                                                                     "items": {"type": "integer"}}}}}}},
                        400, 403, 404, 413, 415)}},
            "/sweep": {"post": {
                "summary": "Unflagged images anywhere in the corpus near the given (flagged) images",
                "requestBody": _body("SweepBody"),
                "responses": _resp({"description": "OK", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["seeds", "hits"], "properties": {
                        "seeds": {"type": "array", "items": {"type": "integer"}},
                        "min_similarity": {"type": "number"},
                        "hits": {"type": "array", "items": {"allOf": [
                            {"$ref": "#/components/schemas/Image"},
                            {"type": "object", "properties": {"similarity": {"type": "number"},
                                                              "seed": {"type": "integer"}}}]}}}}}}},
                    400, 404, 415, 503)}},
            "/images/{image_id}/thumbnail": {"get": {
                "summary": "The image's thumbnail (WebP, never cached)",
                "parameters": [image_id],
                "responses": _resp({"description": "WebP thumbnail",
                                    "content": {"image/webp": {"schema": {"type": "string", "format": "binary"}}}},
                                   404)}},
            "/images/{image_id}/keyframes": {"get": {
                "summary": "A video's keyframes in clip order (an image has none)",
                "parameters": [image_id],
                "responses": _resp(json_ok("#/components/schemas/Keyframes"), 404)}},
            "/images/{image_id}/keyframes/{keyframe_id}/thumbnail": {"get": {
                "summary": "A video keyframe's thumbnail (WebP, never cached)",
                "parameters": [image_id, {"name": "keyframe_id", "in": "path", "required": True,
                                          "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID}}],
                "responses": _resp({"description": "WebP thumbnail",
                                    "content": {"image/webp": {"schema": {"type": "string", "format": "binary"}}}},
                                   404)}},
            "/images/{image_id}/flag": {"post": {
                "summary": "Flag an image (recorded in its history)", "parameters": [image_id],
                "requestBody": _body("FlagBody", required=False),
                "responses": _resp(json_ok("#/components/schemas/FlagResult"), 400, 403, 404, 413, 415)}},
            "/images/{image_id}/unflag": {"post": {
                "summary": "Unflag an image (recorded in its history)", "parameters": [image_id],
                "requestBody": _body("FlagBody", required=False),
                "responses": _resp(json_ok("#/components/schemas/FlagResult"), 400, 403, 404, 413, 415)}},
            "/clusters/{cluster_id}/decision": {"post": {
                "summary": "Confirm or dismiss a cluster (dismiss unflags its members) with a reason code",
                "parameters": [cluster_id],
                "requestBody": _body("ClusterDecisionBody"),
                "responses": _resp(json_ok("#/components/schemas/ClusterDecision"), 400, 403, 404, 413, 415)}},
            "/clusters/{cluster_id}/undo": {"post": {
                "summary": "Undo the latest decision on a cluster (its previous state and flags come back)",
                "parameters": [cluster_id],
                "responses": _resp(json_ok("#/components/schemas/ClusterDecision"), 400, 403, 404, 413, 415)}},
            "/audit": {"get": {
                "summary": "The audit log, newest first: filter, page with next_before_id, export as CSV",
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": sch} for n, sch in (
                        ("actor", {"type": "string", "maxLength": 200}),
                        ("action", {"type": "string", "maxLength": 200}),
                        ("target", {"type": "string", "maxLength": 200,
                                    "description": "exact, or a prefix ending in *"}),
                        ("since", {"type": "string", "format": "date-time"}),
                        ("until", {"type": "string", "format": "date-time"}),
                        ("before_id", {"type": "integer", "minimum": 1, "maximum": MAX_ID}),
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                        ("format", {"type": "string", "enum": ["json", "csv"], "default": "json"}))],
                "responses": _resp({"description": "OK", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["events", "next_before_id"],
                                                    "properties": {
                        "events": {"type": "array", "items": {"type": "object", "required": [
                            "id", "at", "actor", "action", "target", "detail"], "properties": {
                            "id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                            "actor": {"type": "string"}, "action": {"type": "string"},
                            "target": {"type": "string"}, "detail": {"type": "object"}}}},
                        "next_before_id": {"type": ["integer", "null"]}}}},
                    "text/csv": {"schema": {"type": "string"}}}}, 400)}},
            "/stats": {"get": {"summary": "What the catalog and indexes hold",
                               "responses": _resp({"description": "OK", "content": {"application/json": {
                                   "schema": {"type": "object"}}}})}},
            "/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": {"description": "OK", "content": {
                                          "application/json": {"schema": {"type": "object"}}}},
                                                    "405": _ERR, "500": _ERR}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Error": {"description": "Error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
                "RetryLater": {"description": "Busy or over the rate limit: try again after Retry-After seconds",
                               "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}},
                               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                **json_schemas(),
                "ClusterDecision": {"type": "object", "required": ["cluster"], "properties": {
                    "cluster": {"type": "object", "required": ["id", "status"], "properties": {
                        "id": {"type": "integer"}, "name": {"type": ["string", "null"]},
                        "label": {"type": ["string", "null"]}, "status": {"type": "string"},
                        "size": {"type": "integer"}, "reviewed_by": {"type": ["string", "null"]}}},
                    "unflagged": {"type": "array", "items": {"type": "integer"}},
                    "next_unreviewed": {"type": ["integer", "null"]}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                   "request_id": {"type": "string"}}}}},
                "Flag": {"type": ["object", "null"], "properties": {
                    "source": {"type": "string"}, "label": {"type": ["string", "null"]},
                    "at": {"type": ["string", "null"], "format": "date-time"}}},
                "Image": {"type": "object", "required": ["id", "sha256", "p_unsafe", "flagged", "thumbnail_url"],
                          "properties": {
                              "id": {"type": "integer"}, "sha256": {"type": "string"}, "format": {"type": "string"},
                              "width": {"type": "integer"}, "height": {"type": "integer"},
                              "frames": {"type": "integer"}, "size_bytes": {"type": "integer"},
                              "p_unsafe": {"type": "number"}, "flagged": {"type": "boolean"},
                              "flag": {"$ref": "#/components/schemas/Flag"},
                              "thumbnail_url": {"type": "string"},
                              "paths": {"type": "array", "items": {"type": "string"}},
                              "external_ids": {"type": "array", "items": {"type": "string"}},
                              "created_at": {"type": "string", "format": "date-time"},
                              "kind": {"type": "string", "enum": ["image", "video"]},
                              "duration_s": {"type": ["number", "null"], "description": "a video's length"},
                              "cluster": {"$ref": "#/components/schemas/ClusterFacts"}}},
                "ClusterFacts": {
                    "type": ["object", "null"], "description": "the image's place in the current clustering run (null: "
                    "not in it)", "required": ["id", "run_id", "status"], "properties": {
                        "id": {"type": ["integer", "null"], "description": "its cluster; null: left unclustered"},
                        "run_id": {"type": "integer"}, "probability": {"type": "number", "minimum": 0, "maximum": 1},
                        "provisional": {"type": "boolean", "description": "placed after the run (--assign-new)"},
                        "name": {"type": ["string", "null"]}, "label": {"type": ["string", "null"]},
                        "status": {"type": "string", "enum": ["unreviewed", "confirmed", "dismissed", "unclustered"]},
                        "family": {"type": ["integer", "null"], "minimum": 0,
                                   "description": "its copy family inside the cluster: verified copies of one picture"},
                        "family_size": {"type": ["integer", "null"], "minimum": 2,
                                        "description": "how many of the cluster's images are in that family"}}},
                "ImageWithHistory": {"allOf": [{"$ref": "#/components/schemas/Image"}, {"type": "object", "properties": {
                    "hashes": {"$ref": "#/components/schemas/Signals"},
                    "p_labels": {"$ref": "#/components/schemas/PLabels"},
                    "history": {"type": "array", "items": {"type": "object", "properties": {
                        "action": {"type": "string", "enum": ["flag", "unflag"]}, "source": {"type": "string"},
                        "label": {"type": ["string", "null"]}, "actor": {"type": "string"},
                        "reason": {"type": ["string", "null"]}, "at": {"type": "string"}}}}}}]},
                "Hit": {"allOf": [{"$ref": "#/components/schemas/Image"}, {"type": "object", "required": ["similarity", "view"],
                                                                          "properties": {"p_labels": {"$ref": "#/components/schemas/PLabels"},
                                                                                         "similarity": {"type": "number", "description": "cosine in the matching space"},
                                                                                         "view": {"type": "string", "pattern": "^(full|clip|trimmed|content|mirror|cell[1-8]|inset[1-2]|grid[1-5]|@[0-9.]+(/(trimmed|grid[1-5]))?)$", "description": "the query view that matched best: the whole image, its trimmed or content box, its mirror, a cell of a composite (cells, largest first), a picture pasted over the upload (inset1, inset2) or a part of the grid searched when nothing else was confident; for a clip, the keyframe at @<seconds> (or its trimmed box, or a part of its grid) or the whole clip (its keyframes' mean)"},
                                                                                         "view_box": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}, "minItems": 4, "maxItems": 4, "description": "that view's box in the upload, [left, top, right, bottom] in its pixels as displayed; null for the whole image and the mirror"},
                                                                                         "stored_box": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}, "minItems": 4, "maxItems": 4, "description": "the flagged picture's window the match came through (a part of it: a heavy crop, a collage's cell), [left, top, right, bottom] in its pixels as displayed; null when the whole picture matched"},
                                                                                         "local_matches": {"type": ["integer", "null"], "minimum": 0, "description": "local-feature matches (ORB + RANSAC) that agree on one transform between the upload and this hit's thumbnail; null: not checked (queries by id, hits below the first verified one)"},
                                                                                         "verified": {"type": ["boolean", "null"], "description": "the hit shows the upload's picture (a verified hit is moved first): its PDQ is within the match threshold of the upload's (or its MD5 is the same), or local_matches reached the threshold; null: not checked"},
                                                                                         "verified_by": {"type": ["string", "null"], "enum": ["hash", "local_features", None], "description": "what verified it: the upload's hashes (PDQ, MD5; the hit is among hashes.image_matches) or local features"},
                                                                                         "matched_frames": {"type": "array", "description": "a stored video's keyframes that matched the query's rows, best first", "items": {"$ref": "#/components/schemas/FramePair"}}}}]},
                "Keyframes": {"type": "object", "required": ["image_id", "keyframes"], "properties": {
                    "image_id": {"type": "integer"},
                    "keyframes": {"type": "array", "items": {"type": "object", "required": ["id", "offset_s"], "properties": {
                        "id": {"type": "integer"}, "offset_s": {"type": "number", "minimum": 0},
                        "scene_cut": {"type": "boolean"}, "p_unsafe": {"type": "number"},
                        "thumbnail_url": {"type": "string"}}}}}},
                "FramePair": {"type": "object", "required": ["query_view", "offset_s", "similarity"], "properties": {
                    "query_view": {"type": "string", "description": "the query's row (a view name, or @<seconds> of a clip's keyframe)"},
                    "query_offset_s": {"type": ["number", "null"], "description": "seconds into the query clip; null for an image query"},
                    "offset_s": {"type": "number", "minimum": 0, "description": "seconds into the stored video"},
                    "similarity": {"type": "number"}}},
                "SearchResponse": {"type": "object", "required": ["model_id", "scope", "index_checkpoint", "results"],
                                   "properties": {
                                       "model_id": {"type": "string"}, "scope": {"type": "string"},
                                       "index_checkpoint": {"type": "object", "properties": {
                                           "image_id": {"type": "integer"}, "flag_event_id": {"type": "integer"},
                                           "generation": {"type": "integer"}}},
                                       "results": {"type": "array", "items": {"type": "object", "properties": {
                                           "query": {"type": "object", "properties": {
                                               "name": {"type": "string"}, "sha256": {"type": ["string", "null"]},
                                               "p_unsafe": {"type": ["number", "null"]}, "known": {"type": "boolean"},
                                               "known_id": {"type": ["integer", "null"]},
                                               "p_labels": {"$ref": "#/components/schemas/PLabels"},
                                               "kind": {"type": "string", "enum": ["image", "video"]},
                                               "keyframes": {"type": "integer", "minimum": 0,
                                                             "description": "a clip's keyframes searched"}}},
                                           "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}},
                                           "hashes": {"anyOf": [{"$ref": "#/components/schemas/HashEvidence"},
                                                                {"type": "null"}]}}}}}},
                "PLabels": {"type": "object", "additionalProperties": {"type": "number"},
                            "description": "P(label) from each active head (label → probability)"},
                "Signals": {"type": "object", "properties": {
                    "md5": {"type": ["string", "null"]}, "pdq": {"type": ["string", "null"]},
                    "pdq_quality": {"type": ["integer", "null"]},
                    "pdq_usable": {"type": "boolean", "description": "PDQ quality >= 50: only then is it matched"},
                    "vpdq": {"type": ["string", "null"], "description": "a video's vPDQ (threatexchange's signal string)"}}},
                "BankMatch": {"type": "object", "required": ["bank", "entry_id", "signal_type", "distance", "threshold"],
                              "properties": {
                                  "bank": {"type": "string"}, "role": {"type": "string", "enum": ["match", "negative"]},
                                  "entry_id": {"type": "integer"}, "signal_type": {"type": "string", "enum": ["pdq", "md5", "vpdq"]},
                                  "signal": {"type": "string"}, "distance": {"type": "integer"},
                                  "threshold": {"type": "integer"}, "external_id": {"type": ["string", "null"]},
                                  "similarity": {"type": ["string", "null"], "description": "vPDQ: the share of the "
                                                 "query's and of the entry's frames that matched, as HMA writes it"},
                                  "tags": {"type": "array", "items": {"type": "string"}}}},
                "HashEvidence": {"type": "object", "description": "the query's hashes, the bank entries "
                                 "they match, and stored images sharing them", "allOf": [
                                     {"$ref": "#/components/schemas/Signals"},
                                     {"type": "object", "required": ["bank_matched", "bank_matches"], "properties": {
                                         "bank_matched": {"type": "boolean", "description": "a bank matched and no "
                                                          "negative bank suppressed it"},
                                         "bank_matches": {"type": "array", "items": {"$ref": "#/components/schemas/BankMatch"}},
                                         "negative_matches": {"type": "array", "items": {"$ref": "#/components/schemas/BankMatch"}},
                                         "image_matches": {"type": "array", "items": {"allOf": [
                                             {"$ref": "#/components/schemas/Image"},
                                             {"type": "object", "properties": {"signal_type": {"type": "string"},
                                                                               "distance": {"type": "integer"}}}]}}}}]},
                "FlagResult": {"type": "object", "properties": {
                    "changed": {"type": "boolean"}, "image": {"$ref": "#/components/schemas/ImageWithHistory"}}},
            },
        },
    }
